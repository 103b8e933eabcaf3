//! rill's cluster runtime: cluster specs, servers hosting a master and a worker, remote sessions,
//! and the TCP transport (one mio event loop, postcard-framed control messages, raw tensor bodies).
//!
//! The wire layer is built in two parts: an I/O-free protocol ([`wire`]: frames; [`handshake`]:
//! hello and shared-secret proof) that turns bytes into events, and the connection layer
//! ([`Transport`]) that moves those bytes over TCP on one mio event-loop thread. Large tensors to a
//! task on the same host go through shared memory instead ([`shm`], behind the
//! [`TensorTransport`] seam of [`data_path`]). On top of it, [`server::Server`] hosts the master and
//! worker services and [`RemoteSession`] is the client.

// Unsafe code lives only in `shm` (mapping shared memory), where every block has a `SAFETY` line.
#![deny(unsafe_code)]

mod body_pool;
pub mod cluster;
mod conn;
pub mod data_path;
pub mod dedup;
mod event_loop;
pub mod handshake;
pub mod master;
pub mod proto;
pub mod remote;
pub mod server;
pub mod shm;
pub mod wire;
pub mod worker;

pub use cluster::{shm_enabled_by_env, ClusterSpec, ServerDef};
pub use conn::{CallDone, Response};
pub use data_path::{Dest, Landing, TensorTransport};
pub use event_loop::{
    CallOptions, Handler, InlineHandler, Limits, PeerHandle, Request, Responder, Transport, TransportOptions,
    CALLS_IN_FLIGHT_MAX, CALL_SPIN, CONNECTIONS_MAX, HANDLER_QUEUE_LEN_MAX, HANDLER_THREADS,
    HANDSHAKE_TIMEOUT_MS, REQUEST_BODY_SIZE_MAX, WRITE_QUEUE_SIZE_MAX,
};
pub use handshake::{cluster_fingerprint, Identity, PeerInfo};
pub use remote::{reset, ConnectOptions, RemoteSession};
pub use server::Server;
pub use wire::{BodySource, FrameLimits, FRAME_BODY_SIZE_MAX, FRAME_META_SIZE_MAX};
