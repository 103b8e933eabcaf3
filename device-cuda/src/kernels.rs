//! GPU kernels: functions that enqueue one PTX kernel on a device's stream (`unary`, `binary`,
//! `matmul`...), the `OpKernel`s that wrap them, and `KERNELS`, the table registered under "GPU".
//! Inputs still in host memory (fed values, host constants) are copied to the GPU first.

use crate::driver::{KernelArg, LaunchConfig};
use crate::CudaDevice;
use rill_graph::kernels as sys;
use rill_graph::{
    AttrsExt, DType, Device, Error, Kernel, KernelDef, KernelInit, OpKernel, OpKernelContext, Result, Shape,
    Tensor, TypeOf, MAX_RANK,
};

use KernelArg::{Ptr, I32, U64};

/// The float types with GPU kernels.
pub const GPU_FLOATS: &[DType] = &[DType::F32, DType::F16, DType::BF16];
/// Threads per block of the one-dimensional kernels and of the row and reduction kernels
/// (which size their shared memory for exactly this many).
const BLOCK: u32 = 256;
/// Most blocks per launch; grid-stride loops cover the rest.
const MAX_GRID: u64 = 65535;

fn suffix(d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        _ => Err(Error::unimplemented(format!("no GPU kernel for {d}"))),
    }
}

fn grid_1d(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid: (n.div_ceil(BLOCK as u64).clamp(1, MAX_GRID) as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

fn grid_rows(rows: u64) -> LaunchConfig {
    LaunchConfig { grid: (rows.clamp(1, MAX_GRID) as u32, 1, 1), block: (BLOCK, 1, 1), shared_bytes: 0 }
}

/// Element-wise one-input ops; the codes match `unary_apply` in cuda/unary.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    Neg = 0,
    Abs,
    Square,
    Sqrt,
    Rsqrt,
    Reciprocal,
    Exp,
    Log,
    Relu,
    Sigmoid,
    Tanh,
    Sign,
    Zeros,
    Ones,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 14] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Square,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Reciprocal,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Relu,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Sign,
        UnaryOp::Zeros,
        UnaryOp::Ones,
    ];

    pub fn from_op(op: &str) -> Option<UnaryOp> {
        use UnaryOp::*;
        Some(match op {
            "Neg" => Neg,
            "Abs" => Abs,
            "Square" => Square,
            "Sqrt" => Sqrt,
            "Rsqrt" => Rsqrt,
            "Reciprocal" => Reciprocal,
            "Exp" => Exp,
            "Log" => Log,
            "Relu" => Relu,
            "Sigmoid" => Sigmoid,
            "Tanh" => Tanh,
            "Sign" => Sign,
            "ZerosLike" => Zeros,
            "OnesLike" => Ones,
            _ => return None,
        })
    }
}

/// Element-wise two-input ops; the codes match `binary_apply` in cuda/binary.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add = 0,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    SquaredDifference,
    Pow,
    ReluGrad,
    SigmoidGrad,
    TanhGrad,
    SqrtGrad,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 12] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
        BinaryOp::SquaredDifference,
        BinaryOp::Pow,
        BinaryOp::ReluGrad,
        BinaryOp::SigmoidGrad,
        BinaryOp::TanhGrad,
        BinaryOp::SqrtGrad,
    ];

    pub fn from_op(op: &str) -> Option<BinaryOp> {
        use BinaryOp::*;
        Some(match op {
            "Add" | "AddV2" => Add,
            "Sub" => Sub,
            "Mul" => Mul,
            "Div" | "RealDiv" => Div,
            "Maximum" => Maximum,
            "Minimum" => Minimum,
            "SquaredDifference" => SquaredDifference,
            "Pow" => Pow,
            "ReluGrad" => ReluGrad,
            "SigmoidGrad" => SigmoidGrad,
            "TanhGrad" => TanhGrad,
            "SqrtGrad" => SqrtGrad,
            _ => return None,
        })
    }
}

/// Reductions; the codes match `reduce_combine` in cuda/reduce.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Mean,
    Max,
    Min,
    Prod,
}

impl ReduceOp {
    pub fn from_op(op: &str) -> Option<ReduceOp> {
        Some(match op {
            "Sum" => ReduceOp::Sum,
            "Mean" => ReduceOp::Mean,
            "Max" => ReduceOp::Max,
            "Min" => ReduceOp::Min,
            "Prod" => ReduceOp::Prod,
            _ => return None,
        })
    }
}

