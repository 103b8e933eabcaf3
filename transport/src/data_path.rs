//! The seam between the control plane and the data plane of a tensor transfer.
//!
//! Control messages (a `RecvTensor` request, its answer) always travel over the TCP connection. The
//! bytes of a large tensor travel either in the answer's frame body (every connection can do that)
//! or through a [`TensorTransport`]: the receiver names a destination it holds ([`Landing`]), the
//! request carries its name ([`Dest`]), the sender writes the bytes there and its answer says it is
//! done. Same-host shared memory ([`crate::shm`]) is one such path; an RDMA backend (a one-sided
//! write into a registered buffer) is another, with the same contract and no change to the services.

use crate::handshake::PeerInfo;
use crate::shm::ShmDest;
use rill_graph::{Buffer, Result};
use serde::{Deserialize, Serialize};

/// The name of a destination, as the receiver tells it to the sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dest {
    /// A region of a shared-memory segment of the receiving process.
    Shm(ShmDest),
}

/// A destination the receiver holds while a transfer is in flight. Exactly one of three ends:
/// `land` (the sender wrote `len` bytes there: they become a buffer without a copy), `release`
/// (the sender answered without using it), or a drop (no answer: the sender may still write, so
/// the memory is never handed out again).
pub trait Landing: Send {
    fn dest(&self) -> Dest;
    /// The buffer holding the `len` bytes the sender wrote; `len` is checked against the region.
    fn land(self: Box<Self>, len: u64) -> Result<Buffer>;
    /// The sender answered without writing: the region may be reused at once.
    fn release(self: Box<Self>);
}

/// A data path for tensor bytes beside the socket.
pub trait TensorTransport: Send + Sync {
    /// Receiver side: a destination for `len` bytes from `peer`, or `None` when this path cannot
    /// serve it (the bytes then ride in the answer's body).
    fn offer(&self, peer: &PeerInfo, len: u64) -> Option<Box<dyn Landing>>;
    /// Sender side: writes `bytes` into `dest`, named by `peer`. Every size and offset of `dest`
    /// is checked before memory is touched; on `Err` the caller sends the bytes in the body.
    fn write(&self, peer: &PeerInfo, dest: &Dest, bytes: &[u8]) -> Result<()>;
    /// `(written, landed)`: bytes this process wrote for peers and bytes it received this way.
    fn bytes_transferred(&self) -> (u64, u64);
    /// Frees what the path holds (on shutdown); buffers still in use free theirs when dropped.
    fn shutdown(&self);
}
