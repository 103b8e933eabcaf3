// Reductions over the middle axis of an [outer, r, inner] view: one block per output element,
// threads stride over r and combine through shared memory. Sum, Mean, Max, Min, Prod, and
// BiasAddGrad (a Sum over all but the last axis).
#include "common.cuh"

#define REDUCE_THREADS 256

// Op codes: keep in step with `ReduceOp` in src/kernels.rs.
__device__ __forceinline__ float reduce_init(int op) {
    switch (op) {
    case 2: return -RILL_INF;
    case 3: return RILL_INF;
    case 4: return 1.0f;
    default: return 0.0f;
    }
}

__device__ __forceinline__ float reduce_combine(int op, float a, float b) {
    switch (op) {
    case 2: return fmaxf(a, b);
    case 3: return fminf(a, b);
    case 4: return a * b;
    default: return a + b;
    }
}

#define REDUCE(NAME, T)                                                                   \
    extern "C" __global__ void reduce_##NAME(int op, u64 outer, u64 r, u64 inner, const T *x, T *y) { \
        __shared__ float part[REDUCE_THREADS];                                            \
        for (u64 o = blockIdx.x; o < outer * inner; o += gridDim.x) {                     \
            u64 oi = o / inner, j = o % inner;                                            \
            float acc = reduce_init(op);                                                  \
            for (u64 k = threadIdx.x; k < r; k += blockDim.x)                             \
                acc = reduce_combine(op, acc, to_f(x[(oi * r + k) * inner + j]));         \
            part[threadIdx.x] = acc;                                                      \
            __syncthreads();                                                              \
            for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {                           \
                if (threadIdx.x < s)                                                      \
                    part[threadIdx.x] = reduce_combine(op, part[threadIdx.x], part[threadIdx.x + s]); \
                __syncthreads();                                                          \
            }                                                                             \
            if (threadIdx.x == 0) {                                                       \
                float v = part[0];                                                        \
                if (op == 1) v = r > 0 ? v / (float)r : RILL_NAN;       \
                y[o] = from_f<T>(v);                                                      \
            }                                                                             \
            __syncthreads();                                                              \
        }                                                                                 \
    }
FOR_FLOATS(REDUCE)