fn same_float(a: &Tensor, b: &Tensor) -> Result<&'static str> {
    if a.dtype() != b.dtype() {
        return Err(Error::invalid_argument(format!("dtypes differ: {} and {}", a.dtype(), b.dtype())));
    }
    suffix(a.dtype())
}

pub fn unary(dev: &CudaDevice, op: UnaryOp, x: &Tensor) -> Result<Tensor> {
    let sfx = suffix(x.dtype())?;
    let x = dev.on_device(x)?;
    let y = dev.alloc(x.dtype(), *x.shape())?;
    let n = x.num_elements() as u64;
    dev.launch(
        &format!("unary_{sfx}"),
        grid_1d(n),
        &[I32(op as i32), U64(n), Ptr(dev.ptr(&x)?), Ptr(dev.ptr(&y)?)],
    )?;
    Ok(y)
}

pub fn cast(dev: &CudaDevice, x: &Tensor, to: DType) -> Result<Tensor> {
    let (s, d) = (suffix(x.dtype())?, suffix(to)?);
    let x = dev.on_device(x)?;
    if x.dtype() == to {
        return Ok(x);
    }
    let y = dev.alloc(to, *x.shape())?;
    let n = x.num_elements() as u64;
    dev.launch(&format!("cast_{s}_{d}"), grid_1d(n), &[U64(n), Ptr(dev.ptr(&x)?), Ptr(dev.ptr(&y)?)])?;
    Ok(y)
}

/// The broadcast output shape of `a` and `b` and the 25-word descriptor of cuda/binary.cu:
/// rank, output dims, then each input's element strides (0 along broadcast dimensions).
pub fn broadcast(a: &Shape, b: &Shape) -> Result<(Shape, [u64; 25])> {
    let rank = a.rank().max(b.rank());
    let dim = |s: &Shape, i: usize| if i + s.rank() < rank { 1 } else { s.dim(i + s.rank() - rank) };
    let mut dims = [0usize; MAX_RANK];
    for (i, d) in dims.iter_mut().enumerate().take(rank) {
        let (x, y) = (dim(a, i), dim(b, i));
        *d = if x == y || y == 1 {
            x
        } else if x == 1 {
            y
        } else {
            return Err(Error::invalid_argument(format!("shapes {a} and {b} are not broadcast-compatible")));
        };
    }
    let out = Shape::new(&dims[..rank])?;
    let mut w = [0u64; 25];
    w[0] = rank as u64;
    let (mut sa, mut sb) = (1u64, 1u64);
    for i in (0..rank).rev() {
        w[1 + i] = dims[i] as u64;
        let (x, y) = (dim(a, i), dim(b, i));
        w[9 + i] = if x == 1 { 0 } else { sa };
        w[17 + i] = if y == 1 { 0 } else { sb };
        sa *= x as u64;
        sb *= y as u64;
    }
    Ok((out, w))
}

pub fn binary(dev: &CudaDevice, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let sfx = same_float(a, b)?;
    let (shape, bc) = broadcast(a.shape(), b.shape())?;
    let (a, b) = (dev.on_device(a)?, dev.on_device(b)?);
    let y = dev.alloc(a.dtype(), shape)?;
    binary_into(dev, sfx, op, &a, &b, &y, bc)?;
    Ok(y)
}

fn binary_into(
    dev: &CudaDevice,
    sfx: &str,
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    y: &Tensor,
    bc: [u64; 25],
) -> Result<()> {
    let n = y.num_elements() as u64;
    let args = [
        I32(op as i32),
        U64(n),
        KernelArg::Words25(bc),
        Ptr(dev.ptr(a)?),
        Ptr(dev.ptr(b)?),
        Ptr(dev.ptr(y)?),
    ];
    dev.launch(&format!("binary_{sfx}"), grid_1d(n), &args)
}

