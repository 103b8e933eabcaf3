//! The `Device` seam: what the executor needs from a CPU or GPU (a name, resources, an inter-op
//! scheduler, an intra-op pool, host copies) and how a program creates devices (`DeviceFactory`).

use crate::{DeviceName, Error, ResourceMgr, Result, SessionOptions, Tensor};
use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Static facts about a device.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceAttributes {
    pub name: DeviceName,
    /// `CPU`, `GPU`.
    pub device_type: String,
    pub memory_limit_bytes: u64,
    /// Random per device instance: a restarted device has a new one.
    pub incarnation: u64,
    pub description: String,
}

/// Placement priority of a device type: higher wins when a node could go to several.
pub fn device_type_priority(device_type: &str) -> i32 {
    match device_type {
        "GPU" => 210,
        "CPU" => 100,
        _ => 50,
    }
}

/// A unit of work for a device's inter-op pool.
pub type Task = Box<dyn FnOnce() + Send + 'static>;

/// Runs `f(i)` for every `i` in `0..n`, in parallel, returning when all are done.
pub trait IntraOpPool: Send + Sync {
    fn num_threads(&self) -> usize;
    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync));
    /// The pool's idle workers now, where it can tell: a hint for whether to split work at all
    /// (with every worker busy, a split only adds contention) and how small a split pays.
    fn idle_workers(&self) -> Option<IdleWorkers> {
        None
    }
}

/// Idle workers of an intra-op pool at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdleWorkers {
    /// Awake and looking for work: a chunk handed out starts at once.
    pub awake: usize,
    /// Asleep: a chunk handed out waits for a wake-up (tens of microseconds on a busy VM).
    pub asleep: usize,
}

/// An intra-op pool that runs everything on the calling thread.
#[derive(Debug, Default)]
pub struct InlinePool;

impl IntraOpPool for InlinePool {
    fn num_threads(&self) -> usize {
        1
    }
    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f)
    }
}

/// Splits `out` into chunks of `chunk_len` and calls `f(offset, chunk)` for each on the pool.
/// Safe code: each chunk is handed out exactly once through its own lock.
pub fn parallel_chunks_mut<T: Send>(
    pool: &dyn IntraOpPool,
    out: &mut [T],
    chunk_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk_len = chunk_len.max(1);
    if out.len() <= chunk_len || pool.num_threads() <= 1 {
        for (i, c) in out.chunks_mut(chunk_len).enumerate() {
            f(i * chunk_len, c);
        }
        return;
    }
    let chunks: Vec<Mutex<Option<&mut [T]>>> =
        out.chunks_mut(chunk_len).map(|c| Mutex::new(Some(c))).collect();
    pool.parallel_for(chunks.len(), &|i| {
        let taken = chunks[i].lock().map(|mut g| g.take()).ok().flatten();
        if let Some(c) = taken {
            f(i * chunk_len, c);
        }
    });
}

/// Chunk length that spreads `n` units over the pool with at least `min_chunk` per chunk.
pub fn chunk_len(pool: &dyn IntraOpPool, n: usize, min_chunk: usize) -> usize {
    let parts = (pool.num_threads() * 4).max(1);
    n.div_ceil(parts).max(min_chunk).max(1)
}

/// Splits `0..n` into ranges for the pool and calls `f(range)` on each.
pub fn parallel_ranges(pool: &dyn IntraOpPool, n: usize, min_chunk: usize, f: impl Fn(Range<usize>) + Sync) {
    let c = chunk_len(pool, n, min_chunk);
    let parts = n.div_ceil(c);
    if parts <= 1 {
        if n > 0 {
            f(0..n);
        }
        return;
    }
    pool.parallel_for(parts, &|i| f(i * c..((i + 1) * c).min(n)));
}

/// A device: where kernels run and resources live.
pub trait Device: Send + Sync {
    fn attributes(&self) -> &DeviceAttributes;

    fn name(&self) -> &DeviceName {
        &self.attributes().name
    }

    fn device_type(&self) -> &str {
        &self.attributes().device_type
    }

    /// The resources (variables, queues...) owned by this device.
    fn resource_mgr(&self) -> &ResourceMgr;

    /// Runs a task on the device's inter-op pool. Never blocks.
    fn schedule(&self, task: Task);

    /// The pool for parallel work inside one kernel.
    fn intra_op(&self) -> &dyn IntraOpPool;

    /// A tensor for a kernel to fill completely: its contents are unspecified (zeros, or the
    /// bytes of an earlier tensor when the device recycles memory).
    fn allocate(&self, dtype: crate::DType, shape: crate::Shape) -> Result<Tensor> {
        Tensor::try_zeros(dtype, shape)
    }

    /// A host copy of a tensor in this device's memory (identity for host devices).
    fn to_host(&self, t: &Tensor) -> Result<Tensor> {
        if t.is_host() {
            Ok(t.clone())
        } else {
            Err(Error::internal(format!("{} cannot read device memory", self.name())))
        }
    }

    /// A copy of a host tensor in this device's memory (identity for host devices).
    #[allow(clippy::wrong_self_convention)]
    fn from_host(&self, t: Tensor) -> Result<Tensor> {
        Ok(t)
    }

    fn as_any(&self) -> &dyn Any;
}

impl fmt::Debug for dyn Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.name())
    }
}

/// Creates the devices of one type for a session or a server.
pub trait DeviceFactory: Send + Sync {
    fn device_type(&self) -> &'static str;
    /// Devices named under `task` (`/job:J/replica:0/task:T`). No device of this type on the
    /// machine is `Unavailable`; the caller then simply has none.
    fn create_devices(&self, opts: &SessionOptions, task: &DeviceName) -> Result<Vec<Arc<dyn Device>>>;
}
