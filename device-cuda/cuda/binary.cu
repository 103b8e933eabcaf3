// Elementwise two-input kernels with NumPy broadcasting, plus BiasAdd.
#include "common.cuh"

// Output dims and the element strides of each input (0 where that input is broadcast), passed by
// value so a launch needs no extra copy. Keep in step with `Bcast` in src/kernels.rs.
struct Bcast {
    u64 rank;
    u64 dims[8];
    u64 sa[8];
    u64 sb[8];
};

// Op codes: keep in step with `BinaryOp` in src/kernels.rs. Gradient ops take TF's input order.
__device__ __forceinline__ float binary_apply(int op, float a, float b) {
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    case 3: return a / b;
    case 4: return fmaxf(a, b);
    case 5: return fminf(a, b);
    case 6: return (a - b) * (a - b);
    case 7: return powf(a, b);
    case 8: return b > 0.0f ? a : 0.0f;          // ReluGrad(gradients, features)
    case 9: return b * a * (1.0f - a);           // SigmoidGrad(y, dy)
    case 10: return b * (1.0f - a * a);          // TanhGrad(y, dy)
    case 11: return b * 0.5f / a;                // SqrtGrad(y, dy)
    default: return RILL_NAN;
    }
}

#define BINARY(NAME, T)                                                                   \
    extern "C" __global__ void binary_##NAME(int op, u64 n, Bcast bc, const T *a, const T *b, T *y) { \
        GRID_STRIDE(i, n) {                                                               \
            u64 rem = i, ia = 0, ib = 0;                                                  \
            for (int d = (int)bc.rank - 1; d >= 0; --d) {                                 \
                u64 c = rem % bc.dims[d];                                                 \
                rem /= bc.dims[d];                                                        \
                ia += c * bc.sa[d];                                                       \
                ib += c * bc.sb[d];                                                       \
            }                                                                             \
            y[i] = from_f<T>(binary_apply(op, to_f(a[ia]), to_f(b[ib])));                 \
        }                                                                                 \
    }
FOR_FLOATS(BINARY)

#define BIAS_ADD(NAME, T)                                                                 \
    extern "C" __global__ void bias_add_##NAME(u64 n, u64 c, const T *x, const T *bias, T *y) { \
        GRID_STRIDE(i, n) { y[i] = from_f<T>(to_f(x[i]) + to_f(bias[i % c])); }            \
    }
FOR_FLOATS(BIAS_ADD)
