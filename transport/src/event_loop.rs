//! The transport: one mio event-loop thread per `Transport` owns the listener, every connection's
//! reading side and the timers; other threads hand it work through a bounded channel and a `Waker`.
//! Requests are answered by a handler that runs on a small pool of threads; an inline handler may
//! first answer those that only start work (a step whose peers are connected) on the loop itself.
//!
//! The loop reads each socket until `WouldBlock`, reading large bodies straight into their
//! destination buffers. Writes go through each connection's `Outbox`: a thread sending a request or
//! an answer while nothing is queued writes it itself (a hand-off to the loop costs a wake-up on
//! each side); the loop writes what the socket did not take, keeping write interest only while
//! bytes are queued. Frames the loop itself produces while handling events are written together
//! once it is done with them (one gather write per peer). Deadlines (calls, handshakes) sit in a timer heap that bounds each `poll`.

use crate::body_pool::BodyPool;
use crate::conn::{CallDone, Called, Conn, ConnectDone, Outbox, PendingCall, Phase, Response};
use crate::dedup::SeenRequests;
use crate::handshake::{random_nonce, Handshake, Identity, PeerInfo};
use crate::wire::{
    from_meta, to_meta, BodyDest, BodySource, Decoded, Frame, FrameKind, FrameLimits, OutFrame, WireError,
};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rill_graph::{Buffer, Code, Error, Result};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default bound on open connections (accepted and dialled): each holds a socket and its queues.
pub const CONNECTIONS_MAX: usize = 1024;
/// Default bound on bytes queued for writing to one peer: a few large tensors in flight; the first
/// frame on an empty queue is always admitted, so one tensor may be larger.
pub const WRITE_QUEUE_SIZE_MAX: u64 = 1 << 30;
/// Default bound on a request body, in bytes: request bodies are allocated as they arrive, so this
/// caps what a peer may make us hold per request.
pub const REQUEST_BODY_SIZE_MAX: u64 = 4 << 30;
/// Default bound on calls awaiting an answer on one connection.
pub const CALLS_IN_FLIGHT_MAX: usize = 65536;
/// Default time a new connection has to finish its handshake.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default handler threads: handlers are expected to hand long waits to callbacks, not to block.
pub const HANDLER_THREADS: usize = 4;
/// Default bound on requests waiting for a handler thread; past it requests get `Unavailable`.
pub const HANDLER_QUEUE_LEN_MAX: usize = 4096;
/// Bound on work queued for the event loop by other threads.
const COMMAND_QUEUE_LEN_MAX: usize = 65536;
/// How long a thread waits for room in a full command queue before giving up.
const COMMAND_SUBMIT_TIMEOUT_MS: u64 = 1_000;
/// Default time a synchronous call spins for its answer before it sleeps, while the recent calls
/// on its connection were answered within it. Waking a sleeping thread costs 20–40 µs on a
/// virtual machine (an idle vCPU must be woken), as much as the round trip itself; a caller that
/// spins through a short call sees the answer as it lands. Longer calls never spin.
pub const CALL_SPIN: Duration = Duration::from_micros(250);
/// Extra wait past a call's deadline before the caller stops trusting the loop's timer.
const DEADLINE_GRACE_MS: u64 = 1_000;
/// Size of the loop's one read buffer for headers, meta and small bodies.
const READ_BUFFER_SIZE: usize = 256 << 10;
/// Bytes read from one socket per readiness event before serving others (then it is revisited).
const READ_BUDGET_SIZE: usize = 64 << 20;
/// Bodies from this size on are read with a raised receive low-water mark.
const BODY_RCVLOWAT_FROM: usize = 1 << 20;
/// The receive low-water mark while such a body arrives.
const BODY_RCVLOWAT: usize = 1 << 20;
/// Readiness events taken per poll.
const EVENTS_LEN_MAX: usize = 1024;
/// Timer heap size past which entries for finished calls are pruned.
const TIMERS_LEN_PRUNE: usize = 65536;

thread_local! {
    /// On an event-loop thread: which transport's loop it is (its `Shared`), and the connections
    /// it wrote frames to while handling its events. The loop flushes them when it is done, so
    /// the frames a batch of events produced for one peer leave in one gather write (on
    /// loopback, one packet and one wake-up of the peer instead of one per frame).
    static CORK: std::cell::RefCell<(usize, Vec<Token>)> = const { std::cell::RefCell::new((0, Vec::new())) };
}

/// Whether this thread is the loop of the transport `shared` belongs to; if so, notes `token`
/// for the loop's flush and the caller only queues its frame.
fn cork(shared: &Arc<Shared>, token: Token) -> bool {
    let me = Arc::as_ptr(shared) as usize;
    CORK.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != me {
            return false;
        }
        if !c.1.contains(&token) {
            c.1.push(token);
        }
        true
    })
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// Bounds on everything a peer or a caller can make the transport hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub connections_max: usize,
    pub frame: FrameLimits,
    pub request_body_size_max: u64,
    pub write_queue_size_max: u64,
    pub calls_in_flight_max: usize,
    pub handshake_timeout_ms: u64,
    pub handler_threads: usize,
    pub handler_queue_len_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: CONNECTIONS_MAX,
            frame: FrameLimits::default(),
            request_body_size_max: REQUEST_BODY_SIZE_MAX,
            write_queue_size_max: WRITE_QUEUE_SIZE_MAX,
            calls_in_flight_max: CALLS_IN_FLIGHT_MAX,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
            handler_threads: HANDLER_THREADS,
            handler_queue_len_max: HANDLER_QUEUE_LEN_MAX,
        }
    }
}

/// Answers requests. It runs on a handler thread and should return soon, answering later through
/// the `Responder` (which may move to any thread) when the answer has to wait.
pub type Handler = Arc<dyn Fn(Request, Responder) + Send + Sync>;

