//! Training for rill, as `tf.train`: gradients, optimizers, device setters, replication,
//! checkpoints, monitored sessions and cluster resolvers; `standard_runtime()` wires every crate.
