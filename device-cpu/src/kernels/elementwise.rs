//! Element-wise arithmetic: binary ops with NumPy broadcasting and the unary math ops.

use super::{for_chunks, map_into, unsupported, Arith, Float, FloatNum, Num};
use rill_graph::{
    dispatch_float, dispatch_numeric, Device, Error, IntraOpPool, Kernel, KernelInit, OpKernel,
    OpKernelContext, Result, Shape, Tensor, MAX_RANK,
};

/// The broadcast shape of two shapes, or TensorFlow's "Incompatible shapes" error.
pub(crate) fn broadcast_shape(a: &Shape, b: &Shape) -> Result<Shape> {
    let n = a.rank().max(b.rank());
    let mut out = [0usize; MAX_RANK];
    for (i, o) in out.iter_mut().enumerate().take(n) {
        let da = if i < n - a.rank() { 1 } else { a.dim(i - (n - a.rank())) };
        let db = if i < n - b.rank() { 1 } else { b.dim(i - (n - b.rank())) };
        *o = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::invalid_argument(format!("Incompatible shapes: {a} vs. {b}")));
        };
    }
    Shape::new(&out[..n])
}

/// The iteration space of a broadcast: output dims with runs of dims that broadcast alike merged,
/// and each input's strides (0 along dims it broadcasts).
struct Plan {
    dims: Vec<usize>,
    sa: Vec<usize>,
    sb: Vec<usize>,
}

fn plan(a: &Shape, b: &Shape, out: &Shape) -> Plan {
    let n = out.rank();
    let pad = |s: &Shape, i: usize| if i < n - s.rank() { 1 } else { s.dim(i - (n - s.rank())) };
    // (size, a broadcasts, b broadcasts) per output dim, dropping dims of size 1.
    let mut groups: Vec<(usize, bool, bool)> = Vec::new();
    for i in 0..n {
        let d = out.dim(i);
        if d == 1 {
            continue;
        }
        let fa = pad(a, i) == 1;
        let fb = pad(b, i) == 1;
        match groups.last_mut() {
            Some(g) if g.1 == fa && g.2 == fb => g.0 *= d,
            _ => groups.push((d, fa, fb)),
        }
    }
    let strides = |pick: fn(&(usize, bool, bool)) -> bool| {
        let mut st = vec![0; groups.len()];
        let mut acc = 1;
        for (i, g) in groups.iter().enumerate().rev() {
            if !pick(g) {
                st[i] = acc;
                acc *= g.0;
            }
        }
        st
    };
    Plan { dims: groups.iter().map(|g| g.0).collect(), sa: strides(|g| g.1), sb: strides(|g| g.2) }
}

