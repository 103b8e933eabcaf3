//! The frame format and its I/O-free codec: a fixed 32-byte little-endian header, a postcard-encoded
//! control message (`meta`), then the raw body bytes exactly as they sit in memory.
//!
//! The decoder takes arbitrary byte chunks and never allocates a body from a declaration alone: once
//! a frame's header and meta are in, it stops with [`Decoded::BodyWanted`] and waits for the upper
//! layer to name the destination ([`BodyDest`]). Partial input is "not yet", never an error; a
//! malformed frame is an `Err` that should close the connection.
//!
//! ```text
//! offset size field
//!      0    4 magic        b"RILL"
//!      4    2 version      u16 LE, WIRE_VERSION
//!      6    1 kind         u8, FrameKind
//!      7    1 flags        u8, bit 0 = FLAG_BODY (a body follows, possibly empty)
//!      8    8 call_id      u64 LE (0 = not part of a call)
//!     16    4 meta_len     u32 LE, <= frame_meta_size_max
//!     20    8 body_len     u64 LE, <= frame_body_size_max; 0 unless FLAG_BODY
//!     28    4 checksum     u32 LE, FNV-1a 32 of bytes 0..28
//! ```

use rill_graph::{Buffer, Code, Error, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::io::IoSlice;
use std::sync::Arc;

/// The four bytes every frame starts with.
pub const WIRE_MAGIC: [u8; 4] = *b"RILL";
/// The frame format's version; a peer with another version is refused at the handshake.
pub const WIRE_VERSION: u16 = 2;
/// Size of the fixed frame header, in bytes.
pub const FRAME_HEADER_SIZE: usize = 32;
/// Header flag: a body follows the meta (a zero-length body is still a body: an empty tensor).
pub const FLAG_BODY: u8 = 0x01;
const FLAGS_KNOWN: u8 = FLAG_BODY;

/// Default bound on a frame's control message: control messages are small; graphs travel here too,
/// so 64 MiB leaves room for a large `GraphDef` while keeping a stranger from pinning much memory.
pub const FRAME_META_SIZE_MAX: u32 = 64 << 20;
/// Default bound on a frame's body: tensors of any practical size must cross (64 GiB); the decoder
/// never allocates from this declaration, the upper layer decides per frame.
pub const FRAME_BODY_SIZE_MAX: u64 = 64 << 30;

/// What a frame is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Client's opening message (meta: `Hello`).
    Hello = 1,
    /// Server's answer to `Hello` (meta: `Hello`).
    HelloAck = 2,
    /// Client's proof of the shared secret (meta: `Auth`).
    Auth = 3,
    /// Server's proof of the shared secret (meta: `Auth`).
    AuthAck = 4,
    /// A call (meta: the service's message; optional body).
    Request = 5,
    /// The answer to the call with the same `call_id`.
    Response = 6,
    /// A failed call (call_id != 0) or a refused connection (call_id == 0) (meta: `WireError`).
    Error = 7,
    Ping = 8,
    Pong = 9,
    /// The sender is closing the connection (meta: `WireError` with the reason).
    Close = 10,
}

impl FrameKind {
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Auth,
            4 => AuthAck,
            5 => Request,
            6 => Response,
            7 => Error,
            8 => Ping,
            9 => Pong,
            10 => Close,
            _ => return None,
        })
    }
}

/// The decoded fixed header of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub flags: u8,
    pub call_id: u64,
    pub meta_len: u32,
    pub body_len: u64,
}

impl FrameHeader {
    /// Whether a body follows the meta.
    pub fn has_body(&self) -> bool {
        self.flags & FLAG_BODY != 0
    }