/// `x` broadcast to `shape` (NumPy's rules, `x` never the larger) in new device memory: the
/// binary kernel's `max(x, x)` with both operands read through `x`'s broadcast strides.
pub fn broadcast_to(dev: &CudaDevice, x: &Tensor, shape: Shape) -> Result<Tensor> {
    let sfx = suffix(x.dtype())?;
    let (out, mut bc) = broadcast(x.shape(), &shape)?;
    if out != shape {
        return Err(Error::invalid_argument(format!("cannot broadcast {} to {shape}", x.shape())));
    }
    bc.copy_within(9..17, 17);
    let x = dev.on_device(x)?;
    let y = dev.alloc(x.dtype(), shape)?;
    binary_into(dev, sfx, BinaryOp::Maximum, &x, &x, &y, bc)?;
    Ok(y)
}

/// Tile: each dimension `d` repeated `m` times is `x` viewed as `[1, d]` broadcast to `[m, d]`
/// (a dimension of size 1 or repeated once needs no extra axis), then flattened back.
pub fn tile(dev: &CudaDevice, x: &Tensor, multiples: &[i64]) -> Result<Tensor> {
    let dims = x.shape().dims();
    if multiples.len() != dims.len() {
        return Err(Error::invalid_argument(format!(
            "Expected multiples argument to be a vector of length {} but got length {}",
            dims.len(),
            multiples.len()
        )));
    }
    let (mut from, mut to, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for (&d, &m) in dims.iter().zip(multiples) {
        let m = usize::try_from(m).map_err(|_| {
            Error::invalid_argument(format!("Expected multiples[i] >= 0, but got {multiples:?}"))
        })?;
        if m != 1 && d != 1 {
            from.push(1);
            to.push(m);
        }
        from.push(d);
        to.push(if d == 1 { m } else { d });
        out.push(d * m);
    }
    if to.len() > MAX_RANK {
        return Err(Error::unimplemented(format!(
            "Tile of shape {} by {multiples:?} on the GPU needs {} dimensions (at most {MAX_RANK})",
            x.shape(),
            to.len()
        )));
    }
    broadcast_to(dev, &x.reshape(Shape::new(&from)?)?, Shape::new(&to)?)?.reshape(Shape::new(&out)?)
}

pub fn bias_add(dev: &CudaDevice, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let sfx = same_float(x, bias)?;
    let r = x.shape().rank();
    if r == 0 || bias.shape().rank() != 1 || x.shape().dim(r - 1) != bias.num_elements() {
        return Err(Error::invalid_argument(format!(
            "bias {} does not match value {}",
            bias.shape(),
            x.shape()
        )));
    }
    let (x, bias) = (dev.on_device(x)?, dev.on_device(bias)?);
    let y = dev.alloc(x.dtype(), *x.shape())?;
    let n = x.num_elements() as u64;
    let args = [
        U64(n),
        U64(bias.num_elements().max(1) as u64),
        Ptr(dev.ptr(&x)?),
        Ptr(dev.ptr(&bias)?),
        Ptr(dev.ptr(&y)?),
    ];
    dev.launch(&format!("bias_add_{sfx}"), grid_1d(n), &args)?;
    Ok(y)
}

/// Reduces `x` viewed as `[outer, r, inner]` over the middle axis into `out_shape`.
pub fn reduce_view(
    dev: &CudaDevice,
    op: ReduceOp,
    x: &Tensor,
    view: [usize; 3],
    out_shape: Shape,
) -> Result<Tensor> {
    let sfx = suffix(x.dtype())?;
    let x = dev.on_device(x)?;
    let y = dev.alloc(x.dtype(), out_shape)?;
    let outputs = (view[0] * view[2]) as u64;
    if outputs == 0 {
        return Ok(y);
    }
    let args = [
        I32(op as i32),
        U64(view[0] as u64),
        U64(view[1] as u64),
        U64(view[2] as u64),
        Ptr(dev.ptr(&x)?),
        Ptr(dev.ptr(&y)?),
    ];
    dev.launch(&format!("reduce_{sfx}"), grid_rows(outputs), &args)?;
    Ok(y)
}

/// Reduces over `axes` (which must be adjacent once sorted, as nearly all model code uses).
pub fn reduce(dev: &CudaDevice, op: ReduceOp, x: &Tensor, axes: &[i64], keep_dims: bool) -> Result<Tensor> {
    let s = x.shape();
    let rank = s.rank() as i64;
    let mut ax: Vec<usize> = Vec::new();
    for &a in axes {
        let n = if a < 0 { a + rank } else { a };
        if n < 0 || n >= rank.max(1) {
            return Err(Error::invalid_argument(format!("axis {a} out of range for shape {s}")));
        }
        if !ax.contains(&(n as usize)) && rank > 0 {
            ax.push(n as usize);
        }
    }
    ax.sort_unstable();
    if ax.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err(Error::unimplemented(format!("GPU reduction over non-adjacent axes {axes:?} of {s}")));
    }
    let (lo, hi) = match (ax.first(), ax.last()) {
        (Some(&l), Some(&h)) => (l, h + 1),
        _ => (0, 0),
    };
    let dims = s.dims();
    let outer: usize = dims[..lo].iter().product();
    let r: usize = dims[lo..hi].iter().product();
    let inner: usize = dims[hi..].iter().product();
    let out: Vec<usize> = (0..dims.len())
        .filter_map(|i| if i >= lo && i < hi { keep_dims.then_some(1) } else { Some(dims[i]) })
        .collect();
    reduce_view(dev, op, x, [outer, r, inner], Shape::new(&out)?)
}

