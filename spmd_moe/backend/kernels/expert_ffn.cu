// The activations of the expert FFN, between its cuBLAS GEMMs (float32 accumulation), each
// one elementwise pass over a chunk of the hidden activations.
//
// GELU (SPEC §1: GELU(x W1) W2, exact erf GELU), in place: reads each hidden element once
// and writes it once, in the storage dtype:
//     gelu(x) = x/2 * erfc(-x / sqrt 2), in float32
// (the erfc form, as backend.gelu, keeps large negative inputs from cancelling).
//
// SwiGLU (SPEC §8: (silu(x W1) * x W3) W2): gate = x W1 and up = x W3 arrive as cuBLAS's
// float32 outputs (never rounded), and the product is rounded once to the storage dtype:
//     hidden = silu(gate) * up,  silu(g) = (g * (g >= 0 ? 1 : e)) / (1 + e),  e = exp(-|g|)
// the operations of experts.silu in its order, so the rounding points are the NumPy path's
// (the sigmoid from exp(-|g|) never overflows and does not cancel for negative g). The
// float32 form may write over gate (each element is read before it is written).
//
// Layout: contiguous [rows, F] chunks seen as n flat elements. The main loops move 16
// bytes per thread per step (8 bf16 or 4 float; SwiGLU reads 4 floats of each input); the
// host passes 16-byte aligned bases, and the tail is done one element at a time.
#include "bf16.cuh"

__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * erfcf(x * -0.70710678118654752f);
}

__device__ __forceinline__ unsigned gelu_bf16x2(unsigned word) {
    return pack_bf16x2(gelu_erf(bf16x2_lo(word)), gelu_erf(bf16x2_hi(word)));
}

extern "C" __global__ void gelu_bf16_inplace(bf16_t* x, long long n) {
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    uint4* x16 = reinterpret_cast<uint4*>(x);
    const long long n16 = n / 8;
    for (long long i = first; i < n16; i += step) {
        uint4 w = x16[i];
        w.x = gelu_bf16x2(w.x);
        w.y = gelu_bf16x2(w.y);
        w.z = gelu_bf16x2(w.z);
        w.w = gelu_bf16x2(w.w);
        x16[i] = w;
    }
    for (long long i = n16 * 8 + first; i < n; i += step)
        x[i] = float_to_bf16(gelu_erf(bf16_to_float(x[i])));
}

extern "C" __global__ void gelu_f32_inplace(float* x, long long n) {
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    float4* x16 = reinterpret_cast<float4*>(x);
    const long long n16 = n / 4;
    for (long long i = first; i < n16; i += step) {
        float4 w = x16[i];
        w.x = gelu_erf(w.x);
        w.y = gelu_erf(w.y);
        w.z = gelu_erf(w.z);
        w.w = gelu_erf(w.w);
        x16[i] = w;
    }
    for (long long i = n16 * 4 + first; i < n; i += step) x[i] = gelu_erf(x[i]);
}

__device__ __forceinline__ float silu_times(float gate, float up) {
    const float e = expf(-fabsf(gate));
    const float silu = (gate * (gate >= 0.f ? 1.f : e)) / (1.f + e);
    return silu * up;
}

extern "C" __global__ void swiglu_bf16(const float* __restrict__ gate,
                                       const float* __restrict__ up, bf16_t* __restrict__ out,
                                       long long n) {
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    const float4* gate16 = reinterpret_cast<const float4*>(gate);
    const float4* up16 = reinterpret_cast<const float4*>(up);
    uint2* out8 = reinterpret_cast<uint2*>(out);   // 4 bf16 per 16 input bytes
    const long long n4 = n / 4;
    for (long long i = first; i < n4; i += step) {
        const float4 g = gate16[i], u = up16[i];
        out8[i] = make_uint2(pack_bf16x2(silu_times(g.x, u.x), silu_times(g.y, u.y)),
                             pack_bf16x2(silu_times(g.z, u.z), silu_times(g.w, u.w)));
    }
    for (long long i = n4 * 4 + first; i < n; i += step)
        out[i] = float_to_bf16(silu_times(gate[i], up[i]));
}

// out may be gate itself (no __restrict__ on either).
extern "C" __global__ void swiglu_f32(const float* gate, const float* __restrict__ up,
                                      float* out, long long n) {
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
    const float4* gate16 = reinterpret_cast<const float4*>(gate);
    const float4* up16 = reinterpret_cast<const float4*>(up);
    float4* out16 = reinterpret_cast<float4*>(out);
    const long long n4 = n / 4;
    for (long long i = first; i < n4; i += step) {
        const float4 g = gate16[i], u = up16[i];
        out16[i] = make_float4(silu_times(g.x, u.x), silu_times(g.y, u.y),
                               silu_times(g.z, u.z), silu_times(g.w, u.w));
    }
    for (long long i = n4 * 4 + first; i < n; i += step) out[i] = silu_times(gate[i], up[i]);
}
