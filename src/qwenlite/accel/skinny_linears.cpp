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
// The decode step's attention is skinny_attention.cpp; what both share, skinny.h.

#include "skinny.h"

namespace {

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

thread_local Rows rows;  // x widened to fp32, per calling thread

}  // namespace

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
