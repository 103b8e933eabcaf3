//! The worker service: registers partition graphs on this task's devices, runs them for a step
//! (`RunGraph`), serves tensors to other tasks (`RecvTensor`) and receives from them through the
//! step's `WorkerRendezvous`.

use crate::cluster::ClusterSpec;
use crate::data_path::{Dest, Landing, TensorTransport};
use crate::event_loop::{CallOptions, PeerHandle, Responder, Transport};
use crate::handshake::PeerInfo;
use crate::proto::{
    decode, encode, flat_byte_size, pack, unpack, Req, Resp, TensorRef, INLINE_TENSOR_SIZE_MAX,
};
use rill_graph::kernel::CallFrame;
use rill_graph::trace::{StepStats, StepStatsCollector};
use rill_graph::{
    AttrsExt, CancellationManager, Device, DeviceName, Error, Executor, GraphDef, LocalRendezvous, RecvDone,
    Rendezvous, RendezvousKey, Result, Runtime, StepContext, StepId, Tensor,
};
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Deadline of a remote receive in a step that has none: long enough for any training step,
/// short enough that a vanished peer is noticed.
pub const RECV_TIMEOUT_DEFAULT_MS: u64 = 10 * 60 * 1000;
/// How long connecting to another task may take.
pub const CONNECT_TIMEOUT_MS: u64 = 3000;
/// Step state (its rendezvous) left behind by a master that never cleaned up is dropped after this.
pub const STEP_STATE_TTL_MS: u64 = 10 * 60 * 1000;
/// Finished steps remembered, so a late `RecvTensor` for one is answered at once.
pub const FINISHED_STEPS_MAX: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rendezvous keys whose last tensor size is remembered, so a receiver can name a destination
/// of the right size before the tensor exists (the first transfer of a key uses the body).
pub const SIZE_HINTS_MAX: usize = 4096;

/// Connections to the other tasks of the cluster, made on demand and dropped when they fail.
pub struct Peers {
    pub(crate) transport: OnceLock<Arc<Transport>>,
    cluster: ClusterSpec,
    conns: Mutex<HashMap<(String, u32), PeerHandle>>,
    /// The data path beside the socket (same-host shared memory), when enabled.
    data: OnceLock<Arc<dyn TensorTransport>>,
    size_hints: Mutex<HashMap<String, u64>>,
}

impl Peers {
    pub fn new(cluster: ClusterSpec) -> Peers {
        Peers {
            transport: OnceLock::new(),
            cluster,
            conns: Mutex::new(HashMap::new()),
            data: OnceLock::new(),
            size_hints: Mutex::new(HashMap::new()),
        }
    }

    /// Installs the data path large tensors use where it serves (set once, at start).
    pub fn set_data_path(&self, data: Arc<dyn TensorTransport>) {
        let _ = self.data.set(data);
    }

    pub fn data_path(&self) -> Option<&Arc<dyn TensorTransport>> {
        self.data.get()
    }

    fn size_hint(&self, key: &str) -> Option<u64> {
        lock(&self.size_hints).get(key).copied()
    }

    fn record_size(&self, key: &str, len: u64) {
        let mut h = lock(&self.size_hints);
        if h.len() >= SIZE_HINTS_MAX && !h.contains_key(key) {
            h.clear();
        }
        h.insert(key.to_string(), len);
    }

    pub fn cluster(&self) -> &ClusterSpec {
        &self.cluster
    }

    /// The cached connection to a task, if any.
    pub fn get(&self, job: &str, task: u32) -> Option<PeerHandle> {
        lock(&self.conns).get(&(job.to_string(), task)).cloned()
    }

