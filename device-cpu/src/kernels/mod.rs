//! The CPU kernels for the graph crate's ops, and the arithmetic traits they share.
//!
//! Kernels compute f16 and bf16 in f32 (`Num::A`), so each op is written once over the
//! compute type; integer ops wrap on overflow, as TensorFlow's do.

mod cast;
mod conv;
mod elementwise;
mod matmul;
mod misc;
mod nn;
mod optimizers;
mod random;
mod reduce;
mod shape_ops;

use rill_graph::device::{chunk_len, parallel_chunks_mut};
use rill_graph::half::{bf16, f16};
use rill_graph::{DType, Element, Error, IntraOpPool, KernelDef, Result, Tensor, TypeOf};
use std::sync::Mutex;

/// Below this many elements (1 MiB of f32) a kernel runs on the calling thread: waking an
/// intra-op thread costs 10–25 µs on a VM, more than a cheap op on a quarter million elements.
pub(crate) const PARALLEL_MIN_ELEMENTS: usize = 256 * 1024;
/// The smallest chunk handed to the pool, in elements.
pub(crate) const CHUNK_MIN_ELEMENTS: usize = 8 * 1024;

/// The type a kernel computes in: arithmetic with TensorFlow's semantics per type.
pub(crate) trait Arith: Copy + PartialOrd + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
    /// The identity of `max` (−∞ for floats).
    const LOWEST: Self;
    /// The identity of `min` (+∞ for floats).
    const HIGHEST: Self;
    const IS_FLOAT: bool;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// Integer division truncates; callers reject an integer zero divisor first.
    fn div(self, o: Self) -> Self;
    /// Integer powers need a non-negative exponent; callers check first.
    fn pow(self, o: Self) -> Self;
    /// `max` and `min` propagate NaN, as TensorFlow's do.
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn neg(self) -> Self;
    fn abs(self) -> Self;
    fn sign(self) -> Self;
    fn is_zero(self) -> bool;
    fn is_negative(self) -> bool;
    /// `self / n` for a mean over `n` elements.
    fn div_count(self, n: usize) -> Self;
}

/// Transcendental functions of the float compute types.
pub(crate) trait Float: Arith {
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn from_f64(v: f64) -> Self;
}

macro_rules! float_arith {
    ($t:ty) => {
        impl Arith for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const LOWEST: Self = <$t>::NEG_INFINITY;
            const HIGHEST: Self = <$t>::INFINITY;
            const IS_FLOAT: bool = true;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline(always)]
            fn pow(self, o: Self) -> Self {
                self.powf(o)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                if self > o || self.is_nan() {
                    self
                } else {
                    o
                }
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                if self < o || self.is_nan() {
                    self
                } else {
                    o
                }
            }
            #[inline(always)]
            fn neg(self) -> Self {
                -self
            }
            #[inline(always)]
            fn abs(self) -> Self {
                self.abs()
            }
            #[inline(always)]
            fn sign(self) -> Self {
                // TensorFlow: sign(0) = 0 and sign(NaN) = NaN.
                if self > 0.0 {
                    1.0
                } else if self < 0.0 {
                    -1.0
                } else {
                    self
                }
            }
            #[inline(always)]
            fn is_zero(self) -> bool {
                self == 0.0
            }
            #[inline(always)]
            fn is_negative(self) -> bool {
                self < 0.0
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                self / n as $t
            }
        }

        impl Float for $t {
            #[inline(always)]
            fn sqrt(self) -> Self {
                self.sqrt()
            }
            #[inline(always)]
            fn exp(self) -> Self {
                self.exp()
            }
            #[inline(always)]
            fn ln(self) -> Self {
                self.ln()
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                self.tanh()
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}
float_arith!(f32);
float_arith!(f64);

macro_rules! int_arith {
    ($t:ty, $abs:expr, $sign:expr) => {
        impl Arith for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            const LOWEST: Self = <$t>::MIN;
            const HIGHEST: Self = <$t>::MAX;
            const IS_FLOAT: bool = false;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                // Zero divisors are rejected before the loop; the fallback keeps this total.
                self.checked_div(o).unwrap_or(0)
            }
            #[inline(always)]
            fn pow(self, o: Self) -> Self {
                // Square-and-multiply with wrapping, as C++'s integer pow; o >= 0 is checked first.
                let (mut base, mut e, mut acc) = (self, o, 1 as $t);
                while e > 0 {
                    if e & 1 == 1 {
                        acc = acc.wrapping_mul(base);
                    }
                    base = base.wrapping_mul(base);
                    e >>= 1;
                }
                acc
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                Ord::max(self, o)
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                Ord::min(self, o)
            }
            #[inline(always)]
            fn neg(self) -> Self {
                self.wrapping_neg()
            }
            #[inline(always)]
            fn abs(self) -> Self {
                let f: fn($t) -> $t = $abs;
                f(self)
            }
            #[inline(always)]
            fn sign(self) -> Self {
                let f: fn($t) -> $t = $sign;
                f(self)
            }
            #[inline(always)]
            fn is_zero(self) -> bool {
                self == 0
            }
            #[inline(always)]
            #[allow(unused_comparisons)]
            fn is_negative(self) -> bool {
                self < 0
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                match <$t>::try_from(n) {
                    Ok(n) if n != 0 => self.wrapping_div(n),
                    // A count the type cannot hold exceeds any sum it can hold, in magnitude.
                    _ => 0,
                }
            }
        }
    };
}
int_arith!(i32, |x| x.wrapping_abs(), |x| x.signum());
int_arith!(i64, |x| x.wrapping_abs(), |x| x.signum());
int_arith!(u8, |x| x, |x| (x > 0) as u8);

