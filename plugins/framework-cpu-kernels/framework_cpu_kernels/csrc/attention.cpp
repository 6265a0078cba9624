// Paged attention on the CPU for a whole step: every request's queries (one token when decoding, a
// chunk of its prompt otherwise) attend causally to its context, read in place from the
// block-paged cache. Flash-style: keys go by tiles of up to 16 (one block, or a 16-key part of
// one); each query row keeps a reference maximum (moved only when a score passes it by LAZY), sums
// of weights and a float32 weighted sum of values, so no score matrix is stored. A tile is laid
// out once for all the rows that meet it: keys transposed to 32-bit words (a row's scores for 16
// keys are `words` multiply-adds, bfloat16 pairs by `vdpbf16ps`), values widened to float32. The
// output is rounded to the storage type once.
//
// The first `shared_blocks` block-table columns (a prefix every request has in common) are
// attended once by all the requests' rows together, each of their tiles laid out once per step
// instead of once per request (rows that see all of it in two passes, see `Prefix`); then each
// request attends to its own blocks.
//
// Layouts (contiguous but for q):
//   q, out        [tokens, num_heads, head_dim]: each request's tokens in a run, requests in order
//                 (q's tokens `q_stride` values apart: it may be a slice of a fused QKV output)
//   k/v cache     [num_kv_heads, num_blocks, block_size, head_dim]
//   block_tables  [batch, max_blocks] int32; query_lens, context_lens [batch] int32 (a request's
//                 last query sees context_len positions)
// Query heads h * group .. h * group + group - 1 share KV head h (grouped-query attention).

#include <omp.h>

#include <vector>

#include "common.h"

namespace {

using namespace framework;

constexpr int ROWS_PER_TASK = 16;  // query tokens handed to a thread at a time
// Blocks lie anywhere in the cache: while a tile runs, the same keys and values of the block
// PREFETCH ahead (the next task's first ones near a task's end) are fetched into L2, two lines
// per value row summed. (All 64 lines at a block's start stalled on the core's few miss buffers;
// W1's 30 layers of decode attention in place: 9.6 ms that way, 6.4 ms this way.)
constexpr int PREFETCH = 2;
// A row's reference maximum moves only when a score passes it by more than LAZY (weights up to
// e^8 ~ 3000, far from overflow): softmax comes out the same from any reference, and most tiles
// then need neither a horizontal maximum nor a rescaling exp
constexpr float LAZY = 8.f;

#if defined(__AVX512F__)

// In place: 16 vectors of 16 32-bit words, transposed (4 rounds of interleaving rows i and i + 8:
// each round rotates the bits of a word's row and column index by one).
inline void transpose16(__m512i* rows) {
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int round = 0; round < 4; ++round) {
        __m512i next[LANES];
        for (int i = 0; i < LANES / 2; ++i) {
            next[2 * i] = _mm512_permutex2var_epi32(rows[i], low, rows[i + LANES / 2]);
            next[2 * i + 1] = _mm512_permutex2var_epi32(rows[i], high, rows[i + LANES / 2]);
        }
        std::memcpy(rows, next, sizeof next);
    }
}

// One round of `sum_each`: each input's lanes, in segments of 2w, halved (a segment's two w-lane
// halves added) and the two inputs' halved segments interleaved.
inline __m512 halve(__m512 a, __m512 b, __m512i low, __m512i high) {
    return _mm512_add_ps(_mm512_permutex2var_ps(a, low, b), _mm512_permutex2var_ps(a, high, b));
}

