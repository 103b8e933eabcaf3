//! One connection as the event loop sees it: the socket, the frame decoder, the write queue, the
//! handshake and the calls waiting for an answer. Reading and writing stop at `WouldBlock`.

use crate::handshake::{Handshake, PeerInfo};
use crate::wire::{FrameDecoder, FrameKind, FrameLimits, OutFrame};
use mio::net::TcpStream;
use mio::Token;
use rill_graph::{Buffer, Error, Result};
use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, Write};
use std::net::SocketAddr;
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
pub type ConnectDone = Box<dyn FnOnce(Result<(Token, PeerInfo)>) + Send>;

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
    pub pending: HashMap<u64, PendingCall>,
    queue: VecDeque<OutFrame>,
    queued_bytes: u64,
    /// Whether the socket is registered for writability (only while `queue` is non-empty).
    pub write_interest: bool,
    /// Flush what is queued, then close (after sending a refusal).
    pub closing: Option<Error>,
    /// The body of the request being received was refused (too large); answer with this error.
    pub refused_request: Option<Error>,
    limits: FrameLimits,
}

impl Conn {
    pub fn new(stream: TcpStream, addr: SocketAddr, phase: Phase, limits: FrameLimits) -> Conn {
        Conn {
            stream,
            addr,
            decoder: FrameDecoder::new(limits),
            phase,
            pending: HashMap::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            write_interest: false,
            closing: None,
            refused_request: None,
            limits,
        }
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
        self.queue.is_empty()
    }

    /// Queues a frame unless that would pass `queue_size_max` bytes; a frame always fits an empty
    /// queue (a single tensor may be larger than the bound) and error frames always fit (they are
    /// small and tell the peer why it is not getting its answer).
    pub fn enqueue(&mut self, frame: OutFrame, kind: FrameKind, queue_size_max: u64) -> Result<()> {
        let len = frame.len() as u64;
        if !self.queue.is_empty() && kind != FrameKind::Error && self.queued_bytes + len > queue_size_max {
            return Err(Error::resource_exhausted(format!(
                "write queue to {} holds {} bytes; a frame of {len} bytes would pass the limit of \
                 {queue_size_max} bytes",
                self.name(),
                self.queued_bytes
            )));
        }
        self.queued_bytes += len;
        self.queue.push_back(frame);
        Ok(())
    }

    /// Queues a control frame with no body.
    pub fn enqueue_control(&mut self, kind: FrameKind, call_id: u64, meta: &[u8]) -> Result<()> {
        let frame = OutFrame::new(kind, call_id, meta, None, &self.limits)?;
        self.enqueue(frame, kind, u64::MAX)
    }

    /// Bytes queued for writing.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// Writes queued frames with gather writes until the queue is empty or the socket is full.
    pub fn flush(&mut self) -> std::io::Result<()> {
        while !self.queue.is_empty() {
            let written = {
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(WRITE_SLICES_MAX);
                for f in self.queue.iter().take(WRITE_SLICES_MAX / 2) {
                    f.io_slices(&mut slices);
                }
                self.stream.write_vectored(&slices)
            };
            let n = match written {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
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
        Ok(())
    }

    /// Checks the bookkeeping (debug builds): queued bytes match the queue.
    pub fn invariants(&self) {
        debug_assert_eq!(self.queued_bytes, self.queue.iter().map(|f| f.remaining() as u64).sum::<u64>());
    }
}
