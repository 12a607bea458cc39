// Causal self-attention for LoRA training in bf16, forward and backward, on x86-64 CPUs with
// AVX512-BF16 (its dot-product instruction, VDPBF16PS: fp32 sums of bf16 products). Built and
// loaded by qwenlite/accel/skinny.py beside the decode kernels; called by
// qwenlite/accel/flash.py. The rest of the library needs only AVX2: every function here that
// uses AVX-512 is compiled for it by its own target attribute, and called only where the CPU
// has it. A compiler that cannot target AVX512-BF16 (GCC < 10, clang < 9) builds the two entry
// points as stubs that return 3, and the rest of the library as before.
//
// Shapes: q (B, H, T, 64), k and v (B, KV, T, 64), bf16, contiguous; each KV head serves H/KV
// query heads (grouped-query attention); T a multiple of 32. The arithmetic is flash
// attention's on the CPU, as torch does it for bf16 (its _scaled_dot_product_flash_attention_
// for_cpu): scores as fp32 sums of bf16 products, the softmax in fp32, its probabilities rounded
// to bf16 for the product with V; the backward recomputes the probabilities from the saved
// log-sum-exp. What differs is the blocking (and that a row's probabilities are normalised
// before their rounding to bf16, where torch divides the product by the sum after it). A block of 32 query tokens of all the query heads of
// one KV head (7 × 32 = 224 rows for Qwen2.5-0.5B) is one matrix against every key it may see,
// so that each product is a few large matmuls rather than many small ones, and no block computes
// keys past its last token (causal). torch 2.13's kernel ran at a third to a quarter of the rate
// of the matmuls an attention consists of (`python benchmarks/bench_cpu_measures.py
// train-attention`).
//
// Every matmul is C (fp32) = or += A (bf16, row-major) · B, with B "packed in pairs": element
// (kk, n) of B at Bp[(kk / 2) * ldb + 2 * n + kk % 2], the layout whose 32-bit words VDPBF16PS
// multiplies by a broadcast pair of A's row. The kernel's tile is 4 rows × 64 columns.

#include "skinny.h"

#include <algorithm>

#if defined(__clang__) ? (__clang_major__ >= 9) : (defined(__GNUC__) && __GNUC__ >= 10)
#define QWL_HAVE_AVX512BF16 1
#else
#define QWL_HAVE_AVX512BF16 0
#endif

#if QWL_HAVE_AVX512BF16

#define QWL_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

namespace {

constexpr int64_t HD = 64;  // head dimension
constexpr int64_t TB = 32;  // query tokens per block

struct Half {  // a per-thread bf16 scratch buffer, 64-byte aligned
    uint16_t *data = nullptr;
    size_t size = 0;
    ~Half() { free(data); }
    uint16_t *get(size_t n) {
        if (n > size) {
            free(data);
            data = static_cast<uint16_t *>(aligned_alloc(64, (n * 2 + 63) / 64 * 64));
            size = data ? n : 0;
        }
        return data;
    }
};

// e^x for 16 lanes: skinny.h's exp8 (Cephes' expf) in 512 bits, 0 below -87 (and for -inf).
QWL_AVX512BF16 inline __m512 exp16(__m512 x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.3762626647949f));
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i pow2n = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(keep, y, _mm512_castsi512_ps(pow2n));
}

// 16 bf16 values widened to floats (exact: a bf16 is a float's upper half).
QWL_AVX512BF16 inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// 16 floats rounded to bf16 (nearest, ties to even) and stored.
QWL_AVX512BF16 inline void store16_bf16(uint16_t *p, __m512 f) {
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), (__m256i)_mm512_cvtneps_pbh(f));
}

// 16 floats of two rows, rounded to bf16 and stored interleaved (a0 b0 a1 b1 ...): the pairs of
// a B packed in pairs whose contraction runs over these rows.
QWL_AVX512BF16 inline void store16x2_bf16(uint16_t *p, __m512 a, __m512 b) {
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a's 16 words, then b's
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                           1, 16, 0);
    _mm512_storeu_si512(p, _mm512_permutexvar_epi16(order, both));
}

