//! Step cancellation: waiting kernels register a callback; cancelling a step runs each callback
//! once with the reason (`Cancelled`, `DeadlineExceeded`, or the step's first error).

use crate::Error;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Identifies one registered callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CancelToken(u64);

type Callback = Box<dyn FnOnce(&Error) + Send>;

/// Per-step cancellation. Cancelling affects only the callbacks registered here: the attempts of
/// this step, never the queues or accumulators they wait on.
#[derive(Default)]
pub struct CancellationManager {
    cancelled: AtomicBool,
    next: AtomicU64,
    state: Mutex<(HashMap<u64, Callback>, Option<Error>)>,
}

impl fmt::Debug for CancellationManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CancellationManager(cancelled: {})", self.is_cancelled())
    }
}

impl CancellationManager {
    pub fn new() -> CancellationManager {
        CancellationManager::default()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// The reason given to `cancel`, once cancelled.
    pub fn reason(&self) -> Option<Error> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Registers `cb`; returns `None` (and does not keep `cb`) when already cancelled, in which
    /// case the caller must fail at once with `reason()`.
    pub fn register(&self, cb: impl FnOnce(&Error) + Send + 'static) -> Option<CancelToken> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.1.is_some() {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        st.0.insert(id, Box::new(cb));
        Some(CancelToken(id))
    }

    /// Removes a callback; `true` if it had not run yet (so the caller still owns completion).
    pub fn deregister(&self, t: CancelToken) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0.remove(&t.0).is_some()
    }

    /// Cancels once: runs every registered callback with `reason` outside the lock.
    pub fn cancel(&self, reason: Error) {
        let cbs: Vec<Callback> = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.1.is_some() {
                return;
            }
            st.1 = Some(reason.clone());
            self.cancelled.store(true, Ordering::Release);
            st.0.drain().map(|(_, cb)| cb).collect()
        };
        for cb in cbs {
            cb(&reason);
        }
    }
}
