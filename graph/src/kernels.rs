//! Device-independent system kernels, registered for the CPU: constants, placeholders, identity,
//! variables and their assignments, the step's `_Arg`/`_Retval`, and `_Send`/`_Recv`.
//! Accelerator crates register the same factories under their own device type.

use crate::kernel::{
    AsyncDone, AsyncKernelContext, AsyncOpKernel, Kernel, KernelDef, KernelInit, OpKernel, OpKernelContext,
    TypeOf, Value,
};
use crate::partition::rendezvous_key_of;
use crate::{
    dispatch_numeric, AttrsExt, DType, Element, Error, RendezvousKey, Result, Tensor, Variable,
    DEFAULT_CONTAINER,
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
