// The elementwise passes of a training step fused, for x86-64 CPUs with AVX2 and FMA: SwiGLU's
// backward in bf16 and RMSNorm in fp32, forward and backward. Built and loaded by
// qwenlite/accel/skinny.py beside the decode kernels; qwenlite/accel/fused.py calls them.
//
// torch runs SwiGLU's silu(g)·u backward as four passes over (tokens × 4864) bf16 tensors, and
// RMSNorm's backward as a dozen passes over (tokens × 896) fp32 ones; here each is one pass
// (SwiGLU's forward stays torch's: its AVX-512 passes beat an AVX2 one here). The roundings are torch's: silu(g) is rounded to bf16 before the product, each
// product and gradient once, so a result differs from torch's only where e^x (Cephes', within
// 2 ulp) or the order of a row's sum does.

#include <omp.h>

#include "skinny.h"

namespace {

// 8 floats rounded to bf16 (nearest, ties to even), NaN kept NaN.
inline __m128i narrow8(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, quiet, nan);
    r = _mm256_and_si256(r, _mm256_set1_epi32(0xffff));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline __m256 round8(__m256 f) {  // to bf16 and back
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(narrow8(f)), 16));
}

inline __m256 sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline float round1(float f) { return widen(to_bf16(f)); }
inline float sigmoid1(float x) { return 1.0f / (1.0f + exp1(-x)); }

inline void store8(uint16_t *p, __m256 f) {
    _mm_storeu_si128(reinterpret_cast<__m128i *>(p), narrow8(f));
}

// [begin, end) of n elements for this thread, in multiples of 8
inline void span(int64_t n, int64_t &begin, int64_t &end) {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t blocks = (n + 7) / 8, per = (blocks + threads - 1) / threads;
    begin = me * per * 8 < n ? me * per * 8 : n;
    end = (me + 1) * per * 8 < n ? (me + 1) * per * 8 : n;
}

}  // namespace

// The gradients of out = bf16(silu(g)) · u, as torch's autograd forms them: du = bf16(dy · s),
// ds = bf16(dy · u), dg = bf16(ds · σ(g) · (1 + g · (1 − σ(g)))), s = bf16(silu(g)).
extern "C" void qwenlite_swiglu_bwd(const uint16_t *g, const uint16_t *u, const uint16_t *dy,
                                    uint16_t *dg, uint16_t *du, int64_t n, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t b, e;
        span(n, b, e);
        const __m256 one = _mm256_set1_ps(1.0f);
        int64_t j = b;
        for (; j + 8 <= e; j += 8) {
            const __m256 x = load8(g + j), d = load8(dy + j);
            const __m256 sig = sigmoid8(x);
            const __m256 s = round8(_mm256_mul_ps(x, sig));
            store8(du + j, _mm256_mul_ps(d, s));
            const __m256 ds = round8(_mm256_mul_ps(d, load8(u + j)));
            const __m256 slope = _mm256_mul_ps(
                sig, _mm256_fmadd_ps(x, _mm256_sub_ps(one, sig), one));
            store8(dg + j, _mm256_mul_ps(ds, slope));
        }
        for (; j < e; j++) {
            const float x = widen(g[j]), d = widen(dy[j]), sig = sigmoid1(x);
            du[j] = to_bf16(d * round1(x * sig));
            const float ds = round1(d * widen(u[j]));
            dg[j] = to_bf16(ds * (sig * (1.0f + x * (1.0f - sig))));
        }
    }
}

// RMSNorm forward over rows of d fp32 values: r = 1 / sqrt(mean(x²) + eps) per row (kept for
// the backward), y = w · (x · r).
extern "C" void qwenlite_rmsnorm_fwd(const float *x, const float *w, float *y, float *r,
                                     int64_t rows, int64_t d, float eps, int threads) {
    const int64_t d8 = d / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * d;
        float *yr = y + i * d;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < d8; j += 8) {
            const __m256 v = _mm256_loadu_ps(xr + j);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (int64_t j = d8; j < d; j++) ss += xr[j] * xr[j];
        const float ri = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
        r[i] = ri;
        const __m256 rv = _mm256_set1_ps(ri);
        for (int64_t j = 0; j < d8; j += 8)
            _mm256_storeu_ps(yr + j, _mm256_mul_ps(_mm256_loadu_ps(w + j),
                                                   _mm256_mul_ps(_mm256_loadu_ps(xr + j), rv)));
        for (int64_t j = d8; j < d; j++) yr[j] = w[j] * (xr[j] * ri);
    }
}

// RMSNorm backward for a frozen weight: a = w · dy, dx = r · a − x · (r³ / d) · Σ a·x per row.
extern "C" void qwenlite_rmsnorm_bwd(const float *x, const float *w, const float *r,
                                     const float *dy, float *dx, int64_t rows, int64_t d,
                                     int threads) {
    const int64_t d8 = d / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * d, *gr = dy + i * d;
        float *out = dx + i * d;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < d8; j += 8)
            acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(gr + j)),
                                  _mm256_loadu_ps(xr + j), acc);
        float dot = hsum(acc);
        for (int64_t j = d8; j < d; j++) dot += w[j] * gr[j] * xr[j];
        const float ri = r[i], c = ri * ri * ri * dot / static_cast<float>(d);
        const __m256 rv = _mm256_set1_ps(ri), cv = _mm256_set1_ps(c);
        for (int64_t j = 0; j < d8; j += 8) {
            const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(gr + j));
            _mm256_storeu_ps(out + j, _mm256_fnmadd_ps(_mm256_loadu_ps(xr + j), cv,
                                                       _mm256_mul_ps(a, rv)));
        }
        for (int64_t j = d8; j < d; j++) out[j] = w[j] * gr[j] * ri - xr[j] * c;
    }
}