// The lane sums of 16 vectors as one vector: lane i holds the sum of p[bit-reversed i] (15
// halvings instead of 16 full reductions).
inline __m512 sum_each(const __m512* p) {
    const __m512i low8 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i high8 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const __m512i low4 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i high4 = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    const __m512i low2 = _mm512_setr_epi32(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    const __m512i high2 = _mm512_setr_epi32(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    const __m512i low1 = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    const __m512i high1 = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    __m512 r8[8], r4[4], r2[2];
    for (int k = 0; k < 8; ++k) r8[k] = halve(p[2 * k], p[2 * k + 1], low8, high8);
    for (int k = 0; k < 4; ++k) r4[k] = halve(r8[2 * k], r8[2 * k + 1], low4, high4);
    for (int k = 0; k < 2; ++k) r2[k] = halve(r4[2 * k], r4[2 * k + 1], low2, high2);
    return halve(r2[0], r2[1], low1, high1);
}

// Up to 16 consecutive keys and values of one block ([n][D] each, in the cache). bfloat16 keys are
// also transposed to 32-bit words, so that a row's 16 scores take D / 2 multiply-adds (two 16 x 16
// transposes for a 64-wide head, shared by every row that meets the tile); float32 keys would
// need twice as many, so their scores sum each key's products by a shuffle tree instead.
template <typename T, int D>
struct Tile {
    static constexpr bool TRANSPOSED = STEP<T> == 2;
    static constexpr int WORDS = D / STEP<T>;  // 32-bit words per key
    __m512i words[TRANSPOSED ? WORDS : 1];  // words[w], lane j: word w of key j
    // pairs[i * D / 16 + z], lane d: values d of keys 2i and 2i + 1 (bfloat16; laid out by
    // `pair_values` for the shared prefix)
    __m512i pairs[TRANSPOSED ? LANES / 2 * D / LANES : 1];
    const T *keys, *values;
    int n;
    const T *ahead_keys = nullptr, *ahead_values = nullptr;  // rows to fetch during the value sums (or none)

    void pair_values() {
        if constexpr (TRANSPOSED) {
            alignas(64) static constexpr int16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
            const __m512i interleave = _mm512_load_si512(order);
            auto part = [&](int j, int z) {  // (keys past n: zeros, weighed by 0, never NaN)
                return j < n ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(values + j * D + z * LANES)))
                             : _mm512_setzero_si512();
            };
            for (int i = 0; i < LANES / 2; ++i)
                for (int z = 0; z < D / LANES; ++z)
                    pairs[i * (D / LANES) + z] = _mm512_permutex2var_epi16(part(2 * i, z), interleave, part(2 * i + 1, z));
        }
    }

    // word i of values d = 16 z .. 16 z + 15: key i's in float32, keys 2i and 2i + 1's pairs in bfloat16
    __m512i value_word(int i, int z) const {
        if constexpr (TRANSPOSED) return pairs[i * (D / LANES) + z];
        else return _mm512_loadu_si512(values + i * D + z * LANES);
    }

    void load(const T* k, const T* v, int count) {
        keys = k, values = v, n = count;
        if constexpr (TRANSPOSED)
            for (int c = 0; c < WORDS; c += LANES) {
                __m512i rows[LANES];
                for (int j = 0; j < LANES; ++j)  // (keys past n: zeros, never read as data)
                    rows[j] = j < n ? _mm512_maskz_loadu_epi32(first(WORDS - c), (const uint32_t*)(k + j * D) + c)
                                    : _mm512_setzero_si512();
                transpose16(rows);
                for (int w = 0; w < std::min(LANES, WORDS - c); ++w) words[c + w] = rows[w];
            }
    }
};

// s[r] = q[r] . k_t * scale for R rows and the tile's 16 keys t (keys past n: anything, masked by
// the caller)
template <typename T, int D, int R>
__attribute__((always_inline)) inline void scores(const Tile<T, D>& tile, const T* const* q, float scale, __m512* s) {
    constexpr int WORDS = Tile<T, D>::WORDS;
    if constexpr (Tile<T, D>::TRANSPOSED) {
        // the rows step through the words together, each key word loaded once for all of them and
        // R x CHAINS independent sums in flight
        constexpr int CHAINS = 4;  // (whatever R: a row sums in the same order in any batch)
        __m512 sum[R][CHAINS];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < CHAINS; ++c) sum[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 64
        for (int w = 0; w < WORDS; ++w) {
            const __m512i key_word = tile.words[w];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                int32_t x;
                std::memcpy(&x, q[r] + w * STEP<T>, 4);
                sum[r][w % CHAINS] = multiply_add<T>(sum[r][w % CHAINS], _mm512_set1_epi32(x), key_word);
            }
        }
        for (int r = 0; r < R; ++r) {
            for (int c = 1; c < CHAINS; ++c) sum[r][0] = _mm512_add_ps(sum[r][0], sum[r][c]);
            s[r] = _mm512_mul_ps(sum[r][0], _mm512_set1_ps(scale));
        }
    } else {
        constexpr int VECTORS = (WORDS + LANES - 1) / LANES;
        constexpr int reversed[LANES] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
        const __mmask16 tail = first(WORDS - (VECTORS - 1) * LANES);
        for (int r = 0; r < R; ++r) {
            __m512i x[VECTORS];
            for (int c = 0; c < VECTORS; ++c)
                x[c] = _mm512_maskz_loadu_epi32(c + 1 < VECTORS ? __mmask16(0xffff) : tail, (const uint32_t*)q[r] + c * LANES);
            __m512 partial[LANES];  // key t's products, in lane sums, at reversed[t]: sum_each puts t back
#pragma GCC unroll 16
            for (int t = 0; t < LANES; ++t) {
                __m512 dot = _mm512_setzero_ps();
                if (t < tile.n)  // (keys past n: never read)
                    for (int c = 0; c < VECTORS; ++c) {
                        const auto* k = (const uint32_t*)(tile.keys + t * D) + c * LANES;
                        dot = multiply_add<T>(dot, x[c], _mm512_maskz_loadu_epi32(c + 1 < VECTORS ? __mmask16(0xffff) : tail, k));
                    }
                partial[reversed[t]] = dot;
            }
            s[r] = _mm512_mul_ps(sum_each(partial), _mm512_set1_ps(scale));
        }
    }
}