/// Runs on the event-loop thread before a request goes to the handler pool: it answers the
/// requests that never wait (registering a callback, say) and gives the others back. It must not
/// block or run long: every connection of the process waits while it runs.
pub type InlineHandler = Arc<dyn Fn(Request, Responder) -> Option<(Request, Responder)> + Send + Sync>;

/// How to start a transport.
#[derive(Clone)]
pub struct TransportOptions {
    /// Address to listen on (the one in the cluster spec, not every interface); `None`: dial only.
    pub bind: Option<SocketAddr>,
    /// Shared secret; with one, peers must prove they know it.
    pub secret: Option<Vec<u8>>,
    pub cluster_id: u64,
    pub job: String,
    pub task: u32,
    pub incarnation: u64,
    pub handler: Option<Handler>,
    /// Tried first, on the loop thread (see [`InlineHandler`]); needs `handler` too.
    pub inline_handler: Option<InlineHandler>,
    pub limits: Limits,
    /// Offer same-host shared memory to peers (the handshake tells them this host's identity).
    pub shm: bool,
    /// How long a synchronous call may spin for a fast answer (see [`CALL_SPIN`]); zero: never.
    pub call_spin: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            bind: None,
            secret: None,
            cluster_id: 0,
            job: "localhost".into(),
            task: 0,
            incarnation: rill_graph::random_u64(),
            handler: None,
            inline_handler: None,
            limits: Limits::default(),
            shm: crate::cluster::shm_enabled_by_env(),
            call_spin: CALL_SPIN,
        }
    }
}

/// A request from a peer, handed to the `Handler`.
#[derive(Debug)]
pub struct Request {
    pub call_id: u64,
    pub peer: PeerInfo,
    pub peer_addr: SocketAddr,
    pub meta: Vec<u8>,
    pub body: Option<Buffer>,
}

/// Per-call options: a deadline, always, and what response body the caller accepts.
#[derive(Debug)]
pub struct CallOptions {
    pub deadline: Instant,
    /// Largest response body accepted, in bytes; larger ones fail the call (`ResourceExhausted`).
    pub response_body_size_max: u64,
    /// Where the response body goes when its size matches (the receiver names the buffer).
    pub response_buffer: Option<Buffer>,
}

impl CallOptions {
    /// A call that must finish within `timeout` and expects no body.
    pub fn timeout(timeout: Duration) -> CallOptions {
        CallOptions { deadline: Instant::now() + timeout, response_body_size_max: 0, response_buffer: None }
    }

    /// Accepts a response body of up to `size_max` bytes.
    pub fn body_size_max(mut self, size_max: u64) -> CallOptions {
        self.response_body_size_max = size_max;
        self
    }

    /// Receives the response body into `buf` when its size matches.
    pub fn response_buffer(mut self, buf: Buffer) -> CallOptions {
        self.response_body_size_max = self.response_body_size_max.max(buf.len() as u64);
        self.response_buffer = Some(buf);
        self
    }
}

enum Command {
    Register {
        stream: std::net::TcpStream,
        addr: SocketAddr,
        deadline: Instant,
        done: ConnectDone,
    },
    /// Bytes an answering thread could not write at once wait in the connection's outbox.
    Flush {
        token: Token,
    },
    Close {
        token: Token,
    },
}

struct Shared {
    commands: SyncSender<Command>,
    waker: Waker,
    limits: Limits,
    call_spin: Duration,
    /// The next request id: one counter for every connection, so ids name this incarnation's
    /// requests uniquely; taken under a connection's outbox lock, so on each connection they
    /// increase in the order requests are written.
    next_call_id: AtomicU64,
    /// Call deadlines from other threads, for the loop's timer heap.
    timer_inbox: Mutex<Vec<(Instant, Timer)>>,
    /// When the sleeping loop will next look at its timers (nanoseconds since `epoch`;
    /// `u64::MAX` while it is awake, since it drains the inbox before it sleeps).
    wake_at: AtomicU64,
    epoch: Instant,
    shutdown: AtomicBool,
    /// Bytes written to and read from every socket of this transport (frames included).
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl Shared {
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Gives the loop a call's deadline; wakes it only when it sleeps past that deadline.
    fn add_timer(&self, at: Instant, timer: Timer) -> Result<()> {
        self.timer_inbox.lock().unwrap_or_else(|e| e.into_inner()).push((at, timer));
        // An awake loop (`u64::MAX`) drains the inbox before it next sleeps: no wake-up needed.
        let wake_at = self.wake_at.load(Ordering::SeqCst);
        if wake_at != u64::MAX && self.nanos(at) < wake_at {
            self.waker.wake().map_err(|e| Error::internal(format!("waking the event loop: {e}")))?;
        }
        Ok(())
    }

    /// Hands a command to the loop, waiting a bounded time for room in the queue.
    fn submit(&self, mut cmd: Command) -> Result<()> {
        let deadline = Instant::now() + Duration::from_millis(COMMAND_SUBMIT_TIMEOUT_MS);
        loop {
            match self.commands.try_send(cmd) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => {
                    return Err(Error::unavailable("the transport is shut down"))
                }
                Err(TrySendError::Full(c)) if Instant::now() < deadline => {
                    cmd = c;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => {
                    return Err(Error::unavailable(format!(
                        "the transport's command queue stayed full for {COMMAND_SUBMIT_TIMEOUT_MS} ms"
                    )))
                }
            }
        }
        self.waker.wake().map_err(|e| Error::internal(format!("waking the event loop: {e}")))
    }
}

/// A running transport: the event-loop thread and its handler pool. Dropping it shuts both down.
pub struct Transport {
    shared: Arc<Shared>,
    local_addr: Option<SocketAddr>,
    thread: Mutex<Option<JoinHandle<()>>>,
    identity: Identity,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Transport({:?}, /job:{}/task:{})", self.local_addr, self.identity.job, self.identity.task)
    }
}

