//! The connection handshake as an I/O-free state machine: frames in, frames to send and the
//! authenticated peer out.
//!
//! ```text
//! client                                   server
//!   Hello{version, cluster, job, task, incarnation, nonce_c, auth}  ──▶
//!                          ◀──  HelloAck{..., nonce_s, auth}     (or Error, then close)
//! with a shared secret on both sides:
//!   Auth{HMAC(secret, "rill-auth" | nonce_c | nonce_s | 1)}       ──▶
//!                          ◀──  AuthAck{HMAC(secret, "rill-auth" | nonce_c | nonce_s | 2)}
//! ```
//!
//! A server without a secret admits strangers. A server with one refuses a client without it or
//! with a different one (`Unauthenticated`). A client with a secret insists that the server proves it
//! too. A different wire version or cluster fingerprint is `FailedPrecondition`: retrying will not help.

use crate::shm::HostInfo;
use crate::wire::{from_meta, to_meta, FrameKind, WIRE_VERSION};
use hmac::{Hmac, Mac};
use rill_graph::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::sync::Arc;

/// Size of a handshake nonce, in bytes.
pub const NONCE_SIZE: usize = 32;
const AUTH_LABEL: &[u8] = b"rill-auth";
const ROLE_CLIENT: u8 = 1;
const ROLE_SERVER: u8 = 2;

/// Who this process is, as told to every peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Fingerprint of the cluster spec (see [`cluster_fingerprint`]); peers must agree on it.
    pub cluster_id: u64,
    pub job: String,
    pub task: u32,
    /// Random per process start, so a restarted peer is told apart from its predecessor.
    pub incarnation: u64,
    /// This process's host identity when it offers same-host shared memory (`None`: TCP only).
    pub host: Option<HostInfo>,
}

/// What the handshake learned about the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub job: String,
    pub task: u32,
    pub incarnation: u64,
    /// Whether the peer proved knowledge of the shared secret.
    pub authenticated: bool,
    /// Both sides offer shared memory and showed the same host identity (boot id, pid namespace).
    pub same_host: bool,
}

impl PeerInfo {
    /// "/job:worker/task:3", for messages.
    pub fn name(&self) -> String {
        format!("/job:{}/task:{}", self.job, self.task)
    }
}

/// A cluster fingerprint: the first 8 bytes of SHA-256 of the cluster spec's canonical text.
pub fn cluster_fingerprint(spec: &[u8]) -> u64 {
    let digest = Sha256::digest(spec);
    u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

/// A fresh nonce from /dev/urandom; an error (never a weak fallback) when it cannot be read.
pub fn random_nonce() -> Result<[u8; NONCE_SIZE]> {
    let mut nonce = [0u8; NONCE_SIZE];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut nonce))
        .map_err(|e| Error::unavailable(format!("reading a nonce from /dev/urandom: {e}")))?;
    Ok(nonce)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub cluster_id: u64,
    pub job: String,
    pub task: u32,
    pub incarnation: u64,
    pub nonce: [u8; NONCE_SIZE],
    /// The sender has a shared secret and will prove it.
    pub auth: bool,
    /// The sender's host identity when it offers same-host shared memory.
    pub host: Option<HostInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    pub mac: [u8; 32],
}

fn mac(secret: &[u8], client_nonce: &[u8], server_nonce: &[u8], role: u8) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(AUTH_LABEL);
    m.update(client_nonce);
    m.update(server_nonce);
    m.update(&[role]);
    m
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientSentHello,
    ClientSentAuth,
    ServerAwaitHello,
    ServerAwaitAuth,
    Done,
}

/// What one handshake frame produced.
#[derive(Debug, Default)]
pub struct Step {
    /// A frame to send (kind and meta).
    pub send: Option<(FrameKind, Vec<u8>)>,
    /// Set once the connection is established.
    pub done: Option<PeerInfo>,
}

/// One side of a handshake.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    local: Identity,
    secret: Option<Arc<Vec<u8>>>,
    nonce: [u8; NONCE_SIZE],
    client_nonce: [u8; NONCE_SIZE],
    peer: Option<PeerInfo>,
}

