//! Sessions: the `Session` trait, its options, the `Runtime` a program assembles (op and kernel
//! registries, device factories), and `DirectSession`, which runs a graph in this process.

use crate::device::{Device, DeviceAttributes, DeviceFactory};
use crate::executor::Executor;
use crate::kernel::{CallFrame, StepContext, StepId};
use crate::partition::{partition, prune_and_rewrite, PartitionOptions};
use crate::placer::{group_support, place, Placement, PlacerOptions};
use crate::trace::{StepStats, StepStatsCollector};
use crate::{
    CancellationManager, DeviceName, Error, Graph, GraphDef, KernelRegistry, LocalRendezvous, NodeId,
    OpRegistry, Output, Rendezvous, Result, Tensor, TensorInfo,
};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// GPU options, as in TensorFlow's `GPUOptions`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GpuOptions {
    /// Comma-separated visible GPU ids, remapped to `GPU:0..` in this order (`"1,0"`).
    pub visible_device_list: String,
    /// Fraction of each GPU's memory reserved up front (0 = decide by `allow_growth`).
    pub per_process_gpu_memory_fraction: f64,
    /// Start small and grow the reservation on demand.
    pub allow_growth: bool,
}

/// Options of a session (TensorFlow's `ConfigProto`); `Default` gives TensorFlow's defaults.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionOptions {
    /// Threads of the inter-op pool; 0 = number of cores.
    pub inter_op_parallelism_threads: usize,
    /// Threads for parallelism inside one kernel; 0 = number of cores.
    pub intra_op_parallelism_threads: usize,
    /// Maximum devices of each type (`{"CPU": 4}` gives CPU:0..3, `{"GPU": 0}` hides GPUs).
    pub device_count: BTreeMap<String, usize>,
    pub allow_soft_placement: bool,
    pub log_device_placement: bool,
    /// Deadline of every step that sets no `RunOptions.timeout_in_ms`; 0 = none.
    pub operation_timeout_in_ms: u64,
    /// Only devices matching one of these (partial names) are used; empty = all.
    pub device_filters: Vec<String>,
    pub gpu_options: GpuOptions,
    /// Send f32 tensors between tasks as this half type (F16/BF16) and cast back.
    pub cross_task_cast: Option<crate::DType>,
}

impl SessionOptions {
    /// Number of cores of this machine (for the 0 = all-cores options).
    pub fn num_cores() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    pub fn inter_op_threads(&self) -> usize {
        if self.inter_op_parallelism_threads == 0 {
            Self::num_cores()
        } else {
            self.inter_op_parallelism_threads
        }
    }

    pub fn intra_op_threads(&self) -> usize {
        if self.intra_op_parallelism_threads == 0 {
            Self::num_cores()
        } else {
            self.intra_op_parallelism_threads
        }
    }

    /// Whether a device passes `device_filters`.
    pub fn device_passes_filters(&self, name: &DeviceName) -> bool {
        self.device_filters.is_empty()
            || self.device_filters.iter().any(|f| DeviceName::parse(f).is_ok_and(|f| f.matches(name)))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TraceLevel {
    #[default]
    NoTrace,
    /// Per-node step stats in `RunMetadata`.
    FullTrace,
}

/// Options of one `run` (TensorFlow's `RunOptions`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunOptions {
    /// Deadline of this step; 0 = the session's `operation_timeout_in_ms`.
    pub timeout_in_ms: u64,
    pub trace_level: TraceLevel,
    pub output_partition_graphs: bool,
}

/// What a `run` reports besides its fetches.
#[derive(Clone, Debug, Default)]
pub struct RunMetadata {
    pub step_stats: StepStats,
    pub partition_graphs: Vec<GraphDef>,
}

impl RunMetadata {
    pub fn write_chrome_trace(&self, path: &std::path::Path) -> Result<()> {
        self.step_stats.write_chrome_trace(path)
    }
}

/// A session: runs fetches and targets of a graph with feeds.
pub trait Session: Send + Sync {
    /// Runs one step. `targets` are run for their effects; their index is ignored.
    fn run_with_metadata(
        &self,
        feeds: &[(Output, Tensor)],
        fetches: &[Output],
        targets: &[Output],
        opts: &RunOptions,
        metadata: Option<&mut RunMetadata>,
    ) -> Result<Vec<Tensor>>;