// R query rows meet a tile: row r (q[r], D values) sees its first count[r] keys and takes them into
// its reference maximum m[r], sums of weights l[r] (16 lanes) and weighted sum of values acc[r]
// (D floats). The rows go through each phase together, so that their independent chains overlap,
// and each value row is loaded once for all.
template <typename T, int D, int R>
__attribute__((always_inline)) inline void attend_tile(const Tile<T, D>& tile, const T* const* q, const int* count,
                                                       float scale, float* const* m, float* const* l, float* const* acc) {
    __m512 s[R];
    scores<T, D, R>(tile, q, scale, s);
    float p[R][LANES];
    float rescale[R];
    __mmask16 valid[R];
    int longest = 0;
    __m512 e[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
        valid[r] = first(count[r]);
        rescale[r] = 1.f;
        if (_mm512_mask_cmp_ps_mask(valid[r], s[r], _mm512_set1_ps(*m[r] + LAZY), _CMP_GT_OQ)) {  // (always at first)
            const float m_new = std::max(*m[r], _mm512_mask_reduce_max_ps(valid[r], s[r]));
            rescale[r] = *m[r] == -INFINITY ? 0.f : exp_approx(*m[r] - m_new);
            *m[r] = m_new;
        }
        e[r] = _mm512_sub_ps(s[r], _mm512_set1_ps(*m[r]));
        longest = std::max(longest, count[r]);
    }
    exp_rows<R>(e);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
        const __m512 probs = _mm512_maskz_mov_ps(valid[r], e[r]);  // exactly 0 past count[r]
        _mm512_storeu_ps(p[r], probs);
        _mm512_storeu_ps(l[r], _mm512_fmadd_ps(_mm512_loadu_ps(l[r]), _mm512_set1_ps(rescale[r]), probs));
    }
    __m512 sums[R][D / LANES];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int z = 0; z < D / LANES; ++z)
            sums[r][z] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + z * LANES), _mm512_set1_ps(rescale[r]));
    for (int j = 0; j < longest; ++j)  // (values past a row's count are real data times 0)
#pragma GCC unroll 16
        for (int z = 0; z < D / LANES; ++z) {
            if (tile.ahead_keys && z * LANES * sizeof(T) % 64 == 0) {
                _mm_prefetch((const char*)(tile.ahead_keys + j * D + z * LANES), _MM_HINT_T1);
                _mm_prefetch((const char*)(tile.ahead_values + j * D + z * LANES), _MM_HINT_T1);
            }
            const __m512 v = widen(tile.values + j * D + z * LANES, __mmask16(0xffff));
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) sums[r][z] = _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), v, sums[r][z]);
        }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int z = 0; z < D / LANES; ++z) _mm512_storeu_ps(acc[r] + z * LANES, sums[r][z]);
}

// Query rows gathered for `attend_tile`, run six at a time (their D / 16 value sums each stay in
// registers: three at a time for wider heads).
template <typename T, int D>
struct RowBatch {
    static constexpr int ROWS = D <= 64 ? 6 : 3;
    const T* q[ROWS];
    int count[ROWS];
    float *m[ROWS], *l[ROWS], *acc[ROWS];
    int size = 0;