impl Transport {
    /// Binds (when asked), starts the loop and the handler threads.
    pub fn start(opts: TransportOptions) -> Result<Transport> {
        let limits = opts.limits;
        let poll = Poll::new().map_err(|e| Error::internal(format!("creating a mio poll: {e}")))?;
        let waker = Waker::new(poll.registry(), WAKER)
            .map_err(|e| Error::internal(format!("creating a mio waker: {e}")))?;
        let mut listener = match opts.bind {
            Some(addr) => {
                Some(TcpListener::bind(addr).map_err(|e| Error::from(e).context(format!("binding {addr}")))?)
            }
            None => None,
        };
        let local_addr = match &listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        if let Some(l) = &mut listener {
            poll.registry()
                .register(l, LISTENER, Interest::READABLE)
                .map_err(|e| Error::internal(format!("registering the listener: {e}")))?;
        }
        let (commands, command_rx) = mpsc::sync_channel(COMMAND_QUEUE_LEN_MAX);
        let shared = Arc::new(Shared {
            commands,
            waker,
            limits,
            call_spin: opts.call_spin,
            next_call_id: AtomicU64::new(1),
            timer_inbox: Mutex::new(Vec::new()),
            wake_at: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            shutdown: AtomicBool::new(false),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        });
        let identity = Identity {
            cluster_id: opts.cluster_id,
            job: opts.job.clone(),
            task: opts.task,
            incarnation: opts.incarnation,
            host: if opts.shm { crate::shm::HostInfo::local() } else { None },
        };
        let jobs = match opts.handler {
            Some(handler) => Some(start_handlers(handler, &limits)?),
            None => None,
        };
        let mut lp = Loop {
            poll,
            listener,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            commands: command_rx,
            shared: shared.clone(),
            identity: identity.clone(),
            secret: opts.secret.map(Arc::new),
            jobs,
            inline: opts.inline_handler,
            timers: BinaryHeap::new(),
            read_buf: vec![0; READ_BUFFER_SIZE].into_boxed_slice(),
            seen: SeenRequests::new(),
            body_pool: BodyPool::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("rill-transport-{}-{}", opts.job, opts.task))
            .spawn(move || {
                // Steps continued here (a small tensor arrived) run only what cannot hold the loop up.
                rill_graph::executor::mark_io_thread();
                lp.run()
            })
            .map_err(|e| Error::internal(format!("spawning the event-loop thread: {e}")))?;
        Ok(Transport { shared, local_addr, thread: Mutex::new(Some(thread)), identity })
    }

    /// The address the listener is bound to (with the port the OS chose for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// `(sent, received)` bytes over every connection so far.
    pub fn bytes_transferred(&self) -> (u64, u64) {
        (self.shared.bytes_sent.load(Ordering::Relaxed), self.shared.bytes_received.load(Ordering::Relaxed))
    }

    /// Dials `addr` and runs the handshake, all before `deadline`.
    pub fn connect(&self, addr: SocketAddr, deadline: Instant) -> Result<PeerHandle> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Error::deadline_exceeded(format!("connecting to {addr}: deadline already passed")));
        }
        let stream = std::net::TcpStream::connect_timeout(&addr, remaining)
            .map_err(|e| Error::from(e).context(format!("connecting to {addr}")))
            .map_err(|e| if e.code == Code::Unknown { Error::unavailable(e.msg) } else { e })?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        let (tx, rx) = mpsc::sync_channel(1);
        let done: ConnectDone = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.shared.submit(Command::Register { stream, addr, deadline, done })?;
        let wait =
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(DEADLINE_GRACE_MS);
        let (token, info, out) = match rx.recv_timeout(wait) {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::deadline_exceeded(format!("handshake with {addr} did not finish in time")))
            }
        };
        let name = format!("{addr} ({})", info.name()).into();
        Ok(PeerHandle { shared: self.shared.clone(), token, addr, info, name, out })
    }
}

impl Transport {
    /// Stops the event loop and waits until it has closed its listener and connections (calls
    /// in flight fail with `Unavailable`). Called from the loop's own thread, it does not wait.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        let _ = self.shared.waker.wake();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            // The loop sees the flag at its next wake-up and exits after closing its sockets.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A connection to one peer; cheap to clone. Calls on a closed connection fail with `Unavailable`.
#[derive(Clone)]
pub struct PeerHandle {
    shared: Arc<Shared>,
    token: Token,
    addr: SocketAddr,
    info: PeerInfo,
    /// "127.0.0.1:4000 (/job:ps/task:0)", for errors; made once per connection.
    name: Arc<str>,
    /// The connection's write side: requests are written from the calling thread.
    out: Arc<Outbox>,
}

impl std::fmt::Debug for PeerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerHandle({} {})", self.addr, self.info.name())
    }
}

impl PeerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn info(&self) -> &PeerInfo {
        &self.info
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// Sends a request and calls `done` with the answer, an error from the peer, `DeadlineExceeded`
    /// at the deadline, or `Unavailable` when the connection drops. `done` runs on the event-loop
    /// thread and must not block. The request is written from this thread when nothing is queued
    /// before it. An `Err` means nothing was sent and `done` will not run.
    pub fn call_async(
        &self,
        meta: &[u8],
        body: Option<BodySource>,
        opts: CallOptions,
        done: CallDone,
    ) -> Result<()> {
        let frame = OutFrame::new(FrameKind::Request, 0, meta, body, &self.shared.limits.frame)
            .map_err(|e| e.context(format!("call to {}", self.name())))?;
        let pending = PendingCall {
            done,
            deadline: opts.deadline,
            response_body_size_max: opts.response_body_size_max,
            response_buffer: opts.response_buffer,
            refused: None,
        };
        let deadline = pending.deadline;
        let limits = &self.shared.limits;
        let corked = cork(&self.shared, self.token);
        match self.out.call(
            frame,
            pending,
            &self.shared.next_call_id,
            limits.calls_in_flight_max,
            limits.write_queue_size_max,
            &self.shared.bytes_sent,
            !corked,
        ) {
            Called::Refused(e) => Err(Error::new(e.code, format!("call to {}: {}", self.name(), e.msg))),
            Called::Sent { call_id, more } => {
                self.shared.add_timer(deadline, Timer::Call { token: self.token.0, call_id })?;
                if more {
                    self.shared.submit(Command::Flush { token: self.token })?;
                }
                Ok(())
            }
        }
    }

