//! `ConditionalAccumulator`: the resource that aggregates gradients for synchronous training, its
//! ops (`ConditionalAccumulator`, `AccumulatorApplyGradient`, `AccumulatorTakeGradient`,
//! `AccumulatorNumAccumulated`, `AccumulatorSetGlobalStep`, and rill's `AccumulatorAwaitGradients`
//! and `AccumulatorCancelAwaits`) and their graph builders.
//!
//! The rules are TensorFlow's (`conditional_accumulator_base.cc`): a gradient computed at a
//! `local_step` older than the accumulator's global step is dropped without an error; a take waits
//! until `num_required` gradients are in, returns their mean (over every gradient accumulated, which
//! may be more than `num_required`), resets the sum and advances the global step by one; waiting
//! takes are served in arrival order. A take waits in the accumulator, never on a thread, and a
//! cancelled take withdraws only itself: the gradients stay for the next take. An await waits in
//! the same line as the takes but takes nothing: it lets a chief start its takes only once every
//! accumulator is full, so a deadline can never cut a round between two takes. Cancelling the
//! awaits ends such a waiting round at once (a chief that stops), again having taken nothing.

use crate::{op_def, resource_name};
use rill_graph::kernel::{
    AsyncDone, AsyncKernelContext, AsyncOpKernel, Kernel, KernelInit, OpKernel, OpKernelContext, Value,
};
use rill_graph::{
    attrs, dispatch_float, AttrsExt, CancelToken, CancellationManager, DType, Element, Error, Graph,
    InferCtx, Output, PartialShape, Resource, ResourceMgr, Result, Shape, Tensor, TensorInfo,
};
use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How long a blocking take waits for a cancelled attempt to report back before giving up.
const CANCEL_REPORT_MS: u64 = 5_000;

/// How the accumulated gradients are reduced when taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The mean over the gradients accumulated (TensorFlow's default).
    Mean,
    Sum,
}

