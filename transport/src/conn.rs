//! One connection as the event loop sees it: the socket, the frame decoder, the write side
//! (`Outbox`, shared with the threads that answer requests), the handshake and the calls waiting
//! for an answer. Reading and writing stop at `WouldBlock`.

use crate::handshake::{Handshake, PeerInfo};
use crate::wire::{to_meta, FrameDecoder, FrameKind, FrameLimits, OutFrame, WireError};
use mio::net::TcpStream;
use mio::Token;
use rill_graph::{Buffer, Error, Result};
use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Most slices handed to one `write_vectored` (two per frame: head and body).
const WRITE_SLICES_MAX: usize = 64;

/// What a finished call hands back: the peer's meta and, when one was sent, its body.
#[derive(Debug)]
pub struct Response {
    pub meta: Vec<u8>,
    pub body: Option<Buffer>,
}

/// Called once with a call's outcome, on the event-loop thread: it must not block.
pub type CallDone = Box<dyn FnOnce(Result<Response>) + Send>;
/// Called once when a connection is established or refused, on the event-loop thread.
pub type ConnectDone = Box<dyn FnOnce(Result<(Token, PeerInfo, Arc<Outbox>)>) + Send>;

/// A call sent on this connection and not yet answered.
pub struct PendingCall {
    pub done: CallDone,
    pub deadline: Instant,
    /// Largest response body the caller accepts, in bytes.
    pub response_body_size_max: u64,
    /// The caller's destination for the response body, used when the sizes match.
    pub response_buffer: Option<Buffer>,
    /// Set when the response body was refused, so the call fails when the frame ends.
    pub refused: Option<Error>,
}

pub enum Phase {
    Handshaking { hs: Handshake, done: Option<ConnectDone> },
    Open(PeerInfo),
}

pub struct Conn {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    pub decoder: FrameDecoder,
    pub phase: Phase,
    /// The write side, shared with the threads that answer this connection's requests.
    pub out: Arc<Outbox>,
    /// Whether the socket is registered for writability (only while the write queue is non-empty).
    pub write_interest: bool,
    /// Flush what is queued, then close (after sending a refusal).
    pub closing: Option<Error>,
    /// The body of the request being received was refused (too large); answer with this error.
    pub refused_request: Option<Error>,
    /// The socket's receive low-water mark as last set (1 unless a large body is arriving).
    pub rcvlowat: usize,
    limits: FrameLimits,
}

impl Conn {
    pub fn new(stream: TcpStream, addr: SocketAddr, phase: Phase, limits: FrameLimits) -> Result<Conn> {
        let out = Arc::new(Outbox::new(&stream)?);
        Ok(Conn {
            stream,
            addr,
            decoder: FrameDecoder::new(limits),
            phase,
            out,
            write_interest: false,
            closing: None,
            refused_request: None,
            rcvlowat: 1,
            limits,
        })
    }