    fn run(
        &self,
        feeds: &[(Output, Tensor)],
        fetches: &[Output],
        targets: &[Output],
        opts: &RunOptions,
    ) -> Result<Vec<Tensor>> {
        self.run_with_metadata(feeds, fetches, targets, opts, None)
    }

    /// Takes in nodes added to the graph since the session was created or last extended.
    fn extend(&self, graph: &Graph) -> Result<()>;

    fn list_devices(&self) -> Result<Vec<DeviceAttributes>>;

    fn close(&self) -> Result<()>;
}

/// Ops, kernels and device factories of a program, assembled explicitly in `main`.
#[derive(Clone)]
pub struct Runtime {
    pub ops: OpRegistry,
    pub kernels: KernelRegistry,
    pub device_factories: Vec<Arc<dyn DeviceFactory>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Runtime({:?}, {:?}, {} device factories)",
            self.ops,
            self.kernels,
            self.device_factories.len()
        )
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime::new()
    }
}

impl Runtime {
    /// A runtime with the graph crate's ops and system kernels and no devices yet.
    pub fn new() -> Runtime {
        let mut ops = OpRegistry::new();
        ops.add(crate::ops::OPS);
        let mut kernels = KernelRegistry::new();
        kernels.add(crate::kernels::KERNELS);
        Runtime { ops, kernels, device_factories: Vec::new() }
    }

    pub fn with_ops(mut self, t: &'static [crate::OpDef]) -> Self {
        self.ops.add(t);
        self
    }

    pub fn with_kernels(mut self, t: &'static [crate::KernelDef]) -> Self {
        self.kernels.add(t);
        self
    }

    pub fn with_device_factory(mut self, f: Arc<dyn DeviceFactory>) -> Self {
        self.device_factories.push(f);
        self
    }

    /// Creates the devices of every factory for `task`; a factory without hardware is skipped.
    pub fn create_devices(&self, opts: &SessionOptions, task: &DeviceName) -> Result<Vec<Arc<dyn Device>>> {
        let mut out = Vec::new();
        for f in &self.device_factories {
            if opts.device_count.get(f.device_type()) == Some(&0) {
                continue;
            }
            match f.create_devices(opts, task) {
                Ok(d) => out.extend(d),
                Err(e) if e.code == crate::Code::Unavailable => {}
                Err(e) => return Err(e),
            }
        }
        if out.is_empty() {
            return Err(Error::failed_precondition("the runtime has no devices; add a device factory"));
        }
        Ok(out)
    }
}

/// Waits for the partitions of one step; the first error wins.
pub struct StepWaiter {
    state: Mutex<(usize, Option<Error>)>,
    cv: Condvar,
}

impl fmt::Debug for StepWaiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StepWaiter")
    }
}

/// How long a cancelled step may take to wind down before `run` returns without it.
pub const CANCEL_GRACE: Duration = Duration::from_secs(10);

impl StepWaiter {
    pub fn new(parts: usize) -> Arc<StepWaiter> {
        Arc::new(StepWaiter { state: Mutex::new((parts, None)), cv: Condvar::new() })
    }

    pub fn part_done(&self, r: Result<()>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = r {
            if st.1.is_none()
                || st
                    .1
                    .as_ref()
                    .is_some_and(|p| p.code == crate::Code::Cancelled && e.code != crate::Code::Cancelled)
            {
                st.1 = Some(e);
            }
        }
        st.0 = st.0.saturating_sub(1);
        if st.0 == 0 {
            self.cv.notify_all();
        }
    }

