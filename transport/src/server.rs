//! `Server`: one task of a cluster, hosting a master and a worker behind one transport, bound to
//! the task's own address from the cluster spec.

use crate::cluster::{ClusterSpec, ServerDef};
use crate::event_loop::{Request, Responder, Transport, TransportOptions};
use crate::master::{handle_master, Master};
use crate::proto::{decode, encode, Req};
use crate::worker::{handle_worker, Peers, Worker};
use rill_graph::{Error, Result, Runtime};
use std::net::ToSocketAddrs;
use std::sync::{Arc, Condvar, Mutex};

struct Services {
    worker: Arc<Worker>,
    master: Arc<Master>,
}

impl Services {
    fn handle(self: &Arc<Self>, req: Request, responder: Responder) {
        let parsed = match decode::<Req>(&req.meta) {
            Ok(r) => r,
            Err(e) => {
                let _ = responder.fail(&e);
                return;
            }
        };
        let Some((req, body, responder)) = handle_worker(&self.worker, parsed, req.body, responder) else {
            return;
        };
        // Master requests may wait for whole steps: they run on their own thread so handler
        // threads stay free for the RecvTensor requests those steps depend on.
        let me = self.clone();
        let r = std::thread::Builder::new().name("rill-master-step".into()).spawn(move || {
            let r = handle_master(&me.master, req, body).and_then(|(resp, body)| Ok((encode(&resp)?, body)));
            let _ = match r {
                Ok((meta, body)) => responder.respond(&meta, body),
                Err(e) => responder.fail(&e),
            };
        });
        if let Err(e) = r {
            eprintln!("rill: cannot start a master step thread: {e}");
        }
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
        let transport = Arc::new(Transport::start(TransportOptions {
            bind: Some(addr),
            secret: def.secret.clone(),
            cluster_id: def.cluster.fingerprint(),
            job: def.job_name.clone(),
            task: def.task_index,
            handler: Some(handler),
            ..Default::default()
        })?);
        let peers = Arc::new(Peers::new(def.cluster.clone()));
        let _ = peers.transport.set(transport.clone());
        let worker = Arc::new(Worker::new(task.clone(), devices, runtime.clone(), peers.clone()));
        let master = Arc::new(Master::new(task, worker.clone(), peers, runtime));
        let services = Arc::new(Services { worker, master });
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(services.clone());
        Ok(Server { def, transport, services, slot, stopped: Arc::new((Mutex::new(false), Condvar::new())) })
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

    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.transport.local_addr()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