    /// The connection to a task, connecting (with a deadline) when there is none; on an event-loop
    /// thread a missing connection is `Unavailable` at once.
    pub fn ensure(&self, job: &str, task: u32) -> Result<PeerHandle> {
        if let Some(p) = self.get(job, task) {
            return Ok(p);
        }
        if rill_graph::executor::on_io_thread() {
            // Dialling waits for a handshake only an event loop can finish: never on one.
            return Err(Error::unavailable(format!(
                "/job:{job}/task:{task} is not connected (the next step connects again)"
            )));
        }
        let t = self.transport.get().ok_or_else(|| Error::unavailable("transport not started"))?;
        let addr_s = self.cluster.task_address(job, task)?;
        let addr = addr_s
            .to_socket_addrs()
            .map_err(|e| Error::unavailable(format!("resolving {addr_s} (/job:{job}/task:{task}): {e}")))?
            .next()
            .ok_or_else(|| Error::unavailable(format!("{addr_s} resolves to no address")))?;
        let p = t
            .connect(addr, Instant::now() + Duration::from_millis(CONNECT_TIMEOUT_MS))
            .map_err(|e| Error::new(e.code, format!("/job:{job}/task:{task} at {addr_s}: {}", e.msg)))?;
        lock(&self.conns).insert((job.to_string(), task), p.clone());
        Ok(p)
    }

    /// Drops every connection and what the data path holds (on shutdown).
    pub fn clear(&self) {
        lock(&self.conns).clear();
        if let Some(d) = self.data.get() {
            d.shutdown();
        }
    }

    /// Forgets a connection after a failure, so the next use reconnects.
    pub fn forget(&self, job: &str, task: u32) {
        lock(&self.conns).remove(&(job.to_string(), task));
    }

    /// A synchronous call to a task, naming it in errors; `Unavailable` forgets the connection.
    /// A cached connection that turns out closed (the peer restarted) is replaced once.
    pub fn call(
        &self,
        job: &str,
        task: u32,
        req: &Req,
        body: Option<crate::BodySource>,
        timeout: Duration,
    ) -> Result<(Resp, Option<rill_graph::Buffer>)> {
        let meta = encode(req)?;
        let cached = self.get(job, task).is_some();
        for attempt in 0..2 {
            let p = self.ensure(job, task)?;
            let opts = CallOptions::timeout(timeout).body_size_max(crate::FRAME_BODY_SIZE_MAX);
            match p.call(&meta, body.clone(), opts) {
                Ok(resp) => return Ok((decode(&resp.meta)?, resp.body)),
                Err(e) if e.code == rill_graph::Code::Unavailable => {
                    self.forget(job, task);
                    if !(cached && attempt == 0) {
                        return Err(task_error(job, task, e));
                    }
                }
                Err(e) => return Err(task_error(job, task, e)),
            }
        }
        Err(Error::unavailable(format!("/job:{job}/task:{task}: no connection")))
    }
}

/// `e` with the task that raised it named in front (once).
pub fn task_error(job: &str, task: u32, e: Error) -> Error {
    let tag = format!("/job:{job}/task:{task}");
    if e.msg.contains(&tag) {
        e
    } else {
        Error::new(e.code, format!("{tag}: {}", e.msg))
    }
}

type TimerFn = Box<dyn FnOnce() + Send>;

/// Timer heap size past which entries of cancelled deadlines are pruned.
const TIMER_HEAP_PRUNE_LEN: usize = 65536;

/// One thread that runs callbacks at deadlines (step timeouts), so no step needs a waiting thread.
pub struct Timer {
    state:
        Arc<(Mutex<(BinaryHeap<std::cmp::Reverse<(Instant, u64)>>, HashMap<u64, TimerFn>, bool)>, Condvar)>,
    next: AtomicU64,
}