    /// Waits until every part is done or `deadline` passes; `None` on timeout.
    pub fn wait(&self, deadline: Option<Instant>) -> Option<Result<()>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.0 > 0 {
            match deadline {
                None => st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    st = self.cv.wait_timeout(st, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
        Some(match st.1.take() {
            Some(e) => Err(e),
            None => Ok(()),
        })
    }
}

/// Runs a step's executors and waits with a deadline; on timeout, cancels and returns
/// `DeadlineExceeded` naming `what` once the step has wound down (or the grace period passed).
pub fn run_partitions(
    parts: &[(Arc<Executor>, Arc<StepContext>, Option<Arc<StepStatsCollector>>)],
    cancellation: &CancellationManager,
    rendezvous: &dyn Rendezvous,
    deadline: Option<Instant>,
    timeout_ms: u64,
) -> Result<()> {
    let waiter = StepWaiter::new(parts.len());
    for (exec, step, stats) in parts {
        let w = waiter.clone();
        exec.run_async(step.clone(), stats.clone(), Box::new(move |r| w.part_done(r)));
    }
    match waiter.wait(deadline) {
        Some(r) => r,
        None => {
            let e = Error::deadline_exceeded(format!("step timed out after {timeout_ms} ms"));
            cancellation.cancel(e.clone());
            rendezvous.start_abort(e.clone());
            let _ = waiter.wait(Some(Instant::now() + CANCEL_GRACE));
            Err(e)
        }
    }
}

/// The deadline of a step from its options and the session's.
pub fn step_deadline(opts: &RunOptions, session_timeout_ms: u64) -> (Option<Instant>, u64) {
    let ms = if opts.timeout_in_ms > 0 { opts.timeout_in_ms } else { session_timeout_ms };
    ((ms > 0).then(|| Instant::now() + Duration::from_millis(ms)), ms)
}

/// Checks fed tensors against the graph's types.
pub fn check_feeds(
    feeds: &[(Output, Tensor)],
    types: &[TensorInfo],
    names: &dyn Fn(Output) -> String,
) -> Result<()> {
    for ((o, t), info) in feeds.iter().zip(types) {
        if t.dtype() != info.dtype {
            return Err(Error::invalid_argument(format!(
                "cannot feed a {} value to '{}', which has dtype {}",
                t.dtype(),
                names(*o),
                info.dtype
            )));
        }
        if !info.shape.is_compatible_with(t.shape()) {
            return Err(Error::invalid_argument(format!(
                "cannot feed a value of shape {} to '{}', which has shape {}",
                t.shape(),
                names(*o),
                info.shape
            )));
        }
    }
    Ok(())
}

type CacheKey = (Vec<Output>, Vec<Output>, Vec<NodeId>);

struct StepPlan {
    executors: Vec<(Arc<Executor>, String)>,
    feed_types: Vec<TensorInfo>,
    num_fetches: usize,
    partition_graphs: Vec<GraphDef>,
}

/// A session that runs the graph on this process's devices. It owns its devices and therefore
/// its resources: two `DirectSession`s share no variable.
pub struct DirectSession {
    runtime: Runtime,
    opts: SessionOptions,
    devices: Vec<Arc<dyn Device>>,
    attrs: Vec<DeviceAttributes>,
    graph: RwLock<GraphDef>,
    placement: Mutex<HashMap<String, DeviceName>>,
    cache: Mutex<HashMap<CacheKey, Arc<StepPlan>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for DirectSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirectSession({} devices)", self.devices.len())
    }
}

impl DirectSession {
    /// A session over `graph` on the devices the runtime's factories create for this process
    /// (`/job:localhost/replica:0/task:0`). A graph that failed to build is refused with its error.
    pub fn new(graph: &Graph, runtime: &Runtime, opts: SessionOptions) -> Result<DirectSession> {
        graph.status()?;
        let task = DeviceName {
            job: Some("localhost".into()),
            replica: Some(0),
            task: Some(0),
            ..Default::default()
        };
        let devices: Vec<Arc<dyn Device>> = runtime
            .create_devices(&opts, &task)?
            .into_iter()
            .filter(|d| opts.device_passes_filters(d.name()))
            .collect();
        DirectSession::with_devices(graph.to_graph_def(), runtime, opts, devices)
    }

