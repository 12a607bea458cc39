// The elementwise passes of a training step and of a bf16 forward fused, for x86-64 CPUs with
// AVX2 and FMA: SwiGLU's backward in bf16, RMSNorm in fp32 (forward and backward) and in bf16
// (forward), and the rotary embedding in bf16. Built and loaded by qwenlite/accel/skinny.py
// beside the decode kernels; qwenlite/accel/fused.py calls them.
//
// torch runs SwiGLU's silu(g)·u backward as four passes over (tokens × 4864) bf16 tensors,
// RMSNorm's backward as a dozen passes over (tokens × 896) fp32 ones, a bf16 RMSNorm as seven
// (widen, square, sum, divide, add, rsqrt, multiply, narrow, multiply) and the rotation
// x·cos + rotate_half(x)·sin as six; here each is one pass (SwiGLU's forward stays torch's: its
// AVX-512 passes beat an AVX2 one here). The roundings are torch's: silu(g) is rounded to bf16
// before the product, each bf16 product, sum and gradient once, so a result differs from
// torch's only where e^x (Cephes', within 2 ulp) or the order of a row's sum does; the rotation
// has neither, and equals torch's bit for bit.

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

// Fewer elements than this run on the calling thread (a decode step's 8 rows): a parallel
// region's start and end would cost more than they save (torch's grain size).
constexpr int64_t kParallelWork = 32768;

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

// Σ fp32(x[i])² over a row of d bf16 values in the order torch 2.x sums a contiguous fp32 row
// (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum's inner reduction with float
// accumulators; registered without an AVX-512 variant, so its vectors hold 8 floats on every
// x86 CPU): the row's 8-float vectors summed as four interleaved rows (ilp 4), each a cascade
// of four levels of 2^level_power vectors; the leftover vectors into the first; the four added
// in order; then the scalar tail and the 8 lanes, one by one, onto 0. Rows shorter than 8 go
// its scalar way: the same cascade over single floats. The same order gives the same float, so
// the norm is torch's to the bit.
static float torch_order_sum_sq(const uint16_t *x, int64_t d) {
    if (d < 8) {  // the scalar path: row_sum over single values
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const int64_t size_ilp = d / 4;
        for (int64_t i = 0; i < size_ilp; i++)
            for (int k = 0; k < 4; k++) {
                const float v = widen(x[i * 4 + k]), sq = v * v;
                acc[k] += sq;
            }
        for (int64_t i = size_ilp * 4; i < d; i++) {
            const float v = widen(x[i]), sq = v * v;
            acc[0] += sq;
        }
        return ((acc[0] + acc[1]) + acc[2]) + acc[3];
    }
    const int64_t nvec = d / 8, size_ilp = nvec / 4;
    int64_t log2 = 1;  // c10's CeilLog2
    if (size_ilp > 2) {
        uint64_t m = static_cast<uint64_t>(size_ilp) - 1;
        log2 = 0;
        while (m) { log2++; m >>= 1; }
    }
    const int64_t level_power = log2 / 4 > 4 ? log2 / 4 : 4;
    const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
    __m256 acc[4][4];  // level, interleaved row
    for (auto &level : acc)
        for (auto &a : level) a = _mm256_setzero_ps();
    const auto sq = [x](int64_t v) { const __m256 f = load8(x + v * 8); return _mm256_mul_ps(f, f); };
    int64_t i = 0;
    while (i + level_step <= size_ilp) {
        for (int64_t j = 0; j < level_step; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], sq(i * 4 + k));
        for (int j = 1; j < 4; j++) {
            for (int k = 0; k < 4; k++) {
                acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = _mm256_setzero_ps();
            }
            if ((i & (level_mask << (j * level_power))) != 0) break;
        }
    }
    for (; i < size_ilp; i++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], sq(i * 4 + k));
    for (int j = 1; j < 4; j++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
    __m256 row = acc[0][0];
    for (int64_t v = size_ilp * 4; v < nvec; v++) row = _mm256_add_ps(row, sq(v));
    for (int k = 1; k < 4; k++) row = _mm256_add_ps(row, acc[0][k]);
    float total = 0.0f;
    for (int64_t t = nvec * 8; t < d; t++) {
        const float v = widen(x[t]), s2 = v * v;
        total += s2;
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, row);
    for (float lane : lanes) total += lane;
    return total;
}

