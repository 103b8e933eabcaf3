//! Owning RAII types over the driver: each holds an `Arc` to its parent (a `Context` holds the
//! loaded `Driver`), so the library and the context outlive everything made from them, and each
//! releases its handle on drop.

use super::result as r;
use super::sys::{self, CUcontext, CUdevice, CUdeviceptr, CUevent, CUfunction, CUmodule, CUstream, Sys};
use rill_graph::{Error, Result};
use std::ffi::{c_void, CString};
use std::fmt;
use std::sync::Arc;

/// The loaded and initialised driver library. Owned by whoever loads it (a device factory, a
/// test): there is no process-wide handle.
pub struct Driver {
    sys: Sys,
    version: i32,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Driver(CUDA {}.{})", self.version / 1000, self.version % 1000 / 10)
    }
}

impl Driver {
    /// Loads `libcuda.so.1` and calls `cuInit`. A missing library or an unusable driver is
    /// `Unavailable`.
    pub fn load() -> Result<Arc<Driver>> {
        Driver::load_from(sys::LIBCUDA_NAMES)
    }

    /// Like `load`, trying the given library names or paths in order.
    pub fn load_from(names: &[&str]) -> Result<Arc<Driver>> {
        let sys = Sys::load(names)
            .map_err(|e| Error::unavailable(format!("CUDA driver library not loadable: {}", e.0)))?;
        r::init(&sys)
            .map_err(|e| Error::unavailable(format!("CUDA driver present but unusable: {}", e.msg)))?;
        let version = r::driver_version(&sys)?;
        Ok(Arc::new(Driver { sys, version }))
    }

    pub fn sys(&self) -> &Sys {
        &self.sys
    }

    /// The driver's CUDA version as `major * 1000 + minor * 10` (12040 is 12.4).
    pub fn version(&self) -> i32 {
        self.version
    }

    /// GPUs the driver shows this process (after `CUDA_VISIBLE_DEVICES`).
    pub fn device_count(&self) -> Result<usize> {
        r::device_count(&self.sys)
    }
}

/// One GPU's primary context, retained for as long as this value lives.
pub struct Context {
    driver: Arc<Driver>,
    dev: CUdevice,
    ordinal: usize,
    raw: CUcontext,
}

// SAFETY: a CUDA context handle may be used from any thread; every use binds it first (`bind`).
#[allow(unsafe_code)]
unsafe impl Send for Context {}
// SAFETY: driver calls on one context from several threads are thread-safe by the driver's contract.
#[allow(unsafe_code)]
unsafe impl Sync for Context {}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context(GPU ordinal {})", self.ordinal)
    }
}

impl Context {
    /// Retains the primary context of driver ordinal `ordinal`.
    pub fn new(driver: Arc<Driver>, ordinal: usize) -> Result<Arc<Context>> {
        let dev = r::device_get(driver.sys(), ordinal)?;
        let raw = r::primary_ctx_retain(driver.sys(), dev)?;
        let ctx = Arc::new(Context { driver, dev, ordinal, raw });
        ctx.bind()?;
        Ok(ctx)
    }

    /// Makes this context current on the calling thread. Kernels run on whichever executor
    /// thread is free, so every operation binds before it calls the driver.
    pub fn bind(&self) -> Result<()> {
        r::ctx_set_current(self.sys(), self.raw)
    }

    pub fn sys(&self) -> &Sys {
        self.driver.sys()
    }

    pub fn driver(&self) -> &Arc<Driver> {
        &self.driver
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> Result<String> {
        r::device_name(self.sys(), self.dev)
    }

    pub fn total_mem(&self) -> Result<usize> {
        r::device_total_mem(self.sys(), self.dev)
    }

    /// `(free, total)` bytes of this GPU.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        r::mem_get_info(self.sys())
    }

    pub fn attribute(&self, attr: i32) -> Result<i32> {
        r::device_attribute(self.sys(), self.dev, attr)
    }

