//! The raw CUDA driver API: FFI types and a struct of the function pointers rill uses, loaded from
//! `libcuda.so.1` at run time so one binary runs with and without a GPU.

use std::ffi::{c_char, c_int, c_uint, c_void};

pub type CUresult = c_int;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;
pub type CUcontext = *mut c_void;
pub type CUstream = *mut c_void;
pub type CUevent = *mut c_void;
pub type CUmodule = *mut c_void;
pub type CUfunction = *mut c_void;

pub const CUDA_SUCCESS: CUresult = 0;
/// `CU_EVENT_DEFAULT`: events that record timing.
pub const CU_EVENT_DEFAULT: c_uint = 0;
/// `CU_STREAM_NON_BLOCKING`: the stream does not synchronise with the legacy default stream.
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

/// Library names tried in order: the versioned name the driver package installs, then the
/// development symlink.
pub const LIBCUDA_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// The driver entry points rill calls. Field names are the C symbol names, so a reader can look
/// each one up in the CUDA driver API reference.
#[allow(non_snake_case)]
pub struct Sys {
    pub cuInit: unsafe extern "C" fn(flags: c_uint) -> CUresult,
    pub cuDriverGetVersion: unsafe extern "C" fn(version: *mut c_int) -> CUresult,
    pub cuGetErrorName: unsafe extern "C" fn(e: CUresult, s: *mut *const c_char) -> CUresult,
    pub cuGetErrorString: unsafe extern "C" fn(e: CUresult, s: *mut *const c_char) -> CUresult,
    pub cuDeviceGetCount: unsafe extern "C" fn(count: *mut c_int) -> CUresult,
    pub cuDeviceGet: unsafe extern "C" fn(dev: *mut CUdevice, ordinal: c_int) -> CUresult,
    pub cuDeviceGetName: unsafe extern "C" fn(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult,
    pub cuDeviceTotalMem_v2: unsafe extern "C" fn(bytes: *mut usize, dev: CUdevice) -> CUresult,
    pub cuDeviceGetAttribute: unsafe extern "C" fn(v: *mut c_int, attr: c_int, dev: CUdevice) -> CUresult,
    pub cuDevicePrimaryCtxRetain: unsafe extern "C" fn(ctx: *mut CUcontext, dev: CUdevice) -> CUresult,
    pub cuDevicePrimaryCtxRelease_v2: unsafe extern "C" fn(dev: CUdevice) -> CUresult,
    pub cuCtxSetCurrent: unsafe extern "C" fn(ctx: CUcontext) -> CUresult,
    pub cuMemGetInfo_v2: unsafe extern "C" fn(free: *mut usize, total: *mut usize) -> CUresult,
    pub cuMemAlloc_v2: unsafe extern "C" fn(ptr: *mut CUdeviceptr, bytes: usize) -> CUresult,
    pub cuMemFree_v2: unsafe extern "C" fn(ptr: CUdeviceptr) -> CUresult,
    pub cuMemAllocHost_v2: unsafe extern "C" fn(ptr: *mut *mut c_void, bytes: usize) -> CUresult,
    pub cuMemFreeHost: unsafe extern "C" fn(ptr: *mut c_void) -> CUresult,
    pub cuMemcpyHtoDAsync_v2:
        unsafe extern "C" fn(dst: CUdeviceptr, src: *const c_void, bytes: usize, s: CUstream) -> CUresult,
    pub cuMemcpyDtoHAsync_v2:
        unsafe extern "C" fn(dst: *mut c_void, src: CUdeviceptr, bytes: usize, s: CUstream) -> CUresult,
    pub cuMemcpyDtoDAsync_v2:
        unsafe extern "C" fn(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, s: CUstream) -> CUresult,
    pub cuMemsetD8Async: unsafe extern "C" fn(dst: CUdeviceptr, v: u8, n: usize, s: CUstream) -> CUresult,
    pub cuStreamCreate: unsafe extern "C" fn(s: *mut CUstream, flags: c_uint) -> CUresult,
    pub cuStreamSynchronize: unsafe extern "C" fn(s: CUstream) -> CUresult,
    pub cuStreamDestroy_v2: unsafe extern "C" fn(s: CUstream) -> CUresult,
    pub cuEventCreate: unsafe extern "C" fn(e: *mut CUevent, flags: c_uint) -> CUresult,
    pub cuEventRecord: unsafe extern "C" fn(e: CUevent, s: CUstream) -> CUresult,
    pub cuEventSynchronize: unsafe extern "C" fn(e: CUevent) -> CUresult,
    pub cuEventElapsedTime: unsafe extern "C" fn(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult,
    pub cuEventDestroy_v2: unsafe extern "C" fn(e: CUevent) -> CUresult,
    pub cuModuleLoadData: unsafe extern "C" fn(m: *mut CUmodule, image: *const c_void) -> CUresult,
    pub cuModuleUnload: unsafe extern "C" fn(m: CUmodule) -> CUresult,
    pub cuModuleGetFunction:
        unsafe extern "C" fn(f: *mut CUfunction, m: CUmodule, name: *const c_char) -> CUresult,
    pub cuLaunchKernel: unsafe extern "C" fn(
        f: CUfunction,
        grid_x: c_uint,
        grid_y: c_uint,
        grid_z: c_uint,
        block_x: c_uint,
        block_y: c_uint,
        block_z: c_uint,
        shared_bytes: c_uint,
        s: CUstream,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> CUresult,
    /// Keeps the library mapped for as long as the pointers above may be called.
    _lib: libloading::Library,
}

/// Why loading failed: the library is missing, or a symbol is (a driver too old for rill).
#[derive(Debug)]
pub struct LoadError(pub String);

impl Sys {
    /// Loads the first of `names` that opens and resolves every symbol from it.
    #[allow(unsafe_code)]
    pub fn load(names: &[&str]) -> Result<Sys, LoadError> {
        let mut tried = Vec::new();
        for name in names {
            // SAFETY: libcuda's initialisers only register the library; they have no
            // preconditions on the loading thread.
            let lib = match unsafe { libloading::Library::new(name) } {
                Ok(lib) => lib,
                Err(e) => {
                    tried.push(format!("{name}: {e}"));
                    continue;
                }
            };
            return Sys::resolve(lib).map_err(|e| LoadError(format!("{name}: {e}")));
        }
        Err(LoadError(tried.join("; ")))
    }

    #[allow(unsafe_code)]
    fn resolve(lib: libloading::Library) -> Result<Sys, libloading::Error> {
        macro_rules! sym {
            ($name:ident) => {{
                // SAFETY: the field's type is the C prototype of this symbol in cuda.h, so
                // calling through the copied pointer matches the callee's ABI.
                *unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes())? }
            }};
        }
        Ok(Sys {
            cuInit: sym!(cuInit),
            cuDriverGetVersion: sym!(cuDriverGetVersion),
            cuGetErrorName: sym!(cuGetErrorName),
            cuGetErrorString: sym!(cuGetErrorString),
            cuDeviceGetCount: sym!(cuDeviceGetCount),
            cuDeviceGet: sym!(cuDeviceGet),
            cuDeviceGetName: sym!(cuDeviceGetName),
            cuDeviceTotalMem_v2: sym!(cuDeviceTotalMem_v2),
            cuDeviceGetAttribute: sym!(cuDeviceGetAttribute),
            cuDevicePrimaryCtxRetain: sym!(cuDevicePrimaryCtxRetain),
            cuDevicePrimaryCtxRelease_v2: sym!(cuDevicePrimaryCtxRelease_v2),
            cuCtxSetCurrent: sym!(cuCtxSetCurrent),
            cuMemGetInfo_v2: sym!(cuMemGetInfo_v2),
            cuMemAlloc_v2: sym!(cuMemAlloc_v2),
            cuMemFree_v2: sym!(cuMemFree_v2),
            cuMemAllocHost_v2: sym!(cuMemAllocHost_v2),
            cuMemFreeHost: sym!(cuMemFreeHost),
            cuMemcpyHtoDAsync_v2: sym!(cuMemcpyHtoDAsync_v2),
            cuMemcpyDtoHAsync_v2: sym!(cuMemcpyDtoHAsync_v2),
            cuMemcpyDtoDAsync_v2: sym!(cuMemcpyDtoDAsync_v2),
            cuMemsetD8Async: sym!(cuMemsetD8Async),
            cuStreamCreate: sym!(cuStreamCreate),
            cuStreamSynchronize: sym!(cuStreamSynchronize),
            cuStreamDestroy_v2: sym!(cuStreamDestroy_v2),
            cuEventCreate: sym!(cuEventCreate),
            cuEventRecord: sym!(cuEventRecord),
            cuEventSynchronize: sym!(cuEventSynchronize),
            cuEventElapsedTime: sym!(cuEventElapsedTime),
            cuEventDestroy_v2: sym!(cuEventDestroy_v2),
            cuModuleLoadData: sym!(cuModuleLoadData),
            cuModuleUnload: sym!(cuModuleUnload),
            cuModuleGetFunction: sym!(cuModuleGetFunction),
            cuLaunchKernel: sym!(cuLaunchKernel),
            _lib: lib,
        })
    }
}