impl Timer {
    pub fn new(name: &str) -> Timer {
        let state: Arc<(
            Mutex<(BinaryHeap<std::cmp::Reverse<(Instant, u64)>>, HashMap<u64, TimerFn>, bool)>,
            Condvar,
        )> = Arc::new((Mutex::new((BinaryHeap::new(), HashMap::new(), false)), Condvar::new()));
        let s = state.clone();
        let _ = std::thread::Builder::new().name(name.to_string()).spawn(move || loop {
            let mut due = Vec::new();
            {
                let mut g = lock(&s.0);
                if g.2 {
                    return;
                }
                let now = Instant::now();
                while let Some(std::cmp::Reverse((at, id))) = g.0.peek().copied() {
                    if at > now {
                        break;
                    }
                    g.0.pop();
                    if let Some(f) = g.1.remove(&id) {
                        due.push(f);
                    }
                }
                if due.is_empty() {
                    let wait =
                        g.0.peek()
                            .map(|r| r.0 .0.saturating_duration_since(now))
                            .unwrap_or(Duration::from_secs(1));
                    let _ = s.1.wait_timeout(g, wait.min(Duration::from_secs(1)));
                }
            }
            for f in due {
                f();
            }
        });
        Timer { state, next: AtomicU64::new(1) }
    }

    pub fn schedule(&self, at: Instant, f: TimerFn) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut g = lock(&self.state.0);
        // The timer thread only needs waking when this deadline comes before all others.
        let earliest = g.0.peek().is_none_or(|r| at < r.0 .0);
        g.0.push(std::cmp::Reverse((at, id)));
        g.1.insert(id, f);
        if earliest {
            self.state.1.notify_one();
        }
        id
    }

    pub fn cancel(&self, id: u64) {
        let mut g = lock(&self.state.0);
        g.1.remove(&id);
        // Cancelled deadlines stay in the heap until they pass (a step's deadline may be far
        // off): past a bound, keep only the live ones.
        if g.0.len() > TIMER_HEAP_PRUNE_LEN && g.0.len() > 2 * g.1.len() {
            let (heap, live, _) = &mut *g;
            heap.retain(|r| live.contains_key(&r.0 .1));
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        lock(&self.state.0).2 = true;
        self.state.1.notify_all();
    }
}

/// The rendezvous of one step on one task: local keys meet in a `LocalRendezvous`; keys sent by
/// another task are fetched from it with `RecvTensor`.
pub struct WorkerRendezvous {
    local: LocalRendezvous,
    step: StepId,
    task: DeviceName,
    peers: Arc<Peers>,
    runner: Arc<dyn Device>,
    deadline: Mutex<Option<Instant>>,
    pending: Arc<Mutex<(HashMap<u64, RecvDone>, Option<Error>)>>,
    next: AtomicU64,
    created: Instant,
}

impl WorkerRendezvous {
    fn set_deadline(&self, d: Option<Instant>) {
        if d.is_some() {
            *lock(&self.deadline) = d;
        }
    }
}

impl Rendezvous for WorkerRendezvous {
    fn send(&self, key: &RendezvousKey, t: Tensor) -> Result<()> {
        self.local.send(key, t)
    }