    void add(const T* row_q, int row_count, float* row_m, float* row_l, float* row_acc) {
        q[size] = row_q, count[size] = row_count, m[size] = row_m, l[size] = row_l, acc[size] = row_acc;
        ++size;
    }

    void run(const Tile<T, D>& tile, float scale) {
        if (size > 0) run_rows<1>(tile, scale);
        size = 0;
    }

    template <int R>
    void run_rows(const Tile<T, D>& tile, float scale) {
        if (size == R) attend_tile<T, D, R>(tile, q, count, scale, m, l, acc);
        else if constexpr (R < ROWS) run_rows<R + 1>(tile, scale);
    }
};

// The KV blocks a task reads: columns [j0, j1) of a block table, under KV head h.
struct Blocks {
    const int32_t* table;
    int j0, j1, h;
};

// A thread's copy of the shared prefix under one KV head, for rows that see all of it: its tiles
// laid out once (bfloat16 values also in pairs), so that each row batch first scores every key,
// then knows its exact maximum before any e^x (no lazy check, no rescaling), then sums the values
// with its state in registers. The weights are rounded to the storage type for the value sums, two
// keys a `vdpbf16ps` in bfloat16, as PyTorch's CPU flash attention rounds them.
template <typename T, int D>
struct Prefix {
    int head = -1;
    std::vector<Tile<T, D>> tiles;
    std::vector<float> scores;  // [ROWS][tiles * 16] of the row batch in hand
    std::vector<T> weights;     // the same, as weights
};

template <typename T, int D>
struct Step {
    using Batch = RowBatch<T, D>;
    const T *q, *k_cache, *v_cache;
    T* out;
    int64_t q_stride;
    int num_heads, num_kv_heads, num_blocks, block_size;
    float scale;
    std::vector<int> position;  // [tokens] absolute position of each query token
    // running state of each query row, by KV head, then token, then query head of the group: the
    // rows a task writes lie together, and no cache line holds two tasks' rows (the two threads
    // writing one line in turn would pass it back and forth between their cores)
    struct alignas(64) Row {
        float acc[D];     // weighted sum of values
        float l[LANES];   // sum of weights, LANES partial sums (added up at the end)
        float m = -INFINITY;  // reference maximum
    };
    std::vector<Row> rows;
    int group = 0;  // query heads per KV head

    Row& row(int h, int t, int g) { return rows[(int64_t(h) * position.size() + t) * group + g]; }

    const T* block_keys(const Blocks& b, int j) const {
        return k_cache + (int64_t(b.h) * num_blocks + b.table[j]) * block_size * D;
    }

    // Rows of tokens [t0, t1) meet the blocks `own` (context `context`); `after` (if any) are the
    // blocks this thread reads next.
    void attend(Tile<T, D>& tile, int t0, int t1, const Blocks& own, int context, const Blocks* after) {
        const int h = own.h;
        const int last = *std::max_element(position.begin() + t0, position.begin() + t1);
        for (int j = own.j0; j < own.j1; ++j) {
            const int ahead = j + PREFETCH - own.j1 + (after ? after->j0 : 0);
            const T* next = j + PREFETCH < own.j1        ? block_keys(own, j + PREFETCH)
                            : after && ahead < after->j1 ? block_keys(*after, ahead)
                                                         : nullptr;
            for (int key0 = j * block_size; key0 < std::min((j + 1) * block_size, context); key0 += LANES) {
                if (key0 > last) return;  // causal: no row sees further
                const int n = std::min({LANES, (j + 1) * block_size - key0, context - key0});
                const int64_t offset = int64_t(key0 - j * block_size) * D;
                const T* keys = block_keys(own, j) + offset;
                tile.load(keys, v_cache + (keys - k_cache), n);
                tile.ahead_keys = next ? next + offset : nullptr;  // fetched by the first row batch only
                tile.ahead_values = next ? v_cache + (next - k_cache) + offset : nullptr;
                Batch batch;
                for (int t = t0; t < t1; ++t) {
                    const int count = std::min(n, position[t] - key0 + 1);
                    for (int g = 0; count > 0 && g < group; ++g) {
                        Row& state = row(h, t, g);
                        batch.add(q + t * q_stride + (h * group + g) * D, count, &state.m, state.l, state.acc);
                        if (batch.size == Batch::ROWS) batch.run(tile, scale), tile.ahead_keys = nullptr;
                    }
                }
                batch.run(tile, scale);
            }
        }
    }

