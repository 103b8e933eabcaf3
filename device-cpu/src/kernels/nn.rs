//! Neural-network ops: activations and their gradients, BiasAdd and its gradient, Softmax,
//! LogSoftmax and the two softmax cross-entropy losses.

use super::elementwise::{broadcast_into, unary_map};
use super::reduce::{reduce_into, ReduceOp};
use super::{for_chunks, int_values, unsupported, Arith, Float, FloatNum, Num};
use rill_graph::{
    dispatch_float, dispatch_numeric, AttrsExt, Device, Error, IntraOpPool, Kernel, KernelInit, OpKernel,
    OpKernelContext, Result, Shape, Tensor,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Relu,
    Sigmoid,
    Tanh,
}

struct ActivationK {
    act: Act,
}

pub fn create_activation(init: &KernelInit<'_>) -> Result<Kernel> {
    let act = match init.node.op.as_str() {
        "Relu" => Act::Relu,
        "Sigmoid" => Act::Sigmoid,
        "Tanh" => Act::Tanh,
        other => return Err(Error::internal(format!("no activation kernel for {other}"))),
    };
    Ok(Kernel::sized(ActivationK { act }, init))
}

fn relu<T: Num>(dev: &dyn Device, x: &Tensor) -> Result<Tensor> {
    let zero = T::A::ZERO;
    unary_map::<T>(dev, x, |v| if v > zero { v } else { zero })
}

fn float_activation<T: FloatNum>(dev: &dyn Device, act: Act, x: &Tensor) -> Result<Tensor> {
    let one = T::A::ONE;
    match act {
        Act::Relu => relu::<T>(dev, x),
        Act::Sigmoid => unary_map::<T>(dev, x, |v| one.div(one.add(v.neg().exp()))),
        Act::Tanh => unary_map::<T>(dev, x, |v| v.tanh()),
    }
}

impl OpKernel for ActivationK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let dev = &**ctx.device();
        let d = x.dtype();
        let out = if d.is_float() {
            dispatch_float!(d, T => float_activation::<T>(dev, self.act, x)?, _ => unreachable!("float dtype"))
        } else if self.act == Act::Relu {
            dispatch_numeric!(d, T => relu::<T>(dev, x)?, _ => return Err(unsupported("Relu", d)))
        } else {
            return Err(unsupported(&ctx.node.op, d));
        };
        ctx.set_output(0, out);
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ActGrad {
    /// `ReluGrad(gradients, features)`.
    Relu,
    /// `SigmoidGrad(y, dy)`.
    Sigmoid,
    /// `TanhGrad(y, dy)`.
    Tanh,
    /// `SqrtGrad(y, dy)`.
    Sqrt,
}

struct ActivationGradK {
    grad: ActGrad,
}

pub fn create_activation_grad(init: &KernelInit<'_>) -> Result<Kernel> {
    let grad = match init.node.op.as_str() {
        "ReluGrad" => ActGrad::Relu,
        "SigmoidGrad" => ActGrad::Sigmoid,
        "TanhGrad" => ActGrad::Tanh,
        "SqrtGrad" => ActGrad::Sqrt,
        other => return Err(Error::internal(format!("no gradient kernel for {other}"))),
    };
    Ok(Kernel::sized(ActivationGradK { grad }, init))
}

fn activation_grad<T: FloatNum>(dev: &dyn Device, grad: ActGrad, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let s = *a.shape();
    let pool = dev.intra_op();
    // Every element is written below, so the buffer may be recycled.
    let mut out = dev.allocate(T::DTYPE, s)?;
    let (x, y, o) = (a.as_slice::<T>()?, b.as_slice::<T>()?, out.as_mut_slice::<T>()?);
    let (zero, one, half) = (T::A::ZERO, T::A::ONE, T::A::from_f64(0.5));
    macro_rules! run {
        (|$p:ident, $q:ident| $e:expr) => {
            broadcast_into(pool, x, &s, y, &s, o, &s, |p: T, q: T| {
                let ($p, $q) = (p.load(), q.load());
                T::store($e)
            })
        };
    }
    match grad {
        ActGrad::Relu => run!(|g, f| if f > zero { g } else { zero }),
        ActGrad::Sigmoid => run!(|y, dy| dy.mul(y).mul(one.sub(y))),
        ActGrad::Tanh => run!(|y, dy| dy.mul(one.sub(y.mul(y)))),
        ActGrad::Sqrt => run!(|y, dy| dy.mul(half).div(y)),
    }
    Ok(out)
}