    /// Sends a request and waits for its answer until `opts.deadline`.
    pub fn call(&self, meta: &[u8], body: Option<BodySource>, opts: CallOptions) -> Result<Response> {
        let deadline = opts.deadline;
        let (tx, rx) = mpsc::sync_channel(1);
        self.call_async(
            meta,
            body,
            opts,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        let started = Instant::now();
        let spin = self.shared.call_spin;
        let recent = Duration::from_nanos(self.out.recent_call_ns.load(Ordering::Relaxed));
        if !spin.is_zero() && recent <= spin {
            while started.elapsed() < spin {
                match rx.try_recv() {
                    Ok(r) => {
                        self.note_call_time(started.elapsed());
                        return r;
                    }
                    Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
        }
        // The loop's timer answers at the deadline; the grace only guards against a stuck loop.
        let wait =
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(DEADLINE_GRACE_MS);
        let r = rx.recv_timeout(wait).unwrap_or_else(|_| {
            Err(Error::deadline_exceeded(format!(
                "call to {} got no answer from the event loop",
                self.name()
            )))
        });
        self.note_call_time(started.elapsed());
        r
    }

    /// Folds one call's duration into the connection's moving average (weight 1/4).
    fn note_call_time(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let old = self.out.recent_call_ns.load(Ordering::Relaxed);
        let new = old - old / 4 + took / 4;
        self.out.recent_call_ns.store(new, Ordering::Relaxed);
    }

    /// Closes the connection; calls in flight fail with `Unavailable`.
    pub fn close(&self) -> Result<()> {
        self.shared.submit(Command::Close { token: self.token })
    }
}

/// Answers one request, from any thread. Dropping it unanswered answers `Internal`.
pub struct Responder {
    shared: Arc<Shared>,
    out: Arc<Outbox>,
    token: Token,
    call_id: u64,
    answered: bool,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Responder(call {})", self.call_id)
    }
}

impl Responder {
    pub fn call_id(&self) -> u64 {
        self.call_id
    }

    /// Answers with `meta` and an optional body (written from its buffer without a copy).
    pub fn respond(mut self, meta: &[u8], body: Option<BodySource>) -> Result<()> {
        let frame =
            match OutFrame::new(FrameKind::Response, self.call_id, meta, body, &self.shared.limits.frame) {
                Ok(f) => f,
                Err(e) => {
                    let err = e.context("response");
                    self.send_error(&err)?;
                    return Err(err);
                }
            };
        self.answered = true;
        self.send(frame, FrameKind::Response)
    }

    /// Writes the answer from this thread when the connection's queue is empty, else leaves it to
    /// the loop; the loop is woken only when bytes remain or the write failed.
    fn send(&self, frame: OutFrame, kind: FrameKind) -> Result<()> {
        let limits = &self.shared.limits;
        let corked = cork(&self.shared, self.token);
        let more = self.out.send(
            frame,
            kind,
            self.call_id,
            &limits.frame,
            limits.write_queue_size_max,
            &self.shared.bytes_sent,
            !corked,
        );
        if more {
            self.shared.submit(Command::Flush { token: self.token })?;
        }
        Ok(())
    }

    /// Answers with an error; its code keeps its meaning on the caller's side.
    pub fn fail(mut self, err: &Error) -> Result<()> {
        self.send_error(err)
    }

    fn send_error(&mut self, err: &Error) -> Result<()> {
        self.answered = true;
        let meta = to_meta(&WireError::from(err))?;
        let frame = OutFrame::new(FrameKind::Error, self.call_id, &meta, None, &self.shared.limits.frame)?;
        self.send(frame, FrameKind::Error)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self
                .send_error(&Error::internal("the request handler dropped the request without answering"));
        }
    }
}

/// Requests waiting for a handler thread. One condition variable wakes exactly one idle thread per
/// request (a channel behind a mutex would wake a second thread to take over the receiver).
struct HandlerQueue {
    state: Mutex<(VecDeque<(Request, Responder)>, bool)>,
    ready: Condvar,
    len_max: usize,
}

impl HandlerQueue {
    /// Queues a request; gives it back when the queue is full (or closed).
    fn push(&self, job: (Request, Responder)) -> Option<(Request, Responder)> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 || g.0.len() >= self.len_max {
            return Some(job);
        }
        g.0.push_back(job);
        drop(g);
        self.ready.notify_one();
        None
    }

    /// The next request, or `None` once the queue is closed and empty.
    fn pop(&self) -> Option<(Request, Responder)> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(job) = g.0.pop_front() {
                return Some(job);
            }
            if g.1 {
                return None;
            }
            g = self.ready.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.ready.notify_all();
    }
}

/// Closes the handler queue when the loop ends, so the handler threads finish.
struct Jobs(Arc<HandlerQueue>);

impl Drop for Jobs {
    fn drop(&mut self) {
        self.0.close();
    }
}

