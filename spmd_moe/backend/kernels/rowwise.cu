// Row-wise kernels of a layer's dense half: what the generic array code does in 5-30 small
// array operations per call, in one launch each (the "launch diet": at paper shapes a
// chunk's GPU work per operation is comparable to a launch from Python).
//
// rms_norm:      out[r] = round(x[r] * 1/sqrt(mean(x[r]^2) + eps) * g)     x [n, d] -> [n, d]
// add_rms_norm:  h[r] = round(x[r] + y[r]); out[r] = rms_norm(h[r])       (the residual add
//                feeding the MoE norm; h rounded before its squares, as the generic code)
// residual_add:  out = round(h + moe), moe float32: the layer's last residual add.
// qk_norm_rope:  q [T, h, D] and k [T, hk, D] in place, grid.y = 0 (q) / 1 (k): the family's
//                q/k RMSNorm (QK_NONE; QK_HEAD: per head over D, gain [D]; QK_FULL: over the
//                row h*D, gain [h*D]; QK_SUMMED: over the row, its square sum given, from
//                the TP allreduce), rounded to the storage dtype, then RoPE at positions
//                int32 [T] with frequencies inv_freq float64 [D/2] (default or YaRN), cos and
//                sin times cs_scale (YaRN's attention factor), in float64 as
//                model.rope_tables (no tables are built per pass), of column pairs
//                (j, j + D/2) (rotate-half) or (2j, 2j + 1) (interleave), rounded again.
// bias_add:      out = round(y + bias[col]): y float32 [n, w] (a GEMM's accumulator), bias
//                float32 [w]; out in the storage dtype or float32 (may be y itself).
// router_topk:   logits float32 [T, E] -> experts int32 [T, k], weights float32 [T, k]:
//                softmax, k rounds of argmax (ties to the lower expert), renormalised.
// expert_order:  experts int32 [R] (R = T*k pairs) -> counts int64 [E] and order int64 [R],
//                the pairs stably sorted by expert (what dispatcher.dispatch_preprocess
//                gets from argsort + bincount): block e writes expert e's run.
//
// Arithmetic follows the generic NumPy code operation by operation in float32 with
// separately rounded products and sums (__fmul_rn/__fadd_rn: no FMA contraction),
// correctly rounded division and square root; sums are tree sums (the generic code's are
// pairwise), so results agree to float32 rounding of a sum, not bit for bit.
#include "bf16.cuh"

#define ROW_THREADS 256
#define ROUTER_THREADS 128
#define ORDER_THREADS 256
#define MAX_EXPERTS_PER_LANE 8
#define MAX_HEADS 256
#define MAX_HEAD_DIM 512
#define NEG_INF __int_as_float(0xff800000)

#define QK_NONE 0
#define QK_HEAD 1
#define QK_FULL 2
#define QK_SUMMED 3

// x rounded to the storage dtype and back: what bk.store followed by astype(float32) gives.
__device__ __forceinline__ float rounded(const float*, float x) { return x; }
__device__ __forceinline__ float rounded(const bf16_t*, float x) {
    return bf16_to_float(float_to_bf16(x));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// The sum of v over the block (blockDim.x a multiple of 32, <= 1024), on every thread; a
// fixed tree, so the same inputs give the same bits. `scratch`: 33 floats of shared memory.
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? scratch[lane] : 0.0f;
        w = warp_sum(w);
        if (lane == 0) scratch[32] = w;
    }
    __syncthreads();
    const float total = scratch[32];
    __syncthreads();   // scratch is reused by the next call
    return total;
}

// The integer sum of v over the block, on every thread. `scratch`: 33 long longs.
__device__ long long block_count(long long v, long long* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        long long total = 0;
        for (int w = 0; w < warps; ++w) total += scratch[w];
        scratch[32] = total;
    }
    __syncthreads();
    const long long total = scratch[32];
    __syncthreads();
    return total;
}

// 1/sqrt(sum/width + eps), as the generic code rounds it.
__device__ __forceinline__ float inv_rms(float sum, float width, float eps) {
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(sum, width), eps)));
}

// --- RMSNorm --------------------------------------------------------------------------