    fn recv_async(&self, key: &RendezvousKey, done: RecvDone) {
        if key.src_device.same_task(&self.task) {
            return self.local.recv_async(key, done);
        }
        let (job, task) = (key.src_device.job.clone().unwrap_or_default(), key.src_device.task.unwrap_or(0));
        let Some(peer) = self.peers.get(&job, task) else {
            return done(Err(Error::unavailable(format!("no connection to /job:{job}/task:{task}"))));
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut p = lock(&self.pending);
            if let Some(e) = &p.1 {
                let e = e.clone();
                drop(p);
                return done(Err(e));
            }
            p.0.insert(id, done);
        }
        let deadline = lock(&self.deadline)
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(RECV_TIMEOUT_DEFAULT_MS));
        // A large tensor seen before under this key: name a destination for its bytes.
        let landing = match (self.peers.data_path(), self.peers.size_hint(&key.full)) {
            (Some(d), Some(len)) => d.offer(peer.info(), len),
            _ => None,
        };
        let req = Req::RecvTensor {
            step: self.step,
            key: key.full.clone(),
            dest: landing.as_ref().map(|l| l.dest()),
        };
        let meta = match encode(&req) {
            Ok(m) => m,
            Err(e) => {
                if let Some(d) = lock(&self.pending).0.remove(&id) {
                    d(Err(e));
                }
                return;
            }
        };
        let pending = self.pending.clone();
        let runner = self.runner.clone();
        let peers = self.peers.clone();
        let full_key = key.full.clone();
        let opts = CallOptions { deadline, ..CallOptions::timeout(Duration::ZERO) }
            .body_size_max(crate::FRAME_BODY_SIZE_MAX);
        let r = peer.call_async(
            &meta,
            None,
            opts,
            Box::new(move |r| {
                let Some(d) = lock(&pending).0.remove(&id) else { return };
                let result = r
                    .map_err(|e| {
                        if e.code == rill_graph::Code::Unavailable {
                            peers.forget(&job, task);
                        }
                        task_error(&job, task, e)
                    })
                    .and_then(|resp| match decode::<Resp>(&resp.meta)? {
                        Resp::Tensor(tr) => received_tensor(&peers, &full_key, tr, resp.body, landing),
                        other => Err(Error::internal(format!("RecvTensor answered {other:?}"))),
                    });
                // A small tensor continues the step here (the executor keeps large work off an
                // event loop); a large one on the device's pool, so the loop reads on.
                match &result {
                    Ok(t) if t.byte_size() > rill_graph::executor::IO_INLINE_BYTES_MAX => {
                        runner.schedule(Box::new(move || d(result)))
                    }
                    _ => d(result),
                }
            }),
        );
        if let Err(e) = r {
            if let Some(d) = lock(&self.pending).0.remove(&id) {
                d(Err(e));
            }
        }
    }

    fn start_abort(&self, err: Error) {
        self.local.start_abort(err.clone());
        let waiters: Vec<RecvDone> = {
            let mut p = lock(&self.pending);
            if p.1.is_none() {
                p.1 = Some(err.clone());
            }
            p.0.drain().map(|(_, d)| d).collect()
        };
        for d in waiters {
            d(Err(err.clone()));
        }
    }
}

/// The tensor a `RecvTensor` answer carries: landed in the destination the request named (no
/// copy), inline, or in the body. The destination ends here in every case (see `Landing`), and the
/// size of a large tensor is remembered for the key's next transfer.
fn received_tensor(
    peers: &Peers,
    key: &str,
    tr: TensorRef,
    body: Option<rill_graph::Buffer>,
    landing: Option<Box<dyn Landing>>,
) -> Result<Tensor> {
    match tr {
        TensorRef::Landed { dtype, shape, len } => {
            let landing = landing
                .ok_or_else(|| Error::invalid_argument("a tensor landed where no destination was named"))?;
            if flat_byte_size(dtype, &shape) != Some(len as usize) {
                return Err(Error::invalid_argument(format!(
                    "landed tensor {dtype} {shape} is not {len} bytes"
                )));
            }
            let t = Tensor::from_buffer(dtype, shape, landing.land(len)?)?;
            peers.record_size(key, len);
            Ok(t)
        }
        tr => {
            if let Some(l) = landing {
                l.release();
            }
            if let TensorRef::Body { len, .. } = &tr {
                peers.record_size(key, *len);
            }
            unpack(vec![tr], body)?.pop().ok_or_else(|| Error::internal("empty RecvTensor answer"))
        }
    }
}

/// Largest tensor copied into a peer's shared memory on the thread that finds it ready (possibly
/// the event loop); larger copies run on the device's pool.
const SHM_COPY_INLINE_MAX: usize = 1 << 20;