    /// "127.0.0.1:4000 (/job:ps/task:0)" once the peer is known, the address before.
    pub fn name(&self) -> String {
        match &self.phase {
            Phase::Open(p) => format!("{} ({})", self.addr, p.name()),
            Phase::Handshaking { .. } => self.addr.to_string(),
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    pub fn queue_is_empty(&self) -> bool {
        self.out.lock().queue.is_empty()
    }

    /// Queues a frame (see `OutState::enqueue`), naming the peer in a refusal.
    pub fn enqueue(&mut self, frame: OutFrame, kind: FrameKind, queue_size_max: u64) -> Result<()> {
        let r = self.out.lock().enqueue(frame, kind, queue_size_max);
        r.map_err(|e| e.context(format!("write queue to {}", self.name())))
    }

    /// Queues a control frame with no body.
    pub fn enqueue_control(&mut self, kind: FrameKind, call_id: u64, meta: &[u8]) -> Result<()> {
        let frame = OutFrame::new(kind, call_id, meta, None, &self.limits)?;
        self.enqueue(frame, kind, u64::MAX)
    }

    /// Writes queued frames until the queue is empty or the socket is full; returns the bytes
    /// written. A write that failed on another thread fails here.
    pub fn flush(&mut self) -> std::io::Result<u64> {
        self.out.lock().flush()
    }

    /// Marks the write side closed (answers still in flight on other threads are dropped) and
    /// shuts the socket down, so the peer sees the end even while other threads hold the outbox.
    pub fn shut(&mut self) {
        self.out.lock().closed = true;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Checks the bookkeeping (debug builds): queued bytes match the queue.
    pub fn invariants(&self) {
        let g = self.out.lock();
        debug_assert_eq!(g.queued_bytes, g.queue.iter().map(|f| f.remaining() as u64).sum::<u64>());
    }
}

/// The write side of a connection. The event loop and the threads answering requests both write
/// through it: a frame sent while nothing is queued goes straight to the socket from the sending
/// thread (no hand-off to the loop); bytes the socket does not take at once stay queued for the
/// loop, which writes them when the socket is writable. Order is the queue's.
pub struct Outbox {
    state: Mutex<OutState>,
    /// Moving average of how long synchronous calls on this connection took, in nanoseconds:
    /// a caller spins for an answer only while they are short.
    pub recent_call_ns: AtomicU64,
}

pub struct OutState {
    /// A second descriptor of the socket, for writing from any thread.
    stream: std::net::TcpStream,
    /// Calls written on this connection and not yet answered, by request id.
    pub pending: HashMap<u64, PendingCall>,
    queue: VecDeque<OutFrame>,
    queued_bytes: u64,
    /// The connection is gone: frames are dropped.
    pub closed: bool,
    /// A write on another thread failed; the loop closes the connection with this.
    failed: Option<std::io::Error>,
}

impl Outbox {
    fn new(stream: &TcpStream) -> Result<Outbox> {
        let fd = stream
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::unavailable(format!("dup of a socket: {e}")))?;
        let stream = std::net::TcpStream::from(fd);
        Ok(Outbox {
            state: Mutex::new(OutState {
                stream,
                pending: HashMap::new(),
                queue: VecDeque::new(),
                queued_bytes: 0,
                closed: false,
                failed: None,
            }),
            recent_call_ns: AtomicU64::new(0),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a frame from the calling thread: queued, and written at once when nothing was queued
    /// before it. A frame over the queue bound is replaced by an `Error` frame for `call_id`.
    /// Returns whether the loop must take over (bytes remain queued, or the write failed).
    /// With `flush_now` false the frame only joins the queue (the event loop, writing it, flushes
    /// its connections when it is done with its events).
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &self,
        frame: OutFrame,
        kind: FrameKind,
        call_id: u64,
        limits: &FrameLimits,
        queue_size_max: u64,
        sent: &AtomicU64,
        flush_now: bool,
    ) -> bool {
        let mut g = self.lock();
        if g.closed {
            return false;
        }
        let was_empty = g.queue.is_empty();
        if let Err(e) = g.enqueue(frame, kind, queue_size_max) {
            // The answer does not fit: tell the caller why instead of leaving it to time out.
            let err = to_meta(&WireError::from(&e))
                .and_then(|m| OutFrame::new(FrameKind::Error, call_id, &m, None, limits));
            if let Ok(f) = err {
                let _ = g.enqueue(f, FrameKind::Error, u64::MAX);
            }
        }
        if !was_empty || !flush_now {
            // Whoever queued the bytes ahead of these has the loop writing them.
            return false;
        }
        match g.flush() {
            Ok(n) => {
                sent.fetch_add(n, Ordering::Relaxed);
                !g.queue.is_empty()
            }
            Err(e) => {
                g.failed = Some(e);
                true
            }
        }
    }
}

/// What `Outbox::call` did.
pub enum Called {
    /// Written (or queued behind earlier frames); `true` when the loop must take over.
    Sent {
        call_id: u64,
        more: bool,
    },
    Refused(Error),
}

impl Outbox {
    /// Sends a request from the calling thread: numbers it (`next_id`, under this connection's
    /// lock, so ids increase in the order requests are written), records the pending call, and
    /// writes it at once when nothing is queued before it (and `flush_now`, as for `send`).
    #[allow(clippy::too_many_arguments)]
    pub fn call(
        &self,
        mut frame: OutFrame,
        pending: PendingCall,
        next_id: &AtomicU64,
        calls_in_flight_max: usize,
        queue_size_max: u64,
        sent: &AtomicU64,
        flush_now: bool,
    ) -> Called {
        let mut g = self.lock();
        if g.closed {
            return Called::Refused(Error::unavailable("the connection is closed"));
        }
        if g.pending.len() >= calls_in_flight_max {
            return Called::Refused(Error::resource_exhausted(format!(
                "{} calls already wait for an answer (calls_in_flight_max)",
                g.pending.len()
            )));
        }
        let call_id = next_id.fetch_add(1, Ordering::Relaxed);
        frame.set_call_id(call_id);
        let was_empty = g.queue.is_empty();
        if let Err(e) = g.enqueue(frame, FrameKind::Request, queue_size_max) {
            return Called::Refused(e);
        }
        g.pending.insert(call_id, pending);
        if !was_empty || !flush_now {
            return Called::Sent { call_id, more: false };
        }
        let more = match g.flush() {
            Ok(n) => {
                sent.fetch_add(n, Ordering::Relaxed);
                !g.queue.is_empty()
            }
            Err(e) => {
                g.failed = Some(e);
                true
            }
        };
        Called::Sent { call_id, more }
    }
}

impl OutState {
    /// Queues a frame unless that would pass `queue_size_max` bytes; a frame always fits an empty
    /// queue (a single tensor may be larger than the bound) and error frames always fit (they are
    /// small and tell the peer why it is not getting its answer).
    fn enqueue(&mut self, frame: OutFrame, kind: FrameKind, queue_size_max: u64) -> Result<()> {
        let len = frame.len() as u64;
        if !self.queue.is_empty() && kind != FrameKind::Error && self.queued_bytes + len > queue_size_max {
            return Err(Error::resource_exhausted(format!(
                "{} bytes queued; a frame of {len} bytes would pass the limit of {queue_size_max} bytes",
                self.queued_bytes
            )));
        }
        self.queued_bytes += len;
        self.queue.push_back(frame);
        Ok(())
    }

    /// Writes queued frames with gather writes until the queue is empty or the socket is full.
    fn flush(&mut self) -> std::io::Result<u64> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut total = 0u64;
        while !self.queue.is_empty() {
            let written = {
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(WRITE_SLICES_MAX);
                for f in self.queue.iter().take(WRITE_SLICES_MAX / 2) {
                    f.io_slices(&mut slices);
                }
                (&self.stream).write_vectored(&slices)
            };
            let n = match written {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += n as u64;
            self.queued_bytes -= n as u64;
            let mut left = n;
            while left > 0 || self.queue.front().is_some_and(|f| f.remaining() == 0) {
                let front = self.queue.front_mut().expect("written bytes belong to queued frames");
                left = front.advance(left);
                if front.remaining() == 0 {
                    self.queue.pop_front();
                } else {
                    break;
                }
            }
        }
        Ok(total)
    }
}