    /// `(major, minor)` compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok((
            self.attribute(sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            self.attribute(sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // A failure here means the driver is already shutting down; nothing is left to free.
        let _ = r::primary_ctx_release(self.sys(), self.dev);
    }
}

/// Device memory from `cuMemAlloc`: one region the allocator carves tensors from.
pub struct DeviceBuffer {
    ctx: Arc<Context>,
    ptr: CUdeviceptr,
    len: usize,
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.len)
    }
}

impl DeviceBuffer {
    pub fn alloc(ctx: &Arc<Context>, len: usize) -> Result<DeviceBuffer> {
        ctx.bind()?;
        let ptr = r::mem_alloc(ctx.sys(), len.max(1))?;
        Ok(DeviceBuffer { ctx: ctx.clone(), ptr, len })
    }

    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // Freeing waits for pending work on the memory; an error means the context is gone.
        if self.ctx.bind().is_ok() {
            let _ = r::mem_free(self.ctx.sys(), self.ptr);
        }
    }
}

/// Page-locked host memory: the staging area for copies, which the GPU reads and writes by DMA.
pub struct PinnedBuffer {
    ctx: Arc<Context>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain host memory owned by this value; `&mut` access is exclusive.
#[allow(unsafe_code)]
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only reads.
#[allow(unsafe_code)]
unsafe impl Sync for PinnedBuffer {}

impl fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinnedBuffer({} bytes)", self.len)
    }
}

impl PinnedBuffer {
    pub fn alloc(ctx: &Arc<Context>, len: usize) -> Result<PinnedBuffer> {
        ctx.bind()?;
        let ptr = r::mem_alloc_host(ctx.sys(), len.max(1))?.cast::<u8>();
        let mut b = PinnedBuffer { ctx: ctx.clone(), ptr, len };
        // Page-locked memory comes uninitialised; zeroing it once makes every byte readable.
        b.as_mut_slice_uninit_zero();
        Ok(b)
    }

    #[allow(unsafe_code)]
    fn as_mut_slice_uninit_zero(&mut self) {
        // SAFETY: `ptr` points to `len` writable bytes owned by this value.
        unsafe { std::ptr::write_bytes(self.ptr, 0, self.len) };
    }

    pub fn len(&self) -> usize {
        self.len
    }

    #[allow(unsafe_code)]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by this value; no copy is in flight once a
        // `Stream` copy method has returned (they synchronise before returning).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    #[allow(unsafe_code)]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            let _ = r::mem_free_host(self.ctx.sys(), self.ptr.cast::<c_void>());
        }
    }
}

/// A stream: kernels and copies on it run in the order they were enqueued.
pub struct Stream {
    ctx: Arc<Context>,
    raw: CUstream,
}

// SAFETY: stream handles may be used from any thread; the driver orders work per stream.
#[allow(unsafe_code)]
unsafe impl Send for Stream {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Stream {}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stream(GPU ordinal {})", self.ctx.ordinal)
    }
}

/// One kernel argument, by value. `Bcast` is the 25-word broadcast descriptor of binary.cu.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Ptr(CUdeviceptr),
    U64(u64),
    I32(i32),
    F32(f32),
    Words25([u64; 25]),
}

/// The kind of a kernel parameter as PTX declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// `.u64`: a device pointer or a 64-bit count.
    U64,
    /// `.u32`: an `int`.
    U32,
    F32,
    /// `.align 8 .b8 [200]`: a by-value struct of 25 words.
    Words25,
}

impl KernelArg {
    fn param(&self) -> Param {
        match self {
            KernelArg::Ptr(_) | KernelArg::U64(_) => Param::U64,
            KernelArg::I32(_) => Param::U32,
            KernelArg::F32(_) => Param::F32,
            KernelArg::Words25(_) => Param::Words25,
        }
    }
}

