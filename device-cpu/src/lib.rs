//! rill's CPU device: a work-stealing pool on crossbeam-deque owned by the device (inter-op work
//! and, in a second pool, intra-op chunks), and the CPU kernels (`KERNELS`).

#![deny(unsafe_code)]

pub mod alloc;
pub mod kernels;
pub mod pool;

pub use alloc::BufferPool;
pub use kernels::KERNELS;
pub use pool::ThreadPool;

use rill_graph::{
    DType, Device, DeviceAttributes, DeviceFactory, DeviceName, IntraOpPool, ResourceMgr, Result, Runtime,
    SessionOptions, Shape, Task, Tensor,
};
use std::any::Any;
use std::sync::Arc;

/// A CPU device. Devices made by one factory call share their pools, as TensorFlow's CPU
/// devices of one session share its thread pools.
pub struct CpuDevice {
    attrs: DeviceAttributes,
    resources: ResourceMgr,
    inter: Arc<ThreadPool>,
    intra: Arc<ThreadPool>,
    buffers: Arc<BufferPool>,
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuDevice({})", self.attrs.name)
    }
}

impl CpuDevice {
    /// A device named `name` on the given pools, with its own buffer pool.
    pub fn new(name: DeviceName, inter: Arc<ThreadPool>, intra: Arc<ThreadPool>) -> CpuDevice {
        CpuDevice::with_buffers(name, inter, intra, BufferPool::new(alloc::POOL_MAX_BYTES))
    }

    /// A device named `name` on the given thread pools, allocating large outputs from `buffers`.
    pub fn with_buffers(
        name: DeviceName,
        inter: Arc<ThreadPool>,
        intra: Arc<ThreadPool>,
        buffers: Arc<BufferPool>,
    ) -> CpuDevice {
        CpuDevice {
            attrs: DeviceAttributes {
                name,
                device_type: "CPU".into(),
                memory_limit_bytes: 0,
                incarnation: rill_graph::random_u64(),
                description: format!(
                    "CPU, {} inter-op threads, {} intra-op threads",
                    inter.num_threads(),
                    intra.num_threads() + 1
                ),
            },
            resources: ResourceMgr::new(),
            inter,
            intra,
            buffers,
        }
    }

    /// The caching allocator behind `allocate`.
    pub fn buffers(&self) -> &Arc<BufferPool> {
        &self.buffers
    }

    /// `n` CPU devices under `task` sharing thread pools sized by the options and one buffer pool.
    pub fn create(opts: &SessionOptions, task: &DeviceName, n: usize) -> Vec<Arc<dyn Device>> {
        let intra = Arc::new(ThreadPool::with_spin(
            "rill-intra",
            opts.intra_op_threads().saturating_sub(1),
            pool::INTRA_OP_SPIN,
        ));
        let inter =
            Arc::new(ThreadPool::helping("rill-inter", opts.inter_op_threads(), pool::INTER_OP_SPIN, &intra));
        let buffers = BufferPool::new(alloc::POOL_MAX_BYTES);
        (0..n)
            .map(|i| {
                let mut name = task.clone();
                name.device_type = Some("CPU".into());
                name.id = Some(i as u32);
                let d = CpuDevice::with_buffers(name, inter.clone(), intra.clone(), buffers.clone());
                Arc::new(d) as Arc<dyn Device>
            })
            .collect()
    }
}

impl Device for CpuDevice {
    fn attributes(&self) -> &DeviceAttributes {
        &self.attrs
    }
    fn resource_mgr(&self) -> &ResourceMgr {
        &self.resources
    }
    fn schedule(&self, task: Task) {
        self.inter.spawn(task)
    }
    fn intra_op(&self) -> &dyn IntraOpPool {
        &*self.intra
    }
    fn allocate(&self, dtype: DType, shape: Shape) -> Result<Tensor> {
        self.buffers.allocate(dtype, shape)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Creates CPU devices: `device_count["CPU"]` of them (default 1).
#[derive(Debug, Default)]
pub struct CpuDeviceFactory;

impl DeviceFactory for CpuDeviceFactory {
    fn device_type(&self) -> &'static str {
        "CPU"
    }
    fn create_devices(&self, opts: &SessionOptions, task: &DeviceName) -> Result<Vec<Arc<dyn Device>>> {
        let n = opts.device_count.get("CPU").copied().unwrap_or(1).max(1);
        Ok(CpuDevice::create(opts, task, n))
    }
}

/// A runtime with the graph crate's ops and the CPU device and kernels: what a CPU-only program
/// needs to run core graphs.
pub fn cpu_runtime() -> Runtime {
    Runtime::new().with_kernels(KERNELS).with_device_factory(Arc::new(CpuDeviceFactory))
}
