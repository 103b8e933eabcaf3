//! `Server`: one task of a cluster, hosting a master and a worker behind one transport, bound to
//! the task's own address from the cluster spec.

use crate::cluster::{ClusterSpec, ServerDef};
use crate::event_loop::{Request, Responder, Transport, TransportOptions};
use crate::master::{handle_master, start_step, Master};
use crate::proto::{answered_inline, decode, encode, Req};
use crate::worker::{handle_worker, Peers, Worker};
use rill_graph::{Error, Result, Runtime};
use std::collections::VecDeque;
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct Services {
    worker: Arc<Worker>,
    master: Arc<Master>,
    step_threads: Arc<StepThreads>,
    inline_masters: AtomicUsize,
}

impl Services {
    /// On the event-loop thread: `RecvTensor` (it only registers a callback), and `RunGraph` and
    /// `RunStep` when they start without blocking (graph registered or step planned, peers
    /// connected; the executor runs only small cheap nodes here and hands the rest to the pool);
    /// the rest goes on to the handler threads.
    fn handle_inline(&self, req: Request, responder: Responder) -> Option<(Request, Responder)> {
        if !answered_inline(&req.meta) {
            return Some((req, responder));
        }
        match decode::<Req>(&req.meta) {
            Ok(Req::RecvTensor { step, key, dest }) => {
                self.worker.recv_tensor(step, &key, dest, &req.peer, responder)
            }
            Ok(run @ Req::RunGraph { graph, .. }) if self.worker.starts_without_dialling(graph) => {
                if let Some((other, _, responder)) =
                    handle_worker(&self.worker, &req.peer, run, req.body, responder)
                {
                    let _ = responder.fail(&Error::internal(format!("{other:?} is not answered inline")));
                }
            }
            Ok(Req::RunStep { session, feeds, fetches, targets, timeout_ms, trace, feed_values })
                if self.master.starts_without_blocking(session, &feeds, &fetches, &targets) =>
            {
                let run = Req::RunStep { session, feeds, fetches, targets, timeout_ms, trace, feed_values };
                start_step(&self.master, run, req.body, responder)
            }
            Ok(Req::RunGraph { .. } | Req::RunStep { .. }) => return Some((req, responder)),
            Ok(other) => {
                let _ = responder.fail(&Error::internal(format!("{other:?} is not answered inline")));
            }
            Err(e) => {
                let _ = responder.fail(&e);
            }
        }
        None
    }

    fn handle(self: &Arc<Self>, req: Request, responder: Responder) {
        let parsed = match decode::<Req>(&req.meta) {
            Ok(r) => r,
            Err(e) => {
                let _ = responder.fail(&e);
                return;
            }
        };
        let Some((req, body, responder)) =
            handle_worker(&self.worker, &req.peer, parsed, req.body, responder)
        else {
            return;
        };
        // Master requests may wait (planning a step registers graphs on other tasks). A few run
        // right here; the rest run on step threads, so that at least
        // `HANDLER_THREADS - MASTER_INLINE_MAX` handler threads stay free for worker requests.
        let me = self.clone();
        let job = move || {
            if matches!(req, Req::RunStep { .. }) {
                // Plans the step (which may block the first time) and starts it; it answers itself.
                return start_step(&me.master, req, body, responder);
            }
            let r = handle_master(&me.master, req).and_then(|(resp, body)| Ok((encode(&resp)?, body)));
            let _ = match r {
                Ok((meta, body)) => responder.respond(&meta, body),
                Err(e) => responder.fail(&e),
            };
        };
        if self.inline_masters.fetch_add(1, Ordering::AcqRel) < MASTER_INLINE_MAX {
            job();
            self.inline_masters.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.inline_masters.fetch_sub(1, Ordering::AcqRel);
        if let Err(e) = self.step_threads.run(Box::new(job)) {
            eprintln!("rill: cannot start a master step thread: {e}");
        }
    }
}

/// Master requests run on a handler thread at once (at most this many at a time).
const MASTER_INLINE_MAX: usize = crate::HANDLER_THREADS / 2;

type Job = Box<dyn FnOnce() + Send>;

/// How long an idle step thread waits for work before it ends.
const STEP_THREAD_IDLE_MS: u64 = 10_000;
/// Idle step threads kept; more end when their step is done.
const STEP_THREADS_IDLE_MAX: usize = 16;

/// Threads for master requests. Every request gets a thread at once (a waiting step never waits
/// for another step's thread, so steps that depend on each other, through a queue say, cannot
/// deadlock); idle threads are reused, since starting a thread costs more than a tiny step.
#[derive(Default)]
struct StepThreads {
    /// Jobs handed to idle threads, and how many threads are idle.
    state: Mutex<(VecDeque<Job>, usize)>,
    cv: Condvar,
}

impl StepThreads {
    fn run(self: &Arc<Self>, job: Job) -> std::io::Result<()> {
        {
            let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if g.1 > g.0.len() {
                g.0.push_back(job);
                self.cv.notify_one();
                return Ok(());
            }
        }
        let me = self.clone();
        std::thread::Builder::new().name("rill-master-step".into()).spawn(move || {
            job();
            me.serve();
        })?;
        Ok(())
    }

