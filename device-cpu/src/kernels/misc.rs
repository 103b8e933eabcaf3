//! Comparisons, AddN, ArgMax and the two gradient helpers, BroadcastGradientArgs and SumToShape.

use super::elementwise::{broadcast_into, broadcast_shape};
use super::reduce::{reduce_into, ReduceOp};
use super::{axis_index, for_chunks, int_values, int_vector, unsupported, Arith, Num};
use rill_graph::{
    dispatch_numeric, AttrsExt, DType, Error, IntraOpPool, Kernel, KernelInit, OpKernel, OpKernelContext,
    Result, Shape, Tensor,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

struct CompareK {
    cmp: Cmp,
}

pub fn create_compare(init: &KernelInit<'_>) -> Result<Kernel> {
    let cmp = match init.node.op.as_str() {
        "Equal" => Cmp::Eq,
        "NotEqual" => Cmp::Ne,
        "Greater" => Cmp::Gt,
        "GreaterEqual" => Cmp::Ge,
        "Less" => Cmp::Lt,
        "LessEqual" => Cmp::Le,
        other => return Err(Error::internal(format!("no comparison kernel for {other}"))),
    };
    Ok(Kernel::sized(CompareK { cmp }, init))
}

/// `a <cmp> b` elementwise with broadcasting, into bool bytes.
fn compare<T: Copy + Sync, C: PartialOrd>(
    pool: &dyn IntraOpPool,
    cmp: Cmp,
    a: &[T],
    sa: &Shape,
    b: &[T],
    sb: &Shape,
    load: impl Fn(T) -> C + Sync,
) -> Result<Tensor> {
    let so = broadcast_shape(sa, sb)?;
    let mut out = Tensor::try_zeros(DType::Bool, so)?;
    let o = out.as_bytes_mut()?;
    macro_rules! run {
        ($op:tt) => {
            broadcast_into(pool, a, sa, b, sb, o, &so, |x: T, y: T| (load(x) $op load(y)) as u8)
        };
    }
    match cmp {
        Cmp::Eq => run!(==),
        Cmp::Ne => run!(!=),
        Cmp::Gt => run!(>),
        Cmp::Ge => run!(>=),
        Cmp::Lt => run!(<),
        Cmp::Le => run!(<=),
    }
    Ok(out)
}

impl OpKernel for CompareK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (a, b) = (ctx.input(0)?, ctx.input(1)?);
        if a.dtype() != b.dtype() {
            return Err(Error::invalid_argument(format!("cannot compare {} with {}", a.dtype(), b.dtype())));
        }
        let pool = ctx.intra_op();
        let (sa, sb) = (a.shape(), b.shape());
        let out = dispatch_numeric!(a.dtype(), T => {
            compare(pool, self.cmp, a.as_slice::<T>()?, sa, b.as_slice::<T>()?, sb, |v: T| v.load())?
        }, _ => match a.dtype() {
            DType::Bool => compare(pool, self.cmp, a.bool_bytes()?, sa, b.bool_bytes()?, sb, |v: u8| v != 0)?,
            d => return Err(unsupported(&ctx.node.op, d)),
        });
        ctx.set_output(0, out);
        Ok(())
    }
}

struct AddNK;

pub fn create_add_n(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(AddNK, init))
}

fn add_n<T: Num>(pool: &dyn IntraOpPool, xs: &[&Tensor]) -> Result<Tensor> {
    let mut out = Tensor::try_zeros(T::DTYPE, *xs[0].shape())?;
    let srcs: Vec<&[T]> = xs.iter().map(|t| t.as_slice::<T>()).collect::<Result<_>>()?;
    for_chunks(pool, out.as_mut_slice::<T>()?, 1, |off, o| {
        let mut acc = vec![T::A::ZERO; o.len()];
        for s in &srcs {
            for (a, v) in acc.iter_mut().zip(&s[off..off + o.len()]) {
                *a = a.add(v.load());
            }
        }
        for (d, a) in o.iter_mut().zip(acc) {
            *d = T::store(a);
        }
    });
    Ok(out)
}

