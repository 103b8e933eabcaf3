//! The executor: runs one partition's nodes in dependency order. Pending counts per node, cheap
//! kernels inline on the current thread, expensive ones on the device's inter-op pool, async
//! kernels through continuations; the first error aborts the step. On an I/O thread (an event
//! loop, see [`mark_io_thread`]) only nodes that cannot hold it up run inline.

use crate::kernel::{node_error, AsyncKernelContext, Kernel, NodeInfo, OpKernelContext, StepContext, Value};
use crate::trace::{NodeExecStats, StepStatsCollector};
use crate::{Error, GraphDef, KernelRegistry, OpRegistry, Result, TensorInfo};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

thread_local! {
    static IO_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// On an I/O thread a cheap node runs inline only while its inputs total at most this many bytes:
/// a step continued where its tensor arrived skips a hand-off to the pool (a wake-up costs more
/// than a small kernel), and a large one never delays the loop's other connections.
pub const IO_INLINE_BYTES_MAX: usize = 64 << 10;

/// Marks the calling thread as an I/O thread: steps continued or started on it run inline only
/// small cheap nodes and asynchronous kernels that start without blocking; the rest go to the
/// device's pool. Event loops call it once, on their own thread.
pub fn mark_io_thread() {
    IO_THREAD.with(|c| c.set(true));
}

/// Whether the calling thread was marked with [`mark_io_thread`].
pub fn on_io_thread() -> bool {
    IO_THREAD.with(|c| c.get())
}

use crate::device::Device;

#[derive(Clone, Copy)]
struct InputSrc {
    slot: u32,
    by_ref: bool,
}

struct Item {
    info: Arc<NodeInfo>,
    kernel: Kernel,
    inputs: Vec<InputSrc>,
    /// The slots of `inputs`, for kernels that read them in place.
    input_slots: Vec<u32>,
    /// Some input reads a variable reference as a value (it must be read into a tensor first).
    reads_refs: bool,
    out_base: u32,
    num_outputs: u32,
    /// Successors, one entry per edge (data or control), matching their pending counts.
    out_edges: Vec<u32>,
    inline: bool,
}

/// An executor for one partition graph on one device; built once, run for many steps.
pub struct Executor {
    items: Vec<Item>,
    num_slots: usize,
    roots: Vec<u32>,
    pending_init: Vec<u32>,
    device: Arc<dyn Device>,
    /// When every kernel is cheap and synchronous, the nodes in dependency order: such a step
    /// runs as a straight line on the calling thread, with no counters and no hand-offs.
    straight: Option<Vec<u32>>,
    /// The device computes in host memory: only then may an I/O thread run its nodes (a copy to
    /// or from device memory may wait for the device).
    host: bool,
    /// Slot buffers of finished straight-line steps, reused so a step allocates nothing.
    spare_slots: Mutex<Vec<Vec<Option<Value>>>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Executor({} nodes on {})", self.items.len(), self.device.name())
    }
}

/// Slot buffers kept per executor for reuse: one per step that may run at the same time.
const SPARE_SLOT_BUFFERS_MAX: usize = 4;

/// Completion of a step's partition.
pub type ExecutorDone = Box<dyn FnOnce(Result<()>) + Send>;