    /// The 32 header bytes, checksum included.
    pub fn encode(&self) -> [u8; FRAME_HEADER_SIZE] {
        let mut b = [0u8; FRAME_HEADER_SIZE];
        b[0..4].copy_from_slice(&WIRE_MAGIC);
        b[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.call_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.meta_len.to_le_bytes());
        b[20..28].copy_from_slice(&self.body_len.to_le_bytes());
        let sum = fnv1a32(&b[0..28]);
        b[28..32].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and checks a header against `limits`; every field is validated before any use.
    pub fn decode(b: &[u8; FRAME_HEADER_SIZE], limits: &FrameLimits) -> Result<FrameHeader> {
        let le32 = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let le64 = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if b[0..4] != WIRE_MAGIC {
            return Err(malformed(format!("bad magic {:02x?}, expected \"RILL\"", &b[0..4])));
        }
        let sum = le32(28);
        if sum != fnv1a32(&b[0..28]) {
            return Err(malformed(format!("header checksum {sum:#010x} does not match")));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != WIRE_VERSION {
            return Err(Error::failed_precondition(format!(
                "peer speaks wire version {version}, this process speaks {WIRE_VERSION}"
            )));
        }
        let kind =
            FrameKind::from_u8(b[6]).ok_or_else(|| malformed(format!("unknown frame kind {}", b[6])))?;
        let flags = b[7];
        if flags & !FLAGS_KNOWN != 0 {
            return Err(malformed(format!("unknown frame flags {flags:#04x}")));
        }
        let (meta_len, body_len) = (le32(16), le64(20));
        if meta_len > limits.frame_meta_size_max {
            return Err(too_large("meta", meta_len as u64, limits.frame_meta_size_max as u64));
        }
        if body_len > limits.frame_body_size_max {
            return Err(too_large("body", body_len, limits.frame_body_size_max));
        }
        if flags & FLAG_BODY == 0 && body_len != 0 {
            return Err(malformed(format!("body_len {body_len} without the body flag")));
        }
        if flags & FLAG_BODY != 0 && !matches!(kind, FrameKind::Request | FrameKind::Response) {
            return Err(malformed(format!("a {kind:?} frame cannot carry a body")));
        }
        Ok(FrameHeader { kind, flags, call_id: le64(8), meta_len, body_len })
    }
}

fn malformed(msg: String) -> Error {
    Error::invalid_argument(format!("malformed frame: {msg}"))
}

fn too_large(what: &str, len: u64, max: u64) -> Error {
    Error::resource_exhausted(format!("frame {what} of {len} bytes exceeds the limit of {max} bytes"))
}

/// FNV-1a, 32 bits: a cheap check that the header is a header (catches desync and garbage), not a MAC.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Bounds on what a peer may declare in a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    pub frame_meta_size_max: u32,
    pub frame_body_size_max: u64,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits { frame_meta_size_max: FRAME_META_SIZE_MAX, frame_body_size_max: FRAME_BODY_SIZE_MAX }
    }
}

/// An error travelling in an `Error` or `Close` frame: a TF status code number and a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: u8,
    pub msg: String,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        WireError { code: e.code as u8, msg: e.msg.clone() }
    }
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Self {
        Error::new(Code::from_u8(w.code), w.msg)
    }
}

/// Postcard-encodes a control message.
pub fn to_meta<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(msg).map_err(|e| Error::internal(format!("encoding a control message: {e}")))
}

/// Decodes a control message; trailing bytes are malformed, not ignored.
pub fn from_meta<'a, T: Deserialize<'a>>(meta: &'a [u8], what: &str) -> Result<T> {
    let (v, rest) =
        postcard::take_from_bytes(meta).map_err(|e| malformed(format!("undecodable {what} message: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes after the {what} message", rest.len())));
    }
    Ok(v)
}

/// Bytes to send as a frame body, held by reference so large tensors are written without a copy.
#[derive(Clone, Debug)]
pub enum BodySource {
    /// A host tensor with flat bytes (not strings, not device memory; checked by `from_tensor`).
    Tensor(Tensor),
    Buffer(Arc<Buffer>),
    Bytes(Arc<Vec<u8>>),
}