/// Answers a `RecvTensor` with the tensor: written into the receiver's destination when the data
/// path can, else inline or in the body.
fn answer_recv(
    r: Result<Tensor>,
    data: Option<(Dest, Arc<dyn TensorTransport>, PeerInfo)>,
    responder: Responder,
) {
    let sent = r.and_then(|t| {
        if let Some((dest, data, peer)) = &data {
            if t.byte_size() > INLINE_TENSOR_SIZE_MAX {
                if let Ok(bytes) = t.as_bytes() {
                    if data.write(peer, dest, bytes).is_ok() {
                        let landed = TensorRef::Landed {
                            dtype: t.dtype(),
                            shape: *t.shape(),
                            len: bytes.len() as u64,
                        };
                        return Ok((encode(&Resp::Tensor(landed))?, None));
                    }
                }
            }
        }
        let p = pack(std::slice::from_ref(&t))?;
        let meta = encode(&Resp::Tensor(p.refs.into_iter().next().unwrap_or(TensorRef::Inline(t))))?;
        Ok((meta, p.body))
    });
    let _ = match sent {
        Ok((meta, body)) => responder.respond(&meta, body),
        Err(e) => responder.fail(&e),
    };
}

struct RegisteredGraph {
    executors: Vec<Arc<Executor>>,
    remote_tasks: Vec<(String, u32)>,
}

/// Completion of a `RunGraph`: the return values this task produced, and step stats.
pub type RunGraphDone = Box<dyn FnOnce(Result<(Vec<(u32, Tensor)>, Option<StepStats>)>) + Send>;

/// The worker service of one task.
pub struct Worker {
    task: DeviceName,
    devices: Vec<Arc<dyn Device>>,
    runtime: Runtime,
    peers: Arc<Peers>,
    graphs: Mutex<HashMap<u64, Arc<RegisteredGraph>>>,
    steps: Mutex<HashMap<StepId, Arc<WorkerRendezvous>>>,
    finished: Mutex<(VecDeque<StepId>, HashSet<StepId>)>,
    next_graph: AtomicU64,
    timer: Timer,
    stopped: AtomicBool,
}

impl Worker {
    pub fn new(
        task: DeviceName,
        devices: Vec<Arc<dyn Device>>,
        runtime: Runtime,
        peers: Arc<Peers>,
    ) -> Worker {
        Worker {
            timer: Timer::new(&format!(
                "rill-timer-{}-{}",
                task.job.clone().unwrap_or_default(),
                task.task.unwrap_or(0)
            )),
            task,
            devices,
            runtime,
            peers,
            graphs: Mutex::new(HashMap::new()),
            steps: Mutex::new(HashMap::new()),
            finished: Mutex::new((VecDeque::new(), HashSet::new())),
            next_graph: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
        }
    }

    /// The timer that ends steps at their deadlines.
    pub(crate) fn timer(&self) -> &Timer {
        &self.timer
    }

    pub fn task(&self) -> &DeviceName {
        &self.task
    }

