//! Thin wrappers over `Sys`: one function per driver call, each returning `rill_graph::Result`
//! with the CUDA error name and text in the message. Handles are still raw here; `safe` owns them.

use super::sys::*;
use rill_graph::{Code, Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};

/// CUDA error numbers that map to a TensorFlow status code other than `Internal`.
const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
const CUDA_ERROR_DEINITIALIZED: CUresult = 4;
const CUDA_ERROR_NO_DEVICE: CUresult = 100;
const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
const CUDA_ERROR_INSUFFICIENT_DRIVER: CUresult = 35;
const CUDA_ERROR_SYSTEM_DRIVER_MISMATCH: CUresult = 803;
const CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE: CUresult = 804;

/// The status code for a CUDA error: "no usable GPU here" is `Unavailable` so callers treat it
/// like a machine without a GPU; out of memory is `ResourceExhausted`.
pub fn code_of(e: CUresult) -> Code {
    match e {
        CUDA_ERROR_OUT_OF_MEMORY => Code::ResourceExhausted,
        CUDA_ERROR_INVALID_VALUE => Code::InvalidArgument,
        CUDA_ERROR_NOT_INITIALIZED
        | CUDA_ERROR_DEINITIALIZED
        | CUDA_ERROR_NO_DEVICE
        | CUDA_ERROR_INVALID_DEVICE
        | CUDA_ERROR_INSUFFICIENT_DRIVER
        | CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => Code::Unavailable,
        _ => Code::Internal,
    }
}

#[allow(unsafe_code)]
fn c_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the driver returns pointers to static NUL-terminated strings for error names.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `Err` naming the failed call and the CUDA error unless `e` is success.
#[allow(unsafe_code)]
pub fn check(sys: &Sys, e: CUresult, call: &str) -> Result<()> {
    if e == CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const c_char = std::ptr::null();
    let mut text: *const c_char = std::ptr::null();
    // SAFETY: both out-pointers are valid for one write; unknown codes leave them null.
    let _ = unsafe { (sys.cuGetErrorName)(e, &mut name) };
    // SAFETY: as above.
    let _ = unsafe { (sys.cuGetErrorString)(e, &mut text) };
    let name = if name.is_null() { format!("CUDA error {e}") } else { c_str(name) };
    Err(Error::new(code_of(e), format!("{call} failed: {name} ({})", c_str(text))))
}

#[allow(unsafe_code)]
pub fn init(sys: &Sys) -> Result<()> {
    // SAFETY: cuInit takes flags by value; 0 is the only defined value.
    check(sys, unsafe { (sys.cuInit)(0) }, "cuInit")
}

#[allow(unsafe_code)]
pub fn driver_version(sys: &Sys) -> Result<i32> {
    let mut v: c_int = 0;
    // SAFETY: `v` is valid for one write.
    check(sys, unsafe { (sys.cuDriverGetVersion)(&mut v) }, "cuDriverGetVersion")?;
    Ok(v)
}

#[allow(unsafe_code)]
pub fn device_count(sys: &Sys) -> Result<usize> {
    let mut n: c_int = 0;
    // SAFETY: `n` is valid for one write.
    check(sys, unsafe { (sys.cuDeviceGetCount)(&mut n) }, "cuDeviceGetCount")?;
    Ok(n.max(0) as usize)
}

#[allow(unsafe_code)]
pub fn device_get(sys: &Sys, ordinal: usize) -> Result<CUdevice> {
    let mut d: CUdevice = 0;
    // SAFETY: `d` is valid for one write; a bad ordinal is reported as an error code.
    check(sys, unsafe { (sys.cuDeviceGet)(&mut d, ordinal as c_int) }, "cuDeviceGet")?;
    Ok(d)
}

#[allow(unsafe_code)]
pub fn device_name(sys: &Sys, dev: CUdevice) -> Result<String> {
    let mut buf = [0 as c_char; 256];
    // SAFETY: the driver writes at most `len` bytes, NUL included, into `buf`.
    check(
        sys,
        unsafe { (sys.cuDeviceGetName)(buf.as_mut_ptr(), buf.len() as c_int, dev) },
        "cuDeviceGetName",
    )?;
    Ok(c_str(buf.as_ptr()))
}

