//! Data-movement ops: Transpose, ConcatV2, Slice, Gather, Tile, Fill, ZerosLike, OnesLike. They
//! move elements by width, so one body serves every fixed-size dtype. (Reshape, ExpandDims,
//! Squeeze and Shape move no element: they are `rill_graph::kernels`', shared with the GPU.)

use super::{axis_index, by_width, for_chunks, int_values, int_vector, shape_from_ints, words, words_mut};
use rill_graph::{
    dispatch_numeric, DType, Element, Error, IntraOpPool, Kernel, KernelInit, OpKernel, OpKernelContext,
    Result, Shape, Tensor, MAX_RANK,
};

/// `out[i] = x[base + Σ idx_k · strides_k]` over the multi-index `idx` of `out` in `dims`.
/// The common core of Transpose and Slice; rows of the last dim are copied in one go when they
/// are contiguous in `x`.
fn strided_copy<W: Copy + Send + Sync>(
    pool: &dyn IntraOpPool,
    x: &[W],
    base: usize,
    dims: &[usize],
    strides: &[usize],
    out: &mut [W],
) {
    let r = dims.len();
    if out.is_empty() {
        return;
    }
    if r == 0 {
        out[0] = x[base];
        return;
    }
    let inner = dims[r - 1];
    let inner_stride = strides[r - 1];
    for_chunks(pool, out, inner, |off, o| {
        let mut idx = [0usize; MAX_RANK];
        let mut rem = off / inner;
        for k in (0..r - 1).rev() {
            idx[k] = rem % dims[k];
            rem /= dims[k];
        }
        for row in o.chunks_exact_mut(inner) {
            let start = base + (0..r - 1).map(|k| idx[k] * strides[k]).sum::<usize>();
            if inner_stride == 1 {
                row.copy_from_slice(&x[start..start + inner]);
            } else {
                for (j, d) in row.iter_mut().enumerate() {
                    *d = x[start + j * inner_stride];
                }
            }
            for k in (0..r - 1).rev() {
                idx[k] += 1;
                if idx[k] < dims[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
    });
}

struct TransposeK;
impl OpKernel for TransposeK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let perm = int_vector(ctx.input(1)?, "perm")?;
        let s = x.shape();
        let r = s.rank();
        if perm.len() != r {
            return Err(Error::invalid_argument(format!(
                "transpose expects a vector of size {r}; got permutation {perm:?}"
            )));
        }
        let mut seen = [false; MAX_RANK];
        for &p in &perm {
            if p < 0 || p as usize >= r || seen[p as usize] {
                return Err(Error::invalid_argument(format!("{perm:?} is not a valid permutation")));
            }
            seen[p as usize] = true;
        }
        let perm: Vec<usize> = perm.iter().map(|&p| p as usize).collect();
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            ctx.set_output(0, x.clone());
            return Ok(());
        }
        let dims: Vec<usize> = perm.iter().map(|&p| s.dim(p)).collect();
        let st = s.strides();
        let strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        let mut out = Tensor::try_zeros(x.dtype(), Shape::new(&dims)?)?;
        let pool = ctx.intra_op();
        by_width!(x.dtype(), W => {
            strided_copy::<W>(pool, words::<W>(x)?, 0, &dims, &strides, words_mut::<W>(&mut out)?);
            Ok(())
        })?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_transpose(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(TransposeK, init))
}

struct ConcatK;
impl OpKernel for ConcatK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let n = ctx.num_inputs();
        if n < 2 {
            return Err(Error::invalid_argument("ConcatV2 needs at least one value and an axis"));
        }
        let axis = int_values(ctx.input(n - 1)?, "axis")?;
        let [axis] = axis[..] else {
            return Err(Error::invalid_argument("axis must be a scalar"));
        };
        let parts: Vec<&Tensor> = (0..n - 1).map(|i| ctx.input(i)).collect::<Result<_>>()?;
        let first = parts[0];
        let r = first.shape().rank();
        if r == 0 {
            return Err(Error::invalid_argument("Can't concatenate scalars (use tf.stack instead)"));
        }
        let a = axis_index(axis, r)?;
        let mut total = 0usize;
        for (i, p) in parts.iter().enumerate() {
            let ps = p.shape();
            if p.dtype() != first.dtype() {
                return Err(Error::invalid_argument(format!(
                    "value {i} has dtype {}, value 0 has {}",
                    p.dtype(),
                    first.dtype()
                )));
            }
            let same = ps.rank() == r && (0..r).all(|k| k == a || ps.dim(k) == first.shape().dim(k));
            if !same {
                return Err(Error::invalid_argument(format!(
                    "ConcatOp : Dimensions of inputs should match: shape[0] = {} vs. shape[{i}] = {ps}",
                    first.shape()
                )));
            }
            total += ps.dim(a);
        }
        let mut shape = *first.shape();
        shape.set_dim(a, total);
        let outer: usize = shape.dims()[..a].iter().product();
        let inner: usize = shape.dims()[a + 1..].iter().product();
        let mut out = Tensor::try_zeros(first.dtype(), shape)?;
        by_width!(first.dtype(), W => {
            let o = words_mut::<W>(&mut out)?;
            let srcs: Vec<(&[W], usize)> = parts
                .iter()
                .map(|p| Ok((words::<W>(p)?, p.shape().dim(a) * inner)))
                .collect::<Result<_>>()?;
            let mut at = 0;
            for i in 0..outer {
                for (src, len) in &srcs {
                    o[at..at + len].copy_from_slice(&src[i * len..(i + 1) * len]);
                    at += len;
                }
            }
            Ok(())
        })?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_concat(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(ConcatK, init))
}