    pub fn devices(&self) -> &[Arc<dyn Device>] {
        &self.devices
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    pub fn device_attributes(&self) -> Vec<rill_graph::DeviceAttributes> {
        self.devices.iter().map(|d| d.attributes().clone()).collect()
    }

    fn step_rendezvous(&self, step: StepId) -> Result<Arc<WorkerRendezvous>> {
        if lock(&self.finished).1.contains(&step) {
            return Err(Error::aborted(format!("step {:x} already finished on {}", step.0, self.task)));
        }
        let mut steps = lock(&self.steps);
        if let Some(r) = steps.get(&step) {
            return Ok(r.clone());
        }
        let ttl = Duration::from_millis(STEP_STATE_TTL_MS);
        steps.retain(|_, r| r.created.elapsed() < ttl);
        let r = Arc::new(WorkerRendezvous {
            local: LocalRendezvous::new(),
            step,
            task: self.task.clone(),
            peers: self.peers.clone(),
            runner: self.devices[0].clone(),
            deadline: Mutex::new(None),
            pending: Arc::new(Mutex::new((HashMap::new(), None))),
            next: AtomicU64::new(1),
            created: Instant::now(),
        });
        steps.insert(step, r.clone());
        Ok(r)
    }

    /// Builds executors for the partitions of one task.
    pub fn register_graph(&self, partitions: Vec<(String, GraphDef)>) -> Result<u64> {
        let mut executors = Vec::new();
        let mut remote = Vec::new();
        for (dev_name, g) in partitions {
            let want = DeviceName::parse(&dev_name)?;
            let dev =
                self.devices.iter().find(|d| d.name() == &want).ok_or_else(|| {
                    Error::invalid_argument(format!("{} has no device {dev_name}", self.task))
                })?;
            for n in g.nodes.iter().filter(|n| n.op == "_Recv") {
                let src = DeviceName::parse(n.attrs.str("send_device")?)?;
                if !src.same_task(&self.task) {
                    let t = (src.job.clone().unwrap_or_default(), src.task.unwrap_or(0));
                    if !remote.contains(&t) {
                        remote.push(t);
                    }
                }
            }
            executors.push(Arc::new(Executor::new(
                &g,
                &self.runtime.ops,
                &self.runtime.kernels,
                dev.clone(),
            )?));
        }
        let id = self.next_graph.fetch_add(1, Ordering::Relaxed);
        lock(&self.graphs).insert(id, Arc::new(RegisteredGraph { executors, remote_tasks: remote }));
        Ok(id)
    }

    pub fn cleanup_graph(&self, id: u64) {
        lock(&self.graphs).remove(&id);
    }

    /// Runs a registered graph for `step`; `done` gets the return values produced here.
    /// Whether `RunGraph` of `graph` can start without dialling a peer (the graph is registered
    /// and every task it receives from is connected), so the event loop may start it itself.
    pub fn starts_without_dialling(&self, graph: u64) -> bool {
        let Some(g) = lock(&self.graphs).get(&graph).cloned() else { return false };
        g.remote_tasks.iter().all(|(job, task)| self.peers.get(job, *task).is_some())
    }

    pub fn run_graph_async(
        &self,
        graph: u64,
        step: StepId,
        args: Vec<(u32, Tensor)>,
        num_retvals: u32,
        timeout_ms: u64,
        trace: bool,
        done: RunGraphDone,
    ) {
        let Some(g) = lock(&self.graphs).get(&graph).cloned() else {
            let task = &self.task;
            let msg = format!("graph {graph} is not registered on {task} (the task may have restarted)");
            return done(Err(Error::aborted(format!("{msg}; recreate the session"))));
        };
        for (job, task) in &g.remote_tasks {
            if let Err(e) = self.peers.ensure(job, *task) {
                return done(Err(e));
            }
        }
        let rdv = match self.step_rendezvous(step) {
            Ok(r) => r,
            Err(e) => return done(Err(e)),
        };
        let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
        rdv.set_deadline(deadline);
        let mut frame_args: Vec<Option<Tensor>> = Vec::new();
        for (i, t) in args {
            let i = i as usize;
            if i >= frame_args.len() {
                frame_args.resize(i + 1, None);
            }
            frame_args[i] = Some(t);
        }
        let frame = Arc::new(CallFrame::new(frame_args, num_retvals as usize));
        let cancellation = Arc::new(CancellationManager::new());
        let n = g.executors.len();
        let remaining = Arc::new(AtomicUsize::new(n));
        let first_err: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
        let done = Arc::new(Mutex::new(Some(done)));
        let collectors: Vec<Option<Arc<StepStatsCollector>>> = g
            .executors
            .iter()
            .map(|e| trace.then(|| Arc::new(StepStatsCollector::new(&e.device().name().to_string()))))
            .collect();
        let timer_id = deadline.map(|d| {
            let (c, r) = (cancellation.clone(), rdv.clone());
            self.timer.schedule(
                d,
                Box::new(move || {
                    let e = Error::deadline_exceeded(format!("step timed out after {timeout_ms} ms"));
                    c.cancel(e.clone());
                    r.start_abort(e);
                }),
            )
        });
        let finish = {
            let frame = frame.clone();
            let collectors = collectors.clone();
            let first_err = first_err.clone();
            let done = done.clone();
            let timer_cancel: Arc<dyn Fn() + Send + Sync> = {
                let st = self.timer.state.clone();
                Arc::new(move || {
                    if let Some(id) = timer_id {
                        lock(&st.0).1.remove(&id);
                    }
                })
            };
            move || {
                timer_cancel();
                let Some(d) = lock(&done).take() else { return };
                if let Some(e) = lock(&first_err).take() {
                    return d(Err(e));
                }
                let vals = frame
                    .retvals
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.get().map(|t| (i as u32, t.clone())))
                    .collect();
                let stats = trace.then(|| StepStats {
                    nodes: collectors.iter().flatten().flat_map(|c| c.take()).collect(),
                });
                d(Ok((vals, stats)))
            }
        };
        let finish = Arc::new(Mutex::new(Some(finish)));
        for (exec, stats) in g.executors.iter().zip(collectors) {
            let ctx = Arc::new(StepContext {
                step_id: step,
                rendezvous: rdv.clone(),
                cancellation: cancellation.clone(),
                deadline,
                frame: frame.clone(),
                device: exec.device().clone(),
            });
            let (remaining, first_err, finish) = (remaining.clone(), first_err.clone(), finish.clone());
            let (c2, r2) = (cancellation.clone(), rdv.clone());
            exec.run_async(
                ctx,
                stats,
                Box::new(move |r| {
                    if let Err(e) = r {
                        let mut fe = lock(&first_err);
                        let replace = fe.as_ref().is_none_or(|p| {
                            p.code == rill_graph::Code::Cancelled && e.code != rill_graph::Code::Cancelled
                        });
                        if replace {
                            *fe = Some(e.clone());
                        }
                        drop(fe);
                        c2.cancel(e.clone());
                        r2.start_abort(e);
                    }
                    if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                        if let Some(f) = lock(&finish).take() {
                            f();
                        }
                    }
                }),
            );
        }
    }

    /// Answers a `RecvTensor` once the tensor is sent in this task's part of the step: into the
    /// destination the receiver named when the data path can write there, else in the body.
    pub fn recv_tensor(
        &self,
        step: StepId,
        key: &str,
        dest: Option<Dest>,
        peer: &PeerInfo,
        responder: Responder,
    ) {
        let parsed = match RendezvousKey::parse(key) {
            Ok(k) => k,
            Err(e) => {
                let _ = responder.fail(&e);
                return;
            }
        };
        let rdv = match self.step_rendezvous(step) {
            Ok(r) => r,
            Err(e) => {
                let _ = responder.fail(&e);
                return;
            }
        };
        let data = dest.and_then(|d| Some((d, self.peers.data_path()?.clone(), peer.clone())));
        let runner = self.devices[0].clone();
        rdv.local.recv_async(
            &parsed,
            Box::new(move |r| match (r, data) {
                // This may run on the event-loop thread: a large copy goes to the device's pool.
                (Ok(t), Some(data)) if t.byte_size() > SHM_COPY_INLINE_MAX => {
                    runner.schedule(Box::new(move || answer_recv(Ok(t), Some(data), responder)))
                }
                (r, data) => answer_recv(r, data, responder),
            }),
        );
    }

    /// Ends a step on this task: aborts what still waits (with `error`, or `Cancelled`).
    pub fn cleanup_step(&self, step: StepId, error: Option<Error>) {
        let r = lock(&self.steps).remove(&step);
        {
            let mut f = lock(&self.finished);
            if f.1.insert(step) {
                f.0.push_back(step);
            }
            while f.0.len() > FINISHED_STEPS_MAX {
                if let Some(old) = f.0.pop_front() {
                    f.1.remove(&old);
                }
            }
        }
        if let Some(r) = r {
            r.start_abort(error.unwrap_or_else(|| Error::cancelled(format!("step {:x} is over", step.0))));
        }
    }

    pub fn reset_local(&self, containers: &[String]) {
        for d in &self.devices {
            d.resource_mgr().cleanup(containers);
        }
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }
}

