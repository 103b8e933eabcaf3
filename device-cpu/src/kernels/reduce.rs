//! Reductions over axes: Sum, Mean, Max, Min, Prod (TensorFlow's `keep_dims` and axis rules).

use super::{axis_index, for_chunks, int_vector, unsupported, Arith, Num};
use rill_graph::device::parallel_chunks_mut;
use rill_graph::{
    dispatch_numeric, AttrsExt, Error, IntraOpPool, Kernel, KernelInit, OpKernel, OpKernelContext, Result,
    Shape, Tensor, MAX_RANK,
};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
}

impl ReduceOp {
    #[inline(always)]
    fn identity<A: Arith>(self) -> A {
        match self {
            ReduceOp::Sum | ReduceOp::Mean => A::ZERO,
            ReduceOp::Prod => A::ONE,
            ReduceOp::Max => A::LOWEST,
            ReduceOp::Min => A::HIGHEST,
        }
    }

    #[inline(always)]
    fn combine<A: Arith>(self, acc: A, x: A) -> A {
        match self {
            ReduceOp::Sum | ReduceOp::Mean => acc.add(x),
            ReduceOp::Prod => acc.mul(x),
            ReduceOp::Max => acc.max(x),
            ReduceOp::Min => acc.min(x),
        }
    }
}

/// Reduces a contiguous run; eight independent accumulators let the loop vectorise and keep
/// float sums more accurate than one running total.
#[inline(always)]
fn reduce_run<T: Num>(op: ReduceOp, x: &[T]) -> T::A {
    const LANES: usize = 8;
    let mut acc = [op.identity::<T::A>(); LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = op.combine(*a, v.load());
        }
    }
    let mut r = op.identity::<T::A>();
    for v in chunks.remainder() {
        r = op.combine(r, v.load());
    }
    acc.iter().fold(r, |r, &a| op.combine(r, a))
}

/// Adds each row of `x` (rows of `out.len()` elements) into `acc`.
#[inline(always)]
fn reduce_rows_into<T: Num>(op: ReduceOp, x: &[T], acc: &mut [T::A]) {
    for row in x.chunks_exact(acc.len()) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a = op.combine(*a, v.load());
        }
    }
}

/// Reduces `x` of `shape` over the dims flagged in `reduced` into `out`, whose elements are the
/// kept dims in order. Works in the compute type and stores once at the end.
pub(crate) fn reduce_into<T: Num>(
    pool: &dyn IntraOpPool,
    op: ReduceOp,
    x: &[T],
    shape: &Shape,
    reduced: &[bool],
    out: &mut [T],
) {
    let count: usize = shape.dims().iter().zip(reduced).filter(|(_, &r)| r).map(|(d, _)| d).product();
    let finish = |a: T::A| T::store(if op == ReduceOp::Mean { a.div_count(count) } else { a });
    if x.is_empty() {
        out.fill(finish(op.identity()));
        return;
    }
    // Merge runs of adjacent dims that are all reduced or all kept; size-1 dims drop out.
    let mut groups: Vec<(usize, bool)> = Vec::new();
    for (&d, &r) in shape.dims().iter().zip(reduced) {
        if d == 1 {
            continue;
        }
        match groups.last_mut() {
            Some(g) if g.1 == r => g.0 *= d,
            _ => groups.push((d, r)),
        }
    }
    match groups.as_slice() {
        [] | [(_, false)] => {
            for (o, v) in out.iter_mut().zip(x) {
                *o = finish(v.load());
            }
        }
        [(n, true)] => {
            // Partial results per chunk, combined in order, so the answer does not depend on
            // the pool's size beyond the chunking.
            let parts =
                if *n >= 4 * super::PARALLEL_MIN_ELEMENTS { pool.num_threads().max(1) * 4 } else { 1 };
            let chunk = n.div_ceil(parts);
            let mut partial = vec![op.identity::<T::A>(); n.div_ceil(chunk)];
            parallel_chunks_mut(pool, &mut partial, 1, |i, p| {
                p[0] = reduce_run::<T>(op, &x[i * chunk..((i + 1) * chunk).min(*n)]);
            });
            out[0] = finish(partial.iter().fold(op.identity(), |r, &a| op.combine(r, a)));
        }
        [(_, false), (n, true)] => {
            for_chunks(pool, out, 1, |off, o| {
                for (i, v) in o.iter_mut().enumerate() {
                    let row = off + i;
                    *v = finish(reduce_run::<T>(op, &x[row * n..(row + 1) * n]));
                }
            });
        }
        [(_, true), (k, false)] => {
            // Column reduction: each chunk of columns walks every row.
            let k = *k;
            for_chunks(pool, out, 1, |off, o| {
                let mut acc = vec![op.identity::<T::A>(); o.len()];
                for row in x.chunks_exact(k) {
                    for (a, v) in acc.iter_mut().zip(&row[off..off + o.len()]) {
                        *a = op.combine(*a, v.load());
                    }
                }
                for (d, a) in o.iter_mut().zip(acc) {
                    *d = finish(a);
                }
            });
        }
        _ => general::<T>(op, x, &groups, out, finish),
    }
}