template <typename T, bool ADD>
__device__ void rms_norm_rows(const T* __restrict__ x, const T* __restrict__ y,
                              const T* __restrict__ gain, T* __restrict__ h,
                              T* __restrict__ out, long long n_rows, int d, float eps) {
    __shared__ float scratch[33];
    for (long long r = blockIdx.x; r < n_rows; r += gridDim.x) {
        const long long base = r * d;
        float part = 0.0f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float v = load_f(x, base + c);
            if (ADD) {
                v = rounded(x, __fadd_rn(v, load_f(y, base + c)));
                store_f(h, base + c, v);
            }
            part = __fadd_rn(part, __fmul_rn(v, v));
        }
        const float inv = inv_rms(block_sum(part, scratch), static_cast<float>(d), eps);
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            // Recomputed rather than read back from h: the same bits, no read-after-write.
            float v = load_f(x, base + c);
            if (ADD) v = rounded(x, __fadd_rn(v, load_f(y, base + c)));
            store_f(out, base + c, __fmul_rn(__fmul_rn(v, inv), load_f(gain, c)));
        }
    }
}

#define RMS_NORM(T, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                 \
    NAME(const T* x, const T* gain, T* out, long long n_rows, int d, float eps) {             \
        rms_norm_rows<T, false>(x, nullptr, gain, nullptr, out, n_rows, d, eps);              \
    }
RMS_NORM(bf16_t, rms_norm_bf16)
RMS_NORM(float, rms_norm_f32)

#define ADD_RMS_NORM(T, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                 \
    NAME(const T* x, const T* y, const T* gain, T* h, T* out, long long n_rows, int d,        \
         float eps) {                                                                         \
        rms_norm_rows<T, true>(x, y, gain, h, out, n_rows, d, eps);                           \
    }
ADD_RMS_NORM(bf16_t, add_rms_norm_bf16)
ADD_RMS_NORM(float, add_rms_norm_f32)

// --- the MoE residual -------------------------------------------------------------------

// out = round(h + moe): h [n] storage dtype, moe float32 [n] (the weighted combine).
#define RESIDUAL_ADD(T, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                 \
    NAME(const T* __restrict__ h, const float* __restrict__ moe, T* __restrict__ out,         \
         long long n) {                                                                       \
        const long long step = static_cast<long long>(gridDim.x) * blockDim.x;                \
        for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;     \
             i < n; i += step)                                                                \
            store_f(out, i, __fadd_rn(load_f(h, i), moe[i]));                                 \
    }
RESIDUAL_ADD(bf16_t, residual_add_bf16)
RESIDUAL_ADD(float, residual_add_f32)

// --- q/k norm and RoPE ----------------------------------------------------------------

template <typename T, int KIND>
__device__ void qk_norm_rope(T* q, T* k, const T* __restrict__ q_gain,
                             const T* __restrict__ k_gain, const int* __restrict__ positions,
                             const float* __restrict__ sums, long long n_rows, int q_heads,
                             int kv_heads, int head_dim, float q_width, float kv_width,
                             float eps, const double* __restrict__ inv_freq, double cs_scale,
                             int interleave) {
    __shared__ float scratch[33];
    __shared__ float inv_of[MAX_HEADS];
    __shared__ float cos_of[MAX_HEAD_DIM / 2], sin_of[MAX_HEAD_DIM / 2];
    const bool is_k = blockIdx.y == 1;
    T* u = is_k ? k : q;
    const T* gain = is_k ? k_gain : q_gain;
    const int heads = is_k ? kv_heads : q_heads;
    const int width = heads * head_dim, half = head_dim / 2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (long long r = blockIdx.x; r < n_rows; r += gridDim.x) {
        const long long base = r * width;
        // model.rope_tables' angles in float64 (float32 would lose ~1e-3 rad at 10^4
        // positions), cos and sin rounded to float32: once per row, shared by its heads.
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            double sd, cd;
            sincos(static_cast<double>(positions[r]) * inv_freq[j], &sd, &cd);
            cos_of[j] = static_cast<float>(cd * cs_scale);
            sin_of[j] = static_cast<float>(sd * cs_scale);
        }
        float inv = 1.0f;
        if (KIND == QK_FULL) {
            float part = 0.0f;
            for (int c = threadIdx.x; c < width; c += blockDim.x) {
                const float v = load_f(u, base + c);
                part = __fadd_rn(part, __fmul_rn(v, v));
            }
            inv = inv_rms(block_sum(part, scratch), static_cast<float>(width), eps);
        } else if (KIND == QK_SUMMED) {
            inv = inv_rms(sums[r * 2 + (is_k ? 1 : 0)], is_k ? kv_width : q_width, eps);
        } else if (KIND == QK_HEAD) {
            for (int hh = warp; hh < heads; hh += warps) {
                float part = 0.0f;
                for (int c = lane; c < head_dim; c += 32) {
                    const float v = load_f(u, base + hh * head_dim + c);
                    part = __fadd_rn(part, __fmul_rn(v, v));
                }
                part = warp_sum(part);
                if (lane == 0) inv_of[hh] = inv_rms(part, static_cast<float>(head_dim), eps);
            }
        }
        __syncthreads();   // inv_of, cos_of, sin_of written
        // Each thread owns pairs (a, b) of a head, (j, j + half) or (2j, 2j + 1): it reads
        // both before writing.
        for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
            const int hh = p / half, j = p - hh * half;
            const int a = hh * head_dim + (interleave ? 2 * j : j);
            const int b = interleave ? a + 1 : a + half;
            float ua = load_f(u, base + a), ub = load_f(u, base + b);
            if (KIND != QK_NONE) {
                const float s = KIND == QK_HEAD ? inv_of[hh] : inv;
                const int ga = KIND == QK_HEAD ? a - hh * head_dim : a;
                const int gb = KIND == QK_HEAD ? b - hh * head_dim : b;
                ua = rounded(u, __fmul_rn(__fmul_rn(ua, s), load_f(gain, ga)));
                ub = rounded(u, __fmul_rn(__fmul_rn(ub, s), load_f(gain, gb)));
            }
            const float c = cos_of[j], sn = sin_of[j];   // both columns of the pair share it
            store_f(u, base + a, __fadd_rn(__fmul_rn(ua, c), __fmul_rn(-ub, sn)));
            store_f(u, base + b, __fadd_rn(__fmul_rn(ub, c), __fmul_rn(ua, sn)));
        }
        __syncthreads();   // the next row rewrites them
    }
}

