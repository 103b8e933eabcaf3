//! rill's data model and local runtime: tensors, graphs, op and kernel registries, placement,
//! partitioning, the executor, rendezvous, resource containers and `DirectSession`.
//!
//! Registries are values: a program adds each crate's `OPS` and `KERNELS` tables to a `Runtime`
//! in `main`; nothing is registered before `main` runs.

#![deny(unsafe_code)]

mod attr;
mod builder;
mod cancel;
pub mod device;
mod device_name;
mod error;
pub mod executor;
pub mod fuse;
mod graph;
pub mod kernel;
pub mod kernels;
mod op;
pub mod ops;
pub mod partition;
pub mod placer;
mod rendezvous;
mod resource;
pub mod session;
mod shape;
mod tensor;
pub mod trace;
mod types;

pub use half;

pub use attr::{AttrValue, Attrs, AttrsExt};
pub use cancel::{CancelToken, CancellationManager};
pub use device::{Device, DeviceAttributes, DeviceFactory, IdleWorkers, IntraOpPool, Task};
pub use device_name::DeviceName;
pub use error::{Code, Error, Result};
pub use executor::Executor;
pub use graph::{
    DeviceScope, Graph, GraphDef, NodeDef, NodeId, Output, Reuse, VariableInfo, VariableOptions,
};
pub use kernel::{
    AsyncDone, AsyncKernelContext, AsyncOpKernel, CallFrame, Kernel, KernelDef, KernelInit, KernelRegistry,
    NodeInfo, OpKernel, OpKernelContext, StepContext, StepId, TypeOf, Value,
};
pub use op::{InferCtx, OpDef, OpRegistry, TensorInfo};
pub use rendezvous::{LocalRendezvous, RecvDone, Rendezvous, RendezvousKey};
pub use resource::{Resource, ResourceMgr, Variable, DEFAULT_CONTAINER};
pub use session::{
    DirectSession, GpuOptions, RunMetadata, RunOptions, Runtime, Session, SessionOptions, TraceLevel,
};
pub use shape::{PartialShape, Shape, MAX_RANK};
pub use tensor::{Buffer, BufferRecycler, DeviceMemory, ExternalMemory, Tensor, BUFFER_ALIGN};
pub use trace::StepStats;
pub use types::{DType, Element};

/// A random 64-bit number from the OS's hash seed and the clock: for incarnations and ids, not
/// for secrets.
pub fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}
