// MatMul C[m,n] = op(A) * op(B) with 16x16 shared-memory tiles, accumulating in float. The
// fallback when cuBLAS cannot be loaded; the self-check compares both with the CPU.
#include "common.cuh"

#define TILE 16

#define MATMUL(NAME, T)                                                                   \
    extern "C" __global__ void matmul_##NAME(u64 m, u64 n, u64 k, int ta, int tb, const T *a, const T *b, T *c) { \
        __shared__ float as[TILE][TILE];                                                  \
        __shared__ float bs[TILE][TILE + 1];                                              \
        u64 row = (u64)blockIdx.y * TILE + threadIdx.y;                                   \
        u64 col = (u64)blockIdx.x * TILE + threadIdx.x;                                   \
        float acc = 0.0f;                                                                 \
        for (u64 t = 0; t < k; t += TILE) {                                               \
            u64 ak = t + threadIdx.x, bk = t + threadIdx.y;                               \
            as[threadIdx.y][threadIdx.x] = (row < m && ak < k)                            \
                ? to_f(ta ? a[ak * m + row] : a[row * k + ak]) : 0.0f;                    \
            bs[threadIdx.y][threadIdx.x] = (bk < k && col < n)                            \
                ? to_f(tb ? b[col * k + bk] : b[bk * n + col]) : 0.0f;                    \
            __syncthreads();                                                              \
            for (int p = 0; p < TILE; ++p) acc += as[threadIdx.y][p] * bs[p][threadIdx.x]; \
            __syncthreads();                                                              \
        }                                                                                 \
        if (row < m && col < n) c[row * n + col] = from_f<T>(acc);                        \
    }
FOR_FLOATS(MATMUL)
