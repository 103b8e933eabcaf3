//! Device-independent system kernels, registered for the CPU: constants, placeholders, identity,
//! variables and their assignments, the step's `_Arg`/`_Retval`, `_Send`/`_Recv`, and the shape
//! kernels (Reshape, ExpandDims, Squeeze, Shape) that touch no element.
//! Accelerator crates register the same factories under their own device type.

use crate::kernel::{
    AsyncDone, AsyncKernelContext, AsyncOpKernel, Kernel, KernelDef, KernelInit, OpKernel, OpKernelContext,
    TypeOf, Value,
};
use crate::partition::rendezvous_key_of;
use crate::{
    dispatch_numeric, AttrsExt, DType, Element, Error, RendezvousKey, Result, Shape, Tensor, Variable,
    DEFAULT_CONTAINER, MAX_RANK,
};

struct ConstK(Tensor);
impl OpKernel for ConstK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        ctx.set_output(0, self.0.clone());
        Ok(())
    }
}

pub fn create_const(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(ConstK(init.attrs().tensor("value")?.clone())))
}

struct IdentityK;
impl OpKernel for IdentityK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let t = ctx.input(0)?.clone();
        ctx.set_output(0, t);
        Ok(())
    }
}

pub fn create_identity(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(IdentityK))
}

struct NoOpK;
impl OpKernel for NoOpK {
    fn compute(&self, _: &mut OpKernelContext<'_>) -> Result<()> {
        Ok(())
    }
}

pub fn create_no_op(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(NoOpK))
}

struct PlaceholderK(String);
impl OpKernel for PlaceholderK {
    fn compute(&self, _: &mut OpKernelContext<'_>) -> Result<()> {
        Err(Error::invalid_argument(self.0.clone()))
    }
}

pub fn create_placeholder(init: &KernelInit<'_>) -> Result<Kernel> {
    let d = init.attrs().dtype("dtype")?;
    let s = init.attrs().shape("shape").cloned().unwrap_or_default();
    Ok(Kernel::cheap(PlaceholderK(format!(
        "You must feed a value for placeholder tensor '{}' with dtype {d} and shape {s}",
        init.node.name
    ))))
}

struct VariableK {
    container: String,
    shared_name: String,
    dtype: DType,
    shape: crate::PartialShape,
}

impl OpKernel for VariableK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let v = ctx.resource_mgr().lookup_or_create(&self.container, &self.shared_name, || {
            Ok(Variable::new(&self.shared_name, self.dtype, self.shape.clone()))
        })?;
        if v.dtype != self.dtype || !v.shape.compatible(&self.shape) {
            return Err(Error::invalid_argument(format!(
                "shared variable '{}' exists as {} {}, this node declares {} {}",
                self.shared_name, v.dtype, v.shape, self.dtype, self.shape
            )));
        }
        ctx.set_output_ref(0, v);
        Ok(())
    }
}

pub fn create_variable(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    let shared = a.str_or("shared_name", "");
    Ok(Kernel::cheap(VariableK {
        container: a.str_or("container", DEFAULT_CONTAINER).to_string(),
        shared_name: if shared.is_empty() { init.node.name.clone() } else { shared.to_string() },
        dtype: a.dtype("dtype")?,
        shape: a.shape("shape")?.clone(),
    }))
}

struct AssignK {
    validate_shape: bool,
}
impl OpKernel for AssignK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let var = ctx.input_ref(0)?.clone();
        let value = ctx.input(1)?.clone();
        let out = var.assign(value, self.validate_shape)?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_assign(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(AssignK { validate_shape: init.attrs().bool_or("validate_shape", true) }))
}

fn add_assign<T: Element>(dst: &mut [T], src: &[T], sign: f64) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = T::from_f64(d.to_f64() + sign * s.to_f64());
    }
}

fn add_assign_f32(dst: &mut [f32], src: &[f32], sign: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += sign * s;
    }
}

