//! MatMul: a cache-blocked f32 GEMM (packed panels, a register-tiled micro-kernel, AVX2/FMA when
//! the CPU has it), f16/bf16 through f32, and a plain row-parallel loop for f64 and integers.

use super::{for_chunks, unsupported, Arith, Num};
use rill_graph::device::{parallel_chunks_mut, InlinePool};
use rill_graph::half::{bf16, f16};
use rill_graph::{
    AttrsExt, DType, Error, IntraOpPool, Kernel, KernelInit, OpKernel, OpKernelContext, Result, Shape, Tensor,
};

/// Rows of the micro-tile: 6 rows × 16 columns keeps 12 AVX2 accumulators in registers.
const MR: usize = 6;
/// Columns of the micro-tile (two 8-lane vectors).
const NR: usize = 16;
/// Depth of a packed block: a 6×256 A sliver and a 256×16 B sliver fit in L1.
const KC: usize = 256;
/// Rows of a packed A block (a multiple of `MR`), sized for L2.
const MC: usize = 96;
/// Columns of a packed B block, sized for L3.
const NC: usize = 2048;

/// A matrix operand as stored (row-major, `ld` elements per stored row), read through an
/// optional transpose.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a, T> {
    data: &'a [T],
    ld: usize,
    trans: bool,
}

impl<'a, T: Copy> Operand<'a, T> {
    pub(crate) fn new(data: &'a [T], ld: usize, trans: bool) -> Operand<'a, T> {
        Operand { data, ld, trans }
    }

    /// Element (row, col) of the operand as used in the product.
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> T {
        if self.trans {
            self.data[c * self.ld + r]
        } else {
            self.data[r * self.ld + c]
        }
    }
}

/// Packs rows `i0..i0+mc`, depth `p0..p0+kc` of A into `MR`-row slivers, depth-major, zero-padded.
fn pack_a(a: &Operand<'_, f32>, i0: usize, mc: usize, p0: usize, kc: usize, buf: &mut [f32]) {
    for (s, sliver) in buf.chunks_exact_mut(MR * kc).enumerate() {
        let r0 = s * MR;
        let rows = MR.min(mc - r0);
        for r in 0..MR {
            if r < rows {
                for p in 0..kc {
                    sliver[p * MR + r] = a.at(i0 + r0 + r, p0 + p);
                }
            } else {
                for p in 0..kc {
                    sliver[p * MR + r] = 0.0;
                }
            }
        }
    }
}

/// Packs depth `p0..p0+kc`, columns `j0..j0+nc` of B into `NR`-column slivers, zero-padded.
fn pack_b(b: &Operand<'_, f32>, p0: usize, kc: usize, j0: usize, nc: usize, buf: &mut [f32]) {
    for (s, sliver) in buf.chunks_exact_mut(NR * kc).enumerate() {
        let c0 = s * NR;
        let cols = NR.min(nc - c0);
        for p in 0..kc {
            let dst = &mut sliver[p * NR..(p + 1) * NR];
            for (c, d) in dst.iter_mut().enumerate() {
                *d = if c < cols { b.at(p0 + p, j0 + c0 + c) } else { 0.0 };
            }
        }
    }
}

/// One `MR`×`NR` tile of packed A times packed B over depth `kc`.
#[inline(always)]
fn micro<const FMA: bool>(a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for r in 0..MR {
            let x = av[r];
            for c in 0..NR {
                acc[r][c] = if FMA { x.mul_add(bv[c], acc[r][c]) } else { acc[r][c] + x * bv[c] };
            }
        }
    }
    acc
}