#[allow(unsafe_code)]
pub fn device_total_mem(sys: &Sys, dev: CUdevice) -> Result<usize> {
    let mut b = 0usize;
    // SAFETY: `b` is valid for one write.
    check(sys, unsafe { (sys.cuDeviceTotalMem_v2)(&mut b, dev) }, "cuDeviceTotalMem")?;
    Ok(b)
}

#[allow(unsafe_code)]
pub fn device_attribute(sys: &Sys, dev: CUdevice, attr: c_int) -> Result<i32> {
    let mut v: c_int = 0;
    // SAFETY: `v` is valid for one write.
    check(sys, unsafe { (sys.cuDeviceGetAttribute)(&mut v, attr, dev) }, "cuDeviceGetAttribute")?;
    Ok(v)
}

#[allow(unsafe_code)]
pub fn primary_ctx_retain(sys: &Sys, dev: CUdevice) -> Result<CUcontext> {
    let mut c: CUcontext = std::ptr::null_mut();
    // SAFETY: `c` is valid for one write.
    check(sys, unsafe { (sys.cuDevicePrimaryCtxRetain)(&mut c, dev) }, "cuDevicePrimaryCtxRetain")?;
    Ok(c)
}

#[allow(unsafe_code)]
pub fn primary_ctx_release(sys: &Sys, dev: CUdevice) -> Result<()> {
    // SAFETY: called once per successful retain, by the owner of that retain.
    check(sys, unsafe { (sys.cuDevicePrimaryCtxRelease_v2)(dev) }, "cuDevicePrimaryCtxRelease")
}

#[allow(unsafe_code)]
pub fn ctx_set_current(sys: &Sys, ctx: CUcontext) -> Result<()> {
    // SAFETY: `ctx` is a retained primary context, alive while its owner is.
    check(sys, unsafe { (sys.cuCtxSetCurrent)(ctx) }, "cuCtxSetCurrent")
}

/// `(free, total)` bytes of the current context's device.
#[allow(unsafe_code)]
pub fn mem_get_info(sys: &Sys) -> Result<(usize, usize)> {
    let (mut f, mut t) = (0usize, 0usize);
    // SAFETY: both out-pointers are valid for one write.
    check(sys, unsafe { (sys.cuMemGetInfo_v2)(&mut f, &mut t) }, "cuMemGetInfo")?;
    Ok((f, t))
}

#[allow(unsafe_code)]
pub fn mem_alloc(sys: &Sys, bytes: usize) -> Result<CUdeviceptr> {
    let mut p: CUdeviceptr = 0;
    // SAFETY: `p` is valid for one write.
    check(sys, unsafe { (sys.cuMemAlloc_v2)(&mut p, bytes) }, "cuMemAlloc")?;
    Ok(p)
}

#[allow(unsafe_code)]
pub fn mem_free(sys: &Sys, p: CUdeviceptr) -> Result<()> {
    // SAFETY: `p` came from cuMemAlloc and its owner frees it once.
    check(sys, unsafe { (sys.cuMemFree_v2)(p) }, "cuMemFree")
}

#[allow(unsafe_code)]
pub fn mem_alloc_host(sys: &Sys, bytes: usize) -> Result<*mut c_void> {
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: `p` is valid for one write.
    check(sys, unsafe { (sys.cuMemAllocHost_v2)(&mut p, bytes) }, "cuMemAllocHost")?;
    Ok(p)
}

#[allow(unsafe_code)]
pub fn mem_free_host(sys: &Sys, p: *mut c_void) -> Result<()> {
    // SAFETY: `p` came from cuMemAllocHost and its owner frees it once.
    check(sys, unsafe { (sys.cuMemFreeHost)(p) }, "cuMemFreeHost")
}

