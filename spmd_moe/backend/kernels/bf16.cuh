// bfloat16 helpers shared by the kernels, with no CUDA header.
//
// A bf16 value travels as its 16 raw bits (`bf16_t`), exactly as ml_dtypes/CuPy store it.
// Conversions are single PTX instructions (sm_80+): the sources then compile with NVRTC
// alone, without cuda_bf16.h or a toolkit include directory to discover.
// The Python loader pastes this file in place of its #include line (see compile.py), so
// CuPy's kernel cache, keyed on the source text, sees every change here.
#pragma once

typedef unsigned short bf16_t;

// bf16 -> float is exact: the bf16 bits are the float's upper half.
__device__ __forceinline__ float bf16_to_float(bf16_t h) {
    return __uint_as_float(static_cast<unsigned>(h) << 16);
}

// float -> bf16, round to nearest even (what ml_dtypes' astype does).
__device__ __forceinline__ bf16_t float_to_bf16(float x) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// Two floats -> one 32-bit word of two bf16: `lo` at the lower address (the lower column).
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned word;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(word) : "f"(hi), "f"(lo));
    return word;
}

// The two halves of a bf16x2 word as floats (lo: the lower address).
__device__ __forceinline__ float bf16x2_lo(unsigned word) {
    return __uint_as_float(word << 16);
}
__device__ __forceinline__ float bf16x2_hi(unsigned word) {
    return __uint_as_float(word & 0xffff0000u);
}

// A float or bf16 element as float, and back (rounded to nearest even): the row kernels'
// (rowwise.cu, mla.cu) typed loads and stores.
__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const bf16_t* p, long long i) {
    return bf16_to_float(p[i]);
}
__device__ __forceinline__ void store_f(float* p, long long i, float x) { p[i] = x; }
__device__ __forceinline__ void store_f(bf16_t* p, long long i, float x) {
    p[i] = float_to_bf16(x);
}