#define QK_NORM_ROPE(T, KIND, NAME)                                                           \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                 \
    NAME(T* q, T* k, const T* q_gain, const T* k_gain, const int* positions,                  \
         const float* sums, long long n_rows, int q_heads, int kv_heads, int head_dim,        \
         float q_width, float kv_width, float eps, const double* inv_freq, double cs_scale,   \
         int interleave) {                                                                    \
        qk_norm_rope<T, KIND>(q, k, q_gain, k_gain, positions, sums, n_rows, q_heads,         \
                              kv_heads, head_dim, q_width, kv_width, eps, inv_freq, cs_scale, \
                              interleave);                                                    \
    }
QK_NORM_ROPE(bf16_t, QK_NONE, rope_none_bf16)
QK_NORM_ROPE(bf16_t, QK_HEAD, rope_head_bf16)
QK_NORM_ROPE(bf16_t, QK_FULL, rope_full_bf16)
QK_NORM_ROPE(bf16_t, QK_SUMMED, rope_summed_bf16)
QK_NORM_ROPE(float, QK_NONE, rope_none_f32)
QK_NORM_ROPE(float, QK_HEAD, rope_head_f32)
QK_NORM_ROPE(float, QK_FULL, rope_full_f32)
QK_NORM_ROPE(float, QK_SUMMED, rope_summed_f32)

// --- projection biases -----------------------------------------------------------------

// out[r, c] = round(y[r, c] + bias[c]): the bias added to a GEMM's float32 accumulator,
// rounded once (out may alias y for float32).
#define BIAS_ADD(T, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                 \
    NAME(const float* y, const float* __restrict__ bias, T* out, long long n, int width) {    \
        const long long step = static_cast<long long>(gridDim.x) * blockDim.x;                \
        for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;     \
             i < n; i += step)                                                                \
            store_f(out, i, __fadd_rn(y[i], bias[i % width]));                                \
    }
BIAS_ADD(bf16_t, bias_add_bf16)
BIAS_ADD(float, bias_add_f32)

// --- router ---------------------------------------------------------------------------

// One warp per token: lane l holds experts l, l + 32, ... (at most MAX_EXPERTS_PER_LANE).
extern "C" __global__ void __launch_bounds__(ROUTER_THREADS)
router_topk(const float* __restrict__ logits, int* __restrict__ experts,
            float* __restrict__ weights, long long n_rows, int n_experts, int top_k,
            int renormalize) {
    const int lane = threadIdx.x & 31;
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x >> 5);
    for (long long t = static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) +
                       (threadIdx.x >> 5);
         t < n_rows; t += warps) {
        const float* row = logits + t * n_experts;
        float p[MAX_EXPERTS_PER_LANE];
        float best = NEG_INF;
#pragma unroll
        for (int s = 0; s < MAX_EXPERTS_PER_LANE; ++s) {
            const int e = s * 32 + lane;
            p[s] = e < n_experts ? row[e] : NEG_INF;
            best = fmaxf(best, p[s]);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
            best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, offset));
        float sum = 0.0f;