/// `C[rows, j0..j0+nc] += packed A × packed B` for one packed A block; `c` holds the block's
/// rows of C, `ldc` wide.
#[inline(always)]
fn block<const FMA: bool>(
    pa: &[f32],
    pb: &[f32],
    kc: usize,
    c: &mut [f32],
    ldc: usize,
    j0: usize,
    nc: usize,
) {
    let mc = c.len() / ldc;
    for (sj, bs) in pb.chunks_exact(NR * kc).enumerate() {
        let c0 = sj * NR;
        let cols = NR.min(nc - c0);
        for (si, as_) in pa.chunks_exact(MR * kc).enumerate() {
            let r0 = si * MR;
            let rows = MR.min(mc - r0);
            let acc = micro::<FMA>(as_, bs);
            for (r, acc_row) in acc.iter().enumerate().take(rows) {
                let at = (r0 + r) * ldc + j0 + c0;
                for (d, v) in c[at..at + cols].iter_mut().zip(acc_row) {
                    *d += v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(pa: &[f32], pb: &[f32], kc: usize, c: &mut [f32], ldc: usize, j0: usize, nc: usize) {
    block::<true>(pa, pb, kc, c, ldc, j0, nc)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

#[cfg_attr(target_arch = "x86_64", allow(unsafe_code))]
fn run_block(simd: bool, pa: &[f32], pb: &[f32], kc: usize, c: &mut [f32], ldc: usize, j0: usize, nc: usize) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when `has_avx2_fma()` found both features on this CPU.
        return unsafe { block_avx2(pa, pb, kc, c, ldc, j0, nc) };
    }
    let _ = simd;
    block::<false>(pa, pb, kc, c, ldc, j0, nc)
}

/// `C (m×n, zeroed) += op(A) × op(B)` in f32, split over row blocks on the pool.
fn gemm_f32(
    pool: &dyn IntraOpPool,
    a: Operand<'_, f32>,
    b: Operand<'_, f32>,
    k: usize,
    c: &mut [f32],
    n: usize,
) {
    if c.is_empty() || k == 0 {
        return;
    }
    let m = c.len() / n;
    let simd = has_avx2_fma();
    // Rows per task: enough tasks for every thread, each a whole number of micro-tiles.
    let threads = pool.num_threads().max(1);
    let mc = m.div_ceil(threads).div_ceil(MR).clamp(1, MC / MR) * MR;
    let mut pb = Vec::new();
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            pb.clear();
            pb.resize(nc.div_ceil(NR) * NR * kc, 0.0);
            pack_b(&b, p0, kc, j0, nc, &mut pb);
            let pb = &pb;
            let task = |off: usize, rows: &mut [f32]| {
                let i0 = off / n;
                let rc = rows.len() / n;
                let mut pa = vec![0f32; rc.div_ceil(MR) * MR * kc];
                pack_a(&a, i0, rc, p0, kc, &mut pa);
                run_block(simd, &pa, pb, kc, rows, n, j0, nc);
            };
            if m * n * kc < super::PARALLEL_MIN_ELEMENTS * 8 {
                for (i, rows) in c.chunks_mut(MC * n).enumerate() {
                    task(i * MC * n, rows);
                }
            } else {
                parallel_chunks_mut(pool, c, mc * n, task);
            }
        }
    }
}

/// `C (m×n) += op(A) × op(B)` on the calling thread, for kernels that split their work over the
/// pool themselves (convolutions); f32 through the blocked micro-kernel.
pub(crate) fn gemm_serial<T: Num>(a: Operand<'_, T>, b: Operand<'_, T>, k: usize, c: &mut [T], n: usize) {
    if T::DTYPE != DType::F32 {
        return gemm_plain(&InlinePool, a, b, k, c, n);
    }
    let a = Operand { data: bytemuck::cast_slice::<T, f32>(a.data), ld: a.ld, trans: a.trans };
    let b = Operand { data: bytemuck::cast_slice::<T, f32>(b.data), ld: b.ld, trans: b.trans };
    let c = bytemuck::cast_slice_mut::<T, f32>(c);
    if c.is_empty() || k == 0 {
        return;
    }
    let simd = has_avx2_fma();
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            // The packers write every element, padding included: resizing needs no clearing.
            pb.resize(nc.div_ceil(NR) * NR * kc, 0.0);
            pack_b(&b, p0, kc, j0, nc, &mut pb);
            for (i, rows) in c.chunks_mut(MC * n).enumerate() {
                let rc = rows.len() / n;
                pa.resize(rc.div_ceil(MR) * MR * kc, 0.0);
                pack_a(&a, i * MC, rc, p0, kc, &mut pa);
                run_block(simd, &pa, &pb, kc, rows, n, j0, nc);
            }
        }
    }
}

/// `C += op(A) × op(B)` for f64 and integers: op(B) made row-major once, then rows of C
/// accumulate rows of B (a loop over contiguous memory that vectorises).
fn gemm_plain<T: Num>(
    pool: &dyn IntraOpPool,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    k: usize,
    c: &mut [T],
    n: usize,
) {
    if c.is_empty() {
        return;
    }
    let bm: Vec<T::A> = (0..k * n).map(|i| b.at(i / n, i % n).load()).collect();
    for_chunks(pool, c, n, |off, rows| {
        let i0 = off / n;
        let mut acc = vec![T::A::ZERO; n];
        for (r, row) in rows.chunks_exact_mut(n).enumerate() {
            for (s, d) in acc.iter_mut().zip(row.iter()) {
                *s = d.load();
            }
            for p in 0..k {
                let x = a.at(i0 + r, p).load();
                for (s, &y) in acc.iter_mut().zip(&bm[p * n..(p + 1) * n]) {
                    *s = s.add(x.mul(y));
                }
            }
            for (d, &s) in row.iter_mut().zip(&acc) {
                *d = T::store(s);
            }
        }
    });
}

