//! Kernels: the `OpKernel` (runs to completion) and `AsyncOpKernel` (registers a continuation)
//! traits, the context they run in, and the `KernelRegistry` built from each crate's `KERNELS`.

use crate::device::{Device, IntraOpPool};
use crate::{
    CancellationManager, DType, Error, NodeDef, Rendezvous, ResourceMgr, Result, Tensor, TensorInfo, Variable,
};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Identifies one step (one `run`) across every partition and task it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct StepId(pub u64);

impl StepId {
    /// A fresh step id, unique in this process; the high bits are random per process so ids from
    /// different clients do not collide on a shared worker.
    pub fn next() -> StepId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        static BASE: OnceLock<u64> = OnceLock::new();
        let base = *BASE.get_or_init(|| crate::random_u64() & 0xffff_ff00_0000_0000);
        StepId(base | NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// What flows along an edge: a tensor, or a reference to a variable (for ops that update it).
#[derive(Clone, Debug)]
pub enum Value {
    Tensor(Tensor),
    Ref(Arc<Variable>),
}

impl Value {
    /// The tensor, reading a variable reference (error when uninitialised).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Value::Tensor(t) => Ok(t.clone()),
            Value::Ref(v) => v.read(),
        }
    }
}

/// Feeds and fetches of one step: `_Arg` nodes read `args`, `_Retval` nodes fill `retvals`.
#[derive(Debug, Default)]
pub struct CallFrame {
    pub args: Vec<Option<Tensor>>,
    pub retvals: Vec<OnceLock<Tensor>>,
}

impl CallFrame {
    pub fn new(args: Vec<Option<Tensor>>, num_retvals: usize) -> CallFrame {
        CallFrame { args, retvals: (0..num_retvals).map(|_| OnceLock::new()).collect() }
    }
}

/// Per-step state shared by all kernels of one partition.
pub struct StepContext {
    pub step_id: StepId,
    pub rendezvous: Arc<dyn Rendezvous>,
    pub cancellation: Arc<CancellationManager>,
    pub deadline: Option<Instant>,
    pub frame: Arc<CallFrame>,
    pub device: Arc<dyn Device>,
}

impl fmt::Debug for StepContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StepContext({:?} on {})", self.step_id, self.device.name())
    }
}

/// A node as the executor and kernels see it.
#[derive(Debug)]
pub struct NodeInfo {
    pub name: String,
    pub op: String,
    pub input_types: Vec<TensorInfo>,
    pub output_types: Vec<TensorInfo>,
}

/// Where a kernel's inputs are: an explicit list, or the executor's output slots.
#[derive(Clone, Copy)]
pub(crate) enum Inputs<'a> {
    Values(&'a [Value]),
    Slots(&'a [Option<Value>], &'a [u32]),
}

/// The context of one synchronous kernel invocation.
pub struct OpKernelContext<'a> {
    pub node: &'a NodeInfo,
    pub step: &'a Arc<StepContext>,
    pub(crate) inputs: Inputs<'a>,
    pub(crate) outputs: &'a mut Vec<Option<Value>>,
}