    // The shared prefix under KV head `prefix.head` for tokens [t0, t1), whose rows all see the
    // whole of it, ROWS rows at a time (see `Prefix`)
    void attend_prefix(Prefix<T, D>& prefix, int t0, int t1) {
        constexpr int ROWS = RowBatch<T, D>::ROWS;
        const int h = prefix.head;
        const T* q_rows[ROWS];
        Row* states[ROWS];
        int size = 0;
        for (int t = t0; t < t1; ++t)
            for (int g = 0; g < group; ++g) {
                q_rows[size] = q + t * q_stride + (h * group + g) * D, states[size] = &row(h, t, g);
                if (++size == ROWS || (t + 1 == t1 && g + 1 == group)) prefix_rows<1>(prefix, q_rows, states, size), size = 0;
            }
    }

    template <int R>
    void prefix_rows(Prefix<T, D>& prefix, const T* const* q_rows, Row* const* states, int size) {
        if constexpr (R < RowBatch<T, D>::ROWS)
            if (size != R) return prefix_rows<R + 1>(prefix, q_rows, states, size);
        const int tiles = int(prefix.tiles.size()), stride = tiles * LANES;
        float* const s = prefix.scores.data();
        T* const w = prefix.weights.data();
        // each row's scores, and its maximum
        __m512 top[R];
        for (int r = 0; r < R; ++r) top[r] = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < tiles; ++c) {
            __m512 tile_s[R];
            scores<T, D, R>(prefix.tiles[c], q_rows, scale, tile_s);
            const __mmask16 valid = first(prefix.tiles[c].n);
            for (int r = 0; r < R; ++r) {
                top[r] = _mm512_mask_max_ps(top[r], valid, top[r], tile_s[r]);
                _mm512_storeu_ps(s + r * stride + c * LANES, tile_s[r]);
            }
        }
        // the weights e^(s - max) in the storage type, and their sums
        __m512 m[R], l[R];
        for (int r = 0; r < R; ++r) m[r] = _mm512_set1_ps(_mm512_reduce_max_ps(top[r])), l[r] = _mm512_setzero_ps();
        for (int c = 0; c < tiles; ++c) {
            __m512 e[R];
            for (int r = 0; r < R; ++r) e[r] = _mm512_sub_ps(_mm512_loadu_ps(s + r * stride + c * LANES), m[r]);
            exp_rows<R>(e);
            const __mmask16 valid = first(prefix.tiles[c].n);
            for (int r = 0; r < R; ++r) {
                const __m512 weight = round16(w, _mm512_maskz_mov_ps(valid, e[r]));  // exactly 0 past the tile's keys
                l[r] = _mm512_add_ps(l[r], weight);
                store16(w + r * stride + c * LANES, weight, __mmask16(0xffff));
            }
        }
        // the value sums: a word of weights (one or two keys) broadcast against a word-vector of values
        __m512 sums[R][D / LANES];
        for (int r = 0; r < R; ++r)
            for (int z = 0; z < D / LANES; ++z) sums[r][z] = _mm512_setzero_ps();
        for (int c = 0; c < tiles; ++c) {
            const Tile<T, D>& tile = prefix.tiles[c];
            for (int i = 0; i < (tile.n + STEP<T> - 1) / STEP<T>; ++i)
#pragma GCC unroll 16
                for (int z = 0; z < D / LANES; ++z) {
                    const __m512i v = tile.value_word(i, z);
#pragma GCC unroll 16
                    for (int r = 0; r < R; ++r) {
                        int32_t word;
                        std::memcpy(&word, w + r * stride + c * LANES + i * STEP<T>, sizeof word);
                        sums[r][z] = multiply_add<T>(sums[r][z], _mm512_set1_epi32(word), v);
                    }
                }
        }
        for (int r = 0; r < R; ++r) {
            for (int z = 0; z < D / LANES; ++z) _mm512_storeu_ps(states[r]->acc + z * LANES, sums[r][z]);
            _mm512_storeu_ps(states[r]->l, l[r]);
            states[r]->m = _mm512_cvtss_f32(m[r]);
        }
    }

    // The tiles of the first `keys` keys of the blocks `blocks` laid out in `prefix` (the keys and
    // values of the block PREFETCH ahead fetched meanwhile, the values for the first row batch),
    // and its row batch's buffers sized to them
    void lay_out(Prefix<T, D>& prefix, const Blocks& blocks, int keys) const {
        prefix.head = blocks.h;
        prefix.tiles.clear();
        for (int j = 0; j * block_size < keys; ++j) {
            if (const int ahead = j + PREFETCH; ahead * block_size < keys) {
                const char* k = (const char*)block_keys(blocks, ahead);
                const char* v = (const char*)(v_cache + ((const T*)k - k_cache));
                for (int line = 0; line < std::min(block_size, keys - ahead * block_size) * D * int(sizeof(T)); line += 64)
                    _mm_prefetch(k + line, _MM_HINT_T1), _mm_prefetch(v + line, _MM_HINT_T1);
            }
            for (int key0 = j * block_size; key0 < std::min((j + 1) * block_size, keys); key0 += LANES) {
                const T* k = block_keys(blocks, j) + int64_t(key0 - j * block_size) * D;
                prefix.tiles.emplace_back();
                prefix.tiles.back().load(k, v_cache + (k - k_cache), std::min({LANES, (j + 1) * block_size - key0, keys - key0}));
                prefix.tiles.back().pair_values();
            }
        }
        prefix.scores.resize(size_t(RowBatch<T, D>::ROWS) * prefix.tiles.size() * LANES);
        prefix.weights.resize(prefix.scores.size());
    }

    void finish(int h, int t0, int t1) {
        for (int t = t0; t < t1; ++t)
            for (int g = 0; g < group; ++g) {
                const Row& state = row(h, t, g);
                const float sum = _mm512_reduce_add_ps(_mm512_loadu_ps(state.l));
                T* o = out + (int64_t(t) * num_heads + h * group + g) * D;
                for (int i = 0; i < D; ++i) store(o + i, state.acc[i] / sum);
            }
    }
};