impl Executor {
    /// Builds an executor: validates the graph, fuses what the device has fused kernels for
    /// (`fuse`), instantiates each node's kernel on `device`.
    pub fn new(
        graph: &GraphDef,
        ops: &OpRegistry,
        kernels: &KernelRegistry,
        device: Arc<dyn Device>,
    ) -> Result<Executor> {
        graph.validate()?;
        let fused = crate::fuse::fuse_matmul_chains(graph, kernels, device.device_type());
        let graph = fused.as_ref().unwrap_or(graph);
        let n = graph.nodes.len();
        let mut slot_base = Vec::with_capacity(n);
        let mut num_slots = 0u32;
        for node in &graph.nodes {
            slot_base.push(num_slots);
            num_slots += node.outputs.len() as u32;
        }
        let mut out_edges: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut pending_init = vec![0u32; n];
        for (i, node) in graph.nodes.iter().enumerate() {
            for inp in &node.inputs {
                out_edges[inp.node.0 as usize].push(i as u32);
                pending_init[i] += 1;
            }
            for c in &node.control_inputs {
                out_edges[c.0 as usize].push(i as u32);
                pending_init[i] += 1;
            }
        }
        let mut items = Vec::with_capacity(n);
        for (i, node) in graph.nodes.iter().enumerate() {
            let op = ops.get(&node.op).map_err(|e| e.context(format!("node '{}'", node.name)))?;
            let input_types: Vec<TensorInfo> =
                node.inputs.iter().map(|o| graph.node(o.node).outputs[o.index as usize].clone()).collect();
            let inputs: Vec<InputSrc> = node
                .inputs
                .iter()
                .enumerate()
                .map(|(k, o)| InputSrc {
                    slot: slot_base[o.node.0 as usize] + o.index,
                    by_ref: op.is_ref_input(k),
                })
                .collect();
            let input_slots = inputs.iter().map(|s| s.slot).collect();
            let reads_refs = node
                .inputs
                .iter()
                .zip(&inputs)
                .any(|(o, s)| !s.by_ref && graph.node(o.node).outputs[o.index as usize].is_ref);
            let kernel = kernels.create(node, &input_types, &device)?;
            let inline = match &kernel {
                Kernel::Sync { expensive, .. } => !expensive,
                Kernel::Async(_) => true,
            };
            items.push(Item {
                info: Arc::new(NodeInfo {
                    name: node.name.clone(),
                    op: node.op.clone(),
                    input_types,
                    output_types: node.outputs.clone(),
                }),
                kernel,
                inputs,
                input_slots,
                reads_refs,
                out_base: slot_base[i],
                num_outputs: node.outputs.len() as u32,
                out_edges: std::mem::take(&mut out_edges[i]),
                inline,
            });
        }
        let roots: Vec<u32> = (0..n as u32).filter(|&i| pending_init[i as usize] == 0).collect();
        let straight = items
            .iter()
            .all(|it| matches!(it.kernel, Kernel::Sync { expensive: false, .. }))
            .then(|| topological_order(&items, &roots, &pending_init));
        let host = device.device_type() == "CPU";
        Ok(Executor {
            items,
            num_slots: num_slots as usize,
            roots,
            pending_init,
            device,
            straight,
            host,
            spare_slots: Mutex::new(Vec::new()),
        })
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    pub fn num_nodes(&self) -> usize {
        self.items.len()
    }

    /// Runs one step. The calling thread runs the cheap root nodes inline and hands expensive
    /// ones to the pool; `done` is called exactly once, on whichever thread finishes last.
    pub fn run_async(
        self: &Arc<Self>,
        step: Arc<StepContext>,
        stats: Option<Arc<StepStatsCollector>>,
        done: ExecutorDone,
    ) {
        if self.items.is_empty() {
            done(Ok(()));
            return;
        }
        let io = on_io_thread();
        if let (Some(order), false) = (&self.straight, io) {
            let r = self.run_straight(order, &step, stats.as_deref());
            if let Err(e) = &r {
                // As a failing node of a scheduled step does: the step's other partitions may
                // wait on this one's sends.
                step.rendezvous.start_abort(e.clone());
                step.cancellation.cancel(e.clone());
            }
            done(r);
            return;
        }
        let state = Arc::new(State {
            exec: self.clone(),
            step,
            entries: (0..self.num_slots).map(|_| OnceLock::new()).collect(),
            pending: self.pending_init.iter().map(|&p| AtomicU32::new(p)).collect(),
            outstanding: AtomicUsize::new(self.roots.len()),
            aborted: AtomicBool::new(false),
            status: Mutex::new(None),
            done: Mutex::new(Some(done)),
            stats,
        });
        let mut stack = Vec::new();
        for &r in &self.roots {
            if state.runs_here(r, io) {
                stack.push(r);
            } else {
                state.schedule(r);
            }
        }
        state.run_loop(stack, false);
    }
}

/// Kahn's order of the nodes (every node after its inputs and control inputs).
fn topological_order(items: &[Item], roots: &[u32], pending_init: &[u32]) -> Vec<u32> {
    let mut pending = pending_init.to_vec();
    let mut order = Vec::with_capacity(items.len());
    let mut stack: Vec<u32> = roots.iter().rev().copied().collect();
    while let Some(n) = stack.pop() {
        order.push(n);
        for &d in items[n as usize].out_edges.iter().rev() {
            pending[d as usize] -= 1;
            if pending[d as usize] == 0 {
                stack.push(d);
            }
        }
    }
    order
}

impl Executor {
    /// Runs an all-cheap partition in dependency order on the calling thread.
    fn run_straight(
        &self,
        order: &[u32],
        step: &Arc<StepContext>,
        stats: Option<&StepStatsCollector>,
    ) -> Result<()> {
        let spare = self.spare_slots.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut vals = spare.unwrap_or_else(|| vec![None; self.num_slots]);
        let r = self.straight_steps(order, step, stats, &mut vals);
        vals.iter_mut().for_each(|v| *v = None);
        let mut spare = self.spare_slots.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_SLOT_BUFFERS_MAX {
            spare.push(vals);
        }
        r
    }

