//! rill's CPU device: a work-stealing pool on crossbeam-deque owned by the device (inter-op work
//! and, in a second pool, intra-op chunks), and the CPU kernels (`KERNELS`).

#![deny(unsafe_code)]

pub mod kernels;
pub mod pool;

pub use kernels::KERNELS;
pub use pool::ThreadPool;

use rill_graph::{
    Device, DeviceAttributes, DeviceFactory, DeviceName, IntraOpPool, ResourceMgr, Result, Runtime,
    SessionOptions, Task,
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
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuDevice({})", self.attrs.name)
    }
}

impl CpuDevice {
    /// A device named `name` on the given pools.
    pub fn new(name: DeviceName, inter: Arc<ThreadPool>, intra: Arc<ThreadPool>) -> CpuDevice {
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
        }
    }

    /// `n` CPU devices under `task` sharing pools sized by the options.
    pub fn create(opts: &SessionOptions, task: &DeviceName, n: usize) -> Vec<Arc<dyn Device>> {
        let inter = Arc::new(ThreadPool::new("rill-inter", opts.inter_op_threads()));
        let intra = Arc::new(ThreadPool::new("rill-intra", opts.intra_op_threads().saturating_sub(1)));
        (0..n)
            .map(|i| {
                let mut name = task.clone();
                name.device_type = Some("CPU".into());
                name.id = Some(i as u32);
                Arc::new(CpuDevice::new(name, inter.clone(), intra.clone())) as Arc<dyn Device>
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