impl<'a> OpKernelContext<'a> {
    /// A context over explicit inputs and an output buffer (executors and tests build these).
    pub fn new(
        node: &'a NodeInfo,
        step: &'a Arc<StepContext>,
        inputs: &'a [Value],
        outputs: &'a mut Vec<Option<Value>>,
    ) -> OpKernelContext<'a> {
        outputs.clear();
        outputs.resize(node.output_types.len(), None);
        OpKernelContext { node, step, inputs: Inputs::Values(inputs), outputs }
    }

    /// A context reading its inputs straight from the executor's slots (no copies).
    pub(crate) fn over_slots(
        node: &'a NodeInfo,
        step: &'a Arc<StepContext>,
        vals: &'a [Option<Value>],
        slots: &'a [u32],
        outputs: &'a mut Vec<Option<Value>>,
    ) -> OpKernelContext<'a> {
        // The executor takes every output it accepts, so the buffer is usually already right.
        let n = node.output_types.len();
        if outputs.len() != n || outputs.iter().any(Option::is_some) {
            outputs.clear();
            outputs.resize(n, None);
        }
        OpKernelContext { node, step, inputs: Inputs::Slots(vals, slots), outputs }
    }

    #[inline]
    fn value(&self, i: usize) -> Option<&Value> {
        match self.inputs {
            Inputs::Values(v) => v.get(i),
            Inputs::Slots(vals, slots) => {
                slots.get(i).and_then(|&s| vals.get(s as usize)).and_then(|v| v.as_ref())
            }
        }
    }

    pub fn num_inputs(&self) -> usize {
        match self.inputs {
            Inputs::Values(v) => v.len(),
            Inputs::Slots(_, slots) => slots.len(),
        }
    }

    /// Input `i` as a tensor.
    #[inline]
    pub fn input(&self, i: usize) -> Result<&Tensor> {
        match self.value(i) {
            Some(Value::Tensor(t)) => Ok(t),
            Some(Value::Ref(_)) => Err(self.error(Error::internal(format!("input {i} is a reference")))),
            None => Err(self.error(Error::internal(format!("no input {i}")))),
        }
    }

    /// Input `i` as a variable reference (for `Assign`, `Apply*`).
    pub fn input_ref(&self, i: usize) -> Result<&Arc<Variable>> {
        match self.value(i) {
            Some(Value::Ref(v)) => Ok(v),
            _ => Err(self.error(Error::internal(format!("input {i} is not a reference")))),
        }
    }

    /// Every input, in order.
    pub fn input_values(&self) -> impl Iterator<Item = &Value> + '_ {
        (0..self.num_inputs()).filter_map(|i| self.value(i))
    }

    #[inline]
    pub fn set_output(&mut self, i: usize, t: Tensor) {
        if let Some(o) = self.outputs.get_mut(i) {
            *o = Some(Value::Tensor(t));
        }
    }

    pub fn set_output_ref(&mut self, i: usize, v: Arc<Variable>) {
        if let Some(o) = self.outputs.get_mut(i) {
            *o = Some(Value::Ref(v));
        }
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.step.device
    }

    /// An output tensor that the kernel overwrites entirely (contents unspecified), from the
    /// device's allocator.
    pub fn allocate_output(&self, dtype: DType, shape: crate::Shape) -> Result<Tensor> {
        self.step.device.allocate(dtype, shape)
    }

    pub fn resource_mgr(&self) -> &ResourceMgr {
        self.step.device.resource_mgr()
    }

    pub fn intra_op(&self) -> &dyn IntraOpPool {
        self.step.device.intra_op()
    }

    /// An error with this node named in front, keeping the code.
    pub fn error(&self, e: Error) -> Error {
        node_error(self.node, e)
    }
}

/// `e` with the node's name and op in front, unless already there.
pub fn node_error(node: &NodeInfo, e: Error) -> Error {
    let tag = format!("node '{}'", node.name);
    if e.msg.contains(&tag) {
        e
    } else {
        Error::new(e.code, format!("{tag} ({}): {}", node.op, e.msg))
    }
}

/// The context of one asynchronous kernel invocation; owned, so it can outlive the call.
pub struct AsyncKernelContext {
    pub node: Arc<NodeInfo>,
    pub step: Arc<StepContext>,
    pub inputs: Vec<Value>,
}

impl AsyncKernelContext {
    pub fn input(&self, i: usize) -> Result<&Tensor> {
        match self.inputs.get(i) {
            Some(Value::Tensor(t)) => Ok(t),
            _ => Err(node_error(&self.node, Error::internal(format!("no tensor input {i}")))),
        }
    }

    pub fn resource_mgr(&self) -> &ResourceMgr {
        self.step.device.resource_mgr()
    }

