// Shared by the CPU kernels: bfloat16 <-> float32, 16-float vectors, a vectorizable exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace framework {

using bf16 = uint16_t;  // bfloat16 bits: the top half of a float32
constexpr int LANES = 16;

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
    uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline void store(float* p, float x) { *p = x; }

inline void store(bf16* p, float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;  // stays a (quiet) NaN
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest, ties to even
    *p = bf16(nan ? 0x7fc0u : rounded);
}

// x rounded to the storage type T, as a float (what PyTorch does after every op in that type)
template <typename T>
inline float round_to(float x);

template <>
inline float round_to<float>(float x) {
    return x;
}

template <>
inline float round_to<bf16>(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    bits = nan ? bits : (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    float r;
    std::memcpy(&r, &bits, sizeof r);
    return r;
}

// 2^k for a whole number k in [-126, 127], written straight into the exponent bits
inline float pow2(float k) {
    const uint32_t bits = uint32_t(int32_t(k) + 127) << 23;
    float r;
    std::memcpy(&r, &bits, sizeof r);
    return r;
}

// e^x = 2^k e^r with x = k ln2 + r, |r| <= ln2 / 2: log2(e), ln2 split in two (so that r stays
// exact), and e^r's degree-7 Taylor coefficients from the highest power down (exp_approx here, the
// vector exp_rows below)
constexpr float LOG2E = 1.44269504f, LN2_HIGH = 0.693145752f, LN2_LOW = 1.42860677e-6f;
constexpr float EXP_TAYLOR[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};

// e^x within a few ulp (clamped to [-87, 88]), times 2^k. Plain arithmetic, so loops over it
// vectorize.
__attribute__((always_inline)) inline float exp_approx(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and removing it rounds to an integer
    const float k = (x * LOG2E + shifter) - shifter;
    const float r = (x - k * LN2_HIGH) - k * LN2_LOW;
    float p = EXP_TAYLOR[0];
    for (int i = 1; i < 8; ++i) p = p * r + EXP_TAYLOR[i];
    return p * pow2(k);
}

// The row-wise kernels (norm, RoPE, SwiGLU) split their rows among the threads from this many
// elements on: a batch-32 decode step's SwiGLU (49k outputs) takes 45 us on one core
constexpr int64_t PARALLEL_ELEMENTS = 8192;

template <typename T>
constexpr int STEP = 4 / sizeof(T);  // values per 32-bit word: 1 float32, 2 bfloat16

#if defined(__AVX512F__)
inline __mmask16 first(int n) { return n >= LANES ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }  // lanes < n

// The lanes of m: loaded from T as float32, rounded to T (as a float32 value), stored as T
inline __m512 widen(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 widen(const bf16* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 round16(float*, __m512 v) { return v; }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
#if defined(__AVX512BF16__)  // to nearest, ties to even
inline __m512 round16(bf16*, __m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
inline void store16(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v)); }
#endif

// acc + x * w for 16 lanes of 32-bit words: float32 products, or for bfloat16 the sum of each
// word's two products (`vdpbf16ps`, only where the CPU has AVX512-BF16)
template <typename T>
inline __m512 multiply_add(__m512 acc, __m512i x, __m512i w);

template <>
inline __m512 multiply_add<float>(__m512 acc, __m512i x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
}

// e^x in place for R vectors of finite x <= 88, the R computations interleaved step by step (the
// compiler schedules float32 attention worse from a loop over single vectors): the polynomial in
// fused multiply-adds, times 2^k by `vscalefps` (0 for k far below the float range, so no clamp)
template <int R>
__attribute__((always_inline)) inline void exp_rows(__m512* x) {
    __m512 k[R], r[R], p[R];
    for (int i = 0; i < R; ++i) k[i] = _mm512_roundscale_ps(_mm512_mul_ps(x[i], _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT);
    for (int i = 0; i < R; ++i) r[i] = _mm512_fnmadd_ps(k[i], _mm512_set1_ps(LN2_HIGH), x[i]);
    for (int i = 0; i < R; ++i) r[i] = _mm512_fnmadd_ps(k[i], _mm512_set1_ps(LN2_LOW), r[i]);
    for (int i = 0; i < R; ++i) p[i] = _mm512_set1_ps(EXP_TAYLOR[0]);
    for (int c = 1; c < 8; ++c)
        for (int i = 0; i < R; ++i) p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(EXP_TAYLOR[c]));
    for (int i = 0; i < R; ++i) x[i] = _mm512_scalef_ps(p[i], k[i]);
}

#if defined(__AVX512BF16__)
template <>
inline __m512 multiply_add<bf16>(__m512 acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
}
#endif
#endif

}  // namespace framework
