// y = x W^T (+ bias) for the few rows of a decode step (the caller sends up to LINEAR_MAX_ROWS =
// 128), where oneDNN leaves a part of the machine unused. The weight is repacked once into panels of 48 output columns, each panel
// `[in / step][48][step]` with `step` inputs per 32-bit word (1 float32, 2 bfloat16): a panel is
// read front to back, each word-row loaded as three vectors, and every row of x meets it while it
// sits in cache. A tile of 8 rows x 48 columns keeps its 24 sums in registers; one row's word is
// broadcast and multiplied into three vectors (bfloat16 pairs by `vdpbf16ps`, float32 by FMA).
// float32 accumulation, one rounding of each output. The last panel is 16 or 32 columns wide.

#include "common.h"

namespace {

using namespace framework;

constexpr int PANEL = 48, TILE_ROWS = 8;

inline int panel_width(int out, int n0) { return std::min(PANEL, (out - n0 + LANES - 1) / LANES * LANES); }

template <typename T>
void pack(const T* weight, T* packed, int in, int out) {
    int64_t o = 0;
    for (int n0 = 0; n0 < out; n0 += PANEL) {
        const int width = panel_width(out, n0);
        for (int k = 0; k < in; k += STEP<T>)
            for (int c = 0; c < width; ++c)
                for (int e = 0; e < STEP<T>; ++e, ++o)
                    packed[o] = n0 + c < out ? weight[int64_t(n0 + c) * in + k + e] : T(0);
    }
}

#if defined(__AVX512F__)

// R rows x Z vectors of one panel
template <typename T, int R, int Z>
void tile(const T* x, int in, const T* panel, int width, const T* bias, T* y, int out, int cols) {
    __m512 acc[R][Z];
    for (int r = 0; r < R; ++r)
        for (int z = 0; z < Z; ++z) acc[r][z] = _mm512_setzero_ps();
    const int words = in / STEP<T>;
    for (int k = 0; k < words; ++k) {
        const T* w = panel + int64_t(k) * width * STEP<T>;
        for (int r = 0; r < R; ++r) {
            int32_t word;
            std::memcpy(&word, x + int64_t(r) * in + k * STEP<T>, sizeof word);
            const __m512i xw = _mm512_set1_epi32(word);
            for (int z = 0; z < Z; ++z) acc[r][z] = multiply_add<T>(acc[r][z], xw, _mm512_loadu_si512(w + z * LANES * STEP<T>));
        }
    }
    for (int z = 0; z < Z; ++z) {
        const int left = cols - z * LANES;
        if (left <= 0) break;
        const __mmask16 m = first(left);
        const __m512 b = bias != nullptr ? widen(bias + z * LANES, m) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) store16(y + int64_t(r) * out + z * LANES, _mm512_add_ps(acc[r][z], b), m);
    }
}

template <typename T, int Z>
void panel_rows(const T* x, int rows, int in, const T* panel, int width, const T* bias, T* y, int out, int cols) {
    int m = 0;
    for (; m + TILE_ROWS <= rows; m += TILE_ROWS)
        tile<T, TILE_ROWS, Z>(x + int64_t(m) * in, in, panel, width, bias, y + int64_t(m) * out, out, cols);
    x += int64_t(m) * in, y += int64_t(m) * out;
    switch (rows - m) {
        case 1: return tile<T, 1, Z>(x, in, panel, width, bias, y, out, cols);
        case 2: return tile<T, 2, Z>(x, in, panel, width, bias, y, out, cols);
        case 3: return tile<T, 3, Z>(x, in, panel, width, bias, y, out, cols);
        case 4: return tile<T, 4, Z>(x, in, panel, width, bias, y, out, cols);
        case 5: return tile<T, 5, Z>(x, in, panel, width, bias, y, out, cols);
        case 6: return tile<T, 6, Z>(x, in, panel, width, bias, y, out, cols);
        case 7: return tile<T, 7, Z>(x, in, panel, width, bias, y, out, cols);
    }
}

template <typename T>
int linear(const T* x, const T* packed, const T* bias, T* y, int rows, int in, int out) {
    const int panels = (out + PANEL - 1) / PANEL;
    const int64_t panel_size = int64_t(PANEL) * in;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < panels; ++i) {
        const int n0 = i * PANEL, width = panel_width(out, n0), cols = std::min(PANEL, out - n0);
        const T* panel = packed + i * panel_size;
        const T* b = bias != nullptr ? bias + n0 : nullptr;
        if (width == 3 * LANES) panel_rows<T, 3>(x, rows, in, panel, width, b, y + n0, out, cols);
        else if (width == 2 * LANES) panel_rows<T, 2>(x, rows, in, panel, width, b, y + n0, out, cols);
        else panel_rows<T, 1>(x, rows, in, panel, width, b, y + n0, out, cols);
    }
    return 0;
}

#endif

}  // namespace

extern "C" {

// Whether this build runs the dtype's matmul kernels, here and in attention.cpp (AVX-512; bfloat16
// also needs AVX512-BF16): where it does not, the callers keep their PyTorch paths.
#if defined(__AVX512F__)
int covered_f32() { return 1; }
int packed_linear_f32(const float* x, const float* packed, const float* bias, float* y, int rows, int in, int out) {
    return linear(x, packed, bias, y, rows, in, out);
}
#else
int covered_f32() { return 0; }
int packed_linear_f32(const float*, const float*, const float*, float*, int, int, int) { return -1; }
#endif

#if defined(__AVX512BF16__)
int covered_bf16() { return 1; }
int packed_linear_bf16(const bf16* x, const bf16* packed, const bf16* bias, bf16* y, int rows, int in, int out) {
    return linear(x, packed, bias, y, rows, in, out);
}
#else
int covered_bf16() { return 0; }
int packed_linear_bf16(const bf16*, const bf16*, const bf16*, bf16*, int, int, int) { return -1; }
#endif

// weight [out, in] -> packed (sized by the caller: `in` x `out` rounded up to whole 16-column
// vectors); `in` a multiple of the inputs per word
void pack_linear_weight_f32(const float* weight, float* packed, int in, int out) { pack(weight, packed, in, out); }
void pack_linear_weight_bf16(const bf16* weight, bf16* packed, int in, int out) { pack(weight, packed, in, out); }

}  // extern "C"
