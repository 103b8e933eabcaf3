//! MatMul: a cache-blocked f32 GEMM (packed panels, a register-tiled micro-kernel, AVX2/FMA when
//! the CPU has it), f16/bf16 through f32, and a plain row-parallel loop for f64 and integers.
//!
//! The f32 loop nest follows BLIS: for each group of columns, op(B) is packed once, in parallel,
//! into depth blocks (`KC`, or `KC_AVX512` deep) of `NR`-column slivers (the next group's packing
//! runs as the last work items of the group before); then bands of rows of C are claimed by the
//! pool's threads. A band walks the depth blocks outermost, so one block of packed B is reused
//! by all of the band's `MC`-row blocks while it is still in cache; for each, the band packs its
//! `MC`-row block of op(A) for that depth and runs the micro-kernel with one B sliver in L1 (AVX2)
//! and the A block in L2.
//! With at most one `MC` block of rows per thread (a training batch) there is nothing to share a
//! packed B over: each thread packs the part of B it uses itself, block by block (see
//! `gemm_f32_on`). On the AVX-512 kernel a large product (with A transposed only while it is
//! small) goes slab by slab instead (`slab_product`): each thread packs 64 columns of B into its
//! own L2 and streams A past them where it lies.

use super::{for_chunks, parallel_items, unsupported, with_buffer, Arith, Num};
use rill_graph::device::InlinePool;
use rill_graph::half::{bf16, f16};
use rill_graph::{
    AttrsExt, DType, Error, IntraOpPool, Kernel, KernelInit, OpKernel, OpKernelContext, Result, Shape, Tensor,
};

/// Rows of the micro-tile: 6 rows × 16 columns keeps 12 AVX2 accumulators in registers, with
/// 4 registers left for the two B vectors and the broadcast A value.
const MR: usize = 6;
/// Columns of the micro-tile (two 8-lane vectors).
const NR: usize = 16;
/// Depth of a packed block: a 256×16 B sliver (16 KiB) and a 6×256 A sliver (6 KiB) fit in a
/// 32 KiB L1d together.
const KC: usize = 256;
/// Depth of a packed block for the AVX-512 kernel, whose 4 B slivers a tile reads are more than
/// L1 holds at any depth worth having: deeper blocks mean fewer passes over C and fewer tile
/// edges. A 2048² product ran 1.5-3% faster on two threads at 320, 384 or 512 than at 256
/// (alternating runs), 1024² 0.7% faster at 384; the MLP and the CNN step were unchanged.
const KC_AVX512: usize = 384;
/// The deepest block `depth_block` hands out: a remainder of a quarter block or less is spread
/// over the full blocks.
const KC_MAX: usize = KC_AVX512 + KC_AVX512 / 4;

/// The depth of the blocks a product of depth `k` is cut into on `simd`'s kernel, at most `kc`
/// (`KC` or `KC_AVX512`) each: equal blocks, except that a remainder of a quarter block or less
/// is spread over the full ones (784 = 3 × 262 for `KC`, not 3 × 256 + 16), since a thin block
/// costs a whole extra pass over C.
fn depth_block(simd: Simd, k: usize) -> usize {
    let kc = if simd == Simd::Avx512 { KC_AVX512 } else { KC };
    let (full, rest) = (k / kc, k % kc);
    if full > 0 && rest > 0 && rest <= kc / 4 {
        k.div_ceil(full)
    } else {
        k.div_ceil(k.div_ceil(kc))
    }
}
/// Most rows of a packed A block (a multiple of `MR`): 144×256 floats (144 KiB) stay in L2.
const MC: usize = 144;
/// Most A blocks in one band of rows: the band reuses a depth block of packed B (2 MiB for 2048
/// columns) that many times while it is in L2/L3.
const BAND_BLOCKS: usize = 4;
/// Most floats of op(B) packed at once (8 MiB): all of B up to 1448², wider B is packed column
/// group by group. Every band reads all of the packed group, so it has to stay in the shared L3
/// beside the bands' C; a 2048² product ran 2-3% faster on two threads in groups of 1024
/// columns than with all 2048 packed at once, though each group packs A again.
const PACKED_B_MAX: usize = 2 << 20;
/// Most floats of C for a split by columns, whose parts are computed into buffers of their own.
const COLUMN_SPLIT_MAX: usize = 1 << 20;
/// Depth below which a few-rows product never splits by columns: it is bound by writing C, and
/// the caller's copy of the parts into C costs more than each thread packing all of a thin B.
const COLUMN_SPLIT_MIN_DEPTH: usize = 32;
/// Columns of one slab of the slab product (`slab_product`): the AVX-512 tile's four slivers.
#[cfg(target_arch = "x86_64")]
const SLAB: usize = 4 * NR;
/// Deepest depth block of a slab: packed, 512 KiB, which stays in L2 while every row of A
/// passes it.
const SLAB_DEPTH: usize = 2048;
/// Most floats of op(A) for the slab product (16 MiB): every slab reads all of A again, which
/// has to come from the shared L3.
#[cfg(target_arch = "x86_64")]
const SLAB_A_MAX: usize = 4 << 20;
/// Most floats of a transposed A for the slab product (1 MiB, in L2): read in place, each depth
/// step of a tile is a new cache line, which costs little from L2 (the MLP's and the CNN's
/// weight-gradient products ran 3% and 2.5% faster steps as slabs) and much from L3 (a 2048²
/// product at half speed).
#[cfg(target_arch = "x86_64")]
const SLAB_TRANSPOSED_A_MAX: usize = 256 << 10;
/// Fewest rows of a part of one of the last slabs: each part packs the whole slab again, about
/// `32 / rows` of the part's work for a 2048-deep slab.
#[cfg(target_arch = "x86_64")]
const SLAB_MIN_PART_ROWS: usize = 128;
/// Fewest rows for the slab product: each slab's packing is shared by fewer.
#[cfg(target_arch = "x86_64")]
const SLAB_MIN_ROWS: usize = MC;
/// Fewest columns and depth for the slab product: one whole slab, and a depth that still
/// outweighs each tile's stores. The CNN step's convolution products (800 deep × 64 filters
/// forward, 64 deep for the input gradient) ran 2.4% faster as slabs (5 alternating runs).
#[cfg(target_arch = "x86_64")]
const SLAB_MIN_COLS: usize = SLAB;
#[cfg(target_arch = "x86_64")]
const SLAB_MIN_DEPTH: usize = 32;
/// Multiply-adds below which a product runs on the calling thread: waking a pool thread costs
/// more.
const PARALLEL_MIN_FLOPS: usize = 1 << 20;
/// Multiply-adds from which a product still splits when a pool worker is awake and idle (no
/// wake-up to pay): the MLP's 256 -> 10 layer, a few microseconds on each of two threads.
const SPINNING_PARALLEL_MIN_FLOPS: usize = 128 << 10;

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

thread_local! {
    /// Packing buffers kept per thread between calls, so a product's packing faults in no fresh
    /// pages: op(B) on the thread that calls `gemm_f32`, op(A) on every thread that runs a block.
    static PACKED_B: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The column group packed while the bands read the one in `PACKED_B`.
    static PACKED_B_NEXT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    static PACKED_A: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The column parts of a split by columns, on the thread that calls `gemm_f32`.
    static COLUMN_PARTS: std::cell::Cell<Vec<Vec<f32>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Fills a whole sliver, `W` floats per depth step from `data[at(p)..]`: fixed-size array copies
/// are a few vector moves, where a slice copy of variable length is a memcpy call.
#[inline(always)]
fn copy_runs<const W: usize>(sliver: &mut [f32], data: &[f32], at: impl Fn(usize) -> usize) {
    for (p, dst) in sliver.chunks_exact_mut(W).enumerate() {
        let src: &[f32; W] = data[at(p)..][..W].try_into().expect("W floats");
        let dst: &mut [f32; W] = dst.try_into().expect("W floats");
        *dst = *src;
    }
}

/// Packs rows `i0..i0+mc`, depth `p0..p0+kc` of A into `MR`-row slivers, depth-major, zero-padded.
fn pack_a(a: &Operand<'_, f32>, i0: usize, mc: usize, p0: usize, kc: usize, buf: &mut [f32]) {
    for (s, sliver) in buf.chunks_exact_mut(MR * kc).enumerate() {
        let r0 = i0 + s * MR;
        let rows = MR.min(i0 + mc - r0);
        if a.trans {
            // Stored k×m: the sliver's rows are adjacent in each stored row.
            if rows == MR {
                copy_runs::<MR>(sliver, a.data, |p| (p0 + p) * a.ld + r0);
                continue;
            }
            for (p, dst) in sliver.chunks_exact_mut(MR).enumerate() {
                let src = &a.data[(p0 + p) * a.ld + r0..][..rows];
                dst[..rows].copy_from_slice(src);
                dst[rows..].fill(0.0);
            }
        } else {
            let srcs: [&[f32]; MR] = std::array::from_fn(|r| {
                if r < rows {
                    &a.data[(r0 + r) * a.ld + p0..][..kc]
                } else {
                    &ZEROS[..kc]
                }
            });
            interleave(sliver, &srcs);
        }
    }
}

/// Zeros standing in for the rows (or columns) past a matrix edge in a packed sliver.
static ZEROS: [f32; ZEROS_LEN] = [0.0; ZEROS_LEN];
/// The deepest block any packing pads: a depth block of either kind.
const ZEROS_LEN: usize = if KC_MAX > SLAB_DEPTH { KC_MAX } else { SLAB_DEPTH };

/// Interleaves `W` equally long runs into `sliver`: `sliver[p * W + i] = srcs[i][p]`, one row of
/// an A sliver or one column of a B sliver per run.
#[inline(always)]
fn interleave<const W: usize>(sliver: &mut [f32], srcs: &[&[f32]; W]) {
    let kc = sliver.len() / W;
    let srcs: [&[f32]; W] = std::array::from_fn(|i| &srcs[i][..kc]);
    for (p, d) in sliver.chunks_exact_mut(W).enumerate() {
        for (d, s) in d.iter_mut().zip(&srcs) {
            *d = s[p];
        }
    }
}

/// `interleave` for a B sliver, with register transposes where the CPU has AVX2.
#[cfg_attr(target_arch = "x86_64", allow(unsafe_code))]
fn interleave_b(sliver: &mut [f32], srcs: &[&[f32]; NR]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: `has_avx2_fma()` found both features on this CPU.
        return unsafe { avx2::interleave16(sliver, srcs) };
    }
    interleave(sliver, srcs)
}

