// y = x W^T (+ bias) for the few rows of a decode step (the caller sends up to LINEAR_MAX_ROWS =
// 128), where oneDNN leaves a part of the machine unused. The weight is repacked once into panels of 48 output columns, each panel
// `[in / step][48][step]` with `step` inputs per 32-bit word (1 float32, 2 bfloat16): a panel is
// read front to back, each word-row loaded as three vectors, and every row of x meets it while it
// sits in cache. A tile of 8 rows x 48 columns keeps its 24 sums in registers; one row's word is
// broadcast and multiplied into three vectors (bfloat16 pairs by `vdpbf16ps`, float32 by FMA).
// float32 accumulation, one rounding of each output. The last panel is 16 or 32 columns wide.
// Left alone, a panel's first row tile would read it from memory in a burst faster than memory
// feeds it, the other tiles from cache; instead the tiles after the first fetch the next panel into
// L2 a few lines per word, so the weights stream at an even rate (a batch-32 decode step's layers
// 22.5 -> 20.8 ms).

#include "common.h"

namespace {

using namespace framework;

constexpr int PANEL = 48, TILE_ROWS = 8;
constexpr int LINES_PER_WORD = PANEL * 4 / 64;  // a full panel's cache lines per 32-bit word of input

// cache lines [from, end) to fetch, per_word of them for each word a tile steps through
struct Fetch {
    const char *from = nullptr, *end = nullptr;
    int per_word = 0;
};

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
void tile(const T* x, int in, const T* panel, int width, const T* bias, T* y, int out, int cols, Fetch fetch) {
    __m512 acc[R][Z];
    for (int r = 0; r < R; ++r)
        for (int z = 0; z < Z; ++z) acc[r][z] = _mm512_setzero_ps();
    const int words = in / STEP<T>;
    for (int k = 0; k < words; ++k) {
        const T* w = panel + int64_t(k) * width * STEP<T>;
        for (int j = 0; j < fetch.per_word; ++j) {
            const char* line = fetch.from + (int64_t(k) * fetch.per_word + j) * 64;
            if (line < fetch.end) _mm_prefetch(line, _MM_HINT_T2);
        }
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
void panel_rows(const T* x, int rows, int in, const T* panel, int width, const T* bias, T* y, int out, int cols,
                const char* next, const char* next_end) {
    const int tiles = rows / TILE_ROWS, words = in / STEP<T>;
    const int per_word = tiles > 1 ? (LINES_PER_WORD + tiles - 2) / (tiles - 1) : 0;
    int m = 0;
    for (int t = 0; t < tiles; ++t, m += TILE_ROWS) {
        Fetch share;  // the first tile reads this panel from memory; the others fetch the next one
        if (t > 0 && next != nullptr) share = {next + int64_t(t - 1) * words * per_word * 64, next_end, per_word};
        tile<T, TILE_ROWS, Z>(x + int64_t(m) * in, in, panel, width, bias, y + int64_t(m) * out, out, cols, share);
    }
    x += int64_t(m) * in, y += int64_t(m) * out;
    switch (rows - m) {
        case 1: return tile<T, 1, Z>(x, in, panel, width, bias, y, out, cols, {});
        case 2: return tile<T, 2, Z>(x, in, panel, width, bias, y, out, cols, {});
        case 3: return tile<T, 3, Z>(x, in, panel, width, bias, y, out, cols, {});
        case 4: return tile<T, 4, Z>(x, in, panel, width, bias, y, out, cols, {});
        case 5: return tile<T, 5, Z>(x, in, panel, width, bias, y, out, cols, {});
        case 6: return tile<T, 6, Z>(x, in, panel, width, bias, y, out, cols, {});
        case 7: return tile<T, 7, Z>(x, in, panel, width, bias, y, out, cols, {});
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
        // (at the end of a thread's share of panels, the next is the other thread's: one wasted fetch)
        const char* next = i + 1 < panels ? (const char*)(panel + panel_size) : nullptr;
        const char* next_end = next ? next + int64_t(panel_width(out, n0 + PANEL)) * in * sizeof(T) : nullptr;
        if (width == 3 * LANES) panel_rows<T, 3>(x, rows, in, panel, width, b, y + n0, out, cols, next, next_end);
        else if (width == 2 * LANES) panel_rows<T, 2>(x, rows, in, panel, width, b, y + n0, out, cols, next, next_end);
        else panel_rows<T, 1>(x, rows, in, panel, width, b, y + n0, out, cols, next, next_end);
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