template <typename T, int D>
void attention(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, T* out, const int32_t* block_tables,
               const int32_t* query_lens, const int32_t* context_lens, int batch, int num_heads, int num_kv_heads,
               int num_blocks, int block_size, int max_blocks, int shared_blocks, float scale) {
    Step<T, D> step{q, k_cache, v_cache, out, q_stride, num_heads, num_kv_heads, num_blocks, block_size, scale};
    std::vector<int> first_token(batch + 1, 0);
    for (int b = 0; b < batch; ++b) first_token[b + 1] = first_token[b] + query_lens[b];
    const int tokens = first_token[batch];
    step.position.resize(tokens);
    struct Task { int b, t0, t1; };  // a request's tokens [t0, t1)
    std::vector<Task> tasks;
    for (int b = 0; b < batch; ++b) {
        for (int t = first_token[b]; t < first_token[b + 1]; ++t)
            step.position[t] = context_lens[b] - query_lens[b] + t - first_token[b];
        for (int t = first_token[b]; t < first_token[b + 1]; t += ROWS_PER_TASK)
            tasks.push_back({b, t, std::min(t + ROWS_PER_TASK, first_token[b + 1])});
    }
    step.group = num_heads / num_kv_heads;
    step.rows.assign(size_t(tokens) * num_heads, typename Step<T, D>::Row{});
    int longest = 0;
    for (int b = 0; b < batch; ++b) longest = std::max(longest, context_lens[b]);
    const int shared_tasks = shared_blocks > 0 ? (tokens + ROWS_PER_TASK - 1) / ROWS_PER_TASK : 0;
    const int prefix_keys = std::min(shared_blocks * block_size, longest);
    auto own_blocks = [&](int i) {  // task i / num_kv_heads under KV head i % num_kv_heads
        const int b = tasks[i / num_kv_heads].b;
        return Blocks{block_tables + int64_t(b) * max_blocks, shared_blocks, (context_lens[b] + block_size - 1) / block_size,
                      i % num_kv_heads};
    };
    const int own_tasks = int(tasks.size()) * num_kv_heads;
    // the threads split the own tasks into runs of about equal work (rows and tiles), each thread's
    // run in order, so that a task's last blocks can fetch the next one's first, with no counter
    // passed between the cores
    std::vector<int64_t> work(own_tasks + 1, 0);  // work[i]: of the tasks before i
    for (int i = 0; i < own_tasks; ++i) {
        const Task& task = tasks[i / num_kv_heads];
        const int keys = std::max(0, step.position[task.t1 - 1] + 1 - shared_blocks * block_size);
        work[i + 1] = work[i] + int64_t(keys / LANES + 2) * (task.t1 - task.t0 + 2);
    }
#pragma omp parallel
    {
        Tile<T, D> tile;
        const int me = omp_get_thread_num(), threads = omp_get_num_threads();
        // the shared prefix, all requests' rows: tasks by KV head, then tokens, in equal runs (a
        // thread reads the prefix of as few KV heads as it can)
        const int all_shared = shared_tasks * num_kv_heads;
        Prefix<T, D> prefix;
        for (int i = all_shared * me / threads; i < all_shared * (me + 1) / threads; ++i) {
            const int t0 = i % shared_tasks * ROWS_PER_TASK, t1 = std::min(t0 + ROWS_PER_TASK, tokens);
            const Blocks shared{block_tables, 0, shared_blocks, i / shared_tasks};
            if (*std::min_element(step.position.begin() + t0, step.position.begin() + t1) + 1 < prefix_keys) {
                step.attend(tile, t0, t1, shared, longest, nullptr);  // a row inside the prefix: causal tiles
                continue;
            }
            if (prefix.head != shared.h) step.lay_out(prefix, shared, prefix_keys);
            step.attend_prefix(prefix, t0, t1);
        }
        if (all_shared > 0) {
#pragma omp barrier
        }
        // each request's own blocks, once its rows have met the prefix
        auto run_start = [&](int k) {
            return k == threads ? own_tasks : int(std::lower_bound(work.begin(), work.end(), work.back() * k / threads) - work.begin());
        };
        const int end = run_start(me + 1);
        for (int i = run_start(me); i < end; ++i) {
            const Task& task = tasks[i / num_kv_heads];
            const Blocks own = own_blocks(i), after = i + 1 < end ? own_blocks(i + 1) : Blocks{};
            step.attend(tile, task.t0, task.t1, own, context_lens[task.b], i + 1 < end ? &after : nullptr);
            step.finish(own.h, task.t0, task.t1);
        }
    }
}

