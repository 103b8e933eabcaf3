//! `RemoteSession`: a session whose master is a server of the cluster (`tcp://host:port`, or a
//! `Server` of this process, called directly). A graph that runs in a `DirectSession` runs
//! unchanged here.

use crate::event_loop::{CallOptions, PeerHandle, Transport, TransportOptions};
use crate::handshake::CLIENT_CLUSTER_ID;
use crate::master::handle_master;
use crate::proto::{decode, encode, pack, unpack, Req, Resp};
use crate::server::{LocalMaster, Server};
use rill_graph::{
    DeviceAttributes, Error, Graph, Output, Result, RunMetadata, RunOptions, Session, SessionOptions, Tensor,
    TraceLevel,
};
use std::net::ToSocketAddrs;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Deadline of session management calls from a client.
pub const CLIENT_CONTROL_TIMEOUT_MS: u64 = 60_000;
/// Deadline of a step that sets no timeout (every wait has one).
pub const CLIENT_STEP_TIMEOUT_DEFAULT_MS: u64 = 24 * 3600 * 1000;

/// Options of a client connection.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    pub secret: Option<Vec<u8>>,
    /// How long a call may spin for a fast answer before it sleeps; `None`: the transport's
    /// default ([`crate::CALL_SPIN`]), zero: never (a client that must not use a core waiting).
    pub call_spin: Option<Duration>,
}

fn parse_target(target: &str) -> Result<std::net::SocketAddr> {
    let hp = target.strip_prefix("tcp://").unwrap_or(target);
    hp.to_socket_addrs()
        .map_err(|e| Error::invalid_argument(format!("bad target '{target}': {e}")))?
        .next()
        .ok_or_else(|| Error::invalid_argument(format!("target '{target}' resolves to no address")))
}

fn dial(target: &str, opts: &ConnectOptions) -> Result<(Transport, PeerHandle)> {
    let addr = parse_target(target)?;
    let t = Transport::start(TransportOptions {
        secret: opts.secret.clone(),
        cluster_id: CLIENT_CLUSTER_ID,
        job: "client".into(),
        call_spin: opts.call_spin.unwrap_or(crate::CALL_SPIN),
        ..Default::default()
    })?;
    let p = t.connect(addr, Instant::now() + Duration::from_millis(CLIENT_CONTROL_TIMEOUT_MS))?;
    Ok((t, p))
}

fn call(
    p: &PeerHandle,
    req: &Req,
    body: Option<crate::BodySource>,
    timeout: Duration,
) -> Result<(Resp, Option<rill_graph::Buffer>)> {
    let r =
        p.call(&encode(req)?, body, CallOptions::timeout(timeout).body_size_max(crate::FRAME_BODY_SIZE_MAX))?;
    Ok((decode(&r.meta)?, r.body))
}

/// A client's connection to its master's server, with the transport that keeps it open.
struct Connection {
    _transport: Transport,
    peer: PeerHandle,
}

/// How a client reaches its master.
enum Channel {
    /// A connection to the master's server (boxed: far larger than the other variant).
    Tcp(Box<Connection>),
    /// The master of a server in this process, called directly: no socket, no event-loop or
    /// handler thread between the client and its steps (TensorFlow's `LocalMaster`).
    InProcess(LocalMaster),
}

/// A client session on a cluster.
pub struct RemoteSession {
    channel: Channel,
    session: u64,
    sent_nodes: Mutex<usize>,
    opts: SessionOptions,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.channel {
            Channel::Tcp(c) => write!(f, "RemoteSession({:x} at {})", self.session, c.peer.addr()),
            Channel::InProcess(_) => write!(f, "RemoteSession({:x} in process)", self.session),
        }
    }
}

impl RemoteSession {
    /// Connects to the server at `target`, which acts as master for this session.
    pub fn connect(target: &str, graph: &Graph, opts: SessionOptions) -> Result<RemoteSession> {
        RemoteSession::connect_with(target, graph, opts, &ConnectOptions::default())
    }

    pub fn connect_with(
        target: &str,
        graph: &Graph,
        opts: SessionOptions,
        copts: &ConnectOptions,
    ) -> Result<RemoteSession> {
        graph.status()?;
        let (transport, peer) = dial(target, copts)?;
        let def = graph.to_graph_def();
        let n = def.nodes.len();
        let timeout = Duration::from_millis(CLIENT_CONTROL_TIMEOUT_MS);
        let session =
            match call(&peer, &Req::CreateSession { graph: def, options: opts.clone() }, None, timeout)?.0 {
                Resp::Session { session } => session,
                other => return Err(Error::internal(format!("CreateSession answered {other:?}"))),
            };
        let channel = Channel::Tcp(Box::new(Connection { _transport: transport, peer }));
        Ok(RemoteSession { channel, session, sent_nodes: Mutex::new(n), opts })
    }

