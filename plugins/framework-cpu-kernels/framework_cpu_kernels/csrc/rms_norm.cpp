// RMSNorm, optionally after a residual add, rounding where PyTorch's op sequence rounds in the
// storage type: residual <- round(x + residual); out <- round(weight * round(r * rsqrt(mean(r^2) + eps)))
// where r is the (new) residual, or x without one. Rows are independent; long inputs run in parallel.

#include "common.h"

namespace {

using namespace framework;

// 1 / rms(row) from LANES partial sums of squares, added up in a fixed order
inline float inverse_rms(float* lanes, int hidden, float eps) {
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
    return 1.f / std::sqrt(lanes[0] / hidden + eps);
}

template <typename T>
void add_rms_norm(const T* x, T* residual, const T* weight, T* out, int rows, int hidden, float eps) {
#pragma omp parallel for if (int64_t(rows) * hidden >= PARALLEL_ELEMENTS)
    for (int r = 0; r < rows; ++r) {
        const T* in = x + int64_t(r) * hidden;
        T* res = residual == nullptr ? nullptr : residual + int64_t(r) * hidden;
        T* o = out + int64_t(r) * hidden;
#if defined(__AVX512BF16__)  // (vectors of 16; bfloat16 rounds by `vcvtneps2bf16`)
        __m512 squares = _mm512_setzero_ps();  // LANES partial sums of squares, as below
        for (int i = 0; i < hidden; i += LANES) {
            const __mmask16 m = first(hidden - i);
            __m512 v = widen(in + i, m);
            if (res != nullptr) {
                v = round16(res, _mm512_add_ps(v, widen(res + i, m)));
                store16(res + i, v, m);
            }
            squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
        }
        float lanes[LANES];
        _mm512_storeu_ps(lanes, squares);
        const __m512 scale = _mm512_set1_ps(inverse_rms(lanes, hidden, eps));
        const T* src = res != nullptr ? res : in;
        for (int i = 0; i < hidden; i += LANES) {
            const __mmask16 m = first(hidden - i);
            store16(o + i, _mm512_mul_ps(widen(weight + i, m), round16(o, _mm512_mul_ps(widen(src + i, m), scale))), m);
        }
#else
        auto value = [&](int i) {  // the norm's input element, after the residual add
            float v = to_float(in[i]);
            if (res != nullptr) {
                v = round_to<T>(v + to_float(res[i]));
                store(res + i, v);
            }
            return v;
        };
        float lanes[LANES] = {};  // LANES partial sums of squares: vectorizes, fixed order
        int i = 0;
        for (; i + LANES <= hidden; i += LANES)
            for (int l = 0; l < LANES; ++l) {
                const float v = value(i + l);
                lanes[l] += v * v;
            }
        for (; i < hidden; ++i) {
            const float v = value(i);
            lanes[0] += v * v;
        }
        const float scale = inverse_rms(lanes, hidden, eps);
        const T* src = res != nullptr ? res : in;
        for (int i = 0; i < hidden; ++i) store(o + i, to_float(weight[i]) * round_to<T>(to_float(src[i]) * scale));
#endif
    }
}

}  // namespace

extern "C" {

void add_rms_norm_f32(const float* x, float* residual, const float* weight, float* out, int rows, int hidden,
                      float eps) {
    add_rms_norm(x, residual, weight, out, rows, hidden, eps);
}

void add_rms_norm_bf16(const bf16* x, bf16* residual, const bf16* weight, bf16* out, int rows, int hidden,
                       float eps) {
    add_rms_norm(x, residual, weight, out, rows, hidden, eps);
}

}  // extern "C"