#[allow(unsafe_code)]
pub fn stream_create(sys: &Sys) -> Result<CUstream> {
    let mut s: CUstream = std::ptr::null_mut();
    // SAFETY: `s` is valid for one write.
    check(sys, unsafe { (sys.cuStreamCreate)(&mut s, CU_STREAM_NON_BLOCKING) }, "cuStreamCreate")?;
    Ok(s)
}

#[allow(unsafe_code)]
pub fn stream_synchronize(sys: &Sys, s: CUstream) -> Result<()> {
    // SAFETY: `s` is a live stream owned by the caller.
    check(sys, unsafe { (sys.cuStreamSynchronize)(s) }, "cuStreamSynchronize")
}

#[allow(unsafe_code)]
pub fn stream_destroy(sys: &Sys, s: CUstream) -> Result<()> {
    // SAFETY: `s` is live and its owner destroys it once.
    check(sys, unsafe { (sys.cuStreamDestroy_v2)(s) }, "cuStreamDestroy")
}

#[allow(unsafe_code)]
pub fn event_create(sys: &Sys) -> Result<CUevent> {
    let mut e: CUevent = std::ptr::null_mut();
    // SAFETY: `e` is valid for one write.
    check(sys, unsafe { (sys.cuEventCreate)(&mut e, CU_EVENT_DEFAULT) }, "cuEventCreate")?;
    Ok(e)
}

#[allow(unsafe_code)]
pub fn event_record(sys: &Sys, e: CUevent, s: CUstream) -> Result<()> {
    // SAFETY: `e` and `s` are live handles of the same context.
    check(sys, unsafe { (sys.cuEventRecord)(e, s) }, "cuEventRecord")
}

#[allow(unsafe_code)]
pub fn event_synchronize(sys: &Sys, e: CUevent) -> Result<()> {
    // SAFETY: `e` is a live event.
    check(sys, unsafe { (sys.cuEventSynchronize)(e) }, "cuEventSynchronize")
}

#[allow(unsafe_code)]
pub fn event_elapsed_ms(sys: &Sys, start: CUevent, end: CUevent) -> Result<f32> {
    let mut ms = 0f32;
    // SAFETY: `ms` is valid for one write; both events are live.
    check(sys, unsafe { (sys.cuEventElapsedTime)(&mut ms, start, end) }, "cuEventElapsedTime")?;
    Ok(ms)
}

#[allow(unsafe_code)]
pub fn event_destroy(sys: &Sys, e: CUevent) -> Result<()> {
    // SAFETY: `e` is live and its owner destroys it once.
    check(sys, unsafe { (sys.cuEventDestroy_v2)(e) }, "cuEventDestroy")
}

/// Loads a module from NUL-terminated PTX text (the driver JIT-compiles it for this GPU).
#[allow(unsafe_code)]
pub fn module_load_data(sys: &Sys, ptx: &CStr) -> Result<CUmodule> {
    let mut m: CUmodule = std::ptr::null_mut();
    // SAFETY: `ptx` is NUL-terminated, which is how the driver finds the end of PTX text.
    check(sys, unsafe { (sys.cuModuleLoadData)(&mut m, ptx.as_ptr().cast()) }, "cuModuleLoadData")?;
    Ok(m)
}

#[allow(unsafe_code)]
pub fn module_unload(sys: &Sys, m: CUmodule) -> Result<()> {
    // SAFETY: `m` is live and its owner unloads it once, after its functions' last use.
    check(sys, unsafe { (sys.cuModuleUnload)(m) }, "cuModuleUnload")
}

#[allow(unsafe_code)]
pub fn module_get_function(sys: &Sys, m: CUmodule, name: &CStr) -> Result<CUfunction> {
    let mut f: CUfunction = std::ptr::null_mut();
    // SAFETY: `name` is NUL-terminated and `m` is a live module.
    check(sys, unsafe { (sys.cuModuleGetFunction)(&mut f, m, name.as_ptr()) }, "cuModuleGetFunction")
        .map_err(|e| e.context(format!("kernel {}", name.to_string_lossy())))?;
    Ok(f)
}