impl Reduction {
    fn parse(s: &str) -> Result<Reduction> {
        match s {
            "MEAN" => Ok(Reduction::Mean),
            "SUM" => Ok(Reduction::Sum),
            other => {
                Err(Error::invalid_argument(format!("reduction_type must be MEAN or SUM, not '{other}'")))
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reduction::Mean => "MEAN",
            Reduction::Sum => "SUM",
        }
    }
}

/// A completion callback of a take: the reduced gradient, or why there is none.
pub type TakeDone = Box<dyn FnOnce(Result<Tensor>) + Send>;

type CancelSlot = Option<(Arc<CancellationManager>, Arc<OnceLock<CancelToken>>)>;

struct TakeAttempt {
    id: u64,
    num_required: usize,
    /// An await: answered with the count, the gradients stay.
    peek: bool,
    done: TakeDone,
    cancel: CancelSlot,
}

struct State {
    global_step: i64,
    /// Gradients summed since the last take.
    counter: usize,
    /// The running sum in f64 (whatever the dtype, so half-precision gradients lose nothing while
    /// summed), and the shape of the first gradient since the last take.
    sum: Vec<f64>,
    sum_shape: Option<Shape>,
    /// The last take's result, kept so that the next take writes into the same buffer once every
    /// reader has dropped it (no fresh pages per take); a buffer still read is never written.
    last_take: Option<Tensor>,
    takers: VecDeque<TakeAttempt>,
    next_id: u64,
}

/// A conditional accumulator resource: gradients of one dtype and (partial) shape.
pub struct ConditionalAccumulator {
    name: String,
    dtype: DType,
    shape: PartialShape,
    reduction: Reduction,
    state: Mutex<State>,
}

impl Resource for ConditionalAccumulator {
    fn describe(&self) -> String {
        format!("ConditionalAccumulator '{}' ({} {})", self.name, self.dtype, self.shape)
    }
}

impl std::fmt::Debug for ConditionalAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ConditionalAccumulator {
    /// An empty accumulator at global step 0. Only floating-point dtypes accumulate.
    pub fn new(name: &str, dtype: DType, shape: PartialShape, reduction: Reduction) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::invalid_argument(format!(
                "ConditionalAccumulator '{name}': dtype must be a floating-point type, not {dtype}"
            )));
        }
        let state = State {
            global_step: 0,
            counter: 0,
            sum: Vec::new(),
            sum_shape: None,
            last_take: None,
            takers: VecDeque::new(),
            next_id: 0,
        };
        Ok(ConditionalAccumulator {
            name: name.to_string(),
            dtype,
            shape,
            reduction,
            state: Mutex::new(state),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &PartialShape {
        &self.shape
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update under the lock is completed before it is released, so a poisoned lock
        // still guards a consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a handle op declaring `dtype` and `shape` may share this accumulator.
    pub fn check_matches(&self, dtype: DType, shape: &PartialShape) -> Result<()> {
        if dtype != self.dtype || !shape.compatible(&self.shape) {
            return Err(Error::invalid_argument(format!(
                "shared accumulator '{}' exists as {} {}, this node declares {dtype} {shape}",
                self.name, self.dtype, self.shape
            )));
        }
        Ok(())
    }

    /// The accumulator's global step.
    pub fn global_step(&self) -> i64 {
        self.lock().global_step
    }

    /// Gradients accumulated since the last take.
    pub fn num_accumulated(&self) -> usize {
        self.lock().counter
    }

    /// Sets the global step. Going backwards is allowed, as in TensorFlow (it only warns there):
    /// the chief uses it to bring accumulators back in line with the global step variable.
    pub fn set_global_step(&self, step: i64) {
        self.lock().global_step = step;
    }

    /// Adds `grad` if it is fresh (`local_step >= global_step`); a stale gradient is dropped and
    /// `Ok(false)` returned. A fresh gradient of the wrong dtype or shape is `InvalidArgument`.
    pub fn apply_grad(&self, local_step: i64, grad: &Tensor) -> Result<bool> {
        let list = {
            let mut st = self.lock();
            if local_step < st.global_step {
                return Ok(false);
            }
            self.check_grad(&st, grad)?;
            // Straight from the gradient's elements into the sum, whose buffer a take keeps:
            // no temporary vector (and no fresh pages) per gradient.
            let first = st.counter == 0;
            dispatch_float!(grad.dtype(), T => {
                let values = grad.as_slice::<T>()?;
                if first {
                    st.sum.clear();
                    st.sum.extend(values.iter().map(|v| v.to_f64()));
                } else {
                    for (s, v) in st.sum.iter_mut().zip(values) {
                        *s += v.to_f64();
                    }
                }
                Ok(())
            }, _ => Err(Error::internal(format!("accumulator {:?} got a {} gradient", self.name, grad.dtype()))))?;
            if first {
                st.sum_shape = Some(*grad.shape());
            }
            st.counter += 1;
            self.flush(&mut st)
        };
        complete(list);
        Ok(true)
    }

    fn check_grad(&self, st: &State, grad: &Tensor) -> Result<()> {
        if grad.dtype() != self.dtype {
            return Err(Error::invalid_argument(format!(
                "accumulator '{}' holds {} gradients, got {}",
                self.name,
                self.dtype,
                grad.dtype()
            )));
        }
        if !self.shape.is_compatible_with(grad.shape()) {
            return Err(Error::invalid_argument(format!(
                "Shape mismatch: accumulator '{}' expects shape {}, got {}",
                self.name,
                self.shape,
                grad.shape()
            )));
        }
        if let Some(s) = st.sum_shape.filter(|_| st.counter > 0) {
            if &s != grad.shape() {
                return Err(Error::invalid_argument(format!(
                    "Shape mismatch: accumulator '{}' holds gradients of shape {s}, got {}",
                    self.name,
                    grad.shape()
                )));
            }
        }
        Ok(())
    }

    /// Takes the reduced gradient once `num_required` gradients are in; `done` runs then (maybe
    /// at once, maybe on the thread that applies the last gradient), or with the step's reason
    /// when `cancel` fires first.
    pub fn take_grad_async(
        self: &Arc<Self>,
        num_required: i64,
        cancel: Option<&Arc<CancellationManager>>,
        done: TakeDone,
    ) {
        self.wait_async(num_required, false, cancel, done)
    }

    /// Waits like a take until `num_required` gradients are in, then answers with their count
    /// (an int32 scalar) and leaves them, and the global step, as they are.
    pub fn await_grads_async(
        self: &Arc<Self>,
        num_required: i64,
        cancel: Option<&Arc<CancellationManager>>,
        done: TakeDone,
    ) {
        self.wait_async(num_required, true, cancel, done)
    }

    fn wait_async(
        self: &Arc<Self>,
        num_required: i64,
        peek: bool,
        cancel: Option<&Arc<CancellationManager>>,
        done: TakeDone,
    ) {
        if num_required <= 0 {
            return done(Err(Error::invalid_argument(format!(
                "Argument num_required must be positive, but was {num_required}"
            ))));
        }
        let slot: CancelSlot = cancel.map(|cm| (cm.clone(), Arc::new(OnceLock::new())));
        let (waiting, list) = {
            let mut st = self.lock();
            st.next_id += 1;
            let id = st.next_id;
            let num_required = usize::try_from(num_required).unwrap_or(usize::MAX);
            st.takers.push_back(TakeAttempt { id, num_required, peek, done, cancel: slot.clone() });
            let list = self.flush(&mut st);
            (st.takers.iter().any(|a| a.id == id).then_some(id), list)
        };
        complete(list);
        let (Some(id), Some((cm, token))) = (waiting, slot) else { return };
        let weak = Arc::downgrade(self);
        let r = cm.register(move |reason| {
            if let Some(acc) = weak.upgrade() {
                acc.withdraw(id, reason.clone());
            }
        });
        match r {
            Some(t) => {
                let _ = token.set(t);
            }
            None => self.withdraw(id, cm.reason().unwrap_or_else(|| Error::cancelled("step was cancelled"))),
        }
    }

    /// Fails every waiting await with `Cancelled`; waiting takes, the gradients and the step stay.
    /// Returns how many awaits it ended.
    pub fn cancel_awaits(&self) -> usize {
        let list = {
            let mut st = self.lock();
            let (awaits, takes): (VecDeque<_>, VecDeque<_>) =
                std::mem::take(&mut st.takers).into_iter().partition(|a| a.peek);
            st.takers = takes;
            let reason = format!("AccumulatorAwaitGradients on accumulator '{}' was cancelled", self.name);
            let mut list: Vec<_> =
                awaits.into_iter().map(|a| (a, Err(Error::cancelled(reason.clone())))).collect();
            // An await at the head may have held back a take that the gradients in already serve.
            list.extend(self.flush(&mut st));
            list
        };
        let n = list.iter().filter(|(a, _)| a.peek).count();
        complete(list);
        n
    }

    /// Removes take `id` if it still waits and fails it with `reason`; the sum is untouched.
    fn withdraw(&self, id: u64, reason: Error) {
        let attempt = {
            let mut st = self.lock();
            let i = st.takers.iter().position(|a| a.id == id);
            i.and_then(|i| st.takers.remove(i))
        };
        if let Some(a) = attempt {
            (a.done)(Err(Error::new(
                reason.code,
                format!("TakeGrad on accumulator '{}' was cancelled: {}", self.name, reason.msg),
            )));
        }
    }

    /// Serves waiting takes, oldest first, while enough gradients are in.
    fn flush(&self, st: &mut State) -> Vec<(TakeAttempt, Result<Tensor>)> {
        let mut out = Vec::new();
        while st.takers.front().is_some_and(|a| st.counter >= a.num_required) {
            let a = st.takers.pop_front().expect("front exists");
            if a.peek {
                let n = Tensor::scalar(st.counter.min(i32::MAX as usize) as i32);
                out.push((a, Ok(n)));
                continue;
            }
            let r = self.reduce(st);
            st.last_take = r.as_ref().ok().cloned();
            st.global_step += 1;
            st.counter = 0;
            st.sum.clear();
            st.sum_shape = None;
            out.push((a, r));
        }
        self.invariants(st);
        out
    }

    fn reduce(&self, st: &mut State) -> Result<Tensor> {
        let shape = st.sum_shape.unwrap_or_default();
        let div = match self.reduction {
            Reduction::Mean => st.counter.max(1) as f64,
            Reduction::Sum => 1.0,
        };
        // Straight into the tensor's buffer: the last take's when nobody reads it any more, else a
        // fresh one; no intermediate vector to allocate, fault in and copy.
        let mut t = match st.last_take.take() {
            Some(t) if !t.is_shared() && t.shape() == &shape => t,
            _ => Tensor::try_zeros(self.dtype, shape)?,
        };
        if t.num_elements() != st.sum.len() {
            return Err(Error::internal(format!(
                "accumulator '{}' sums {} elements for shape {shape}",
                self.name,
                st.sum.len()
            )));
        }
        dispatch_float!(self.dtype, T => {
            for (o, s) in t.as_mut_slice::<T>()?.iter_mut().zip(&st.sum) {
                *o = T::from_f64(s / div);
            }
            Ok(t)
        }, _ => Err(Error::internal(format!("accumulator '{}' has dtype {}", self.name, self.dtype))))
    }

    /// What holds whenever the lock is released after a flush.
    fn invariants(&self, st: &State) {
        // A take still waiting at the head lacks gradients.
        if let Some(a) = st.takers.front() {
            debug_assert!(st.counter < a.num_required);
        }
        // The sum exists exactly while gradients are counted.
        debug_assert_eq!(st.counter == 0, st.sum_shape.is_none());
    }

    /// Takes with a deadline (tests, tools): a timed-out take is withdrawn (`DeadlineExceeded`)
    /// and leaves the accumulator as it was.
    pub fn take_grad(self: &Arc<Self>, num_required: i64, timeout: Duration) -> Result<Tensor> {
        let cm = Arc::new(CancellationManager::new());
        let (tx, rx) = mpsc::sync_channel(1);
        self.take_grad_async(num_required, Some(&cm), Box::new(move |r| drop(tx.send(r))));
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => {
                cm.cancel(Error::deadline_exceeded(format!(
                    "TakeGrad on accumulator '{}' timed out after {} ms",
                    self.name,
                    timeout.as_millis()
                )));
                rx.recv_timeout(Duration::from_millis(CANCEL_REPORT_MS))
                    .unwrap_or_else(|_| Err(Error::internal("a cancelled take did not report back")))
            }
        }
    }
}

/// Completes served takes outside the lock (a completion may run another step's kernels).
fn complete(list: Vec<(TakeAttempt, Result<Tensor>)>) {
    for (a, r) in list {
        if let Some((cm, token)) = a.cancel {
            if let Some(t) = token.get() {
                cm.deregister(*t);
            }
        }
        (a.done)(r);
    }
}

// ---- ops ----

fn expect_handle(c: &InferCtx) -> Result<()> {
    if c.num_inputs() == 0 || c.dtype(0) != DType::Resource {
        return Err(Error::invalid_argument("input 0 must be an accumulator handle"));
    }
    Ok(())
}

pub(crate) fn infer_accumulator(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(0)?;
    let d = c.attrs.dtype("dtype")?;
    if !d.is_float() {
        return Err(Error::invalid_argument(format!("dtype must be a floating-point type, not {d}")));
    }
    Reduction::parse(c.attrs.str_or("reduction_type", "MEAN"))?;
    Ok(vec![TensorInfo::new(DType::Resource, PartialShape::scalar())])
}

pub(crate) fn infer_apply_gradient(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(3)?;
    expect_handle(c)?;
    c.expect_dtype(1, &[DType::I64])?;
    c.expect_dtype(2, &[c.attrs.dtype("dtype")?])?;
    Ok(vec![])
}

pub(crate) fn infer_take_gradient(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    expect_handle(c)?;
    c.expect_dtype(1, &[DType::I32])?;
    let shape = c.attrs.shape("shape").cloned().unwrap_or_default();
    Ok(vec![TensorInfo::new(c.attrs.dtype("dtype")?, shape)])
}

pub(crate) fn infer_await_gradients(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    expect_handle(c)?;
    c.expect_dtype(1, &[DType::I32])?;
    Ok(vec![TensorInfo::new(DType::I32, PartialShape::scalar())])
}

pub(crate) fn infer_num_accumulated(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    expect_handle(c)?;
    Ok(vec![TensorInfo::new(DType::I32, PartialShape::scalar())])
}

pub(crate) fn infer_cancel_awaits(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    expect_handle(c)?;
    Ok(vec![])
}

pub(crate) fn infer_set_global_step(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    expect_handle(c)?;
    c.expect_dtype(1, &[DType::I64])?;
    Ok(vec![])
}

/// The accumulator a handle names.
pub fn lookup_accumulator(mgr: &ResourceMgr, handle: &Tensor) -> Result<Arc<ConditionalAccumulator>> {
    let (c, n) = handle.as_resource_handle()?;
    mgr.lookup::<ConditionalAccumulator>(&c, &n)
}

struct AccumulatorHandleK {
    container: String,
    name: String,
    dtype: DType,
    shape: PartialShape,
    reduction: Reduction,
}

impl OpKernel for AccumulatorHandleK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let acc = ctx.resource_mgr().lookup_or_create(&self.container, &self.name, || {
            ConditionalAccumulator::new(&self.name, self.dtype, self.shape.clone(), self.reduction)
        })?;
        acc.check_matches(self.dtype, &self.shape)?;
        ctx.set_output(0, Tensor::resource_handle(&self.container, &self.name));
        Ok(())
    }
}