// RMSNorm forward of a bf16 model, as qwenlite.model.norm.RMSNorm computes it: per row of d bf16
// values, r = 1 / sqrt(Σ fp32(x²) / d + eps) in fp32, the sum in torch's order
// (torch_order_sum_sq), then y = bf16(w · bf16(x · r)). r is also written where r_out is not
// null.
extern "C" void qwenlite_rmsnorm_bf16_fwd(const uint16_t *x, const uint16_t *w, uint16_t *y,
                                          float *r_out, int64_t rows, int64_t d, float eps,
                                          int threads) {
    const int64_t d8 = d / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= kParallelWork)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xr = x + i * d;
        uint16_t *yr = y + i * d;
        const float ri = 1.0f / sqrtf(torch_order_sum_sq(xr, d) / static_cast<float>(d) + eps);
        if (r_out) r_out[i] = ri;
        const __m256 rv = _mm256_set1_ps(ri);
        for (int64_t j = 0; j < d8; j += 8)
            store8(yr + j, _mm256_mul_ps(load8(w + j), round8(_mm256_mul_ps(load8(xr + j), rv))));
        for (int64_t j = d8; j < d; j++) yr[j] = to_bf16(widen(w[j]) * round1(widen(xr[j]) * ri));
    }
}

// The rotary embedding of bf16 queries or keys, x·cos + rotate_half(x)·sin with torch's bf16
// roundings (each product and the sum rounded to bf16): for i < h = D/2,
//   out[i] = bf16(bf16(x[i]·cos[i]) + bf16(−x[i+h]·sin[i])),
//   out[i+h] = bf16(bf16(x[i+h]·cos[i+h]) + bf16(x[i]·sin[i+h])).
// x is (B, H, N, D) with element strides sb, sh, sn (its last dimension contiguous); cos and sin
// are (B, N, D) with strides cb, cn (cb 0: one table for every sequence); out is a contiguous
// (B, H, N, D).
extern "C" void qwenlite_rope_bf16(const uint16_t *x, int64_t sb, int64_t sh, int64_t sn,
                                   const uint16_t *cos, const uint16_t *sin, int64_t cb,
                                   int64_t cn, uint16_t *out, int64_t B, int64_t H, int64_t N,
                                   int64_t D, int threads) {
    const int64_t h = D / 2, h8 = h / 8 * 8, rows = B * H * N;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * D >= kParallelWork)
    for (int64_t row = 0; row < rows; row++) {
        const int64_t b = row / (H * N), hd = row / N % H, n = row % N;
        const uint16_t *xr = x + b * sb + hd * sh + n * sn;
        const uint16_t *c = cos + b * cb + n * cn, *s = sin + b * cb + n * cn;
        uint16_t *o = out + row * D;
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int64_t j = 0; j < h8; j += 8) {
            const __m256 x1 = load8(xr + j), x2 = load8(xr + h + j);
            const __m256 lo = _mm256_add_ps(
                round8(_mm256_mul_ps(x1, load8(c + j))),
                round8(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(s + j))));
            const __m256 hi = _mm256_add_ps(round8(_mm256_mul_ps(x2, load8(c + h + j))),
                                            round8(_mm256_mul_ps(x1, load8(s + h + j))));
            store8(o + j, lo);
            store8(o + h + j, hi);
        }
        for (int64_t j = h8; j < h; j++) {
            const float x1 = widen(xr[j]), x2 = widen(xr[h + j]);
            o[j] = to_bf16(round1(x1 * widen(c[j])) + round1(-x2 * widen(s[j])));
            o[h + j] = to_bf16(round1(x2 * widen(c[h + j])) + round1(x1 * widen(s[h + j])));
        }
    }
}