/// Packs depth `p0..p0+kc`, columns `j0..j0+nc` of B into `NR`-column slivers, zero-padded.
#[cfg_attr(target_arch = "x86_64", allow(unsafe_code))]
fn pack_b(b: &Operand<'_, f32>, p0: usize, kc: usize, j0: usize, nc: usize, buf: &mut [f32]) {
    // Whole slivers packed by row blocks; the rest (all of them elsewhere) sliver by sliver.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if !b.trans && has_avx2_fma() {
        done = nc / NR;
        let whole = &mut buf[..done * NR * kc];
        // SAFETY: `has_avx512()` found AVX-512F, `has_avx2_fma()` AVX2 and FMA on this CPU.
        unsafe {
            if has_avx512() {
                avx512::pack_b_rows(b, p0, kc, j0, done, whole)
            } else {
                avx2::pack_b_rows(b, p0, kc, j0, done, whole)
            }
        }
    }
    for (s, sliver) in buf.chunks_exact_mut(NR * kc).enumerate().skip(done) {
        let c0 = j0 + s * NR;
        let cols = NR.min(j0 + nc - c0);
        if b.trans {
            // Stored n×k: each column of the sliver is a contiguous run of a stored row.
            let srcs: [&[f32]; NR] = std::array::from_fn(|c| {
                if c < cols {
                    &b.data[(c0 + c) * b.ld + p0..][..kc]
                } else {
                    &ZEROS[..kc]
                }
            });
            interleave_b(sliver, &srcs);
        } else {
            if cols == NR {
                copy_runs::<NR>(sliver, b.data, |p| (p0 + p) * b.ld + c0);
                continue;
            }
            for (p, dst) in sliver.chunks_exact_mut(NR).enumerate() {
                let src = &b.data[(p0 + p) * b.ld + c0..][..cols];
                dst[..cols].copy_from_slice(src);
                dst[cols..].fill(0.0);
            }
        }
    }
}

/// Depth steps `pack_b_rows` copies into every sliver before it moves on to the next steps: a
/// few stored rows read whole, one after another. Sliver by sliver, every depth step read one
/// line of a new row, which ran at two thirds of the speed (a 2048-deep block of 1024 columns:
/// 0.75 ms against 0.51).
const PACK_B_ROWS: usize = 8;

/// `pack_b` for the first `slivers` whole slivers of an untransposed B (stored k×n), each depth
/// step of a sliver `NR` adjacent floats of one stored row. Inlined into the AVX2 and AVX-512
/// wrappers, so each step is one or two vector moves.
#[inline(always)]
#[allow(unsafe_code)]
fn pack_b_rows(b: &Operand<'_, f32>, p0: usize, kc: usize, j0: usize, slivers: usize, buf: &mut [f32]) {
    assert!(buf.len() >= slivers * NR * kc);
    assert!(kc == 0 || slivers == 0 || b.data.len() >= (p0 + kc - 1) * b.ld + j0 + slivers * NR);
    let (src, dst) = (b.data.as_ptr(), buf.as_mut_ptr());
    for q in (0..kc).step_by(PACK_B_ROWS) {
        for s in 0..slivers {
            for p in q..(q + PACK_B_ROWS).min(kc) {
                // SAFETY: `p < kc` and `s < slivers`: both runs lie inside their slices (asserted).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.add((p0 + p) * b.ld + j0 + s * NR),
                        dst.add((s * kc + p) * NR),
                        NR,
                    )
                };
            }
        }
    }
}

/// `pack_b_rows` compiled for the target features `$features` (a kernel module's copy), so its
/// 64-byte moves take that level's widest vectors.
#[cfg(target_arch = "x86_64")]
macro_rules! pack_b_rows_for {
    ($features:literal) => {
        #[target_feature(enable = $features)]
        pub(super) fn pack_b_rows(
            b: &Operand<'_, f32>,
            p0: usize,
            kc: usize,
            j0: usize,
            n: usize,
            buf: &mut [f32],
        ) {
            super::pack_b_rows(b, p0, kc, j0, n, buf)
        }
    };
}

/// Rows of the tile `tile_from_runs` computes.
pub(crate) const TILE_ROWS: usize = MR;
/// Columns of that tile: the width of one sliver of `pack_panel`.
pub(crate) const TILE_COLS: usize = NR;

/// The vector kernels a GEMM runs on: chosen once from the CPU's features (`Simd::detect`), or
/// any level the CPU has (tests run each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    Portable,
    /// The AVX2+FMA micro-kernels.
    Avx2,
    /// AVX2 for the special tiles, and the AVX-512 macro-kernel for packed blocks: on CPUs with
    /// 512-bit FMA pipes (Zen 5, Intel server cores) it does twice the work per instruction.
    Avx512,
}

impl Simd {
    pub(crate) fn detect() -> Simd {
        if has_avx512() {
            Simd::Avx512
        } else if has_avx2_fma() {
            Simd::Avx2
        } else {
            Simd::Portable
        }
    }

    /// Whether the AVX2 micro-kernels may run (the levels above include AVX2 and FMA).
    fn vector(self) -> bool {
        self != Simd::Portable
    }

    /// Every level this CPU runs, portable first.
    #[cfg(test)]
    fn available() -> Vec<Simd> {
        let top = Simd::detect();
        [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().filter(|&l| l as u8 <= top as u8).collect()
    }
}

/// The kernels this CPU runs (for `tile_from_runs` and its kin).
pub(crate) fn simd() -> Simd {
    Simd::detect()
}

/// Packs all of a row-major `k`×`n` matrix into `TILE_COLS`-column slivers, each `k` deep and
/// zero-padded past column `n`, one after another in `buf` (`k`·`n` rounded up to slivers).
pub(crate) fn pack_panel(b: &[f32], k: usize, n: usize, buf: &mut [f32]) {
    pack_b(&Operand::new(b, n, false), 0, k, 0, n, buf)
}

/// One `TILE_ROWS`×`TILE_COLS` tile of A × B over the whole depth, with row `r` of A given in
/// runs of `run` floats: `runs[s][r]` is depth `s·run..(s+1)·run` of that row. `b` is one sliver
/// of `pack_panel`, `runs.len()·run` deep. Convolutions pass input pixels (or zeros for padding)
/// as runs, so a patch is multiplied where it lies, with no im2col copy.
#[cfg_attr(target_arch = "x86_64", allow(unsafe_code))]
pub(crate) fn tile_from_runs(simd: Simd, runs: &[[&[f32]; MR]], run: usize, b: &[f32]) -> [[f32; NR]; MR] {
    debug_assert_eq!(b.len(), runs.len() * run * NR);
    #[cfg(target_arch = "x86_64")]
    if simd.vector() {
        // SAFETY: `simd` is above `Portable` only when `has_avx2_fma()` found both features.
        return unsafe { avx2::micro_runs(runs, run, b) };
    }
    let _ = simd;
    let mut acc = [[0f32; NR]; MR];
    for (rows, bs) in runs.iter().zip(b.chunks_exact((run * NR).max(1))) {
        for (p, bv) in bs.chunks_exact(NR).enumerate() {
            for (acc_row, row) in acc.iter_mut().zip(rows) {
                let x = row[p];
                for (a, &y) in acc_row.iter_mut().zip(bv) {
                    *a += x * y;
                }
            }
        }
    }
    acc
}

/// Packs the transpose of a row-major `depth`×`m` matrix (`m` = its row length) into
/// `TILE_ROWS`-row slivers, `depth` deep and zero-padded past row `m`, for `tile_from_gathered`.
pub(crate) fn pack_transposed(a: &[f32], m: usize, buf: &mut [f32]) {
    let depth = a.len() / m.max(1);
    pack_a(&Operand::new(a, m, true), 0, m, 0, depth, buf)
}

/// One `TILE_ROWS`×`TILE_COLS` tile of A × B where `a` is one sliver of `pack_transposed` and
/// B's row `p` is `b[p][off..off + TILE_COLS]`: each depth step's B row is gathered from where it
/// lies (the filter gradient of a convolution reads input pixels this way).
#[cfg_attr(target_arch = "x86_64", allow(unsafe_code))]
pub(crate) fn tile_from_gathered(simd: Simd, a: &[f32], b: &[&[f32]], off: usize) -> [[f32; NR]; MR] {
    debug_assert_eq!(a.len(), b.len() * MR);
    #[cfg(target_arch = "x86_64")]
    if simd.vector() {
        // SAFETY: `simd` is above `Portable` only when `has_avx2_fma()` found both features.
        return unsafe { avx2::micro_gathered(a, b, off) };
    }
    let _ = simd;
    let mut acc = [[0f32; NR]; MR];
    for (av, row) in a.chunks_exact(MR).zip(b) {
        let bv = &row[off..off + NR];
        for (acc_row, &x) in acc.iter_mut().zip(av) {
            for (v, &y) in acc_row.iter_mut().zip(bv) {
                *v += x * y;
            }
        }
    }
    acc
}

/// One `MR`×`NR` tile of A × one packed B sliver (`kc` deep), where depth step `p` of the tile's
/// rows is `a[p * lda..][..MR]`: a packed A sliver when `lda` is `MR`, a transposed A read where
/// it lies when `lda` is its stored row length.
#[cfg_attr(target_arch = "x86_64", allow(unsafe_code))]
fn tile_from_strided(simd: Simd, a: &[f32], lda: usize, b: &[f32]) -> [[f32; NR]; MR] {
    #[cfg(target_arch = "x86_64")]
    if simd.vector() {
        // SAFETY: `simd` is above `Portable` only when `has_avx2_fma()` found both features.
        return unsafe { avx2::micro_strided(a, lda, b) };
    }
    let _ = simd;
    let mut acc = [[0f32; NR]; MR];
    for (p, bv) in b.chunks_exact(NR).enumerate() {
        for (acc_row, &x) in acc.iter_mut().zip(&a[p * lda..][..MR]) {
            for (v, &y) in acc_row.iter_mut().zip(bv) {
                *v += x * y;
            }
        }
    }
    acc
}

/// `C[.., j0..j0+nc] (=|+=) op(A) × packed B` (`kc` deep) for the rows of `c`, rows `i0..` of C,
/// with the tiles reading A where it lies instead of from a packed copy (a transposed A's last
/// partial tile excepted). For B of one sliver: each element of A then meets one sliver only,
/// so packing A would be a bare copy. (With more slivers the packed copy pays: a transposed A
/// read in place touches a new cache line every depth step.)
#[allow(clippy::too_many_arguments)]
fn tiles_in_place(
    simd: Simd,
    a: &Operand<'_, f32>,
    i0: usize,
    p0: usize,
    kc: usize,
    pb: &[f32],
    c: &mut [f32],
    ldc: usize,
    j0: usize,
    nc: usize,
    accumulate: bool,
) {
    for (sj, bs) in pb.chunks_exact(NR * kc).enumerate() {
        let cols = NR.min(nc - sj * NR);
        for (t, tile_c) in c.chunks_mut(MR * ldc).enumerate() {
            let r0 = i0 + t * MR;
            let rows = tile_c.len() / ldc;
            let tile = if !a.trans {
                let run: [&[f32]; MR] = std::array::from_fn(|r| {
                    if r < rows {
                        &a.data[(r0 + r) * a.ld + p0..][..kc]
                    } else {
                        &ZEROS[..kc]
                    }
                });
                tile_from_runs(simd, &[run], kc, bs)
            } else if rows == MR {
                tile_from_strided(simd, &a.data[p0 * a.ld + r0..], a.ld, bs)
            } else {
                let mut sliver = [0f32; MR * KC_MAX];
                pack_a(a, r0, rows, p0, kc, &mut sliver[..MR * kc]);
                tile_from_strided(simd, &sliver, MR, bs)
            };
            merge_tile(&tile, &mut tile_c[j0 + sj * NR..], ldc, rows, cols, accumulate);
        }
    }
}

/// One `MR`×`NR` tile of packed A times packed B over the slivers' depth (portable fallback).
#[inline(always)]
fn micro_portable(a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for r in 0..MR {
            let x = av[r];
            for c in 0..NR {
                acc[r][c] += x * bv[c];
            }
        }
    }
    acc
}

