//! Queue ops: the handle ops (`FIFOQueueV2`, `RandomShuffleQueueV2`, `PaddingFIFOQueueV2`,
//! `PriorityQueueV2`), the asynchronous enqueue/dequeue kernels, close, size and is_closed, and
//! their graph builders.

use crate::queue::{Queue, QueueKind, QueueSpec};
use crate::{op_def, resource_name};
use rill_graph::kernel::{
    AsyncDone, AsyncKernelContext, AsyncOpKernel, Kernel, KernelInit, OpKernel, OpKernelContext, Value,
};
use rill_graph::{
    attrs, AttrsExt, DType, Error, Graph, InferCtx, Output, PartialShape, ResourceMgr, Result, Tensor,
    TensorInfo,
};
use std::sync::Arc;

fn handle_info() -> Vec<TensorInfo> {
    vec![TensorInfo::new(DType::Resource, PartialShape::scalar())]
}

pub(crate) fn infer_queue(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(0)?;
    spec_from_attrs(c.op, c.attrs)?;
    Ok(handle_info())
}

fn expect_handle(c: &InferCtx) -> Result<()> {
    if c.num_inputs() == 0 || c.dtype(0) != DType::Resource {
        return Err(Error::invalid_argument("input 0 must be a resource handle"));
    }
    Ok(())
}

pub(crate) fn infer_enqueue(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    expect_handle(c)?;
    if c.num_inputs() < 2 {
        return Err(Error::invalid_argument("enqueue needs at least one component"));
    }
    Ok(vec![])
}

/// Output types of a dequeue: the queue's component types, shapes when the builder passed them.
fn dequeue_infos(c: &InferCtx, lead: Option<Option<usize>>) -> Result<Vec<TensorInfo>> {
    expect_handle(c)?;
    let types = c.attrs.types("component_types")?;
    let shapes = c.attrs.shapes("shapes").unwrap_or(&[]);
    Ok(types
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let s = shapes.get(i).cloned().unwrap_or_default();
            let s = match (lead, &s.dims) {
                (None, _) => s,
                (Some(n), Some(dims)) => PartialShape::from_dims(&[&[n][..], dims].concat()),
                (Some(_), None) => PartialShape::unknown(),
            };
            TensorInfo::new(*d, s)
        })
        .collect())
}

pub(crate) fn infer_dequeue(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    dequeue_infos(c, None)
}

pub(crate) fn infer_dequeue_many(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    c.expect_dtype(1, &[DType::I32])?;
    let n = c.const_ints(1).and_then(|v| v.first().copied()).map(|n| n.max(0) as usize);
    dequeue_infos(c, Some(n))
}

pub(crate) fn infer_dequeue_up_to(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    c.expect_dtype(1, &[DType::I32])?;
    dequeue_infos(c, Some(None))
}

pub(crate) fn infer_close(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    expect_handle(c)?;
    Ok(vec![])
}

pub(crate) fn infer_size(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    expect_handle(c)?;
    Ok(vec![TensorInfo::new(DType::I32, PartialShape::scalar())])
}

pub(crate) fn infer_is_closed(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    expect_handle(c)?;
    Ok(vec![TensorInfo::new(DType::Bool, PartialShape::scalar())])
}

/// The queue spec declared by a handle op's attributes.
fn spec_from_attrs(op: &str, a: &rill_graph::Attrs) -> Result<QueueSpec> {
    let capacity = a.int_or("capacity", -1);
    let mut dtypes = a.types("component_types")?.to_vec();
    let mut shapes = a.shapes("shapes").map(|s| s.to_vec()).unwrap_or_default();
    let kind = match op {
        "FIFOQueueV2" => QueueKind::Fifo,
        "PaddingFIFOQueueV2" => QueueKind::PaddingFifo,
        "RandomShuffleQueueV2" => QueueKind::RandomShuffle {
            min_after_dequeue: a.int_or("min_after_dequeue", 0).max(0) as usize,
            seed: a.int_or("seed", 0),
            seed2: a.int_or("seed2", 0),
        },
        "PriorityQueueV2" => {
            // The priority is an implicit int64 scalar component 0.
            dtypes.insert(0, DType::I64);
            shapes.insert(0, PartialShape::scalar());
            QueueKind::Priority
        }
        other => return Err(Error::internal(format!("{other} is not a queue op"))),
    };
    Ok(QueueSpec::new(kind, capacity, &dtypes, &shapes))
}