template <int NV, bool ACC>
QWL_AVX512BF16 inline void tile(const uint16_t *A, int64_t lda, const uint16_t *Bp, int64_t ldb,
                                int64_t pairs, float *C, int64_t ldc) {
    __m512 c[4][NV];
    for (int r = 0; r < 4; r++)
        for (int v = 0; v < NV; v++)
            c[r][v] = ACC ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512i b[NV];
        for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_si512(Bp + p * ldb + 32 * v);
        for (int r = 0; r < 4; r++) {
            int32_t w;
            memcpy(&w, A + r * lda + 2 * p, 4);
            const __m512i a = _mm512_set1_epi32(w);
            for (int v = 0; v < NV; v++)
                c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)a, (__m512bh)b[v]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

// C (M × N, ldc) = or += A (M × 2·pairs, lda) · B (packed in pairs, ldb); M % 4 == 0, N % 16 == 0.
template <bool ACC>
QWL_AVX512BF16 void gemm(int64_t M, int64_t N, int64_t pairs, const uint16_t *A, int64_t lda,
                         const uint16_t *Bp, int64_t ldb, float *C, int64_t ldc) {
    for (int64_t n = 0; n < N; n += 64) {
        const int64_t nv = std::min<int64_t>(4, (N - n) / 16);
        for (int64_t i = 0; i < M; i += 4) {
            const uint16_t *a = A + i * lda, *b = Bp + 2 * n;
            float *c = C + i * ldc + n;
            switch (nv) {
                case 4: tile<4, ACC>(a, lda, b, ldb, pairs, c, ldc); break;
                case 3: tile<3, ACC>(a, lda, b, ldb, pairs, c, ldc); break;
                case 2: tile<2, ACC>(a, lda, b, ldb, pairs, c, ldc); break;
                default: tile<1, ACC>(a, lda, b, ldb, pairs, c, ldc); break;
            }
        }
    }
}

// x (T × 64) packed in pairs of its columns, as the B of a product with x's transpose:
// out[p * 2T + 2t + e] = x[t][2p + e].
void pack_columns(const uint16_t *x, int64_t T, uint16_t *out) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t p = 0; p < HD / 2; p++) memcpy(out + 2 * (p * T + t), x + t * HD + 2 * p, 4);
}

// x (R × 64, R even) packed in pairs of its rows: out[p * 128 + 2d + e] = x[2p + e][d].
void pack_rows(const uint16_t *x, int64_t R, uint16_t *out) {
    for (int64_t p = 0; p < R / 2; p++)
        for (int64_t d = 0; d < HD; d++) {
            out[p * 2 * HD + 2 * d] = x[(2 * p) * HD + d];
            out[p * 2 * HD + 2 * d + 1] = x[(2 * p + 1) * HD + d];
        }
}

// One block's rows: query head h0 + j's tokens t0 .. t0 + 31 for j < G, row j·32 + i.
inline void gather(const uint16_t *x, int64_t head0, int64_t G, int64_t T, int64_t t0,
                   uint16_t *rows) {
    for (int64_t j = 0; j < G; j++)
        memcpy(rows + j * TB * HD, x + ((head0 + j) * T + t0) * HD, TB * HD * 2);
}

// Scores past a row's own token (causal) to -inf; row j·32 + i is token t0 + i.
inline void mask_future(float *S, int64_t M, int64_t Lk, int64_t t0) {
    for (int64_t r = 0; r < M; r++)
        for (int64_t c = t0 + r % TB + 1; c < Lk; c++) S[r * Lk + c] = -INFINITY;
}

}  // namespace

