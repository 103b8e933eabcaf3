//! The CUDA driver API in three layers (as cudarc has them): `sys` loads function pointers,
//! `result` turns each call into a `Result`, `safe` owns handles. The only `unsafe` of the crate
//! lives here.

#![allow(unsafe_code)]

// Crate-private: these take raw handles whose validity only `safe` can vouch for.
pub mod cublas;
pub(crate) mod result;
pub mod safe;
pub mod sys;

pub use cublas::{Cublas, CublasLib};
pub use safe::{
    Context, DeviceBuffer, Driver, Event, Function, KernelArg, LaunchConfig, Module, Param, PinnedBuffer,
    Stream,
};
