// Each row's index of its largest value, as `torch.argmax(dim=-1)` picks it: the first of equal
// maxima, the first NaN in a row that has one. PyTorch's CPU argmax over a batch of vocabulary-wide
// rows runs scalar code (1.2 ms for 32 x 49152 floats here); greedy sampling takes it every step.

#include "common.h"

namespace {

using namespace framework;

template <typename T>
int64_t argmax_row(const T* x, int width) {
#if defined(__AVX512F__)
    // per lane: the largest value so far and where it first came (a later value must pass it)
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i where = _mm512_setzero_si512(), index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nan = 0;
    for (int i = 0; i < width; i += LANES, index = _mm512_add_epi32(index, _mm512_set1_epi32(LANES))) {
        const __mmask16 m = first(width - i);
        const __m512 v = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m, widen(x + i, m));
        const __mmask16 higher = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, higher, v);
        where = _mm512_mask_mov_epi32(where, higher, index);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (nan == 0) {  // of the lanes holding the maximum, the first index
        const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
        return _mm512_mask_reduce_min_epi32(top, where);
    }
#endif
    int64_t arg = 0;
    for (int i = 0; i < width; ++i) {
        const float v = to_float(x[i]);
        if (v != v) return i;
        if (v > to_float(x[arg])) arg = i;
    }
    return arg;
}

template <typename T>
void argmax(const T* x, int64_t* out, int rows, int width) {
#pragma omp parallel for if (int64_t(rows) * width >= 16 * PARALLEL_ELEMENTS)
    for (int r = 0; r < rows; ++r) out[r] = argmax_row(x + int64_t(r) * width, width);
}

}  // namespace

extern "C" {

void argmax_f32(const float* x, int64_t* out, int rows, int width) { argmax(x, out, rows, width); }

void argmax_bf16(const bf16* x, int64_t* out, int rows, int width) { argmax(x, out, rows, width); }

}  // extern "C"
