//! rill's CPU device: a work-stealing pool and the CPU kernels.
