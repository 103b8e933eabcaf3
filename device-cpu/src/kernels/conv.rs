//! Conv2D, its two backprops, MaxPool and MaxPoolGrad, NHWC: the convolutions im2col a block of
//! output rows into a scratch buffer and multiply it with the blocked GEMM of `matmul.rs`, in
//! parallel over batch × row blocks; f16 and bf16 are computed in f32.

use super::matmul::{
    gemm_serial, gemm_serial_packed, pack_panel, pack_transposed, simd, tile_from_gathered, tile_from_runs,
    widen, Operand, PackedRhs, Simd, TILE_COLS, TILE_ROWS,
};
use super::{int_vector, unsupported, with_buffer, Arith, Num};
use rill_graph::device::{chunk_len, parallel_chunks_mut, Device};
use rill_graph::half::{bf16, f16};
use rill_graph::ops::{nhwc_pair, window_output_size};
use rill_graph::{
    dispatch_float, AttrsExt, DType, Element, Error, IntraOpPool, Kernel, KernelInit, OpKernel,
    OpKernelContext, Result, Shape, Tensor,
};
use std::ops::Range;

/// Elements of one im2col block: 512 KiB of f32 stays in L2 while the GEMM reads it, and still
/// holds enough output positions to amortise packing the filter.
const SCRATCH_ELEMENTS: usize = 128 * 1024;
/// Multiply-adds below which a block of rows is not worth handing to another thread.
const PARALLEL_MIN_COST: usize = 256 * 1024;
/// Input depth from which `conv2d_direct` reads each pixel as one run where it lies; shallower
/// inputs are first copied into zero-bordered images so that a whole window row is one run
/// (runs of so few floats would switch rows more often than they multiply).
const DIRECT_MIN_DEPTH: usize = 8;
/// Output positions per depth block of the direct filter gradient: a window element's gathered
/// input runs (one cache line per position, 32 KiB) stay in L1/L2 while every tile of output
/// channels reads them, and each tile's sum is long enough to outweigh adding it to the partial
/// (measured: 256 gave ~5% less, 1024 no more).
const FILTER_GRAD_BLOCK: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Padding {
    Same,
    Valid,
}

impl Padding {
    fn as_str(self) -> &'static str {
        match self {
            Padding::Same => "SAME",
            Padding::Valid => "VALID",
        }
    }
}

/// The attrs every op here shares: strides, padding and an NHWC data format.
#[derive(Clone, Copy, Debug)]
struct WindowAttrs {
    strides: (usize, usize),
    padding: Padding,
}

impl WindowAttrs {
    fn parse(init: &KernelInit<'_>) -> Result<WindowAttrs> {
        let a = init.attrs();
        let format = a.str_or("data_format", "NHWC");
        if format != "NHWC" {
            return Err(Error::invalid_argument(format!("data_format {format} is not supported; use NHWC")));
        }
        if let Ok(d) = a.ints("dilations") {
            if d.iter().any(|&x| x != 1) {
                return Err(Error::invalid_argument(format!("dilations {d:?} are not supported; use 1")));
            }
        }
        let padding = match a.str("padding")? {
            "SAME" => Padding::Same,
            "VALID" => Padding::Valid,
            p => return Err(Error::invalid_argument(format!("padding must be SAME or VALID, not '{p}'"))),
        };
        Ok(WindowAttrs { strides: nhwc_pair(a, "strides")?, padding })
    }
}

/// The sizes of one windowed op over an NHWC input; `out_c` is the filter's output depth for
/// the convolutions and the input depth for pooling.
#[derive(Clone, Copy, Debug)]
struct Geom {
    batch: usize,
    in_h: usize,
    in_w: usize,
    in_c: usize,
    k_h: usize,
    k_w: usize,
    out_c: usize,
    out_h: usize,
    out_w: usize,
    stride_h: usize,
    stride_w: usize,
    pad_top: usize,
    pad_left: usize,
}

impl Geom {
    fn new(input: &Shape, window: (usize, usize), out_c: usize, attrs: WindowAttrs) -> Result<Geom> {
        if input.rank() != 4 {
            return Err(Error::invalid_argument(format!("input must be 4-dimensional (NHWC), is {input}")));
        }
        let (k_h, k_w) = window;
        let (stride_h, stride_w) = attrs.strides;
        let p = attrs.padding.as_str();
        let (in_h, in_w) = (input.dim(1), input.dim(2));
        let out_h = window_output_size(in_h, k_h, stride_h, p)?;
        let out_w = window_output_size(in_w, k_w, stride_w, p)?;
        // TensorFlow pads the smaller half before (top, left).
        let before = |out: usize, k: usize, s: usize, x: usize| match attrs.padding {
            Padding::Same => (out.saturating_sub(1) * s + k).saturating_sub(x) / 2,
            Padding::Valid => 0,
        };
        Ok(Geom {
            batch: input.dim(0),
            in_h,
            in_w,
            in_c: input.dim(3),
            k_h,
            k_w,
            out_c,
            out_h,
            out_w,
            stride_h,
            stride_w,
            pad_top: before(out_h, k_h, stride_h, in_h),
            pad_left: before(out_w, k_w, stride_w, in_w),
        })
    }

    /// Length of one patch: a row of the im2col matrix, a row of the filter as a matrix.
    fn patch_len(&self) -> usize {
        self.k_h * self.k_w * self.in_c
    }

    fn in_image(&self) -> usize {
        self.in_h * self.in_w * self.in_c
    }

    fn out_row(&self) -> usize {
        self.out_w * self.out_c
    }