    fn serve(&self) {
        loop {
            let job = {
                let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if g.1 >= STEP_THREADS_IDLE_MAX {
                    return;
                }
                g.1 += 1;
                let deadline = Instant::now() + Duration::from_millis(STEP_THREAD_IDLE_MS);
                loop {
                    if let Some(j) = g.0.pop_front() {
                        g.1 -= 1;
                        break j;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        g.1 -= 1;
                        return;
                    }
                    g = self.cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            };
            job();
        }
    }
}

/// The master of a server in this process, as long as the server serves: a stopped server
/// answers `Unavailable`, as its closed socket would.
#[derive(Clone)]
pub(crate) struct LocalMaster(Arc<Mutex<Option<Arc<Services>>>>);

impl LocalMaster {
    pub(crate) fn get(&self) -> Result<Arc<Master>> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref().map(|s| s.master.clone()).ok_or_else(|| Error::unavailable("server is not serving"))
    }
}

/// A running task: `target()` is what clients connect to; `join()` blocks like `server.join()`.
pub struct Server {
    def: ServerDef,
    transport: Arc<Transport>,
    services: Arc<Services>,
    slot: Arc<Mutex<Option<Arc<Services>>>>,
    stopped: Arc<(Mutex<bool>, Condvar)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server(/job:{}/task:{} at {})", self.def.job_name, self.def.task_index, self.target())
    }
}

impl Server {
    /// Starts the task: creates its devices, binds its address and serves requests.
    pub fn start(def: ServerDef, runtime: Runtime) -> Result<Server> {
        let task = ClusterSpec::task_name(&def.job_name, def.task_index);
        let addr_s = def.address()?.to_string();
        let addr = addr_s
            .to_socket_addrs()
            .map_err(|e| Error::invalid_argument(format!("resolving {addr_s}: {e}")))?
            .next()
            .ok_or_else(|| Error::invalid_argument(format!("{addr_s} resolves to no address")))?;
        let devices = runtime.create_devices(&def.default_session_options, &task)?;
        // The handler reaches the services through this slot; `stop` empties it, which breaks
        // the cycle transport → handler → services → peers → transport.
        let slot: Arc<Mutex<Option<Arc<Services>>>> = Arc::new(Mutex::new(None));
        let s2 = slot.clone();
        let handler: crate::Handler = Arc::new(move |req, responder| {
            let s = s2.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match s {
                Some(s) => s.handle(req, responder),
                None => {
                    let _ = responder.fail(&Error::unavailable("server is not serving"));
                }
            }
        });
        let s3 = slot.clone();
        let inline: crate::InlineHandler = Arc::new(move |req, responder| {
            let s = s3.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match s {
                Some(s) => s.handle_inline(req, responder),
                None => Some((req, responder)),
            }
        });
        let transport = Arc::new(Transport::start(TransportOptions {
            bind: Some(addr),
            secret: def.secret.clone(),
            cluster_id: def.cluster.fingerprint(),
            job: def.job_name.clone(),
            task: def.task_index,
            handler: Some(handler),
            inline_handler: Some(inline),
            shm: def.shm,
            ..Default::default()
        })?);
        let peers = Arc::new(Peers::new(def.cluster.clone()));
        if def.shm {
            peers.set_data_path(Arc::new(crate::shm::Shm::new()));
        }
        let _ = peers.transport.set(transport.clone());
        let worker = Arc::new(Worker::new(task.clone(), devices, runtime.clone(), peers.clone()));
        let master = Arc::new(Master::new(task, worker.clone(), peers, runtime));
        let services = Arc::new(Services {
            worker,
            master,
            step_threads: Arc::default(),
            inline_masters: AtomicUsize::new(0),
        });
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(services.clone());
        Ok(Server { def, transport, services, slot, stopped: Arc::new((Mutex::new(false), Condvar::new())) })
    }

    /// This server's master for a client in the same process (`RemoteSession::in_process`).
    pub(crate) fn local_master(&self) -> LocalMaster {
        LocalMaster(self.slot.clone())
    }

    /// `tcp://host:port` of this task.
    pub fn target(&self) -> String {
        format!("tcp://{}", self.def.address().unwrap_or("?"))
    }

    pub fn server_def(&self) -> &ServerDef {
        &self.def
    }

    /// Blocks until `stop()` is called (TensorFlow's `server.join()`).
    pub fn join(&self) {
        let (m, cv) = &*self.stopped;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops serving: closes the listener and every connection; `join()` returns.
    pub fn stop(&self) {
        self.services.worker.stop();
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.transport.shutdown();
        self.services.worker.peers().clear();
        let (m, cv) = &*self.stopped;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// `(sent, received)` bytes of this task's connections so far.
    pub fn bytes_transferred(&self) -> (u64, u64) {
        self.transport.bytes_transferred()
    }

    /// `(written, landed)` tensor bytes that went through shared memory instead of a socket:
    /// written for same-host peers, and received from them.
    pub fn shm_bytes_transferred(&self) -> (u64, u64) {
        self.services.worker.peers().data_path().map_or((0, 0), |d| d.bytes_transferred())
    }

    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.transport.local_addr()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