struct QueueHandleK {
    container: String,
    name: String,
    spec: QueueSpec,
}

impl OpKernel for QueueHandleK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let q = ctx
            .resource_mgr()
            .lookup_or_create(&self.container, &self.name, || Queue::new(&self.name, self.spec.clone()))?;
        q.check_matches(&self.spec)?;
        ctx.set_output(0, Tensor::resource_handle(&self.container, &self.name));
        Ok(())
    }
}

pub(crate) fn create_queue(init: &KernelInit<'_>) -> Result<Kernel> {
    let spec = spec_from_attrs(&init.node.op, init.attrs())?;
    let (container, name) = resource_name(init);
    Ok(Kernel::cheap(QueueHandleK { container, name, spec }))
}

/// The queue a handle names.
pub fn lookup_queue(mgr: &ResourceMgr, handle: &Tensor) -> Result<Arc<Queue>> {
    let (c, n) = handle.as_resource_handle()?;
    mgr.lookup::<Queue>(&c, &n)
}

fn tensors(ctx: &AsyncKernelContext, from: usize) -> Result<Vec<Tensor>> {
    (from..ctx.inputs.len()).map(|i| ctx.input(i).cloned()).collect()
}

struct EnqueueK {
    many: bool,
}

impl AsyncOpKernel for EnqueueK {
    fn compute_async(&self, ctx: AsyncKernelContext, done: AsyncDone) {
        let r = ctx
            .input(0)
            .and_then(|h| lookup_queue(ctx.resource_mgr(), h))
            .and_then(|q| Ok((q, tensors(&ctx, 1)?)));
        let (q, comps) = match r {
            Ok(x) => x,
            Err(e) => return done(Err(e)),
        };
        let cm = ctx.step.cancellation.clone();
        let d: crate::queue::EnqueueDone = Box::new(move |r| done(r.map(|()| Vec::new())));
        if self.many {
            q.enqueue_many_async(comps, Some(&cm), d)
        } else {
            q.enqueue_async(comps, Some(&cm), d)
        }
    }
}

pub(crate) fn create_enqueue(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::asynchronous(EnqueueK { many: init.node.op == "QueueEnqueueManyV2" }))
}

#[derive(Clone, Copy, PartialEq)]
enum DequeueMode {
    One,
    Many,
    UpTo,
}

struct DequeueK {
    mode: DequeueMode,
}

impl AsyncOpKernel for DequeueK {
    fn compute_async(&self, ctx: AsyncKernelContext, done: AsyncDone) {
        let q = match ctx.input(0).and_then(|h| lookup_queue(ctx.resource_mgr(), h)) {
            Ok(q) => q,
            Err(e) => return done(Err(e)),
        };
        let n = if self.mode == DequeueMode::One {
            1
        } else {
            match ctx.input(1).and_then(|t| t.scalar_value::<i32>()) {
                Ok(n) if n >= 0 => n as usize,
                Ok(n) => {
                    return done(Err(Error::invalid_argument(format!(
                        "DequeueMany requested {n} < 0 elements"
                    ))))
                }
                Err(e) => return done(Err(e)),
            }
        };
        let cm = ctx.step.cancellation.clone();
        let d: crate::queue::DequeueDone =
            Box::new(move |r| done(r.map(|ts| ts.into_iter().map(Value::Tensor).collect())));
        match self.mode {
            DequeueMode::One => q.dequeue_async(Some(&cm), d),
            DequeueMode::Many => q.dequeue_many_async(n, Some(&cm), d),
            DequeueMode::UpTo => q.dequeue_up_to_async(n, Some(&cm), d),
        }
    }
}