    fn in_shape(&self) -> [usize; 4] {
        [self.batch, self.in_h, self.in_w, self.in_c]
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.out_h, self.out_w, self.out_c]
    }

    /// The input row under window row `kh` of output row `oh`, unless it is padding.
    #[inline]
    fn in_row(&self, oh: usize, kh: usize) -> Option<usize> {
        (oh * self.stride_h + kh).checked_sub(self.pad_top).filter(|&r| r < self.in_h)
    }

    /// The window columns of output column `ow` that fall inside the input, and the input
    /// column of the first of them.
    #[inline]
    fn in_cols(&self, ow: usize) -> (Range<usize>, usize) {
        let left = ow * self.stride_w;
        let lo = self.pad_left.saturating_sub(left).min(self.k_w);
        let hi = (self.in_w + self.pad_left).saturating_sub(left).clamp(lo, self.k_w);
        (lo..hi, (left + lo).saturating_sub(self.pad_left))
    }

    /// The output rows whose windows cover some of input rows `rows`.
    fn out_rows_touching(&self, rows: Range<usize>) -> Range<usize> {
        // oh·s + kh − pad ∈ rows for some kh < k_h.
        let lo = (rows.start + self.pad_top + 1).saturating_sub(self.k_h).div_ceil(self.stride_h);
        let hi = (rows.end + self.pad_top).div_ceil(self.stride_h).min(self.out_h);
        lo.min(hi)..hi
    }

    /// Where the window of output position `p` (counted over the whole batch, row-major) starts
    /// in the input: the image's offset and the (possibly negative) input row and column of
    /// window element (0, 0).
    fn window_origin(&self, p: usize) -> (usize, isize, isize) {
        let (n, oh, ow) = self.position(p);
        (
            n * self.in_image(),
            (oh * self.stride_h) as isize - self.pad_top as isize,
            (ow * self.stride_w) as isize - self.pad_left as isize,
        )
    }

    /// Output position `p` (counted over the whole batch, row-major) as (image, row, column).
    fn position(&self, p: usize) -> (usize, usize, usize) {
        let per_image = self.out_h * self.out_w;
        let (n, q) = (p / per_image, p % per_image);
        (n, q / self.out_w, q % self.out_w)
    }

    /// The input pixel (`in_c` floats of `x`) under window element (`kh`, `kw`) of the window at
    /// `origin` (from `window_origin`), or `zeros` where that is padding.
    fn pixel<'a>(
        &self,
        x: &'a [f32],
        origin: (usize, isize, isize),
        kh: usize,
        kw: usize,
        zeros: &'a [f32],
    ) -> &'a [f32] {
        let (image, ih, iw) = origin;
        let (ih, iw) = (ih + kh as isize, iw + kw as isize);
        if ih < 0 || iw < 0 || ih >= self.in_h as isize || iw >= self.in_w as isize {
            zeros
        } else {
            &x[image + (ih as usize * self.in_w + iw as usize) * self.in_c..][..self.in_c]
        }
    }

    /// Output rows per im2col block.
    fn block_rows(&self) -> usize {
        (SCRATCH_ELEMENTS / (self.out_w * self.patch_len()).max(1)).max(1)
    }
}

/// Runs `f(image, rows, block)` over a `[batch, rows_per_image, row_len]` array in blocks of
/// whole rows that never span two images, on the pool when `row_cost` (multiply-adds per row)
/// makes that worth it.
fn for_image_rows<T: Send>(
    pool: &dyn IntraOpPool,
    out: &mut [T],
    rows_per_image: usize,
    row_len: usize,
    row_cost: usize,
    f: impl Fn(usize, Range<usize>, &mut [T]) + Sync,
) {
    if out.is_empty() || row_len == 0 || rows_per_image == 0 {
        return;
    }
    let total_rows = out.len() / row_len;
    let rows = chunk_len(pool, total_rows, PARALLEL_MIN_COST.div_ceil(row_cost.max(1)));
    parallel_chunks_mut(pool, out, rows * row_len, |off, chunk| {
        let (mut at, end) = (off / row_len, (off + chunk.len()) / row_len);
        let mut rest = chunk;
        while at < end {
            let (image, r0) = (at / rows_per_image, at % rows_per_image);
            let r1 = rows_per_image.min(r0 + end - at);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut((r1 - r0) * row_len);
            f(image, r0..r1, head);
            rest = tail;
            at += r1 - r0;
        }
    });
}