/// Stores (or adds, when `accumulate`) the top-left `rows`×`cols` of a tile into C.
#[inline(always)]
fn merge_tile(t: &[[f32; NR]; MR], c: &mut [f32], ldc: usize, rows: usize, cols: usize, accumulate: bool) {
    for (r, tr) in t.iter().enumerate().take(rows) {
        let dst = &mut c[r * ldc..r * ldc + cols];
        if accumulate {
            for (d, v) in dst.iter_mut().zip(tr) {
                *d += v;
            }
        } else {
            dst.copy_from_slice(&tr[..cols]);
        }
    }
}

/// `C[.., j0..j0+nc] (=|+=) packed A × packed B` for one packed A block on the portable path; `c`
/// holds the block's rows of C, `ldc` wide.
fn block_portable(
    pa: &[f32],
    pb: &[f32],
    kc: usize,
    c: &mut [f32],
    ldc: usize,
    j0: usize,
    nc: usize,
    accumulate: bool,
) {
    let mc = c.len() / ldc;
    for (sj, bs) in pb.chunks_exact(NR * kc).enumerate() {
        let cols = NR.min(nc - sj * NR);
        for (si, as_) in pa.chunks_exact(MR * kc).enumerate() {
            let rows = MR.min(mc - si * MR);
            let t = micro_portable(as_, bs);
            merge_tile(&t, &mut c[si * MR * ldc + j0 + sj * NR..], ldc, rows, cols, accumulate);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2+FMA micro-kernel and the macro-kernel around it.

    use super::{merge_tile, Operand, KC_MAX, MR, NR};
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_set1_ps,
        _mm256_setzero_ps, _mm256_shuffle_ps, _mm256_storeu_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };

    /// Rows `r[i]` of an 8×8 block become its columns.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// `super::interleave` for a B sliver (`NR` = 16 runs) with 8×8 register transposes; the
    /// depth past a multiple of 8 goes the scalar way.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn interleave16(sliver: &mut [f32], srcs: &[&[f32]; NR]) {
        let kc = sliver.len() / NR;
        let full = kc / 8 * 8;
        for half in 0..NR / 8 {
            for p in (0..full).step_by(8) {
                let rows: [__m256; 8] = std::array::from_fn(|i| {
                    load8(srcs[half * 8 + i][p..p + 8].try_into().expect("8 floats"))
                });
                for (i, col) in transpose8(rows).into_iter().enumerate() {
                    let at = (p + i) * NR + half * 8;
                    store8((&mut sliver[at..at + 8]).try_into().expect("8 floats"), col);
                }
            }
        }
        for p in full..kc {
            for (c, src) in srcs.iter().enumerate() {
                sliver[p * NR + c] = src[p];
            }
        }
    }

    pack_b_rows_for!("avx2,fma");

    /// Eight floats from the start of `v`.
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma")]
    fn load8(v: &[f32; 8]) -> __m256 {
        // SAFETY: `v` is 8 readable floats; `loadu` has no alignment requirement.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// Writes eight floats to the start of `v`.
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma")]
    fn store8(v: &mut [f32; 8], x: __m256) {
        // SAFETY: `v` is 8 writable floats; `storeu` has no alignment requirement.
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), x) }
    }

    /// The 6×16 tile of an A sliver (`MR`×kc, depth-major) times a B sliver (kc×`NR`), in 12
    /// accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn micro(a: &[f32], b: &[f32]) -> [[__m256; 2]; MR] {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            step(&mut acc, av.try_into().expect("MR floats"), bv);
        }
        acc
    }

    /// One depth step of a tile: `acc[r] += x[r] · b` for the `NR` floats of `b`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn step(acc: &mut [[__m256; 2]; MR], x: [f32; MR], b: &[f32]) {
        let (b0, b1) = b[..NR].split_at(8);
        let b0 = load8(b0.try_into().expect("8 floats"));
        let b1 = load8(b1.try_into().expect("8 floats"));
        for (acc_row, x) in acc.iter_mut().zip(x) {
            let x = _mm256_set1_ps(x);
            acc_row[0] = _mm256_fmadd_ps(x, b0, acc_row[0]);
            acc_row[1] = _mm256_fmadd_ps(x, b1, acc_row[1]);
        }
    }

    /// `super::tile_from_runs` on AVX2: the loop of `micro`, with each row's broadcasts read from
    /// its own run instead of an interleaved sliver.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn micro_runs(runs: &[[&[f32]; MR]], run: usize, b: &[f32]) -> [[f32; NR]; MR] {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for (rows, bs) in runs.iter().zip(b.chunks_exact((run * NR).max(1))) {
            // A loop, not `array::from_fn`: its closure would not inline into this function.
            let mut own: [&[f32]; MR] = [&[]; MR];
            for (o, row) in own.iter_mut().zip(rows) {
                *o = &row[..run];
            }
            let rows = own;
            for (p, bv) in (0..run).zip(bs.chunks_exact(NR)) {
                step(&mut acc, [rows[0][p], rows[1][p], rows[2][p], rows[3][p], rows[4][p], rows[5][p]], bv);
            }
        }
        tile_out(&acc)
    }

    /// `super::tile_from_gathered` on AVX2: the loop of `micro`, each depth step's two B vectors
    /// loaded from that step's own row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn micro_gathered(a: &[f32], b: &[&[f32]], off: usize) -> [[f32; NR]; MR] {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for (av, row) in a.chunks_exact(MR).zip(b) {
            step(&mut acc, av.try_into().expect("MR floats"), &row[off..off + NR]);
        }
        tile_out(&acc)
    }

    /// `super::tile_from_strided` on AVX2: the loop of `micro`, each depth step's six broadcasts
    /// read `lda` floats after the last step's.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn micro_strided(a: &[f32], lda: usize, b: &[f32]) -> [[f32; NR]; MR] {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for (p, bv) in b.chunks_exact(NR).enumerate() {
            step(&mut acc, a[p * lda..][..MR].try_into().expect("MR floats"), bv);
        }
        tile_out(&acc)
    }

    /// The accumulators of a tile as floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn tile_out(acc: &[[__m256; 2]; MR]) -> [[f32; NR]; MR] {
        let mut t = [[0f32; NR]; MR];
        for (tr, acc_row) in t.iter_mut().zip(acc) {
            let (lo, hi) = tr.split_at_mut(8);
            store8(lo.try_into().expect("8 floats"), acc_row[0]);
            store8(hi.try_into().expect("8 floats"), acc_row[1]);
        }
        t
    }

    /// The macro-kernel: every tile of one packed A block times one packed B block, B sliver by
    /// B sliver so each sliver stays in L1 while the A block streams from L2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block(
        pa: &[f32],
        pb: &[f32],
        kc: usize,
        c: &mut [f32],
        ldc: usize,
        j0: usize,
        nc: usize,
        accumulate: bool,
    ) {
        debug_assert!(kc <= KC_MAX);
        let mc = c.len() / ldc;
        for (sj, bs) in pb.chunks_exact(NR * kc).enumerate() {
            let cols = NR.min(nc - sj * NR);
            for (si, as_) in pa.chunks_exact(MR * kc).enumerate() {
                let rows = MR.min(mc - si * MR);
                let acc = micro(as_, bs);
                let c = &mut c[si * MR * ldc + j0 + sj * NR..];
                if rows == MR && cols == NR {
                    for (r, acc_row) in acc.iter().enumerate() {
                        let row: &mut [f32; NR] =
                            (&mut c[r * ldc..r * ldc + NR]).try_into().expect("16 floats");
                        let (lo, hi) = row.split_at_mut(8);
                        let (lo, hi): (&mut [f32; 8], &mut [f32; 8]) =
                            (lo.try_into().expect("8 floats"), hi.try_into().expect("8 floats"));
                        let (mut x0, mut x1) = (acc_row[0], acc_row[1]);
                        if accumulate {
                            x0 = _mm256_add_ps(x0, load8(lo));
                            x1 = _mm256_add_ps(x1, load8(hi));
                        }
                        store8(lo, x0);
                        store8(hi, x1);
                    }
                } else {
                    merge_tile(&tile_out(&acc), c, ldc, rows, cols, accumulate);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 macro-kernel. Its tile is one A sliver by four B slivers (6×64): 24 zmm
    //! accumulators, four B loads and six broadcasts per depth step for 24 FMAs. Measured on a
    //! CPU with two 512-bit FMA pipes (Zen 5), one B sliver per broadcast (6×16 or 12×16) ran at
    //! three quarters of this tile's speed and two (6×32, 12×32) at about nine tenths: the broadcasts,
    //! not the FMAs, bounded them. The packing is the AVX2 kernel's.

    use super::{merge_tile, pack_a, BlockB, Operand, KC_MAX, MR, NR};
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps,
        _mm512_maskz_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps, _mm_prefetch,
        _MM_HINT_T0,
    };

    /// Sixteen floats from the start of `v`.
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f")]
    fn load16(v: &[f32; NR]) -> __m512 {
        // SAFETY: `v` is 16 readable floats; `loadu` has no alignment requirement.
        unsafe { _mm512_loadu_ps(v.as_ptr()) }
    }

    /// Writes sixteen floats to the start of `v`.
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f")]
    fn store16(v: &mut [f32; NR], x: __m512) {
        // SAFETY: `v` is 16 writable floats; `storeu` has no alignment requirement.
        unsafe { _mm512_storeu_ps(v.as_mut_ptr(), x) }
    }

    /// Slivers of one operand: depth step `p` of sliver `i` starts at `data[i * apart + p * step]`;
    /// an A sliver's row `r` of it lies `r * row` further on (`row` is 1 when packed, and unused
    /// for B).
    #[derive(Clone, Copy)]
    struct Slivers<'a> {
        data: &'a [f32],
        apart: usize,
        step: usize,
        row: usize,
    }

    /// The tiles of `S` A slivers (`MR` floats a depth step) times `T` B slivers (`NR` floats a
    /// step), `kc` deep: `acc[s][r][t]` holds row `r` of A sliver `s` times B sliver `t`.
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f")]
    fn micro<const S: usize, const T: usize>(
        a: Slivers<'_>,
        b: Slivers<'_>,
        kc: usize,
    ) -> [[[__m512; T]; MR]; S] {
        let last = kc.max(1) - 1;
        assert!(a.data.len() > (S - 1) * a.apart + last * a.step + (MR - 1) * a.row);
        assert!(b.data.len() >= (T - 1) * b.apart + last * b.step + NR);
        let (ap, bp) = (a.data.as_ptr(), b.data.as_ptr());
        let mut acc = [[[_mm512_setzero_ps(); T]; MR]; S];
        for p in 0..kc {
            let mut bv = [_mm512_setzero_ps(); T];
            for (t, v) in bv.iter_mut().enumerate() {
                // SAFETY: `t < T` and `p < kc`: inside `b` (asserted).
                *v = unsafe { _mm512_loadu_ps(bp.add(t * b.apart + p * b.step)) };
            }
            for (s, acc_s) in acc.iter_mut().enumerate() {
                for (r, acc_r) in acc_s.iter_mut().enumerate() {
                    // SAFETY: `s < S`, `p < kc` and `r < MR`: inside `a` (asserted).
                    let x = _mm512_set1_ps(unsafe { ap.add(s * a.apart + p * a.step + r * a.row).read() });
                    for (acc_t, &v) in acc_r.iter_mut().zip(&bv) {
                        *acc_t = _mm512_fmadd_ps(x, v, *acc_t);
                    }
                }
            }
        }
        acc
    }

    /// `micro`, its tiles written (or added, when `accumulate`) to C: `S`·`MR` whole rows of
    /// `T`·`NR` columns from the start of `c`, rows `ldc` apart.
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f")]
    fn micro_into<const S: usize, const T: usize>(
        a: Slivers<'_>,
        b: Slivers<'_>,
        kc: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        assert!(c.len() >= (S * MR - 1) * ldc + T * NR);
        let acc = micro::<S, T>(a, b, kc);
        let cp = c.as_mut_ptr();
        for (s, acc_s) in acc.iter().enumerate() {
            for (r, acc_r) in acc_s.iter().enumerate() {
                for (t, &x) in acc_r.iter().enumerate() {
                    // SAFETY: row `s·MR + r` < `S·MR` and column `t·NR + 15` < `T·NR`, inside `c`
                    // (asserted).
                    unsafe {
                        let at = cp.add((s * MR + r) * ldc + t * NR);
                        let x = if accumulate { _mm512_add_ps(x, _mm512_loadu_ps(at)) } else { x };
                        _mm512_storeu_ps(at, x);
                    }
                }
            }
        }
    }

    /// The tiles of `S` A slivers from `si` on, times `T` B slivers from `sj` on, into C.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    fn tiles<const S: usize, const T: usize>(
        pa: &[f32],
        pb: BlockB<'_>,
        kc: usize,
        (si, sj): (usize, usize),
        c: &mut [f32],
        ldc: usize,
        (mc, j0, nc): (usize, usize, usize),
        accumulate: bool,
    ) {
        let a = Slivers { data: &pa[si * MR * kc..], apart: MR * kc, step: MR, row: 1 };
        let b = match pb {
            BlockB::Packed(pb) => Slivers { data: &pb[sj * NR * kc..], apart: NR * kc, step: NR, row: 0 },
            BlockB::Rows { data, ld } => Slivers { data: &data[sj * NR..], apart: NR, step: ld, row: 0 },
        };
        let r0 = si * MR;
        let (rows, cols) = (mc.saturating_sub(r0), nc.saturating_sub(sj * NR));
        if rows >= S * MR && cols >= T * NR {
            // A whole tile: C is updated from the accumulators as they are, not through a copy.
            let c = &mut c[r0 * ldc + j0 + sj * NR..];
            return micro_into::<S, T>(a, b, kc, c, ldc, accumulate);
        }
        let acc = micro::<S, T>(a, b, kc);
        for (s, acc_s) in acc.iter().enumerate() {
            let r0 = (si + s) * MR;
            for (t, col0) in (sj..sj + T).map(|j| j * NR).enumerate() {
                let tile: [__m512; MR] = acc_s.map(|row| row[t]);
                put(
                    &tile,
                    &mut c[r0 * ldc + j0 + col0..],
                    ldc,
                    MR.min(mc - r0),
                    NR.min(nc - col0),
                    accumulate,
                );
            }
        }
    }

    /// Writes (or adds) one tile's `rows`×`cols` corner into C at `c` (row stride `ldc`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn put(acc: &[__m512; MR], c: &mut [f32], ldc: usize, rows: usize, cols: usize, accumulate: bool) {
        if rows == MR && cols == NR {
            for (r, &x) in acc.iter().enumerate() {
                let row: &mut [f32; NR] = (&mut c[r * ldc..r * ldc + NR]).try_into().expect("16 floats");
                let x = if accumulate { _mm512_add_ps(x, load16(row)) } else { x };
                store16(row, x);
            }
        } else {
            let mut t = [[0f32; NR]; MR];
            for (tr, &x) in t.iter_mut().zip(acc) {
                store16(tr, x);
            }
            merge_tile(&t, c, ldc, rows, cols, accumulate);
        }
    }

    pack_b_rows_for!("avx512f");

    /// A slivers per tile: with `B_SLIVERS` that makes `A_SLIVERS`·`MR`·`B_SLIVERS` zmm accumulators.
    const A_SLIVERS: usize = 1;
    /// B slivers per tile, read together (96 KiB at depth `KC_AVX512`: more than L1 holds, and
    /// L2 keeps up; a shallower block, to fit L1, cost more in passes over C).
    const B_SLIVERS: usize = 4;

    /// The macro-kernel: every tile of one packed A block times one block of B (packed, or its
    /// rows), `B_SLIVERS` B slivers at a time, `A_SLIVERS` A slivers within them.
    #[target_feature(enable = "avx512f")]
    pub(super) fn block(
        pa: &[f32],
        pb: BlockB<'_>,
        kc: usize,
        c: &mut [f32],
        ldc: usize,
        j0: usize,
        nc: usize,
        accumulate: bool,
    ) {
        debug_assert!(kc <= KC_MAX);
        let mc = c.len() / ldc;
        let (na, nb) = (pa.len() / (MR * kc).max(1), nc.div_ceil(NR));
        let dims = (mc, j0, nc);
        let mut sj = 0;
        while sj < nb {
            let wide = sj + B_SLIVERS <= nb;
            let mut si = 0;
            while si < na {
                let full = si + A_SLIVERS <= na;
                match (full, wide) {
                    (true, true) => {
                        tiles::<A_SLIVERS, B_SLIVERS>(pa, pb, kc, (si, sj), c, ldc, dims, accumulate)
                    }
                    (true, false) => tiles::<A_SLIVERS, 1>(pa, pb, kc, (si, sj), c, ldc, dims, accumulate),
                    (false, true) => tiles::<1, B_SLIVERS>(pa, pb, kc, (si, sj), c, ldc, dims, accumulate),
                    (false, false) => tiles::<1, 1>(pa, pb, kc, (si, sj), c, ldc, dims, accumulate),
                }
                si += if full { A_SLIVERS } else { 1 };
            }
            sj += if wide { B_SLIVERS } else { 1 };
        }
    }

    /// One column slab of C (`nc` ≤ `B_SLIVERS`·`NR` columns) against one packed depth block of
    /// op(B) (`pb`: the slab's slivers, `kc` deep from depth `p0`): every `MR`-row tile of
    /// rows `i0..i0 + m` of op(A), read where it lies. The accumulators span the
    /// whole block, so C is touched once per block; a partial last tile reads its rows through
    /// `edge`, a packed sliver (`MR`·`kc` floats).
    ///
    /// # Safety
    /// `c` points at C's row `i0` in this slab's first column; rows `ldc` apart, `m` rows of `nc`
    /// columns are readable and writable there, and nothing else reads or writes them meanwhile.
    #[allow(clippy::too_many_arguments, unsafe_code)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn slab(
        a: &Operand<'_, f32>,
        (i0, m): (usize, usize),
        (p0, kc): (usize, usize),
        pb: &[f32],
        c: *mut f32,
        (ldc, nc): (usize, usize),
        accumulate: bool,
        edge: &mut [f32],
    ) {
        let b = Slivers { data: pb, apart: NR * kc, step: NR, row: 0 };
        let whole = m / MR * MR;
        for r0 in (i0..i0 + whole).step_by(MR) {
            // Row `r` of the tile at depth step `p`: a stored row of A, or a stored column of
            // A's transpose (whose next tile mostly shares this one's lines).
            let a = if a.trans {
                Slivers { data: &a.data[p0 * a.ld + r0..], apart: 0, step: a.ld, row: 1 }
            } else {
                if r0 + 2 * MR <= i0 + whole {
                    prefetch_rows(&a.data[(r0 + MR) * a.ld + p0..], a.ld);
                }
                Slivers { data: &a.data[r0 * a.ld + p0..], apart: 0, step: 1, row: a.ld }
            };
            // SAFETY: rows `r0..r0 + MR` of the slab are the caller's (see above).
            unsafe { slab_tile(a, b, kc, (c, r0 - i0), (ldc, MR, nc), accumulate) };
        }
        if whole < m {
            let r0 = i0 + whole;
            pack_a(a, r0, m - whole, p0, kc, edge);
            let a = Slivers { data: edge, apart: 0, step: MR, row: 1 };
            // SAFETY: the last `m - whole` rows of the slab are the caller's.
            unsafe { slab_tile(a, b, kc, (c, r0 - i0), (ldc, m - whole, nc), accumulate) };
        }
    }

    /// Lines of each row of the next tile `slab` asks the cache for before a tile: its six new
    /// streams then start warm, where the hardware prefetcher would wait for misses first
    /// (2048² on two threads: +1.2%, 6 alternating runs).
    const PREFETCH_LINES: usize = 4;

    /// Prefetches the first `PREFETCH_LINES` lines of the `MR` rows (`ld` apart) from the start of
    /// `rows`, as far as `rows` reaches.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn prefetch_rows(rows: &[f32], ld: usize) {
        for r in 0..MR {
            for l in 0..PREFETCH_LINES {
                if let Some(x) = rows.get(r * ld + l * NR) {
                    _mm_prefetch::<_MM_HINT_T0>((x as *const f32).cast());
                }
            }
        }
    }

    /// One tile of `slab`: `rows` rows (of `MR`) and `nc` columns at row `r` of the slab at `c`.
    ///
    /// # Safety
    /// Those rows and columns of C are readable and writable, and nothing else touches them.
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f")]
    unsafe fn slab_tile(
        a: Slivers<'_>,
        b: Slivers<'_>,
        kc: usize,
        (c, r): (*mut f32, usize),
        (ldc, rows, nc): (usize, usize, usize),
        accumulate: bool,
    ) {
        // SAFETY: inside the caller's rows (above).
        let c = unsafe { c.add(r * ldc) };
        // SAFETY (each arm): the tile's floats of C are the caller's.
        match nc.div_ceil(NR) {
            4 => unsafe { store::<4>(&micro::<1, 4>(a, b, kc)[0], c, ldc, rows, nc, accumulate) },
            3 => unsafe { store::<3>(&micro::<1, 3>(a, b, kc)[0], c, ldc, rows, nc, accumulate) },
            2 => unsafe { store::<2>(&micro::<1, 2>(a, b, kc)[0], c, ldc, rows, nc, accumulate) },
            _ => unsafe { store::<1>(&micro::<1, 1>(a, b, kc)[0], c, ldc, rows, nc, accumulate) },
        }
    }

    /// Writes (or adds) the top `rows` of a tile's accumulators to C at `c` (rows `ldc` apart),
    /// the first `cols` of its `T`·`NR` columns, through masks: only those floats are read or
    /// written.
    ///
    /// # Safety
    /// Those `rows`×`cols` floats at `c` are readable and writable.
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const T: usize>(
        acc: &[[__m512; T]; MR],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            for (t, &x) in acc_r.iter().enumerate() {
                let left = cols.saturating_sub(t * NR).min(NR);
                let mask = ((1u32 << left) - 1) as u16;
                // SAFETY: the mask covers columns `t·NR..t·NR + left` of row `r` only, inside
                // the caller's `rows`×`cols`; masked-off lanes are neither read nor written.
                unsafe {
                    let at = c.add(r * ldc + t * NR);
                    let x = if accumulate { _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, at)) } else { x };
                    _mm512_mask_storeu_ps(at, mask, x);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_avx2_fma() && std::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// Where the macro-kernel reads one depth block of op(B).
#[derive(Clone, Copy)]
enum BlockB<'a> {
    /// Packed in `NR`-column slivers (`pack_b`).
    Packed(&'a [f32]),
    /// Where it is stored, untransposed: depth step `p` of column `j` at `data[p * ld + j]`.
    /// Only the AVX-512 kernel reads it so, and only whole slivers (`nc` a multiple of `NR`):
    /// with its FMAs twice as wide, packing B cost a product of the MLP's size a tenth of its time.
    Rows { data: &'a [f32], ld: usize },
}

/// Runs the macro-kernel for one packed A block; `accumulate` adds to C, otherwise C is written.
#[cfg_attr(target_arch = "x86_64", allow(unsafe_code))]
fn run_block(
    simd: Simd,
    pa: &[f32],
    pb: BlockB<'_>,
    kc: usize,
    c: &mut [f32],
    ldc: usize,
    j0: usize,
    nc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    match (simd, pb) {
        // SAFETY: `Avx512` only where `has_avx512()` found AVX-512F (and AVX2 and FMA).
        (Simd::Avx512, _) => return unsafe { avx512::block(pa, pb, kc, c, ldc, j0, nc, accumulate) },
        // SAFETY: `Avx2` only where `has_avx2_fma()` found both features.
        (Simd::Avx2, BlockB::Packed(pb)) => {
            return unsafe { avx2::block(pa, pb, kc, c, ldc, j0, nc, accumulate) }
        }
        _ => {}
    }
    match pb {
        BlockB::Packed(pb) => block_portable(pa, pb, kc, c, ldc, j0, nc, accumulate),
        // `row_band` hands out rows only to the AVX-512 kernel; the portable one reads them as a
        // packed block would be read, one sliver at a time.
        BlockB::Rows { data, ld } => {
            let mut packed = vec![0f32; kc * nc.div_ceil(NR) * NR];
            pack_b(&Operand::new(data, ld, false), 0, kc, 0, nc, &mut packed);
            block_portable(pa, &packed, kc, c, ldc, j0, nc, accumulate)
        }
    }
}

/// Where a band finds op(B) packed.
#[derive(Clone, Copy)]
enum PackedB<'a> {
    /// Packed once for all bands: all depth blocks of the column group, one after another.
    Shared(&'a [f32]),
    /// Packed by the band itself, one depth block at a time, into its thread's own buffer.
    Own(&'a Operand<'a, f32>),
}

/// One band of rows of C (`rows` = C's rows `i0..`, full width `ldc`) against op(B) for columns
/// `j0..j0+nc` (`ncp` of them after padding), over the whole depth `k`: depth blocks outermost,
/// then blocks of at most `MC` rows.
#[allow(clippy::too_many_arguments)]
fn row_band(
    simd: Simd,
    a: &Operand<'_, f32>,
    b: PackedB<'_>,
    k: usize,
    i0: usize,
    rows: &mut [f32],
    ldc: usize,
    j0: usize,
    nc: usize,
    accumulate: bool,
) {
    let band = rows.len() / ldc;
    let ncp = nc.div_ceil(NR) * NR;
    let depth = depth_block(simd, k);
    // An untransposed B of whole slivers is read where it lies by the AVX-512 kernel.
    let rows_b = match b {
        PackedB::Own(b) if simd == Simd::Avx512 && !b.trans && nc.is_multiple_of(NR) && ncp > NR => Some(b),
        _ => None,
    };
    let own_len = if matches!(b, PackedB::Own(_)) && rows_b.is_none() { depth * ncp } else { 0 };
    let a_in_place = ncp == NR;
    let a_len = if a_in_place { 0 } else { MC.min(band.div_ceil(MR) * MR) * depth };
    with_buffer(&PACKED_B, own_len, |own| {
        with_buffer(&PACKED_A, a_len, |pa| {
            for p0 in (0..k).step_by(depth) {
                let kc = depth.min(k - p0);
                let pb = match (b, rows_b) {
                    (_, Some(b)) => BlockB::Rows { data: &b.data[p0 * b.ld + j0..], ld: b.ld },
                    (PackedB::Shared(pb), None) => BlockB::Packed(&pb[p0 * ncp..(p0 + kc) * ncp]),
                    (PackedB::Own(b), None) => {
                        let own = &mut own[..kc * ncp];
                        pack_b(b, p0, kc, j0, nc, own);
                        BlockB::Packed(&*own)
                    }
                };
                for (blk, block) in rows.chunks_mut(MC * ldc).enumerate() {
                    if let (true, BlockB::Packed(pb)) = (a_in_place, pb) {
                        tiles_in_place(
                            simd,
                            a,
                            i0 + blk * MC,
                            p0,
                            kc,
                            pb,
                            block,
                            ldc,
                            j0,
                            nc,
                            accumulate || p0 > 0,
                        );
                        continue;
                    }
                    let mc = block.len() / ldc;
                    let pa = &mut pa[..mc.div_ceil(MR) * MR * kc];
                    pack_a(a, i0 + blk * MC, mc, p0, kc, pa);
                    run_block(simd, pa, pb, kc, block, ldc, j0, nc, accumulate || p0 > 0);
                }
            }
        })
    });
}

/// `C (m×n) = op(A) × op(B)` in f32, or `C += op(A) × op(B)` when `accumulate`, split over the
/// pool when it is large enough.
fn gemm_f32(
    pool: &dyn IntraOpPool,
    a: Operand<'_, f32>,
    b: Operand<'_, f32>,
    k: usize,
    c: &mut [f32],
    n: usize,
    accumulate: bool,
) {
    gemm_f32_on(Simd::detect(), pool, a, b, k, c, n, accumulate, None)
}

/// What `_FusedMatMul` does after the product. Each thread applies it to the part of C it has
/// just finished, while that part is in its cache.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    /// Adds one bias per column, then ReLU when `relu`.
    Bias { bias: &'a [f32], relu: bool },
    /// ReluGrad with the product as the gradients: zero where the features (C's shape, `n`
    /// wide) are not positive.
    ReluGrad { features: &'a [f32], n: usize },
}

impl Epilogue<'_> {
    /// Applies to columns `c0..c0 + nc` of each `ld`-wide row of `rows`, which are C's rows
    /// `i0..` and columns `j0..j0 + nc`.
    fn apply(&self, rows: &mut [f32], ld: usize, i0: usize, c0: usize, j0: usize, nc: usize) {
        for (r, row) in rows.chunks_exact_mut(ld).enumerate() {
            let row = &mut row[c0..c0 + nc];
            match *self {
                Epilogue::Bias { bias, relu } => {
                    for (v, b) in row.iter_mut().zip(&bias[j0..j0 + nc]) {
                        let x = *v + b;
                        // As the Relu kernel (NaN included): x where positive, else 0.
                        let relu_x = if x > 0.0 { x } else { 0.0 };
                        *v = if relu { relu_x } else { x };
                    }
                }
                Epilogue::ReluGrad { features, n } => {
                    let f = &features[(i0 + r) * n + j0..][..nc];
                    for (v, &x) in row.iter_mut().zip(f) {
                        // As the ReluGrad kernel: the gradient where the feature is positive. A
                        // select, not a branch: the signs of features follow no pattern.
                        *v = if x > 0.0 { *v } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// `gemm_f32` on the AVX2 micro-kernel when `simd` (which this CPU must then have), else on the
/// portable one; `epi`, if any, is applied to the product (which then must not `accumulate`).
#[allow(clippy::too_many_arguments)]
fn gemm_f32_on(
    simd: Simd,
    pool: &dyn IntraOpPool,
    a: Operand<'_, f32>,
    b: Operand<'_, f32>,
    k: usize,
    c: &mut [f32],
    n: usize,
    accumulate: bool,
    epi: Option<&Epilogue<'_>>,
) {
    debug_assert!(!(accumulate && epi.is_some()));
    if c.is_empty() || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        if let Some(e) = epi {
            e.apply(c, n, 0, 0, 0, n);
        }
        return;
    }
    let m = c.len() / n;
    let macs = m * n * k;
    let split = match pool.idle_workers() {
        None => macs >= PARALLEL_MIN_FLOPS,
        // With every worker busy (another op's chunks), splitting only adds contention: two
        // products at once each on one thread take as long as one after the other on two.
        Some(idle) => {
            (idle.awake > 0 && macs >= SPINNING_PARALLEL_MIN_FLOPS)
                || (idle.asleep > 0 && macs >= PARALLEL_MIN_FLOPS)
        }
    };
    let pool: &dyn IntraOpPool = if split { pool } else { &InlinePool };
    let threads = pool.num_threads().max(1);
    // Columns packed at once: all of them unless op(B) is larger than `PACKED_B_MAX`.
    let group = (PACKED_B_MAX / k / NR).max(1) * NR;
    let tiles = m.div_ceil(MR);
    if threads > 1 && tiles <= threads * (MC / MR) {
        // Few rows (at most one A block per thread): each thread packs op(B) itself, block by
        // block, right before using it. Packing B once for all threads costs a second hand-off
        // and moves every packed line from the core that wrote it to the one that reads it,
        // which for so few rows costs more than packing twice.
        if n > m && m * n <= COLUMN_SPLIT_MAX && k >= COLUMN_SPLIT_MIN_DEPTH {
            return column_split(simd, pool, a, b, k, c, n, accumulate, epi);
        }
        let items = bands(c, m, n, threads.min(tiles));
        parallel_items(pool, items, |_, (i0, rows)| {
            for j0 in (0..n).step_by(group) {
                row_band(simd, &a, PackedB::Own(&b), k, i0, &mut *rows, n, j0, group.min(n - j0), accumulate);
            }
            if let Some(e) = epi {
                e.apply(rows, n, i0, 0, 0, n);
            }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if takes_slabs(simd, threads, &a, (m, k, n), false) {
        return slab_product(pool, a, SlabB::Pack(b), k, c, n, accumulate, epi);
    }
    // Column groups, each packed whole and then read by every band. A group after the first is
    // packed by the last items of the group before it: a thread out of bands packs the next group
    // while the others finish theirs, instead of both waiting and then packing.
    let groups: Vec<(usize, usize)> = (0..n).step_by(group).map(|j0| (j0, group.min(n - j0))).collect();
    let widest = group.min(n).div_ceil(NR) * NR;
    let depth = depth_block(simd, k);
    // Bands of whole micro-tiles, each at most `BAND_BLOCKS` A blocks, their number a multiple of
    // the threads and the tiles spread evenly so every thread gets the same share.
    let per_band = BAND_BLOCKS * MC / MR;
    let nbands = tiles.div_ceil(per_band).div_ceil(threads).saturating_mul(threads).min(tiles);
    let second = if groups.len() > 1 { k * widest } else { 0 };
    with_buffer(&PACKED_B, k * widest, |first| {
        with_buffer(&PACKED_B_NEXT, second, |second| {
            let mut bufs = [first, second];
            let items = pack_items(k, depth, groups[0], threads, &mut *bufs[0]);
            parallel_items(pool, items, |_, it| it.run(&b));
            for (g, &(j0, nc)) in groups.iter().enumerate() {
                let [x, y] = &mut bufs;
                let (packed, next) = if g % 2 == 0 { (&**x, &mut **y) } else { (&**y, &mut **x) };
                let packed = &packed[..k * nc.div_ceil(NR) * NR];
                let mut items: Vec<GroupWork<'_>> =
                    bands(&mut *c, m, n, nbands).into_iter().map(GroupWork::Band).collect();
                if let Some(&following) = groups.get(g + 1) {
                    items.extend(
                        pack_items(k, depth, following, threads, next).into_iter().map(GroupWork::Pack),
                    );
                }
                parallel_items(pool, items, |_, work| match work {
                    GroupWork::Band((i0, rows)) => {
                        row_band(simd, &a, PackedB::Shared(packed), k, i0, rows, n, j0, nc, accumulate);
                        if let Some(e) = epi {
                            e.apply(rows, n, i0, j0, j0, nc);
                        }
                    }
                    GroupWork::Pack(it) => it.run(&b),
                });
            }
        })
    });
}

/// Whether a product of more rows than the few-rows split takes runs as slabs on `threads`
/// threads: on the AVX-512 kernel, within the `SLAB_*` bounds, with a whole slab for every
/// thread (fewer would each pack a slab for a part of its rows). A larger transposed A is left
/// to the blocked path (`SLAB_TRANSPOSED_A_MAX`). With op(B) `packed` beforehand, there is no
/// packing for the rows to share, so any number of them will do.
#[cfg(target_arch = "x86_64")]
fn takes_slabs(
    simd: Simd,
    threads: usize,
    a: &Operand<'_, f32>,
    (m, k, n): (usize, usize, usize),
    packed: bool,
) -> bool {
    simd == Simd::Avx512
        && (!a.trans || m * k <= SLAB_TRANSPOSED_A_MAX)
        && (packed || m >= SLAB_MIN_ROWS)
        && n >= SLAB_MIN_COLS
        && n.div_ceil(SLAB) >= threads
        && k >= SLAB_MIN_DEPTH
        && m * k <= SLAB_A_MAX
}

/// Where a slab product finds op(B).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum SlabB<'a> {
    /// To be packed slab by slab.
    Pack(Operand<'a, f32>),
    /// Packed already, all columns in one depth block (`PackedRhs`).
    Packed(&'a [f32]),
}

/// C shared by the items of a slab product, each of which reads and writes only its own rows of
/// its own slab's columns: their rows interleave in memory, so no item can hold a slice.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct SharedC {
    ptr: *mut f32,
    len: usize,
}

#[cfg(target_arch = "x86_64")]
impl SharedC {
    /// Where C's float `offset` lies (inside C: asserted).
    fn at(&self, offset: usize) -> *mut f32 {
        assert!(offset < self.len);
        self.ptr.wrapping_add(offset)
    }
}

// SAFETY: items touch disjoint floats (see above), and `parallel_items` returns only after all
// of them are done, while the `&mut [f32]` this was made from is still borrowed.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
unsafe impl Send for SharedC {}
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
unsafe impl Sync for SharedC {}

/// `C (m×n) (=|+=) op(A) × op(B)` on the AVX-512 kernel, slab by slab: the pool's threads claim
/// slabs of `SLAB` columns; each packs its slab of op(B), one depth block of at most
/// `SLAB_DEPTH` at a time, into its own buffer, where it stays in L2, and runs every row of A
/// past it, read where it lies (`avx512::slab`). Nothing waits on a shared packing and no A
/// block is packed; C is touched once per depth block. The last slabs are cut into row parts,
/// so the threads run out of work together.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments, unsafe_code)]
fn slab_product(
    pool: &dyn IntraOpPool,
    a: Operand<'_, f32>,
    b: SlabB<'_>,
    k: usize,
    c: &mut [f32],
    n: usize,
    accumulate: bool,
    epi: Option<&Epilogue<'_>>,
) {
    let m = c.len() / n;
    let threads = pool.num_threads().max(1);
    let slabs = n.div_ceil(SLAB);
    let tail = if threads > 1 { threads.min(slabs) } else { 0 };
    let (tiles, parts) = (m.div_ceil(MR), (2 * threads).min(m / SLAB_MIN_PART_ROWS).max(1));
    let mut items = Vec::with_capacity(slabs + tail * parts);
    for s in 0..slabs {
        let (j0, nc) = (s * SLAB, SLAB.min(n - s * SLAB));
        if s < slabs - tail {
            items.push((j0, nc, 0, m));
            continue;
        }
        for q in 0..parts {
            let (r0, r1) = (q * tiles / parts * MR, ((q + 1) * tiles / parts * MR).min(m));
            if r1 > r0 {
                items.push((j0, nc, r0, r1 - r0));
            }
        }
    }
    let depth = k.div_ceil(k.div_ceil(SLAB_DEPTH));
    let shared = SharedC { ptr: c.as_mut_ptr(), len: c.len() };
    parallel_items(pool, items, |_, (j0, nc, r0, rows)| {
        assert!(r0 + rows <= m && j0 + nc <= n);
        with_buffer(&PACKED_B, (SLAB + MR) * depth, |buf| {
            let (pb, edge) = buf.split_at_mut(SLAB * depth);
            for p0 in (0..k).step_by(depth) {
                let kc = depth.min(k - p0);
                let len = nc.div_ceil(NR) * NR * kc;
                let pb = match b {
                    // One depth block, all of it: the slab is `kc` floats a column from `j0` on.
                    SlabB::Packed(packed) => &packed[j0 * kc..][..len],
                    SlabB::Pack(b) => {
                        pack_b(&b, p0, kc, j0, nc, &mut pb[..len]);
                        &pb[..len]
                    }
                };
                // SAFETY: `slab_product` runs only where `Simd::Avx512` found AVX-512F. The item's
                // rows `r0..r0 + rows` of columns `j0..j0 + nc` lie inside C (asserted) and no
                // other item touches them.
                unsafe {
                    avx512::slab(
                        &a,
                        (r0, rows),
                        (p0, kc),
                        pb,
                        shared.at(r0 * n + j0),
                        (n, nc),
                        accumulate || p0 > 0,
                        &mut edge[..MR * kc],
                    )
                };
            }
        });
        if let Some(e) = epi {
            for r in r0..r0 + rows {
                // SAFETY: this item's floats of row `r` (see above), borrowed one row at a time.
                let row = unsafe { std::slice::from_raw_parts_mut(shared.at(r * n + j0), nc) };
                e.apply(row, nc, r, 0, j0, nc);
            }
        }
    });
}

/// One item of a column group's work: a band of C's rows, or a run of the next group's packing.
enum GroupWork<'a> {
    Band((usize, &'a mut [f32])),
    Pack(PackRun<'a>),
}

/// Slivers of one depth block of op(B) to pack: columns `c0..c0 + cols`, depth `p0..p0 + kc`.
struct PackRun<'a> {
    p0: usize,
    kc: usize,
    c0: usize,
    cols: usize,
    run: &'a mut [f32],
}

impl PackRun<'_> {
    fn run(self, b: &Operand<'_, f32>) {
        pack_b(b, self.p0, self.kc, self.c0, self.cols, self.run)
    }
}

/// The runs packing column group `j0..j0 + nc` of op(B) into `buf`, depth block after depth
/// block (`depth` deep): each block split into runs of slivers, a few per thread.
fn pack_items(
    k: usize,
    depth: usize,
    (j0, nc): (usize, usize),
    threads: usize,
    buf: &mut [f32],
) -> Vec<PackRun<'_>> {
    let ncp = nc.div_ceil(NR) * NR;
    let blocks = k.div_ceil(depth);
    let runs = (threads * 2).div_ceil(blocks).min(ncp / NR);
    let per_run = (ncp / NR).div_ceil(runs) * NR;
    let mut items = Vec::new();
    let mut rest = &mut buf[..k * ncp];
    for p0 in (0..k).step_by(depth) {
        let kc = depth.min(k - p0);
        let (block, tail) = rest.split_at_mut(kc * ncp);
        rest = tail;
        for (r, run) in block.chunks_mut(per_run * kc).enumerate() {
            let c0 = r * per_run;
            items.push(PackRun { p0, kc, c0: j0 + c0, cols: (nc - c0).min(per_run), run });
        }
    }
    items
}

/// The few-rows product split by columns: each thread packs only its runs of B's columns and
/// multiplies all of A into a buffer of its own, then the caller copies the buffers into C (at
/// most `COLUMN_SPLIT_MAX` floats). Chosen when B is wider than A is tall, so each thread packs
/// less than with a split by rows (A is packed whole by each thread, B in parts).
#[allow(clippy::too_many_arguments)]
fn column_split(
    simd: Simd,
    pool: &dyn IntraOpPool,
    a: Operand<'_, f32>,
    b: Operand<'_, f32>,
    k: usize,
    c: &mut [f32],
    n: usize,
    accumulate: bool,
    epi: Option<&Epilogue<'_>>,
) {
    let m = c.len() / n;
    let slivers = n.div_ceil(NR);
    let runs = pool.num_threads().max(1).min(slivers);
    let per = slivers.div_ceil(runs) * NR;
    // The parts' buffers are kept by the calling thread between calls (fresh ones would fault in
    // new pages every call).
    let mut bufs = COLUMN_PARTS.with(|p| p.take());
    let mut parts: Vec<(usize, Vec<f32>)> =
        (0..n).step_by(per).map(|j0| (j0, bufs.pop().unwrap_or_default())).collect();
    {
        let c_in: &[f32] = c;
        parallel_items(pool, parts.iter_mut().collect(), |_, (j0, part)| {
            let (j0, nc) = (*j0, per.min(n - *j0));
            if accumulate {
                part.clear();
                part.extend(c_in.chunks_exact(n).flat_map(|row| &row[j0..j0 + nc]));
            } else {
                // Contents unspecified: the product overwrites every element.
                part.resize(m * nc, 0.0);
            }
            // B from column j0 on: a stored row of a transposed B, else a stored column.
            let bj = Operand { data: &b.data[if b.trans { j0 * b.ld } else { j0 }..], ..b };
            row_band(simd, &a, PackedB::Own(&bj), k, 0, part, nc, 0, nc, accumulate);
            if let Some(e) = epi {
                e.apply(part, nc, 0, 0, j0, nc);
            }
        });
    }
    for (j0, part) in &parts {
        let nc = per.min(n - j0);
        for (row, src) in c.chunks_exact_mut(n).zip(part.chunks_exact(nc)) {
            row[*j0..j0 + nc].copy_from_slice(src);
        }
    }
    bufs.extend(parts.into_iter().map(|(_, v)| v));
    COLUMN_PARTS.with(|p| p.set(bufs));
}

/// C (`m` rows of `n`) split into `nbands` bands of whole micro-tiles, the tiles spread evenly,
/// each with the index of its first row.
fn bands(c: &mut [f32], m: usize, n: usize, nbands: usize) -> Vec<(usize, &mut [f32])> {
    let tiles = m.div_ceil(MR);
    let mut items = Vec::with_capacity(nbands);
    let mut rest = c;
    let mut i0 = 0;
    for band in 0..nbands {
        let i1 = ((band + 1) * tiles / nbands * MR).min(m);
        let (rows, tail) = rest.split_at_mut((i1 - i0) * n);
        rest = tail;
        items.push((i0, rows));
        i0 = i1;
    }
    items
}

/// An f32 right-hand side packed once for many products on the calling thread (`gemm_serial`):
/// where the CPU runs them as slabs, each product then skips packing it (a convolution's
/// filter, multiplied by every block of patches).
pub(crate) struct PackedRhs {
    #[cfg(target_arch = "x86_64")]
    data: Vec<f32>,
}

impl PackedRhs {
    /// op(B), `k`×`n` f32 (reinterpreted from `T`), packed for slabs where they run (AVX-512,
    /// one depth block); empty otherwise, or for other element types.
    pub(crate) fn new<T: Num>(b: Operand<'_, T>, k: usize, n: usize) -> PackedRhs {
        #[cfg(target_arch = "x86_64")]
        {
            let slabs = T::DTYPE == DType::F32
                && Simd::detect() == Simd::Avx512
                && (1..=SLAB_DEPTH).contains(&k)
                && n > 0;
            let mut data = Vec::new();
            if slabs {
                let b = Operand { data: bytemuck::cast_slice::<T, f32>(b.data), ld: b.ld, trans: b.trans };
                data.resize(n.div_ceil(NR) * NR * k, 0.0);
                pack_b(&b, 0, k, 0, n, &mut data);
            }
            PackedRhs { data }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (b, k, n);
            PackedRhs {}
        }
    }
}

/// `C (m×n) (=|+=) op(A) × op(B)` on the calling thread (`+=` when `accumulate`), for kernels
/// that split their work over the pool themselves (convolutions); f32 through the blocked
/// micro-kernel, or slab by slab from `packed` (op(B) packed by `PackedRhs::new`) where that
/// holds it and the product runs as slabs.
pub(crate) fn gemm_serial_packed<T: Num>(
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    packed: &PackedRhs,
    k: usize,
    c: &mut [T],
    n: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == DType::F32 && !packed.data.is_empty() && !c.is_empty() && n > 0 && k > 0 {
        let a32 = Operand { data: bytemuck::cast_slice::<T, f32>(a.data), ld: a.ld, trans: a.trans };
        let m = c.len() / n;
        if takes_slabs(Simd::Avx512, 1, &a32, (m, k, n), true) {
            assert_eq!(packed.data.len(), n.div_ceil(NR) * NR * k);
            let c = bytemuck::cast_slice_mut::<T, f32>(c);
            return slab_product(&InlinePool, a32, SlabB::Packed(&packed.data), k, c, n, accumulate, None);
        }
    }
    let _ = packed;
    gemm_serial(a, b, k, c, n, accumulate)
}

/// `C (m×n) (=|+=) op(A) × op(B)` on the calling thread (`+=` when `accumulate`), for kernels
/// that split their work over the pool themselves (convolutions); f32 through the blocked
/// micro-kernel.
pub(crate) fn gemm_serial<T: Num>(
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    k: usize,
    c: &mut [T],
    n: usize,
    accumulate: bool,
) {
    if T::DTYPE != DType::F32 {
        if !accumulate {
            c.fill(T::store(T::A::ZERO));
        }
        return gemm_plain(&InlinePool, a, b, k, c, n);
    }
    let a = Operand { data: bytemuck::cast_slice::<T, f32>(a.data), ld: a.ld, trans: a.trans };
    let b = Operand { data: bytemuck::cast_slice::<T, f32>(b.data), ld: b.ld, trans: b.trans };
    gemm_f32(&InlinePool, a, b, k, bytemuck::cast_slice_mut::<T, f32>(c), n, accumulate);
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
        gemm_f32(pool, oa, ob, k, &mut c, n.max(1), false);
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

    /// The f32 product of `a` and `b` (`m`×`k` by `k`×`n`) in a fresh output, `epi` applied.
    fn f32_product(
        &self,
        ctx: &OpKernelContext<'_>,
        a: &Tensor,
        b: &Tensor,
        (m, k, n): (usize, usize, usize),
        epi: Option<&Epilogue<'_>>,
    ) -> Result<Tensor> {
        // Every element is written (zeros when k = 0), so the buffer may be recycled.
        let mut out = ctx.allocate_output(DType::F32, Shape::matrix(m, n))?;
        let (oa, ob) = self.operands(a.as_slice::<f32>()?, a.shape(), b.as_slice::<f32>()?, b.shape());
        let c = out.as_mut_slice::<f32>()?;
        gemm_f32_on(Simd::detect(), ctx.intra_op(), oa, ob, k, c, n.max(1), false, epi);
        Ok(out)
    }
}

/// `_FusedMatMul` (see `rill_graph::fuse`): the f32 product with what follows it (bias and ReLU,
/// or ReluGrad) applied by the threads that computed each part of it.
struct FusedMatMulK {
    mm: MatMulK,
    /// `Some(relu)` for a bias (then ReLU or not), `None` for ReluGrad.
    bias: Option<bool>,
}

pub fn create_fused_matmul(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    let bias = match a.strs("fused_ops")? {
        [b] if b == "BiasAdd" => Some(false),
        [b, r] if b == "BiasAdd" && r == "Relu" => Some(true),
        [r] if r == "ReluGrad" => None,
        other => return Err(Error::invalid_argument(format!("_FusedMatMul cannot fuse {other:?}"))),
    };
    let mm = MatMulK { ta: a.bool_or("transpose_a", false), tb: a.bool_or("transpose_b", false) };
    Ok(Kernel::expensive(FusedMatMulK { mm, bias }))
}

impl OpKernel for FusedMatMulK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (a, b, extra) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?);
        if [a, b, extra].iter().any(|t| t.dtype() != DType::F32) {
            return Err(Error::invalid_argument(format!(
                "_FusedMatMul takes f32 inputs, got {}, {} and {}",
                a.dtype(),
                b.dtype(),
                extra.dtype()
            )));
        }
        let (m, k, n) = dims(a.shape(), b.shape(), self.mm.ta, self.mm.tb)?;
        let epi = match self.bias {
            Some(relu) => {
                if extra.shape().rank() != 1 || extra.shape().dim(0) != n {
                    return Err(Error::invalid_argument(format!(
                        "Must provide as many biases as the last dimension of the product: {} vs. {n}",
                        extra.shape()
                    )));
                }
                Epilogue::Bias { bias: extra.as_slice::<f32>()?, relu }
            }
            None => {
                if extra.shape() != &Shape::matrix(m, n) {
                    return Err(Error::invalid_argument(format!(
                        "ReluGrad features of shape {} for a product of shape [{m}, {n}]",
                        extra.shape()
                    )));
                }
                Epilogue::ReluGrad { features: extra.as_slice::<f32>()?, n }
            }
        };
        let out = self.mm.f32_product(ctx, a, b, (m, k, n), Some(&epi))?;
        ctx.set_output(0, out);
        Ok(())
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
            DType::F32 => self.f32_product(ctx, a, b, (m, k, n), None)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `C (=|+=) op(A) × op(B)` the plain way, in f64.
    fn reference(a: &Operand<'_, f32>, b: &Operand<'_, f32>, k: usize, c: &mut [f32], n: usize, acc: bool) {
        for (i, row) in c.chunks_exact_mut(n).enumerate() {
            for (j, d) in row.iter_mut().enumerate() {
                let s: f64 = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
                *d = if acc { (*d as f64 + s) as f32 } else { s as f32 };
            }
        }
    }

    /// A B larger than `PACKED_B_MAX` is packed in column groups, each group after the first
    /// while the bands read the one before: three groups on one thread (1904, 1904 and 192
    /// columns, the third packed into the first's buffer again), two on a pool of two threads
    /// (3488 and 112). Every seventh row is checked.
    #[test]
    fn a_wide_b_is_packed_in_column_groups() {
        let threads = crate::pool::ThreadPool::new("gemm-test", 2);
        let cases: [(usize, usize, usize, &dyn IntraOpPool); 2] =
            [(13, 1100, 4000, &InlinePool), (450, 600, 3600, &threads)];
        for (m, k, n, pool) in cases {
            // Past `PACKED_B_MAX`, and on more than one thread with more rows than the few-rows
            // split takes.
            let threads = pool.num_threads();
            assert!(k * n > PACKED_B_MAX && (threads == 1 || m.div_ceil(MR) > threads * MC / MR));
            let av: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
            let bv: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
            let a = Operand::new(&av, k, false);
            for tb in [false, true] {
                let b = Operand::new(&bv, if tb { k } else { n }, tb);
                let rows: Vec<usize> = (0..m).step_by(7).collect();
                let want: Vec<f32> = rows
                    .iter()
                    .flat_map(|&i| (0..n).map(move |j| (0..k).map(|p| a.at(i, p) * b.at(p, j)).sum()))
                    .collect();
                for simd in Simd::available() {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_f32_on(simd, pool, a, b, k, &mut got, n, false, None);
                    for (r, &i) in rows.iter().enumerate() {
                        let (got, want) = (&got[i * n..][..n], &want[r * n..][..n]);
                        assert!(got == want, "{m}x{k}x{n} tb={tb} simd={simd:?} row {i}");
                    }
                }
            }
        }
    }

    /// Both micro-kernel paths (the AVX2 one where the CPU has it), on shapes around the tile,
    /// depth-block, A-block and band edges, every transpose pair, writing and accumulating.
    #[test]
    fn transposed_packing_matches_the_scalar_interleave() {
        for kc in [1, 7, 8, 9, 16, 61, 256] {
            let runs: Vec<Vec<f32>> =
                (0..NR).map(|c| (0..kc).map(|p| (c * 1000 + p) as f32).collect()).collect();
            let srcs: [&[f32]; NR] = std::array::from_fn(|c| &runs[c][..]);
            let mut want = vec![0f32; NR * kc];
            interleave(&mut want, &srcs);
            let mut got = vec![-1f32; NR * kc];
            interleave_b(&mut got, &srcs);
            assert_eq!(got, want, "depth {kc}");
        }
    }

    /// `pack_b` of an untransposed B, by row blocks where the CPU has AVX2 (both vector widths
    /// where it has them), against a packing read off element by element: depths around
    /// `PACK_B_ROWS`, a partial last sliver, and columns starting inside B.
    #[test]
    fn untransposed_packing_matches_the_plain_layout() {
        let (k, n): (usize, usize) = (40, 75);
        let data: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
        let b = Operand::new(&data, n, false);
        for (p0, kc) in [(0, 1), (3, 7), (0, 8), (5, 9), (1, 17), (0, 40)] {
            for (j0, nc) in [(0usize, 16usize), (0, 75), (5, 64), (11, 37), (70, 5)] {
                let slivers = nc.div_ceil(NR);
                let mut want = vec![0f32; slivers * NR * kc];
                for (s, sliver) in want.chunks_exact_mut(NR * kc).enumerate() {
                    for p in 0..kc {
                        for c in 0..NR.min(nc - s * NR) {
                            sliver[p * NR + c] = data[(p0 + p) * n + j0 + s * NR + c];
                        }
                    }
                }
                let mut got = vec![-1f32; want.len()];
                pack_b(&b, p0, kc, j0, nc, &mut got);
                assert_eq!(got, want, "depth {p0}+{kc}, columns {j0}+{nc}");
                #[cfg(target_arch = "x86_64")]
                #[allow(unsafe_code)]
                if has_avx2_fma() {
                    let whole = nc / NR * NR * kc;
                    got.fill(-1.0);
                    // SAFETY: `has_avx2_fma()` found AVX2 and FMA on this CPU.
                    unsafe { avx2::pack_b_rows(&b, p0, kc, j0, nc / NR, &mut got) };
                    assert_eq!(got[..whole], want[..whole], "AVX2, depth {p0}+{kc}, columns {j0}+{nc}");
                }
            }
        }
    }

    /// `tile_from_runs` on both paths against the plain sum, runs of the vector width and around
    /// it, with a zero run standing in for padding.
    #[test]
    fn tiles_from_runs_match_the_plain_product() {
        let zeros = [0f32; 40];
        for (run, segments) in [(1, 3), (7, 2), (8, 5), (9, 1), (33, 4)] {
            let depth = run * segments;
            let rows: Vec<Vec<f32>> =
                (0..MR).map(|r| (0..depth).map(|p| ((r * 31 + p * 7) % 13) as f32 - 6.0).collect()).collect();
            let b: Vec<f32> = (0..depth * NR).map(|i| ((i * 5) % 11) as f32 * 0.25 - 1.0).collect();
            // Row 2's second run is padding.
            let runs: Vec<[&[f32]; MR]> = (0..segments)
                .map(|s| {
                    std::array::from_fn(|r| {
                        if r == 2 && s == 1 {
                            &zeros[..run]
                        } else {
                            &rows[r][s * run..(s + 1) * run]
                        }
                    })
                })
                .collect();
            let mut want = [[0f32; NR]; MR];
            for (r, w) in want.iter_mut().enumerate() {
                for (p, bv) in b.chunks_exact(NR).enumerate() {
                    let x = if r == 2 && p / run == 1 { 0.0 } else { rows[r][p] };
                    for (c, v) in w.iter_mut().enumerate() {
                        *v += x * bv[c];
                    }
                }
            }
            for simd in Simd::available() {
                assert_eq!(tile_from_runs(simd, &runs, run, &b), want, "run {run} simd {simd:?}");
            }
        }
    }

    /// `tile_from_gathered` on both paths against the plain sum: B rows gathered at an offset
    /// from separate slices, one of them shared zeros, A packed by `pack_transposed` from fewer
    /// rows than a sliver holds.
    #[test]
    fn gathered_tiles_match_the_plain_product() {
        let zeros = [0f32; 40];
        for (depth, m) in [(1, 6), (5, 4), (17, 6)] {
            let at: Vec<f32> = (0..depth * m).map(|i| ((i * 7) % 9) as f32 - 4.0).collect();
            let mut a = vec![f32::NAN; depth * MR];
            pack_transposed(&at, m, &mut a);
            let rows: Vec<Vec<f32>> =
                (0..depth).map(|p| (0..40).map(|j| ((p * 3 + j * 5) % 7) as f32 * 0.5).collect()).collect();
            let b: Vec<&[f32]> = (0..depth).map(|p| if p == 2 { &zeros[..] } else { &rows[p][..] }).collect();
            let mut want = [[0f32; NR]; MR];
            for (r, w) in want.iter_mut().enumerate().take(m) {
                for p in 0..depth {
                    for (c, v) in w.iter_mut().enumerate() {
                        *v += at[p * m + r] * b[p][8 + c];
                    }
                }
            }
            for simd in Simd::available() {
                assert_eq!(tile_from_gathered(simd, &a, &b, 8), want, "depth {depth} rows {m} simd {simd:?}");
            }
        }
    }

    /// The slab product (AVX-512, where the CPU has it) against the plain sum: a partial last
    /// tile and slab on one thread; on a pool of four threads, more rows than the few-rows split
    /// takes, so the last slabs are cut into row parts; two depth blocks, the second adding to
    /// the first; one slab, shallow; four slabs, each cut into eight row parts. Every transpose
    /// pair (a transposed A in place where it fits `SLAB_TRANSPOSED_A_MAX`, so not in the deep
    /// case), writing and accumulating, then each epilogue.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_slab_product_matches_the_reference() {
        if !Simd::available().contains(&Simd::Avx512) {
            return;
        }
        let threads = crate::pool::ThreadPool::new("gemm-test", 3);
        let cases: [(usize, usize, usize, &dyn IntraOpPool); 5] = [
            (151, 130, 200, &InlinePool),
            (601, 300, 200, &threads),
            (150, 2100, 130, &InlinePool),
            (601, 40, 64, &InlinePool),
            (1400, 40, 256, &threads),
        ];
        for (m, k, n, pool) in cases {
            let few_rows = pool.num_threads() > 1 && m.div_ceil(MR) <= pool.num_threads() * (MC / MR);
            assert!(
                !few_rows
                    && takes_slabs(
                        Simd::Avx512,
                        pool.num_threads(),
                        &Operand::new(&[], k, false),
                        (m, k, n),
                        false
                    )
            );
            let val = |i: usize, p: usize, q: usize| ((i * p % q) as f32 - (q / 2) as f32) / 8.0;
            let av: Vec<f32> = (0..m * k).map(|i| val(i, 7, 13)).collect();
            let bv: Vec<f32> = (0..k * n).map(|i| val(i, 5, 11)).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| val(i, 3, 7)).collect();
            for t in 0..4 {
                let (ta, tb) = (t % 2 == 1, t >= 2);
                let a = Operand::new(&av, if ta { m } else { k }, ta);
                let b = Operand::new(&bv, if tb { k } else { n }, tb);
                for acc in [false, true] {
                    let mut want = c0.clone();
                    reference(&a, &b, k, &mut want, n, acc);
                    let mut got = c0.clone();
                    gemm_f32_on(Simd::Avx512, pool, a, b, k, &mut got, n, acc, None);
                    // Sums of eighths: exact in f32 at these sizes, in any order.
                    assert!(got == want, "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}");
                    // B packed once beforehand, as a convolution's filter is.
                    let packed = PackedRhs::new(b, k, n);
                    assert_eq!(packed.data.is_empty(), k > SLAB_DEPTH);
                    let mut got = c0.clone();
                    gemm_serial_packed(a, b, &packed, k, &mut got, n, acc);
                    assert!(got == want, "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}, B packed");
                }
                let mut product = vec![0f32; m * n];
                reference(&a, &b, k, &mut product, n, false);
                let bias: Vec<f32> = (0..n).map(|j| val(j, 1, 9)).collect();
                let features: Vec<f32> = (0..m * n).map(|i| val(i, 1, 5)).collect();
                for epi in [
                    Epilogue::Bias { bias: &bias, relu: false },
                    Epilogue::Bias { bias: &bias, relu: true },
                    Epilogue::ReluGrad { features: &features, n },
                ] {
                    let mut want = product.clone();
                    epi.apply(&mut want, n, 0, 0, 0, n);
                    let mut got = vec![f32::NAN; m * n];
                    gemm_f32_on(Simd::Avx512, pool, a, b, k, &mut got, n, false, Some(&epi));
                    assert!(got == want, "{m}x{k}x{n} ta={ta} tb={tb} with an epilogue");
                }
            }
        }
    }

    /// A right-hand side packed once (`PackedRhs`) serves products of any number of rows, as
    /// slabs where the CPU has AVX-512: one row, a partial tile, a partial slab, every transpose
    /// pair, writing and accumulating.
    #[test]
    fn a_packed_rhs_serves_products_of_any_rows() {
        let val = |i: usize, p: usize, q: usize| ((i * p % q) as f32 - (q / 2) as f32) / 8.0;
        for (m, k, n) in [(1, 40, 70), (7, 130, 200), (42, 64, 144)] {
            let av: Vec<f32> = (0..m * k).map(|i| val(i, 7, 13)).collect();
            let bv: Vec<f32> = (0..k * n).map(|i| val(i, 5, 11)).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| val(i, 3, 7)).collect();
            for t in 0..4 {
                let (ta, tb) = (t % 2 == 1, t >= 2);
                let a = Operand::new(&av, if ta { m } else { k }, ta);
                let b = Operand::new(&bv, if tb { k } else { n }, tb);
                let packed = PackedRhs::new(b, k, n);
                #[cfg(target_arch = "x86_64")]
                assert_eq!(packed.data.is_empty(), Simd::detect() != Simd::Avx512);
                for acc in [false, true] {
                    let mut want = c0.clone();
                    reference(&a, &b, k, &mut want, n, acc);
                    let mut got = c0.clone();
                    gemm_serial_packed(a, b, &packed, k, &mut got, n, acc);
                    // Sums of eighths: exact in f32 at these sizes, in any order.
                    assert!(got == want, "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}");
                }
            }
        }
    }

    #[test]
    fn every_path_matches_reference() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        // Serial sizes first; then products large enough for the pool: few rows (each thread
        // packs B itself, split by rows or, for a wider B, by columns) and many rows (B packed
        // once, shared), each with every transpose. B of one sliver (n ≤ 16) reads A in place,
        // over several depth blocks and with a partial last tile.
        let serial = [(1, 1, 1), (7, 17, 15), (13, 257, 33), (145, 40, 17), (600, 31, 20), (1200, 9, 3)];
        let mut shapes: Vec<(usize, usize, usize, bool, bool)> =
            serial.iter().enumerate().map(|(s, &(m, k, n))| (m, k, n, s % 2 == 1, s % 4 >= 2)).collect();
        let one_sliver = [(97, 530, 10), (131, 600, 16), (1500, 300, 5)];
        // Depths 300 and 784 are cut into blocks deeper than `KC` (`depth_block`), 784 also into
        // blocks deeper than `KC_AVX512`; 1000 into equal blocks (3 × 334 or 4 × 250).
        // Widths of whole slivers (64, 128) let the AVX-512 kernel read an untransposed B in place.
        let products = [
            (131, 300, 37),
            (500, 70, 40),
            (20, 600, 129),
            (50, 170, 333),
            (70, 784, 50),
            (40, 1000, 70),
            (131, 300, 64),
            (20, 600, 128),
        ];
        for (m, k, n) in products.into_iter().chain(one_sliver) {
            for t in 0..4 {
                shapes.push((m, k, n, t % 2 == 1, t >= 2));
            }
        }
        let paths = Simd::available();
        let threads = crate::pool::ThreadPool::new("gemm-test", 3);
        let pools: [&dyn IntraOpPool; 2] = [&InlinePool, &threads];
        for &(m, k, n, ta, tb) in &shapes {
            let av: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| next()).collect();
            let a = Operand::new(&av, if ta { m } else { k }, ta);
            let b = Operand::new(&bv, if tb { k } else { n }, tb);
            for acc in [false, true] {
                let mut want = c0.clone();
                reference(&a, &b, k, &mut want, n, acc);
                for (&simd, pool) in paths.iter().flat_map(|p| pools.iter().map(move |q| (p, *q))) {
                    let mut got = c0.clone();
                    gemm_f32_on(simd, pool, a, b, k, &mut got, n, acc, None);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (k as f32).sqrt() * 4.0 + 1e-6;
                        assert!(
                            (g - w).abs() <= tol,
                            "{m}x{k}x{n} ta={ta} tb={tb} acc={acc} simd={simd:?} threads={} at {i}: {g} vs {w}",
                            pool.num_threads()
                        );
                    }
                }
            }
        }
    }
}