pub(crate) fn create_dequeue(init: &KernelInit<'_>) -> Result<Kernel> {
    let mode = match init.node.op.as_str() {
        "QueueDequeueManyV2" => DequeueMode::Many,
        "QueueDequeueUpToV2" => DequeueMode::UpTo,
        _ => DequeueMode::One,
    };
    Ok(Kernel::asynchronous(DequeueK { mode }))
}

struct CloseK {
    cancel_pending_enqueues: bool,
}

impl OpKernel for CloseK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        lookup_queue(ctx.resource_mgr(), ctx.input(0)?)?.close(self.cancel_pending_enqueues);
        Ok(())
    }
}

pub(crate) fn create_close(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(CloseK {
        cancel_pending_enqueues: init.attrs().bool_or("cancel_pending_enqueues", false),
    }))
}

struct SizeK;

impl OpKernel for SizeK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let n = lookup_queue(ctx.resource_mgr(), ctx.input(0)?)?.size();
        ctx.set_output(0, Tensor::scalar(n.min(i32::MAX as usize) as i32));
        Ok(())
    }
}

struct IsClosedK;

impl OpKernel for IsClosedK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let c = lookup_queue(ctx.resource_mgr(), ctx.input(0)?)?.is_closed();
        ctx.set_output(0, Tensor::scalar_bool(c));
        Ok(())
    }
}

pub(crate) fn create_size(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(SizeK))
}

pub(crate) fn create_is_closed(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(IsClosedK))
}

// ---- builders ----

/// Options shared by the queue builders; `Default` gives TensorFlow's defaults.
#[derive(Clone, Debug, Default)]
pub struct QueueOptions {
    /// Node name; empty: the op's default name.
    pub name: String,
    /// Name the queue is shared under; empty: the node's name.
    pub shared_name: String,
}

impl QueueOptions {
    pub fn shared(shared_name: &str) -> QueueOptions {
        QueueOptions { name: String::new(), shared_name: shared_name.to_string() }
    }
}

fn queue_node(
    g: &Graph,
    op: &str,
    default_name: &str,
    opts: &QueueOptions,
    mut a: rill_graph::Attrs,
) -> Output {
    if !opts.shared_name.is_empty() {
        a.insert("shared_name".into(), opts.shared_name.as_str().into());
    }
    let name = if opts.name.is_empty() { default_name } else { opts.name.as_str() };
    g.op(op_def(op), name, &[], a)
}

/// `tf.FIFOQueue(capacity, dtypes, shapes)`; `shapes` may be empty (unspecified).
pub fn fifo_queue(
    g: &Graph,
    capacity: i64,
    dtypes: &[DType],
    shapes: &[PartialShape],
    opts: &QueueOptions,
) -> Output {
    fifo_like(g, "FIFOQueueV2", "fifo_queue", capacity, dtypes, shapes, opts)
}

/// A queue handle op whose attrs are capacity, component types and shapes.
fn fifo_like(
    g: &Graph,
    op: &str,
    default_name: &str,
    capacity: i64,
    dtypes: &[DType],
    shapes: &[PartialShape],
    opts: &QueueOptions,
) -> Output {
    let a =
        attrs! { "capacity" => capacity, "component_types" => dtypes.to_vec(), "shapes" => shapes.to_vec() };
    queue_node(g, op, default_name, opts, a)
}

/// `tf.PaddingFIFOQueue`: shapes of known rank, `None` dimensions padded on batching.
pub fn padding_fifo_queue(
    g: &Graph,
    capacity: i64,
    dtypes: &[DType],
    shapes: &[PartialShape],
    opts: &QueueOptions,
) -> Output {
    fifo_like(g, "PaddingFIFOQueueV2", "padding_fifo_queue", capacity, dtypes, shapes, opts)
}