    /// A session whose master is `server`, from the same process: every call goes straight to
    /// the master instead of through a socket to its own address, and fetched values come back
    /// without being packed. Steps, placement and deadlines are those of `connect`.
    pub fn in_process(server: &Server, graph: &Graph, opts: SessionOptions) -> Result<RemoteSession> {
        graph.status()?;
        let local = server.local_master();
        let def = graph.to_graph_def();
        let n = def.nodes.len();
        let session = local.get()?.create_session(def, opts.clone())?;
        Ok(RemoteSession { channel: Channel::InProcess(local), session, sent_nodes: Mutex::new(n), opts })
    }

    /// A master request: over the socket, or to the master in this process.
    fn request(&self, req: Req, timeout: Duration) -> Result<Resp> {
        match &self.channel {
            Channel::Tcp(c) => Ok(call(&c.peer, &req, None, timeout)?.0),
            Channel::InProcess(m) => match handle_master(&m.get()?, req)? {
                (resp, None) => Ok(resp),
                (resp, Some(_)) => Err(Error::internal(format!("{resp:?} came with a body"))),
            },
        }
    }
}

impl Session for RemoteSession {
    fn run_with_metadata(
        &self,
        feeds: &[(Output, Tensor)],
        fetches: &[Output],
        targets: &[Output],
        opts: &RunOptions,
        metadata: Option<&mut RunMetadata>,
    ) -> Result<Vec<Tensor>> {
        let timeout_ms =
            if opts.timeout_in_ms > 0 { opts.timeout_in_ms } else { self.opts.operation_timeout_in_ms };
        let trace = opts.trace_level == TraceLevel::FullTrace;
        let peer = match &self.channel {
            Channel::Tcp(c) => &c.peer,
            Channel::InProcess(m) => {
                // The master enforces the step deadline on this thread.
                let targets: Vec<_> = targets.iter().map(|t| t.node).collect();
                let (out, stats) =
                    m.get()?.run_step(self.session, feeds.to_vec(), fetches, &targets, timeout_ms, trace)?;
                if let (Some(md), Some(st)) = (metadata, stats) {
                    md.step_stats = st;
                }
                return Ok(out);
            }
        };
        let values: Vec<Tensor> = feeds.iter().map(|f| f.1.clone()).collect();
        let packed = pack(&values)?;
        let req = Req::RunStep {
            session: self.session,
            feeds: feeds.iter().map(|f| f.0).collect(),
            fetches: fetches.to_vec(),
            targets: targets.iter().map(|t| t.node).collect(),
            timeout_ms,
            trace,
            feed_values: packed.refs,
        };
        // The master enforces the step deadline; the client allows it time to report.
        let wait = if timeout_ms > 0 {
            Duration::from_millis(timeout_ms) + rill_graph::session::CANCEL_GRACE * 2
        } else {
            Duration::from_millis(CLIENT_STEP_TIMEOUT_DEFAULT_MS)
        };
        match call(peer, &req, packed.body, wait)? {
            (Resp::Step { fetches, stats }, body) => {
                if let (Some(md), Some(st)) = (metadata, stats) {
                    md.step_stats = st;
                }
                unpack(fetches, body)
            }
            (other, _) => Err(Error::internal(format!("RunStep answered {other:?}"))),
        }
    }

    fn extend(&self, graph: &Graph) -> Result<()> {
        graph.status()?;
        let def = graph.to_graph_def();
        let n = def.nodes.len();
        self.request(
            Req::ExtendSession { session: self.session, graph: def },
            Duration::from_millis(CLIENT_CONTROL_TIMEOUT_MS),
        )?;
        *self.sent_nodes.lock().unwrap_or_else(|e| e.into_inner()) = n;
        Ok(())
    }

    fn list_devices(&self) -> Result<Vec<DeviceAttributes>> {
        match self.request(Req::ListDevices, Duration::from_millis(CLIENT_CONTROL_TIMEOUT_MS))? {
            Resp::Devices(d) => Ok(d),
            other => Err(Error::internal(format!("ListDevices answered {other:?}"))),
        }
    }

    fn close(&self) -> Result<()> {
        self.request(
            Req::CloseSession { session: self.session },
            Duration::from_millis(CLIENT_CONTROL_TIMEOUT_MS),
        )
        .map(|_| ())
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Clears resource containers on every task of the cluster served at `target` and closes its
/// sessions (TensorFlow's `tf.Session.reset(target, containers)`); empty = all containers.
pub fn reset(target: &str, containers: &[&str], copts: &ConnectOptions) -> Result<()> {
    let (_t, peer) = dial(target, copts)?;
    let req = Req::Reset { containers: containers.iter().map(|s| s.to_string()).collect() };
    call(&peer, &req, None, Duration::from_millis(CLIENT_CONTROL_TIMEOUT_MS)).map(|_| ())
}
