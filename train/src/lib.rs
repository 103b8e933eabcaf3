//! Training for rill, as `tf.train`: gradients, optimizers, device setters, replication,
//! checkpoints, monitored sessions and cluster resolvers; `standard_runtime()` wires every crate.

#![deny(unsafe_code)]

pub mod device_setter;
pub mod digits;
pub mod gradients;
pub mod half_transfer;
pub mod hparam;
pub mod job;
pub mod models;
pub mod monitored;
pub mod optimizer;
pub mod partitioned;
pub mod replication;
pub mod resolver;
pub mod saver;
pub mod serving;
pub mod staleness;
pub mod summary;
pub mod sync_replicas;

pub use device_setter::{replica_device_setter, PsStrategy, ReplicaDeviceSetterOptions, STANDARD_PS_OPS};
pub use gradients::{gradients, GradFn, GRADIENTS};
pub use half_transfer::{half_gradients, read_half, HalfTransfer};
pub use monitored::{MonitoredSession, MonitoredSessionOptions, Scaffold, SessionFactory};
pub use optimizer::{
    create_global_step, exponential_decay, global_step, Adam, GradientDescent, LearningRate, Momentum,
    Optimizer, RMSProp, WithLearningRate,
};
pub use partitioned::{
    embedding_lookup, fixed_size_partitioner, min_max_variable_partitioner, partitioned_variable, rows_of,
    PartitionStrategy, PartitionedVariable, Partitioner,
};
pub use resolver::{resolve, ResolvedCluster, ResolverOptions};
pub use saver::{latest_checkpoint, Saver, SaverOptions};
pub use staleness::{staleness_histogram, AsyncOps, AsyncPolicy, AsyncReplicasOptimizer};
pub use summary::{FileWriter, Histogram};
pub use sync_replicas::{ChiefLoop, ChiefLoopOptions, SyncReplicasOps, SyncReplicasOptimizer};

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