/// A stored element type and the type it is computed in.
pub(crate) trait Num: Element {
    type A: Arith;
    fn load(self) -> Self::A;
    fn store(a: Self::A) -> Self;
}

macro_rules! num_identity {
    ($($t:ty),*) => {$(
        impl Num for $t {
            type A = $t;
            #[inline(always)]
            fn load(self) -> $t {
                self
            }
            #[inline(always)]
            fn store(a: $t) -> $t {
                a
            }
        }
    )*};
}
num_identity!(f32, f64, i32, i64, u8);

impl Num for f16 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> f16 {
        f16::from_f32(a)
    }
}

impl Num for bf16 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> bf16 {
        bf16::from_f32(a)
    }
}

/// A float element type (its compute type has transcendental functions).
pub(crate) trait FloatNum: Num<A: Float> {}
impl<T: Num<A: Float>> FloatNum for T {}

/// Every dtype with a fixed element size (what shape ops move without looking at values).
pub(crate) const FIXED: &[DType] =
    &[DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64, DType::U8, DType::Bool];
pub(crate) const FLOATS: &[DType] = DType::FLOATS;
pub(crate) const NUMBERS: &[DType] = DType::NUMBERS;
/// Signed numbers: TensorFlow has no unsigned `Neg`, `Abs`, `Sign`, `Square`.
pub(crate) const SIGNED: &[DType] =
    &[DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64];
pub(crate) const INDICES: &[DType] = DType::INDICES;

pub(crate) use rill_graph::kernels::{axis_index, int_values, int_vector, shape_from_ints};

/// Runs `f(offset, chunk)` over `out` in chunks whose lengths are multiples of `unit`, on the
/// intra-op pool when there is enough work and on the calling thread otherwise.
pub(crate) fn for_chunks<O: Send>(
    pool: &dyn IntraOpPool,
    out: &mut [O],
    unit: usize,
    f: impl Fn(usize, &mut [O]) + Sync,
) {
    let unit = unit.max(1);
    if out.len() < PARALLEL_MIN_ELEMENTS || pool.num_threads() <= 1 || out.len() <= unit {
        f(0, out);
        return;
    }
    let units = out.len() / unit;
    let per = chunk_len(pool, units, CHUNK_MIN_ELEMENTS.div_ceil(unit));
    parallel_chunks_mut(pool, out, per * unit, f);
}

/// Runs `f(i, item)` for every item on the pool, each item handed out once.
pub(crate) fn parallel_items<T: Send>(pool: &dyn IntraOpPool, items: Vec<T>, f: impl Fn(usize, T) + Sync) {
    if items.len() <= 1 || pool.num_threads() <= 1 {
        items.into_iter().enumerate().for_each(|(i, t)| f(i, t));
        return;
    }
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    pool.parallel_for(slots.len(), &|i| {
        let taken = slots[i].lock().map(|mut g| g.take()).ok().flatten();
        if let Some(t) = taken {
            f(i, t);
        }
    });
}

