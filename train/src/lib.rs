//! Training for rill, as `tf.train`: gradients, optimizers, device setters, replication,
//! checkpoints, monitored sessions and cluster resolvers; `standard_runtime()` wires every crate.

#![deny(unsafe_code)]

pub mod gradients;
pub mod optimizer;
pub mod saver;
pub mod summary;

pub use gradients::{gradients, GradFn, GRADIENTS};
pub use optimizer::{
    create_global_step, exponential_decay, global_step, Adam, GradientDescent, LearningRate, Momentum,
    Optimizer, RMSProp,
};
pub use saver::{latest_checkpoint, Saver, SaverOptions};
pub use summary::FileWriter;

use rill_graph::Runtime;
use std::sync::Arc;

/// The runtime of a full program: the ops and kernels of every crate, the CPU device, and GPU
/// devices where a CUDA driver and a GPU are present (elsewhere the GPU factory reports
/// `Unavailable` and the runtime simply has no GPU).
pub fn standard_runtime() -> Runtime {
    rill_device_cpu::cpu_runtime()
        .with_ops(rill_queues::OPS)
        .with_kernels(rill_queues::KERNELS)
        .with_kernels(rill_device_cuda::KERNELS)
        .with_device_factory(Arc::new(rill_device_cuda::CudaDeviceFactory::new()))
}
