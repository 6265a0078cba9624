// y = x W^T (+ bias) for the few rows of a decode step (the caller sends up to 128 rows, 512 to the
// tiles below), where oneDNN leaves a part of the machine unused. The weight is repacked once into panels of 48 output columns, each panel
// `[in / step][48][step]` with `step` inputs per 32-bit word (1 float32, 2 bfloat16): a panel is
// read front to back, each word-row loaded as three vectors, and every row of x meets it while it
// sits in cache. A tile of 8 rows x 48 columns keeps its 24 sums in registers; one row's word is
// broadcast and multiplied into three vectors (bfloat16 pairs by `vdpbf16ps`, float32 by FMA).
// float32 accumulation, one rounding of each output. The last panel is 16 or 32 columns wide.
// Left alone, a panel's first row tile would read it from memory in a burst faster than memory
// feeds it, the other tiles from cache; instead the tiles after the first fetch the next panel into
// L2 a few lines per word, so the weights stream at an even rate (a batch-32 decode step's layers
// 22.5 -> 20.8 ms).
// Where the CPU has AMX (and the inputs come in whole 32s), bfloat16 goes through the tile unit
// instead, from the same panels: a tile multiply-add takes 16 rows for the price of one, so 1 to 16
// rows cost about the same (a 5-token verify step's layers as much as a 1-token decode step's) and
// a batch-32 decode step's linear layers ~7x less than by vectors.

#include "common.h"

#include <sys/syscall.h>
#include <unistd.h>

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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

// Linux hands out the tile registers' state on request, once per process
bool amx_permitted() {
    constexpr long REQUEST_PERMISSION = 0x1023, TILE_DATA = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    static const bool permitted = syscall(SYS_arch_prctl, REQUEST_PERMISSION, TILE_DATA) == 0;
    return permitted;
}

constexpr int AMX_ROWS = 16, AMX_INPUTS = 32;  // a tile: up to 16 rows of 64 bytes

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
};

// tiles 0-2: the sums of `rows` rows x 16 columns; 3: `rows` rows of x, 32 inputs each; 4-6: 16
// word-rows x 16 columns of a panel (the panels' layout is already the pairs `tdpbf16ps` takes)
void configure_tiles(int rows) {
    TileConfig config;
    for (int t = 0; t < 7; ++t) config.bytes_per_row[t] = 64, config.rows[t] = t >= 4 ? AMX_ROWS : rows;
    _tile_loadconfig(&config);
}

// `rows` (<= 16, as configured) rows x Z vectors of one panel
template <int Z>
void amx_tile(const bf16* x, int in, const bf16* panel, int width, const bf16* bias, bf16* y, int out, int cols, int rows) {
    alignas(64) float sums[AMX_ROWS][PANEL];
    _tile_zero(0);
    if constexpr (Z > 1) _tile_zero(1);
    if constexpr (Z > 2) _tile_zero(2);
    const int panel_row_bytes = width * 4;
    for (int k = 0; k < in; k += AMX_INPUTS) {
        const bf16* w = panel + int64_t(k) * width;  // word-row k / 2
        _tile_loadd(3, x + k, in * 2);
        _tile_loadd(4, w, panel_row_bytes);
        _tile_dpbf16ps(0, 3, 4);
        if constexpr (Z > 1) {
            _tile_loadd(5, w + 2 * LANES, panel_row_bytes);
            _tile_dpbf16ps(1, 3, 5);
        }
        if constexpr (Z > 2) {
            _tile_loadd(6, w + 4 * LANES, panel_row_bytes);
            _tile_dpbf16ps(2, 3, 6);
        }
    }
    _tile_stored(0, &sums[0][0], sizeof sums[0]);
    if constexpr (Z > 1) _tile_stored(1, &sums[0][LANES], sizeof sums[0]);
    if constexpr (Z > 2) _tile_stored(2, &sums[0][2 * LANES], sizeof sums[0]);
    for (int z = 0; z < Z; ++z) {
        const int left = cols - z * LANES;
        if (left <= 0) break;
        const __mmask16 m = first(left);
        const __m512 b = bias != nullptr ? widen(bias + z * LANES, m) : _mm512_setzero_ps();
        for (int r = 0; r < rows; ++r)
            store16(y + int64_t(r) * out + z * LANES, _mm512_add_ps(_mm512_load_ps(&sums[r][z * LANES]), b), m);
    }
}

// bfloat16 by the tile unit: every row alike whatever the batch (so a verify step's rows equal the
// decode steps'). Rows past the last whole 16 go through a zero-padded copy, so that one tile
// configuration serves every block.
int amx_linear(const bf16* x, const bf16* packed, const bf16* bias, bf16* y, int rows, int in, int out) {
    const int panels = (out + PANEL - 1) / PANEL;
    const int64_t panel_size = int64_t(PANEL) * in;
    const int tile_rows = std::min(rows, AMX_ROWS), whole = rows / tile_rows * tile_rows, rest = rows - whole;
    bf16* padded = nullptr;
    if (rest > 0) {
        padded = new bf16[int64_t(AMX_ROWS) * in]();
        std::memcpy(padded, x + int64_t(whole) * in, int64_t(rest) * in * sizeof(bf16));
    }
#pragma omp parallel
    {
        configure_tiles(tile_rows);
        alignas(64) bf16 spill[AMX_ROWS * PANEL];
#pragma omp for schedule(static)
        for (int i = 0; i < panels; ++i) {
            const int n0 = i * PANEL, width = panel_width(out, n0), cols = std::min(PANEL, out - n0);
            const bf16* panel = packed + i * panel_size;
            const bf16* b = bias != nullptr ? bias + n0 : nullptr;
            auto block = [&](const bf16* xs, bf16* ys, int ys_stride, int n) {
                if (width == 3 * LANES) amx_tile<3>(xs, in, panel, width, b, ys, ys_stride, cols, n);
                else if (width == 2 * LANES) amx_tile<2>(xs, in, panel, width, b, ys, ys_stride, cols, n);
                else amx_tile<1>(xs, in, panel, width, b, ys, ys_stride, cols, n);
            };
            for (int m = 0; m < whole; m += tile_rows) block(x + int64_t(m) * in, y + int64_t(m) * out + n0, out, tile_rows);
            if (rest > 0) {
                block(padded, spill, PANEL, rest);
                for (int r = 0; r < rest; ++r)
                    std::memcpy(y + int64_t(whole + r) * out + n0, spill + r * PANEL, cols * sizeof(bf16));
            }
        }
        _tile_release();
    }
    delete[] padded;
    return 0;
}

#endif

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
    if (rows <= 0) return 0;
    return linear(x, packed, bias, y, rows, in, out);
}
#else
int covered_f32() { return 0; }
int packed_linear_f32(const float*, const float*, const float*, float*, int, int, int) { return -1; }
#endif

// Whether bfloat16 rows of `in` inputs go through AMX tiles here (the caller sends more rows then)
int linear_tiles_f32(int) { return 0; }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
int linear_tiles_bf16(int in) { return in % AMX_INPUTS == 0 && amx_permitted(); }
#else
int linear_tiles_bf16(int) { return 0; }
#endif

#if defined(__AVX512BF16__)
int covered_bf16() { return 1; }
int packed_linear_bf16(const bf16* x, const bf16* packed, const bf16* bias, bf16* y, int rows, int in, int out) {
    if (rows <= 0) return 0;  // (a step whose prompt chunks sample no row: the tiles would divide by 0)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (linear_tiles_bf16(in)) return amx_linear(x, packed, bias, y, rows, in, out);
#endif
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