    fn straight_steps(
        &self,
        order: &[u32],
        step: &Arc<StepContext>,
        stats: Option<&StepStatsCollector>,
        vals: &mut [Option<Value>],
    ) -> Result<()> {
        let mut inputs: Vec<Value> = Vec::new();
        let mut outputs: Vec<Option<Value>> = Vec::new();
        for &n in order {
            let item = &self.items[n as usize];
            let Kernel::Sync { kernel, .. } = &item.kernel else {
                return Err(node_error(
                    &item.info,
                    Error::internal("asynchronous kernel in a straight-line step"),
                ));
            };
            let start = stats.map(|_| Instant::now());
            let r = if item.reads_refs {
                inputs.clear();
                for src in &item.inputs {
                    let v = vals[src.slot as usize].as_ref().ok_or_else(|| {
                        node_error(&item.info, Error::internal("an input was not produced"))
                    })?;
                    inputs.push(match (v, src.by_ref) {
                        (Value::Ref(var), false) => {
                            Value::Tensor(var.read().map_err(|e| node_error(&item.info, e))?)
                        }
                        (v, _) => v.clone(),
                    });
                }
                let mut ctx = OpKernelContext::new(&item.info, step, &inputs, &mut outputs);
                flatten_panic(catch_unwind(AssertUnwindSafe(|| kernel.compute(&mut ctx))))
            } else {
                let mut ctx =
                    OpKernelContext::over_slots(&item.info, step, vals, &item.input_slots, &mut outputs);
                flatten_panic(catch_unwind(AssertUnwindSafe(|| kernel.compute(&mut ctx))))
            };
            if let (Some(st), Some(start)) = (stats, start) {
                st.record(NodeExecStats::new(&item.info, start, Instant::now()));
            }
            r.map_err(|e| node_error(&item.info, e))?;
            if outputs.len() != item.num_outputs as usize {
                return Err(node_error(
                    &item.info,
                    Error::internal("kernel produced the wrong number of outputs"),
                ));
            }
            for (i, o) in outputs.iter_mut().enumerate() {
                let v = o.take().ok_or_else(|| {
                    node_error(&item.info, Error::internal(format!("kernel did not set output {i}")))
                })?;
                vals[item.out_base as usize + i] = Some(v);
            }
        }
        Ok(())
    }
}

struct State {
    exec: Arc<Executor>,
    step: Arc<StepContext>,
    entries: Vec<OnceLock<Value>>,
    pending: Vec<AtomicU32>,
    outstanding: AtomicUsize,
    aborted: AtomicBool,
    status: Mutex<Option<Error>>,
    done: Mutex<Option<ExecutorDone>>,
    stats: Option<Arc<StepStatsCollector>>,
}

/// Shared between an async kernel's caller and its completion, to tell whether `done` ran
/// before `compute_async` returned (then the caller continues inline, keeping the stack flat).
struct AsyncCall {
    returned: bool,
    early: Option<Result<Vec<Value>>>,
}

impl State {
    /// Whether ready node `n` runs on this thread: cheap ones do, except that an I/O thread
    /// leaves large inputs, asynchronous kernels that may block and devices other than the
    /// host's to the pool.
    fn runs_here(&self, n: u32, io: bool) -> bool {
        let item = &self.exec.items[n as usize];
        if !item.inline || !io {
            return item.inline;
        }
        if !self.exec.host {
            return false;
        }
        match &item.kernel {
            Kernel::Async(k) => k.starts_without_blocking(),
            Kernel::Sync { .. } => {
                let mut bytes = 0;
                for src in &item.inputs {
                    bytes += match self.entries[src.slot as usize].get() {
                        Some(Value::Tensor(t)) => t.byte_size(),
                        Some(Value::Ref(v)) => v.byte_size(),
                        None => 0,
                    };
                    if bytes > IO_INLINE_BYTES_MAX {
                        return false;
                    }
                }
                true
            }
        }
    }