/// Grid and block sizes of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Stream {
    pub fn new(ctx: &Arc<Context>) -> Result<Stream> {
        ctx.bind()?;
        let raw = r::stream_create(ctx.sys())?;
        Ok(Stream { ctx: ctx.clone(), raw })
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The raw handle, for libraries that enqueue on this stream (cuBLAS).
    pub(crate) fn raw(&self) -> CUstream {
        self.raw
    }

    /// Waits for all work enqueued so far; a kernel fault surfaces here as an error.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.bind()?;
        r::stream_synchronize(self.ctx.sys(), self.raw)
    }

    /// Copies `src[..len]` to device address `dst` and waits, so `src` is free again on return.
    #[allow(unsafe_code)]
    pub fn upload(&self, dst: CUdeviceptr, src: &PinnedBuffer, len: usize) -> Result<()> {
        check_len(len, src.len)?;
        self.ctx.bind()?;
        let sys = self.ctx.sys();
        // SAFETY: `src` holds at least `len` bytes and is borrowed until the synchronise below.
        let e = unsafe { (sys.cuMemcpyHtoDAsync_v2)(dst, src.ptr.cast(), len, self.raw) };
        r::check(sys, e, "cuMemcpyHtoDAsync")?;
        self.synchronize()
    }

    /// Copies `len` bytes from device address `src` into `dst` and waits for the copy.
    #[allow(unsafe_code)]
    pub fn download(&self, dst: &mut PinnedBuffer, src: CUdeviceptr, len: usize) -> Result<()> {
        check_len(len, dst.len)?;
        self.ctx.bind()?;
        let sys = self.ctx.sys();
        // SAFETY: `dst` holds at least `len` bytes and is borrowed mutably until the synchronise.
        let e = unsafe { (sys.cuMemcpyDtoHAsync_v2)(dst.ptr.cast(), src, len, self.raw) };
        r::check(sys, e, "cuMemcpyDtoHAsync")?;
        self.synchronize()
    }

    /// Enqueues a device-to-device copy; it runs in stream order, no host memory is involved.
    #[allow(unsafe_code)]
    pub fn copy_dtod(&self, dst: CUdeviceptr, src: CUdeviceptr, len: usize) -> Result<()> {
        self.ctx.bind()?;
        let sys = self.ctx.sys();
        // SAFETY: only device memory is touched; a bad address is reported by the driver.
        let e = unsafe { (sys.cuMemcpyDtoDAsync_v2)(dst, src, len, self.raw) };
        r::check(sys, e, "cuMemcpyDtoDAsync")
    }

    /// Enqueues zero-filling `len` bytes at `dst`.
    #[allow(unsafe_code)]
    pub fn memset_zero(&self, dst: CUdeviceptr, len: usize) -> Result<()> {
        self.ctx.bind()?;
        let sys = self.ctx.sys();
        // SAFETY: only device memory is touched; a bad address is reported by the driver.
        let e = unsafe { (sys.cuMemsetD8Async)(dst, 0, len, self.raw) };
        r::check(sys, e, "cuMemsetD8Async")
    }

    /// Enqueues `f` with `args`, which must match the kernel's declared parameters in kind and
    /// count (checked here); pointer arguments are device addresses.
    #[allow(unsafe_code)]
    pub fn launch(&self, f: &Function, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        let kinds: Vec<Param> = args.iter().map(KernelArg::param).collect();
        if kinds != f.params {
            return Err(Error::internal(format!(
                "kernel {} takes {:?}, launched with {:?}",
                f.name, f.params, kinds
            )));
        }
        let mut values: Vec<KernelArg> = args.to_vec();
        let mut ptrs: Vec<*mut c_void> = values
            .iter_mut()
            .map(|a| match a {
                KernelArg::Ptr(p) | KernelArg::U64(p) => (p as *mut u64).cast(),
                KernelArg::I32(v) => (v as *mut i32).cast(),
                KernelArg::F32(v) => (v as *mut f32).cast(),
                KernelArg::Words25(w) => w.as_mut_ptr().cast(),
            })
            .collect();
        self.ctx.bind()?;
        let sys = self.ctx.sys();
        let (g, b) = (cfg.grid, cfg.block);
        // SAFETY: `ptrs` holds one pointer per kernel parameter (kinds checked above), each
        // pointing into `values`, which outlives the call; the driver copies them at launch.
        let e = unsafe {
            (sys.cuLaunchKernel)(
                f.raw,
                g.0,
                g.1,
                g.2,
                b.0,
                b.1,
                b.2,
                cfg.shared_bytes,
                self.raw,
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        r::check(sys, e, "cuLaunchKernel").map_err(|e| e.context(format!("kernel {}", f.name)))
    }
}

fn check_len(len: usize, cap: usize) -> Result<()> {
    if len > cap {
        return Err(Error::internal(format!("copy of {len} bytes through a {cap}-byte staging buffer")));
    }
    Ok(())
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            let _ = r::stream_synchronize(self.ctx.sys(), self.raw);
            let _ = r::stream_destroy(self.ctx.sys(), self.raw);
        }
    }
}