impl BodySource {
    /// A body over a host tensor's bytes; string and device tensors are refused here, not later.
    pub fn from_tensor(t: Tensor) -> Result<BodySource> {
        t.as_bytes()?;
        Ok(BodySource::Tensor(t))
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            // `from_tensor` checked this once; an empty slice here would be our bug, not the peer's.
            BodySource::Tensor(t) => t.as_bytes().unwrap_or(&[]),
            BodySource::Buffer(b) => b.as_bytes(),
            BodySource::Bytes(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }
}

/// One frame ready to write: header and meta in one small owned buffer, the body by reference.
#[derive(Debug)]
pub struct OutFrame {
    head: Vec<u8>,
    body: Option<BodySource>,
    written: usize,
}

impl OutFrame {
    /// Encodes the header and meta; the body is not touched or copied.
    pub fn new(
        kind: FrameKind,
        call_id: u64,
        meta: &[u8],
        body: Option<BodySource>,
        limits: &FrameLimits,
    ) -> Result<OutFrame> {
        let meta_len = u32::try_from(meta.len())
            .ok()
            .filter(|&n| n <= limits.frame_meta_size_max)
            .ok_or_else(|| too_large("meta", meta.len() as u64, limits.frame_meta_size_max as u64))?;
        let body_len = body.as_ref().map_or(0, |b| b.len() as u64);
        if body_len > limits.frame_body_size_max {
            return Err(too_large("body", body_len, limits.frame_body_size_max));
        }
        let flags = if body.is_some() { FLAG_BODY } else { 0 };
        let header = FrameHeader { kind, flags, call_id, meta_len, body_len };
        let mut head = Vec::with_capacity(FRAME_HEADER_SIZE + meta.len());
        head.extend_from_slice(&header.encode());
        head.extend_from_slice(meta);
        Ok(OutFrame { head, body, written: 0 })
    }

    /// Sets the call id (rewriting the header and its checksum) before any byte is written: the
    /// event loop numbers requests in the order it writes them.
    pub fn set_call_id(&mut self, call_id: u64) {
        debug_assert_eq!(self.written, 0, "the call id changes only before the frame is written");
        let mut h = [0u8; FRAME_HEADER_SIZE];
        h.copy_from_slice(&self.head[..FRAME_HEADER_SIZE]);
        h[8..16].copy_from_slice(&call_id.to_le_bytes());
        let sum = fnv1a32(&h[0..28]);
        h[28..32].copy_from_slice(&sum.to_le_bytes());
        self.head[..FRAME_HEADER_SIZE].copy_from_slice(&h);
    }

    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.as_ref().map_or(0, |b| b.len())
    }

    /// Bytes not yet written.
    pub fn remaining(&self) -> usize {
        self.len() - self.written
    }

    /// Up to two slices (rest of head, rest of body) for a gather write.
    pub fn io_slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        let head_len = self.head.len();
        if self.written < head_len {
            out.push(IoSlice::new(&self.head[self.written..]));
        }
        if let Some(body) = &self.body {
            let bytes = body.as_bytes();
            let from = self.written.saturating_sub(head_len);
            if from < bytes.len() {
                out.push(IoSlice::new(&bytes[from..]));
            }
        }
    }

    /// Marks `n` more bytes written; returns the bytes of `n` this frame did not take.
    pub fn advance(&mut self, n: usize) -> usize {
        let take = n.min(self.remaining());
        self.written += take;
        n - take
    }

    /// The whole frame as one byte vector (tests, and the golden-bytes pin).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = self.head.clone();
        if let Some(b) = &self.body {
            v.extend_from_slice(b.as_bytes());
        }
        v
    }
}

/// Where the upper layer wants a frame's body to go.
#[derive(Debug)]
pub enum BodyDest {
    /// Straight into this buffer; its length must equal the declared body length.
    Buffer(Buffer),
    /// Into a buffer the decoder grows as bytes arrive (doubling from `BODY_GROW_SIZE_MIN`), so a peer
    /// cannot make us hold much more memory than it has actually sent.
    Grow,
    /// Read and dropped (an answer nobody waits for any more, a body over the caller's bound).
    Discard,
}