fn start_handlers(handler: Handler, limits: &Limits) -> Result<Jobs> {
    let queue = Arc::new(HandlerQueue {
        state: Mutex::new((VecDeque::new(), false)),
        ready: Condvar::new(),
        len_max: limits.handler_queue_len_max,
    });
    for i in 0..limits.handler_threads.max(1) {
        let (queue, handler) = (queue.clone(), handler.clone());
        std::thread::Builder::new()
            .name(format!("rill-handler-{i}"))
            .spawn(move || handler_thread(&queue, handler))
            .map_err(|e| Error::internal(format!("spawning a handler thread: {e}")))?;
    }
    Ok(Jobs(queue))
}

/// Runs requests until the loop closes the queue; a panicking handler answers `Internal` (its
/// `Responder` is dropped while unwinding) and the thread lives on.
fn handler_thread(queue: &HandlerQueue, handler: Handler) {
    while let Some((req, responder)) = queue.pop() {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(req, responder))).is_err() {
            eprintln!("rill-transport: a request handler panicked; the call was answered with Internal");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Call { token: usize, call_id: u64 },
    Handshake { token: usize },
}

struct Loop {
    poll: Poll,
    listener: Option<TcpListener>,
    /// The connection slab: tokens are never reused, so a stale token finds nothing.
    conns: HashMap<Token, Conn>,
    next_token: usize,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    identity: Identity,
    secret: Option<Arc<Vec<u8>>>,
    jobs: Option<Jobs>,
    inline: Option<InlineHandler>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    read_buf: Box<[u8]>,
    seen: SeenRequests,
    body_pool: Arc<BodyPool>,
}