extern "C" {

// out (B, H, T, 64) bf16 and lse (B, H, T) fp32 (log-sum-exp of each row's scaled scores).
// Returns 0; 1 where T is not a multiple of 32 or H of KV; 2 where memory ran out (3 from the
// stubs of a compiler without AVX512-BF16).
QWL_AVX512BF16 int qwenlite_attention_fwd(const uint16_t *q, const uint16_t *k,
                                          const uint16_t *v, uint16_t *out, float *lse,
                                          int64_t B, int64_t H, int64_t KV, int64_t T,
                                          float scale, int threads) {
    if (T % TB != 0 || KV <= 0 || H % KV != 0) return 1;
    const int64_t G = H / KV, M = G * TB, nb = T / TB;
    int failed = 0;
    uint16_t *packs = static_cast<uint16_t *>(aligned_alloc(64, 2 * B * KV * T * HD * 2));
    if (!packs) return 2;
    uint16_t *kd = packs, *vk = packs + B * KV * T * HD;  // k by columns, v by rows
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bg = 0; bg < B * KV; bg++) {
        pack_columns(k + bg * T * HD, T, kd + bg * T * HD);
        pack_rows(v + bg * T * HD, T, vk + bg * T * HD);
    }
#pragma omp parallel num_threads(threads)
    {
        Half qbuf, pbuf;
        Rows sbuf, obuf;
#pragma omp for schedule(dynamic)
        for (int64_t item = 0; item < B * KV * nb; item++) {
            // the later blocks (more keys) first, for the dynamic schedule
            const int64_t bg = item / nb, blk = nb - 1 - item % nb;
            const int64_t b = bg / KV, g = bg % KV, t0 = blk * TB, Lk = t0 + TB;
            const int64_t head0 = b * H + g * G;
            uint16_t *Q = qbuf.get(M * HD), *P = pbuf.get(M * Lk);
            float *S = sbuf.get(M * Lk), *O = obuf.get(M * HD);
            if (!Q || !P || !S || !O) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            gather(q, head0, G, T, t0, Q);
            gemm<false>(M, Lk, HD / 2, Q, HD, kd + bg * T * HD, 2 * T, S, Lk);
            mask_future(S, M, Lk, t0);
            const __m512 sc = _mm512_set1_ps(scale);
            for (int64_t r = 0; r < M; r++) {
                float *s = S + r * Lk;
                __m512 m16 = _mm512_set1_ps(-INFINITY);
                __mmask16 nan = 0;
                for (int64_t c = 0; c < Lk; c += 16) {
                    const __m512 z = _mm512_mul_ps(_mm512_loadu_ps(s + c), sc);
                    nan |= _mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q);
                    m16 = _mm512_max_ps(m16, z);
                }
                if (nan) {  // a NaN score (a NaN in q or k): the row's output is NaN, as torch's
                    for (int64_t c = 0; c < Lk; c++) P[r * Lk + c] = 0x7fc0;
                    lse[(head0 + r / TB) * T + t0 + r % TB] = NAN;
                    continue;
                }
                const float m = _mm512_reduce_max_ps(m16);
                const __m512 mv = _mm512_set1_ps(m);
                __m512 sum16 = _mm512_setzero_ps();
                for (int64_t c = 0; c < Lk; c += 16) {
                    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + c), sc, mv));
                    _mm512_storeu_ps(s + c, e);
                    sum16 = _mm512_add_ps(sum16, e);
                }
                const float sum = _mm512_reduce_add_ps(sum16);
                const __m512 inv = _mm512_set1_ps(1.0f / sum);
                for (int64_t c = 0; c < Lk; c += 16)
                    store16_bf16(P + r * Lk + c, _mm512_mul_ps(_mm512_loadu_ps(s + c), inv));
                lse[(head0 + r / TB) * T + t0 + r % TB] = m + logf(sum);
            }
            gemm<false>(M, HD, Lk / 2, P, Lk, vk + bg * T * HD, 2 * HD, O, HD);
            for (int64_t r = 0; r < M; r++) {
                uint16_t *o = out + ((head0 + r / TB) * T + t0 + r % TB) * HD;
                for (int64_t d = 0; d < HD; d += 16) store16_bf16(o + d, _mm512_loadu_ps(O + r * HD + d));
            }
        }
    }
    free(packs);
    return failed ? 2 : 0;
}