/// A timing event.
pub struct Event {
    ctx: Arc<Context>,
    raw: CUevent,
}

// SAFETY: event handles may be used from any thread.
#[allow(unsafe_code)]
unsafe impl Send for Event {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Event {}

impl Event {
    pub fn new(ctx: &Arc<Context>) -> Result<Event> {
        ctx.bind()?;
        Ok(Event { ctx: ctx.clone(), raw: r::event_create(ctx.sys())? })
    }

    pub fn record(&self, stream: &Stream) -> Result<()> {
        self.ctx.bind()?;
        r::event_record(self.ctx.sys(), self.raw, stream.raw)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.ctx.bind()?;
        r::event_synchronize(self.ctx.sys(), self.raw)
    }

    /// Milliseconds between `start` and this event (both recorded and complete).
    pub fn elapsed_ms_since(&self, start: &Event) -> Result<f32> {
        self.ctx.bind()?;
        r::event_elapsed_ms(self.ctx.sys(), start.raw, self.raw)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            let _ = r::event_destroy(self.ctx.sys(), self.raw);
        }
    }
}

/// A loaded PTX module.
pub struct Module {
    ctx: Arc<Context>,
    raw: CUmodule,
}

// SAFETY: module handles may be used from any thread.
#[allow(unsafe_code)]
unsafe impl Send for Module {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Module {}

impl Module {
    /// JIT-loads PTX text.
    pub fn load_ptx(ctx: &Arc<Context>, ptx: &str) -> Result<Arc<Module>> {
        let text = CString::new(ptx).map_err(|_| Error::internal("PTX text contains a NUL byte"))?;
        ctx.bind()?;
        let raw = r::module_load_data(ctx.sys(), &text)?;
        Ok(Arc::new(Module { ctx: ctx.clone(), raw }))
    }

    /// The kernel `name`, declared to take `params`.
    pub fn function(self: &Arc<Module>, name: &str, params: &'static [Param]) -> Result<Function> {
        let c = CString::new(name).map_err(|_| Error::internal("kernel name contains a NUL byte"))?;
        self.ctx.bind()?;
        let raw = r::module_get_function(self.ctx.sys(), self.raw, &c)?;
        Ok(Function { _module: self.clone(), raw, name: name.to_string(), params })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            let _ = r::module_unload(self.ctx.sys(), self.raw);
        }
    }
}

/// A kernel of a loaded module; keeps the module loaded.
pub struct Function {
    _module: Arc<Module>,
    raw: CUfunction,
    name: String,
    params: &'static [Param],
}

// SAFETY: function handles may be launched from any thread.
#[allow(unsafe_code)]
unsafe impl Send for Function {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Function {}

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Function({})", self.name)
    }
}
