//! TensorFlow-style input pipelines for rill: queues (FIFO, random shuffle, padding, priority),
//! readers and decoders, QueueRunner and Coordinator, and conditional accumulators.