pub(crate) fn create_accumulator(init: &KernelInit<'_>) -> Result<Kernel> {
    let (container, name) = resource_name(init);
    let a = init.attrs();
    Ok(Kernel::cheap(AccumulatorHandleK {
        container,
        name,
        dtype: a.dtype("dtype")?,
        shape: a.shape("shape").cloned().unwrap_or_default(),
        reduction: Reduction::parse(a.str_or("reduction_type", "MEAN"))?,
    }))
}

struct ApplyGradientK;

impl OpKernel for ApplyGradientK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let acc = lookup_accumulator(ctx.resource_mgr(), ctx.input(0)?)?;
        let local_step = ctx.input(1)?.scalar_value::<i64>()?;
        acc.apply_grad(local_step, ctx.input(2)?)?;
        Ok(())
    }
}

pub(crate) fn create_apply_gradient(init: &KernelInit<'_>) -> Result<Kernel> {
    // Summing a large gradient is worth a hand-off to the pool; a small one is not.
    Ok(if init.inputs_small() { Kernel::cheap(ApplyGradientK) } else { Kernel::expensive(ApplyGradientK) })
}

/// `AccumulatorTakeGradient` (`peek` false) or `AccumulatorAwaitGradients` (`peek` true).
struct TakeGradientK {
    peek: bool,
}