/// Decodes and serves one worker request; `None` when the request is not a worker request.
pub fn handle_worker(
    w: &Arc<Worker>,
    peer: &PeerInfo,
    req: Req,
    body: Option<rill_graph::Buffer>,
    responder: Responder,
) -> Option<(Req, Option<rill_graph::Buffer>, Responder)> {
    let reply = |responder: Responder, r: Result<Resp>| {
        let _ = match r.and_then(|m| encode(&m)) {
            Ok(meta) => responder.respond(&meta, None),
            Err(e) => responder.fail(&e),
        };
    };
    match req {
        Req::GetStatus => reply(responder, Ok(Resp::Devices(w.device_attributes()))),
        Req::RegisterGraph { partitions, .. } => {
            reply(responder, w.register_graph(partitions).map(|graph| Resp::Graph { graph }))
        }
        Req::CleanupGraph { graph } => {
            w.cleanup_graph(graph);
            reply(responder, Ok(Resp::Ok))
        }
        Req::CleanupStep { step, error } => {
            w.cleanup_step(step, error);
            reply(responder, Ok(Resp::Ok))
        }
        Req::ResetLocal { containers } => {
            w.reset_local(&containers);
            reply(responder, Ok(Resp::Ok))
        }
        Req::RecvTensor { step, key, dest } => w.recv_tensor(step, &key, dest, peer, responder),
        Req::RunGraph { cleanup, graph, step, args, num_retvals, timeout_ms, trace } => {
            for done in cleanup {
                w.cleanup_step(done, None);
            }
            let (idx, refs): (Vec<u32>, Vec<TensorRef>) = args.into_iter().unzip();
            let tensors = match unpack(refs, body) {
                Ok(t) => t,
                Err(e) => {
                    let _ = responder.fail(&e);
                    return None;
                }
            };
            w.run_graph_async(
                graph,
                step,
                idx.into_iter().zip(tensors).collect(),
                num_retvals,
                timeout_ms,
                trace,
                Box::new(move |r| {
                    let sent = r.and_then(|(vals, stats)| {
                        let (idx, ts): (Vec<u32>, Vec<Tensor>) = vals.into_iter().unzip();
                        let p = pack(&ts)?;
                        Ok((
                            encode(&Resp::Retvals { values: idx.into_iter().zip(p.refs).collect(), stats })?,
                            p.body,
                        ))
                    });
                    let _ = match sent {
                        Ok((meta, body)) => responder.respond(&meta, body),
                        Err(e) => responder.fail(&e),
                    };
                }),
            );
        }
        other => return Some((other, body, responder)),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_loop_thread_never_dials() {
        let peers = Peers::new(ClusterSpec::parse("ps=127.0.0.1:9").unwrap());
        let e = std::thread::spawn(move || {
            rill_graph::executor::mark_io_thread();
            peers.ensure("ps", 0).unwrap_err()
        })
        .join()
        .unwrap();
        assert_eq!(e.code, rill_graph::Code::Unavailable);
        assert!(e.msg.contains("not connected"), "{e}");
    }

    #[test]
    fn cancelled_deadlines_do_not_pile_up_and_live_ones_fire() {
        let t = Timer::new("rill-timer-test");
        let (tx, rx) = std::sync::mpsc::channel();
        t.schedule(
            Instant::now() + Duration::from_millis(50),
            Box::new(move || {
                let _ = tx.send(());
            }),
        );
        let far = Instant::now() + Duration::from_secs(3600);
        for _ in 0..3 * TIMER_HEAP_PRUNE_LEN {
            let id = t.schedule(far, Box::new(|| {}));
            t.cancel(id);
        }
        assert!(lock(&t.state.0).0.len() <= TIMER_HEAP_PRUNE_LEN + 1);
        rx.recv_timeout(Duration::from_secs(10)).expect("the live deadline fires");
    }
}
