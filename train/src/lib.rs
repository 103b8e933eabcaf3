//! Training for rill, as `tf.train`: gradients, optimizers, device setters, replication,
//! checkpoints, monitored sessions and cluster resolvers; `standard_runtime()` wires every crate.

#![deny(unsafe_code)]

use rill_graph::Runtime;

/// The runtime of a full program: the ops and kernels of every crate and the CPU device.
pub fn standard_runtime() -> Runtime {
    rill_device_cpu::cpu_runtime()
}