impl OpKernel for AddNK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let xs: Vec<&Tensor> = (0..ctx.num_inputs()).map(|i| ctx.input(i)).collect::<Result<_>>()?;
        let Some(first) = xs.first() else {
            return Err(Error::invalid_argument("AddN needs at least one input"));
        };
        for (i, x) in xs.iter().enumerate() {
            if x.shape() != first.shape() || x.dtype() != first.dtype() {
                return Err(Error::invalid_argument(format!(
                    "inputs to AddN must have one dtype and shape: input 0 is {} {}, input {i} is {} {}",
                    first.dtype(),
                    first.shape(),
                    x.dtype(),
                    x.shape()
                )));
            }
        }
        let pool = ctx.intra_op();
        let out = dispatch_numeric!(first.dtype(), T => add_n::<T>(pool, &xs)?,
            _ => return Err(unsupported("AddN", first.dtype())));
        ctx.set_output(0, out);
        Ok(())
    }
}

struct ArgMaxK {
    out_type: DType,
}

pub fn create_argmax(init: &KernelInit<'_>) -> Result<Kernel> {
    let out_type = init.attrs().dtype("output_type").unwrap_or(DType::I64);
    if !matches!(out_type, DType::I32 | DType::I64) {
        return Err(Error::invalid_argument(format!("output_type must be int32 or int64, is {out_type}")));
    }
    Ok(Kernel::sized(ArgMaxK { out_type }, init))
}

/// The index of the first maximum along the middle dim of `x` viewed as [outer, n, inner]. NaN
/// counts as the maximum, as in TensorFlow.
fn argmax<T: Num>(x: &[T], n: usize, inner: usize, out: &mut [i64]) {
    for (o, chunk) in out.chunks_mut(inner.max(1)).enumerate() {
        for (j, d) in chunk.iter_mut().enumerate() {
            let at = |i: usize| x[(o * n + i) * inner + j].load();
            let mut best = 0;
            let mut bv = at(0);
            for i in 1..n {
                let v = at(i);
                // Float NaN wins and stays: `v != v` only for NaN.
                #[allow(clippy::eq_op)]
                let v_nan = v != v;
                #[allow(clippy::eq_op)]
                let b_nan = bv != bv;
                if !b_nan && (v > bv || v_nan) {
                    best = i;
                    bv = v;
                }
            }
            *d = best as i64;
        }
    }
}

impl OpKernel for ArgMaxK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let axis = int_values(ctx.input(1)?, "dimension")?;
        let [axis] = axis[..] else {
            return Err(Error::invalid_argument("dimension must be a scalar"));
        };
        let s = x.shape();
        let a = axis_index(axis, s.rank())?;
        let n = s.dim(a);
        let mut dims = s.dims().to_vec();
        dims.remove(a);
        let shape = Shape::new(&dims)?;
        if n == 0 && shape.num_elements() > 0 {
            return Err(Error::invalid_argument(format!("Reduction axis {axis} is empty in shape {s}")));
        }
        let inner: usize = s.dims()[a + 1..].iter().product();
        let mut idx = vec![0i64; shape.num_elements()];
        if !idx.is_empty() {
            dispatch_numeric!(x.dtype(), T => argmax::<T>(x.as_slice::<T>()?, n, inner, &mut idx),
                _ => return Err(unsupported("ArgMax", x.dtype())));
        }
        let out = match self.out_type {
            DType::I32 => Tensor::new(shape, &idx.iter().map(|&v| v as i32).collect::<Vec<_>>())?,
            _ => Tensor::new(shape, &idx)?,
        };
        ctx.set_output(0, out);
        Ok(())
    }
}