    /// A session over given devices (servers and tests share devices this way).
    pub fn with_devices(
        graph: GraphDef,
        runtime: &Runtime,
        opts: SessionOptions,
        devices: Vec<Arc<dyn Device>>,
    ) -> Result<DirectSession> {
        if devices.is_empty() {
            return Err(Error::invalid_argument("a session needs at least one device"));
        }
        graph.validate()?;
        let attrs = devices.iter().map(|d| d.attributes().clone()).collect();
        Ok(DirectSession {
            runtime: runtime.clone(),
            opts,
            devices,
            attrs,
            graph: RwLock::new(graph),
            placement: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn devices(&self) -> &[Arc<dyn Device>] {
        &self.devices
    }

    /// The device placement of the graph's nodes for a step (without running it), with the
    /// reason per node.
    pub fn explain_placement(&self, fetches: &[Output], targets: &[Output]) -> Result<String> {
        let g = self.graph.read().unwrap_or_else(|e| e.into_inner());
        let tnodes: Vec<NodeId> = targets.iter().map(|t| t.node).collect();
        let sg = prune_and_rewrite(&g, &[], fetches, &tnodes, &self.client_device(), &self.runtime.ops)?;
        let p = self.place(&g, &sg.graph)?;
        Ok(p.explain(&sg.graph))
    }

    fn client_device(&self) -> DeviceName {
        self.attrs
            .iter()
            .find(|a| a.device_type == "CPU")
            .map(|a| a.name.clone())
            .unwrap_or_else(|| self.attrs[0].name.clone())
    }

    /// Places the step graph `g`, pruned from the session's whole graph `full`.
    fn place(&self, full: &GraphDef, g: &GraphDef) -> Result<Placement> {
        let prev = self.placement.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let popts = PlacerOptions {
            allow_soft_placement: self.opts.allow_soft_placement,
            log_device_placement: self.opts.log_device_placement,
            default_device: self.client_device().task_name(),
            group_support: Some(Arc::new(group_support(full, &self.runtime.ops, &self.runtime.kernels)?)),
        };
        place(g, &self.attrs, &self.runtime.ops, &self.runtime.kernels, &prev, &popts)
    }

    fn plan(&self, feeds: &[Output], fetches: &[Output], targets: &[NodeId]) -> Result<Arc<StepPlan>> {
        let key = (feeds.to_vec(), fetches.to_vec(), targets.to_vec());
        if let Some(p) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        let (sg, placement) = {
            let g = self.graph.read().unwrap_or_else(|e| e.into_inner());
            let sg =
                prune_and_rewrite(&g, feeds, fetches, targets, &self.client_device(), &self.runtime.ops)?;
            let placement = self.place(&g, &sg.graph)?;
            (sg, placement)
        };
        {
            // Rule 1 of the placer: what was placed once stays there for this session.
            let mut prev = self.placement.lock().unwrap_or_else(|e| e.into_inner());
            for (node, dev) in sg.graph.nodes.iter().zip(&placement.devices) {
                if sg.origin.iter().any(|o| o.is_some()) {
                    prev.entry(node.name.clone()).or_insert_with(|| dev.clone());
                }
            }
        }
        let inc =
            |d: &DeviceName| self.attrs.iter().find(|a| &a.name == d).map(|a| a.incarnation).unwrap_or(0);
        let parts = partition(
            &sg.graph,
            &placement.devices,
            &PartitionOptions { incarnation: &inc, cross_task_cast: None },
        )?;
        let mut executors = Vec::new();
        let mut partition_graphs = Vec::new();
        for (dev_name, g) in parts {
            let dev = self
                .devices
                .iter()
                .find(|d| d.name() == &dev_name)
                .ok_or_else(|| Error::internal(format!("placed on unknown device {dev_name}")))?;
            let exec = Executor::new(&g, &self.runtime.ops, &self.runtime.kernels, dev.clone())?;
            executors.push((Arc::new(exec), dev_name.to_string()));
            partition_graphs.push(g);
        }
        let plan = Arc::new(StepPlan {
            executors,
            feed_types: sg.feed_types,
            num_fetches: fetches.len(),
            partition_graphs,
        });
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, plan.clone());
        Ok(plan)
    }
}

impl Session for DirectSession {
    fn run_with_metadata(
        &self,
        feeds: &[(Output, Tensor)],
        fetches: &[Output],
        targets: &[Output],
        opts: &RunOptions,
        metadata: Option<&mut RunMetadata>,
    ) -> Result<Vec<Tensor>> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::cancelled("session has been closed"));
        }
        let feed_outs: Vec<Output> = feeds.iter().map(|f| f.0).collect();
        let tnodes: Vec<NodeId> = targets.iter().map(|t| t.node).collect();
        let plan = self.plan(&feed_outs, fetches, &tnodes)?;
        check_feeds(feeds, &plan.feed_types, &|o| {
            let g = self.graph.read().unwrap_or_else(|e| e.into_inner());
            format!("{}:{}", g.node(o.node).name, o.index)
        })?;
        let frame =
            Arc::new(CallFrame::new(feeds.iter().map(|f| Some(f.1.clone())).collect(), plan.num_fetches));
        let (deadline, timeout_ms) = step_deadline(opts, self.opts.operation_timeout_in_ms);
        let rendezvous: Arc<dyn Rendezvous> = Arc::new(LocalRendezvous::new());
        let cancellation = Arc::new(CancellationManager::new());
        let step_id = StepId::next();
        let tracing = opts.trace_level == crate::TraceLevel::FullTrace;
        let parts: Vec<_> = plan
            .executors
            .iter()
            .map(|(exec, dev)| {
                let step = Arc::new(StepContext {
                    step_id,
                    rendezvous: rendezvous.clone(),
                    cancellation: cancellation.clone(),
                    deadline,
                    frame: frame.clone(),
                    device: exec.device().clone(),
                });
                (exec.clone(), step, tracing.then(|| Arc::new(StepStatsCollector::new(dev))))
            })
            .collect();
        run_partitions(&parts, &cancellation, rendezvous.as_ref(), deadline, timeout_ms)?;
        if let Some(md) = metadata {
            md.step_stats = StepStats {
                nodes: parts.iter().filter_map(|p| p.2.as_ref()).flat_map(|c| c.take()).collect(),
            };
            if opts.output_partition_graphs {
                md.partition_graphs = plan.partition_graphs.clone();
            }
        }
        frame
            .retvals
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.get().cloned().ok_or_else(|| Error::internal(format!("fetch {i} was not produced")))
            })
            .collect()
    }

    fn extend(&self, graph: &Graph) -> Result<()> {
        graph.status()?;
        let new = graph.to_graph_def();
        let mut g = self.graph.write().unwrap_or_else(|e| e.into_inner());
        if new.nodes.len() < g.nodes.len() || new.nodes[..g.nodes.len()] != g.nodes[..] {
            return Err(Error::invalid_argument(
                "extend() needs the same graph with nodes added, not a different graph",
            ));
        }
        *g = new;
        Ok(())
    }

    fn list_devices(&self) -> Result<Vec<DeviceAttributes>> {
        Ok(self.attrs.clone())
    }

    fn close(&self) -> Result<()> {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }
}
