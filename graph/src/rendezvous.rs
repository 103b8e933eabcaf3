//! Rendezvous: where `_Send` leaves a tensor and `_Recv` picks it up, by key. Send never blocks;
//! receive is asynchronous. `LocalRendezvous` serves one step inside one process; the transport
//! crate provides the remote one behind the same trait.

use crate::{DeviceName, Error, Result, Tensor};
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

/// A parsed rendezvous key: `src_device;src_incarnation;dst_device;edge_name;frame_iter`,
/// TensorFlow's format, so keys read the same in logs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RendezvousKey {
    pub full: String,
    pub src_device: DeviceName,
    pub src_incarnation: u64,
    pub dst_device: DeviceName,
    pub edge_name: String,
}

impl RendezvousKey {
    pub fn new(src: &DeviceName, src_incarnation: u64, dst: &DeviceName, edge: &str) -> RendezvousKey {
        let full = format!("{src};{src_incarnation:016x};{dst};{edge};0:0");
        RendezvousKey {
            full,
            src_device: src.clone(),
            src_incarnation,
            dst_device: dst.clone(),
            edge_name: edge.to_string(),
        }
    }

    /// Parses a full key, checking every part; never panics on malformed input.
    pub fn parse(s: &str) -> Result<RendezvousKey> {
        let parts: Vec<&str> = s.split(';').collect();
        if parts.len() != 5 {
            return Err(Error::invalid_argument(format!("malformed rendezvous key '{s}'")));
        }
        let inc = u64::from_str_radix(parts[1], 16)
            .map_err(|_| Error::invalid_argument(format!("bad incarnation in key '{s}'")))?;
        let k =
            RendezvousKey::new(&DeviceName::parse(parts[0])?, inc, &DeviceName::parse(parts[2])?, parts[3]);
        Ok(k)
    }
}

impl fmt::Debug for RendezvousKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// Completion of a receive: the tensor or the reason it cannot come.
pub type RecvDone = Box<dyn FnOnce(Result<Tensor>) + Send>;

pub trait Rendezvous: Send + Sync {
    /// Leaves `t` under `key`. Sending a key twice in one step is `Internal`.
    fn send(&self, key: &RendezvousKey, t: Tensor) -> Result<()>;
    /// Calls `done` with the tensor once it is sent (maybe at once, maybe on another thread).
    fn recv_async(&self, key: &RendezvousKey, done: RecvDone);
    /// Fails every pending and future receive with `err`.
    fn start_abort(&self, err: Error);
}

enum Slot {
    Value(Tensor),
    Waiting(RecvDone),
}

/// The in-process rendezvous of one step.
#[derive(Default)]
pub struct LocalRendezvous {
    state: Mutex<(HashMap<String, Slot>, Option<Error>)>,
}

impl fmt::Debug for LocalRendezvous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalRendezvous")
    }
}

impl LocalRendezvous {
    pub fn new() -> LocalRendezvous {
        LocalRendezvous::default()
    }
}

impl Rendezvous for LocalRendezvous {
    fn send(&self, key: &RendezvousKey, t: Tensor) -> Result<()> {
        let waiter = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = &st.1 {
                return Err(e.clone());
            }
            match st.0.remove(&key.full) {
                Some(Slot::Waiting(done)) => Some(done),
                Some(Slot::Value(v)) => {
                    st.0.insert(key.full.clone(), Slot::Value(v));
                    return Err(Error::internal(format!("duplicate send of key {}", key.full)));
                }
                None => {
                    st.0.insert(key.full.clone(), Slot::Value(t.clone()));
                    None
                }
            }
        };
        if let Some(done) = waiter {
            done(Ok(t));
        }
        Ok(())
    }

    fn recv_async(&self, key: &RendezvousKey, done: RecvDone) {
        let ready = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = &st.1 {
                Err(e.clone())
            } else {
                match st.0.remove(&key.full) {
                    Some(Slot::Value(v)) => Ok(v),
                    Some(Slot::Waiting(prev)) => {
                        st.0.insert(key.full.clone(), Slot::Waiting(prev));
                        Err(Error::internal(format!("duplicate receive of key {}", key.full)))
                    }
                    None => {
                        st.0.insert(key.full.clone(), Slot::Waiting(done));
                        return;
                    }
                }
            }
        };
        done(ready);
    }

    fn start_abort(&self, err: Error) {
        let waiters: Vec<RecvDone> = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.1.is_some() {
                return;
            }
            st.1 = Some(err.clone());
            st.0.drain()
                .filter_map(|(_, s)| match s {
                    Slot::Waiting(d) => Some(d),
                    Slot::Value(_) => None,
                })
                .collect()
        };
        for w in waiters {
            w(Err(err.clone()));
        }
    }
}