struct SliceK;
impl OpKernel for SliceK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let begin = int_vector(ctx.input(1)?, "begin")?;
        let size = int_vector(ctx.input(2)?, "size")?;
        let s = x.shape();
        let r = s.rank();
        if begin.len() != r || size.len() != r {
            return Err(Error::invalid_argument(format!(
                "Expected begin and size arguments to be 1-D tensors of size {r}, but got {} and {}",
                begin.len(),
                size.len()
            )));
        }
        let mut dims = vec![0usize; r];
        for i in 0..r {
            let d = s.dim(i) as i64;
            let (b, z) = (begin[i], size[i]);
            let z = if z == -1 { d - b } else { z };
            if b < 0 || z < 0 || b + z > d {
                return Err(Error::invalid_argument(format!(
                    "Expected begin[{i}] in [0, {d}] and size[{i}] in [0, {}], but got {} and {}",
                    d - b.clamp(0, d),
                    begin[i],
                    size[i]
                )));
            }
            dims[i] = z as usize;
        }
        let st = s.strides();
        let base: usize = (0..r).map(|i| begin[i] as usize * st[i]).sum();
        let mut out = Tensor::try_zeros(x.dtype(), Shape::new(&dims)?)?;
        let pool = ctx.intra_op();
        by_width!(x.dtype(), W => {
            strided_copy::<W>(pool, words::<W>(x)?, base, &dims, &st[..r], words_mut::<W>(&mut out)?);
            Ok(())
        })?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_slice(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(SliceK, init))
}

struct GatherK;
impl OpKernel for GatherK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let params = ctx.input(0)?;
        let indices = ctx.input(1)?;
        let ps = params.shape();
        if ps.rank() == 0 {
            return Err(Error::invalid_argument("params must be at least 1 dimensional"));
        }
        let idx = int_values(indices, "indices")?;
        let rows = ps.dim(0);
        for (i, &v) in idx.iter().enumerate() {
            if v < 0 || v as usize >= rows {
                return Err(Error::invalid_argument(format!("indices[{i}] = {v} is not in [0, {rows})")));
            }
        }
        let mut dims = indices.shape().dims().to_vec();
        dims.extend_from_slice(&ps.dims()[1..]);
        let inner = ps.tail().num_elements();
        let mut out = Tensor::try_zeros(params.dtype(), Shape::new(&dims)?)?;
        by_width!(params.dtype(), W => {
            let src = words::<W>(params)?;
            let o = words_mut::<W>(&mut out)?;
            if inner > 0 {
                for (row, &v) in o.chunks_exact_mut(inner).zip(&idx) {
                    let at = v as usize * inner;
                    row.copy_from_slice(&src[at..at + inner]);
                }
            }
            Ok(())
        })?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_gather(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(GatherK, init))
}