// dq (B, H, T, 64), dk and dv (B, KV, T, 64), bf16, from the forward's q, k, v, out and lse
// and the output's gradient dout. Returns as qwenlite_attention_fwd.
QWL_AVX512BF16 int qwenlite_attention_bwd(const uint16_t *q, const uint16_t *k,
                                          const uint16_t *v, const uint16_t *out,
                                          const float *lse, const uint16_t *dout, uint16_t *dq,
                                          uint16_t *dk, uint16_t *dv, int64_t B, int64_t H,
                                          int64_t KV, int64_t T, float scale, int threads) {
    if (T % TB != 0 || KV <= 0 || H % KV != 0) return 1;
    const int64_t G = H / KV, M = G * TB, nb = T / TB;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        Half kdb, vdb, kkb, qtb, dotb, qb, dob, qt, dot, p2b, ds2b, dsb;
        Rows sbuf, dpbuf, acc, dqbuf, dbuf;
#pragma omp for schedule(dynamic)
        for (int64_t bg = 0; bg < B * KV; bg++) {
            const int64_t b = bg / KV, g = bg % KV, head0 = b * H + g * G;
            uint16_t *kd = kdb.get(T * HD), *vd = vdb.get(T * HD), *kk = kkb.get(T * HD);
            uint16_t *qT = qtb.get(G * HD * T), *doT = dotb.get(G * HD * T);
            uint16_t *Q = qb.get(M * HD), *dO = dob.get(M * HD);
            uint16_t *QT = qt.get(HD * M), *dOT = dot.get(HD * M);
            uint16_t *P2 = p2b.get(M * T), *dS2 = ds2b.get(M * T), *dS = dsb.get(M * T);
            float *S = sbuf.get(M * T), *dP = dpbuf.get(M * T), *dQ = dqbuf.get(M * HD);
            float *dKT = acc.get(2 * HD * T), *dVT = dKT + HD * T, *D = dbuf.get(M);
            if (!kd || !vd || !kk || !qT || !doT || !Q || !dO || !QT || !dOT || !P2 || !dS2 ||
                !dS || !S || !dP || !dQ || !dKT || !D) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            pack_columns(k + bg * T * HD, T, kd);
            pack_columns(v + bg * T * HD, T, vd);
            pack_rows(k + bg * T * HD, T, kk);
            for (int64_t j = 0; j < G; j++)  // each query head's q and dout, transposed
                for (int64_t t = 0; t < T; t++)
                    for (int64_t d = 0; d < HD; d++) {
                        const int64_t src = ((head0 + j) * T + t) * HD + d;
                        qT[(j * HD + d) * T + t] = q[src];
                        doT[(j * HD + d) * T + t] = dout[src];
                    }
            memset(dKT, 0, 2 * HD * T * sizeof(float));
            const __m512 sc = _mm512_set1_ps(scale);
            for (int64_t blk = 0; blk < nb; blk++) {
                const int64_t t0 = blk * TB, Lk = t0 + TB;
                gather(q, head0, G, T, t0, Q);
                gather(dout, head0, G, T, t0, dO);
                for (int64_t d = 0; d < HD; d++)
                    for (int64_t j = 0; j < G; j++) {
                        memcpy(QT + d * M + j * TB, qT + (j * HD + d) * T + t0, TB * 2);
                        memcpy(dOT + d * M + j * TB, doT + (j * HD + d) * T + t0, TB * 2);
                    }
                for (int64_t r = 0; r < M; r++) {  // D = rowsum(dO ∘ O)
                    const uint16_t *o = out + ((head0 + r / TB) * T + t0 + r % TB) * HD;
                    __m512 s16 = _mm512_setzero_ps();
                    for (int64_t d = 0; d < HD; d += 16) {
                        s16 = _mm512_fmadd_ps(load16_bf16(o + d), load16_bf16(dO + r * HD + d), s16);
                    }
                    D[r] = _mm512_reduce_add_ps(s16);
                }
                gemm<false>(M, Lk, HD / 2, Q, HD, kd, 2 * T, S, Lk);
                gemm<false>(M, Lk, HD / 2, dO, HD, vd, 2 * T, dP, Lk);
                mask_future(S, M, Lk, t0);
                for (int64_t r = 0; r < M; r += 2) {  // P and dS, two rows at a time
                    const __m512 l0 = _mm512_set1_ps(lse[(head0 + r / TB) * T + t0 + r % TB]);
                    const __m512 l1 = _mm512_set1_ps(lse[(head0 + (r + 1) / TB) * T + t0 + (r + 1) % TB]);
                    const __m512 d0 = _mm512_set1_ps(D[r]), d1 = _mm512_set1_ps(D[r + 1]);
                    for (int64_t c = 0; c < Lk; c += 16) {
                        const __m512 p0 = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(S + r * Lk + c), sc, l0));
                        const __m512 p1 = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(S + (r + 1) * Lk + c), sc, l1));
                        const __m512 g0 = _mm512_mul_ps(_mm512_mul_ps(p0, _mm512_sub_ps(_mm512_loadu_ps(dP + r * Lk + c), d0)), sc);
                        const __m512 g1 = _mm512_mul_ps(_mm512_mul_ps(p1, _mm512_sub_ps(_mm512_loadu_ps(dP + (r + 1) * Lk + c), d1)), sc);
                        store16x2_bf16(P2 + (r / 2) * 2 * Lk + 2 * c, p0, p1);
                        store16x2_bf16(dS2 + (r / 2) * 2 * Lk + 2 * c, g0, g1);
                        store16_bf16(dS + r * Lk + c, g0);
                        store16_bf16(dS + (r + 1) * Lk + c, g1);
                    }
                }
                // dVᵀ += dOᵀ · P, dKᵀ += Qᵀ · dS (over the block's rows), dQ = dS · K
                gemm<true>(HD, Lk, M / 2, dOT, M, P2, 2 * Lk, dVT, T);
                gemm<true>(HD, Lk, M / 2, QT, M, dS2, 2 * Lk, dKT, T);
                gemm<false>(M, HD, Lk / 2, dS, Lk, kk, 2 * HD, dQ, HD);
                for (int64_t r = 0; r < M; r++) {
                    uint16_t *o = dq + ((head0 + r / TB) * T + t0 + r % TB) * HD;
                    for (int64_t d = 0; d < HD; d += 16) store16_bf16(o + d, _mm512_loadu_ps(dQ + r * HD + d));
                }
            }
            for (int64_t t = 0; t < T; t++)
                for (int64_t d = 0; d < HD; d++) {
                    dk[(bg * T + t) * HD + d] = to_bf16(dKT[d * T + t]);
                    dv[(bg * T + t) * HD + d] = to_bf16(dVT[d * T + t]);
                }
        }
    }
    return failed ? 2 : 0;
}

}  // extern "C"

#else  // no AVX512-BF16 in this compiler: the entry points exist and decline

extern "C" {
int qwenlite_attention_fwd(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *,
                           float *, int64_t, int64_t, int64_t, int64_t, float, int) {
    return 3;
}
int qwenlite_attention_bwd(const uint16_t *, const uint16_t *, const uint16_t *,
                           const uint16_t *, const float *, const uint16_t *, uint16_t *,
                           uint16_t *, uint16_t *, int64_t, int64_t, int64_t, int64_t, float,
                           int) {
    return 3;
}
}  // extern "C"

#endif
