// Paged decode attention on the CPU: one query token per request, attending to the request's keys
// and values read in place from the block-paged cache (no gathered copy of the context).
// Scores, softmax and the weighted sum of values run in float32 whatever the storage type
// (float32 or bfloat16); the output is rounded to the storage type once, at the end.
//
// Layouts (all contiguous):
//   q, out        [batch, num_heads, head_dim]
//   k/v cache     [num_kv_heads, num_blocks, block_size, head_dim]
//   block_tables  [batch, max_blocks] int32, context_lens [batch] int32 (positions a query sees)
// Query heads h * group .. h * group + group - 1 share KV head h (grouped-query attention).

#include <vector>

#include "common.h"

namespace {

using namespace framework;

// a * b summed down to LANES partial sums (the dot product is their sum)
template <int D, typename T>
inline f32x16 products(const float* a, const T* b) {
    f32x16 s = load16(a) * load16(b);
    for (int i = LANES; i < D; i += LANES) s += load16(a + i) * load16(b + i);
    return s;
}

typedef int32_t i32x16 __attribute__((vector_size(64)));
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, i32x16{__VA_ARGS__})
#endif

// One round of `sum_each`: each input's partial sums, in segments of 2w lanes, are halved (the two
// w-lane halves of a segment added), and the two inputs' halved segments interleaved.
#define HALVE(a, b, lo, hi) (SHUFFLE(a, b, lo) + SHUFFLE(a, b, hi))
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31

// The 16 horizontal sums of 16 vectors in one vector: lane i holds the sum of p[bit-reversed i]
// (4 rounds of 15 shuffle-adds in all, instead of a full reduction per vector).
inline f32x16 sum_each(const f32x16* p) {
    f32x16 r8[8], r4[4], r2[2];
    for (int k = 0; k < 8; ++k) r8[k] = HALVE(p[2 * k], p[2 * k + 1], LO8, HI8);
    for (int k = 0; k < 4; ++k) r4[k] = HALVE(r8[2 * k], r8[2 * k + 1], LO4, HI4);
    for (int k = 0; k < 2; ++k) r2[k] = HALVE(r4[2 * k], r4[2 * k + 1], LO2, HI2);
    return HALVE(r2[0], r2[1], LO1, HI1);
}

// q . k_t for 16 consecutive keys (rows of D), as one vector
template <int D, typename T>
inline f32x16 dots16(const float* q, const T* k) {
    constexpr int reversed[LANES] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    f32x16 partial[LANES];
    for (int t = 0; t < LANES; ++t) partial[reversed[t]] = products<D>(q, k + t * D);
    return sum_each(partial);
}

// In place, s <- softmax numerators e^(s - max s); returns their sum. LANES independent partial
// results keep the loops vectorizable with a fixed summation order.
inline float exp_and_sum(float* s, int n) {
    float lanes[LANES];
    std::fill(lanes, lanes + LANES, -INFINITY);
    int t = 0;
    for (; t + LANES <= n; t += LANES)
        for (int l = 0; l < LANES; ++l) lanes[l] = std::max(lanes[l], s[t + l]);
    for (; t < n; ++t) lanes[0] = std::max(lanes[0], s[t]);
    const float peak = *std::max_element(lanes, lanes + LANES);
    std::fill(lanes, lanes + LANES, 0.f);
    for (t = 0; t + LANES <= n; t += LANES)
        for (int l = 0; l < LANES; ++l) {
            s[t + l] = exp_approx(s[t + l] - peak);
            lanes[l] += s[t + l];
        }
    for (; t < n; ++t) {
        s[t] = exp_approx(s[t] - peak);
        lanes[0] += s[t];
    }
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
    return lanes[0];
}

// sums[g] = sum_t p[g][t] v_t for G query heads at once, `scores` holding p[g] every `stride`
// floats: each value row is widened to float32 once for all G heads.
template <int G, int D, typename T>
void weighted_values(const T* v_cache, const int32_t* table, int context, int block_size, const float* scores,
                     int stride, float* sums) {
    f32x16 acc[G][D / LANES] = {};
    const int blocks = (context + block_size - 1) / block_size;
    for (int j = 0; j < blocks; ++j) {
        const int n = std::min(block_size, context - j * block_size);
        const T* v = v_cache + int64_t(table[j]) * block_size * D;
        for (int t = 0; t < n; ++t) {
            f32x16 row[D / LANES];
            for (int c = 0; c < D / LANES; ++c) row[c] = load16(v + t * D + c * LANES);
            for (int g = 0; g < G; ++g) {
                const float p = scores[g * stride + j * block_size + t];
                for (int c = 0; c < D / LANES; ++c) acc[g][c] += p * row[c];
            }
        }
    }
    std::memcpy(sums, acc, sizeof acc);
}