/// First allocation of a growing body, in bytes; bodies below it are allocated at once.
pub const BODY_GROW_SIZE_MIN: usize = 1 << 20;

/// A fully received frame.
#[derive(Debug)]
pub struct Frame {
    pub header: FrameHeader,
    pub meta: Vec<u8>,
    /// `Some` when the frame has a body and its destination kept it (not `Discard`).
    pub body: Option<Buffer>,
}

/// What one `feed` produced.
#[derive(Debug)]
pub enum Decoded {
    /// All input consumed (or none given); feed more bytes when they arrive.
    NeedMore,
    /// Header and meta are in and a body is declared: call `set_body_dest` before feeding more.
    BodyWanted,
    Frame(Frame),
}

#[derive(Debug)]
enum Body {
    Fixed(Buffer),
    Grow(Buffer),
    Discard,
}

#[derive(Debug)]
enum State {
    Header {
        buf: [u8; FRAME_HEADER_SIZE],
        filled: usize,
    },
    Meta {
        header: FrameHeader,
        meta: Vec<u8>,
    },
    AwaitDest {
        header: FrameHeader,
        meta: Vec<u8>,
    },
    Body {
        header: FrameHeader,
        meta: Vec<u8>,
        body: Body,
        filled: u64,
    },
    /// A malformed frame was seen; the stream cannot be resynchronised.
    Failed,
}

/// The incremental decoder: two states (header, then payload) plus the pause for a body destination.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: FrameLimits,
    state: State,
}

/// Bytes of meta allocated ahead of arrival; larger meta grows as its bytes arrive.
const META_PREALLOC_SIZE_MAX: usize = 64 << 10;

impl FrameDecoder {
    pub fn new(limits: FrameLimits) -> FrameDecoder {
        FrameDecoder { limits, state: State::Header { buf: [0; FRAME_HEADER_SIZE], filled: 0 } }
    }

    fn reset(&mut self) {
        self.state = State::Header { buf: [0; FRAME_HEADER_SIZE], filled: 0 };
    }

    /// The header of the frame whose body is wanted or arriving.
    pub fn pending_header(&self) -> Option<&FrameHeader> {
        match &self.state {
            State::AwaitDest { header, .. } | State::Body { header, .. } | State::Meta { header, .. } => {
                Some(header)
            }
            _ => None,
        }
    }

    /// The meta of the frame whose body is wanted (after `BodyWanted`).
    pub fn pending_meta(&self) -> Option<&[u8]> {
        match &self.state {
            State::AwaitDest { meta, .. } | State::Body { meta, .. } => Some(meta),
            _ => None,
        }
    }

    /// Names the destination of the pending body (after `BodyWanted`).
    pub fn set_body_dest(&mut self, dest: BodyDest) -> Result<()> {
        let State::AwaitDest { header, meta } = std::mem::replace(&mut self.state, State::Failed) else {
            return Err(Error::internal("set_body_dest without a body wanted"));
        };
        let body = match dest {
            BodyDest::Buffer(b) if b.len() as u64 == header.body_len => Body::Fixed(b),
            BodyDest::Buffer(b) => {
                return Err(Error::internal(format!(
                    "body destination of {} bytes for a body of {} bytes",
                    b.len(),
                    header.body_len
                )))
            }
            // Below the growth threshold the declared size is small enough to allocate at once.
            BodyDest::Grow => {
                let first = (header.body_len as usize).min(BODY_GROW_SIZE_MIN);
                Body::Grow(Buffer::zeroed(first))
            }
            BodyDest::Discard => Body::Discard,
        };
        self.state = State::Body { header, meta, body, filled: 0 };
        Ok(())
    }