    pub fn error(&self, e: Error) -> Error {
        node_error(&self.node, e)
    }
}

/// Completion of an asynchronous kernel: its outputs or its error.
pub type AsyncDone = Box<dyn FnOnce(Result<Vec<Value>>) + Send>;

/// A kernel that computes its outputs before returning.
pub trait OpKernel: Send + Sync {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()>;
}

/// A kernel that may wait (for a tensor, a queue, a peer): it returns at once and calls `done`
/// later. It must react to the step's cancellation so no wait outlives its step.
pub trait AsyncOpKernel: Send + Sync {
    fn compute_async(&self, ctx: AsyncKernelContext, done: AsyncDone);

    /// Whether `compute_async` only registers its wait and returns (it may then run on an
    /// event-loop thread); a kernel that may read a file or copy much before returning says no.
    fn starts_without_blocking(&self) -> bool {
        false
    }
}

/// An instantiated kernel.
pub enum Kernel {
    /// `expensive` kernels run on the inter-op pool; cheap ones inline on the current thread.
    Sync {
        kernel: Box<dyn OpKernel>,
        expensive: bool,
    },
    Async(Box<dyn AsyncOpKernel>),
}

impl Kernel {
    pub fn cheap(k: impl OpKernel + 'static) -> Kernel {
        Kernel::Sync { kernel: Box::new(k), expensive: false }
    }
    pub fn expensive(k: impl OpKernel + 'static) -> Kernel {
        Kernel::Sync { kernel: Box::new(k), expensive: true }
    }
    /// Expensive unless the node's outputs are known to be small.
    pub fn sized(k: impl OpKernel + 'static, init: &KernelInit<'_>) -> Kernel {
        Kernel::Sync { kernel: Box::new(k), expensive: !init.outputs_small() }
    }
    pub fn asynchronous(k: impl AsyncOpKernel + 'static) -> Kernel {
        Kernel::Async(Box::new(k))
    }
}

/// Outputs with at most this many elements (known at build time) make a kernel cheap enough to
/// run inline instead of paying a hand-off to the pool.
pub const INLINE_MAX_ELEMENTS: usize = 4096;

/// What a kernel factory sees.
pub struct KernelInit<'a> {
    pub node: &'a NodeDef,
    pub input_types: &'a [TensorInfo],
    pub device: &'a Arc<dyn Device>,
}

impl KernelInit<'_> {
    pub fn attrs(&self) -> &crate::Attrs {
        &self.node.attrs
    }

    pub fn output_dtype(&self, i: usize) -> Result<DType> {
        self.node
            .outputs
            .get(i)
            .map(|o| o.dtype)
            .ok_or_else(|| Error::internal(format!("node '{}' has no output {i}", self.node.name)))
    }

    pub fn input_dtype(&self, i: usize) -> Result<DType> {
        self.input_types
            .get(i)
            .map(|o| o.dtype)
            .ok_or_else(|| Error::internal(format!("node '{}' has no input {i}", self.node.name)))
    }

    /// Whether every input has a statically known, small element count (for reductions, whose
    /// small outputs can hide large inputs).
    pub fn inputs_small(&self) -> bool {
        self.input_types.iter().all(|o| o.shape.num_elements().is_some_and(|n| n <= INLINE_MAX_ELEMENTS))
    }

    /// Whether every output has a statically known, small element count.
    pub fn outputs_small(&self) -> bool {
        self.node.outputs.iter().all(|o| o.shape.num_elements().is_some_and(|n| n <= INLINE_MAX_ELEMENTS))
    }
}

/// Which dtype of a node a kernel's type constraint looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeOf {
    Any,
    Input(usize),
    Output(usize),
}

