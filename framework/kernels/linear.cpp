// y = x W^T (+ bias) for a few rows of x (decode at small batch), where the time is reading W:
// each weight row is streamed once and dotted with every row of x. W [out, in] row-major,
// x [rows, in], y [rows, out]; float32 accumulation, one rounding of each output.

#include "common.h"

namespace {

using namespace framework;

constexpr int MAX_ROWS = 2, MAX_IN = 8192;  // the caller keeps within these

template <typename T>
void small_linear(const T* x, const T* weight, const T* bias, T* y, int rows, int in, int out) {
#pragma omp parallel
    {
        float xs[MAX_ROWS * MAX_IN];  // x in float32
        for (int r = 0; r < rows; ++r)
            for (int i = 0; i < in; ++i) xs[r * in + i] = to_float(x[int64_t(r) * in + i]);
#pragma omp for schedule(static)
        for (int n = 0; n < out; ++n) {
            const T* w = weight + int64_t(n) * in;
            for (int r = 0; r < rows; ++r) {
                const float* xr = xs + r * in;
                f32x16 acc = {};
                int i = 0;
                for (; i + LANES <= in; i += LANES) acc += load16(xr + i) * load16(w + i);
                float s = sum16(acc);
                for (; i < in; ++i) s += xr[i] * to_float(w[i]);
                if (bias != nullptr) s += to_float(bias[n]);
                store(y + int64_t(r) * out + n, s);
            }
        }
    }
}

}  // namespace

extern "C" {

void small_linear_f32(const float* x, const float* weight, const float* bias, float* y, int rows, int in, int out) {
    small_linear(x, weight, bias, y, rows, in, out);
}

void small_linear_bf16(const bf16* x, const bf16* weight, const bf16* bias, bf16* y, int rows, int in, int out) {
    small_linear(x, weight, bias, y, rows, in, out);
}

}  // extern "C"
