//! Duplicate-request detection: a request is named by its sender's incarnation (random per process
//! start, exchanged in the handshake) and its request id (the frame's call id, which the sender's
//! event loop hands out in increasing order). A request seen before is refused with `Aborted` and
//! never run a second time.
//!
//! Memory is bounded twice: per sender, a high-water mark and a bitmap of the `REQUEST_WINDOW` ids
//! below it (ids further below are refused as too old to tell apart from a replay); and at most
//! `SENDERS_REMEMBERED_MAX` senders, the least recently active forgotten first.

use crate::handshake::PeerInfo;
use rill_graph::{Error, Result};
use std::collections::HashMap;

/// Request ids remembered below a sender's highest one. A sender's loop numbers its requests in
/// the order it writes them, so on one connection they arrive in increasing order; the window only
/// has to absorb interleaving between two connections of the same sender (a reconnect).
pub const REQUEST_WINDOW: u64 = 1024;
/// Senders (process incarnations) whose requests are remembered: more than the connections one
/// process may hold at once, so only senders idle for a long time are forgotten.
pub const SENDERS_REMEMBERED_MAX: usize = 4096;

const WORDS: usize = (REQUEST_WINDOW / 64) as usize;

/// The ids seen from one sender: bit `i` of `bits` is set when id `high - i` was seen.
#[derive(Clone, Debug)]
struct Window {
    high: u64,
    bits: [u64; WORDS],
    last_used: u64,
}

impl Window {
    fn new() -> Window {
        Window { high: 0, bits: [0; WORDS], last_used: 0 }
    }

    fn bit(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    fn set(&mut self, i: u64) {
        self.bits[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Moves the window up by `k` ids (bit i becomes bit i + k).
    fn shift(&mut self, k: u64) {
        if k >= REQUEST_WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let (words, bits) = ((k / 64) as usize, (k % 64) as u32);
        for w in (0..WORDS).rev() {
            let lo = w.checked_sub(words).map_or(0, |s| self.bits[s]);
            let below = w.checked_sub(words + 1).map_or(0, |s| self.bits[s]);
            self.bits[w] = if bits == 0 { lo } else { lo << bits | below >> (64 - bits) };
        }
    }

    /// Records `id`; false when it was seen before or lies below the window.
    fn admit(&mut self, id: u64) -> std::result::Result<(), &'static str> {
        if id > self.high {
            self.shift(id - self.high);
            self.high = id;
            self.set(0);
            return Ok(());
        }
        let back = self.high - id;
        if back >= REQUEST_WINDOW {
            return Err("is older than the request window and cannot be told apart from a replay");
        }
        if self.bit(back) {
            return Err("was already received");
        }
        self.set(back);
        Ok(())
    }
}

/// The requests this process has received, per sender incarnation.
#[derive(Debug, Default)]
pub struct SeenRequests {
    senders: HashMap<u64, Window>,
    clock: u64,
}

impl SeenRequests {
    pub fn new() -> SeenRequests {
        SeenRequests::default()
    }

    /// Admits request `id` from `peer` once: a second arrival (or an id too old to check) is
    /// `Aborted`, and id 0 (not a request id) is `InvalidArgument`.
    pub fn admit(&mut self, peer: &PeerInfo, id: u64) -> Result<()> {
        if id == 0 {
            return Err(Error::invalid_argument(format!(
                "{} sent a request without a request id",
                peer.name()
            )));
        }
        self.clock += 1;
        if !self.senders.contains_key(&peer.incarnation) && self.senders.len() >= SENDERS_REMEMBERED_MAX {
            let oldest = self.senders.iter().min_by_key(|(_, w)| w.last_used).map(|(&k, _)| k);
            if let Some(k) = oldest {
                self.senders.remove(&k);
            }
        }
        let w = self.senders.entry(peer.incarnation).or_insert_with(Window::new);
        w.last_used = self.clock;
        w.admit(id).map_err(|why| {
            Error::aborted(format!(
                "duplicate request: request {id} from {} (incarnation {:016x}) {why}; it is not run again",
                peer.name(),
                peer.incarnation
            ))
        })
    }

    /// Senders currently remembered.
    pub fn senders(&self) -> usize {
        self.senders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rill_graph::Code;

    fn peer(incarnation: u64) -> PeerInfo {
        PeerInfo { job: "worker".into(), task: 0, incarnation, authenticated: false, same_host: false }
    }

    #[test]
    fn each_request_is_admitted_once() {
        let mut s = SeenRequests::new();
        let p = peer(7);
        for id in [1, 2, 5, 3, 1000, 4] {
            s.admit(&p, id).unwrap();
        }
        for id in [1, 2, 3, 4, 5, 1000] {
            let e = s.admit(&p, id).unwrap_err();
            assert_eq!(e.code, Code::Aborted, "{e}");
            assert!(e.msg.contains("already received"), "{e}");
        }
        // Another incarnation (a restarted process) has its own ids.
        s.admit(&peer(8), 1).unwrap();
        assert_eq!(s.admit(&p, 0).unwrap_err().code, Code::InvalidArgument);
    }

    #[test]
    fn the_window_slides_and_refuses_what_it_forgot() {
        let mut s = SeenRequests::new();
        let p = peer(1);
        s.admit(&p, 10).unwrap();
        s.admit(&p, 10 + REQUEST_WINDOW - 1).unwrap();
        // Still inside the window: remembered.
        assert_eq!(s.admit(&p, 10).unwrap_err().code, Code::Aborted);
        // 11 was never seen and is still inside: admitted, then remembered.
        s.admit(&p, 11).unwrap();
        assert!(s.admit(&p, 11).is_err());
        s.admit(&p, 10 + 3 * REQUEST_WINDOW).unwrap();
        let e = s.admit(&p, 12).unwrap_err();
        assert!(e.msg.contains("older than the request window"), "{e}");
        // Shifts by amounts that are not word multiples keep every bit in place.
        let mut w = Window::new();
        let ids: Vec<u64> = (1..400).filter(|i| i % 3 == 0).collect();
        for &id in &ids {
            w.admit(id).unwrap();
        }
        for id in 1..400 {
            assert_eq!(w.admit(id).is_err(), ids.contains(&id), "id {id}");
        }
    }

    #[test]
    fn senders_are_bounded() {
        let mut s = SeenRequests::new();
        for inc in 0..SENDERS_REMEMBERED_MAX as u64 + 10 {
            s.admit(&peer(inc + 1), 1).unwrap();
        }
        assert_eq!(s.senders(), SENDERS_REMEMBERED_MAX);
        // The most recent sender is still remembered.
        assert!(s.admit(&peer(SENDERS_REMEMBERED_MAX as u64 + 10), 1).is_err());
    }
}
