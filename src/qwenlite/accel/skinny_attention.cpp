// The attention of a decode step, for x86-64 CPUs with AVX2 and FMA. Built and loaded by
// qwenlite/accel/skinny.py beside the few-row matmuls of skinny_linears.cpp.
//
// qwenlite_decode_attention: one new query per sequence and head over its cached keys and
// values (grouped-query attention): an fp32 query, fp32 or bf16 keys and values, fp32 scores,
// softmax and output, as torch's SDPA computes them up to the order of the sums and the exp
// (Cephes' polynomial, within 2 ulp). Unlike SDPA it does not propagate NaN scores.

#include "skinny.h"

namespace {

struct Attention {
    const float *q;            // (B, H, D), strides q_b, q_h; unit stride along D
    const void *k, *v;         // (B, KV, T, D), strides kv_b, kv_h, kv_t (k and v alike)
    const uint8_t *mask;       // (B, T) "may attend", strides m_b, m_t; or null
    float *out;                // (B, H, D) contiguous
    int64_t q_b, q_h, kv_b, kv_h, kv_t, m_b, m_t;
    int64_t B, H, KV, T, D;
    float scale;
};

// The R query heads that share KV head g of sequence b; scores (R × T) is scratch.
template <int R, typename KVT>
void attend(const Attention &a, int64_t b, int64_t g, float *scores) {
    const int64_t T = a.T, D = a.D;
    const KVT *kb = static_cast<const KVT *>(a.k) + b * a.kv_b + g * a.kv_h;
    const KVT *vb = static_cast<const KVT *>(a.v) + b * a.kv_b + g * a.kv_h;
    const float *qb = a.q + b * a.q_b + g * R * a.q_h;
    const uint8_t *mb = a.mask ? a.mask + b * a.m_b : nullptr;
    float *out = a.out + (b * a.H + g * R) * D;
    alignas(32) float qs[R * 256];  // the queries, scaled (D ≤ 256)
    for (int r = 0; r < R; r++)
        for (int64_t d = 0; d < D; d++) qs[r * D + d] = qb[r * a.q_h + d] * a.scale;
    float top[R];
    for (int r = 0; r < R; r++) top[r] = -INFINITY;
    auto keep = [&](int r, int64_t t, float sc) {  // a score, masked to -inf
        if (mb && !mb[t * a.m_t]) sc = -INFINITY;
        scores[r * T + t] = sc;
        top[r] = sc > top[r] ? sc : top[r];
    };
    int64_t t = 0;
    for (; t + 2 <= T; t += 2) {  // scores = (q·scale)·kᵀ, two keys at a time (a query vector
        const KVT *k0 = kb + t * a.kv_t, *k1 = k0 + a.kv_t;  // loaded once serves both)
        __m256 acc0[R], acc1[R];
        for (int r = 0; r < R; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 x0 = load8(k0 + d), x1 = load8(k1 + d);
            for (int r = 0; r < R; r++) {
                const __m256 qv = _mm256_load_ps(qs + r * D + d);
                acc0[r] = _mm256_fmadd_ps(qv, x0, acc0[r]);
                acc1[r] = _mm256_fmadd_ps(qv, x1, acc1[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            keep(r, t, hsum(acc0[r]));
            keep(r, t + 1, hsum(acc1[r]));
        }
    }
    for (; t < T; t++) {
        const KVT *kt = kb + t * a.kv_t;
        __m256 acc[R];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 kv = load8(kt + d);
            for (int r = 0; r < R; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_load_ps(qs + r * D + d), kv, acc[r]);
        }
        for (int r = 0; r < R; r++) keep(r, t, hsum(acc[r]));
    }
    float inv[R];
    for (int r = 0; r < R; r++) {  // softmax numerators in place, and 1 / their sum
        float *sr = scores + r * T;
        if (top[r] == -INFINITY) {  // nothing to attend to: zeros, as torch's SDPA gives
            for (int64_t t = 0; t < T; t++) sr[t] = 0.f;
            inv[r] = 0.f;
            continue;
        }
        const __m256 m = _mm256_set1_ps(top[r]);
        __m256 sum8 = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= T; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + t), m));
            _mm256_storeu_ps(sr + t, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum(sum8);
        for (; t < T; t++) {
            sr[t] = sr[t] == -INFINITY ? 0.f : exp1(sr[t] - top[r]);
            sum += sr[t];
        }
        inv[r] = 1.f / sum;
    }
    for (int64_t d = 0; d < D; d += 8) {  // out = softmax · v, 8 columns of v at a time
        __m256 acc[R];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t t = 0; t < T; t++) {
            const __m256 vv = load8(vb + t * a.kv_t + d);
            for (int r = 0; r < R; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + r * T + t), vv, acc[r]);
        }
        for (int r = 0; r < R; r++)
            _mm256_storeu_ps(out + r * D + d, _mm256_mul_ps(acc[r], _mm256_set1_ps(inv[r])));
    }
}

thread_local Rows score_rows;  // per OpenMP thread

template <int R, typename KVT>
int attention(const Attention &a, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = score_rows.get(static_cast<size_t>(R * a.T));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < a.B * a.KV; p++)
            if (scores) attend<R, KVT>(a, p / a.KV, p % a.KV, scores);
    }
    return failed ? 2 : 0;
}

template <typename KVT>
int attention_r(const Attention &a, int64_t r, int threads) {
    switch (r) {
        case 1: return attention<1, KVT>(a, threads);
        case 2: return attention<2, KVT>(a, threads);
        case 3: return attention<3, KVT>(a, threads);
        case 4: return attention<4, KVT>(a, threads);
        case 5: return attention<5, KVT>(a, threads);
        case 6: return attention<6, KVT>(a, threads);
        case 7: return attention<7, KVT>(a, threads);
        case 8: return attention<8, KVT>(a, threads);
    }
    return 1;
}

}  // namespace


// One decode step's attention: out[b, h] = softmax(q[b, h]·k[b, g]ᵀ · scale, masked) · v[b, g]
// for KV head g = h / (H / KV). Returns 0; 1 for shapes it does not take (H / KV outside 1..8,
// D not a multiple of 8 or above 256, T < 1); 2 when out of memory.
extern "C" int qwenlite_decode_attention(const float *q, int64_t q_b, int64_t q_h, const void *k,
                                         const void *v, int kv_bf16, int64_t kv_b, int64_t kv_h,
                                         int64_t kv_t, const uint8_t *mask, int64_t m_b,
                                         int64_t m_t, float *out, int64_t B, int64_t H,
                                         int64_t KV, int64_t T, int64_t D, float scale,
                                         int threads) {
    if (B < 1 || KV < 1 || H % KV || T < 1 || D % 8 || D < 8 || D > 256) return 1;
    const Attention a{q, k, v, mask, out, q_b, q_h, kv_b, kv_h, kv_t, m_b, m_t, B, H, KV, T, D,
                      scale};
    if (kv_bf16) return attention_r<uint16_t>(a, H / KV, threads);
    return attention_r<float>(a, H / KV, threads);
}
