// What the two halves of the decode kernel share (skinny_linears.cpp, skinny_attention.cpp):
// 8-lane loads of fp32 or bf16, exact bf16 -> fp32 widening, round-to-nearest-even narrowing,
// a horizontal sum, and a 64-byte-aligned scratch buffer. Built by qwenlite/accel/skinny.py.

#pragma once

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

// Scratch floats, one buffer per thread that owns it: 64-byte aligned, for loads that never
// straddle a cache line (a 16-byte-aligned buffer made the 8-row kernel half as fast).
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

}  // namespace
