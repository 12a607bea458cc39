// Softmax cross-entropy over rows of bf16 logits, for x86-64 CPUs with AVX2 and FMA: the loss
// of the fused LM head (qwenlite/training/loss.py) under bf16 autocast. Built and loaded by
// qwenlite/accel/skinny.py beside the decode kernels.
//
// qwenlite_xent_bf16: for each row x (V logits, bf16) with target t, in fp32:
//   lse = max + log Σ e^(x - max),  loss = lse - x[t],
// and the row overwritten in place with bf16(e^(x - lse) - [j == t]): the gradient of the loss
// w.r.t. the logits, ready for the bf16 matmul that takes it back through the head. torch does
// the same in five passes over fp32 copies of the logits (widen, log-softmax, exp, the target's
// -1, narrow); this reads the bf16 row twice (the second time from cache), keeps e^(x - max) in
// a cached fp32 row, and writes the bf16 row once. e^x is Cephes' polynomial (within 2 ulp; 0
// where x - max < -87, where torch gives fp32 denormals); the sums' order differs from torch's,
// and the probabilities are e^(x - max) / Σ rather than e^(x - lse). A row holding a NaN comes
// out NaN.

#include "skinny.h"

namespace {

// 8 floats rounded to bf16 (nearest, ties to even) and stored; no NaN reaches here.
inline void store8_bf16(uint16_t *p, __m256 f) {
    __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    u = _mm256_srli_epi32(u, 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u),
                                            _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(p), packed);
}

inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

float row(uint16_t *x, int64_t V, int64_t t, float *e) {
    const int64_t V8 = V / 8 * 8;
    // pass 1: the maximum, and whether any logit is NaN
    __m256 m8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
    for (int64_t j = 0; j < V8; j += 8) {
        const __m256 v = load8(x + j);
        m8 = _mm256_max_ps(m8, v);
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float m = hmax(m8);
    bool nan = _mm256_movemask_ps(nan8) != 0;
    for (int64_t j = V8; j < V; j++) {
        const float v = widen(x[j]);
        nan |= v != v;
        m = v > m ? v : m;
    }
    if (nan || m == INFINITY || m == -INFINITY) {  // NaN, or no finite softmax: torch's NaN
        for (int64_t j = 0; j < V; j++) x[j] = 0x7fc0;
        return NAN;
    }
    // pass 2: e^(x - m) into the thread's scratch row (in cache), and its sum
    const __m256 mv = _mm256_set1_ps(m);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= V8; j += 16) {
        const __m256 e0 = exp8(_mm256_sub_ps(load8(x + j), mv));
        const __m256 e1 = exp8(_mm256_sub_ps(load8(x + j + 8), mv));
        _mm256_store_ps(e + j, e0);
        _mm256_store_ps(e + j + 8, e1);
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
    }
    for (; j < V8; j += 8) {
        const __m256 e0 = exp8(_mm256_sub_ps(load8(x + j), mv));
        _mm256_store_ps(e + j, e0);
        s0 = _mm256_add_ps(s0, e0);
    }
    float sum = hsum(_mm256_add_ps(s0, s1));
    for (j = V8; j < V; j++) sum += (e[j] = exp1(widen(x[j]) - m));
    const float lse = m + logf(sum);
    const float xt = widen(x[t]);
    // pass 3: the probabilities e / Σ, in place; the target's minus one
    const float inv = 1.0f / sum;
    const __m256 iv = _mm256_set1_ps(inv);
    for (j = 0; j < V8; j += 8) store8_bf16(x + j, _mm256_mul_ps(_mm256_load_ps(e + j), iv));
    for (j = V8; j < V; j++) x[j] = to_bf16(e[j] * inv);
    x[t] = to_bf16(e[t] * inv - 1.0f);
    return lse - xt;
}

thread_local Rows exp_rows;  // per OpenMP thread: one row of e^(x - max)

}  // namespace

// logits: rows × V bf16, row stride `stride` (elements); targets: rows int64 in [0, V);
// loss: rows floats out. Returns 0; 1 for arguments it does not take (a target outside [0, V),
// V < 1, stride < V); 2 when out of memory.
extern "C" int qwenlite_xent_bf16(uint16_t *logits, int64_t rows, int64_t V, int64_t stride,
                                  const int64_t *targets, float *loss, int threads) {
    if (V < 1 || stride < V || rows < 0) return 1;
    for (int64_t r = 0; r < rows; r++)
        if (targets[r] < 0 || targets[r] >= V) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *e = exp_rows.get(static_cast<size_t>(V));
        if (!e) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (e) loss[r] = row(logits + r * stride, V, targets[r], e);
    }
    return failed ? 2 : 0;
}
