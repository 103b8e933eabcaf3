//! Recycled destinations for large frame bodies read from sockets. A fresh 64 MiB buffer costs
//! 16 384 page faults (and the kernel's zeroing) on the first write, about as much as the transfer
//! itself; a buffer that comes back when its tensor drops is already mapped.

use rill_graph::{Buffer, BufferRecycler};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Bodies smaller than this are allocated fresh: the allocator keeps such sizes mapped anyway.
pub const BODY_POOL_SIZE_MIN: usize = 1 << 20;
/// Idle bytes the pool keeps; buffers coming back beyond it are freed.
pub const BODY_POOL_IDLE_SIZE_MAX: usize = 1 << 30;

/// Idle byte vectors by capacity.
#[derive(Debug, Default)]
pub struct BodyPool {
    idle: Mutex<(BTreeMap<usize, Vec<Vec<u8>>>, usize)>,
}

impl BodyPool {
    pub fn new() -> Arc<BodyPool> {
        Arc::new(BodyPool::default())
    }

    /// A buffer of `len` bytes (contents unspecified) that returns here when dropped. A recycled
    /// vector is used when it holds `len` without wasting more than half of itself.
    pub fn buffer(self: &Arc<Self>, len: usize) -> Buffer {
        if len < BODY_POOL_SIZE_MIN {
            return Buffer::zeroed(len);
        }
        let need = Buffer::capacity_for(len);
        let reused = {
            let mut g = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let cap = g.0.range(need..=need.saturating_mul(2)).next().map(|(&c, _)| c);
            let v = cap.and_then(|c| {
                let list = g.0.get_mut(&c)?;
                let v = list.pop();
                if list.is_empty() {
                    g.0.remove(&c);
                }
                v
            });
            if let Some(v) = &v {
                g.1 -= v.capacity();
            }
            v
        };
        let bytes = reused.unwrap_or_else(|| vec![0u8; need]);
        let recycler: Arc<dyn BufferRecycler> = self.clone();
        Buffer::from_recycled(bytes, len, recycler).unwrap_or_else(|| Buffer::zeroed(len))
    }

    /// Idle bytes held.
    #[cfg(test)]
    pub fn idle_bytes(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

impl BufferRecycler for BodyPool {
    fn recycle(&self, bytes: Vec<u8>) {
        let mut g = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if bytes.capacity() < BODY_POOL_SIZE_MIN || g.1 + bytes.capacity() > BODY_POOL_IDLE_SIZE_MAX {
            return;
        }
        g.1 += bytes.capacity();
        g.0.entry(bytes.capacity()).or_default().push(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_bodies_reuse_their_memory_within_bounds() {
        let pool = BodyPool::new();
        let mut b = pool.buffer(3 << 20);
        b.as_bytes_mut()[0] = 7;
        let addr = b.as_bytes().as_ptr();
        drop(b);
        assert!(pool.idle_bytes() >= 3 << 20);
        // A slightly smaller body reuses it; a much smaller one does not.
        let small = pool.buffer(1 << 20);
        assert_ne!(small.as_bytes().as_ptr(), addr);
        let again = pool.buffer((3 << 20) - 100);
        assert_eq!(again.as_bytes().as_ptr() as usize & !63, addr as usize & !63);
        assert_eq!(again.len(), (3 << 20) - 100);
        assert_eq!(pool.idle_bytes(), 0);
        // Tiny bodies never enter the pool.
        drop(pool.buffer(100));
        assert_eq!(pool.idle_bytes(), 0);
        drop(again);
        drop(small);
        assert!(pool.idle_bytes() <= BODY_POOL_IDLE_SIZE_MAX);
    }
}