fn rows_cols(x: &Tensor) -> Result<(u64, u64)> {
    let s = x.shape();
    if s.rank() == 0 {
        return Err(Error::invalid_argument("softmax needs rank at least 1"));
    }
    let cols = s.dim(s.rank() - 1);
    Ok(((s.num_elements() / cols.max(1)) as u64, cols as u64))
}

pub fn softmax(dev: &CudaDevice, x: &Tensor, log: bool) -> Result<Tensor> {
    let sfx = suffix(x.dtype())?;
    let x = dev.on_device(x)?;
    let (rows, cols) = rows_cols(&x)?;
    let y = dev.alloc(x.dtype(), *x.shape())?;
    let args = [I32(log as i32), U64(rows), U64(cols), Ptr(dev.ptr(&x)?), Ptr(dev.ptr(&y)?)];
    dev.launch(&format!("softmax_{sfx}"), grid_rows(rows), &args)?;
    Ok(y)
}

/// `SoftmaxCrossEntropyWithLogits` (dense labels) or, with integer labels, the sparse variant:
/// `(loss[rows], backprop[rows, cols])`.
pub fn cross_entropy(dev: &CudaDevice, logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let sfx = suffix(logits.dtype())?;
    if logits.shape().rank() != 2 {
        return Err(Error::invalid_argument(format!("logits must be a matrix, got {}", logits.shape())));
    }
    let (rows, cols) = rows_cols(logits)?;
    let name = match labels.dtype() {
        DType::I32 | DType::I64 if labels.num_elements() as u64 == rows => {
            format!("sparse_xent_{sfx}_{}", if labels.dtype() == DType::I32 { "i32" } else { "i64" })
        }
        d if d == logits.dtype() && labels.shape() == logits.shape() => format!("xent_{sfx}"),
        _ => {
            return Err(Error::invalid_argument(format!(
                "labels {} {} do not match logits {} {}",
                labels.dtype(),
                labels.shape(),
                logits.dtype(),
                logits.shape()
            )))
        }
    };
    let (x, l) = (dev.on_device(logits)?, dev.on_device(labels)?);
    let loss = dev.alloc(x.dtype(), Shape::vector(rows as usize))?;
    let back = dev.alloc(x.dtype(), *x.shape())?;
    let args = [
        U64(rows),
        U64(cols),
        Ptr(dev.ptr(&x)?),
        Ptr(dev.ptr(&l)?),
        Ptr(dev.ptr(&loss)?),
        Ptr(dev.ptr(&back)?),
    ];
    dev.launch(&name, grid_rows(rows), &args)?;
    Ok((loss, back))
}

/// Tile edge of cuda/matmul.cu.
const TILE: u64 = 16;

/// Which implementation a MatMul runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatMulImpl {
    /// cuBLAS where the device has it, else the tiled kernel.
    Auto,
    /// cuBLAS; `Unavailable` where the device has none.
    Cublas,
    /// The own tiled kernel of cuda/matmul.cu.
    Tiled,
}

pub fn matmul(dev: &CudaDevice, a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    matmul_using(dev, MatMulImpl::Auto, a, b, ta, tb)
}