impl OpKernel for ActivationGradK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (a, b) = (ctx.input(0)?, ctx.input(1)?);
        if a.shape() != b.shape() || a.dtype() != b.dtype() {
            return Err(Error::invalid_argument(format!(
                "inputs must have one dtype and shape: {} {} vs. {} {}",
                a.dtype(),
                a.shape(),
                b.dtype(),
                b.shape()
            )));
        }
        let dev = &**ctx.device();
        let out = dispatch_float!(a.dtype(), T => activation_grad::<T>(dev, self.grad, a, b)?,
            _ => return Err(unsupported(&ctx.node.op, a.dtype())));
        ctx.set_output(0, out);
        Ok(())
    }
}

/// The channel axis of a BiasAdd operand under `data_format`.
fn channel_axis(nchw: bool, s: &Shape) -> Result<usize> {
    let r = s.rank();
    if r < 1 || (nchw && r < 2) {
        return Err(Error::invalid_argument(format!(
            "Input tensor must be at least {}D: {s}",
            if nchw { 2 } else { 1 }
        )));
    }
    Ok(if nchw { 1 } else { r - 1 })
}

fn data_format_nchw(init: &KernelInit<'_>) -> Result<bool> {
    match init.attrs().str_or("data_format", "NHWC") {
        "NHWC" => Ok(false),
        "NCHW" => Ok(true),
        f => Err(Error::invalid_argument(format!("unknown data_format {f}"))),
    }
}

struct BiasAddK {
    nchw: bool,
}

pub fn create_bias_add(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(BiasAddK { nchw: data_format_nchw(init)? }, init))
}

fn bias_add<T: Num>(dev: &dyn Device, x: &Tensor, b: &Tensor, axis: usize) -> Result<Tensor> {
    let s = x.shape();
    let c = s.dim(axis);
    // Every element is written below, so the buffer may be recycled.
    let mut out = dev.allocate(T::DTYPE, *s)?;
    let (xs, bs) = (x.as_slice::<T>()?, b.as_slice::<T>()?);
    // Bias broadcast as shape [c, 1...]: the general broadcast loop handles both layouts.
    let mut bias_dims = vec![1usize; s.rank() - axis];
    bias_dims[0] = c;
    let bias_shape = Shape::new(&bias_dims)?;
    broadcast_into(dev.intra_op(), xs, s, bs, &bias_shape, out.as_mut_slice::<T>()?, s, |p: T, q: T| {
        T::store(p.load().add(q.load()))
    });
    Ok(out)
}

impl OpKernel for BiasAddK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (x, b) = (ctx.input(0)?, ctx.input(1)?);
        let axis = channel_axis(self.nchw, x.shape())?;
        if b.shape().rank() != 1 || b.shape().dim(0) != x.shape().dim(axis) || b.dtype() != x.dtype() {
            return Err(Error::invalid_argument(format!(
                "Must provide as many biases as the channel dimension of the input tensor: {} vs. {} in {}",
                b.shape(),
                x.shape().dim(axis),
                x.shape()
            )));
        }
        let dev = &**ctx.device();
        let out = dispatch_numeric!(x.dtype(), T => bias_add::<T>(dev, x, b, axis)?,
            _ => return Err(unsupported("BiasAdd", x.dtype())));
        ctx.set_output(0, out);
        Ok(())
    }
}

struct BiasAddGradK {
    nchw: bool,
}

pub fn create_bias_add_grad(init: &KernelInit<'_>) -> Result<Kernel> {
    let k = BiasAddGradK { nchw: data_format_nchw(init)? };
    let small = init
        .input_types
        .first()
        .and_then(|t| t.shape.num_elements())
        .is_some_and(|n| n <= rill_graph::kernel::INLINE_MAX_ELEMENTS);
    Ok(if small { Kernel::cheap(k) } else { Kernel::expensive(k) })
}