struct AssignAddK {
    sign: f64,
}
impl OpKernel for AssignAddK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let var = ctx.input_ref(0)?.clone();
        let delta = ctx.input(1)?.clone();
        let sign = self.sign;
        let out = var.update(|t| {
            if t.shape() != delta.shape() || t.dtype() != delta.dtype() {
                return Err(Error::invalid_argument(format!(
                    "update of {} {} does not match variable {} of {} {}",
                    delta.dtype(),
                    delta.shape(),
                    var.name,
                    t.dtype(),
                    t.shape()
                )));
            }
            if t.dtype() == DType::F32 {
                add_assign_f32(t.as_mut_slice::<f32>()?, delta.as_slice::<f32>()?, sign as f32);
                return Ok(());
            }
            dispatch_numeric!(t.dtype(), T => {
                add_assign::<T>(t.as_mut_slice::<T>()?, delta.as_slice::<T>()?, sign);
                Ok(())
            }, _ => Err(Error::invalid_argument(format!("cannot add to a {} variable", t.dtype()))))
        })?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_assign_add(init: &KernelInit<'_>) -> Result<Kernel> {
    let sign = if init.node.op == "AssignSub" { -1.0 } else { 1.0 };
    Ok(Kernel::sized(AssignAddK { sign }, init))
}

struct IsInitK;
impl OpKernel for IsInitK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let b = ctx.input_ref(0)?.is_initialized();
        ctx.set_output(0, Tensor::scalar_bool(b));
        Ok(())
    }
}

pub fn create_is_initialized(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(IsInitK))
}

struct ArgK {
    index: usize,
    dtype: DType,
}
impl OpKernel for ArgK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let t = ctx.step.frame.args.get(self.index).cloned().flatten().ok_or_else(|| {
            Error::internal(format!("argument {} was not supplied to this step", self.index))
        })?;
        if t.dtype() != self.dtype {
            return Err(Error::invalid_argument(format!(
                "fed value has dtype {}, expected {}",
                t.dtype(),
                self.dtype
            )));
        }
        ctx.set_output(0, t);
        Ok(())
    }
}

pub fn create_arg(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(ArgK { index: init.attrs().int("index")? as usize, dtype: init.attrs().dtype("T")? }))
}

struct RetvalK {
    index: usize,
}
impl OpKernel for RetvalK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let t = ctx.device().to_host(ctx.input(0)?)?;
        let slot = ctx
            .step
            .frame
            .retvals
            .get(self.index)
            .ok_or_else(|| Error::internal(format!("no return slot {} in this step", self.index)))?;
        slot.set(t).map_err(|_| Error::internal(format!("return value {} set twice", self.index)))
    }
}

pub fn create_retval(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(RetvalK { index: init.attrs().int("index")? as usize }))
}

struct SendK {
    key: RendezvousKey,
}
impl OpKernel for SendK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let t = ctx.device().to_host(ctx.input(0)?)?;
        ctx.step.rendezvous.send(&self.key, t)
    }
}

pub fn create_send(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(SendK { key: rendezvous_key_of(init.node)? }))
}

struct RecvK {
    key: RendezvousKey,
    dtype: DType,
}
impl AsyncOpKernel for RecvK {
    fn compute_async(&self, ctx: AsyncKernelContext, done: AsyncDone) {
        let dtype = self.dtype;
        let device = ctx.step.device.clone();
        let key = self.key.full.clone();
        ctx.step.rendezvous.clone().recv_async(
            &self.key,
            Box::new(move |r| {
                let on_device = device.device_type() != "CPU";
                let pool = device.clone();
                let finish = move || {
                    done(r.and_then(|t| {
                        if t.dtype() != dtype {
                            return Err(Error::internal(format!(
                                "received a {} tensor for key {key}, expected {dtype}",
                                t.dtype()
                            )));
                        }
                        Ok(vec![Value::Tensor(device.from_host(t)?)])
                    }))
                };
                // A copy into device memory may wait for the device: never on an event loop.
                if on_device && crate::executor::on_io_thread() {
                    pool.schedule(Box::new(finish));
                } else {
                    finish();
                }
            }),
        );
    }