/// `op(a)·op(b)` for matrices, with the implementation `imp`.
pub fn matmul_using(
    dev: &CudaDevice,
    imp: MatMulImpl,
    a: &Tensor,
    b: &Tensor,
    ta: bool,
    tb: bool,
) -> Result<Tensor> {
    let sfx = same_float(a, b)?;
    let (sa, sb) = (a.shape(), b.shape());
    if sa.rank() != 2 || sb.rank() != 2 {
        return Err(Error::invalid_argument(format!("MatMul needs matrices, got {sa} and {sb}")));
    }
    let (m, k) = if ta { (sa.dim(1), sa.dim(0)) } else { (sa.dim(0), sa.dim(1)) };
    let (k2, n) = if tb { (sb.dim(1), sb.dim(0)) } else { (sb.dim(0), sb.dim(1)) };
    if k != k2 {
        return Err(Error::invalid_argument(format!("inner dimensions differ: {sa} and {sb}")));
    }
    let blas = match imp {
        MatMulImpl::Tiled => None,
        MatMulImpl::Auto => dev.cublas(),
        MatMulImpl::Cublas => Some(dev.cublas().ok_or_else(|| {
            Error::unavailable(format!("no cuBLAS on {}: {}", dev.attributes().name, dev.matmul_backend()))
        })?),
    };
    let (a, b) = (dev.on_device(a)?, dev.on_device(b)?);
    let c = dev.alloc(a.dtype(), Shape::matrix(m, n))?;
    if m == 0 || n == 0 {
        return Ok(c);
    }
    if let Some(blas) = blas {
        if k == 0 {
            // An empty sum: cuBLAS rejects k = 0, and C is all zeros.
            dev.stream().memset_zero(dev.ptr(&c)?, c.byte_size())?;
        } else {
            blas.gemm(a.dtype(), (m, n, k), (ta, tb), dev.ptr(&a)?, dev.ptr(&b)?, dev.ptr(&c)?)?;
        }
        return Ok(c);
    }
    let (m, n, k) = (m as u64, n as u64, k as u64);
    let cfg = LaunchConfig {
        grid: (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1),
        block: (TILE as u32, TILE as u32, 1),
        shared_bytes: 0,
    };
    let args = [
        U64(m),
        U64(n),
        U64(k),
        I32(ta as i32),
        I32(tb as i32),
        Ptr(dev.ptr(&a)?),
        Ptr(dev.ptr(&b)?),
        Ptr(dev.ptr(&c)?),
    ];
    dev.launch(&format!("matmul_{sfx}"), cfg, &args)?;
    Ok(c)
}

/// `t` on the GPU and not shared with any other tensor, so a kernel may update it in place.
fn exclusive(dev: &CudaDevice, t: &mut Tensor) -> Result<()> {
    if t.is_host() {
        *t = dev.on_device(t)?;
    } else if t.is_shared() {
        let copy = dev.alloc(t.dtype(), *t.shape())?;
        dev.stream().copy_dtod(dev.ptr(&copy)?, dev.ptr(t)?, t.byte_size())?;
        *t = copy;
    }
    Ok(())
}

/// Runs an `Apply*` update in place: `slots` are the variable and its accumulators (updated),
/// `args` the remaining inputs (read), then an optional trailing `int` flag.
pub fn apply(
    dev: &CudaDevice,
    kernel: &str,
    slots: &mut [&mut Tensor],
    args: &[Tensor],
    flag: Option<bool>,
) -> Result<()> {
    let n = slots.first().map_or(0, |t| t.num_elements());
    let sfx = suffix(slots.first().map_or(DType::String, |t| t.dtype()))?;
    let mut list = vec![U64(n as u64)];
    for s in slots.iter_mut() {
        if s.num_elements() != n || s.dtype() != slots_dtype(sfx) {
            return Err(Error::invalid_argument(format!(
                "slot {} {} does not match the variable",
                s.dtype(),
                s.shape()
            )));
        }
        exclusive(dev, s)?;
        list.push(Ptr(dev.ptr(s)?));
    }
    let keep: Vec<Tensor> = args.iter().map(|a| dev.on_device(a)).collect::<Result<_>>()?;
    for a in &keep {
        list.push(Ptr(dev.ptr(a)?));
    }
    if let Some(f) = flag {
        list.push(I32(f as i32));
    }
    dev.launch(&format!("{kernel}_{sfx}"), grid_1d(n as u64), &list)
}

fn slots_dtype(sfx: &str) -> DType {
    match sfx {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    }
}

