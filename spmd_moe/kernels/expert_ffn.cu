// The GELU of the expert FFN, GELU(x W1) W2 (SPEC §1: exact erf GELU), as one in-place
// pass over a chunk of the hidden activations.
//
// The two GEMMs are cuBLAS (cupy.matmul, float32 accumulation); between them this kernel
// reads each hidden element once and writes it once, in the storage dtype:
//     gelu(x) = x/2 * erfc(-x / sqrt 2), in float32
// (the erfc form, as backend.gelu, keeps large negative inputs from cancelling).
//
// Layout: a contiguous [rows, F] chunk seen as n flat elements. The main loop moves 16
// bytes per thread per step (8 bf16 or 4 float); the host passes a 16-byte aligned base,
// and the n % 8 (n % 4) tail is done one element at a time.
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