/// Runs `f` with this thread's buffer from `key` resized to `len` (contents unspecified); the
/// buffer is kept between calls, so scratch space faults in no fresh pages, and is taken out
/// while `f` runs, so a nested call gets its own.
pub(crate) fn with_buffer<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let mut buf = key.with(|c| c.take());
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    let r = f(&mut buf[..len]);
    key.with(|c| c.set(buf));
    r
}

/// `out[i] = f(x[i])`, split over the pool for large tensors.
pub(crate) fn map_into<T: Copy + Sync, O: Copy + Send>(
    pool: &dyn IntraOpPool,
    x: &[T],
    out: &mut [O],
    f: impl Fn(T) -> O + Sync,
) {
    for_chunks(pool, out, 1, |off, o| {
        let x = &x[off..off + o.len()];
        for (d, &s) in o.iter_mut().zip(x) {
            *d = f(s);
        }
    });
}

/// Element bytes as a slice of an unsigned type of the same width, so data-movement kernels are
/// written once per width instead of once per dtype.
macro_rules! by_width {
    ($dtype:expr, $W:ident => $body:expr) => {
        match $dtype.size() {
            Some(1) => {
                type $W = u8;
                $body
            }
            Some(2) => {
                type $W = u16;
                $body
            }
            Some(4) => {
                type $W = u32;
                $body
            }
            Some(8) => {
                type $W = u64;
                $body
            }
            _ => Err(rill_graph::Error::invalid_argument(format!(
                "{} tensors are not supported by this kernel",
                $dtype
            ))),
        }
    };
}
pub(crate) use by_width;

/// A tensor's elements viewed as `W`, the unsigned type of the dtype's width.
pub(crate) fn words<W: bytemuck::Pod>(t: &Tensor) -> Result<&[W]> {
    Ok(bytemuck::cast_slice(t.as_bytes()?))
}

/// Mutable elements viewed as `W` (copy-on-write when shared).
pub(crate) fn words_mut<W: bytemuck::Pod>(t: &mut Tensor) -> Result<&mut [W]> {
    Ok(bytemuck::cast_slice_mut(t.as_bytes_mut()?))
}

/// The error for a dtype a kernel was registered for but does not handle (a registration bug,
/// or a graph that bypassed inference).
pub(crate) fn unsupported(op: &str, d: DType) -> Error {
    Error::invalid_argument(format!("{op} does not support {d}"))
}

macro_rules! k {
    ($op:literal, $f:expr, $of:expr, $types:expr) => {
        KernelDef::new($op, "CPU", $f).types($of, $types)
    };
}

use rill_graph::kernels as sys;
use TypeOf::{Input, Output};

