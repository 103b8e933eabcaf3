//! The master service: sessions over the whole cluster. It places a step's graph over every
//! task's devices, partitions it per task and device, registers the partitions on the workers
//! and runs steps there, gathering fetches and the first error (with the task that raised it).

use crate::proto::{decode, encode, pack, unpack, Req, Resp, TensorRef};
use crate::worker::{task_error, Peers, Worker};
use crate::{BodySource, Responder};
use rill_graph::partition::{partition, prune_and_rewrite, PartitionOptions};
use rill_graph::placer::{group_support, place, PlacerOptions};
use rill_graph::session::{check_feeds, CANCEL_GRACE};
use rill_graph::trace::StepStats;
use rill_graph::{
    AttrsExt, Code, DeviceAttributes, DeviceName, Error, GraphDef, NodeId, Output, Result, Runtime,
    SessionOptions, StepId, Tensor, TensorInfo,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Deadline of control calls (session creation, graph registration, device listing).
pub const CONTROL_TIMEOUT_MS: u64 = 30_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct TaskPart {
    job: String,
    task: u32,
    local: bool,
    graph: u64,
    args: Vec<u32>,
}

struct Plan {
    parts: Vec<TaskPart>,
    feed_types: Vec<TensorInfo>,
    num_fetches: usize,
}

type PlanKey = (Vec<Output>, Vec<Output>, Vec<NodeId>);

struct MasterSession {
    graph: RwLock<GraphDef>,
    opts: SessionOptions,
    devices: Vec<DeviceAttributes>,
    /// Process incarnation of each remote task when the session was made: a change means the
    /// task restarted and lost its state, so the session is `Aborted`.
    incarnations: HashMap<(String, u32), u64>,
    placement: Mutex<HashMap<String, DeviceName>>,
    plans: Mutex<HashMap<PlanKey, Arc<Plan>>>,
}

/// The master service of one server.
pub struct Master {
    task: DeviceName,
    worker: Arc<Worker>,
    peers: Arc<Peers>,
    runtime: Runtime,
    sessions: Mutex<HashMap<u64, Arc<MasterSession>>>,
    next: AtomicU64,
    /// Steps that succeeded, per remote task, whose state that task has not been told to drop
    /// yet: the next `RunGraph` to the task carries them (a `CleanupStep` call per step would cost
    /// the task a request of its own); past `DEFERRED_CLEANUPS_MAX` they are sent at once.
    deferred_cleanups: Mutex<HashMap<(String, u32), Vec<StepId>>>,
}

/// Succeeded steps a task may be told about late, at most.
pub const DEFERRED_CLEANUPS_MAX: usize = 64;

fn task_of(d: &DeviceName) -> (String, u32) {
    (d.job.clone().unwrap_or_default(), d.task.unwrap_or(0))
}

impl Master {
    pub fn new(task: DeviceName, worker: Arc<Worker>, peers: Arc<Peers>, runtime: Runtime) -> Master {
        Master {
            task,
            worker,
            peers,
            runtime,
            sessions: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            deferred_cleanups: Mutex::new(HashMap::new()),
        }
    }

    fn is_local(&self, job: &str, task: u32) -> bool {
        self.task.job.as_deref() == Some(job) && self.task.task == Some(task)
    }

    fn control_timeout() -> Duration {
        Duration::from_millis(CONTROL_TIMEOUT_MS)
    }

    /// Devices of every task passing the filters (this task's without a network call).
    pub fn list_devices(
        &self,
        opts: &SessionOptions,
    ) -> Result<(Vec<DeviceAttributes>, HashMap<(String, u32), u64>)> {
        let mut out = Vec::new();
        let mut inc = HashMap::new();
        let tasks: Vec<(String, u32)> =
            self.peers.cluster().tasks().map(|(j, t, _)| (j.to_string(), t)).collect();
        for (job, task) in tasks {
            let name = crate::ClusterSpec::task_name(&job, task);
            let wanted = opts.device_filters.is_empty()
                || opts.device_filters.iter().any(|f| {
                    DeviceName::parse(f)
                        .is_ok_and(|f| f.task_name().matches(&name) || name.matches(&f.task_name()))
                });
            if !wanted {
                continue;
            }
            if self.is_local(&job, task) {
                out.extend(self.worker.device_attributes());
                continue;
            }
            let (resp, _) = self.peers.call(&job, task, &Req::GetStatus, None, Self::control_timeout())?;
            match resp {
                Resp::Devices(d) => out.extend(d),
                other => return Err(Error::internal(format!("GetStatus answered {other:?}"))),
            }
            if let Some(p) = self.peers.get(&job, task) {
                inc.insert((job, task), p.info().incarnation);
            }
        }
        out.retain(|d| opts.device_passes_filters(&d.name));
        Ok((out, inc))
    }

    pub fn create_session(&self, graph: GraphDef, opts: SessionOptions) -> Result<u64> {
        graph.validate()?;
        for n in &graph.nodes {
            self.runtime.ops.get(&n.op).map_err(|e| e.context(format!("node '{}'", n.name)))?;
        }
        let (devices, incarnations) = self.list_devices(&opts)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed) | (rill_graph::random_u64() << 32);
        lock(&self.sessions).insert(
            id,
            Arc::new(MasterSession {
                graph: RwLock::new(graph),
                opts,
                devices,
                incarnations,
                placement: Mutex::new(HashMap::new()),
                plans: Mutex::new(HashMap::new()),
            }),
        );
        Ok(id)
    }

    fn session(&self, id: u64) -> Result<Arc<MasterSession>> {
        lock(&self.sessions).get(&id).cloned().ok_or_else(|| {
            Error::aborted(format!(
                "session {id:x} does not exist on {} (closed, reset or restarted)",
                self.task
            ))
        })
    }

    pub fn extend_session(&self, id: u64, graph: GraphDef) -> Result<()> {
        let s = self.session(id)?;
        graph.validate()?;
        let mut g = s.graph.write().unwrap_or_else(|e| e.into_inner());
        if graph.nodes.len() < g.nodes.len() || graph.nodes[..g.nodes.len()] != g.nodes[..] {
            return Err(Error::invalid_argument("extend needs the same graph with nodes added"));
        }
        *g = graph;
        Ok(())
    }

    pub fn close_session(&self, id: u64) -> Result<()> {
        let s = lock(&self.sessions).remove(&id);
        if let Some(s) = s {
            for plan in lock(&s.plans).values() {
                for p in &plan.parts {
                    if p.local {
                        self.worker.cleanup_graph(p.graph);
                    } else {
                        let _ = self.peers.call(
                            &p.job,
                            p.task,
                            &Req::CleanupGraph { graph: p.graph },
                            None,
                            Self::control_timeout(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Clears resource containers on every task and closes every session (TF's `Session.reset`).
    pub fn reset(&self, containers: Vec<String>) -> Result<()> {
        let ids: Vec<u64> = lock(&self.sessions).keys().copied().collect();
        for id in ids {
            self.close_session(id)?;
        }
        let tasks: Vec<(String, u32)> =
            self.peers.cluster().tasks().map(|(j, t, _)| (j.to_string(), t)).collect();
        for (job, task) in tasks {
            if self.is_local(&job, task) {
                self.worker.reset_local(&containers);
            } else {
                self.peers.call(
                    &job,
                    task,
                    &Req::ResetLocal { containers: containers.clone() },
                    None,
                    Self::control_timeout(),
                )?;
            }
        }
        Ok(())
    }

    fn client_device(&self, s: &MasterSession) -> DeviceName {
        s.devices
            .iter()
            .find(|d| d.name.same_task(&self.task) && d.device_type == "CPU")
            .map(|d| d.name.clone())
            .unwrap_or_else(|| DeviceName {
                device_type: Some("CPU".into()),
                id: Some(0),
                ..self.task.clone()
            })
    }

    fn cached_plan(
        s: &MasterSession,
        feeds: &[Output],
        fetches: &[Output],
        targets: &[NodeId],
    ) -> Option<Arc<Plan>> {
        lock(&s.plans).get(&(feeds.to_vec(), fetches.to_vec(), targets.to_vec())).cloned()
    }

    fn plan(
        &self,
        s: &MasterSession,
        feeds: &[Output],
        fetches: &[Output],
        targets: &[NodeId],
    ) -> Result<Arc<Plan>> {
        if let Some(p) = Self::cached_plan(s, feeds, fetches, targets) {
            return Ok(p);
        }
        let client = self.client_device(s);
        let (sg, support) = {
            let g = s.graph.read().unwrap_or_else(|e| e.into_inner());
            let sg = prune_and_rewrite(&g, feeds, fetches, targets, &client, &self.runtime.ops)?;
            (sg, group_support(&g, &self.runtime.ops, &self.runtime.kernels)?)
        };
        let prev = lock(&s.placement).clone();
        let popts = PlacerOptions {
            allow_soft_placement: s.opts.allow_soft_placement,
            log_device_placement: s.opts.log_device_placement,
            default_device: self.task.task_name(),
            group_support: Some(Arc::new(support)),
        };
        let placement =
            place(&sg.graph, &s.devices, &self.runtime.ops, &self.runtime.kernels, &prev, &popts)?;
        {
            let mut prev = lock(&s.placement);
            for (node, dev) in sg.graph.nodes.iter().zip(&placement.devices) {
                prev.entry(node.name.clone()).or_insert_with(|| dev.clone());
            }
        }
        let inc =
            |d: &DeviceName| s.devices.iter().find(|a| &a.name == d).map(|a| a.incarnation).unwrap_or(0);
        let parts = partition(
            &sg.graph,
            &placement.devices,
            &PartitionOptions { incarnation: &inc, cross_task_cast: s.opts.cross_task_cast },
        )?;
        let mut by_task: BTreeMap<(String, u32), Vec<(String, GraphDef)>> = BTreeMap::new();
        for (dev, g) in parts {
            by_task.entry(task_of(&dev)).or_default().push((dev.to_string(), g));
        }
        let mut out = Vec::new();
        for ((job, task), partitions) in by_task {
            let mut args = Vec::new();
            for (_, g) in &partitions {
                for n in g.nodes.iter().filter(|n| n.op == "_Arg") {
                    args.push(n.attrs.int("index")? as u32);
                }
            }
            let local = self.is_local(&job, task);
            let graph = if local {
                self.worker.register_graph(partitions)?
            } else {
                let req = Req::RegisterGraph { session: 0, partitions };
                match self.peers.call(&job, task, &req, None, Self::control_timeout())?.0 {
                    Resp::Graph { graph } => graph,
                    other => return Err(Error::internal(format!("RegisterGraph answered {other:?}"))),
                }
            };
            out.push(TaskPart { job, task, local, graph, args });
        }
        let plan = Arc::new(Plan { parts: out, feed_types: sg.feed_types, num_fetches: fetches.len() });
        lock(&s.plans).insert((feeds.to_vec(), fetches.to_vec(), targets.to_vec()), plan.clone());
        Ok(plan)
    }

    /// Runs one step over the cluster, blocking the calling thread until it ends (an in-process
    /// client's thread or a master step thread).
    #[allow(clippy::too_many_arguments)]
    pub fn run_step(
        self: &Arc<Self>,
        id: u64,
        feeds: Vec<(Output, Tensor)>,
        fetches: &[Output],
        targets: &[NodeId],
        timeout_ms: u64,
        trace: bool,
    ) -> Result<(Vec<Tensor>, Option<StepStats>)> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.run_step_async(
            id,
            feeds,
            fetches,
            targets,
            timeout_ms,
            trace,
            Box::new(move |r| drop(tx.send(r))),
        );
        // The step always ends: its parts answer, or its timer ends it.
        rx.recv().unwrap_or_else(|_| Err(Error::internal("a step ended without an answer")))
    }

    /// Whether a step with these feeds, fetches and targets starts without blocking: its plan is
    /// made and every task in it is connected, so the event loop may start it itself.
    pub fn starts_without_blocking(
        &self,
        id: u64,
        feeds: &[Output],
        fetches: &[Output],
        targets: &[NodeId],
    ) -> bool {
        let Ok(s) = self.session(id) else { return false };
        let Some(plan) = Self::cached_plan(&s, feeds, fetches, targets) else { return false };
        plan.parts.iter().all(|p| {
            if p.local {
                self.worker.starts_without_dialling(p.graph)
            } else {
                self.peers.get(&p.job, p.task).is_some()
            }
        })
    }

    /// Starts one step over the cluster; `done` gets the fetches once every part has answered,
    /// or the first error (with the task that raised it) once the others have ended or
    /// `CANCEL_GRACE` has passed. Planning a new signature registers graphs and may block.
    #[allow(clippy::too_many_arguments)]
    pub fn run_step_async(
        self: &Arc<Self>,
        id: u64,
        feeds: Vec<(Output, Tensor)>,
        fetches: &[Output],
        targets: &[NodeId],
        timeout_ms: u64,
        trace: bool,
        done: StepDone,
    ) {
        let started = (|| {
            let s = self.session(id)?;
            let timeout_ms = if timeout_ms > 0 { timeout_ms } else { s.opts.operation_timeout_in_ms };
            let feed_outs: Vec<Output> = feeds.iter().map(|f| f.0).collect();
            let plan = self.plan(&s, &feed_outs, fetches, targets)?;
            check_feeds(&feeds, &plan.feed_types, &|o| {
                let g = s.graph.read().unwrap_or_else(|e| e.into_inner());
                format!("{}:{}", g.node(o.node).name, o.index)
            })?;
            for p in plan.parts.iter().filter(|p| !p.local) {
                let peer = self.peers.ensure(&p.job, p.task)?;
                if let Some(&was) = s.incarnations.get(&(p.job.clone(), p.task)) {
                    if peer.info().incarnation != was {
                        return Err(Error::aborted(format!(
                            "/job:{}/task:{} restarted since the session was created; recreate the session",
                            p.job, p.task
                        )));
                    }
                }
            }
            Ok((plan, timeout_ms))
        })();
        let (plan, timeout_ms) = match started {
            Ok(x) => x,
            Err(e) => return done(Err(e)),
        };
        let step = StepId::next();
        let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
        let gather = Arc::new(Gather {
            master: self.clone(),
            plan: plan.clone(),
            step,
            timeout_ms,
            trace,
            state: Mutex::new(GatherState {
                done: Some(done),
                first: None,
                silent_at_error: Vec::new(),
                retvals: vec![None; plan.num_fetches],
                stats: StepStats::default(),
                answered: vec![false; plan.parts.len()],
                got: 0,
                aborted: false,
                timer: None,
            }),
        });
        // Without a deadline a step still ends after an hour, so nothing waits forever.
        gather.arm(deadline.map(|d| d + CANCEL_GRACE).unwrap_or_else(|| Instant::now() + NO_DEADLINE_LIMIT));
        for (k, p) in plan.parts.iter().enumerate() {
            let args: Vec<(u32, Tensor)> = p.args.iter().map(|&i| (i, feeds[i as usize].1.clone())).collect();
            let g = gather.clone();
            if p.local {
                self.worker.run_graph_async(
                    p.graph,
                    step,
                    args,
                    plan.num_fetches as u32,
                    timeout_ms,
                    trace,
                    Box::new(move |r| g.part_done(k, r)),
                );
                continue;
            }
            let send = || -> Result<()> {
                let (idx, ts): (Vec<u32>, Vec<Tensor>) = args.into_iter().unzip();
                let packed = pack(&ts)?;
                let cleanup =
                    lock(&self.deferred_cleanups).remove(&(p.job.clone(), p.task)).unwrap_or_default();
                let req = Req::RunGraph {
                    cleanup,
                    graph: p.graph,
                    step,
                    args: idx.into_iter().zip(packed.refs).collect(),
                    num_retvals: plan.num_fetches as u32,
                    timeout_ms,
                    trace,
                };
                let peer = self.peers.ensure(&p.job, p.task)?;
                let call_deadline = deadline.map(|d| d + CANCEL_GRACE).unwrap_or_else(|| {
                    Instant::now() + Duration::from_millis(crate::worker::RECV_TIMEOUT_DEFAULT_MS)
                });
                let (job, task) = (p.job.clone(), p.task);
                let peers = self.peers.clone();
                let opts = crate::CallOptions {
                    deadline: call_deadline,
                    ..crate::CallOptions::timeout(Duration::ZERO)
                }
                .body_size_max(crate::FRAME_BODY_SIZE_MAX);
                peer.call_async(
                    &encode(&req)?,
                    packed.body,
                    opts,
                    Box::new(move |r| {
                        let r = r
                            .map_err(|e| {
                                // A closed connection (the task stopped) is replaced by the next
                                // step, which then sees a restarted task's new incarnation.
                                if e.code == Code::Unavailable {
                                    peers.forget(&job, task);
                                }
                                task_error(&job, task, e)
                            })
                            .and_then(|resp| match decode::<Resp>(&resp.meta)? {
                                Resp::Retvals { values, stats } => {
                                    let (idx, refs): (Vec<u32>, Vec<TensorRef>) = values.into_iter().unzip();
                                    Ok((idx.into_iter().zip(unpack(refs, resp.body)?).collect(), stats))
                                }
                                other => Err(Error::internal(format!("RunGraph answered {other:?}"))),
                            });
                        g.part_done(k, r);
                    }),
                )
            };
            if let Err(e) = send() {
                // Refused at once: the cached connection is closed; the next step reconnects.
                if e.code == Code::Unavailable {
                    self.peers.forget(&p.job, p.task);
                }
                gather.part_done(k, Err(task_error(&p.job, p.task, e)));
            }
        }
    }

    /// Ends a step on every task of the plan: at once where it failed (waiting parts are aborted)
    /// and on this task; a remote task hears of a success with its next `RunGraph`.
    fn cleanup_step(&self, plan: &Plan, step: StepId, error: Option<Error>) {
        for p in &plan.parts {
            if p.local {
                self.worker.cleanup_step(step, error.clone());
                continue;
            }
            let steps = if error.is_none() {
                let mut d = lock(&self.deferred_cleanups);
                let list = d.entry((p.job.clone(), p.task)).or_default();
                list.push(step);
                if list.len() <= DEFERRED_CLEANUPS_MAX {
                    continue;
                }
                std::mem::take(list)
            } else {
                vec![step]
            };
            let Some(peer) = self.peers.get(&p.job, p.task) else { continue };
            for step in steps {
                if let Ok(meta) = encode(&Req::CleanupStep { step, error: error.clone() }) {
                    let _ = peer.call_async(
                        &meta,
                        None,
                        crate::CallOptions::timeout(Self::control_timeout()),
                        Box::new(|_| {}),
                    );
                }
            }
        }
    }
}

/// Completion of a step: the fetched values in order, and the trace when asked for.
pub type StepDone = Box<dyn FnOnce(Result<(Vec<Tensor>, Option<StepStats>)>) + Send>;

/// How long a step without a deadline may take before it fails, so that no step waits forever.
const NO_DEADLINE_LIMIT: Duration = Duration::from_secs(3600);

/// The answers of one step's parts, gathered as they come (on whatever thread brings them); the
/// last answer, or the timer, ends the step. No thread waits for a step.
struct Gather {
    master: Arc<Master>,
    plan: Arc<Plan>,
    step: StepId,
    timeout_ms: u64,
    trace: bool,
    state: Mutex<GatherState>,
}

struct GatherState {
    /// Taken when the step ends; later answers are dropped.
    done: Option<StepDone>,
    first: Option<Error>,
    /// Remote tasks that had not answered when the step failed: a deadline names them.
    silent_at_error: Vec<String>,
    retvals: Vec<Option<Tensor>>,
    stats: StepStats,
    answered: Vec<bool>,
    got: usize,
    aborted: bool,
    timer: Option<u64>,
}

impl Gather {
    fn silent(&self, answered: &[bool]) -> Vec<String> {
        self.plan
            .parts
            .iter()
            .zip(answered)
            .filter(|(p, a)| !p.local && !**a)
            .map(|(p, _)| format!("/job:{}/task:{}", p.job, p.task))
            .collect()
    }

    /// (Re)sets the time at which the step ends whatever has answered.
    fn arm(self: &Arc<Self>, at: Instant) {
        let me = self.clone();
        let timer = self.master.worker.timer();
        let id = timer.schedule(at, Box::new(move || me.expire()));
        let old = lock(&self.state).timer.replace(id);
        if let Some(old) = old {
            timer.cancel(old);
        }
    }

    fn expire(&self) {
        let mut st = lock(&self.state);
        if st.done.is_none() {
            return;
        }
        if st.first.is_none() {
            st.silent_at_error = self.silent(&st.answered);
            st.first = Some(Error::deadline_exceeded(format!("step timed out after {} ms", self.timeout_ms)));
        }
        st.timer = None;
        self.finish(st);
    }

    fn part_done(self: &Arc<Self>, k: usize, r: Result<(Vec<(u32, Tensor)>, Option<StepStats>)>) {
        let mut st = lock(&self.state);
        if st.done.is_none() {
            return;
        }
        st.got += 1;
        if let Some(a) = st.answered.get_mut(k) {
            *a = true;
        }
        match r {
            Ok((vals, stats)) => {
                for (i, t) in vals {
                    if let Some(slot) = st.retvals.get_mut(i as usize) {
                        *slot = Some(t);
                    }
                }
                if let Some(stats) = stats {
                    st.stats.nodes.extend(stats.nodes);
                }
            }
            Err(e) => {
                let better =
                    st.first.as_ref().is_none_or(|p| p.code == Code::Cancelled && e.code != Code::Cancelled);
                if better {
                    if st.first.is_none() {
                        st.silent_at_error = self.silent(&st.answered);
                    }
                    st.first = Some(e.clone());
                }
                if !st.aborted && st.got < self.plan.parts.len() {
                    // Abort the other parts and give them `CANCEL_GRACE` to answer.
                    st.aborted = true;
                    drop(st);
                    self.master.cleanup_step(&self.plan, self.step, Some(e));
                    self.arm(Instant::now() + CANCEL_GRACE);
                    st = lock(&self.state);
                    if st.done.is_none() {
                        return;
                    }
                }
            }
        }
        if st.got == self.plan.parts.len() {
            self.finish(st);
        }
    }

    /// Ends the step: cleans up the parts (unless they were aborted) and answers.
    fn finish(&self, mut st: std::sync::MutexGuard<'_, GatherState>) {
        let Some(done) = st.done.take() else { return };
        if let Some(id) = st.timer.take() {
            self.master.worker.timer().cancel(id);
        }
        let aborted = st.aborted;
        let first = st.first.take();
        let silent = std::mem::take(&mut st.silent_at_error);
        let retvals = std::mem::take(&mut st.retvals);
        let stats = std::mem::take(&mut st.stats);
        drop(st);
        if !aborted {
            self.master.cleanup_step(&self.plan, self.step, first.clone());
        }
        let r = match first {
            Some(mut e) => {
                // A deadline is usually a peer that stopped answering (a cut link): name it.
                if e.code == Code::DeadlineExceeded && !silent.is_empty() {
                    e.msg = format!("{} (no answer from {})", e.msg, silent.join(", "));
                }
                Err(e)
            }
            None => retvals
                .into_iter()
                .enumerate()
                .map(|(i, t)| t.ok_or_else(|| Error::internal(format!("fetch {i} was not produced"))))
                .collect::<Result<Vec<_>>>()
                .map(|out| (out, self.trace.then_some(stats))),
        };
        done(r);
    }
}

/// Serves one master request other than `RunStep` (see [`start_step`]) on the calling thread (a
/// handler or step thread, never the event loop).
pub fn handle_master(m: &Arc<Master>, req: Req) -> Result<(Resp, Option<BodySource>)> {
    match req {
        Req::CreateSession { graph, options } => {
            Ok((Resp::Session { session: m.create_session(graph, options)? }, None))
        }
        Req::ExtendSession { session, graph } => m.extend_session(session, graph).map(|_| (Resp::Ok, None)),
        Req::CloseSession { session } => m.close_session(session).map(|_| (Resp::Ok, None)),
        Req::ListDevices => Ok((Resp::Devices(m.list_devices(&SessionOptions::default())?.0), None)),
        Req::Reset { containers } => m.reset(containers).map(|_| (Resp::Ok, None)),
        other => Err(Error::invalid_argument(format!("not a master request: {other:?}"))),
    }
}

/// Starts a `RunStep` request; the step answers the client itself when it ends, from whichever
/// thread ends it, so no thread waits for it.
pub fn start_step(m: &Arc<Master>, req: Req, body: Option<rill_graph::Buffer>, responder: Responder) {
    let Req::RunStep { session, feeds, fetches, targets, timeout_ms, trace, feed_values } = req else {
        let _ = responder.fail(&Error::internal(format!("not a RunStep request: {req:?}")));
        return;
    };
    let values = match unpack(feed_values, body) {
        Ok(v) if v.len() == feeds.len() => v,
        Ok(_) => {
            let _ = responder.fail(&Error::invalid_argument("feed values do not match feeds"));
            return;
        }
        Err(e) => {
            let _ = responder.fail(&e);
            return;
        }
    };
    m.run_step_async(
        session,
        feeds.into_iter().zip(values).collect(),
        &fetches,
        &targets,
        timeout_ms,
        trace,
        Box::new(move |r| {
            let sent = r.and_then(|(out, stats)| {
                let p = pack(&out)?;
                Ok((encode(&Resp::Step { fetches: p.refs, stats })?, p.body))
            });
            let _ = match sent {
                Ok((meta, body)) => responder.respond(&meta, body),
                Err(e) => responder.fail(&e),
            };
        }),
    );
}