impl AsyncOpKernel for TakeGradientK {
    fn compute_async(&self, ctx: AsyncKernelContext, done: AsyncDone) {
        let r = ctx.input(0).and_then(|h| lookup_accumulator(ctx.resource_mgr(), h)).and_then(|acc| {
            let n = ctx.input(1)?.scalar_value::<i32>()?;
            Ok((acc, n))
        });
        let (acc, n) = match r {
            Ok(x) => x,
            Err(e) => return done(Err(ctx.error(e))),
        };
        let cm = ctx.step.cancellation.clone();
        let node = ctx.node.clone();
        acc.wait_async(
            i64::from(n),
            self.peek,
            Some(&cm),
            Box::new(move |r| {
                done(r.map(|t| vec![Value::Tensor(t)]).map_err(|e| rill_graph::kernel::node_error(&node, e)))
            }),
        );
    }
}

pub(crate) fn create_take_gradient(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::asynchronous(TakeGradientK { peek: false }))
}

pub(crate) fn create_await_gradients(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::asynchronous(TakeGradientK { peek: true }))
}

struct NumAccumulatedK;

impl OpKernel for NumAccumulatedK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let n = lookup_accumulator(ctx.resource_mgr(), ctx.input(0)?)?.num_accumulated();
        ctx.set_output(0, Tensor::scalar(n.min(i32::MAX as usize) as i32));
        Ok(())
    }
}