impl Loop {
    fn run(&mut self) {
        CORK.with(|c| c.borrow_mut().0 = Arc::as_ptr(&self.shared) as usize);
        let mut events = Events::with_capacity(EVENTS_LEN_MAX);
        // Connections that hit their read budget and must be read again without a new event.
        let mut again: Vec<Token> = Vec::new();
        while !self.shared.shutdown.load(Ordering::Acquire) {
            // Publish the planned wake-up before draining the inbox: a deadline added after the
            // drain sees it and wakes the loop when it is earlier.
            let next =
                |timers: &BinaryHeap<Reverse<(Instant, Timer)>>| timers.peek().map(|Reverse((at, _))| *at);
            self.shared
                .wake_at
                .store(next(&self.timers).map_or(u64::MAX - 1, |at| self.shared.nanos(at)), Ordering::SeqCst);
            self.drain_timer_inbox();
            let planned = next(&self.timers);
            if let Some(at) = planned {
                self.shared.wake_at.fetch_min(self.shared.nanos(at), Ordering::SeqCst);
            }
            let timeout = if again.is_empty() {
                planned.map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            let polled = self.poll.poll(&mut events, timeout);
            self.shared.wake_at.store(u64::MAX, Ordering::SeqCst);
            if let Err(e) = polled {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("rill-transport: poll failed, the event loop stops: {e}");
                break;
            }
            let mut ready: Vec<(Token, bool)> = events
                .iter()
                .map(|e| (e.token(), e.is_readable() || e.is_read_closed() || e.is_error()))
                .collect();
            ready.extend(again.drain(..).map(|t| (t, true)));
            for (token, readable) in ready {
                match token {
                    LISTENER => self.accept(),
                    WAKER => self.drain_commands(),
                    t => {
                        if self.conn_io(t, readable) {
                            again.push(t);
                        }
                    }
                }
            }
            // Commands may arrive between a wake and its event; a cheap check keeps latency low.
            self.drain_commands();
            self.fire_timers();
            self.flush_corked();
        }
        CORK.with(|c| *c.borrow_mut() = (0, Vec::new()));
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            self.close(t, Error::unavailable("the transport is shutting down"));
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            let (mut stream, addr) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("rill-transport: accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= self.shared.limits.connections_max {
                eprintln!(
                    "rill-transport: refusing {addr}: {} connections open (connections_max)",
                    self.conns.len()
                );
                continue;
            }
            let _ = stream.set_nodelay(true);
            let token = self.next_token();
            if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE) {
                eprintln!("rill-transport: registering {addr}: {e}");
                continue;
            }
            let nonce = match random_nonce() {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("rill-transport: refusing {addr}: {e}");
                    continue;
                }
            };
            let hs = Handshake::server(self.identity.clone(), self.secret.clone(), nonce);
            let conn = match Conn::new(
                stream,
                addr,
                Phase::Handshaking { hs, done: None },
                self.shared.limits.frame,
            ) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("rill-transport: refusing {addr}: {e}");
                    continue;
                }
            };
            self.conns.insert(token, conn);
            let at = Instant::now() + Duration::from_millis(self.shared.limits.handshake_timeout_ms);
            self.timers.push(Reverse((at, Timer::Handshake { token: token.0 })));
        }
    }

    fn drain_timer_inbox(&mut self) {
        let added = std::mem::take(&mut *self.shared.timer_inbox.lock().unwrap_or_else(|e| e.into_inner()));
        self.timers.extend(added.into_iter().map(Reverse));
    }

    fn next_token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn drain_commands(&mut self) {
        // Bounded by the channel's capacity: at most one queue's worth per turn.
        for _ in 0..COMMAND_QUEUE_LEN_MAX {
            let Ok(cmd) = self.commands.try_recv() else { return };
            self.command(cmd);
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Register { stream, addr, deadline, done } => self.register(stream, addr, deadline, done),
            Command::Flush { token } => {
                let Some(conn) = self.conns.remove(&token) else { return };
                self.finish_io(token, conn);
            }
            Command::Close { token } => self.close(token, Error::unavailable("closed by this process")),
        }
    }

    fn register(
        &mut self,
        stream: std::net::TcpStream,
        addr: SocketAddr,
        deadline: Instant,
        done: ConnectDone,
    ) {
        if self.conns.len() >= self.shared.limits.connections_max {
            done(Err(Error::resource_exhausted(format!(
                "connecting to {addr}: {} connections open (connections_max)",
                self.conns.len()
            ))));
            return;
        }
        let mut stream = TcpStream::from_std(stream);
        let token = self.next_token();
        let opened = random_nonce()
            .and_then(|nonce| Handshake::client(self.identity.clone(), self.secret.clone(), nonce))
            .and_then(|(hs, (kind, meta))| {
                self.poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE)
                    .map_err(|e| Error::internal(format!("registering the connection to {addr}: {e}")))?;
                Ok((hs, kind, meta))
            });
        let (hs, kind, meta) = match opened {
            Ok(x) => x,
            Err(e) => return done(Err(e)),
        };
        let mut conn =
            match Conn::new(stream, addr, Phase::Handshaking { hs, done: None }, self.shared.limits.frame) {
                Ok(c) => c,
                Err(e) => return done(Err(e)),
            };
        if let Phase::Handshaking { done: slot, .. } = &mut conn.phase {
            *slot = Some(done);
        }
        if let Err(e) = conn.enqueue_control(kind, 0, &meta) {
            if let Phase::Handshaking { done: Some(done), .. } = conn.phase {
                done(Err(e));
            }
            return;
        }
        let hs_deadline =
            deadline.min(Instant::now() + Duration::from_millis(self.shared.limits.handshake_timeout_ms));
        self.timers.push(Reverse((hs_deadline, Timer::Handshake { token: token.0 })));
        self.finish_io(token, conn);
    }

    /// Reads and writes one connection; returns whether it stopped on its read budget.
    /// Writes are attempted whenever the queue is non-empty, so writability needs no branch here.
    /// Writes the frames this loop's own handlers and callbacks queued while it handled its
    /// events (see `CORK`); writing may fail calls, whose callbacks may queue more.
    fn flush_corked(&mut self) {
        loop {
            let tokens = CORK.with(|c| std::mem::take(&mut c.borrow_mut().1));
            if tokens.is_empty() {
                return;
            }
            for t in tokens {
                if let Some(conn) = self.conns.remove(&t) {
                    self.finish_io(t, conn);
                }
            }
        }
    }

    fn conn_io(&mut self, token: Token, readable: bool) -> bool {
        let Some(mut conn) = self.conns.remove(&token) else { return false };
        let mut more = false;
        if readable {
            match self.read(token, &mut conn) {
                Ok(m) => more = m,
                Err(e) => {
                    self.drop_conn(conn, e);
                    return false;
                }
            }
        }
        self.finish_io(token, conn);
        more && self.conns.contains_key(&token)
    }

    /// Flushes, then keeps the connection (with write interest only if bytes remain) or closes it.
    fn finish_io(&mut self, token: Token, mut conn: Conn) {
        match conn.flush() {
            Ok(n) => {
                self.shared.bytes_sent.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.drop_conn(conn, Error::unavailable(format!("writing: {e}")));
                return;
            }
        }
        conn.invariants();
        if let Some(reason) = &conn.closing {
            if conn.queue_is_empty() {
                let reason = reason.clone();
                self.drop_conn(conn, reason);
                return;
            }
        }
        let want_write = !conn.queue_is_empty();
        if want_write != conn.write_interest {
            let interest =
                if want_write { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if let Err(e) = self.poll.registry().reregister(&mut conn.stream, token, interest) {
                self.drop_conn(conn, Error::internal(format!("reregistering: {e}")));
                return;
            }
            conn.write_interest = want_write;
        }
        self.conns.insert(token, conn);
    }

    /// Reads until `WouldBlock` (or the read budget); bodies with a fixed destination are read
    /// straight into it.
    fn read(&mut self, token: Token, conn: &mut Conn) -> Result<bool> {
        let mut budget = READ_BUDGET_SIZE;
        while budget > 0 && conn.closing.is_none() {
            if let Some(spare) = conn.decoder.body_spare_mut() {
                let want = body_rcvlowat(conn.rcvlowat, spare.len());
                if want != conn.rcvlowat {
                    set_rcvlowat(&conn.stream, want, &conn.addr)?;
                    conn.rcvlowat = want;
                }
                let n = match read_some(&mut conn.stream, spare, &conn.addr)? {
                    Some(n) => n,
                    None => return Ok(false),
                };
                self.shared.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                budget = budget.saturating_sub(n);
                if let Some(frame) = conn.decoder.advance_body(n) {
                    if conn.rcvlowat != 1 {
                        set_rcvlowat(&conn.stream, 1, &conn.addr)?;
                        conn.rcvlowat = 1;
                    }
                    self.on_frame(token, conn, frame)?;
                }
                continue;
            }
            let n = match read_some(&mut conn.stream, &mut self.read_buf, &conn.addr)? {
                Some(n) => n,
                None => return Ok(false),
            };
            self.shared.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
            budget = budget.saturating_sub(n);
            let mut off = 0;
            // Each turn consumes bytes or stops; a frame has at least its 32-byte header.
            while off < n && conn.closing.is_none() {
                let (used, decoded) = conn.decoder.feed(&self.read_buf[off..n])?;
                off += used;
                match decoded {
                    Decoded::NeedMore => {}
                    Decoded::BodyWanted => self.choose_body_dest(conn)?,
                    Decoded::Frame(f) => self.on_frame(token, conn, f)?,
                }
            }
        }
        Ok(budget == 0)
    }

    /// Names where a declared body goes: a caller's buffer, a fresh buffer within the caller's
    /// bound, a growing buffer for requests within `request_body_size_max`, or nowhere.
    fn choose_body_dest(&mut self, conn: &mut Conn) -> Result<()> {
        let header = *conn.decoder.pending_header().expect("a body is wanted");
        let dest = match header.kind {
            FrameKind::Request if !conn.is_open() => {
                return Err(Error::invalid_argument("a request arrived before the handshake finished"))
            }
            FrameKind::Request if header.body_len > self.shared.limits.request_body_size_max => {
                conn.refused_request = Some(Error::resource_exhausted(format!(
                    "request body of {} bytes exceeds request_body_size_max ({} bytes)",
                    header.body_len, self.shared.limits.request_body_size_max
                )));
                BodyDest::Discard
            }
            FrameKind::Request => BodyDest::Grow,
            FrameKind::Response => match conn.out.lock().pending.get_mut(&header.call_id) {
                None => BodyDest::Discard,
                Some(p) => match p.response_buffer.take() {
                    Some(buf) if buf.len() as u64 == header.body_len => BodyDest::Buffer(buf),
                    _ if header.body_len <= p.response_body_size_max => {
                        BodyDest::Buffer(self.body_pool.buffer(header.body_len as usize))
                    }
                    _ => {
                        p.refused = Some(Error::resource_exhausted(format!(
                            "response body of {} bytes exceeds the caller's bound of {} bytes",
                            header.body_len, p.response_body_size_max
                        )));
                        BodyDest::Discard
                    }
                },
            },
            kind => return Err(Error::invalid_argument(format!("a {kind:?} frame with a body"))),
        };
        conn.decoder.set_body_dest(dest)
    }

    fn on_frame(&mut self, token: Token, conn: &mut Conn, frame: Frame) -> Result<()> {
        let Frame { header, meta, body } = frame;
        match (header.kind, &mut conn.phase) {
            (FrameKind::Error | FrameKind::Close, _) if header.call_id == 0 => {
                let e: Error = from_meta::<WireError>(&meta, "Error")?.into();
                let code = if header.kind == FrameKind::Close { Code::Unavailable } else { e.code };
                Err(Error::new(code, format!("{} closed the connection: {}", conn.name(), e.msg)))
            }
            (kind, Phase::Handshaking { .. }) => on_handshake_frame(token, conn, kind, &meta),
            (FrameKind::Request, Phase::Open(peer)) => {
                let call_id = header.call_id;
                let refused = conn.refused_request.take();
                if let Err(e) = self.seen.admit(peer, call_id) {
                    eprintln!("rill-transport: refusing a request from {}: {e}", conn.addr);
                    return answer_error(conn, call_id, &e);
                }
                if let Some(e) = refused {
                    return answer_error(conn, call_id, &e);
                }
                let Some(jobs) = &self.jobs else {
                    return answer_error(
                        conn,
                        call_id,
                        &Error::unimplemented("this process serves no requests"),
                    );
                };
                let req = Request { call_id, peer: peer.clone(), peer_addr: conn.addr, meta, body };
                let responder = Responder {
                    shared: self.shared.clone(),
                    out: conn.out.clone(),
                    token,
                    call_id,
                    answered: false,
                };
                let (req, responder) = match &self.inline {
                    Some(inline) => {
                        let run = std::panic::AssertUnwindSafe(|| inline(req, responder));
                        match std::panic::catch_unwind(run) {
                            Ok(Some(back)) => back,
                            Ok(None) => return Ok(()),
                            // Its `Responder` was dropped while unwinding and answered `Internal`.
                            Err(_) => {
                                eprintln!("rill-transport: an inline request handler panicked");
                                return Ok(());
                            }
                        }
                    }
                    None => (req, responder),
                };
                match jobs.0.push((req, responder)) {
                    None => Ok(()),
                    Some((_, mut r)) => {
                        // Answered here, not through the queue: we are the loop.
                        r.answered = true;
                        answer_error(
                            conn,
                            call_id,
                            &Error::unavailable("the server is busy: its handler queue is full"),
                        )
                    }
                }
            }
            (FrameKind::Response | FrameKind::Error, Phase::Open(_)) => {
                let removed = conn.out.lock().pending.remove(&header.call_id);
                let Some(p) = removed else { return Ok(()) };
                let result = if let Some(e) = p.refused {
                    Err(e)
                } else if header.kind == FrameKind::Error {
                    Err(from_meta::<WireError>(&meta, "Error")?.into())
                } else {
                    Ok(Response { meta, body })
                };
                (p.done)(result);
                Ok(())
            }
            (FrameKind::Ping, Phase::Open(_)) => conn.enqueue_control(FrameKind::Pong, header.call_id, &[]),
            (FrameKind::Pong, Phase::Open(_)) => Ok(()),
            (kind, Phase::Open(_)) => Err(Error::invalid_argument(format!("unexpected {kind:?} frame"))),
        }
    }

    fn close(&mut self, token: Token, reason: Error) {
        if let Some(mut conn) = self.conns.remove(&token) {
            if conn.is_open() {
                // Best effort: a peer that reads it learns why its calls fail.
                if to_meta(&WireError::from(&reason))
                    .and_then(|m| conn.enqueue_control(FrameKind::Close, 0, &m))
                    .is_ok()
                {
                    let _ = conn.flush();
                }
            }
            self.drop_conn(conn, reason);
        }
    }

    /// Deregisters and drops a connection, failing everything that waited on it.
    fn drop_conn(&mut self, mut conn: Conn, reason: Error) {
        let name = conn.name();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        conn.shut();
        // Orderly closes and vanished peers are `Unavailable`; everything else is worth a line.
        if reason.code != Code::Unavailable {
            eprintln!("rill-transport: closing the connection to {name}: {reason}");
        }
        if let Phase::Handshaking { done: Some(done), .. } = conn.phase {
            done(Err(Error::new(reason.code, format!("handshake with {name}: {}", reason.msg))));
        }
        let pending: Vec<PendingCall> = conn.out.lock().pending.drain().map(|(_, p)| p).collect();
        for p in pending {
            (p.done)(Err(Error::unavailable(format!("the connection to {name} closed: {reason}"))));
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Call { token, call_id } => {
                    let Some(conn) = self.conns.get_mut(&Token(token)) else { continue };
                    let due = {
                        let mut g = conn.out.lock();
                        match g.pending.get(&call_id) {
                            Some(p) if p.deadline <= now => g.pending.remove(&call_id),
                            _ => None,
                        }
                    };
                    if let Some(p) = due {
                        (p.done)(Err(Error::deadline_exceeded(format!(
                            "call {call_id} to {} passed its deadline without an answer",
                            conn.name()
                        ))));
                    }
                }
                Timer::Handshake { token } => {
                    if self.conns.get(&Token(token)).is_some_and(|c| !c.is_open()) {
                        let conn = self.conns.remove(&Token(token)).expect("checked above");
                        let e = Error::deadline_exceeded(format!(
                            "the handshake with {} did not finish in time",
                            conn.addr
                        ));
                        self.drop_conn(conn, e);
                    }
                }
            }
        }
        if self.timers.len() > TIMERS_LEN_PRUNE {
            let conns = &self.conns;
            self.timers.retain(|Reverse((_, t))| match *t {
                Timer::Call { token, call_id } => {
                    conns.get(&Token(token)).is_some_and(|c| c.out.lock().pending.contains_key(&call_id))
                }
                Timer::Handshake { token } => conns.get(&Token(token)).is_some_and(|c| !c.is_open()),
            });
        }
    }
}