fn gpu<'a>(ctx: &'a OpKernelContext<'_>) -> Result<&'a CudaDevice> {
    ctx.device()
        .as_any()
        .downcast_ref::<CudaDevice>()
        .ok_or_else(|| Error::internal(format!("GPU kernel running on {}", ctx.device().name())))
}

/// One `OpKernel` for every op of this file; the variant fixes what `compute` calls.
enum GpuOp {
    Unary(UnaryOp),
    Binary(BinaryOp),
    BiasAdd,
    BiasAddGrad,
    Reduce(ReduceOp, bool),
    Softmax(bool),
    Xent,
    MatMul(bool, bool),
    Cast(DType),
    AddN,
    AssignAdd(BinaryOp),
    Apply(&'static str, usize, Option<bool>),
    Tile,
    Fill,
}

struct GpuK(GpuOp);

impl OpKernel for GpuK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let dev = gpu(ctx)?;
        let out = match &self.0 {
            GpuOp::Unary(op) => unary(dev, *op, ctx.input(0)?)?,
            GpuOp::Binary(op) => binary(dev, *op, ctx.input(0)?, ctx.input(1)?)?,
            GpuOp::BiasAdd => bias_add(dev, ctx.input(0)?, ctx.input(1)?)?,
            GpuOp::BiasAddGrad => {
                let x = ctx.input(0)?;
                let c = x.shape().dims().last().copied().unwrap_or(1);
                reduce_view(dev, ReduceOp::Sum, x, [1, x.num_elements() / c.max(1), c], Shape::vector(c))?
            }
            GpuOp::Reduce(op, keep) => {
                let axes = ctx.device().to_host(ctx.input(1)?)?;
                let axes: Vec<i64> = match axes.dtype() {
                    DType::I32 => axes.as_slice::<i32>()?.iter().map(|&a| a as i64).collect(),
                    _ => axes.to_vec::<i64>()?,
                };
                reduce(dev, *op, ctx.input(0)?, &axes, *keep)?
            }
            GpuOp::Softmax(log) => softmax(dev, ctx.input(0)?, *log)?,
            GpuOp::Xent => {
                let (loss, back) = cross_entropy(dev, ctx.input(0)?, ctx.input(1)?)?;
                ctx.set_output(1, back);
                loss
            }
            GpuOp::MatMul(ta, tb) => matmul(dev, ctx.input(0)?, ctx.input(1)?, *ta, *tb)?,
            GpuOp::Cast(to) => cast(dev, ctx.input(0)?, *to)?,
            GpuOp::AddN => {
                let mut acc = dev.on_device(ctx.input(0)?)?;
                for i in 1..ctx.num_inputs() {
                    acc = binary(dev, BinaryOp::Add, &acc, ctx.input(i)?)?;
                }
                acc
            }
            GpuOp::AssignAdd(op) => {
                let var = ctx.input_ref(0)?.clone();
                let delta = dev.on_device(ctx.input(1)?)?;
                var.update(|t| {
                    if t.shape() != delta.shape() || t.dtype() != delta.dtype() {
                        return Err(Error::invalid_argument(format!(
                            "update {} {} does not match variable {} {}",
                            delta.dtype(),
                            delta.shape(),
                            t.dtype(),
                            t.shape()
                        )));
                    }
                    let sfx = suffix(t.dtype())?;
                    exclusive(dev, t)?;
                    let (_, bc) = broadcast(t.shape(), delta.shape())?;
                    binary_into(dev, sfx, *op, t, &delta, t, bc)
                })?
            }
            GpuOp::Apply(kernel, nslots, flag) => {
                let refs: Vec<_> = (0..*nslots).map(|i| ctx.input_ref(i).cloned()).collect::<Result<_>>()?;
                let args: Vec<Tensor> =
                    (*nslots..ctx.num_inputs()).map(|i| ctx.input(i).cloned()).collect::<Result<_>>()?;
                apply_refs(dev, kernel, &refs, &args, *flag)?
            }
            GpuOp::Tile => {
                let m = sys::int_vector(&ctx.device().to_host(ctx.input(1)?)?, "multiples")?;
                tile(dev, ctx.input(0)?, &m)?
            }
            GpuOp::Fill => {
                let dims = sys::int_vector(&ctx.device().to_host(ctx.input(0)?)?, "dims")?;
                let value = ctx.input(1)?;
                if value.num_elements() != 1 || value.shape().rank() != 0 {
                    return Err(Error::invalid_argument(format!(
                        "value must be a scalar, has shape {}",
                        value.shape()
                    )));
                }
                broadcast_to(dev, value, sys::shape_from_ints(&dims, "dims")?)?
            }
        };
        ctx.set_output(0, out);
        Ok(())
    }
}