pub(crate) fn create_num_accumulated(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(NumAccumulatedK))
}

struct CancelAwaitsK;

impl OpKernel for CancelAwaitsK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        lookup_accumulator(ctx.resource_mgr(), ctx.input(0)?)?.cancel_awaits();
        Ok(())
    }
}

pub(crate) fn create_cancel_awaits(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(CancelAwaitsK))
}

struct SetGlobalStepK;

impl OpKernel for SetGlobalStepK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let acc = lookup_accumulator(ctx.resource_mgr(), ctx.input(0)?)?;
        acc.set_global_step(ctx.input(1)?.scalar_value::<i64>()?);
        Ok(())
    }
}

pub(crate) fn create_set_global_step(_: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::cheap(SetGlobalStepK))
}

// ---- builders ----

/// `tf.ConditionalAccumulator(dtype, shape, shared_name)`: the handle of an accumulator that
/// averages gradients. An empty `shared_name` shares it under the node's name.
pub fn conditional_accumulator(g: &Graph, dtype: DType, shape: PartialShape, shared_name: &str) -> Output {
    conditional_accumulator_with(g, dtype, shape, shared_name, Reduction::Mean)
}

/// `conditional_accumulator` with a chosen reduction.
pub fn conditional_accumulator_with(
    g: &Graph,
    dtype: DType,
    shape: PartialShape,
    shared_name: &str,
    reduction: Reduction,
) -> Output {
    let mut a = attrs! { "dtype" => dtype, "shape" => shape, "reduction_type" => reduction.name() };
    if !shared_name.is_empty() {
        a.insert("shared_name".into(), shared_name.into());
    }
    g.op(op_def("ConditionalAccumulator"), "conditional_accumulator", &[], a)
}