#pragma unroll
        for (int s = 0; s < MAX_EXPERTS_PER_LANE; ++s) {
            p[s] = s * 32 + lane < n_experts ? expf(__fadd_rn(p[s], -best)) : 0.0f;
            sum = __fadd_rn(sum, p[s]);
        }
        sum = warp_sum(sum);
        // No finite maximum (a NaN, +inf, or every logit -inf): no softmax. The token goes
        // to the sentinel expert n_experts with weight 0; expert_order counts it in its
        // last bin and the host refuses the layer before any row moves (router.py).
        bool has_nan = false;
#pragma unroll
        for (int s = 0; s < MAX_EXPERTS_PER_LANE; ++s)
            has_nan |= s * 32 + lane < n_experts && isnan(row[s * 32 + lane]);
        if (__any_sync(0xffffffffu, has_nan) || !isfinite(best)) {
            if (lane == 0)
                for (int j = 0; j < top_k; ++j) {
                    experts[t * top_k + j] = n_experts;
                    weights[t * top_k + j] = 0.0f;
                }
            continue;
        }
        float removed[MAX_EXPERTS_PER_LANE];
#pragma unroll
        for (int s = 0; s < MAX_EXPERTS_PER_LANE; ++s) {
            p[s] = __fdiv_rn(p[s], sum);
            removed[s] = s * 32 + lane < n_experts ? p[s] : NEG_INF;
        }
        float chosen_sum = 0.0f;
        for (int j = 0; j < top_k; ++j) {
            // This lane's first maximum, then the warp's: larger value, else lower expert.
            float v = NEG_INF;
            int e = 0x7fffffff;
#pragma unroll
            for (int s = 0; s < MAX_EXPERTS_PER_LANE; ++s)
                if (removed[s] > v) { v = removed[s]; e = s * 32 + lane; }
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
                const int oe = __shfl_xor_sync(0xffffffffu, e, offset);
                if (ov > v || (ov == v && oe < e)) { v = ov; e = oe; }
            }
            if ((e & 31) == lane) {
#pragma unroll
                for (int s = 0; s < MAX_EXPERTS_PER_LANE; ++s)
                    if (s * 32 + lane == e) removed[s] = NEG_INF;
            }
            chosen_sum = __fadd_rn(chosen_sum, v);   // in order j = 0..k-1
            if (lane == 0) {
                experts[t * top_k + j] = e;
                weights[t * top_k + j] = v;
            }
        }
        if (renormalize && lane == 0)
            for (int j = 0; j < top_k; ++j)
                weights[t * top_k + j] = __fdiv_rn(weights[t * top_k + j], chosen_sum);
    }
}

// --- expert order ---------------------------------------------------------------------

// Block e: the pairs routed to expert e, in pair order, at rows offset(e) = (pairs routed
// to experts < e) onwards of `order`, and counts[e]. Two passes over the R pairs. Launched
// with one block more than there are experts: the last places (and counts) the router's
// sentinel pairs, so that every row of `order` is written.
extern "C" __global__ void __launch_bounds__(ORDER_THREADS)
expert_order(const int* __restrict__ experts, long long* __restrict__ order,
             long long* __restrict__ counts, long long n_pairs, int n_experts) {
    __shared__ long long counters[33];
    __shared__ int warp_hits[32];
    __shared__ long long next;
    const int e = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    long long below = 0, mine = 0;
    for (long long i = threadIdx.x; i < n_pairs; i += blockDim.x) {
        const int x = experts[i];
        below += x < e;
        mine += x == e;
    }
    const long long offset = block_count(below, counters);
    const long long total = block_count(mine, counters);
    if (threadIdx.x == 0) {
        counts[e] = total;
        next = offset;
    }
    __syncthreads();
    for (long long start = 0; start < n_pairs; start += blockDim.x) {
        const long long i = start + threadIdx.x;
        const bool hit = i < n_pairs && experts[i] == e;
        const unsigned ballot = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) warp_hits[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, all = 0;
        for (int w = 0; w < warps; ++w) {
            before += w < warp ? warp_hits[w] : 0;
            all += warp_hits[w];
        }
        if (hit) order[next + before + __popc(ballot & ((1u << lane) - 1u))] = i;
        __syncthreads();
        if (threadIdx.x == 0) next += all;
        __syncthreads();
    }
}