impl Handshake {
    /// A client handshake and the `Hello` frame that opens it.
    pub fn client(
        local: Identity,
        secret: Option<Arc<Vec<u8>>>,
        nonce: [u8; NONCE_SIZE],
    ) -> Result<(Handshake, (FrameKind, Vec<u8>))> {
        let hello = to_meta(&hello(&local, nonce, secret.is_some()))?;
        let hs = Handshake {
            state: State::ClientSentHello,
            local,
            secret,
            nonce,
            client_nonce: nonce,
            peer: None,
        };
        Ok((hs, (FrameKind::Hello, hello)))
    }

    /// A server handshake waiting for the client's `Hello`.
    pub fn server(local: Identity, secret: Option<Arc<Vec<u8>>>, nonce: [u8; NONCE_SIZE]) -> Handshake {
        Handshake {
            state: State::ServerAwaitHello,
            local,
            secret,
            nonce,
            client_nonce: [0; NONCE_SIZE],
            peer: None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Advances on one frame from the peer. An error means: send it in an `Error` frame and close.
    pub fn on_frame(&mut self, kind: FrameKind, meta: &[u8]) -> Result<Step> {
        match (self.state, kind) {
            (State::ServerAwaitHello, FrameKind::Hello) => {
                let h: Hello = from_meta(meta, "Hello")?;
                self.check_hello(&h)?;
                let (nonce, auth) = (h.nonce, h.auth);
                let peer = self.peer_info(h);
                self.client_nonce = nonce;
                match (&self.secret, auth) {
                    (Some(_), false) => Err(Error::unauthenticated(format!(
                        "this server requires the cluster's shared secret; {} did not offer one",
                        peer.name()
                    ))),
                    (Some(_), true) => {
                        self.peer = Some(peer);
                        self.state = State::ServerAwaitAuth;
                        let ack = to_meta(&hello(&self.local, self.nonce, true))?;
                        Ok(Step { send: Some((FrameKind::HelloAck, ack)), done: None })
                    }
                    // No secret here: strangers are admitted; a client that wants proof refuses us.
                    (None, _) => {
                        self.state = State::Done;
                        let ack = to_meta(&hello(&self.local, self.nonce, false))?;
                        Ok(Step { send: Some((FrameKind::HelloAck, ack)), done: Some(peer) })
                    }
                }
            }
            (State::ServerAwaitAuth, FrameKind::Auth) => {
                let a: Auth = from_meta(meta, "Auth")?;
                let secret = self.secret.as_ref().expect("auth state implies a secret");
                let peer = self.peer.take().expect("peer known after Hello");
                mac(secret, &self.client_nonce, &self.nonce, ROLE_CLIENT).verify_slice(&a.mac).map_err(
                    |_| {
                        Error::unauthenticated(format!(
                            "{} failed the shared-secret check (wrong secret)",
                            peer.name()
                        ))
                    },
                )?;
                let proof = mac(secret, &self.client_nonce, &self.nonce, ROLE_SERVER).finalize().into_bytes();
                self.state = State::Done;
                let ack = to_meta(&Auth { mac: proof.into() })?;
                Ok(Step {
                    send: Some((FrameKind::AuthAck, ack)),
                    done: Some(PeerInfo { authenticated: true, ..peer }),
                })
            }
            (State::ClientSentHello, FrameKind::HelloAck) => {
                let h: Hello = from_meta(meta, "HelloAck")?;
                self.check_hello(&h)?;
                let nonce = h.nonce;
                let auth = h.auth;
                let peer = self.peer_info(h);
                match (&self.secret, auth) {
                    (Some(secret), true) => {
                        let proof = mac(secret, &self.nonce, &nonce, ROLE_CLIENT).finalize().into_bytes();
                        // Reuse `client_nonce` to hold the server's nonce for the AuthAck check.
                        self.client_nonce = nonce;
                        self.peer = Some(peer);
                        self.state = State::ClientSentAuth;
                        Ok(Step {
                            send: Some((FrameKind::Auth, to_meta(&Auth { mac: proof.into() })?)),
                            done: None,
                        })
                    }
                    (Some(_), false) => Err(Error::unauthenticated(format!(
                        "{} has no shared secret configured, and this client requires one",
                        peer.name()
                    ))),
                    (None, true) => Err(Error::unauthenticated(format!(
                        "{} requires the cluster's shared secret; this client has none",
                        peer.name()
                    ))),
                    (None, false) => {
                        self.state = State::Done;
                        Ok(Step { send: None, done: Some(peer) })
                    }
                }
            }
            (State::ClientSentAuth, FrameKind::AuthAck) => {
                let a: Auth = from_meta(meta, "AuthAck")?;
                let secret = self.secret.as_ref().expect("auth state implies a secret");
                let peer = self.peer.take().expect("peer known after HelloAck");
                mac(secret, &self.nonce, &self.client_nonce, ROLE_SERVER).verify_slice(&a.mac).map_err(
                    |_| {
                        Error::unauthenticated(format!(
                            "{} failed the shared-secret check (wrong secret)",
                            peer.name()
                        ))
                    },
                )?;
                self.state = State::Done;
                Ok(Step { send: None, done: Some(PeerInfo { authenticated: true, ..peer }) })
            }
            (state, kind) => Err(Error::invalid_argument(format!(
                "unexpected {kind:?} frame during the handshake ({state:?})"
            ))),
        }
    }

    /// What a checked hello says about the peer; shared memory only when both offer it from the
    /// same host.
    fn peer_info(&self, h: Hello) -> PeerInfo {
        let same_host = matches!((&self.local.host, &h.host), (Some(a), Some(b)) if a == b);
        PeerInfo { job: h.job, task: h.task, incarnation: h.incarnation, authenticated: false, same_host }
    }

    fn check_hello(&self, h: &Hello) -> Result<()> {
        if h.version != WIRE_VERSION {
            return Err(Error::failed_precondition(format!(
                "/job:{}/task:{} speaks protocol version {}, this process speaks {WIRE_VERSION}",
                h.job, h.task, h.version
            )));
        }
        // A client outside the cluster (a remote session) names no cluster; tasks must agree.
        let client = h.cluster_id == CLIENT_CLUSTER_ID || self.local.cluster_id == CLIENT_CLUSTER_ID;
        if !client && h.cluster_id != self.local.cluster_id {
            return Err(Error::failed_precondition(format!(
                "/job:{}/task:{} belongs to cluster {:016x}, this process to cluster {:016x}",
                h.job, h.task, h.cluster_id, self.local.cluster_id
            )));
        }
        Ok(())
    }
}

/// The cluster id of a process that is a client of the cluster, not a task in it.
pub const CLIENT_CLUSTER_ID: u64 = 0;

fn hello(local: &Identity, nonce: [u8; NONCE_SIZE], auth: bool) -> Hello {
    Hello {
        version: WIRE_VERSION,
        cluster_id: local.cluster_id,
        job: local.job.clone(),
        task: local.task,
        incarnation: local.incarnation,
        nonce,
        auth,
        host: local.host.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(cluster_id: u64, job: &str, task: u32) -> Identity {
        Identity { cluster_id, job: job.into(), task, incarnation: 7, host: None }
    }

    /// Runs a handshake between two in-memory peers; returns what each side concluded.
    fn run(
        client: (Identity, Option<&[u8]>),
        server: (Identity, Option<&[u8]>),
    ) -> (Result<PeerInfo>, Result<PeerInfo>) {
        let secret = |s: Option<&[u8]>| s.map(|s| Arc::new(s.to_vec()));
        let (mut c, hello) = Handshake::client(client.0, secret(client.1), [1; NONCE_SIZE]).unwrap();
        let mut s = Handshake::server(server.0, secret(server.1), [2; NONCE_SIZE]);
        let (mut c_done, mut s_done) = (None, None);
        let mut to_server = Some(hello);
        // Bounded: the handshake takes at most four frames.
        for _ in 0..4 {
            let Some((kind, meta)) = to_server.take() else { break };
            let step = match s.on_frame(kind, &meta) {
                Ok(step) => step,
                Err(e) => return (Err(Error::unavailable(format!("refused by server: {e}"))), Err(e)),
            };
            if let Some(p) = step.done {
                s_done = Some(p);
            }
            let Some((kind, meta)) = step.send else { break };
            match c.on_frame(kind, &meta) {
                Ok(step) => {
                    to_server = step.send;
                    if let Some(p) = step.done {
                        c_done = Some(p);
                    }
                }
                Err(e) => return (Err(e), s_done.ok_or_else(|| Error::unavailable("client refused"))),
            }
        }
        (
            c_done.ok_or_else(|| Error::internal("client unfinished")),
            s_done.ok_or_else(|| Error::internal("server unfinished")),
        )
    }

    fn outcome(r: &Result<PeerInfo>) -> String {
        match r {
            Ok(p) => format!("ok {} auth={}", p.name(), p.authenticated),
            Err(e) => format!("{:?}", e.code),
        }
    }

    #[test]
    fn handshake_table() {
        let (c, s) = (identity(1, "worker", 0), identity(1, "ps", 1));
        let other = identity(2, "worker", 0);
        let k: &[u8] = b"key";
        let cases: &[(&str, (Identity, Option<&[u8]>), (Identity, Option<&[u8]>), &str, &str)] = &[
            (
                "no secrets",
                (c.clone(), None),
                (s.clone(), None),
                "ok /job:ps/task:1 auth=false",
                "ok /job:worker/task:0 auth=false",
            ),
            (
                "same secret",
                (c.clone(), Some(k)),
                (s.clone(), Some(k)),
                "ok /job:ps/task:1 auth=true",
                "ok /job:worker/task:0 auth=true",
            ),
            (
                "wrong secret",
                (c.clone(), Some(b"other")),
                (s.clone(), Some(k)),
                "Unavailable",
                "Unauthenticated",
            ),
            (
                "client lacks secret",
                (c.clone(), None),
                (s.clone(), Some(k)),
                "Unavailable",
                "Unauthenticated",
            ),
            (
                "server lacks secret",
                (c.clone(), Some(k)),
                (s.clone(), None),
                "Unauthenticated",
                "ok /job:worker/task:0 auth=false",
            ),
            ("other cluster", (other, None), (s.clone(), None), "Unavailable", "FailedPrecondition"),
        ];
        for (name, client, server, want_c, want_s) in cases {
            let (rc, rs) = run(client.clone(), server.clone());
            assert_eq!((outcome(&rc).as_str(), outcome(&rs).as_str()), (*want_c, *want_s), "{name}");
        }
    }

    #[test]
    fn unexpected_frames_are_refused() {
        let mut s = Handshake::server(identity(1, "ps", 0), None, [0; NONCE_SIZE]);
        let e = s.on_frame(FrameKind::Request, b"").unwrap_err();
        assert_eq!(e.code, rill_graph::Code::InvalidArgument);
        let e = s.on_frame(FrameKind::Hello, b"\xff\xff").unwrap_err();
        assert_eq!(e.code, rill_graph::Code::InvalidArgument, "{e}");
    }

    #[test]
    fn shared_memory_needs_the_same_host_on_both_sides() {
        let host = |boot: &str| Some(HostInfo { boot_id: boot.into(), pid_ns: "pid:[1]".into() });
        let with = |h: Option<HostInfo>, job: &str| Identity { host: h, ..identity(1, job, 0) };
        let cases = [
            (host("a"), host("a"), true),
            (host("a"), host("b"), false),
            (host("a"), None, false),
            (None, host("a"), false),
            (None, None, false),
        ];
        for (c, s, want) in cases {
            let (rc, rs) = run((with(c.clone(), "worker"), None), (with(s.clone(), "ps"), None));
            assert_eq!((rc.unwrap().same_host, rs.unwrap().same_host), (want, want), "{c:?} {s:?}");
        }
        // Both sides of one process agree on this host.
        assert!(crate::shm::HostInfo::local().is_some_and(|h| h == crate::shm::HostInfo::local().unwrap()));
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    }
}