struct MatMulK {
    ta: bool,
    tb: bool,
}

pub fn create_matmul(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    Ok(Kernel::expensive(MatMulK {
        ta: a.bool_or("transpose_a", false),
        tb: a.bool_or("transpose_b", false),
    }))
}

/// The product's dimensions (m, k, n), checked.
fn dims(a: &Shape, b: &Shape, ta: bool, tb: bool) -> Result<(usize, usize, usize)> {
    if a.rank() != 2 || b.rank() != 2 {
        return Err(Error::invalid_argument(format!("In[0] and In[1] must be matrices, are {a} and {b}")));
    }
    let (m, ka) = if ta { (a.dim(1), a.dim(0)) } else { (a.dim(0), a.dim(1)) };
    let (kb, n) = if tb { (b.dim(1), b.dim(0)) } else { (b.dim(0), b.dim(1)) };
    if ka != kb {
        return Err(Error::invalid_argument(format!(
            "Matrix size-incompatible: In[0]: {a}, In[1]: {b} (transpose_a={ta}, transpose_b={tb})"
        )));
    }
    Ok((m, ka, n))
}

pub(crate) fn widen<T: Num<A = f32>>(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.as_slice::<T>()?.iter().map(|v| v.load()).collect())
}

impl MatMulK {
    fn operands<'a, T>(
        &self,
        a: &'a [T],
        sa: &Shape,
        b: &'a [T],
        sb: &Shape,
    ) -> (Operand<'a, T>, Operand<'a, T>) {
        (
            Operand { data: a, ld: sa.dim(1), trans: self.ta },
            Operand { data: b, ld: sb.dim(1), trans: self.tb },
        )
    }

    fn half<T: Num<A = f32>>(
        &self,
        pool: &dyn IntraOpPool,
        a: &Tensor,
        b: &Tensor,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Tensor> {
        let (wa, wb) = (widen::<T>(a)?, widen::<T>(b)?);
        let (oa, ob) = self.operands(&wa, a.shape(), &wb, b.shape());
        let mut c = vec![0f32; m * n];
        gemm_f32(pool, oa, ob, k, &mut c, n.max(1));
        let narrow: Vec<T> = c.into_iter().map(T::store).collect();
        Tensor::new(Shape::matrix(m, n), &narrow)
    }

    fn plain<T: Num>(
        &self,
        pool: &dyn IntraOpPool,
        a: &Tensor,
        b: &Tensor,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Tensor> {
        let mut out = Tensor::try_zeros(T::DTYPE, Shape::matrix(m, n))?;
        let (oa, ob) = self.operands(a.as_slice::<T>()?, a.shape(), b.as_slice::<T>()?, b.shape());
        gemm_plain::<T>(pool, oa, ob, k, out.as_mut_slice::<T>()?, n.max(1));
        Ok(out)
    }
}

impl OpKernel for MatMulK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (a, b) = (ctx.input(0)?, ctx.input(1)?);
        if a.dtype() != b.dtype() {
            return Err(Error::invalid_argument(format!("MatMul of {} and {}", a.dtype(), b.dtype())));
        }
        let (m, k, n) = dims(a.shape(), b.shape(), self.ta, self.tb)?;
        let pool = ctx.intra_op();
        let out = match a.dtype() {
            DType::F32 => {
                let mut out = Tensor::try_zeros(DType::F32, Shape::matrix(m, n))?;
                let (oa, ob) =
                    self.operands(a.as_slice::<f32>()?, a.shape(), b.as_slice::<f32>()?, b.shape());
                gemm_f32(pool, oa, ob, k, out.as_mut_slice::<f32>()?, n.max(1));
                out
            }
            DType::F16 => self.half::<f16>(pool, a, b, m, k, n)?,
            DType::BF16 => self.half::<bf16>(pool, a, b, m, k, n)?,
            DType::F64 => self.plain::<f64>(pool, a, b, m, k, n)?,
            DType::I32 => self.plain::<i32>(pool, a, b, m, k, n)?,
            DType::I64 => self.plain::<i64>(pool, a, b, m, k, n)?,
            d => return Err(unsupported("MatMul", d)),
        };
        ctx.set_output(0, out);
        Ok(())
    }
}
