// Matmuls of a few rows (a decode step's) over weights in their own (out, in) layout, for x86-64
// CPUs with AVX2 and FMA. Built and loaded by qwenlite/accel/skinny.py, which says why it exists.
//
//   y_i = x · W_iᵀ + b_i   for i < count, every W_i (n_i, K) row-major, x (M, K) with row stride ldx
//
// Weights are fp32, or bf16 widened to fp32 as they are read (exactly: a bf16 number is the top
// half of an fp32 one); x is widened to fp32 once; every product and sum is fp32; y is written
// in fp32 or rounded to bf16 (to nearest, ties to even) — what a bf16 GEMM computes, up to the
// order of the fp32 additions.
//
// Each output element is a dot product along K, 8 lanes at a time, so the weights stream once
// from memory in their stored order and need no reordered copy. A tile keeps MR rows × NC
// columns of accumulators in registers (12 or 8 of the 16): MR=8, NC=1 where all rows of x fit
// in L1 (K ≤ 1024), else MR=4, NC=3, which loads each x vector once for three columns. Threads
// (OpenMP, torch's own runtime) split the columns of all the weights of a call between them.
//
// qwenlite_decode_attention: one new query per sequence and head over its cached keys and
// values (grouped-query attention): an fp32 query, fp32 or bf16 keys and values, fp32 scores,
// softmax and output, as torch's SDPA computes them up to the order of the sums and the exp
// (Cephes' polynomial, within 2 ulp). Unlike SDPA it does not propagate NaN scores.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

namespace {

inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float widen(float f) { return f; }
inline float widen(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// x is widened once into groups of 8 rows (rows past M are zeros), each group 8·K floats: first
// K8/8 blocks of [8 rows][8 columns], so that one k-step of a tile reads its rows from one
// 256-byte stretch at fixed offsets from a single pointer, then the last K - K8 columns as
// [8 rows][K - K8].
inline int64_t group_stride(int64_t K) { return 8 * K; }

// out[c * MR + r] = Σ_k x[r0 + r][k] · w[c][k] for MR rows of a group of x starting at row r0 and
// NC weight rows (row stride K).
template <int MR, int NC, typename W>
inline void tile(const float *group, int r0, const W *w, int64_t K, float *out) {
    __m256 acc[NC][MR];
    for (int c = 0; c < NC; c++)
        for (int r = 0; r < MR; r++) acc[c][r] = _mm256_setzero_ps();
    const int64_t K8 = K & ~int64_t(7), T = K - K8;
    const float *xp = group + 8 * r0;
    for (int64_t k = 0; k < K8; k += 8, xp += 64) {
        __m256 wv[NC];
        for (int c = 0; c < NC; c++) wv[c] = load8(w + c * K + k);
        for (int r = 0; r < MR; r++) {
            const __m256 xv = _mm256_load_ps(xp + 8 * r);
            for (int c = 0; c < NC; c++) acc[c][r] = _mm256_fmadd_ps(xv, wv[c], acc[c][r]);
        }
    }
    const float *tail = group + 8 * K8 + r0 * T;
    for (int c = 0; c < NC; c++)
        for (int r = 0; r < MR; r++) {
            float s = hsum(acc[c][r]);
            for (int64_t t = 0; t < T; t++) s += tail[r * T + t] * widen(w[c * K + K8 + t]);
            out[c * MR + r] = s;
        }
}

struct Out {
    void *y;
    const void *bias;
    int64_t n;
};

// A tile's out[c * mr + r] (+ bias), rounded or not, into y at rows row0.., columns col0...
template <typename W>
inline void store(const Out &o, const float *out, int mr, int nc, int64_t row0, int64_t col0,
                  bool y_bf16) {
    for (int c = 0; c < nc; c++) {
        const int64_t col = col0 + c;
        const float b = o.bias ? widen(static_cast<const W *>(o.bias)[col]) : 0.f;
        for (int r = 0; r < mr; r++) {
            const float v = out[c * mr + r] + b;
            const int64_t at = (row0 + r) * o.n + col;
            if (y_bf16) static_cast<uint16_t *>(o.y)[at] = to_bf16(v);
            else static_cast<float *>(o.y)[at] = v;
        }
    }
}

// tile<m, NC> for a run-time row count m ≤ MR (≤ 8).
template <int MR, int NC, typename W>
inline void tile_rows(int64_t m, const float *group, int r0, const W *w, int64_t K, float *out) {
    switch (m) {
        case 1: tile<1, NC>(group, r0, w, K, out); return;
        case 2: tile<2, NC>(group, r0, w, K, out); return;
        case 3: tile<3, NC>(group, r0, w, K, out); return;
    }
    if constexpr (MR == 4) {
        tile<4, NC>(group, r0, w, K, out);
    } else {
        switch (m) {
            case 4: tile<4, NC>(group, r0, w, K, out); return;
            case 5: tile<5, NC>(group, r0, w, K, out); return;
            case 6: tile<6, NC>(group, r0, w, K, out); return;
            case 7: tile<7, NC>(group, r0, w, K, out); return;
            default: tile<8, NC>(group, r0, w, K, out); return;
        }
    }
}

// Columns [col0, col0 + nc) of one weight for all M rows, in tiles of up to MR rows (MR divides 8;
// nc < NC: the last columns of a weight, one at a time).
template <int MR, int NC, typename W>
void columns(const float *x, int64_t M, int64_t K, const W *w, const Out &o, int64_t col0,
             int nc, bool y_bf16) {
    float out[MR * NC];
    for (int64_t row0 = 0; row0 < M; row0 += MR) {
        const float *group = x + (row0 / 8) * group_stride(K);
        const int r0 = static_cast<int>(row0 % 8);
        const int64_t mr = M - row0 < MR ? M - row0 : MR;
        if (nc == NC) {
            if (mr == MR) tile<MR, NC, W>(group, r0, w + col0 * K, K, out);  // the usual case
            else tile_rows<MR, NC, W>(mr, group, r0, w + col0 * K, K, out);
            store<W>(o, out, static_cast<int>(mr), NC, row0, col0, y_bf16);
        } else {
            for (int c = 0; c < nc; c++) {
                tile_rows<MR, 1, W>(mr, group, r0, w + (col0 + c) * K, K, out);
                store<W>(o, out, static_cast<int>(mr), 1, row0, col0 + c, y_bf16);
            }
        }
    }
}

template <int MR, int NC, typename W>
void run(const float *x, int64_t M, int64_t K, int count, const void *const *w, const Out *outs,
         bool y_bf16, int threads) {
#pragma omp parallel num_threads(threads)
    for (int i = 0; i < count; i++) {  // each weight's columns split between the threads
        const Out o = outs[i];
        const W *wi = static_cast<const W *>(w[i]);
        const int64_t groups = (o.n + NC - 1) / NC;
#pragma omp for schedule(static) nowait
        for (int64_t g = 0; g < groups; g++) {
            const int64_t col0 = g * NC;
            const int nc = o.n - col0 < NC ? static_cast<int>(o.n - col0) : NC;
            columns<MR, NC, W>(x, M, K, wi, o, col0, nc, y_bf16);
        }
    }
}

template <typename X>
void widen_rows(const X *x, int64_t ldx, int64_t M, int64_t K, float *dst) {
    const int64_t K8 = K & ~int64_t(7), T = K - K8, groups = (M + 7) / 8;
    for (int64_t g = 0; g < groups; g++) {
        float *group = dst + g * group_stride(K);
        for (int r = 0; r < 8; r++) {
            const int64_t row = 8 * g + r;
            const X *src = row < M ? x + row * ldx : nullptr;
            for (int64_t k = 0; k < K8; k++)
                group[(k / 8) * 64 + 8 * r + k % 8] = row < M ? widen(src[k]) : 0.f;
            for (int64_t t = 0; t < T; t++)
                group[8 * K8 + r * T + t] = row < M ? widen(src[K8 + t]) : 0.f;
        }
    }
}

// x widened to fp32, per calling thread: 64-byte aligned, for loads that never straddle a cache
// line (a 16-byte-aligned buffer made the 8-row kernel half as fast).
struct Rows {
    float *data = nullptr;
    size_t size = 0;
    ~Rows() { free(data); }
    float *get(size_t n) {
        if (n > size) {
            free(data);
            data = static_cast<float *>(aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
            size = data ? n : 0;
        }
        return data;
    }
};
thread_local Rows rows;

}  // namespace

namespace {

// e^x for 8 lanes (Cephes' expf: x = n·ln2 + r, a degree-6 polynomial in r), 0 below -87.
inline __m256 exp8(__m256 x) {
    const __m256 zero_below = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3762626647949f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                               _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)), zero_below);
}