    fn schedule(self: &Arc<Self>, n: u32) {
        let s = self.clone();
        self.exec.device.schedule(Box::new(move || s.run_loop(vec![n], true)));
    }

    fn fail(&self, e: Error) {
        {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            if st.is_none() {
                *st = Some(e.clone());
            }
        }
        if !self.aborted.swap(true, Ordering::AcqRel) {
            self.step.rendezvous.start_abort(e.clone());
            self.step.cancellation.cancel(e);
        }
    }

    fn gather(&self, item: &Item, inputs: &mut Vec<Value>) -> Result<()> {
        inputs.clear();
        for src in &item.inputs {
            let v = self.entries[src.slot as usize]
                .get()
                .ok_or_else(|| Error::internal("an input was not produced"))?;
            match (v, src.by_ref) {
                (Value::Ref(var), false) => inputs.push(Value::Tensor(var.read()?)),
                (Value::Tensor(_), true) => {
                    return Err(Error::internal("a reference input received a value"))
                }
                (v, _) => inputs.push(v.clone()),
            }
        }
        Ok(())
    }

    /// Runs ready nodes until none is left for this thread. `on_pool` threads may run one
    /// expensive successor inline instead of handing it off.
    fn run_loop(self: &Arc<Self>, mut stack: Vec<u32>, on_pool: bool) {
        let io = on_io_thread();
        let on_pool = on_pool && !io;
        let mut inputs: Vec<Value> = Vec::new();
        let mut outputs: Vec<Option<Value>> = Vec::new();
        let mut expensive: Vec<u32> = Vec::new();
        while let Some(n) = stack.pop().or_else(|| if on_pool { expensive.pop() } else { None }) {
            for e in expensive.drain(..) {
                self.schedule(e);
            }
            let item = &self.exec.items[n as usize];
            if self.aborted.load(Ordering::Acquire) {
                self.finish_node(0);
                continue;
            }
            if let Err(e) = self.gather(item, &mut inputs) {
                self.fail(node_error(&item.info, e));
                self.finish_node(0);
                continue;
            }
            let start = self.stats.as_ref().map(|_| Instant::now());
            match &item.kernel {
                Kernel::Sync { kernel, .. } => {
                    let r = {
                        let mut ctx = OpKernelContext::new(&item.info, &self.step, &inputs, &mut outputs);
                        catch_unwind(AssertUnwindSafe(|| kernel.compute(&mut ctx)))
                    };
                    if let (Some(stats), Some(start)) = (&self.stats, start) {
                        stats.record(NodeExecStats::new(&item.info, start, Instant::now()));
                    }
                    let r = flatten_panic(r);
                    let ready = match r {
                        Ok(()) => self.propagate(item, &mut outputs, &mut stack, &mut expensive, io),
                        Err(e) => {
                            self.fail(node_error(&item.info, e));
                            0
                        }
                    };
                    self.finish_node(ready);
                }
                Kernel::Async(kernel) => {
                    let call = Arc::new(Mutex::new(AsyncCall { returned: false, early: None }));
                    let ctx = AsyncKernelContext {
                        node: item.info.clone(),
                        step: self.step.clone(),
                        inputs: std::mem::take(&mut inputs),
                    };
                    let (s, c) = (self.clone(), call.clone());
                    let done: crate::AsyncDone = Box::new(move |res| {
                        let mut g = c.lock().unwrap_or_else(|p| p.into_inner());
                        if !g.returned {
                            g.early = Some(res);
                            return;
                        }
                        drop(g);
                        if let (Some(stats), Some(start)) = (&s.stats, start) {
                            stats.record(NodeExecStats::new(
                                &s.exec.items[n as usize].info,
                                start,
                                Instant::now(),
                            ));
                        }
                        s.async_done(n, res);
                    });
                    let r = catch_unwind(AssertUnwindSafe(|| kernel.compute_async(ctx, done)));
                    let early = {
                        let mut g = call.lock().unwrap_or_else(|p| p.into_inner());
                        g.returned = true;
                        g.early.take()
                    };
                    if let Err(p) = r {
                        // The kernel panicked before or after calling `done`; either way the node ends here.
                        self.fail(node_error(&item.info, panic_error(p)));
                        self.finish_node(0);
                        continue;
                    }
                    if let Some(res) = early {
                        if let (Some(stats), Some(start)) = (&self.stats, start) {
                            stats.record(NodeExecStats::new(&item.info, start, Instant::now()));
                        }
                        let ready = match res {
                            Ok(vals) => {
                                outputs.clear();
                                outputs.extend(vals.into_iter().map(Some));
                                self.propagate(item, &mut outputs, &mut stack, &mut expensive, io)
                            }
                            Err(e) => {
                                self.fail(node_error(&item.info, e));
                                0
                            }
                        };
                        self.finish_node(ready);
                    }
                }
            }
        }
        for e in expensive {
            self.schedule(e);
        }
    }

