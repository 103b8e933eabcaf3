// Elementwise one-input kernels and fills; the op code is a parameter so one entry serves every op.
#include "common.cuh"

// Op codes: keep in step with `UnaryOp` in src/kernels.rs.
__device__ __forceinline__ float unary_apply(int op, float x) {
    switch (op) {
    case 0: return -x;
    case 1: return fabsf(x);
    case 2: return x * x;
    case 3: return sqrtf(x);
    case 4: return rsqrtf(x);
    case 5: return 1.0f / x;
    case 6: return expf(x);
    case 7: return logf(x);
    case 8: return x > 0.0f ? x : 0.0f;
    case 9: return 1.0f / (1.0f + expf(-x));
    case 10: return tanhf(x);
    case 11: return (float)((x > 0.0f) - (x < 0.0f));
    case 12: return 0.0f;
    case 13: return 1.0f;
    default: return RILL_NAN;
    }
}

#define UNARY(NAME, T)                                                                    \
    extern "C" __global__ void unary_##NAME(int op, u64 n, const T *x, T *y) {            \
        GRID_STRIDE(i, n) { y[i] = from_f<T>(unary_apply(op, to_f(x[i]))); }              \
    }
FOR_FLOATS(UNARY)

// Casts between the float types; same-type casts never reach the GPU.
#define CAST(SN, ST, DN, DT)                                                              \
    extern "C" __global__ void cast_##SN##_##DN(u64 n, const ST *x, DT *y) {              \
        GRID_STRIDE(i, n) { y[i] = from_f<DT>(to_f(x[i])); }                              \
    }
CAST(f32, float, f16, __half)
CAST(f32, float, bf16, __nv_bfloat16)
CAST(f16, __half, f32, float)
CAST(f16, __half, bf16, __nv_bfloat16)
CAST(bf16, __nv_bfloat16, f32, float)
CAST(bf16, __nv_bfloat16, f16, __half)
