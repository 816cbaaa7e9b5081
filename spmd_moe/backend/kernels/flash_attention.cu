// Causal flash-attention forward for packed variable-length sequences (SPEC §1 attention).
//
// Semantics are those of model.causal_attention: q [Tq, h, D], k [Tk, hk, D] and v
// [Tk, hk, Dv] row-major (Dv, the value width, may differ from D: MLA's prefill), hk
// dividing h (grouped-query attention: query head j reads key/value head j / (h/hk);
// hk = h is plain multi-head attention); sequence i has q_len queries at rows q_start..
// and k_len keys at rows k_start..; query r of the sequence attends to keys
// 0 .. k_len - q_len + r. Output [Tq, h*Dv]. Prefill (q_len = k_len) and a decode step
// (q_len = 1 against a KV cache of the hk heads laid out as rows) are the same kernel:
// only the tile list differs. The group size is a run-time argument, not a template
// parameter: every head layout shares one set of instantiations.
//
// Work partitioning: the host (schedule.py) builds a list of tiles, one per (sequence,
// block of BM queries), so variable lengths waste no blocks. A CTA runs one tile for
// one query head: blockIdx.x = (kv_head * n_tiles + tile) * group + g for query head
// kv_head * group + g (CtaWork below; with group = 1, head * n_tiles + tile). Tiles are
// grouped by sequence, longest (most keys) first within it, so the CTAs in flight at any
// time are the tiles of one or two (sequence, K/V head) pairs: their K/V (10k keys x 128 x
// 2 x 2 B = 5 MB) is read from DRAM once and then from L2, and the short tiles fill the
// tail. The query heads of a group sit side by side and read the same K/V blocks at about
// the same time. A tile may be split over its key blocks (split-K, for decode where tiles
// are few and keys many): each split then writes a normalised float32 partial and its
// log-sum-exp, and attention_combine merges the splits.
//
// Tile descriptor, int32[TILE_FIELDS]:
//   [0] q_row0    packed row of the tile's first query   [1] n_rows  queries (<= BM)
//   [2] k_row0    packed row of the sequence's key 0     [3] diag    row r sees keys <= diag + r
//   [4] kb_begin  first key block (of BLOCK_N keys)      [5] kb_end  one past the last block
//   [6] slot      -1: write the output; >= 0: a partial  [7] unused
// Combine descriptor, int32[COMBINE_FIELDS]: q_row0, n_rows, first slot, number of splits.
//
// bf16 kernel (flash_attention_bf16_m{BM}_*): BM / 16 warps, each owns 16 query rows; S =
// Q K^T and O += P V run on tensor cores (mma.sync m16n8k16 bf16 -> f32, operands by
// ldmatrix from shared memory). Online softmax in float32 in base 2 (scale folded with
// log2 e). K/V blocks are double-buffered with cp.async. The head dim is padded to DP
// (16/32/64/128, or 192 for MLA's 128 + 64) and the value width to DVP (DP, or 128 with
// DP = 192): zero columns change no dot product and padded output columns are never
// stored. Two tile heights: BM = 64 (4 warps, two CTAs per SM) and BM = 128 (8 warps, one
// CTA per SM), which reads each K/V block once for twice the queries: half the L2 -> SM
// traffic on long prefill (the schedule picks it, schedule.py: tile_rows). A warp skips a
// key block that lies wholly past its rows' causal bound, so both heights issue the same
// MMAs.
// float32 kernel (flash_attention_f32_*): the same tiles on plain FMA (one thread per
// query row): float32 runs are for accuracy, so no TF32 and no bf16 rounding.
//
// Notation: BM queries per tile (BLOCK_M, or BLOCK_M_LONG for the 8-warp variant), BN =
// BLOCK_N keys per block, D query/key head dim, Dv value head dim, DP and DVP their padded
// widths, LD and LDV shared-memory row strides in elements. Split partials are laid out
// [slot, h, BM, Dv] with the BM of the variant that wrote them; the combine kernel takes
// that BM as an argument.
#include "bf16.cuh"