/// The dtype and shape an accumulator handle op declares.
fn accumulator_signature(g: &Graph, acc: Output) -> (DType, PartialShape) {
    let n = g.node(acc.node);
    (n.attrs.dtype("dtype").unwrap_or(DType::F32), n.attrs.shape("shape").cloned().unwrap_or_default())
}

/// Applies `grad` computed at `local_step` (an int64 scalar); dropped when stale. Colocated with
/// the accumulator, like every op on it.
pub fn accumulator_apply_gradient(g: &Graph, acc: Output, local_step: Output, grad: Output) -> Output {
    let (dtype, _) = accumulator_signature(g, acc);
    let id = g.colocate_with(acc, |g| {
        g.add_node(
            op_def("AccumulatorApplyGradient"),
            "",
            &[acc, local_step, grad],
            attrs! { "dtype" => dtype },
        )
    });
    Output::new(id, 0)
}

/// Waits for `num_required` gradients and returns their mean (asynchronous: never holds a thread).
pub fn accumulator_take_gradient(g: &Graph, acc: Output, num_required: usize) -> Output {
    let n = g.colocate_with(acc, |g| g.scalar(num_required.min(i32::MAX as usize) as i32));
    accumulator_take_gradient_dynamic(g, acc, n)
}

/// `accumulator_take_gradient` with the count from an int32 scalar tensor.
pub fn accumulator_take_gradient_dynamic(g: &Graph, acc: Output, num_required: Output) -> Output {
    let (dtype, shape) = accumulator_signature(g, acc);
    g.colocate_with(acc, |g| {
        g.op(
            op_def("AccumulatorTakeGradient"),
            "",
            &[acc, num_required],
            attrs! { "dtype" => dtype, "shape" => shape },
        )
    })
}

/// Waits (asynchronously) until `num_required` gradients are in and returns their count (int32
/// scalar), taking nothing.
pub fn accumulator_await_gradients(g: &Graph, acc: Output, num_required: usize) -> Output {
    g.colocate_with(acc, |g| {
        let n = g.scalar(num_required.min(i32::MAX as usize) as i32);
        g.op(op_def("AccumulatorAwaitGradients"), "", &[acc, n], attrs! {})
    })
}

/// Fails the awaits waiting on `acc` with `Cancelled` (`ConditionalAccumulator::cancel_awaits`).
pub fn accumulator_cancel_awaits(g: &Graph, acc: Output) -> Output {
    let id = g.colocate_with(acc, |g| g.add_node(op_def("AccumulatorCancelAwaits"), "", &[acc], attrs! {}));
    Output::new(id, 0)
}

/// The number of gradients accumulated since the last take (int32 scalar).
pub fn accumulator_num_accumulated(g: &Graph, acc: Output) -> Output {
    g.colocate_with(acc, |g| g.op(op_def("AccumulatorNumAccumulated"), "", &[acc], attrs! {}))
}

/// Sets the accumulator's global step from an int64 scalar.
pub fn accumulator_set_global_step(g: &Graph, acc: Output, new_global_step: Output) -> Output {
    let id = g.colocate_with(acc, |g| {
        g.add_node(op_def("AccumulatorSetGlobalStep"), "", &[acc, new_global_step], attrs! {})
    });
    Output::new(id, 0)
}