    /// The unfilled tail of a fixed body destination, so a reader can fill it straight from the
    /// socket with no staging copy; report the bytes written with `advance_body`.
    pub fn body_spare_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.state {
            State::Body { body: Body::Fixed(b), filled, .. } => {
                Some(&mut b.as_bytes_mut()[*filled as usize..])
            }
            _ => None,
        }
    }

    /// Records `n` bytes written into `body_spare_mut`; returns the frame when the body is complete.
    pub fn advance_body(&mut self, n: usize) -> Option<Frame> {
        if let State::Body { header, filled, .. } = &mut self.state {
            *filled += n as u64;
            debug_assert!(*filled <= header.body_len);
            if *filled == header.body_len {
                return Some(self.finish_body());
            }
        }
        None
    }

    fn finish_body(&mut self) -> Frame {
        let state = std::mem::replace(&mut self.state, State::Failed);
        self.reset();
        match state {
            State::Body { header, meta, body, .. } => {
                let body = match body {
                    Body::Fixed(b) | Body::Grow(b) => Some(b),
                    Body::Discard => None,
                };
                Frame { header, meta, body }
            }
            _ => unreachable!("finish_body outside the body state"),
        }
    }

    /// Consumes a prefix of `input`; returns how many bytes were taken and what came of them.
    /// Stops after each completed frame and at `BodyWanted`, so the caller loops while bytes remain.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Decoded)> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match &mut self.state {
                State::Failed => return Err(malformed("the stream already failed".into())),
                State::Header { buf, filled } => {
                    let n = rest.len().min(FRAME_HEADER_SIZE - *filled);
                    buf[*filled..*filled + n].copy_from_slice(&rest[..n]);
                    *filled += n;
                    used += n;
                    if *filled < FRAME_HEADER_SIZE {
                        return Ok((used, Decoded::NeedMore));
                    }
                    let header = match FrameHeader::decode(buf, &self.limits) {
                        Ok(h) => h,
                        Err(e) => {
                            self.state = State::Failed;
                            return Err(e);
                        }
                    };
                    let cap = (header.meta_len as usize).min(META_PREALLOC_SIZE_MAX);
                    self.state = State::Meta { header, meta: Vec::with_capacity(cap) };
                }
                State::Meta { header, meta } => {
                    let want = header.meta_len as usize - meta.len();
                    let n = rest.len().min(want);
                    meta.extend_from_slice(&rest[..n]);
                    used += n;
                    if n < want {
                        return Ok((used, Decoded::NeedMore));
                    }
                    let (header, meta) = (*header, std::mem::take(meta));
                    if header.has_body() && header.body_len > 0 {
                        self.state = State::AwaitDest { header, meta };
                        return Ok((used, Decoded::BodyWanted));
                    }
                    self.reset();
                    let body = header.has_body().then(|| Buffer::zeroed(0));
                    return Ok((used, Decoded::Frame(Frame { header, meta, body })));
                }
                State::AwaitDest { .. } => return Ok((used, Decoded::BodyWanted)),
                State::Body { header, body, filled, .. } => {
                    let want = header.body_len - *filled;
                    let n = (rest.len() as u64).min(want) as usize;
                    let at = *filled as usize;
                    match body {
                        Body::Fixed(b) => b.as_bytes_mut()[at..at + n].copy_from_slice(&rest[..n]),
                        Body::Grow(b) => {
                            grow_to(b, at + n, header.body_len as usize);
                            b.as_bytes_mut()[at..at + n].copy_from_slice(&rest[..n]);
                        }
                        Body::Discard => {}
                    }
                    *filled += n as u64;
                    used += n;
                    if *filled < header.body_len {
                        return Ok((used, Decoded::NeedMore));
                    }
                    return Ok((used, Decoded::Frame(self.finish_body())));
                }
            }
        }
    }
}

/// Grows `b` (doubling, capped at `total`) until it holds `need` bytes.
fn grow_to(b: &mut Buffer, need: usize, total: usize) {
    if need <= b.len() {
        return;
    }
    let mut cap = b.len().max(1);
    while cap < need {
        cap = cap.saturating_mul(2);
    }
    let mut grown = Buffer::zeroed(cap.min(total));
    grown.as_bytes_mut()[..b.len()].copy_from_slice(b.as_bytes());
    *b = grown;
}

#[cfg(test)]
mod tests;
