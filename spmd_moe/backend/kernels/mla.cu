// Multi-head latent attention, a decode step in the absorbed form (model/mla.py: absorbed):
// one query per sequence, q [b, h, W] (W = c + R: the query's latent part, q_nope folded
// through kv_b's key part, then its rope part), against the latent cache's rows [n, W]
// (each token's normalised latent c, then its rope key R); the values are the rows' first
// c columns. Sequence i's keys are rows k_row0 .. k_row0 + k_len - 1, all visible (the
// cache holds the new token already). Output [b, h*c] (storage dtype): the attention over
// the latent, before kv_b's value part is applied.
//
// Work: one CTA per (tile, block of MLA_HEADS query heads), blockIdx = (tile, head block).
// A tile is a sequence, or a split of its keys (split-K, when sequences are few and caches
// long): tile descriptor int32[MLA_TILE_FIELDS] = q_row, k_row0, k_len, kb_begin, kb_end
// (key blocks of MLA_KEYS), slot (-1: write the output; >= 0: a float32 partial, normalised,
// and its log2-sum-exp, merged by flash_attention.cu's attention_combine with block_m 1).
// The CTA reads each key block once into shared memory for all its heads: the latent is
// read b * ceil(h / MLA_HEADS) times per step, not b * h. Warp w owns heads w, w + 4,
// w + 8, w + 12 of the block: lane j scores key j of the block against each of them (a dot
// of W in float32), the warp runs their online softmax (base 2) by shuffles, and each lane
// accumulates the output columns lane + 32 i of its heads. FMA in float32, no tensor cores
// (FlashMLA's are the faster form; this is the correct one, PERFORMANCE.md).
//
// Notation: b sequences, h query heads, c latent width, R rope width, W = c + R.
#include "bf16.cuh"

#define MLA_THREADS 128
#define MLA_HEADS 16          // query heads per CTA (4 per warp)
#define MLA_KEYS 32           // keys per block: one per lane
#define MLA_MAX_LATENT 640    // c (DeepSeek-V3, Kimi K2: 512)
#define MLA_TILE_FIELDS 6
#define MLA_COLS (MLA_MAX_LATENT / 32)
#define NEG_INF __int_as_float(0xff800000)

template <typename T>
__device__ __forceinline__ void mla_decode(const T* __restrict__ q, const T* __restrict__ rows,
                                           T* __restrict__ out, float* __restrict__ part_o,
                                           float* __restrict__ part_lse,
                                           const int* __restrict__ tiles, int heads, int width,
                                           int latent, float scale_log2) {
    // Key rows padded by one 4-byte word: lane j reads row j at the same column as the
    // other lanes, and the pad puts those 32 rows in 32 different banks.
    const int ldk = width + 4 / static_cast<int>(sizeof(T));
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sQ = reinterpret_cast<float*>(smem_raw);                       // [MLA_HEADS][W]
    T* sK = reinterpret_cast<T*>(sQ + MLA_HEADS * width);                 // [MLA_KEYS][ldk]

    const int* t = tiles + static_cast<long long>(blockIdx.x) * MLA_TILE_FIELDS;
    const int q_row = t[0], k_row0 = t[1], k_len = t[2], kb_begin = t[3], kb_end = t[4];
    const int slot = t[5];
    const int head0 = blockIdx.y * MLA_HEADS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    for (int i = threadIdx.x; i < MLA_HEADS * width; i += MLA_THREADS) {
        const int hh = i / width, col = i - hh * width;
        sQ[i] = head0 + hh < heads
                    ? load_f(q, (static_cast<long long>(q_row) * heads + head0 + hh) * width
                                      + col)
                    : 0.f;
    }
    float o[4][MLA_COLS];
    float row_max[4], row_sum[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        row_max[m] = NEG_INF;
        row_sum[m] = 0.f;
#pragma unroll
        for (int i = 0; i < MLA_COLS; ++i) o[m][i] = 0.f;
    }

    for (int kb = kb_begin; kb < kb_end; ++kb) {
        const int first = kb * MLA_KEYS;
        __syncthreads();   // sQ written (first block); the previous block no longer read
        for (int i = threadIdx.x; i < MLA_KEYS * width; i += MLA_THREADS) {
            const int j = i / width, col = i - j * width;
            const T zero = T();
            sK[j * ldk + col] = first + j < k_len
                ? rows[(static_cast<long long>(k_row0) + first + j) * width + col] : zero;
        }
        __syncthreads();
        const bool valid = first + lane < k_len;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int hh = warp + 4 * m;
            float dot = 0.f;
            for (int col = 0; col < width; ++col)
                dot = fmaf(sQ[hh * width + col], load_f(sK, lane * ldk + col), dot);
            const float x = valid ? dot * scale_log2 : NEG_INF;
            float block_max = x;
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, offset));
            const float new_max = fmaxf(row_max[m], block_max);
            const float shift = new_max == NEG_INF ? 0.f : new_max;
            const float rescale = exp2f(row_max[m] - shift);
            const float p = exp2f(x - shift);
            float sum = p;
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                sum += __shfl_xor_sync(0xffffffffu, sum, offset);
            row_max[m] = new_max;
            row_sum[m] = row_sum[m] * rescale + sum;
#pragma unroll
            for (int i = 0; i < MLA_COLS; ++i) o[m][i] *= rescale;
            for (int j = 0; j < MLA_KEYS; ++j) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int i = 0; i < MLA_COLS; ++i) {
                    const int col = lane + 32 * i;
                    if (col < latent) o[m][i] = fmaf(pj, load_f(sK, j * ldk + col), o[m][i]);
                }
            }
        }
    }

#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const int head = head0 + warp + 4 * m;
        if (head >= heads) continue;
        const float inv = row_sum[m] > 0.f ? 1.f / row_sum[m] : 0.f;
        if (slot < 0) {
            const long long at = (static_cast<long long>(q_row) * heads + head) * latent;
#pragma unroll
            for (int i = 0; i < MLA_COLS; ++i) {
                const int col = lane + 32 * i;
                if (col < latent) store_f(out, at + col, o[m][i] * inv);
            }
        } else {
            const long long prow = static_cast<long long>(slot) * heads + head;   // block_m 1
#pragma unroll
            for (int i = 0; i < MLA_COLS; ++i) {
                const int col = lane + 32 * i;
                if (col < latent) part_o[prow * latent + col] = o[m][i] * inv;
            }
            if (lane == 0)
                part_lse[prow] = row_sum[m] > 0.f ? row_max[m] + log2f(row_sum[m]) : NEG_INF;
        }
    }
}

#define MLA_DECODE(T, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(MLA_THREADS)                                 \
    NAME(const T* q, const T* rows, T* out, float* part_o, float* part_lse, const int* tiles, \
         int heads, int width, int latent, float scale_log2) {                                \
        mla_decode<T>(q, rows, out, part_o, part_lse, tiles, heads, width, latent,            \
                      scale_log2);                                                            \
    }
MLA_DECODE(bf16_t, mla_decode_bf16)
MLA_DECODE(float, mla_decode_f32)