/// `tf.RandomShuffleQueue(capacity, min_after_dequeue, dtypes, shapes, seed)`.
pub fn random_shuffle_queue(
    g: &Graph,
    capacity: i64,
    min_after_dequeue: i64,
    dtypes: &[DType],
    shapes: &[PartialShape],
    seed: i64,
    opts: &QueueOptions,
) -> Output {
    let a = attrs! {
        "capacity" => capacity, "min_after_dequeue" => min_after_dequeue,
        "component_types" => dtypes.to_vec(), "shapes" => shapes.to_vec(),
        "seed" => seed, "seed2" => 0i64,
    };
    queue_node(g, "RandomShuffleQueueV2", "random_shuffle_queue", opts, a)
}

/// `tf.PriorityQueue(capacity, types, shapes)`: elements are `(priority: int64 scalar, *types)`.
pub fn priority_queue(
    g: &Graph,
    capacity: i64,
    dtypes: &[DType],
    shapes: &[PartialShape],
    opts: &QueueOptions,
) -> Output {
    let a =
        attrs! { "capacity" => capacity, "component_types" => dtypes.to_vec(), "shapes" => shapes.to_vec() };
    queue_node(g, "PriorityQueueV2", "priority_queue", opts, a)
}

/// The full element signature (priority included) of the queue op behind `q`.
pub fn queue_signature(g: &Graph, q: Output) -> (Vec<DType>, Vec<PartialShape>) {
    let n = g.node(q.node);
    let mut types = n.attrs.types("component_types").map(|t| t.to_vec()).unwrap_or_default();
    let mut shapes = n.attrs.shapes("shapes").map(|s| s.to_vec()).unwrap_or_default();
    if n.op == "PriorityQueueV2" {
        types.insert(0, DType::I64);
        shapes.insert(0, PartialShape::scalar());
    }
    (types, shapes)
}

fn multi(g: &Graph, op: &str, q: Output, extra: &[Output]) -> Vec<Output> {
    let (types, shapes) = queue_signature(g, q);
    let inputs: Vec<Output> = std::iter::once(q).chain(extra.iter().copied()).collect();
    let id = g.add_node(op_def(op), "", &inputs, attrs! { "component_types" => types, "shapes" => shapes });
    (0..g.num_outputs(id) as u32).map(|i| Output::new(id, i)).collect()
}

pub fn enqueue(g: &Graph, q: Output, comps: &[Output]) -> Output {
    let inputs: Vec<Output> = std::iter::once(q).chain(comps.iter().copied()).collect();
    g.op(op_def("QueueEnqueueV2"), "", &inputs, attrs! {})
}

pub fn enqueue_many(g: &Graph, q: Output, comps: &[Output]) -> Output {
    let inputs: Vec<Output> = std::iter::once(q).chain(comps.iter().copied()).collect();
    g.op(op_def("QueueEnqueueManyV2"), "", &inputs, attrs! {})
}

pub fn dequeue(g: &Graph, q: Output) -> Vec<Output> {
    multi(g, "QueueDequeueV2", q, &[])
}

pub fn dequeue_many(g: &Graph, q: Output, n: usize) -> Vec<Output> {
    let n = g.scalar(n.min(i32::MAX as usize) as i32);
    multi(g, "QueueDequeueManyV2", q, &[n])
}

/// `dequeue_many` with the count from a tensor (an int32 scalar).
pub fn dequeue_many_dynamic(g: &Graph, q: Output, n: Output) -> Vec<Output> {
    multi(g, "QueueDequeueManyV2", q, &[n])
}

pub fn dequeue_up_to(g: &Graph, q: Output, n: usize) -> Vec<Output> {
    let n = g.scalar(n.min(i32::MAX as usize) as i32);
    multi(g, "QueueDequeueUpToV2", q, &[n])
}

pub fn queue_close(g: &Graph, q: Output, cancel_pending_enqueues: bool) -> Output {
    g.op(op_def("QueueCloseV2"), "", &[q], attrs! { "cancel_pending_enqueues" => cancel_pending_enqueues })
}

pub fn queue_size(g: &Graph, q: Output) -> Output {
    g.op(op_def("QueueSizeV2"), "", &[q], attrs! {})
}

pub fn queue_is_closed(g: &Graph, q: Output) -> Output {
    g.op(op_def("QueueIsClosedV2"), "", &[q], attrs! {})
}