/// Every CPU kernel of this crate.
pub const KERNELS: &[KernelDef] = &[
    // element-wise arithmetic
    k!("Add", elementwise::create_binary, Input(0), NUMBERS),
    k!("AddV2", elementwise::create_binary, Input(0), NUMBERS),
    k!("Sub", elementwise::create_binary, Input(0), NUMBERS),
    k!("Mul", elementwise::create_binary, Input(0), NUMBERS),
    k!("Div", elementwise::create_binary, Input(0), NUMBERS),
    k!("RealDiv", elementwise::create_binary, Input(0), NUMBERS),
    k!("Pow", elementwise::create_binary, Input(0), SIGNED),
    k!("Maximum", elementwise::create_binary, Input(0), NUMBERS),
    k!("Minimum", elementwise::create_binary, Input(0), NUMBERS),
    k!("SquaredDifference", elementwise::create_binary, Input(0), SIGNED),
    k!("Neg", elementwise::create_unary, Input(0), SIGNED),
    k!("Abs", elementwise::create_unary, Input(0), SIGNED),
    k!("Square", elementwise::create_unary, Input(0), SIGNED),
    k!("Sign", elementwise::create_unary, Input(0), SIGNED),
    k!("Sqrt", elementwise::create_unary, Input(0), FLOATS),
    k!("Rsqrt", elementwise::create_unary, Input(0), FLOATS),
    k!("Reciprocal", elementwise::create_unary, Input(0), FLOATS),
    k!("Exp", elementwise::create_unary, Input(0), FLOATS),
    k!("Log", elementwise::create_unary, Input(0), FLOATS),
    // comparisons
    k!("Equal", misc::create_compare, Input(0), FIXED),
    k!("NotEqual", misc::create_compare, Input(0), FIXED),
    k!("Greater", misc::create_compare, Input(0), NUMBERS),
    k!("GreaterEqual", misc::create_compare, Input(0), NUMBERS),
    k!("Less", misc::create_compare, Input(0), NUMBERS),
    k!("LessEqual", misc::create_compare, Input(0), NUMBERS),
    // neural-network ops
    k!("Relu", nn::create_activation, Input(0), NUMBERS),
    k!("Sigmoid", nn::create_activation, Input(0), FLOATS),
    k!("Tanh", nn::create_activation, Input(0), FLOATS),
    k!("ReluGrad", nn::create_activation_grad, Input(0), FLOATS),
    k!("SigmoidGrad", nn::create_activation_grad, Input(0), FLOATS),
    k!("TanhGrad", nn::create_activation_grad, Input(0), FLOATS),
    k!("SqrtGrad", nn::create_activation_grad, Input(0), FLOATS),
    k!("BiasAdd", nn::create_bias_add, Input(0), NUMBERS),
    k!("BiasAddGrad", nn::create_bias_add_grad, Input(0), NUMBERS),
    k!("Softmax", nn::create_softmax, Input(0), FLOATS),
    k!("LogSoftmax", nn::create_softmax, Input(0), FLOATS),
    k!("SoftmaxCrossEntropyWithLogits", nn::create_xent, Input(0), FLOATS),
    k!("SparseSoftmaxCrossEntropyWithLogits", nn::create_sparse_xent, Input(0), FLOATS),
    // linear algebra
    k!(
        "MatMul",
        matmul::create_matmul,
        Input(0),
        &[DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64]
    ),
    k!("_FusedMatMul", matmul::create_fused_matmul, Input(0), &[DType::F32]),
    // convolution and pooling
    k!("Conv2D", conv::create_conv, Input(0), FLOATS),
    k!("Conv2DBackpropInput", conv::create_conv, Input(1), FLOATS),
    k!("Conv2DBackpropFilter", conv::create_conv, Input(0), FLOATS),
    k!("MaxPool", conv::create_pool, Input(0), FLOATS),
    k!("MaxPoolGrad", conv::create_pool, Input(0), FLOATS),
    // reductions
    k!("Sum", reduce::create_reduce, Input(0), NUMBERS),
    k!("Mean", reduce::create_reduce, Input(0), NUMBERS),
    k!("Max", reduce::create_reduce, Input(0), NUMBERS),
    k!("Min", reduce::create_reduce, Input(0), NUMBERS),
    k!("Prod", reduce::create_reduce, Input(0), NUMBERS),
    k!("ArgMax", misc::create_argmax, Input(0), NUMBERS),
    k!("AddN", misc::create_add_n, Input(0), NUMBERS),
    k!("SumToShape", misc::create_sum_to_shape, Input(0), NUMBERS),
    k!("BroadcastGradientArgs", misc::create_broadcast_gradient_args, Input(0), INDICES),
    // shapes and data movement
    k!("Reshape", sys::create_reshape, Input(0), FIXED),
    k!("Transpose", shape_ops::create_transpose, Input(0), FIXED),
    k!("ExpandDims", sys::create_expand_dims, Input(0), FIXED),
    k!("Squeeze", sys::create_squeeze, Input(0), FIXED),
    k!("ConcatV2", shape_ops::create_concat, Output(0), FIXED),
    k!("Slice", shape_ops::create_slice, Input(0), FIXED),
    k!("Gather", shape_ops::create_gather, Input(0), FIXED),
    k!("Tile", shape_ops::create_tile, Input(0), FIXED),
    k!("Shape", sys::create_shape, Output(0), INDICES),
    k!("Fill", shape_ops::create_fill, Input(1), FIXED),
    k!("ZerosLike", shape_ops::create_zeros_like, Input(0), FIXED),
    k!("OnesLike", shape_ops::create_ones_like, Input(0), FIXED),
    k!("Cast", cast::create_cast, Input(0), FIXED),
    // optimizers
    k!("ApplyGradientDescent", optimizers::create_apply, Input(0), FLOATS),
    k!("ApplyMomentum", optimizers::create_apply, Input(0), FLOATS),
    k!("ApplyAdam", optimizers::create_apply, Input(0), FLOATS),
    k!("ApplyRMSProp", optimizers::create_apply, Input(0), FLOATS),
    // random numbers
    k!("RandomUniform", random::create_random, Output(0), FLOATS),
    k!("RandomStandardNormal", random::create_random, Output(0), FLOATS),
    k!("TruncatedNormal", random::create_random, Output(0), FLOATS),
];
