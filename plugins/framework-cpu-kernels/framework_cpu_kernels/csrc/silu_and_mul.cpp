// SwiGLU on a fused [gate | up] projection, rounding where PyTorch's `F.silu(gate) * up` rounds in
// the storage type: out = round(round(gate / (1 + e^-gate)) * up).

#include "common.h"

namespace {

using namespace framework;

template <typename T>
void silu_and_mul(const T* gate_up, T* out, int rows, int width) {
#pragma omp parallel for if (int64_t(rows) * width >= PARALLEL_ELEMENTS)
    for (int r = 0; r < rows; ++r) {
        const T* gate = gate_up + int64_t(r) * 2 * width;
        const T* up = gate + width;
        T* o = out + int64_t(r) * width;
#if defined(__AVX512BF16__)  // (vectors of 16; bfloat16 rounds by `vcvtneps2bf16`)
        for (int i = 0; i < width; i += LANES) {
            const __mmask16 m = first(width - i);
            const __m512 g = widen(gate + i, m);
            // e^-g, with -g at most 88 (below -88, g / (1 + e^-g) is 0 or a denormal either way)
            __m512 e = _mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.f));
            exp_rows<1>(&e);
            const __m512 silu = round16(o, _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
            store16(o + i, _mm512_mul_ps(silu, widen(up + i, m)), m);
        }
#else
#pragma omp simd
        for (int i = 0; i < width; ++i) {
            const float g = to_float(gate[i]);
            store(o + i, round_to<T>(g / (1.f + exp_approx(-g))) * to_float(up[i]));
        }
#endif
    }
}

}  // namespace

extern "C" {

void silu_and_mul_f32(const float* gate_up, float* out, int rows, int width) { silu_and_mul(gate_up, out, rows, width); }

void silu_and_mul_bf16(const bf16* gate_up, bf16* out, int rows, int width) { silu_and_mul(gate_up, out, rows, width); }

}  // extern "C"