/// `out = f(a, b)` with NumPy broadcasting; `out` has the broadcast shape `so` of `sa` and `sb`.
/// Same shapes and scalar operands take plain loops that vectorise; the rest walks rows of the
/// innermost merged dimension.
pub(crate) fn broadcast_into<A: Copy + Sync, B: Copy + Sync, O: Copy + Send>(
    pool: &dyn IntraOpPool,
    a: &[A],
    sa: &Shape,
    b: &[B],
    sb: &Shape,
    out: &mut [O],
    so: &Shape,
    f: impl Fn(A, B) -> O + Sync,
) {
    let n = out.len();
    if n == 0 {
        return;
    }
    if a.len() == n && b.len() == n {
        for_chunks(pool, out, 1, |off, o| {
            let (a, b) = (&a[off..off + o.len()], &b[off..off + o.len()]);
            for ((d, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *d = f(x, y);
            }
        });
        return;
    }
    if b.len() == 1 && a.len() == n {
        let y = b[0];
        return map_into(pool, a, out, |x| f(x, y));
    }
    if a.len() == 1 && b.len() == n {
        let x = a[0];
        return map_into(pool, b, out, |y| f(x, y));
    }
    let p = plan(sa, sb, so);
    let r = p.dims.len();
    let inner = p.dims[r - 1];
    let (ia, ib) = (p.sa[r - 1], p.sb[r - 1]);
    for_chunks(pool, out, inner, |off, o| {
        // Odometer over the outer dims, starting at this chunk's first row.
        let mut idx = [0usize; MAX_RANK];
        let mut rem = off / inner;
        for k in (0..r - 1).rev() {
            idx[k] = rem % p.dims[k];
            rem /= p.dims[k];
        }
        for row in o.chunks_mut(inner) {
            let oa: usize = (0..r - 1).map(|k| idx[k] * p.sa[k]).sum();
            let ob: usize = (0..r - 1).map(|k| idx[k] * p.sb[k]).sum();
            match (ia, ib) {
                (1, 1) => {
                    let (x, y) = (&a[oa..oa + inner], &b[ob..ob + inner]);
                    for ((d, &x), &y) in row.iter_mut().zip(x).zip(y) {
                        *d = f(x, y);
                    }
                }
                (1, _) => {
                    let y = b[ob];
                    for (d, &x) in row.iter_mut().zip(&a[oa..oa + inner]) {
                        *d = f(x, y);
                    }
                }
                _ => {
                    let x = a[oa];
                    for (d, &y) in row.iter_mut().zip(&b[ob..ob + inner]) {
                        *d = f(x, y);
                    }
                }
            }
            for k in (0..r - 1).rev() {
                idx[k] += 1;
                if idx[k] < p.dims[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
    });
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    SquaredDifference,
}

struct BinaryK {
    op: BinOp,
}

pub fn create_binary(init: &KernelInit<'_>) -> Result<Kernel> {
    let op = match init.node.op.as_str() {
        "Add" | "AddV2" => BinOp::Add,
        "Sub" => BinOp::Sub,
        "Mul" => BinOp::Mul,
        "Div" | "RealDiv" => BinOp::Div,
        "Pow" => BinOp::Pow,
        "Maximum" => BinOp::Max,
        "Minimum" => BinOp::Min,
        "SquaredDifference" => BinOp::SquaredDifference,
        other => return Err(Error::internal(format!("no binary kernel for {other}"))),
    };
    Ok(Kernel::sized(BinaryK { op }, init))
}

fn binary_typed<T: Num>(dev: &dyn Device, op: BinOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let pool = dev.intra_op();
    let so = broadcast_shape(a.shape(), b.shape())?;
    let (x, y) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
    if !T::A::IS_FLOAT {
        if op == BinOp::Div && y.iter().any(|v| v.load().is_zero()) {
            return Err(Error::invalid_argument("Integer division by zero"));
        }
        if op == BinOp::Pow && y.iter().any(|v| v.load().is_negative()) {
            return Err(Error::invalid_argument("Integers to negative integer powers are not allowed"));
        }
    }
    // Every element is written below, so the buffer may be recycled.
    let mut out = dev.allocate(T::DTYPE, so)?;
    let o = out.as_mut_slice::<T>()?;
    let (sa, sb) = (a.shape(), b.shape());
    macro_rules! run {
        (|$p:ident, $q:ident| $e:expr) => {
            broadcast_into(pool, x, sa, y, sb, o, &so, |p: T, q: T| {
                let ($p, $q) = (p.load(), q.load());
                T::store($e)
            })
        };
    }
    match op {
        BinOp::Add => run!(|p, q| p.add(q)),
        BinOp::Sub => run!(|p, q| p.sub(q)),
        BinOp::Mul => run!(|p, q| p.mul(q)),
        BinOp::Div => run!(|p, q| p.div(q)),
        BinOp::Pow => run!(|p, q| p.pow(q)),
        BinOp::Max => run!(|p, q| p.max(q)),
        BinOp::Min => run!(|p, q| p.min(q)),
        BinOp::SquaredDifference => run!(|p, q| {
            let d = p.sub(q);
            d.mul(d)
        }),
    }
    Ok(out)
}

/// The f32 scalar case, the most common tiny op (loop counters, learning rates, chains of
/// scalars): no broadcasting and no buffer, just the value.
fn scalar_f32(op: BinOp, a: &Tensor, b: &Tensor) -> Option<Tensor> {
    let (p, q) = (a.inline_scalar::<f32>()?, b.inline_scalar::<f32>()?);
    let r = match op {
        BinOp::Add => p + q,
        BinOp::Sub => p - q,
        BinOp::Mul => p * q,
        BinOp::Div => p / q,
        _ => return None,
    };
    Some(Tensor::scalar(r))
}

impl OpKernel for BinaryK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (a, b) = (ctx.input(0)?, ctx.input(1)?);
        if let Some(t) = scalar_f32(self.op, a, b) {
            ctx.set_output(0, t);
            return Ok(());
        }
        if a.dtype() != b.dtype() {
            return Err(Error::invalid_argument(format!(
                "inputs have different dtypes: {} and {}",
                a.dtype(),
                b.dtype()
            )));
        }
        let dev = &**ctx.device();
        let out = dispatch_numeric!(a.dtype(), T => binary_typed::<T>(dev, self.op, a, b)?,
            _ => return Err(unsupported(&ctx.node.op, a.dtype())));
        ctx.set_output(0, out);
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum UnOp {
    Neg,
    Abs,
    Square,
    Sign,
    Sqrt,
    Rsqrt,
    Reciprocal,
    Exp,
    Log,
}

struct UnaryK {
    op: UnOp,
}

pub fn create_unary(init: &KernelInit<'_>) -> Result<Kernel> {
    let op = match init.node.op.as_str() {
        "Neg" => UnOp::Neg,
        "Abs" => UnOp::Abs,
        "Square" => UnOp::Square,
        "Sign" => UnOp::Sign,
        "Sqrt" => UnOp::Sqrt,
        "Rsqrt" => UnOp::Rsqrt,
        "Reciprocal" => UnOp::Reciprocal,
        "Exp" => UnOp::Exp,
        "Log" => UnOp::Log,
        other => return Err(Error::internal(format!("no unary kernel for {other}"))),
    };
    Ok(Kernel::sized(UnaryK { op }, init))
}

/// Applies `f` in the compute type to every element of `x`, into an output from the device's
/// allocator (every element is written).
pub(crate) fn unary_map<T: Num>(
    dev: &dyn Device,
    x: &Tensor,
    f: impl Fn(T::A) -> T::A + Sync,
) -> Result<Tensor> {
    let mut out = dev.allocate(T::DTYPE, *x.shape())?;
    map_into(dev.intra_op(), x.as_slice::<T>()?, out.as_mut_slice::<T>()?, |v| T::store(f(v.load())));
    Ok(out)
}

fn numeric_unary<T: Num>(dev: &dyn Device, op: UnOp, x: &Tensor) -> Result<Option<Tensor>> {
    Ok(Some(match op {
        UnOp::Neg => unary_map::<T>(dev, x, |v| v.neg())?,
        UnOp::Abs => unary_map::<T>(dev, x, |v| v.abs())?,
        UnOp::Square => unary_map::<T>(dev, x, |v| v.mul(v))?,
        UnOp::Sign => unary_map::<T>(dev, x, |v| v.sign())?,
        _ => return Ok(None),
    }))
}

fn float_unary<T: FloatNum>(dev: &dyn Device, op: UnOp, x: &Tensor) -> Result<Tensor> {
    if let Some(t) = numeric_unary::<T>(dev, op, x)? {
        return Ok(t);
    }
    let one = <T::A as Arith>::ONE;
    match op {
        UnOp::Sqrt => unary_map::<T>(dev, x, |v| v.sqrt()),
        UnOp::Rsqrt => unary_map::<T>(dev, x, |v| one.div(v.sqrt())),
        UnOp::Reciprocal => unary_map::<T>(dev, x, |v| one.div(v)),
        UnOp::Exp => unary_map::<T>(dev, x, |v| v.exp()),
        UnOp::Log => unary_map::<T>(dev, x, |v| v.ln()),
        _ => Err(Error::internal(format!("{op:?} is not a float op"))),
    }
}

impl OpKernel for UnaryK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let dev = &**ctx.device();
        let d = x.dtype();
        let out = if d.is_float() {
            dispatch_float!(d, T => float_unary::<T>(dev, self.op, x)?, _ => unreachable!("float dtype"))
        } else {
            let r = dispatch_numeric!(d, T => numeric_unary::<T>(dev, self.op, x)?, _ => None);
            r.ok_or_else(|| unsupported(&ctx.node.op, d))?
        };
        ctx.set_output(0, out);
        Ok(())
    }
}