    fn starts_without_blocking(&self) -> bool {
        true
    }
}

pub fn create_recv(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::asynchronous(RecvK {
        key: rendezvous_key_of(init.node)?,
        dtype: init.attrs().dtype("tensor_type")?,
    }))
}

// ---- Shape kernels: a new shape over the same storage, so any device runs them. Their int
// inputs (shapes, axes) are read on the host, as TensorFlow's HostMemory arguments. ----

/// The values of an int32 or int64 tensor (axes, shapes, permutations, sizes).
pub fn int_values(t: &Tensor, what: &str) -> Result<Vec<i64>> {
    match t.dtype() {
        DType::I32 => Ok(t.as_slice::<i32>()?.iter().map(|&x| x as i64).collect()),
        DType::I64 => t.to_vec::<i64>(),
        d => Err(Error::invalid_argument(format!("{what} must be int32 or int64, is {d}"))),
    }
}

/// A vector (or scalar) of ints, checked to have rank at most 1.
pub fn int_vector(t: &Tensor, what: &str) -> Result<Vec<i64>> {
    if t.shape().rank() > 1 {
        return Err(Error::invalid_argument(format!("{what} must be a vector, has shape {}", t.shape())));
    }
    int_values(t, what)
}

/// A shape from a vector of ints (each ≥ 0).
pub fn shape_from_ints(v: &[i64], what: &str) -> Result<Shape> {
    let mut dims = Vec::with_capacity(v.len());
    for &d in v {
        if d < 0 {
            return Err(Error::invalid_argument(format!("{what} has a negative dimension: {v:?}")));
        }
        dims.push(d as usize);
    }
    let s = Shape::new(&dims)?;
    s.checked_num_elements()?;
    Ok(s)
}

/// Resolves a possibly negative `axis` against `rank`.
pub fn axis_index(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(Error::invalid_argument(format!(
            "axis {axis} is out of range for a tensor of rank {rank} (expected [-{rank}, {rank}))"
        )));
    }
    Ok(a as usize)
}

/// The target shape of a Reshape of `n` elements to `target` (one entry may be -1).
fn reshape_target(n: usize, target: &[i64]) -> Result<Shape> {
    let mut unknown = None;
    let mut known = 1usize;
    for (i, &d) in target.iter().enumerate() {
        if d == -1 {
            if unknown.is_some() {
                return Err(Error::invalid_argument(format!(
                    "only one input size may be -1, not both {} and {i}",
                    unknown.unwrap_or(0)
                )));
            }
            unknown = Some(i);
        } else if d < 0 {
            return Err(Error::invalid_argument(format!("size {i} must be non-negative, not {d}")));
        } else {
            known = known
                .checked_mul(d as usize)
                .ok_or_else(|| Error::invalid_argument(format!("requested shape {target:?} is too large")))?;
        }
    }
    let mut dims: Vec<usize> = target.iter().map(|&d| d.max(0) as usize).collect();
    match unknown {
        Some(i) => {
            // An empty input fills the unknown dimension with 0 when the rest multiply to 0.
            if known == 0 && n == 0 {
                dims[i] = 0;
                return Shape::new(&dims);
            }
            if known == 0 || (n / known) * known != n {
                return Err(Error::invalid_argument(format!(
                    "Input to reshape is a tensor with {n} values, but the requested shape requires a \
                     multiple of {known}"
                )));
            }
            dims[i] = n / known;
        }
        None if known != n => {
            return Err(Error::invalid_argument(format!(
                "Input to reshape is a tensor with {n} values, but the requested shape has {known}"
            )))
        }
        None => {}
    }
    Shape::new(&dims)
}

struct ReshapeK;
impl OpKernel for ReshapeK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let target = int_vector(&ctx.device().to_host(ctx.input(1)?)?, "shape")?;
        let out = x.reshape(reshape_target(x.num_elements(), &target)?)?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_reshape(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(ReshapeK))
}

