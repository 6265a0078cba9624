// Rotary position embedding ("rotate half" layout) of every token's query and key heads, in place in
// the fused QKV projection output, then each token's key and value written to its cache slot.
// Rounds where PyTorch's `x * cos + cat(-x2, x1) * sin` rounds in the storage type.
//   qkv      [tokens, (num_heads + 2 * num_kv_heads) * head_dim]: q heads, k heads, v heads
//   cos_sin  [tokens, 2, head_dim]: each token's cos and sin, full width
//   caches   [num_kv_heads, slots_per_head, head_dim]; slots [tokens] (block * block_size + offset)

#include "common.h"

namespace {

using namespace framework;

template <typename T>
void rope_and_cache(T* qkv, const T* cos_sin, T* k_cache, T* v_cache, const int64_t* slots, int tokens,
                    int num_heads, int num_kv_heads, int head_dim, int64_t slots_per_head) {
    const int half = head_dim / 2;
    const int64_t width = int64_t(num_heads + 2 * num_kv_heads) * head_dim;
#pragma omp parallel for if (tokens * width >= PARALLEL_ELEMENTS)
    for (int t = 0; t < tokens; ++t) {
        T* row = qkv + t * width;
        const T* cos = cos_sin + int64_t(t) * 2 * head_dim;
        const T* sin = cos + head_dim;
        for (int h = 0; h < num_heads + num_kv_heads; ++h) {
            T* x = row + h * head_dim;
            for (int i = 0; i < half; ++i) {
                const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
                const float first = round_to<T>(x1 * to_float(cos[i])) + round_to<T>(-x2 * to_float(sin[i]));
                const float second = round_to<T>(x2 * to_float(cos[i + half])) + round_to<T>(x1 * to_float(sin[i + half]));
                store(x + i, first);
                store(x + i + half, second);
            }
        }
        const T* k = row + num_heads * head_dim;
        const T* v = k + num_kv_heads * head_dim;
        for (int h = 0; h < num_kv_heads; ++h) {
            const int64_t slot = (h * slots_per_head + slots[t]) * head_dim;
            std::memcpy(k_cache + slot, k + h * head_dim, head_dim * sizeof(T));
            std::memcpy(v_cache + slot, v + h * head_dim, head_dim * sizeof(T));
        }
    }
}

}  // namespace

extern "C" {

void rope_and_cache_f32(float* qkv, const float* cos_sin, float* k_cache, float* v_cache, const int64_t* slots,
                        int tokens, int num_heads, int num_kv_heads, int head_dim, int64_t slots_per_head) {
    rope_and_cache(qkv, cos_sin, k_cache, v_cache, slots, tokens, num_heads, num_kv_heads, head_dim, slots_per_head);
}

void rope_and_cache_bf16(bf16* qkv, const bf16* cos_sin, bf16* k_cache, bf16* v_cache, const int64_t* slots,
                         int tokens, int num_heads, int num_kv_heads, int head_dim, int64_t slots_per_head) {
    rope_and_cache(qkv, cos_sin, k_cache, v_cache, slots, tokens, num_heads, num_kv_heads, head_dim, slots_per_head);
}

}  // extern "C"