/// The axes each side of a broadcast must sum over to get its gradient, as TensorFlow's
/// `BroadcastGradientArgs`: dims where that side is 1 (or absent) and the result is not, plus
/// dims where both sides are 1.
pub(crate) fn broadcast_gradient_args(s0: &[i64], s1: &[i64]) -> Result<(Vec<i64>, Vec<i64>)> {
    let n = s0.len().max(s1.len());
    let (mut r0, mut r1) = (Vec::new(), Vec::new());
    for i in 0..n {
        let d0 = if i < n - s0.len() { 1 } else { s0[i - (n - s0.len())] };
        let d1 = if i < n - s1.len() { 1 } else { s1[i - (n - s1.len())] };
        let axis = i as i64;
        match (d0, d1) {
            (1, 1) => {
                r0.push(axis);
                r1.push(axis);
            }
            (1, _) => r0.push(axis),
            (_, 1) => r1.push(axis),
            (p, q) if p == q => {}
            _ => {
                return Err(Error::invalid_argument(format!("Incompatible shapes: {s0:?} vs. {s1:?}")));
            }
        }
    }
    Ok((r0, r1))
}

struct BroadcastGradientArgsK;

pub fn create_broadcast_gradient_args(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(BroadcastGradientArgsK))
}

impl OpKernel for BroadcastGradientArgsK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (a, b) = (ctx.input(0)?, ctx.input(1)?);
        let (s0, s1) = (int_vector(a, "s0")?, int_vector(b, "s1")?);
        if let Some(d) = s0.iter().chain(&s1).find(|&&d| d < 0) {
            return Err(Error::invalid_argument(format!(
                "shapes must not have negative dimensions, got {d}"
            )));
        }
        let (r0, r1) = broadcast_gradient_args(&s0, &s1)?;
        let wide = a.dtype() == DType::I64;
        let as_tensor = |v: Vec<i64>| -> Tensor {
            if wide {
                Tensor::vector(&v)
            } else {
                Tensor::vector(&v.iter().map(|&x| x as i32).collect::<Vec<_>>())
            }
        };
        ctx.set_output(0, as_tensor(r0));
        ctx.set_output(1, as_tensor(r1));
        Ok(())
    }
}

struct SumToShapeK;

pub fn create_sum_to_shape(init: &KernelInit<'_>) -> Result<Kernel> {
    let small = init
        .input_types
        .first()
        .and_then(|t| t.shape.num_elements())
        .is_some_and(|n| n <= rill_graph::kernel::INLINE_MAX_ELEMENTS);
    Ok(if small { Kernel::cheap(SumToShapeK) } else { Kernel::expensive(SumToShapeK) })
}

fn sum_to<T: Num>(pool: &dyn IntraOpPool, x: &Tensor, reduced: &[bool], target: Shape) -> Result<Tensor> {
    let mut out = Tensor::try_zeros(T::DTYPE, target)?;
    reduce_into::<T>(pool, ReduceOp::Sum, x.as_slice::<T>()?, x.shape(), reduced, out.as_mut_slice::<T>()?);
    Ok(out)
}

impl OpKernel for SumToShapeK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let target = super::shape_from_ints(&int_vector(ctx.input(1)?, "shape")?, "shape")?;
        let s = x.shape();
        let (n, t) = (s.rank(), target.rank());
        let bad = || Error::invalid_argument(format!("cannot sum a tensor of shape {s} to shape {target}"));
        if t > n {
            return Err(bad());
        }
        // Leading dims absent from the target and dims where the target is 1 are summed away.
        let mut reduced = vec![false; n];
        for (i, r) in reduced.iter_mut().enumerate() {
            if i < n - t {
                *r = true;
                continue;
            }
            let (d, e) = (s.dim(i), target.dim(i - (n - t)));
            if d != e {
                if e != 1 {
                    return Err(bad());
                }
                *r = true;
            }
        }
        if x.shape() == &target {
            ctx.set_output(0, x.clone());
            return Ok(());
        }
        let pool = ctx.intra_op();
        let out = dispatch_numeric!(x.dtype(), T => sum_to::<T>(pool, x, &reduced, target)?,
            _ => return Err(unsupported("SumToShape", x.dtype())));
        ctx.set_output(0, out);
        Ok(())
    }
}