// One request's query heads of one KV head. `k_cache`/`v_cache` point at that head's blocks;
// `query` and `scores` are the calling thread's scratch space.
template <typename T, int D>
void attend(const T* q, const T* k_cache, const T* v_cache, T* out, const int32_t* table, int context,
            int block_size, int group, float scale, float* query, float* scores) {
    for (int i = 0; i < group * D; ++i) query[i] = to_float(q[i]) * scale;
    const int blocks = (context + block_size - 1) / block_size;
    const int stride = (context + LANES - 1) / LANES * LANES;  // one head's scores, whole vectors
    for (int j = 0; j < blocks; ++j) {  // scores[g][t] = q_g . k_t
        const int n = std::min(block_size, context - j * block_size);
        const T* k = k_cache + int64_t(table[j]) * block_size * D;
        float* row = scores + j * block_size;
        if (block_size % LANES == 0) {  // 16 keys at a time (past `n`: stale slots, scores unused)
            for (int t = 0; t < n; t += LANES)
                for (int g = 0; g < group; ++g) {
                    const f32x16 s = dots16<D>(query + g * D, k + t * D);
                    std::memcpy(row + g * stride + t, &s, sizeof s);
                }
        } else {
            for (int t = 0; t < n; ++t)
                for (int g = 0; g < group; ++g) row[g * stride + t] = sum16(products<D>(query + g * D, k + t * D));
        }
    }
    float total[64];
    for (int g = 0; g < group; ++g) total[g] = exp_and_sum(scores + g * stride, context);
    float sums[64 * D];  // sum_t p[g][t] v_t
    switch (group) {  // common group sizes keep every head's sums in registers
        case 1: weighted_values<1, D>(v_cache, table, context, block_size, scores, stride, sums); break;
        case 2: weighted_values<2, D>(v_cache, table, context, block_size, scores, stride, sums); break;
        case 3: weighted_values<3, D>(v_cache, table, context, block_size, scores, stride, sums); break;
        case 4: weighted_values<4, D>(v_cache, table, context, block_size, scores, stride, sums); break;
        default:
            for (int g = 0; g < group; ++g)
                weighted_values<1, D>(v_cache, table, context, block_size, scores + g * stride, stride, sums + g * D);
    }
    for (int g = 0; g < group; ++g)
        for (int i = 0; i < D; ++i) store(out + g * D + i, sums[g * D + i] / total[g]);
}

template <typename T, int D>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, T* out, const int32_t* block_tables,
                      const int32_t* context_lens, int batch, int num_heads, int num_kv_heads, int num_blocks,
                      int block_size, int max_blocks, float scale) {
    const int group = num_heads / num_kv_heads;
    int longest = 0;
    for (int b = 0; b < batch; ++b) longest = std::max(longest, context_lens[b]);
#pragma omp parallel
    {
        std::vector<float> query(group * D), scores(size_t(group) * (longest + LANES));
#pragma omp for collapse(2) schedule(dynamic)
        for (int b = 0; b < batch; ++b)
            for (int h = 0; h < num_kv_heads; ++h) {
                const int64_t head = int64_t(h) * num_blocks * block_size * D;
                const int64_t first = (int64_t(b) * num_heads + int64_t(h) * group) * D;
                attend<T, D>(q + first, k_cache + head, v_cache + head, out + first, block_tables + int64_t(b) * max_blocks,
                             context_lens[b], block_size, group, scale, query.data(), scores.data());
            }
    }
}

template <typename T>
int dispatch(const T* q, const T* k_cache, const T* v_cache, T* out, const int32_t* block_tables,
             const int32_t* context_lens, int batch, int num_heads, int num_kv_heads, int num_blocks, int block_size,
             int head_dim, int max_blocks, float scale) {
    if (num_heads % num_kv_heads != 0 || num_heads / num_kv_heads > 64) return -1;
#define FRAMEWORK_HEAD_DIM(D)                                                                                 \
    case D:                                                                                                 \
        decode_attention<T, D>(q, k_cache, v_cache, out, block_tables, context_lens, batch, num_heads,       \
                               num_kv_heads, num_blocks, block_size, max_blocks, scale);                     \
        return 0;
    switch (head_dim) {
        FRAMEWORK_HEAD_DIM(16)
        FRAMEWORK_HEAD_DIM(32)
        FRAMEWORK_HEAD_DIM(64)
        FRAMEWORK_HEAD_DIM(128)
    }
#undef FRAMEWORK_HEAD_DIM
    return -1;
}

}  // namespace

// Return 0, or -1 (nothing written) for a shape the kernel does not cover.
extern "C" {

int decode_attention_f32(const float* q, const float* k_cache, const float* v_cache, float* out,
                         const int32_t* block_tables, const int32_t* context_lens, int batch, int num_heads,
                         int num_kv_heads, int num_blocks, int block_size, int head_dim, int max_blocks, float scale) {
    return dispatch(q, k_cache, v_cache, out, block_tables, context_lens, batch, num_heads, num_kv_heads, num_blocks,
                    block_size, head_dim, max_blocks, scale);
}

int decode_attention_bf16(const bf16* q, const bf16* k_cache, const bf16* v_cache, bf16* out,
                          const int32_t* block_tables, const int32_t* context_lens, int batch, int num_heads,
                          int num_kv_heads, int num_blocks, int block_size, int head_dim, int max_blocks, float scale) {
    return dispatch(q, k_cache, v_cache, out, block_tables, context_lens, batch, num_heads, num_kv_heads, num_blocks,
                    block_size, head_dim, max_blocks, scale);
}

}  // extern "C"