    fn async_done(self: &Arc<Self>, n: u32, res: Result<Vec<Value>>) {
        let item = &self.exec.items[n as usize];
        let mut stack = Vec::new();
        let mut expensive = Vec::new();
        let io = on_io_thread();
        let ready = match res {
            Ok(vals) => {
                let mut outputs: Vec<Option<Value>> = vals.into_iter().map(Some).collect();
                self.propagate(item, &mut outputs, &mut stack, &mut expensive, io)
            }
            Err(e) => {
                self.fail(node_error(&item.info, e));
                0
            }
        };
        self.finish_node(ready);
        for e in expensive.drain(..) {
            self.schedule(e);
        }
        if !stack.is_empty() {
            self.run_loop(stack, true);
        }
    }

    /// Stores a node's outputs and collects successors that became ready; returns their count.
    fn propagate(
        &self,
        item: &Item,
        outputs: &mut [Option<Value>],
        stack: &mut Vec<u32>,
        expensive: &mut Vec<u32>,
        io: bool,
    ) -> usize {
        if outputs.len() != item.num_outputs as usize {
            self.fail(node_error(&item.info, Error::internal("kernel produced the wrong number of outputs")));
            return 0;
        }
        for (i, o) in outputs.iter_mut().enumerate() {
            match o.take() {
                Some(v) => {
                    let _ = self.entries[item.out_base as usize + i].set(v);
                }
                None => {
                    self.fail(node_error(
                        &item.info,
                        Error::internal(format!("kernel did not set output {i}")),
                    ));
                    return 0;
                }
            }
        }
        let mut ready = 0;
        for &dst in &item.out_edges {
            if self.pending[dst as usize].fetch_sub(1, Ordering::AcqRel) == 1 {
                ready += 1;
                if self.runs_here(dst, io) {
                    stack.push(dst);
                } else {
                    expensive.push(dst);
                }
            }
        }
        ready
    }

    /// Accounts one finished node that made `ready` successors ready; the last one ends the step.
    fn finish_node(&self, ready: usize) {
        if ready > 1 {
            self.outstanding.fetch_add(ready - 1, Ordering::AcqRel);
        } else if ready == 0 && self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            let status = self.status.lock().unwrap_or_else(|p| p.into_inner()).take();
            let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(done) = done {
                done(match status {
                    Some(e) => Err(e),
                    None => Ok(()),
                });
            }
        }
    }
}

fn panic_error(p: Box<dyn std::any::Any + Send>) -> Error {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    Error::internal(format!("kernel panicked: {msg}"))
}

fn flatten_panic(r: std::thread::Result<Result<()>>) -> Result<()> {
    match r {
        Ok(r) => r,
        Err(p) => Err(panic_error(p)),
    }
}