inline float exp1(float x) {
    alignas(32) float v[8];
    _mm256_store_ps(v, exp8(_mm256_set1_ps(x)));
    return v[0];
}

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

// Returns 0, or 1 for arguments it does not take (count outside 1..8, no rows or columns).
extern "C" int qwenlite_skinny_linears(const void *x, int64_t ldx, int x_bf16, int64_t M,
                                       int64_t K, int count, const void *const *w,
                                       const void *const *bias, const int64_t *n, int w_bf16,
                                       void *const *y, int y_bf16, int threads) {
    if (count < 1 || count > 8 || M < 1 || K < 1) return 1;
    Out outs[8];
    for (int i = 0; i < count; i++) {
        if (n[i] < 1) return 1;
        outs[i] = Out{y[i], bias[i], n[i]};
    }
    float *xs = rows.get(static_cast<size_t>((M + 7) / 8 * group_stride(K)));
    if (!xs) return 2;
    if (x_bf16) widen_rows(static_cast<const uint16_t *>(x), ldx, M, K, xs);
    else widen_rows(static_cast<const float *>(x), ldx, M, K, xs);
    const bool narrow = y_bf16 != 0;
    if (K <= 1024) {
        if (w_bf16) run<8, 1, uint16_t>(xs, M, K, count, w, outs, narrow, threads);
        else run<8, 1, float>(xs, M, K, count, w, outs, narrow, threads);
    } else {
        if (w_bf16) run<4, 3, uint16_t>(xs, M, K, count, w, outs, narrow, threads);
        else run<4, 3, float>(xs, M, K, count, w, outs, narrow, threads);
    }
    return 0;
}
