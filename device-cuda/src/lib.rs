//! rill's GPU device: the CUDA driver API loaded at run time (libloading), an allocator, streams
//! and PTX kernels. Without a driver or a GPU the factory reports `Unavailable` and the runtime
//! has no GPU device.
