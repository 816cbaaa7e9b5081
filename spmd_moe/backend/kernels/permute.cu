// The token permutation around dispatch and combine (dispatcher.py).
//
// gather_rows:        out[i] = x[order[i] / top_k]        x [T, d], order [R] -> out [R, d]
//     the send rows, grouped by expert (order = stable sort of the (token, slot) pairs by
//     expert, slot-major within a token: pair p = t*k + j).
// inverse_permutation: inverse[order[i]] = i              order [R] -> inverse int32 [R]
// unpermute_weighted: out[t] = sum_j weights[t, j] * rows[inverse[t*k + j]]
//     rows [R, d] (storage dtype) in send order, weights float32 [T, k] -> float32 [T, d],
//     summed j = 0..k-1 with separately rounded float32 products and sums (no FMA
//     contraction), bit for bit the NumPy path's `moe = w0*u0; moe += w_j*u_j`.
//
// Both row kernels copy rows in 16-byte vectors when the row length and the base pointers
// allow it (the host picks the variant, schedule.row_vector_bytes), else 4 or 2 bytes.
// Blocks are 2-D: threadIdx.x walks the vectors of a row, threadIdx.y picks one of
// blockDim.y rows, so short rows (d = 32) still fill a block.
#include "bf16.cuh"

__device__ __forceinline__ long long first_row() {
    return static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
}
__device__ __forceinline__ long long row_step() {
    return static_cast<long long>(gridDim.x) * blockDim.y;
}

template <typename Vec>
__device__ __forceinline__ void gather_rows(const Vec* __restrict__ x,
                                            const long long* __restrict__ order,
                                            Vec* __restrict__ out, long long n_rows,
                                            int row_vecs, int top_k) {
    for (long long r = first_row(); r < n_rows; r += row_step()) {
        const long long src = order[r] / top_k;
        for (int c = threadIdx.x; c < row_vecs; c += blockDim.x)
            out[r * row_vecs + c] = x[src * row_vecs + c];
    }
}

#define GATHER(VEC, NAME)                                                                     \
    extern "C" __global__ void NAME(const VEC* x, const long long* order, VEC* out,           \
                                    long long n_rows, int row_vecs, int top_k) {              \
        gather_rows<VEC>(x, order, out, n_rows, row_vecs, top_k);                             \
    }
GATHER(uint4, gather_rows_v16)
GATHER(unsigned, gather_rows_v4)
GATHER(unsigned short, gather_rows_v2)

extern "C" __global__ void inverse_permutation(const long long* __restrict__ order,
                                               int* __restrict__ inverse, long long n) {
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += step)
        inverse[order[i]] = static_cast<int>(i);
}

// VEC consecutive elements of a row, as float.
__device__ __forceinline__ void load_vec(const bf16_t* p, float (&x)[8]) {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    x[0] = bf16x2_lo(w.x); x[1] = bf16x2_hi(w.x);
    x[2] = bf16x2_lo(w.y); x[3] = bf16x2_hi(w.y);
    x[4] = bf16x2_lo(w.z); x[5] = bf16x2_hi(w.z);
    x[6] = bf16x2_lo(w.w); x[7] = bf16x2_hi(w.w);
}
__device__ __forceinline__ void load_vec(const bf16_t* p, float (&x)[1]) {
    x[0] = bf16_to_float(*p);
}
__device__ __forceinline__ void load_vec(const float* p, float (&x)[4]) {
    const float4 w = *reinterpret_cast<const float4*>(p);
    x[0] = w.x; x[1] = w.y; x[2] = w.z; x[3] = w.w;
}
__device__ __forceinline__ void load_vec(const float* p, float (&x)[1]) { x[0] = *p; }

template <int VEC>
__device__ __forceinline__ void store_vec(float* p, const float (&x)[VEC]) {
    if (VEC % 4 == 0) {
#pragma unroll
        for (int e = 0; e < VEC; e += 4)
            *reinterpret_cast<float4*>(p + e) = make_float4(x[e], x[e + 1], x[e + 2], x[e + 3]);
    } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) p[e] = x[e];
    }
}

template <int VEC, typename Elem>
__device__ __forceinline__ void unpermute_weighted(const Elem* __restrict__ rows,
                                                   const int* __restrict__ inverse,
                                                   const float* __restrict__ weights,
                                                   float* __restrict__ out, long long n_tokens,
                                                   int d, int top_k) {
    const int row_vecs = d / VEC;
    for (long long t = first_row(); t < n_tokens; t += row_step()) {
        for (int c = threadIdx.x; c < row_vecs; c += blockDim.x) {
            float acc[VEC];
            for (int j = 0; j < top_k; ++j) {
                const long long pair = t * top_k + j;
                const float w = weights[pair];
                float x[VEC];
                load_vec(rows + static_cast<long long>(inverse[pair]) * d + c * VEC, x);
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float term = __fmul_rn(w, x[e]);
                    acc[e] = j == 0 ? term : __fadd_rn(acc[e], term);
                }
            }
            store_vec<VEC>(out + t * d + c * VEC, acc);
        }
    }
}

#define UNPERMUTE(VEC, ELEM, NAME)                                                            \
    extern "C" __global__ void NAME(const ELEM* rows, const int* inverse, const float* weights, \
                                    float* out, long long n_tokens, int d, int top_k) {       \
        unpermute_weighted<VEC, ELEM>(rows, inverse, weights, out, n_tokens, d, top_k);       \
    }
UNPERMUTE(8, bf16_t, unpermute_weighted_bf16_v16)
UNPERMUTE(1, bf16_t, unpermute_weighted_bf16_v2)
UNPERMUTE(4, float, unpermute_weighted_f32_v16)
UNPERMUTE(1, float, unpermute_weighted_f32_v4)