fn bias_add_grad<T: Num>(pool: &dyn IntraOpPool, g: &Tensor, axis: usize) -> Result<Tensor> {
    let s = g.shape();
    let reduced: Vec<bool> = (0..s.rank()).map(|i| i != axis).collect();
    let mut out = Tensor::try_zeros(T::DTYPE, Shape::vector(s.dim(axis)))?;
    reduce_into::<T>(pool, ReduceOp::Sum, g.as_slice::<T>()?, s, &reduced, out.as_mut_slice::<T>()?);
    Ok(out)
}

impl OpKernel for BiasAddGradK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let g = ctx.input(0)?;
        let axis = channel_axis(self.nchw, g.shape())?;
        let pool = ctx.intra_op();
        let out = dispatch_numeric!(g.dtype(), T => bias_add_grad::<T>(pool, g, axis)?,
            _ => return Err(unsupported("BiasAddGrad", g.dtype())));
        ctx.set_output(0, out);
        Ok(())
    }
}

/// The maximum of a row and the sum of `exp(x - max)` over it.
#[inline(always)]
fn row_stats<T: FloatNum>(row: &[T]) -> (T::A, T::A) {
    let m = row.iter().fold(T::A::LOWEST, |m, v| m.max(v.load()));
    let sum = row.iter().fold(T::A::ZERO, |s, v| s.add(v.load().sub(m).exp()));
    (m, sum)
}

struct SoftmaxK {
    log: bool,
}

pub fn create_softmax(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(SoftmaxK { log: init.node.op == "LogSoftmax" }, init))
}

fn softmax<T: FloatNum>(pool: &dyn IntraOpPool, x: &Tensor, log: bool) -> Result<Tensor> {
    let s = x.shape();
    let c = s.dim(s.rank() - 1);
    let mut out = Tensor::try_zeros(T::DTYPE, *s)?;
    let xs = x.as_slice::<T>()?;
    if c == 0 {
        return Ok(out);
    }
    for_chunks(pool, out.as_mut_slice::<T>()?, c, |off, o| {
        let xs = &xs[off..off + o.len()];
        for (orow, xrow) in o.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
            let (m, sum) = row_stats::<T>(xrow);
            if log {
                let lse = sum.ln();
                for (d, v) in orow.iter_mut().zip(xrow) {
                    *d = T::store(v.load().sub(m).sub(lse));
                }
            } else {
                for (d, v) in orow.iter_mut().zip(xrow) {
                    *d = T::store(v.load().sub(m).exp().div(sum));
                }
            }
        }
    });
    Ok(out)
}

impl OpKernel for SoftmaxK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        if x.shape().rank() < 1 {
            return Err(Error::invalid_argument(format!(
                "logits must have >= 1 dimension, got {}",
                x.shape()
            )));
        }
        let pool = ctx.intra_op();
        let out = dispatch_float!(x.dtype(), T => softmax::<T>(pool, x, self.log)?,
            _ => return Err(unsupported(&ctx.node.op, x.dtype())));
        ctx.set_output(0, out);
        Ok(())
    }
}

/// Runs `row(i, logits_row, max, log_sum_exp, grad_row) -> loss` for each example, in parallel
/// for large batches, and returns (loss [B], backprop [B, C]). `grad_row` arrives holding
/// `softmax(logits)`; log-probabilities are `(x - max) - log_sum_exp`, stable for large logits.
fn xent_rows<T: FloatNum>(
    pool: &dyn IntraOpPool,
    logits: &Tensor,
    row: impl Fn(usize, &[T], T::A, T::A, &mut [T::A]) -> T::A + Sync,
) -> Result<(Tensor, Tensor)> {
    let s = logits.shape();
    let (b, c) = (s.dim(0), s.dim(1));
    let xs = logits.as_slice::<T>()?;
    // One row of the work buffer: the C gradient entries, then the loss.
    let w = c + 1;
    let mut work = vec![T::A::ZERO; b * w];
    if c > 0 {
        for_chunks(pool, &mut work, w, |off, o| {
            for (k, wrow) in o.chunks_exact_mut(w).enumerate() {
                let i = off / w + k;
                let xrow = &xs[i * c..(i + 1) * c];
                let m = xrow.iter().fold(T::A::LOWEST, |m, v| m.max(v.load()));
                let (grad, loss) = wrow.split_at_mut(c);
                // Each exponential once: kept in the gradient row, then scaled by the sum.
                let mut sum = T::A::ZERO;
                for (g, v) in grad.iter_mut().zip(xrow) {
                    *g = v.load().sub(m).exp();
                    sum = sum.add(*g);
                }
                for g in grad.iter_mut() {
                    *g = g.div(sum);
                }
                loss[0] = row(i, xrow, m, sum.ln(), grad);
            }
        });
    }
    let mut loss = Tensor::try_zeros(T::DTYPE, Shape::vector(b))?;
    let mut back = Tensor::try_zeros(T::DTYPE, *s)?;
    {
        let (l, g) = (loss.as_mut_slice::<T>()?, back.as_mut_slice::<T>()?);
        for (i, wrow) in work.chunks_exact(w).enumerate() {
            l[i] = T::store(wrow[c]);
            for (d, &v) in g[i * c..(i + 1) * c].iter_mut().zip(&wrow[..c]) {
                *d = T::store(v);
            }
        }
    }
    Ok((loss, back))
}