/// Locks the variable and its slots in input order (the graph's order, the same for every step,
/// so two updates cannot deadlock) and runs the update in place.
fn apply_refs(
    dev: &CudaDevice,
    kernel: &str,
    refs: &[std::sync::Arc<rill_graph::Variable>],
    args: &[Tensor],
    flag: Option<bool>,
) -> Result<Tensor> {
    fn go(
        dev: &CudaDevice,
        kernel: &str,
        refs: &[std::sync::Arc<rill_graph::Variable>],
        held: &mut Vec<Tensor>,
        args: &[Tensor],
        flag: Option<bool>,
    ) -> Result<Vec<Tensor>> {
        match refs.split_first() {
            None => {
                let mut slots: Vec<&mut Tensor> = held.iter_mut().collect();
                apply(dev, kernel, &mut slots, args, flag)?;
                Ok(held.clone())
            }
            Some((v, rest)) => v.with_value(|slot| {
                let t = slot.as_mut().ok_or_else(|| {
                    Error::failed_precondition(format!("Attempting to use uninitialized value {}", v.name))
                })?;
                held.push(std::mem::replace(t, Tensor::scalar(0f32)));
                let r = go(dev, kernel, rest, held, args, flag);
                let mine = held.pop().unwrap_or_else(|| Tensor::scalar(0f32));
                *t = match &r {
                    Ok(done) => done[held.len()].clone(),
                    Err(_) => mine,
                };
                r
            }),
        }
    }
    let done = go(dev, kernel, refs, &mut Vec::new(), args, flag)?;
    Ok(done[0].clone())
}

fn create_gpu(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    let op = init.node.op.as_str();
    let k = if let Some(u) = UnaryOp::from_op(op) {
        GpuOp::Unary(u)
    } else if let Some(b) = BinaryOp::from_op(op) {
        GpuOp::Binary(b)
    } else if let Some(r) = ReduceOp::from_op(op) {
        GpuOp::Reduce(r, a.bool_or("keep_dims", false))
    } else {
        match op {
            "BiasAdd" => GpuOp::BiasAdd,
            "BiasAddGrad" => GpuOp::BiasAddGrad,
            "Softmax" => GpuOp::Softmax(false),
            "LogSoftmax" => GpuOp::Softmax(true),
            "SoftmaxCrossEntropyWithLogits" | "SparseSoftmaxCrossEntropyWithLogits" => GpuOp::Xent,
            "MatMul" => GpuOp::MatMul(a.bool_or("transpose_a", false), a.bool_or("transpose_b", false)),
            "Cast" => GpuOp::Cast(a.dtype("DstT")?),
            "AddN" => GpuOp::AddN,
            "AssignAdd" => GpuOp::AssignAdd(BinaryOp::Add),
            "AssignSub" => GpuOp::AssignAdd(BinaryOp::Sub),
            "ApplyGradientDescent" => GpuOp::Apply("apply_gd", 1, None),
            "ApplyMomentum" => GpuOp::Apply("apply_momentum", 2, Some(a.bool_or("use_nesterov", false))),
            "ApplyAdam" => GpuOp::Apply("apply_adam", 3, Some(a.bool_or("use_nesterov", false))),
            "Tile" => GpuOp::Tile,
            "Fill" => GpuOp::Fill,
            _ => return Err(Error::unimplemented(format!("no GPU kernel for op {op}"))),
        }
    };
    Ok(Kernel::cheap(GpuK(k)))
}

struct ConstK(Tensor);

impl OpKernel for ConstK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        ctx.set_output(0, self.0.clone());
        Ok(())
    }
}

/// A constant copied to the GPU once, when the kernel is created.
pub fn create_const(init: &KernelInit<'_>) -> Result<Kernel> {
    let value = init.attrs().tensor("value")?;
    let dev = init
        .device
        .as_any()
        .downcast_ref::<CudaDevice>()
        .ok_or_else(|| Error::internal("GPU Const on a non-GPU device"))?;
    Ok(Kernel::cheap(ConstK(dev.on_device(value)?)))
}