fn on_handshake_frame(token: Token, conn: &mut Conn, kind: FrameKind, meta: &[u8]) -> Result<()> {
    let Phase::Handshaking { hs, .. } = &mut conn.phase else { unreachable!("called while handshaking") };
    match hs.on_frame(kind, meta) {
        Ok(step) => {
            if let Some((kind, meta)) = step.send {
                conn.enqueue_control(kind, 0, &meta)?;
            }
            if let Some(peer) = step.done {
                if let Phase::Handshaking { done: Some(done), .. } =
                    std::mem::replace(&mut conn.phase, Phase::Open(peer.clone()))
                {
                    done(Ok((token, peer, conn.out.clone())));
                }
            }
            Ok(())
        }
        Err(e) => {
            // Tell the peer why, then close once that is written.
            let _ = to_meta(&WireError::from(&e)).and_then(|m| conn.enqueue_control(FrameKind::Error, 0, &m));
            if let Phase::Handshaking { done, .. } = &mut conn.phase {
                if let Some(done) = done.take() {
                    done(Err(e.clone()));
                }
            }
            eprintln!("rill-transport: refusing {}: {e}", conn.addr);
            conn.closing = Some(e);
            Ok(())
        }
    }
}

fn answer_error(conn: &mut Conn, call_id: u64, e: &Error) -> Result<()> {
    conn.enqueue_control(FrameKind::Error, call_id, &to_meta(&WireError::from(e))?)
}