fn check_logits(s: &Shape) -> Result<()> {
    if s.rank() != 2 {
        return Err(Error::invalid_argument(format!("logits must be 2-dimensional, got shape {s}")));
    }
    Ok(())
}

struct XentK;

pub fn create_xent(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(XentK, init))
}

fn xent<T: FloatNum>(pool: &dyn IntraOpPool, logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = logits.shape().dim(1);
    let ls = labels.as_slice::<T>()?;
    xent_rows::<T>(pool, logits, |i, xrow, m, lse, grad| {
        let mut loss = T::A::ZERO;
        for ((g, v), y) in grad.iter_mut().zip(xrow).zip(&ls[i * c..(i + 1) * c]) {
            let y = y.load();
            loss = loss.add(y.mul(lse.sub(v.load().sub(m))));
            *g = g.sub(y);
        }
        loss
    })
}

impl OpKernel for XentK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (logits, labels) = (ctx.input(0)?, ctx.input(1)?);
        check_logits(logits.shape())?;
        if logits.shape() != labels.shape() || logits.dtype() != labels.dtype() {
            return Err(Error::invalid_argument(format!(
                "logits and labels must be same size: logits_size={} labels_size={}",
                logits.shape(),
                labels.shape()
            )));
        }
        let pool = ctx.intra_op();
        let (loss, back) = dispatch_float!(logits.dtype(), T => xent::<T>(pool, logits, labels)?,
            _ => return Err(unsupported(&ctx.node.op, logits.dtype())));
        ctx.set_output(0, loss);
        ctx.set_output(1, back);
        Ok(())
    }
}

struct SparseXentK;

pub fn create_sparse_xent(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(SparseXentK, init))
}

fn sparse_xent<T: FloatNum>(
    pool: &dyn IntraOpPool,
    logits: &Tensor,
    labels: &[i64],
) -> Result<(Tensor, Tensor)> {
    xent_rows::<T>(pool, logits, |i, xrow, m, lse, grad| {
        let y = labels[i] as usize;
        grad[y] = grad[y].sub(T::A::ONE);
        lse.sub(xrow[y].load().sub(m))
    })
}

impl OpKernel for SparseXentK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (logits, labels) = (ctx.input(0)?, ctx.input(1)?);
        check_logits(logits.shape())?;
        let s = logits.shape();
        if labels.shape().rank() != 1 || labels.shape().dim(0) != s.dim(0) {
            return Err(Error::invalid_argument(format!(
                "labels must be 1-D with the batch size of logits: logits shape {s}, labels shape {}",
                labels.shape()
            )));
        }
        let ys = int_values(labels, "labels")?;
        let c = s.dim(1);
        if let Some(bad) = ys.iter().find(|&&y| y < 0 || y as usize >= c) {
            return Err(Error::invalid_argument(format!(
                "Received a label value of {bad} which is outside the valid range of [0, {c})"
            )));
        }
        let pool = ctx.intra_op();
        let (loss, back) = dispatch_float!(logits.dtype(), T => sparse_xent::<T>(pool, logits, &ys)?,
            _ => return Err(unsupported(&ctx.node.op, logits.dtype())));
        ctx.set_output(0, loss);
        ctx.set_output(1, back);
        Ok(())
    }
}