const F: &[DType] = GPU_FLOATS;
const LABELS: &[DType] = &[DType::I32, DType::I64];

macro_rules! gpu_ops {
    ($($op:literal),* $(,)?) => {
        [$(KernelDef::new($op, "GPU", create_gpu).types(TypeOf::Input(0), F)),*]
    };
}

/// Math kernels: each accepts f32, f16 and bf16 on input 0.
const MATH: [KernelDef; 48] = gpu_ops![
    "Neg",
    "Abs",
    "Square",
    "Sqrt",
    "Rsqrt",
    "Reciprocal",
    "Exp",
    "Log",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Sign",
    "ZerosLike",
    "OnesLike",
    "Add",
    "AddV2",
    "Sub",
    "Mul",
    "Div",
    "RealDiv",
    "Maximum",
    "Minimum",
    "SquaredDifference",
    "Pow",
    "ReluGrad",
    "SigmoidGrad",
    "TanhGrad",
    "SqrtGrad",
    "BiasAdd",
    "BiasAddGrad",
    "Sum",
    "Mean",
    "Max",
    "Min",
    "Prod",
    "Softmax",
    "LogSoftmax",
    "SoftmaxCrossEntropyWithLogits",
    "SparseSoftmaxCrossEntropyWithLogits",
    "MatMul",
    "Cast",
    "AddN",
    "AssignAdd",
    "AssignSub",
    "ApplyGradientDescent",
    "ApplyMomentum",
    "ApplyAdam",
    "Tile",
];

/// Ints a GPU graph holds in host memory, as TensorFlow's `HostMemory` arguments do: constants of
/// these types stay on the host, and GPU kernels read shapes and axes from there.
const HOST_CONSTANTS: &[DType] = &[DType::I32, DType::I64, DType::Bool];

/// The other kernels: data flow, constants, variables, and the shape kernels that touch no
/// element (any dtype: their outputs share their input's memory).
const OTHERS: [KernelDef; 19] = [
    KernelDef::new("Identity", "GPU", sys::create_identity),
    KernelDef::new("StopGradient", "GPU", sys::create_identity),
    KernelDef::new("PlaceholderWithDefault", "GPU", sys::create_identity),
    KernelDef::new("Const", "GPU", create_const).types(TypeOf::Output(0), F),
    KernelDef::new("Const", "GPU", sys::create_const).types(TypeOf::Output(0), HOST_CONSTANTS),
    KernelDef::new("NoOp", "GPU", sys::create_no_op),
    KernelDef::new("VariableV2", "GPU", sys::create_variable).types(TypeOf::Output(0), F),
    KernelDef::new("Assign", "GPU", sys::create_assign).types(TypeOf::Input(1), F),
    KernelDef::new("IsVariableInitialized", "GPU", sys::create_is_initialized).types(TypeOf::Input(0), F),
    KernelDef::new("_Arg", "GPU", sys::create_arg),
    KernelDef::new("_Retval", "GPU", sys::create_retval),
    KernelDef::new("_Send", "GPU", sys::create_send),
    KernelDef::new("_Recv", "GPU", sys::create_recv),
    KernelDef::new("SparseSoftmaxCrossEntropyWithLogits", "GPU", create_gpu).types(TypeOf::Input(1), LABELS),
    KernelDef::new("Fill", "GPU", create_gpu).types(TypeOf::Input(1), F),
    KernelDef::new("Reshape", "GPU", sys::create_reshape),
    KernelDef::new("ExpandDims", "GPU", sys::create_expand_dims),
    KernelDef::new("Squeeze", "GPU", sys::create_squeeze),
    KernelDef::new("Shape", "GPU", sys::create_shape).types(TypeOf::Output(0), LABELS),
];

/// Every GPU kernel. Variables exist for float types only: like TensorFlow, an int32 variable has
/// no GPU kernel and is placed on the CPU.
pub const KERNELS: &[KernelDef] = &{
    let mut all = [KernelDef::new("NoOp", "GPU", sys::create_no_op); MATH.len() + OTHERS.len()];
    let mut i = 0;
    while i < MATH.len() {
        all[i] = MATH[i];
        i += 1;
    }
    while i < MATH.len() + OTHERS.len() {
        all[i] = OTHERS[i - MATH.len()];
        i += 1;
    }
    all
};