struct TileK;
impl OpKernel for TileK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let mult = int_vector(ctx.input(1)?, "multiples")?;
        let s = x.shape();
        let r = s.rank();
        if mult.len() != r {
            return Err(Error::invalid_argument(format!(
                "Expected multiples argument to be a vector of length {r} but got length {}",
                mult.len()
            )));
        }
        if let Some(m) = mult.iter().find(|&&m| m < 0) {
            return Err(Error::invalid_argument(format!("Expected multiples to be non-negative, got {m}")));
        }
        let dims: Vec<i64> = s.dims().iter().zip(&mult).map(|(&d, &m)| d as i64 * m).collect();
        let shape = shape_from_ints(&dims, "tiled shape")?;
        let mut out = Tensor::try_zeros(x.dtype(), shape)?;
        if r == 0 {
            ctx.set_output(0, x.clone());
            return Ok(());
        }
        let st = s.strides();
        by_width!(x.dtype(), W => {
            let src = words::<W>(x)?;
            let o = words_mut::<W>(&mut out)?;
            let inner_in = s.dim(r - 1);
            let inner_out = shape.dim(r - 1);
            if inner_out > 0 {
                let mut idx = [0usize; MAX_RANK];
                for row in o.chunks_exact_mut(inner_out) {
                    let start: usize = (0..r - 1).map(|k| (idx[k] % s.dim(k)) * st[k]).sum();
                    for (d, v) in row.iter_mut().zip(src[start..start + inner_in].iter().cycle()) {
                        *d = *v;
                    }
                    for k in (0..r - 1).rev() {
                        idx[k] += 1;
                        if idx[k] < shape.dim(k) {
                            break;
                        }
                        idx[k] = 0;
                    }
                }
            }
            Ok(())
        })?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_tile(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(TileK, init))
}

/// A tensor of `shape` with every element equal to the one element of `value`.
fn filled(value: &Tensor, shape: Shape) -> Result<Tensor> {
    let mut out = Tensor::try_zeros(value.dtype(), shape)?;
    by_width!(value.dtype(), W => {
        let v = words::<W>(value)?[0];
        words_mut::<W>(&mut out)?.fill(v);
        Ok(())
    })?;
    Ok(out)
}

struct FillK;
impl OpKernel for FillK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let dims = ctx.input(0)?;
        if dims.shape().rank() != 1 {
            return Err(Error::invalid_argument(format!(
                "dims must be a vector, got shape {}",
                dims.shape()
            )));
        }
        let value = ctx.input(1)?;
        if value.shape().rank() != 0 {
            return Err(Error::invalid_argument(format!(
                "value must be a scalar, got shape {}",
                value.shape()
            )));
        }
        let shape = shape_from_ints(&int_values(dims, "dims")?, "dims")?;
        let out = filled(value, shape)?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_fill(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(FillK, init))
}

struct LikeK {
    one: bool,
}
impl OpKernel for LikeK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let out = if self.one {
            let one = dispatch_numeric!(x.dtype(), T => Tensor::scalar(T::from_f64(1.0)), _ => match x.dtype() {
                DType::Bool => Tensor::scalar_bool(true),
                d => return Err(Error::invalid_argument(format!("OnesLike does not support {d}"))),
            });
            filled(&one, *x.shape())?
        } else {
            Tensor::try_zeros(x.dtype(), *x.shape())?
        };
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_zeros_like(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(LikeK { one: false }, init))
}

pub fn create_ones_like(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(LikeK { one: true }, init))
}