thread_local! {
    /// The im2col scratch of this thread, kept between calls: a fresh one per image would be
    /// allocated and zero-filled every time. Held as words so any element type fits aligned.
    static SCRATCH: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` with `len` elements of this thread's scratch (contents unspecified: every use writes
/// before it reads; debug builds fill it with all-ones bytes to keep that true).
fn with_scratch<E: Element, R>(len: usize, f: impl FnOnce(&mut [E]) -> R) -> R {
    let words = (len * std::mem::size_of::<E>()).div_ceil(8);
    with_buffer(&SCRATCH, words, |buf| {
        let scratch = &mut bytemuck::cast_slice_mut::<u64, E>(buf)[..len];
        if cfg!(debug_assertions) {
            bytemuck::cast_slice_mut::<E, u8>(scratch).fill(0xFF);
        }
        f(scratch)
    })
}

/// Writes the patches of output rows `rows` of one image into `cols` (one row of `patch_len`
/// per output position, in the filter's `[kh, kw, c]` order), zeros over the padding.
fn im2col<E: Num + Arith>(g: &Geom, image: &[E], rows: Range<usize>, cols: &mut [E]) {
    let c = g.in_c;
    let mut patches = cols.chunks_exact_mut(g.patch_len());
    for oh in rows {
        for ow in 0..g.out_w {
            let Some(patch) = patches.next() else { return };
            let (kws, iw0) = g.in_cols(ow);
            for (kh, dst) in patch.chunks_exact_mut(g.k_w * c).enumerate() {
                match g.in_row(oh, kh) {
                    // Window columns inside the input are contiguous in both layouts.
                    Some(ih) if !kws.is_empty() => {
                        let (pre, rest) = dst.split_at_mut(kws.start * c);
                        let (mid, post) = rest.split_at_mut(kws.len() * c);
                        pre.fill(E::ZERO);
                        mid.copy_from_slice(&image[(ih * g.in_w + iw0) * c..][..mid.len()]);
                        post.fill(E::ZERO);
                    }
                    _ => dst.fill(E::ZERO),
                }
            }
        }
    }
}

/// Adds the patches of output rows `rows` (as `im2col` lays them out) into the input rows
/// `in_rows` of one image's gradient `dst`; patch parts over other rows are left to their
/// owners.
fn col2im<E: Num + Arith>(g: &Geom, cols: &[E], rows: Range<usize>, in_rows: Range<usize>, dst: &mut [E]) {
    let c = g.in_c;
    let mut patches = cols.chunks_exact(g.patch_len());
    for oh in rows {
        for ow in 0..g.out_w {
            let Some(patch) = patches.next() else { return };
            let (kws, iw0) = g.in_cols(ow);
            for (kh, src) in patch.chunks_exact(g.k_w * c).enumerate() {
                let Some(ih) = g.in_row(oh, kh).filter(|r| in_rows.contains(r)) else { continue };
                let src = &src[kws.start * c..kws.end * c];
                let at = ((ih - in_rows.start) * g.in_w + iw0) * c;
                for (d, &s) in dst[at..at + src.len()].iter_mut().zip(src) {
                    *d = d.add(s);
                }
            }
        }
    }
}

/// `out = conv2d(x, filter)`, every element written.
fn conv2d<E: Num + Arith>(pool: &dyn IntraOpPool, g: &Geom, x: &[E], filter: &[E], out: &mut [E]) {
    let k = g.patch_len();
    if k == 0 {
        out.fill(E::ZERO);
        return;
    }
    // Packed once for every block's product.
    let packed = PackedRhs::new(Operand::new(filter, g.out_c, false), k, g.out_c);
    for_image_rows(pool, out, g.out_h, g.out_row(), g.out_w * k * g.out_c, |n, rows, dst| {
        let image = &x[n * g.in_image()..][..g.in_image()];
        with_scratch::<E, _>(g.block_rows().min(rows.len()) * g.out_w * k, |scratch| {
            for r0 in rows.clone().step_by(g.block_rows()) {
                let r1 = rows.end.min(r0 + g.block_rows());
                let cols = &mut scratch[..(r1 - r0) * g.out_w * k];
                im2col(g, image, r0..r1, cols);
                let c = &mut dst[(r0 - rows.start) * g.out_row()..(r1 - rows.start) * g.out_row()];
                let (a, f) = (Operand::new(cols, k, false), Operand::new(filter, g.out_c, false));
                gemm_serial_packed(a, f, &packed, k, c, g.out_c, false);
            }
        });
    });
}

/// `dx = col2im(dy × filterᵀ)`, split over blocks of input rows; each block recomputes the
/// patches of the output rows it shares with its neighbours instead of locking. Every element of
/// `dx` is written.
fn conv2d_backprop_input<E: Num + Arith>(
    pool: &dyn IntraOpPool,
    g: &Geom,
    filter: &[E],
    dy: &[E],
    dx: &mut [E],
) {
    let k = g.patch_len();
    let row_cost = g.out_w * k * g.out_c * g.out_h / g.in_h.max(1);
    let filter_t = Operand::new(filter, g.out_c, true);
    // Packed once for every block's product.
    let packed = PackedRhs::new(filter_t, g.out_c, k);
    for_image_rows(pool, dx, g.in_h, g.in_w * g.in_c, row_cost, |n, in_rows, dst| {
        let dy = &dy[n * g.out_h * g.out_row()..][..g.out_h * g.out_row()];
        let touched = g.out_rows_touching(in_rows.clone());
        dst.fill(E::ZERO);
        with_scratch::<E, _>(g.block_rows().min(touched.len()) * g.out_w * k, |scratch| {
            for r0 in touched.clone().step_by(g.block_rows()) {
                let r1 = touched.end.min(r0 + g.block_rows());
                let cols = &mut scratch[..(r1 - r0) * g.out_w * k];
                let a = Operand::new(&dy[r0 * g.out_row()..r1 * g.out_row()], g.out_c, false);
                gemm_serial_packed(a, filter_t, &packed, g.out_c, cols, k, false);
                col2im(g, cols, r0..r1, in_rows.clone(), dst);
            }
        });
    });
}

/// `dfilter = Σ im2col(x)ᵀ × dy`: one partial sum per thread over its share of the output rows,
/// added in a fixed order so the result does not depend on scheduling. Every element of `df` is
/// written.
fn conv2d_backprop_filter<E: Num + Arith>(pool: &dyn IntraOpPool, g: &Geom, x: &[E], dy: &[E], df: &mut [E]) {
    let (k, size) = (g.patch_len(), df.len());
    let total_rows = g.batch * g.out_h;
    df.fill(E::ZERO);
    if size == 0 || total_rows == 0 || g.out_w == 0 {
        return;
    }
    let min_rows = PARALLEL_MIN_COST.div_ceil((g.out_w * k * g.out_c).max(1));
    let per = total_rows.div_ceil(pool.num_threads().max(1)).max(min_rows);
    let parts = total_rows.div_ceil(per);
    let mut partials = vec![E::ZERO; parts * size];
    parallel_chunks_mut(pool, &mut partials, size, |off, acc| {
        let part = off / size;
        let (mut at, end) = (part * per, ((part + 1) * per).min(total_rows));
        with_scratch::<E, _>(g.block_rows().min(g.out_h) * g.out_w * k, |scratch| {
            while at < end {
                let (n, r0) = (at / g.out_h, at % g.out_h);
                let r1 = g.out_h.min(r0 + g.block_rows()).min(r0 + end - at);
                let image = &x[n * g.in_image()..][..g.in_image()];
                let cols = &mut scratch[..(r1 - r0) * g.out_w * k];
                im2col(g, image, r0..r1, cols);
                let b = Operand::new(&dy[at * g.out_row()..(at + r1 - r0) * g.out_row()], g.out_c, false);
                gemm_serial(Operand::new(cols, k, true), b, (r1 - r0) * g.out_w, acc, g.out_c, true);
                at += r1 - r0;
            }
        });
    });
    for part in partials.chunks_exact(size) {
        for (d, &s) in df.iter_mut().zip(part) {
            *d = d.add(s);
        }
    }
}

/// `out = conv2d(x, filter)` in f32 with no im2col: the filter is packed once into slivers of
/// `TILE_COLS` output channels, and each tile of `TILE_ROWS` output positions hands the
/// micro-kernel its patches as runs read where they lie. From `DIRECT_MIN_DEPTH` input channels
/// on a run is one pixel (`in_c` floats, a shared zero run over padding); shallower inputs are
/// first copied into a zero-bordered image so that a whole window row (`k_w·in_c` floats) is one
/// run. Tiles are split over the pool; every element of `out` is written.
fn conv2d_direct(pool: &dyn IntraOpPool, g: &Geom, x: &[f32], filter: &[f32], out: &mut [f32]) {
    let (k, c, oc) = (g.patch_len(), g.in_c, g.out_c);
    let positions = g.batch * g.out_h * g.out_w;
    if positions == 0 {
        return;
    }
    let mut packed = vec![0f32; oc.div_ceil(TILE_COLS) * TILE_COLS * k];
    pack_panel(filter, k, oc, &mut packed);
    let bordered = (c < DIRECT_MIN_DEPTH).then(|| Bordered::new(g, x));
    let (segs, run) = if bordered.is_some() { (g.k_h, g.k_w * c) } else { (g.k_h * g.k_w, c) };
    let zeros = vec![0f32; run];
    let simd = simd();
    let tiles = positions.div_ceil(TILE_ROWS);
    let per = chunk_len(pool, tiles, PARALLEL_MIN_COST.div_ceil(TILE_ROWS * k * oc).max(1));
    parallel_chunks_mut(pool, out, per * TILE_ROWS * oc, |off, chunk| {
        let mut runs: Vec<[&[f32]; TILE_ROWS]> = vec![[&zeros[..]; TILE_ROWS]; segs];
        for (t, dst) in chunk.chunks_mut(TILE_ROWS * oc).enumerate() {
            let (p0, rows) = (off / oc + t * TILE_ROWS, dst.len() / oc);
            for r in 0..TILE_ROWS {
                if r >= rows {
                    runs.iter_mut().for_each(|seg| seg[r] = &zeros);
                    continue;
                }
                if let Some(b) = &bordered {
                    let at = b.window_at(g, p0 + r);
                    for (kh, seg) in runs.iter_mut().enumerate() {
                        seg[r] = &b.data[at + kh * b.w * c..][..run];
                    }
                    continue;
                }
                let origin = g.window_origin(p0 + r);
                for (s, seg) in runs.iter_mut().enumerate() {
                    seg[r] = g.pixel(x, origin, s / g.k_w, s % g.k_w, &zeros);
                }
            }
            for (j, b) in packed.chunks_exact(TILE_COLS * k).enumerate() {
                let tile = tile_from_runs(simd, &runs, run, b);
                let cols = TILE_COLS.min(oc - j * TILE_COLS);
                for (r, row) in tile.iter().enumerate().take(rows) {
                    dst[r * oc + j * TILE_COLS..][..cols].copy_from_slice(&row[..cols]);
                }
            }
        }
    });
}

/// The input of a convolution with at least one output position, copied into images bordered
/// by zeros wide enough that every window lies inside: the padding before, and after as far as
/// the last window reaches.
struct Bordered {
    data: Vec<f32>,
    h: usize,
    w: usize,
}

impl Bordered {
    fn new(g: &Geom, x: &[f32]) -> Bordered {
        let h = (g.out_h - 1) * g.stride_h + g.k_h;
        let w = (g.out_w - 1) * g.stride_w + g.k_w;
        let mut data = vec![0f32; g.batch * h * w * g.in_c];
        // VALID windows may leave the last rows and columns of the input unread.
        let cols = g.in_w.min(w - g.pad_left);
        for (n, image) in x.chunks_exact(g.in_image()).enumerate() {
            for (ih, src) in image.chunks_exact(g.in_w * g.in_c).enumerate().take(h - g.pad_top) {
                let at = ((n * h + ih + g.pad_top) * w + g.pad_left) * g.in_c;
                data[at..at + cols * g.in_c].copy_from_slice(&src[..cols * g.in_c]);
            }
        }
        Bordered { data, h, w }
    }

    /// Where the window of output position `p` starts in `data`; its row `kh` is the
    /// `k_w·in_c` floats from `kh·w·in_c` further on.
    fn window_at(&self, g: &Geom, p: usize) -> usize {
        let (n, oh, ow) = g.position(p);
        ((n * self.h + oh * g.stride_h) * self.w + ow * g.stride_w) * g.in_c
    }
}

/// `dx` of a stride-1 convolution as a forward one: the gradient is `dy` convolved with the
/// filter turned by 180° and with its depths swapped, padded by `k − 1 − pad` on top and left.
fn conv2d_backprop_input_direct(
    pool: &dyn IntraOpPool,
    g: &Geom,
    filter: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) {
    let (kh, kw, ci, co) = (g.k_h, g.k_w, g.in_c, g.out_c);
    let mut turned = vec![0f32; filter.len()];
    for (i, window) in filter.chunks_exact(ci * co).enumerate() {
        let (a, b) = (i / kw, i % kw);
        let dst = &mut turned[((kh - 1 - a) * kw + (kw - 1 - b)) * co * ci..][..co * ci];
        for (c_in, row) in window.chunks_exact(co).enumerate() {
            for (c_out, &v) in row.iter().enumerate() {
                dst[c_out * ci + c_in] = v;
            }
        }
    }
    let t = Geom {
        in_h: g.out_h,
        in_w: g.out_w,
        in_c: co,
        out_c: ci,
        out_h: g.in_h,
        out_w: g.in_w,
        pad_top: kh - 1 - g.pad_top,
        pad_left: kw - 1 - g.pad_left,
        ..*g
    };
    conv2d_direct(pool, &t, dy, &turned, dx)
}

/// `dfilter = Σ patch(p)ᵀ × dy[p]` over all output positions `p`, in f32 with no im2col, for an
/// input depth that is a multiple of `TILE_COLS`. Computed transposed, in tiles of `TILE_ROWS`
/// output channels × `TILE_COLS` input channels of one window element: for each block of
/// positions `dy` is packed once and each position's input pixel is read where it lies (a zero
/// run for padding). One partial sum per thread over its share of the positions, added in a fixed
/// order, so the result does not depend on scheduling. Every element of `df` is written.
fn conv2d_backprop_filter_direct(pool: &dyn IntraOpPool, g: &Geom, x: &[f32], dy: &[f32], df: &mut [f32]) {
    let (k, c, oc, segs) = (g.patch_len(), g.in_c, g.out_c, g.k_h * g.k_w);
    let ocp = oc.div_ceil(TILE_ROWS) * TILE_ROWS;
    let (simd, zeros) = (simd(), vec![0f32; c]);
    let partials = per_thread_sums(pool, g, ocp * k, |positions, acc| {
        let mut packed = vec![0f32; ocp * FILTER_GRAD_BLOCK];
        let mut runs: Vec<&[f32]> = Vec::with_capacity(segs * FILTER_GRAD_BLOCK);
        let mut origins = Vec::with_capacity(FILTER_GRAD_BLOCK);
        for p0 in positions.clone().step_by(FILTER_GRAD_BLOCK) {
            let n = FILTER_GRAD_BLOCK.min(positions.end - p0);
            let packed = &mut packed[..ocp * n];
            pack_transposed(&dy[p0 * oc..(p0 + n) * oc], oc, packed);
            origins.clear();
            origins.extend((p0..p0 + n).map(|p| g.window_origin(p)));
            // runs[s·n + i]: the input pixel under window element s of position p0 + i.
            runs.clear();
            for s in 0..segs {
                runs.extend(origins.iter().map(|&origin| g.pixel(x, origin, s / g.k_w, s % g.k_w, &zeros)));
            }
            for (s, b) in runs.chunks_exact(n).enumerate() {
                for ci0 in (0..c).step_by(TILE_COLS) {
                    for (t, a) in packed.chunks_exact(TILE_ROWS * n).enumerate() {
                        let tile = tile_from_gathered(simd, a, b, ci0);
                        for (r, row) in tile.iter().enumerate() {
                            let dst = &mut acc[(t * TILE_ROWS + r) * k + s * c + ci0..][..TILE_COLS];
                            for (d, v) in dst.iter_mut().zip(row) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    });
    df.fill(0.0);
    for part in partials.chunks_exact(ocp * k) {
        for (co, src) in part.chunks_exact(k).take(oc).enumerate() {
            for (kk, &v) in src.iter().enumerate() {
                df[kk * oc + co] += v;
            }
        }
    }
}

/// Splits the output positions over the pool, one share per thread, and runs `share` on each
/// with a zeroed partial sum of `len` floats; the partial sums come back in order, so adding them
/// up in that order gives a result that does not depend on scheduling.
fn per_thread_sums(
    pool: &dyn IntraOpPool,
    g: &Geom,
    len: usize,
    share: impl Fn(Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let total = g.batch * g.out_h * g.out_w;
    let per = total
        .div_ceil(pool.num_threads().max(1))
        .max(PARALLEL_MIN_COST.div_ceil(g.patch_len() * g.out_c))
        .max(1);
    let mut partials = vec![0f32; total.div_ceil(per) * len];
    parallel_chunks_mut(pool, &mut partials, len.max(1), |off, acc| {
        let first = off / len.max(1) * per;
        share(first..(first + per).min(total), acc);
    });
    partials
}

/// The filter gradient of shallow inputs (fewer than `DIRECT_MIN_DEPTH` channels):
/// the input is copied into zero-bordered images once; for each block of positions their patches
/// are packed into `TILE_ROWS`-element slivers straight from there (each patch element a fixed
/// offset from its window's start) and multiplied with `dy`'s rows where they lie. One partial sum
/// per thread, added in order. Every element of `df` is written.
fn conv2d_backprop_filter_bordered(pool: &dyn IntraOpPool, g: &Geom, x: &[f32], dy: &[f32], df: &mut [f32]) {
    let (k, c, oc) = (g.patch_len(), g.in_c, g.out_c);
    let (kp, ocw) = (k.div_ceil(TILE_ROWS) * TILE_ROWS, oc.div_ceil(TILE_COLS) * TILE_COLS);
    let simd = simd();
    let bordered = Bordered::new(g, x);
    let row = g.k_w * c;
    let offsets: Vec<usize> = (0..k).map(|kk| kk / row * bordered.w * c + kk % row).collect();
    let partials = per_thread_sums(pool, g, kp * oc, |positions, acc| {
        let mut packed = vec![0f32; kp * FILTER_GRAD_BLOCK];
        // `dy`'s rows widened to whole tiles, so a tile's 16 columns never run past a row.
        let mut wide = vec![0f32; ocw * FILTER_GRAD_BLOCK];
        let mut starts = Vec::with_capacity(FILTER_GRAD_BLOCK);
        for p0 in positions.clone().step_by(FILTER_GRAD_BLOCK) {
            let n = FILTER_GRAD_BLOCK.min(positions.end - p0);
            let packed = &mut packed[..kp * n];
            starts.clear();
            starts.extend((p0..p0 + n).map(|p| bordered.window_at(g, p)));
            // Sliver by sliver, so each position's `TILE_ROWS` elements are written together.
            for (t, sliver) in packed.chunks_exact_mut(TILE_ROWS * n).enumerate() {
                let mut offs = [usize::MAX; TILE_ROWS];
                for (r, o) in offs.iter_mut().enumerate() {
                    if let Some(&at) = offsets.get(t * TILE_ROWS + r) {
                        *o = at;
                    }
                }
                for (dst, &start) in sliver.chunks_exact_mut(TILE_ROWS).zip(&starts) {
                    for (d, &o) in dst.iter_mut().zip(&offs) {
                        *d = if o == usize::MAX { 0.0 } else { bordered.data[start + o] };
                    }
                }
            }
            for (dst, src) in wide.chunks_exact_mut(ocw).zip(dy[p0 * oc..(p0 + n) * oc].chunks_exact(oc)) {
                dst[..oc].copy_from_slice(src);
            }
            let rows: Vec<&[f32]> = wide.chunks_exact(ocw).take(n).collect();
            for (t, a) in packed.chunks_exact(TILE_ROWS * n).enumerate() {
                for co0 in (0..oc).step_by(TILE_COLS) {
                    let tile = tile_from_gathered(simd, a, &rows, co0);
                    let cols = TILE_COLS.min(oc - co0);
                    for (r, trow) in tile.iter().enumerate() {
                        let dst = &mut acc[(t * TILE_ROWS + r) * oc + co0..][..cols];
                        for (d, v) in dst.iter_mut().zip(trow) {
                            *d += v;
                        }
                    }
                }
            }
        }
    });
    df.fill(0.0);
    for part in partials.chunks_exact(kp * oc) {
        for (d, &v) in df.iter_mut().zip(&part[..k * oc]) {
            *d += v;
        }
    }
}

/// Runs `op` in f32 without im2col where that applies (f32 elements and at least half a tile of
/// output channels; stride 1 for the input gradient, input depths in whole tiles or shallow ones
/// for the filter gradient); false when the caller must take the im2col path.
fn run_direct<E: Num>(op: ConvOp, pool: &dyn IntraOpPool, g: &Geom, a: &[E], b: &[E], out: &mut [E]) -> bool {
    if E::DTYPE != DType::F32 || g.patch_len() == 0 || g.out_c == 0 {
        return false;
    }
    let (a, b) = (bytemuck::cast_slice::<E, f32>(a), bytemuck::cast_slice::<E, f32>(b));
    let out = bytemuck::cast_slice_mut::<E, f32>(out);
    // A direct convolution computes `TILE_COLS` output channels per tile: with fewer than half
    // of them real, im2col and the GEMM waste less.
    let fills_tiles = |channels: usize| 2 * channels >= TILE_COLS;
    match op {
        ConvOp::Forward if fills_tiles(g.out_c) => conv2d_direct(pool, g, a, b, out),
        ConvOp::BackpropInput
            if fills_tiles(g.in_c)
                && (g.stride_h, g.stride_w) == (1, 1)
                && g.pad_top < g.k_h
                && g.pad_left < g.k_w =>
        {
            conv2d_backprop_input_direct(pool, g, a, b, out)
        }
        ConvOp::BackpropFilter if g.in_c.is_multiple_of(TILE_COLS) => {
            conv2d_backprop_filter_direct(pool, g, a, b, out)
        }
        // The packed block holds `patch_len` floats per position: only for shallow inputs.
        ConvOp::BackpropFilter if g.in_c < DIRECT_MIN_DEPTH && g.out_h * g.out_w > 0 => {
            conv2d_backprop_filter_bordered(pool, g, a, b, out)
        }
        _ => return false,
    }
    true
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ConvOp {
    /// `Conv2D(input, filter)`.
    Forward,
    /// `Conv2DBackpropInput(input_sizes, filter, out_backprop)`.
    BackpropInput,
    /// `Conv2DBackpropFilter(input, filter_sizes, out_backprop)`.
    BackpropFilter,
}

impl ConvOp {
    /// Runs the op on the GEMM of kernel level `simd`. The direct convolutions compute 6×16 tiles
    /// at the AVX2 width; where the GEMM has the AVX-512 macro-kernel, im2col and that GEMM are
    /// faster (the CNN step of `bench_cnn`, 64 images, two threads: 44 → 59 steps/s), so only
    /// the other levels take the direct paths.
    fn run<E: Num + Arith>(
        self,
        simd: Simd,
        pool: &dyn IntraOpPool,
        g: &Geom,
        a: &[E],
        b: &[E],
        out: &mut [E],
    ) {
        if simd != Simd::Avx512 && run_direct(self, pool, g, a, b, out) {
            return;
        }
        match self {
            ConvOp::Forward => conv2d(pool, g, a, b, out),
            ConvOp::BackpropInput => conv2d_backprop_input(pool, g, a, b, out),
            ConvOp::BackpropFilter => conv2d_backprop_filter(pool, g, a, b, out),
        }
    }
}

struct ConvK {
    op: ConvOp,
    attrs: WindowAttrs,
}

pub fn create_conv(init: &KernelInit<'_>) -> Result<Kernel> {
    let op = match init.node.op.as_str() {
        "Conv2D" => ConvOp::Forward,
        "Conv2DBackpropInput" => ConvOp::BackpropInput,
        "Conv2DBackpropFilter" => ConvOp::BackpropFilter,
        other => return Err(Error::internal(format!("no convolution kernel for {other}"))),
    };
    Ok(Kernel::expensive(ConvK { op, attrs: WindowAttrs::parse(init)? }))
}

/// A `[N, H, W, C]` size from an int32/int64 vector input.
fn sizes4(t: &Tensor, what: &str) -> Result<Shape> {
    let v = int_vector(t, what)?;
    if v.len() != 4 || v.iter().any(|&d| d < 0) {
        return Err(Error::invalid_argument(format!("{what} must be 4 non-negative sizes, is {v:?}")));
    }
    Shape::new(&v.iter().map(|&d| d as usize).collect::<Vec<_>>())
}

fn expect_shape(what: &str, got: &Shape, want: [usize; 4]) -> Result<()> {
    if got.dims() != want {
        return Err(Error::invalid_argument(format!("{what} has shape {got}, expected {want:?}")));
    }
    Ok(())
}

/// The geometry of a convolution from its input and filter shapes, with TensorFlow's checks.
fn conv_geom(x: &Shape, f: &Shape, attrs: WindowAttrs) -> Result<Geom> {
    if x.rank() != 4 || f.rank() != 4 {
        return Err(Error::invalid_argument(format!(
            "input and filter must be 4-dimensional, are {x} and {f}"
        )));
    }
    if x.dim(3) != f.dim(2) {
        return Err(Error::invalid_argument(format!(
            "input and filter must have the same depth: {} vs {}",
            x.dim(3),
            f.dim(2)
        )));
    }
    Geom::new(x, (f.dim(0), f.dim(1)), f.dim(3), attrs)
}

/// Runs `op` in the compute type of `dtype` (f16 and bf16 widened to f32); every op writes all
/// of its output, so native outputs come from the device's allocator.
fn run_conv(op: ConvOp, dev: &dyn Device, g: &Geom, a: &Tensor, b: &Tensor, out: Shape) -> Result<Tensor> {
    fn native<E: Num + Arith>(
        op: ConvOp,
        dev: &dyn Device,
        g: &Geom,
        a: &Tensor,
        b: &Tensor,
        out: Shape,
    ) -> Result<Tensor> {
        let mut t = dev.allocate(E::DTYPE, out)?;
        op.run::<E>(simd(), dev.intra_op(), g, a.as_slice()?, b.as_slice()?, t.as_mut_slice()?);
        Ok(t)
    }
    fn half<T: Num<A = f32>>(
        op: ConvOp,
        pool: &dyn IntraOpPool,
        g: &Geom,
        a: &Tensor,
        b: &Tensor,
        out: Shape,
    ) -> Result<Tensor> {
        let mut o = vec![0f32; out.checked_num_elements()?];
        op.run::<f32>(simd(), pool, g, &widen::<T>(a)?, &widen::<T>(b)?, &mut o);
        Tensor::new(out, &o.into_iter().map(T::store).collect::<Vec<T>>())
    }
    let pool = dev.intra_op();
    match a.dtype() {
        DType::F32 => native::<f32>(op, dev, g, a, b, out),
        DType::F64 => native::<f64>(op, dev, g, a, b, out),
        DType::F16 => half::<f16>(op, pool, g, a, b, out),
        DType::BF16 => half::<bf16>(op, pool, g, a, b, out),
        d => Err(unsupported("Conv2D", d)),
    }
}

impl OpKernel for ConvK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (i0, i1) = (ctx.input(0)?, ctx.input(1)?);
        let (a, b, g, out) = match self.op {
            ConvOp::Forward => {
                let g = conv_geom(i0.shape(), i1.shape(), self.attrs)?;
                (i0, i1, g, Shape::new(&g.out_shape())?)
            }
            ConvOp::BackpropInput => {
                let (sizes, dy) = (sizes4(i0, "input_sizes")?, ctx.input(2)?);
                let g = conv_geom(&sizes, i1.shape(), self.attrs)?;
                expect_shape("out_backprop", dy.shape(), g.out_shape())?;
                (i1, dy, g, sizes)
            }
            ConvOp::BackpropFilter => {
                let (sizes, dy) = (sizes4(i1, "filter_sizes")?, ctx.input(2)?);
                let g = conv_geom(i0.shape(), &sizes, self.attrs)?;
                expect_shape("out_backprop", dy.shape(), g.out_shape())?;
                (i0, dy, g, sizes)
            }
        };
        if a.dtype() != b.dtype() {
            return Err(Error::invalid_argument(format!(
                "{} of {} and {}",
                ctx.node.op,
                a.dtype(),
                b.dtype()
            )));
        }
        let out = run_conv(self.op, &**ctx.device(), &g, a, b, out)?;
        ctx.set_output(0, out);
        Ok(())
    }
}

/// The pooling window `(kh, kw)` and the shared attrs.
struct PoolK {
    ksize: (usize, usize),
    attrs: WindowAttrs,
}

pub fn create_pool(init: &KernelInit<'_>) -> Result<Kernel> {
    let ksize = nhwc_pair(init.attrs(), "ksize")?;
    Ok(Kernel::expensive(PoolK { ksize, attrs: WindowAttrs::parse(init)? }))
}

/// The input positions (`ih·W + iw`) of the window of output position (`oh`, `ow`) that fall
/// inside the image, in window order, each with its input row; padding is left out.
fn window_positions(g: &Geom, oh: usize, ow: usize, out: &mut Vec<(usize, usize)>) {
    out.clear();
    let (kws, iw0) = g.in_cols(ow);
    for kh in 0..g.k_h {
        if let Some(ih) = g.in_row(oh, kh) {
            out.extend((iw0..iw0 + kws.len()).map(|iw| (ih, ih * g.in_w + iw)));
        }
    }
}

/// The largest value of each channel over the window `positions` (LOWEST for an empty window).
/// The first position starts the maxima, so padding never wins and a NaN there stays.
fn window_max<T: Num>(image: &[T], c: usize, positions: &[(usize, usize)], best: &mut [T::A]) {
    let Some((&(_, first), rest)) = positions.split_first() else {
        best.fill(T::A::LOWEST);
        return;
    };
    for (b, &v) in best.iter_mut().zip(&image[first * c..][..c]) {
        *b = v.load();
    }
    for &(_, pos) in rest {
        for (b, &v) in best.iter_mut().zip(&image[pos * c..][..c]) {
            // A select, not a conditional store, so the channel loop vectorises.
            let v = v.load();
            *b = if v > *b { v } else { *b };
        }
    }
}

/// Like `window_max`, also noting for each channel which entry of `positions` holds the
/// maximum: the first one in window order, TensorFlow's tie rule. A second pass from the back
/// marks the first entry equal to the maximum (a NaN maximum can only be the first entry).
fn window_argmax<T: Num>(
    image: &[T],
    c: usize,
    positions: &[(usize, usize)],
    best: &mut [T::A],
    at: &mut [u32],
) {
    window_max::<T>(image, c, positions, best);
    at.fill(0);
    for (j, &(_, pos)) in positions.iter().enumerate().rev() {
        for ((b, a), &v) in best.iter().zip(at.iter_mut()).zip(&image[pos * c..][..c]) {
            *a = if v.load() == *b { j as u32 } else { *a };
        }
    }
}

fn max_pool<T: Num>(pool: &dyn IntraOpPool, g: &Geom, x: &[T], out: &mut [T]) {
    let c = g.in_c;
    let row_cost = g.out_row() * g.k_h * g.k_w;
    for_image_rows(pool, out, g.out_h, g.out_row(), row_cost, |n, rows, dst| {
        let image = &x[n * g.in_image()..][..g.in_image()];
        let (mut best, mut positions) = (vec![T::A::LOWEST; c], Vec::new());
        for (oh, row) in rows.zip(dst.chunks_exact_mut(g.out_row())) {
            for (ow, px) in row.chunks_exact_mut(c).enumerate() {
                window_positions(g, oh, ow, &mut positions);
                window_max::<T>(image, c, &positions, &mut best);
                for (d, &b) in px.iter_mut().zip(&best) {
                    *d = T::store(b);
                }
            }
        }
    });
}

/// Routes each gradient to the maximum of its window, split over blocks of input rows; each
/// block recomputes the maxima of windows it shares with its neighbours. Writes all of `dx`.
/// Windows that do not overlap (2×2 with stride 2, say) put every input in at most one window:
/// each is then written once, with its window's gradient where it is the maximum and zero
/// elsewhere (no accumulation, and no zero-fill first when the windows tile the input).
fn max_pool_grad<T: Num>(pool: &dyn IntraOpPool, g: &Geom, x: &[T], dy: &[T], dx: &mut [T]) {
    let (c, in_row) = (g.in_c, g.in_w * g.in_c);
    let disjoint = g.k_h <= g.stride_h && g.k_w <= g.stride_w;
    let tiled = g.k_h == g.stride_h
        && g.k_w == g.stride_w
        && g.pad_top == 0
        && g.pad_left == 0
        && g.out_h * g.k_h >= g.in_h
        && g.out_w * g.k_w >= g.in_w;
    // Half types add up in f32 on the side when windows overlap: rounding after each of the
    // gradients routed to one input would drift.
    let half_acc = !disjoint && matches!(T::DTYPE, DType::F16 | DType::BF16);
    let row_cost = g.out_row() * g.k_h * g.k_w * g.out_h / g.in_h.max(1);
    for_image_rows(pool, dx, g.in_h, in_row, row_cost, |n, in_rows, dst| {
        let image = &x[n * g.in_image()..][..g.in_image()];
        let dy = &dy[n * g.out_h * g.out_row()..][..g.out_h * g.out_row()];
        let zero = T::store(T::A::ZERO);
        if !tiled {
            dst.fill(zero);
        }
        let mut acc = if half_acc { vec![T::A::ZERO; dst.len()] } else { Vec::new() };
        let (mut best, mut at, mut positions) = (vec![T::A::LOWEST; c], vec![0u32; c], Vec::new());
        let first = in_rows.start * g.in_w;
        for oh in g.out_rows_touching(in_rows.clone()) {
            for ow in 0..g.out_w {
                window_positions(g, oh, ow, &mut positions);
                if positions.is_empty() {
                    continue;
                }
                window_argmax::<T>(image, c, &positions, &mut best, &mut at);
                let grad = &dy[(oh * g.out_w + ow) * c..][..c];
                if disjoint {
                    for (j, &(ih, pos)) in positions.iter().enumerate() {
                        if in_rows.contains(&ih) {
                            let out = &mut dst[(pos - first) * c..][..c];
                            for ((d, &a), &gr) in out.iter_mut().zip(&at).zip(grad) {
                                *d = if a == j as u32 { gr } else { zero };
                            }
                        }
                    }
                    continue;
                }
                for (ch, (&j, &gr)) in at.iter().zip(grad).enumerate() {
                    let (ih, pos) = positions[j as usize];
                    if in_rows.contains(&ih) {
                        let i = (pos - first) * c + ch;
                        if half_acc {
                            acc[i] = acc[i].add(gr.load());
                        } else {
                            dst[i] = T::store(dst[i].load().add(gr.load()));
                        }
                    }
                }
            }
        }
        if half_acc {
            for (d, &s) in dst.iter_mut().zip(&acc) {
                *d = T::store(s);
            }
        }
    });
}

impl OpKernel for PoolK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let c = if x.shape().rank() == 4 { x.shape().dim(3) } else { 0 };
        let g = Geom::new(x.shape(), self.ksize, c, self.attrs)?;
        let pool = ctx.intra_op();
        let out = if ctx.node.op == "MaxPoolGrad" {
            let (y, dy) = (ctx.input(1)?, ctx.input(2)?);
            expect_shape("orig_output", y.shape(), g.out_shape())?;
            expect_shape("grad", dy.shape(), g.out_shape())?;
            if x.dtype() != dy.dtype() {
                return Err(Error::invalid_argument(format!(
                    "MaxPoolGrad of {} and {}",
                    x.dtype(),
                    dy.dtype()
                )));
            }
            // Every element is written, so the buffer may be recycled.
            let mut dx = ctx.device().allocate(x.dtype(), Shape::new(&g.in_shape())?)?;
            dispatch_float!(x.dtype(), T => max_pool_grad::<T>(pool, &g, x.as_slice()?, dy.as_slice()?, dx.as_mut_slice()?),
                _ => return Err(unsupported("MaxPoolGrad", x.dtype())));
            dx
        } else {
            let mut out = ctx.device().allocate(x.dtype(), Shape::new(&g.out_shape())?)?;
            dispatch_float!(x.dtype(), T => max_pool::<T>(pool, &g, x.as_slice()?, out.as_mut_slice()?),
                _ => return Err(unsupported("MaxPool", x.dtype())));
            out
        };
        ctx.set_output(0, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of computing each convolution op, the direct one (chosen below the AVX-512 level)
    /// and im2col with the GEMM, agree on shapes where the direct one applies: a deep input and
    /// a shallow one, SAME and VALID, on one thread and on a pool.
    #[test]
    fn direct_and_im2col_paths_agree() {
        let threads = crate::pool::ThreadPool::new("conv-test", 2);
        let pools: [&dyn IntraOpPool; 2] = [&rill_graph::device::InlinePool, &threads];
        let mut seed = 7u64;
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 40) % 33) as f32 / 16.0 - 1.0
                })
                .collect()
        };
        // (input NHWC, filter HWIO, padding)
        let cases = [
            ([2, 9, 7, 16], [3, 3, 16, 20], Padding::Same),
            ([1, 8, 8, 32], [5, 5, 32, 8], Padding::Valid),
            ([3, 6, 5, 3], [2, 3, 3, 16], Padding::Same),
        ];
        for (x, f, padding) in cases {
            let (xs, fs) = (Shape::new(&x).unwrap(), Shape::new(&f).unwrap());
            let g = conv_geom(&xs, &fs, WindowAttrs { strides: (1, 1), padding }).unwrap();
            let (input, filter) = (values(xs.num_elements()), values(fs.num_elements()));
            let dy = values(g.batch * g.out_h * g.out_row());
            let runs: [(ConvOp, &[f32], &[f32], usize); 3] = [
                (ConvOp::Forward, &input, &filter, dy.len()),
                (ConvOp::BackpropInput, &filter, &dy, input.len()),
                (ConvOp::BackpropFilter, &input, &dy, filter.len()),
            ];
            for (op, a, b, len) in runs {
                // An input gradient of 3 channels has no direct path.
                if !run_direct(op, &rill_graph::device::InlinePool, &g, a, b, &mut vec![0f32; len]) {
                    assert!((op, g.in_c) == (ConvOp::BackpropInput, 3), "{op:?} {x:?} {f:?} is direct");
                    continue;
                }
                for pool in pools {
                    let (mut direct, mut gemm) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                    op.run(Simd::Avx2, pool, &g, a, b, &mut direct);
                    op.run(Simd::Avx512, pool, &g, a, b, &mut gemm);
                    for (i, (d, m)) in direct.iter().zip(&gemm).enumerate() {
                        assert!(
                            (d - m).abs() <= 1e-4 * (1.0 + d.abs()),
                            "{op:?} {x:?} {f:?} [{i}]: {d} vs {m}"
                        );
                    }
                }
            }
        }
    }
}
