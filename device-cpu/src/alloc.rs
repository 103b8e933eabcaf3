//! The CPU device's caching allocator: large tensor buffers go back to a pool when their last
//! tensor is dropped and are handed out again, so a step's big outputs reuse pages that are
//! already mapped instead of faulting in fresh zero pages every step.
//!
//! Buffers are keyed by the length of their byte vector. A request takes the smallest cached
//! vector that holds it with at most `REUSE_SLACK_DIVISOR`-th to spare; a returned vector is kept
//! while the pool holds at most its byte cap, and freed otherwise.

use rill_graph::{Buffer, BufferRecycler, DType, Error, Result, Shape, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Buffers smaller than this are plain zeroed allocations: the system allocator serves them from
/// memory it already holds. From here on, zero-filling a fresh buffer every step (a 128×256 f32
/// activation is 128 KiB) costs more than handing out a cached one.
pub const POOL_MIN_BYTES: usize = 64 << 10;
/// Most bytes the pool keeps idle (1 GiB): enough for the large activations and gradients of a
/// training step on one CPU, small enough that an idle session does not pin much memory.
pub const POOL_MAX_BYTES: usize = 1 << 30;
/// A cached vector serves a request when it is at most 1/8 larger than needed, so a small tensor
/// never holds a much larger buffer.
const REUSE_SLACK_DIVISOR: usize = 8;

/// How often the pool served a request from its cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests served by a cached buffer.
    pub hits: u64,
    /// Requests that allocated fresh memory.
    pub misses: u64,
    /// Bytes cached now.
    pub cached_bytes: usize,
    /// Buffers cached now.
    pub cached_buffers: usize,
}

#[derive(Default)]
struct State {
    /// Idle byte vectors by their length.
    free: BTreeMap<usize, Vec<Vec<u8>>>,
    cached_bytes: usize,
    hits: u64,
    misses: u64,
}

impl State {
    fn invariants(&self, max_bytes: usize) {
        debug_assert!(self.cached_bytes <= max_bytes);
        debug_assert_eq!(self.cached_bytes, self.free.iter().map(|(len, v)| len * v.len()).sum::<usize>());
    }
}

/// A pool of large host buffers shared by the CPU devices of one factory call.
pub struct BufferPool {
    max_bytes: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufferPool({:?})", self.stats())
    }
}

impl BufferPool {
    /// A pool that keeps at most `max_bytes` idle.
    pub fn new(max_bytes: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool { max_bytes, state: Mutex::new(State::default()) })
    }

    pub fn stats(&self) -> PoolStats {
        let s = self.lock();
        PoolStats {
            hits: s.hits,
            misses: s.misses,
            cached_bytes: s.cached_bytes,
            cached_buffers: s.free.values().map(Vec::len).sum(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic: every update is a few plain assignments.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A tensor for a kernel to overwrite: recycled bytes (contents unspecified) for large
    /// fixed-size dtypes, zeros otherwise.
    pub fn allocate(self: &Arc<Self>, dtype: DType, shape: Shape) -> Result<Tensor> {
        let mut t = self.allocate_unspecified(dtype, shape)?;
        // Debug builds hand out all-ones bytes (NaN for floats, -1 for integers), so a kernel
        // that leaves part of its output unwritten fails its tests instead of reading zeros.
        if cfg!(debug_assertions) && dtype.size().is_some() {
            t.as_bytes_mut()?.fill(0xFF);
        }
        Ok(t)
    }

    fn allocate_unspecified(self: &Arc<Self>, dtype: DType, shape: Shape) -> Result<Tensor> {
        let Some(size) = dtype.size() else {
            return Tensor::try_zeros(dtype, shape);
        };
        let len = shape.checked_num_elements()?.checked_mul(size).ok_or_else(|| {
            Error::invalid_argument(format!("a {dtype} tensor of shape {shape} is too large"))
        })?;
        if len < POOL_MIN_BYTES {
            return Tensor::try_zeros(dtype, shape);
        }
        let need = Buffer::capacity_for(len);
        let cached = {
            let mut s = self.lock();
            let found = s.free.range_mut(need..=need + need / REUSE_SLACK_DIVISOR).next().map(|(&k, v)| {
                let bytes = v.pop().expect("empty lists are removed");
                (k, bytes, v.is_empty())
            });
            match found {
                Some((k, bytes, emptied)) => {
                    if emptied {
                        s.free.remove(&k);
                    }
                    s.cached_bytes -= k;
                    s.hits += 1;
                    s.invariants(self.max_bytes);
                    Some(bytes)
                }
                None => {
                    s.misses += 1;
                    None
                }
            }
        };
        // Fresh vectors come zeroed from the allocator's zero pages (`calloc`), with no memset.
        let bytes = cached.unwrap_or_else(|| vec![0u8; need]);
        let recycler: Arc<dyn BufferRecycler> = self.clone();
        let buf = Buffer::from_recycled(bytes, len, recycler)
            .ok_or_else(|| Error::internal("a pooled buffer is shorter than it was filed under"))?;
        Tensor::from_buffer(dtype, shape, buf)
    }
}

impl BufferRecycler for BufferPool {
    fn recycle(&self, bytes: Vec<u8>) {
        let len = bytes.len();
        if len < POOL_MIN_BYTES {
            return;
        }
        let mut s = self.lock();
        if s.cached_bytes + len > self.max_bytes {
            drop(s);
            // Freed outside the lock: returning a large mapping to the OS takes a while.
            drop(bytes);
            return;
        }
        s.cached_bytes += len;
        s.free.entry(len).or_default().push(bytes);
        s.invariants(self.max_bytes);
    }
}