/// Any pattern of reduced and kept dims: walk the outer groups with an odometer, handling the
/// innermost group as a contiguous run.
fn general<T: Num>(
    op: ReduceOp,
    x: &[T],
    groups: &[(usize, bool)],
    out: &mut [T],
    finish: impl Fn(T::A) -> T,
) {
    let m = groups.len();
    let mut out_stride = vec![0usize; m];
    let mut acc_len = 1;
    for i in (0..m).rev() {
        if !groups[i].1 {
            out_stride[i] = acc_len;
            acc_len *= groups[i].0;
        }
    }
    let mut acc = vec![op.identity::<T::A>(); acc_len];
    let (inner, inner_reduced) = groups[m - 1];
    let mut idx = [0usize; MAX_RANK];
    for run in x.chunks_exact(inner) {
        let o: usize = (0..m - 1).map(|k| idx[k] * out_stride[k]).sum();
        if inner_reduced {
            acc[o] = op.combine(acc[o], reduce_run::<T>(op, run));
        } else {
            reduce_rows_into::<T>(op, run, &mut acc[o..o + inner]);
        }
        for k in (0..m - 1).rev() {
            idx[k] += 1;
            if idx[k] < groups[k].0 {
                break;
            }
            idx[k] = 0;
        }
    }
    for (d, a) in out.iter_mut().zip(acc) {
        *d = finish(a);
    }
}

/// The output shape of reducing `shape` over `reduced`.
pub(crate) fn reduced_shape(shape: &Shape, reduced: &[bool], keep_dims: bool) -> Result<Shape> {
    let mut dims = Vec::with_capacity(shape.rank());
    for (&d, &r) in shape.dims().iter().zip(reduced) {
        if !r {
            dims.push(d);
        } else if keep_dims {
            dims.push(1);
        }
    }
    Shape::new(&dims)
}

struct ReduceK {
    op: ReduceOp,
    keep_dims: bool,
}

pub fn create_reduce(init: &KernelInit<'_>) -> Result<Kernel> {
    let op = match init.node.op.as_str() {
        "Sum" => ReduceOp::Sum,
        "Mean" => ReduceOp::Mean,
        "Max" => ReduceOp::Max,
        "Min" => ReduceOp::Min,
        "Prod" => ReduceOp::Prod,
        other => return Err(Error::internal(format!("no reduction kernel for {other}"))),
    };
    // The output is small when it reduces a large input, so the input decides where it runs.
    let small_input = init
        .input_types
        .first()
        .and_then(|t| t.shape.num_elements())
        .is_some_and(|n| n <= rill_graph::kernel::INLINE_MAX_ELEMENTS);
    let k = ReduceK { op, keep_dims: init.attrs().bool_or("keep_dims", false) };
    Ok(if small_input { Kernel::cheap(k) } else { Kernel::expensive(k) })
}

fn reduce_typed<T: Num>(
    pool: &dyn IntraOpPool,
    op: ReduceOp,
    x: &Tensor,
    reduced: &[bool],
    keep: bool,
) -> Result<Tensor> {
    let mut out = Tensor::try_zeros(T::DTYPE, reduced_shape(x.shape(), reduced, keep)?)?;
    reduce_into::<T>(pool, op, x.as_slice::<T>()?, x.shape(), reduced, out.as_mut_slice::<T>()?);
    Ok(out)
}

impl OpKernel for ReduceK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let axes = int_vector(ctx.input(1)?, "reduction indices")?;
        let rank = x.shape().rank();
        let mut reduced = vec![false; rank];
        for &a in &axes {
            // A scalar may be reduced over axis 0 or -1, as TensorFlow allows.
            if rank == 0 && (a == 0 || a == -1) {
                continue;
            }
            reduced[axis_index(a, rank)?] = true;
        }
        let pool = ctx.intra_op();
        let out = dispatch_numeric!(x.dtype(), T => reduce_typed::<T>(pool, self.op, x, &reduced, self.keep_dims)?,
            _ => return Err(unsupported(&ctx.node.op, x.dtype())));
        ctx.set_output(0, out);
        Ok(())
    }
}