template <typename T>
int dispatch(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, T* out, const int32_t* block_tables,
             const int32_t* query_lens, const int32_t* context_lens, int batch, int num_heads, int num_kv_heads,
             int num_blocks, int block_size, int head_dim, int max_blocks, int shared_blocks, float scale) {
    if (num_heads % num_kv_heads != 0) return -1;
#define FRAMEWORK_HEAD_DIM(D)                                                                                     \
    case D:                                                                                                     \
        attention<T, D>(q, q_stride, k_cache, v_cache, out, block_tables, query_lens, context_lens, batch, num_heads,      \
                        num_kv_heads, num_blocks, block_size, max_blocks, shared_blocks, scale);                 \
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

#endif

}  // namespace

// q_stride: values from one token's queries to the next (num_heads * head_dim when q is contiguous).
// Return 0, or -1 (nothing written) for a shape or CPU the kernel does not cover (it needs
// AVX-512, and AVX512-BF16 for bfloat16).
extern "C" {

int paged_attention_f32(const float* q, const float* k_cache, const float* v_cache, float* out,
                        const int32_t* block_tables, const int32_t* query_lens, const int32_t* context_lens, int batch,
                        int num_heads, int num_kv_heads, int num_blocks, int block_size, int head_dim, int max_blocks,
                        int shared_blocks, float scale, int64_t q_stride) {
#if defined(__AVX512F__)
    return dispatch(q, q_stride, k_cache, v_cache, out, block_tables, query_lens, context_lens, batch, num_heads, num_kv_heads,
                    num_blocks, block_size, head_dim, max_blocks, shared_blocks, scale);
#else
    return -1;
#endif
}

int paged_attention_bf16(const bf16* q, const bf16* k_cache, const bf16* v_cache, bf16* out,
                         const int32_t* block_tables, const int32_t* query_lens, const int32_t* context_lens, int batch,
                         int num_heads, int num_kv_heads, int num_blocks, int block_size, int head_dim, int max_blocks,
                         int shared_blocks, float scale, int64_t q_stride) {
#if defined(__AVX512BF16__)
    return dispatch(q, q_stride, k_cache, v_cache, out, block_tables, query_lens, context_lens, batch, num_heads, num_kv_heads,
                    num_blocks, block_size, head_dim, max_blocks, shared_blocks, scale);
#else
    return -1;
#endif
}

}  // extern "C"