pub type KernelFactory = fn(&KernelInit<'_>) -> Result<Kernel>;

/// A kernel registration: op, device type, dtype constraint, factory.
#[derive(Clone, Copy)]
pub struct KernelDef {
    pub op: &'static str,
    pub device_type: &'static str,
    pub type_of: TypeOf,
    /// Allowed dtypes for `type_of` (ignored for `TypeOf::Any`).
    pub types: &'static [DType],
    /// Inputs that stay in host memory on an accelerator (shapes, axes).
    pub host_inputs: &'static [usize],
    pub create: KernelFactory,
}

impl fmt::Debug for KernelDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KernelDef({} on {}, {:?} in {:?})", self.op, self.device_type, self.type_of, self.types)
    }
}

impl KernelDef {
    pub const fn new(op: &'static str, device_type: &'static str, create: KernelFactory) -> KernelDef {
        KernelDef { op, device_type, type_of: TypeOf::Any, types: &[], host_inputs: &[], create }
    }

    pub const fn types(self, type_of: TypeOf, types: &'static [DType]) -> KernelDef {
        KernelDef { type_of, types, ..self }
    }

    pub const fn host_inputs(self, host_inputs: &'static [usize]) -> KernelDef {
        KernelDef { host_inputs, ..self }
    }

    /// Whether this registration accepts the node's dtypes.
    pub fn accepts(&self, node: &NodeDef, input_types: &[DType]) -> bool {
        let d = match self.type_of {
            TypeOf::Any => return true,
            TypeOf::Input(i) => input_types.get(i).copied(),
            TypeOf::Output(i) => node.outputs.get(i).map(|o| o.dtype),
        };
        d.is_some_and(|d| self.types.contains(&d))
    }
}

/// Kernels by op and device type. Built explicitly in `main` from each crate's `KERNELS`.
#[derive(Default, Clone)]
pub struct KernelRegistry {
    by_op: HashMap<&'static str, Vec<&'static KernelDef>>,
}

impl fmt::Debug for KernelRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KernelRegistry({} ops)", self.by_op.len())
    }
}

impl KernelRegistry {
    pub fn new() -> KernelRegistry {
        KernelRegistry::default()
    }

    pub fn add(&mut self, table: &'static [KernelDef]) -> &mut Self {
        for k in table {
            self.by_op.entry(k.op).or_default().push(k);
        }
        self
    }

    /// The registration for `node` on `device_type`, if any accepts its dtypes.
    pub fn find(
        &self,
        node: &NodeDef,
        input_types: &[DType],
        device_type: &str,
    ) -> Option<&'static KernelDef> {
        self.by_op
            .get(node.op.as_str())?
            .iter()
            .copied()
            .find(|k| k.device_type == device_type && k.accepts(node, input_types))
    }

    /// Device types that have a kernel for `node`, sorted.
    pub fn device_types_for(&self, node: &NodeDef, input_types: &[DType]) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self
            .by_op
            .get(node.op.as_str())
            .map(|ks| ks.iter().filter(|k| k.accepts(node, input_types)).map(|k| k.device_type).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Whether some kernel of any device serves `op`.
    pub fn has_op(&self, op: &str, device_type: &str) -> bool {
        self.by_op.get(op).is_some_and(|ks| ks.iter().any(|k| k.device_type == device_type))
    }

    /// Instantiates the kernel for `node` on `device`.
    pub fn create(
        &self,
        node: &NodeDef,
        input_types: &[TensorInfo],
        device: &Arc<dyn Device>,
    ) -> Result<Kernel> {
        let dts: Vec<DType> = input_types.iter().map(|t| t.dtype).collect();
        let ty = device.device_type().to_string();
        let def = self.find(node, &dts, &ty).ok_or_else(|| {
            Error::not_found(format!(
                "no {ty} kernel for op {} (node '{}', input dtypes {dts:?}); devices with a kernel: {:?}",
                node.op,
                node.name,
                self.device_types_for(node, &dts)
            ))
        })?;
        (def.create)(&KernelInit { node, input_types, device })
            .map_err(|e| Error::new(e.code, format!("node '{}' ({}): {}", node.name, node.op, e.msg)))
    }
}