#define BLOCK_M 64         // queries per tile: the float32 kernel and the 4-warp bf16 one
#define BLOCK_M_LONG 128   // queries per tile of the 8-warp bf16 kernel (long prefill)
#define BLOCK_N 64
#define TILE_FIELDS 8
#define COMBINE_FIELDS 4
#define F32_THREADS 64     // one thread per query row = BLOCK_M
#define COMBINE_THREADS 128
// 16 bytes of padding per shared-memory row: a row stride of (DP + 8) bf16 puts the 8 rows
// an ldmatrix reads in 8 different 16-byte bank groups (conflict-free for every DP here).
#define SMEM_PAD 8
// -inf as a bit pattern: NVRTC without headers has no INFINITY macro.
#define NEG_INF __uint_as_float(0xff800000u)

// ---------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Copy BYTES (16 or 4) global -> shared without staging in registers; src_bytes = 0 writes
// zeros instead (rows past the sequence, padded head-dim columns) and reads nothing.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
    const int src_bytes = valid ? BYTES : 0;
    if (BYTES == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :: "r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                     :: "r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Four 8x8 bf16 matrices; lane l supplies the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c[16x8] += a[16x16] * b[16x8]; bf16 operands, float32 accumulator (in place).
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const unsigned (&a)[4],
                                               unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float warp_quad_max(float x) {
    // The 4 lanes of a quad (lane / 4 equal) hold the columns of the same two rows.
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float warp_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

struct Tile {
    int q_row0, n_rows, k_row0, diag, kb_begin, kb_end, slot;
    __device__ explicit Tile(const int* t)
        : q_row0(t[0]), n_rows(t[1]), k_row0(t[2]), diag(t[3]), kb_begin(t[4]), kb_end(t[5]),
          slot(t[6]) {}
    // Keys [0, key_end) are visible to at least one row of the tile.
    __device__ int key_end() const { return diag + n_rows; }
};

// Which tile and heads a CTA runs (the launch code's schedule.cta_work mirrors this).
// The g query heads of a K/V head take adjacent block indices for the same tile.
struct CtaWork {
    int tile, head, kv_head;
    __device__ CtaWork(int block, int n_tiles, int heads, int kv_heads) {
        // Unsigned: shorter division sequences (the signed ones cost the 64-row d16 kernel
        // a spilled register under NVRTC 12.9).
        const unsigned group = unsigned(heads) / unsigned(kv_heads);
        const unsigned pair = unsigned(block) / group;   // kv_head * n_tiles + tile
        tile = pair % unsigned(n_tiles);
        kv_head = pair / unsigned(n_tiles);
        head = kv_head * group + unsigned(block) % group;
    }
};

// Partial of a split tile: O / l in float32 [slot, head, BM, D] and log2(l) + m [slot, head, BM].
__device__ __forceinline__ long long partial_row(int slot, int heads, int head, int block_m,
                                                 int row) {
    return (static_cast<long long>(slot) * heads + head) * block_m + row;
}

// ---------------------------------------------------------------------------------------
// bf16 tensor-core kernel

// ROWS x DP tile of one head's D columns of `valid` rows into shared memory with stride
// LD: row r of the tile is at g + r * stride (g: the first row's first column of the
// head, `stride` elements per row); rows past `valid` and columns past D are zero-filled.
// CH bf16 per copy: 8 (16 bytes: the host checks that D % 8 == 0 and that q, k and v start
// on 16-byte boundaries), else 2 (4 bytes; D is even). THREADS threads share the copies.
template <int DP, int CH, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_async(bf16_t* sdst, const bf16_t* __restrict__ g,
                                                int valid, int stride, int D) {
    constexpr int LD = DP + SMEM_PAD;
    constexpr int PER_ROW = DP / CH;
    for (int c = threadIdx.x; c < ROWS * PER_ROW; c += THREADS) {
        const int r = c / PER_ROW, col = (c % PER_ROW) * CH;
        const bool ok = r < valid && col < D;
        // An invalid copy reads nothing, but its address stays inside the allocation
        // (valid >= 1: g is a real row).
        const bf16_t* src = ok ? g + static_cast<long long>(r) * stride + col : g;
        cp_async<CH * 2>(sdst + r * LD + col, src, ok);
    }
}

template <int BM, int DP, int DVP, int CH>
__device__ __forceinline__ void flash_attention_bf16(
        const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
        const bf16_t* __restrict__ v, bf16_t* __restrict__ out, float* __restrict__ part_o,
        float* __restrict__ part_lse, const int* __restrict__ tiles, int n_tiles, int heads,
        int kv_heads, int D, int Dv, float scale_log2) {
    constexpr int THREADS = BM / 16 * 32;   // one warp per 16 query rows
    constexpr int LD = DP + SMEM_PAD;
    constexpr int LDV = DVP + SMEM_PAD;
    constexpr int KSTEPS = DP / 16;       // k16 steps of S = Q K^T over the head dim
    constexpr int NTILES = BLOCK_N / 8;   // n8 tiles of S over a key block
    constexpr int DTILES = DVP / 8;       // n8 tiles of O over the value width
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16_t* sQ = reinterpret_cast<bf16_t*>(smem_raw);   // [BM][LD]
    bf16_t* sK = sQ + BM * LD;                          // [2][BN][LD]
    bf16_t* sV = sK + 2 * BLOCK_N * LD;                 // [2][BN][LDV]

    const CtaWork work(blockIdx.x, n_tiles, heads, kv_heads);
    const int head = work.head;
    const Tile t(tiles + static_cast<long long>(work.tile) * TILE_FIELDS);
    // Row strides in elements: q and out rows hold every query head, k and v rows the K/V
    // heads only. Row offsets are 64-bit: a KV cache of 128 x 16k rows x 4096 exceeds
    // 2^31 elements.
    const int stride = heads * D, kv_stride = kv_heads * D;
    const int out_stride = heads * Dv, v_stride = kv_heads * Dv;
    // Key 0 of the tile's sequence, this CTA's K/V head.
    const bf16_t* k_seq = k + static_cast<long long>(t.k_row0) * kv_stride + work.kv_head * D;
    const bf16_t* v_seq = v + static_cast<long long>(t.k_row0) * v_stride + work.kv_head * Dv;
    const int key_end = t.key_end();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int quad = lane >> 2, quad_lane = lane & 3;   // the MMA fragment's row and column pair
    const int warp_row0 = warp * 16;
    // Warps whose 16 rows are all past the tile (decode: 1 query in a 64-row tile) skip the
    // math but still load and reach every barrier.
    const bool warp_active = warp_row0 < t.n_rows;

    auto load_kv = [&](int kb, int buf) {
        const int first = kb * BLOCK_N;
        const int valid = min(BLOCK_N, key_end - first);
        load_tile_async<DP, CH, BLOCK_N, THREADS>(
            sK + buf * BLOCK_N * LD, k_seq + static_cast<long long>(first) * kv_stride, valid,
            kv_stride, D);
        load_tile_async<DVP, CH, BLOCK_N, THREADS>(
            sV + buf * BLOCK_N * LDV, v_seq + static_cast<long long>(first) * v_stride, valid,
            v_stride, Dv);
    };
    load_tile_async<DP, CH, BM, THREADS>(
        sQ, q + static_cast<long long>(t.q_row0) * stride + head * D, t.n_rows, stride, D);
    if (t.kb_begin < t.kb_end) load_kv(t.kb_begin, 0);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    // Q stays in registers as MMA A fragments for the whole key loop: [KSTEPS][4].
    unsigned q_frag[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
        ldmatrix_x4(q_frag[kk], sQ + (warp_row0 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);

    float o[DTILES][4];                  // O accumulator, rows quad and quad + 8
#pragma unroll
    for (int dt = 0; dt < DTILES; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float row_max[2] = {NEG_INF, NEG_INF};   // running max of scaled scores (base 2)
    float row_sum[2] = {0.f, 0.f};               // this lane's part of the running sum

    for (int kb = t.kb_begin; kb < t.kb_end; ++kb) {
        const int buf = (kb - t.kb_begin) & 1;
        // The other buffer was last read in the previous iteration, which every warp left
        // through the barrier at its end: safe to refill while this block is computed.
        if (kb + 1 < t.kb_end) load_kv(kb + 1, buf ^ 1);
        cp_async_commit();
        const bf16_t* sKb = sK + buf * BLOCK_N * LD;
        const bf16_t* sVb = sV + buf * BLOCK_N * LDV;

        const int key0 = kb * BLOCK_N;
        // A block wholly past the causal bound of this warp's last row adds nothing to its
        // rows (on a 128-row tile's diagonal, the first warps meet such blocks): skipped
        // exactly, since the running max and sum would not change.
        if (warp_active && key0 <= t.diag + warp_row0 + 15) {
            // S = Q K^T for this warp's 16 rows x BN keys: [NTILES][4] float.
            float s[NTILES][4];
#pragma unroll
            for (int nt = 0; nt < NTILES; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
                for (int np = 0; np < NTILES / 2; ++np) {
                    // K rows are keys: a non-transposed ldmatrix gives the "col" B fragment.
                    unsigned b[4];
                    ldmatrix_x4(b, sKb + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD
                                       + kk * 16 + ((lane >> 3) & 1) * 8);
                    mma_bf16_16816(s[2 * np], q_frag[kk], b[0], b[1]);
                    mma_bf16_16816(s[2 * np + 1], q_frag[kk], b[2], b[3]);
                }
            }

            // Scale into base-2 units and apply the causal mask where the block crosses
            // this warp's diagonal (also hides zero-filled keys past key_end).
            const bool needs_mask = key0 + BLOCK_N - 1 > t.diag + warp_row0;
#pragma unroll
            for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = key0 + nt * 8 + quad_lane * 2 + (e & 1);
                    const int row = warp_row0 + quad + (e >> 1) * 8;
                    const float x = s[nt][e] * scale_log2;
                    s[nt][e] = (needs_mask && key > t.diag + row) ? NEG_INF : x;
                }
            }

            // Online softmax, per row half h (rows quad and quad + 8).
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float block_max = NEG_INF;
#pragma unroll
                for (int nt = 0; nt < NTILES; ++nt)
                    block_max = fmaxf(block_max, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
                const float new_max = fmaxf(row_max[h], warp_quad_max(block_max));
                // A row that has seen only masked keys keeps max -inf: subtract 0 instead so
                // exp2 gives 0, not NaN from -inf - -inf.
                const float shift = new_max == NEG_INF ? 0.f : new_max;
                const float rescale = exp2f(row_max[h] - shift);
                row_max[h] = new_max;
                float block_sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NTILES; ++nt) {
                    s[nt][2 * h] = exp2f(s[nt][2 * h] - shift);
                    s[nt][2 * h + 1] = exp2f(s[nt][2 * h + 1] - shift);
                    block_sum += s[nt][2 * h] + s[nt][2 * h + 1];
                }
                row_sum[h] = row_sum[h] * rescale + block_sum;
#pragma unroll
                for (int dt = 0; dt < DTILES; ++dt) {
                    o[dt][2 * h] *= rescale;
                    o[dt][2 * h + 1] *= rescale;
                }
            }

            // O += P V. The S accumulator layout of two adjacent n8 tiles is the A fragment
            // of one k16 step, so P goes to the tensor cores straight from registers.
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
                const unsigned p[4] = {
                    pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                    pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                    pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                    pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < DVP / 16; ++dp) {
                    // V rows are keys: the transposed ldmatrix gives the "col" B fragment.
                    unsigned b[4];
                    ldmatrix_x4_trans(b, sVb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8)
                                                   * LDV + dp * 16 + (lane >> 4) * 8);
                    mma_bf16_16816(o[2 * dp], p, b[0], b[1]);
                    mma_bf16_16816(o[2 * dp + 1], p, b[2], b[3]);
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float sum = warp_quad_sum(row_sum[h]);
        const int row = warp_row0 + quad + h * 8;
        if (row >= t.n_rows) continue;
        if (t.slot < 0) {
            const float inv = 1.f / sum;   // > 0: key 0 is visible to every row
            bf16_t* dst = out + (t.q_row0 + static_cast<long long>(row)) * out_stride
                          + head * Dv;
#pragma unroll
            for (int dt = 0; dt < DTILES; ++dt) {
                const int col = dt * 8 + quad_lane * 2;   // even, and Dv is even
                if (col < Dv)
                    *reinterpret_cast<unsigned*>(dst + col) =
                        pack_bf16x2(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
            }
        } else {
            const long long prow = partial_row(t.slot, heads, head, BM, row);
            const float inv = sum > 0.f ? 1.f / sum : 0.f;   // a split may see no key of a row
            float* dst = part_o + prow * Dv;
#pragma unroll
            for (int dt = 0; dt < DTILES; ++dt) {
                const int col = dt * 8 + quad_lane * 2;
                if (col < Dv)
                    *reinterpret_cast<float2*>(dst + col) =
                        make_float2(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
            }
            if (quad_lane == 0) part_lse[prow] = sum > 0.f ? row_max[h] + log2f(sum) : NEG_INF;
        }
    }
}

// ---------------------------------------------------------------------------------------
// float32 kernel: same tiles, one thread per query row, FMA only.

template <int DP, int DVP>
__device__ __forceinline__ void flash_attention_f32(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        float* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_lse,
        const int* __restrict__ tiles, int n_tiles, int heads, int kv_heads, int D, int Dv,
        float scale_log2) {
    constexpr int LDQ = DP + 1;   // odd stride: thread r reads row r without bank conflicts
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sQ = reinterpret_cast<float*>(smem_raw);   // [BM][LDQ]
    float* sK = sQ + BLOCK_M * LDQ;                   // [BN][DP] (every thread reads the same key)
    float* sV = sK + BLOCK_N * DP;                    // [BN][DVP]

    const CtaWork work(blockIdx.x, n_tiles, heads, kv_heads);
    const int head = work.head;
    const Tile t(tiles + static_cast<long long>(work.tile) * TILE_FIELDS);
    const int stride = heads * D, kv_stride = kv_heads * D;   // as in the bf16 kernel
    const int out_stride = heads * Dv, v_stride = kv_heads * Dv;
    const float* q_tile = q + static_cast<long long>(t.q_row0) * stride + head * D;
    const float* k_seq = k + static_cast<long long>(t.k_row0) * kv_stride + work.kv_head * D;
    const float* v_seq = v + static_cast<long long>(t.k_row0) * v_stride + work.kv_head * Dv;
    const int key_end = t.key_end();
    const int row = threadIdx.x;

    for (int i = threadIdx.x; i < BLOCK_M * D; i += F32_THREADS) {
        const int r = i / D, c = i % D;
        sQ[r * LDQ + c] = r < t.n_rows ? q_tile[static_cast<long long>(r) * stride + c] : 0.f;
    }
    float o[DVP];
#pragma unroll
    for (int c = 0; c < DVP; ++c) o[c] = 0.f;
    float row_max = NEG_INF, row_sum = 0.f;

    for (int kb = t.kb_begin; kb < t.kb_end; ++kb) {
        const int first = kb * BLOCK_N;
        __syncthreads();   // the previous block is no longer read
        for (int i = threadIdx.x; i < BLOCK_N * D; i += F32_THREADS) {
            const int j = i / D, c = i % D;
            const bool ok = first + j < key_end;
            sK[j * DP + c] = ok ? k_seq[static_cast<long long>(first + j) * kv_stride + c] : 0.f;
        }
        for (int i = threadIdx.x; i < BLOCK_N * Dv; i += F32_THREADS) {
            const int j = i / Dv, c = i % Dv;
            const bool ok = first + j < key_end;
            sV[j * DVP + c] = ok ? v_seq[static_cast<long long>(first + j) * v_stride + c] : 0.f;
        }
        __syncthreads();
        if (row >= t.n_rows) continue;
        const int n_keys = min(BLOCK_N, t.diag + row + 1 - first);   // causal bound of this row
        for (int j = 0; j < n_keys; ++j) {
            float dot = 0.f;
#pragma unroll
            for (int c = 0; c < DP; ++c)
                if (c < D) dot = fmaf(sQ[row * LDQ + c], sK[j * DP + c], dot);
            const float x = dot * scale_log2;
            if (x > row_max) {   // rescale only when the running max grows
                const float rescale = exp2f(row_max - x);
                row_sum *= rescale;
#pragma unroll
                for (int c = 0; c < DVP; ++c) o[c] *= rescale;
                row_max = x;
            }
            const float p = exp2f(x - row_max);
            row_sum += p;
#pragma unroll
            for (int c = 0; c < DVP; ++c)
                if (c < Dv) o[c] = fmaf(p, sV[j * DVP + c], o[c]);
        }
    }
    if (row >= t.n_rows) return;
    if (t.slot < 0) {
        const float inv = 1.f / row_sum;
        float* dst = out + (t.q_row0 + static_cast<long long>(row)) * out_stride + head * Dv;
#pragma unroll
        for (int c = 0; c < DVP; ++c)
            if (c < Dv) dst[c] = o[c] * inv;
    } else {
        const long long prow = partial_row(t.slot, heads, head, BLOCK_M, row);
        const float inv = row_sum > 0.f ? 1.f / row_sum : 0.f;
#pragma unroll
        for (int c = 0; c < DVP; ++c)
            if (c < Dv) part_o[prow * Dv + c] = o[c] * inv;
        part_lse[prow] = row_sum > 0.f ? row_max + log2f(row_sum) : NEG_INF;
    }
}

// ---------------------------------------------------------------------------------------
// Merge the splits of a tile: out = sum_s 2^lse_s O_s / sum_s 2^lse_s, per (row, head).
// block_m: the tile height of the kernel that wrote the partials.

template <typename Store>
__device__ __forceinline__ void attention_combine(const float* __restrict__ part_o,
                                                  const float* __restrict__ part_lse,
                                                  const int* __restrict__ combine, int heads,
                                                  int D, int block_m, Store store) {
    const int group = blockIdx.x / heads, head = blockIdx.x % heads;
    const int* c = combine + static_cast<long long>(group) * COMBINE_FIELDS;
    const int q_row0 = c[0], n_rows = c[1], slot0 = c[2], n_splits = c[3];
    const long long stride = static_cast<long long>(heads) * D;
    for (int i = threadIdx.x; i < n_rows * D; i += COMBINE_THREADS) {
        const int row = i / D, col = i % D;
        float top = NEG_INF;
        for (int s = 0; s < n_splits; ++s)
            top = fmaxf(top, part_lse[partial_row(slot0 + s, heads, head, block_m, row)]);
        float num = 0.f, den = 0.f;
        for (int s = 0; s < n_splits; ++s) {
            const long long prow = partial_row(slot0 + s, heads, head, block_m, row);
            const float lse = part_lse[prow];
            const float w = lse == NEG_INF ? 0.f : exp2f(lse - top);
            num = fmaf(w, part_o[prow * D + col], num);
            den += w;
        }
        const long long at = (q_row0 + static_cast<long long>(row)) * stride
                             + static_cast<long long>(head) * D + col;
        store(at, num / den);
    }
}

// ---------------------------------------------------------------------------------------
// Entry points (extern "C": fixed names for RawModule.get_function and the tests).

// bf16: BM = 64 keeps __launch_bounds__(128) (its ~170 registers fit two CTAs per SM);
// BM = 128 asks for one CTA per SM of 256 threads, so ptxas may use up to 255 registers.
// The 128-row tiles come with 16-byte copies only: 4-byte copies (odd head dims, unaligned
// bases) are not the long-prefill case, and each instantiation costs NVRTC seconds.
#define BOUNDS_M64 __launch_bounds__(128)
#define BOUNDS_M128 __launch_bounds__(256, 1)
#define FLASH_BF16(BM, BOUNDS, DP, DVP, CH, NAME)                                             \
    extern "C" __global__ void BOUNDS NAME(                                                   \
            const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, float* part_o,    \
            float* part_lse, const int* tiles, int n_tiles, int heads, int kv_heads, int D,   \
            int Dv, float scale_log2) {                                                       \
        flash_attention_bf16<BM, DP, DVP, CH>(q, k, v, out, part_o, part_lse, tiles, n_tiles, \
                                              heads, kv_heads, D, Dv, scale_log2);            \
    }
FLASH_BF16(BLOCK_M, BOUNDS_M64, 16, 16, 8, flash_attention_bf16_m64_d16_v16)
FLASH_BF16(BLOCK_M, BOUNDS_M64, 32, 32, 8, flash_attention_bf16_m64_d32_v16)
FLASH_BF16(BLOCK_M, BOUNDS_M64, 64, 64, 8, flash_attention_bf16_m64_d64_v16)
FLASH_BF16(BLOCK_M, BOUNDS_M64, 128, 128, 8, flash_attention_bf16_m64_d128_v16)
FLASH_BF16(BLOCK_M, BOUNDS_M64, 16, 16, 2, flash_attention_bf16_m64_d16_v4)
FLASH_BF16(BLOCK_M, BOUNDS_M64, 32, 32, 2, flash_attention_bf16_m64_d32_v4)
FLASH_BF16(BLOCK_M, BOUNDS_M64, 64, 64, 2, flash_attention_bf16_m64_d64_v4)
FLASH_BF16(BLOCK_M, BOUNDS_M64, 128, 128, 2, flash_attention_bf16_m64_d128_v4)
FLASH_BF16(BLOCK_M_LONG, BOUNDS_M128, 16, 16, 8, flash_attention_bf16_m128_d16_v16)
FLASH_BF16(BLOCK_M_LONG, BOUNDS_M128, 32, 32, 8, flash_attention_bf16_m128_d32_v16)
FLASH_BF16(BLOCK_M_LONG, BOUNDS_M128, 64, 64, 8, flash_attention_bf16_m128_d64_v16)
FLASH_BF16(BLOCK_M_LONG, BOUNDS_M128, 128, 128, 8, flash_attention_bf16_m128_d128_v16)
// MLA's prefill (DeepSeek-V3, Kimi K2): queries and keys of 128 + 64, values of 128.
FLASH_BF16(BLOCK_M, BOUNDS_M64, 192, 128, 8, flash_attention_bf16_m64_d192v128_v16)
FLASH_BF16(BLOCK_M, BOUNDS_M64, 192, 128, 2, flash_attention_bf16_m64_d192v128_v4)
FLASH_BF16(BLOCK_M_LONG, BOUNDS_M128, 192, 128, 8, flash_attention_bf16_m128_d192v128_v16)

#define FLASH_F32(DP, DVP, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(F32_THREADS) NAME(                           \
            const float* q, const float* k, const float* v, float* out, float* part_o,        \
            float* part_lse, const int* tiles, int n_tiles, int heads, int kv_heads, int D,   \
            int Dv, float scale_log2) {                                                       \
        flash_attention_f32<DP, DVP>(q, k, v, out, part_o, part_lse, tiles, n_tiles, heads,   \
                                     kv_heads, D, Dv, scale_log2);                            \
    }
FLASH_F32(16, 16, flash_attention_f32_d16)
FLASH_F32(32, 32, flash_attention_f32_d32)
FLASH_F32(64, 64, flash_attention_f32_d64)
FLASH_F32(128, 128, flash_attention_f32_d128)
FLASH_F32(192, 128, flash_attention_f32_d192v128)

extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) attention_combine_bf16(
        const float* part_o, const float* part_lse, const int* combine, bf16_t* out, int heads,
        int D, int block_m) {
    attention_combine(part_o, part_lse, combine, heads, D, block_m,
                      [=](long long at, float x) { out[at] = float_to_bf16(x); });
}

extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) attention_combine_f32(
        const float* part_o, const float* part_lse, const int* combine, float* out, int heads,
        int D, int block_m) {
    attention_combine(part_o, part_lse, combine, heads, D, block_m,
                      [=](long long at, float x) { out[at] = x; });
}