struct ExpandDimsK;
impl OpKernel for ExpandDimsK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let axis = int_values(&ctx.device().to_host(ctx.input(1)?)?, "dim")?;
        let [axis] = axis[..] else {
            return Err(Error::invalid_argument(format!("dim must hold one value, has {}", axis.len())));
        };
        let r = x.shape().rank();
        let a = axis_index(axis, r + 1)?;
        let mut dims = x.shape().dims().to_vec();
        dims.insert(a, 1);
        let out = x.reshape(Shape::new(&dims)?)?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_expand_dims(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(ExpandDimsK))
}

struct SqueezeK {
    axes: Vec<i64>,
}
impl OpKernel for SqueezeK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let x = ctx.input(0)?;
        let s = x.shape();
        let mut drop = [false; MAX_RANK];
        if self.axes.is_empty() {
            for (i, &d) in s.dims().iter().enumerate() {
                drop[i] = d == 1;
            }
        } else {
            for &a in &self.axes {
                let i = axis_index(a, s.rank())?;
                if s.dim(i) != 1 {
                    return Err(Error::invalid_argument(format!(
                        "Can not squeeze dim[{i}], expected a dimension of 1, got {}",
                        s.dim(i)
                    )));
                }
                drop[i] = true;
            }
        }
        let dims: Vec<usize> =
            s.dims().iter().enumerate().filter(|(i, _)| !drop[*i]).map(|(_, &d)| d).collect();
        let out = x.reshape(Shape::new(&dims)?)?;
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_squeeze(init: &KernelInit<'_>) -> Result<Kernel> {
    let axes = init.attrs().ints("squeeze_dims").map(|v| v.to_vec()).unwrap_or_default();
    Ok(Kernel::cheap(SqueezeK { axes }))
}

struct ShapeK {
    out_type: DType,
}
impl OpKernel for ShapeK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let dims = ctx.input(0)?.shape().dims().to_vec();
        let out = match self.out_type {
            DType::I64 => Tensor::vector(&dims.iter().map(|&d| d as i64).collect::<Vec<_>>()),
            _ => {
                let v: Vec<i32> = dims
                    .iter()
                    .map(|&d| {
                        i32::try_from(d).map_err(|_| {
                            Error::invalid_argument(format!("dimension {d} does not fit out_type int32"))
                        })
                    })
                    .collect::<Result<_>>()?;
                Tensor::vector(&v)
            }
        };
        ctx.set_output(0, out);
        Ok(())
    }
}

pub fn create_shape(init: &KernelInit<'_>) -> Result<Kernel> {
    let out_type = init.attrs().dtype("out_type").unwrap_or(DType::I32);
    if !matches!(out_type, DType::I32 | DType::I64) {
        return Err(Error::invalid_argument(format!("out_type must be int32 or int64, is {out_type}")));
    }
    Ok(Kernel::cheap(ShapeK { out_type }))
}

const NUMERIC: &[DType] = DType::NUMBERS;

/// The system kernels, for the CPU device.
pub const KERNELS: &[KernelDef] = &[
    KernelDef::new("Const", "CPU", create_const),
    KernelDef::new("Identity", "CPU", create_identity),
    KernelDef::new("StopGradient", "CPU", create_identity),
    KernelDef::new("PlaceholderWithDefault", "CPU", create_identity),
    KernelDef::new("NoOp", "CPU", create_no_op),
    KernelDef::new("Placeholder", "CPU", create_placeholder),
    KernelDef::new("VariableV2", "CPU", create_variable),
    KernelDef::new("Assign", "CPU", create_assign),
    KernelDef::new("AssignAdd", "CPU", create_assign_add).types(TypeOf::Input(1), NUMERIC),
    KernelDef::new("AssignSub", "CPU", create_assign_add).types(TypeOf::Input(1), NUMERIC),
    KernelDef::new("IsVariableInitialized", "CPU", create_is_initialized),
    KernelDef::new("_Arg", "CPU", create_arg),
    KernelDef::new("_Retval", "CPU", create_retval),
    KernelDef::new("_Send", "CPU", create_send),
    KernelDef::new("_Recv", "CPU", create_recv),
];
