// Shared helpers of rill's GPU kernels: element loads and stores through float, so one template
// serves f32, f16 and bf16 (half types compute in float, as TensorFlow's GPU kernels do).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned long long u64;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Grid-stride loop: any grid size covers any n, so launches never need more than 65535 blocks.
#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

// Instantiates `body(T)` as three extern "C" kernels named NAME_f32, NAME_f16, NAME_bf16.
#define FOR_FLOATS(MACRO) MACRO(f32, float) MACRO(f16, __half) MACRO(bf16, __nv_bfloat16)

// NVRTC has no <math.h>, so the special values are spelled as bit patterns.
#define RILL_INF __int_as_float(0x7f800000)
#define RILL_NAN __int_as_float(0x7fc00000)