/// One read: `Some(n)` bytes, `None` at `WouldBlock`, an error at end of stream or failure.
fn read_some(stream: &mut TcpStream, buf: &mut [u8], addr: &SocketAddr) -> Result<Option<usize>> {
    loop {
        return match stream.read(buf) {
            Ok(0) => Err(Error::unavailable(format!("{addr}: end of stream"))),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Err(Error::unavailable(format!("reading from {addr}: {e}"))),
        };
    }
}

/// The receive low-water mark while `spare` bytes of a body are still owed: from
/// `BODY_RCVLOWAT_FROM` on, the socket wakes the loop only once `BODY_RCVLOWAT` bytes (or the
/// rest of the body) have arrived, so a large tensor is read in a few large reads instead of
/// hundreds of wake-ups for 64 KiB each. Never more than the body still owes, or the last bytes
/// would not wake anyone (end of stream and errors wake the loop whatever the mark).
fn body_rcvlowat(current: usize, spare: usize) -> usize {
    if current > 1 {
        current.min(spare).max(1)
    } else if spare >= BODY_RCVLOWAT_FROM {
        spare.min(BODY_RCVLOWAT)
    } else {
        1
    }
}

/// Sets `SO_RCVLOWAT`. A failure is an error of the connection: a mark left above what the body
/// still owes would stall it.
#[allow(unsafe_code)]
fn set_rcvlowat(s: &TcpStream, v: usize, addr: &SocketAddr) -> Result<()> {
    use std::os::fd::AsRawFd;
    let v = nix::libc::c_int::try_from(v).unwrap_or(nix::libc::c_int::MAX);
    // SAFETY: a socket this connection owns and a `c_int` option value of the size passed.
    let r = unsafe {
        nix::libc::setsockopt(
            s.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_RCVLOWAT,
            (&v as *const nix::libc::c_int).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::unavailable(format!("{addr}: setting the receive low-water mark: {e}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{body_rcvlowat, BODY_RCVLOWAT, BODY_RCVLOWAT_FROM};

    #[test]
    fn the_low_water_mark_never_waits_for_more_than_the_body_owes() {
        // (current mark, bytes the body still owes) -> mark
        let table = [
            (1, 0, 1),
            (1, 4096, 1),
            (1, BODY_RCVLOWAT_FROM - 1, 1),
            (1, BODY_RCVLOWAT_FROM, BODY_RCVLOWAT_FROM.min(BODY_RCVLOWAT)),
            (1, 64 << 20, BODY_RCVLOWAT),
            (BODY_RCVLOWAT, 64 << 20, BODY_RCVLOWAT),
            (BODY_RCVLOWAT, 1000, 1000),
            (1000, 10, 10),
            (10, 0, 1),
        ];
        for (current, spare, want) in table {
            assert_eq!(body_rcvlowat(current, spare), want, "mark {current}, {spare} bytes owed");
        }
        // Walk a body down as reads of odd sizes arrive: the mark never exceeds what is owed.
        let mut mark = 1;
        let mut owed = (3 << 20) + 12345;
        while owed > 0 {
            mark = body_rcvlowat(mark, owed);
            assert!(mark <= owed.max(1));
            owed -= owed.min(700_001);
        }
    }
}
