// Row-wise kernels over [rows, cols]: Softmax, LogSoftmax and the two cross-entropy losses. One
// block per row; max and sum go through shared memory so large class counts stay exact enough.
#include "common.cuh"

#define ROW_THREADS 256

__device__ float block_reduce(float v, bool is_max, float *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float o = sh[threadIdx.x + s];
            sh[threadIdx.x] = is_max ? fmaxf(sh[threadIdx.x], o) : sh[threadIdx.x] + o;
        }
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

// Max of row `x` and the sum of exp(x - max) over it.
template <typename T>
__device__ void row_stats(const T *x, u64 cols, float *sh, float *mx, float *sum) {
    float m = -RILL_INF;
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, to_f(x[c]));
    m = block_reduce(m, true, sh);
    float s = 0.0f;
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) s += expf(to_f(x[c]) - m);
    *mx = m;
    *sum = block_reduce(s, false, sh);
}

#define SOFTMAX(NAME, T)                                                                  \
    extern "C" __global__ void softmax_##NAME(int log, u64 rows, u64 cols, const T *x, T *y) { \
        __shared__ float sh[ROW_THREADS];                                                 \
        for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {                        \
            const T *xr = x + row * cols;                                                 \
            T *yr = y + row * cols;                                                       \
            float m, s;                                                                   \
            row_stats(xr, cols, sh, &m, &s);                                              \
            float ls = logf(s);                                                           \
            for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {                        \
                float z = to_f(xr[c]) - m;                                                \
                yr[c] = from_f<T>(log ? z - ls : expf(z) / s);                            \
            }                                                                             \
        }                                                                                 \
    }
FOR_FLOATS(SOFTMAX)

// SoftmaxCrossEntropyWithLogits: loss[row] = -sum(labels * log_softmax), backprop = softmax - labels.
#define XENT(NAME, T)                                                                     \
    extern "C" __global__ void xent_##NAME(u64 rows, u64 cols, const T *x, const T *labels, T *loss, T *back) { \
        __shared__ float sh[ROW_THREADS];                                                 \
        for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {                        \
            const T *xr = x + row * cols;                                                 \
            const T *lr = labels + row * cols;                                            \
            float m, s;                                                                   \
            row_stats(xr, cols, sh, &m, &s);                                              \
            float ls = logf(s), l = 0.0f;                                                 \
            for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {                        \
                float z = to_f(xr[c]) - m, lab = to_f(lr[c]);                             \
                l += lab * (ls - z);                                                      \
                back[row * cols + c] = from_f<T>(expf(z) / s - lab);                      \
            }                                                                             \
            l = block_reduce(l, false, sh);                                               \
            if (threadIdx.x == 0) loss[row] = from_f<T>(l);                               \
        }                                                                                 \
    }
FOR_FLOATS(XENT)

// SparseSoftmaxCrossEntropyWithLogits: labels are class indices; an index outside [0, cols)
// gives NaN loss and gradient for that row, as TensorFlow's GPU kernel does.
#define SPARSE_XENT(NAME, T, LN, L)                                                       \
    extern "C" __global__ void sparse_xent_##NAME##_##LN(u64 rows, u64 cols, const T *x, const L *labels, T *loss, T *back) { \
        __shared__ float sh[ROW_THREADS];                                                 \
        for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {                        \
            const T *xr = x + row * cols;                                                 \
            long long lab = (long long)labels[row];                                       \
            bool ok = lab >= 0 && (u64)lab < cols;                                        \
            float m, s;                                                                   \
            row_stats(xr, cols, sh, &m, &s);                                              \
            float ls = logf(s), nan = RILL_NAN;                         \
            for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {                        \
                float z = to_f(xr[c]) - m;                                                \
                float g = expf(z) / s - ((long long)c == lab ? 1.0f : 0.0f);              \
                back[row * cols + c] = from_f<T>(ok ? g : nan);                           \
                if ((long long)c == lab) loss[row] = from_f<T>(ls - z);                   \
            }                                                                             \
            if (!ok && threadIdx.x == 0) loss[row] = from_f<T>(nan);                      \
        }                                                                                 \
    }
#define SPARSE_XENT_ALL(NAME, T) SPARSE_XENT(NAME, T, i32, int) SPARSE_XENT(NAME, T, i64, long long)
FOR_FLOATS(SPARSE_XENT_ALL)
