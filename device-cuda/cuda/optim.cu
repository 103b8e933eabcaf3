// The Apply* optimizer updates, in place on the variable's buffer. Hyper-parameters are read from
// device pointers (one-element tensors) so an update never waits for a copy to the host.
#include "common.cuh"

#define APPLY(NAME, T)                                                                    \
    extern "C" __global__ void apply_gd_##NAME(u64 n, T *var, const T *alpha, const T *delta) { \
        float a = to_f(*alpha);                                                           \
        GRID_STRIDE(i, n) { var[i] = from_f<T>(to_f(var[i]) - a * to_f(delta[i])); }       \
    }                                                                                     \
    extern "C" __global__ void apply_momentum_##NAME(u64 n, T *var, T *accum, const T *lr, const T *grad, \
                                                     const T *momentum, int nesterov) {   \
        float l = to_f(*lr), mo = to_f(*momentum);                                        \
        GRID_STRIDE(i, n) {                                                               \
            float g = to_f(grad[i]);                                                      \
            float acc = to_f(accum[i]) * mo + g;                                          \
            accum[i] = from_f<T>(acc);                                                    \
            float step = nesterov ? g * l + acc * mo * l : acc * l;                       \
            var[i] = from_f<T>(to_f(var[i]) - step);                                      \
        }                                                                                 \
    }                                                                                     \
    extern "C" __global__ void apply_adam_##NAME(u64 n, T *var, T *m, T *v, const T *b1p, const T *b2p, \
                                                 const T *lr, const T *b1, const T *b2, const T *eps, \
                                                 const T *grad, int nesterov) {           \
        float beta1 = to_f(*b1), beta2 = to_f(*b2), e = to_f(*eps);                       \
        float lr_t = to_f(*lr) * sqrtf(1.0f - to_f(*b2p)) / (1.0f - to_f(*b1p));          \
        GRID_STRIDE(i, n) {                                                               \
            float g = to_f(grad[i]);                                                      \
            float mi = to_f(m[i]) + (g - to_f(m[i])) * (1.0f - beta1);                    \
            float vi = to_f(v[i]) + (g * g - to_f(v[i])) * (1.0f - beta2);                \
            m[i] = from_f<T>(mi);                                                         \
            v[i] = from_f<T>(vi);                                                         \
            float num = nesterov ? mi * beta1 + (1.0f - beta1) * g : mi;                  \
            var[i] = from_f<T>(to_f(var[i]) - num * lr_t / (sqrtf(vi) + e));              \
        }                                                                                 \
    }
FOR_FLOATS(APPLY)
