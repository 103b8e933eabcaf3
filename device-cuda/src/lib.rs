//! rill's GPU device: the CUDA driver API loaded at run time (libloading), an allocator, streams,
//! PTX kernels and MatMul through cuBLAS (also loaded at run time; the own tiled kernel where it is
//! missing). Without a driver or a GPU the factory reports `Unavailable` and the runtime has no
//! GPU device. `README.md` describes the cuBLAS search and `cargo xtask gpu-check`, including its
//! `--build-only DIR` bundle for GPU machines without cargo.

#![deny(unsafe_code)]

pub mod alloc;
pub mod driver;
pub mod kernels;
pub mod ptx;
pub mod selfcheck;

pub use kernels::KERNELS;
pub use rill_graph::GpuOptions;

use alloc::{BestFit, Plan, Stats};
use driver::{
    Context, Cublas, CublasLib, DeviceBuffer, Driver, Function, KernelArg, LaunchConfig, Module,
    PinnedBuffer, Stream,
};
use ptx::PtxModule;
use rill_graph::{
    Code, DType, Device, DeviceAttributes, DeviceFactory, DeviceMemory, DeviceName, Error, IntraOpPool,
    ResourceMgr, Result, SessionOptions, Shape, Task, Tensor,
};
use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};

/// Bytes of the pinned staging buffer each device copies through; larger tensors go in chunks.
pub const STAGING_BYTES: usize = 16 << 20;
/// Bytes of the cuBLAS workspace each device gives its handle from its own reservation (what
/// cuBLAS asks for on Hopper); without it cuBLAS would allocate beside the reservation, which by
/// default leaves only a tenth of the GPU free.
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Threads that run this device's kernels. Kernels only enqueue work on the stream, so two keep
/// the GPU fed while one waits in a copy.
pub const LAUNCH_THREADS: usize = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything can panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Driver ordinals for `GPU:0..`, from `visible_device_list` (TensorFlow's remapping on top of
/// `CUDA_VISIBLE_DEVICES`): `"1,0"` makes driver GPU 1 `GPU:0`; empty means all in order.
pub fn visible_ordinals(list: &str, count: usize) -> Result<Vec<usize>> {
    if list.trim().is_empty() {
        return Ok((0..count).collect());
    }
    let mut out = Vec::new();
    for part in list.split(',') {
        let id: usize = part.trim().parse().map_err(|_| {
            Error::invalid_argument(format!("visible_device_list '{list}': '{part}' is not a GPU id"))
        })?;
        if id >= count {
            return Err(Error::invalid_argument(format!(
                "visible_device_list '{list}' names GPU {id}, but only {count} GPUs are visible"
            )));
        }
        if out.contains(&id) {
            return Err(Error::invalid_argument(format!("visible_device_list '{list}' repeats GPU {id}")));
        }
        out.push(id);
    }
    Ok(out)
}

/// One GPU's memory: regions reserved from the driver and the best-fit allocator over them.
pub struct MemPool {
    ctx: Arc<Context>,
    device: String,
    plan: Plan,
    state: Mutex<(BestFit, Vec<DeviceBuffer>)>,
}

impl fmt::Debug for MemPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemPool({}, {:?})", self.device, self.plan)
    }
}

impl MemPool {
    fn new(ctx: Arc<Context>, device: String, plan: Plan) -> Result<MemPool> {
        let pool = MemPool { ctx, device, plan, state: Mutex::new((BestFit::new(), Vec::new())) };
        if plan.initial_bytes > 0 {
            let mut st = lock(&pool.state);
            pool.reserve(&mut st, plan.initial_bytes)?;
        }
        Ok(pool)
    }

    fn reserve(&self, st: &mut (BestFit, Vec<DeviceBuffer>), bytes: u64) -> Result<()> {
        let buf = DeviceBuffer::alloc(&self.ctx, bytes as usize).map_err(|e| {
            Error::new(
                if e.code == Code::ResourceExhausted { Code::ResourceExhausted } else { e.code },
                format!("reserving {bytes} bytes on {}: {}", self.device, e.msg),
            )
        })?;
        st.0.add_region(buf.ptr(), bytes);
        st.1.push(buf);
        Ok(())
    }

    /// A block of at least `bytes`, growing the reservation when the plan allows.
    pub fn alloc(&self, bytes: u64) -> Result<u64> {
        let mut st = lock(&self.state);
        if let Some(a) = st.0.alloc(bytes) {
            return Ok(a);
        }
        let stats = st.0.stats();
        if let Some(chunk) = self.plan.next_chunk(stats.reserved_bytes, bytes) {
            // A failed chunk (another process took the memory) is reported as OOM below.
            if self.reserve(&mut st, chunk).is_ok() {
                if let Some(a) = st.0.alloc(bytes) {
                    return Ok(a);
                }
            }
        }
        Err(alloc::oom_error(&self.device, bytes, &self.plan, &st.0.stats()))
    }

    fn free(&self, addr: u64) {
        lock(&self.state).0.free(addr);
    }

    pub fn stats(&self) -> Stats {
        lock(&self.state).0.stats()
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }
}

/// A tensor's bytes in GPU memory; the block returns to the allocator when the last tensor
/// sharing it is dropped. Work already enqueued on the stream still sees valid memory, because
/// any later user of the block is enqueued after it.
pub struct GpuMemory {
    pool: Arc<MemPool>,
    addr: u64,
    len: usize,
}

impl fmt::Debug for GpuMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuMemory({} bytes at {:#x} on {})", self.len, self.addr, self.pool.device)
    }
}

impl DeviceMemory for GpuMemory {
    fn device(&self) -> &str {
        &self.pool.device
    }
    fn len_bytes(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        self.pool.free(self.addr);
    }
}

/// Threads that run a device's scheduled tasks, owned by the device.
struct TaskPool {
    tx: Mutex<mpsc::Sender<Task>>,
}

impl TaskPool {
    fn new(name: &str, n: usize) -> TaskPool {
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let rx = rx.clone();
            // Threads end when the device (the only sender) is dropped. A failed spawn leaves
            // fewer threads; tasks still run as long as one exists.
            let _ = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || loop {
                let task = lock(&rx).recv();
                match task {
                    Ok(t) => t(),
                    Err(_) => return,
                }
            });
        }
        TaskPool { tx: Mutex::new(tx) }
    }

    fn spawn(&self, t: Task) {
        // A send fails only when every thread has exited, which happens after the device is gone.
        let _ = lock(&self.tx).send(t);
    }
}

/// The cuBLAS library a device makes its handle from, or why there is none (then MatMul runs
/// the own tiled kernel).
pub type BlasLibrary = std::result::Result<Arc<CublasLib>, Error>;

/// A GPU: its context, one stream all kernels and copies are ordered on, its memory, the PTX
/// modules loaded on first use, and a cuBLAS handle on the stream where cuBLAS was found.
pub struct CudaDevice {
    attrs: DeviceAttributes,
    resources: ResourceMgr,
    ctx: Arc<Context>,
    // Declared before `stream` and the workspace: fields drop in order, and the handle must go
    // before its stream and its workspace memory.
    blas: Option<Cublas>,
    _blas_workspace: Option<GpuMemory>,
    /// Which MatMul runs and why: "cuBLAS 12.4.5 (libcublas.so.12)" or the fallback's reason.
    matmul_backend: String,
    stream: Stream,
    mem: Arc<MemPool>,
    staging: Mutex<PinnedBuffer>,
    modules: Mutex<HashMap<PtxModule, Arc<Module>>>,
    functions: Mutex<HashMap<String, Arc<Function>>>,
    tasks: TaskPool,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaDevice({})", self.attrs.name)
    }
}

impl CudaDevice {
    /// The device for driver ordinal `ordinal`, named `name`, reserving memory as `opts` say,
    /// with a cuBLAS handle from `blas` when it holds a library.
    pub fn new(
        driver: &Arc<Driver>,
        ordinal: usize,
        name: DeviceName,
        opts: &GpuOptions,
        blas: &BlasLibrary,
    ) -> Result<CudaDevice> {
        let ctx = Context::new(driver.clone(), ordinal)?;
        let full = name.to_string();
        let (free, total) = ctx.mem_info()?;
        let plan = Plan::new(opts, total as u64, free as u64)?;
        let (major, minor) = ctx.compute_capability()?;
        let stream = Stream::new(&ctx)?;
        let staging = PinnedBuffer::alloc(&ctx, STAGING_BYTES)?;
        let mem = Arc::new(MemPool::new(ctx.clone(), full.clone(), plan)?);
        let (blas, workspace, matmul_backend) =
            match blas.as_ref().map(|lib| Cublas::new(lib.clone(), &stream)) {
                Ok(Ok(h)) => {
                    let ws = mem.alloc(CUBLAS_WORKSPACE_BYTES as u64).map(|addr| GpuMemory {
                        pool: mem.clone(),
                        addr,
                        len: CUBLAS_WORKSPACE_BYTES,
                    });
                    // Without our workspace (no memory left, or a cuBLAS before 11.4) cuBLAS still
                    // works, with memory of its own; the description says which.
                    let ws = match ws {
                        Ok(w) if matches!(h.set_workspace(w.addr, w.len), Ok(true)) => Some(w),
                        _ => None,
                    };
                    let what = format!(
                        "cuBLAS {} ({}), workspace {}",
                        h.version_text(),
                        h.origin(),
                        if ws.is_some() { "from the device's reservation" } else { "cuBLAS's own" }
                    );
                    (Some(h), ws, what)
                }
                Ok(Err(e)) => (None, None, format!("own tiled kernel ({})", e.msg)),
                Err(e) => (None, None, format!("own tiled kernel ({})", e.msg)),
            };
        let description = format!(
            "device: {ordinal}, name: {}, compute capability: {major}.{minor}, memory: {total} bytes, \
             matmul: {matmul_backend}",
            ctx.name()?
        );
        let dev = CudaDevice {
            attrs: DeviceAttributes {
                name,
                device_type: "GPU".into(),
                memory_limit_bytes: plan.limit_bytes,
                incarnation: rill_graph::random_u64(),
                description,
            },
            resources: ResourceMgr::new(),
            blas,
            _blas_workspace: workspace,
            matmul_backend,
            stream,
            mem,
            staging: Mutex::new(staging),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            tasks: TaskPool::new(&format!("rill-gpu{ordinal}"), LAUNCH_THREADS),
            ctx,
        };
        // Every module now rather than at a kernel's first launch: the driver's JIT takes up to
        // seconds on a cold cache, and inside a step that delay lands on whatever waits for the
        // step (a synchronous-training round with a deadline, a remote peer).
        for m in PtxModule::ALL {
            dev.module(m)?;
        }
        Ok(dev)
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    pub fn memory(&self) -> &Arc<MemPool> {
        &self.mem
    }

    /// This device's cuBLAS handle, when cuBLAS was found.
    pub fn cublas(&self) -> Option<&Cublas> {
        self.blas.as_ref()
    }

    /// Which MatMul implementation this device runs, and why (also in its description).
    pub fn matmul_backend(&self) -> &str {
        &self.matmul_backend
    }

    /// Waits for everything enqueued on this device.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()
    }

    /// An uninitialised tensor in this GPU's memory.
    pub fn alloc(&self, dtype: DType, shape: Shape) -> Result<Tensor> {
        let bytes =
            shape.checked_num_elements()?.checked_mul(dtype.size().unwrap_or(0)).ok_or_else(|| {
                Error::invalid_argument(format!("a {dtype} tensor of shape {shape} does not fit in memory"))
            })?;
        if dtype.size().is_none() {
            return Err(Error::invalid_argument(format!("{dtype} tensors cannot live on a GPU")));
        }
        let addr = self.mem.alloc(bytes as u64)?;
        let m = GpuMemory { pool: self.mem.clone(), addr, len: bytes };
        Ok(Tensor::from_device_memory(dtype, shape, Arc::new(m)))
    }

    /// The device address of a tensor in this GPU's memory.
    pub fn ptr(&self, t: &Tensor) -> Result<u64> {
        let m =
            t.device_memory().ok_or_else(|| Error::internal("tensor is in host memory, not on the GPU"))?;
        match m.as_any().downcast_ref::<GpuMemory>() {
            Some(g) if Arc::ptr_eq(&g.pool, &self.mem) => Ok(g.addr),
            _ => Err(Error::internal(format!("tensor lives on {}, not {}", m.device(), self.attrs.name))),
        }
    }

    /// `t` in this GPU's memory: itself when it already is, else a copy.
    pub fn on_device(&self, t: &Tensor) -> Result<Tensor> {
        if t.is_host() {
            self.upload(t)
        } else {
            self.ptr(t)?;
            Ok(t.clone())
        }
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        let bytes = t.as_bytes()?;
        let out = self.alloc(t.dtype(), *t.shape())?;
        let dst = self.ptr(&out)?;
        let mut staging = lock(&self.staging);
        for (i, chunk) in bytes.chunks(STAGING_BYTES).enumerate() {
            staging.as_mut_slice()[..chunk.len()].copy_from_slice(chunk);
            self.stream.upload(dst + (i * STAGING_BYTES) as u64, &staging, chunk.len())?;
        }
        Ok(out)
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        let src = self.ptr(t)?;
        let mut host = Tensor::try_zeros(t.dtype(), *t.shape())?;
        let bytes = host.as_bytes_mut()?;
        let mut staging = lock(&self.staging);
        for (i, chunk) in bytes.chunks_mut(STAGING_BYTES).enumerate() {
            self.stream.download(&mut staging, src + (i * STAGING_BYTES) as u64, chunk.len())?;
            chunk.copy_from_slice(&staging.as_slice()[..chunk.len()]);
        }
        Ok(host)
    }

    /// PTX module `module`, loaded (JIT-compiled by the driver for this GPU) on first use.
    fn module(&self, module: PtxModule) -> Result<Arc<Module>> {
        let mut mods = lock(&self.modules);
        if let Some(m) = mods.get(&module) {
            return Ok(m.clone());
        }
        let m = Module::load_ptx(&self.ctx, module.ptx())
            .map_err(|e| e.context(format!("loading PTX module {}", module.name())))?;
        mods.insert(module, m.clone());
        Ok(m)
    }

    /// The kernel `name` (e.g. `binary_f16`), loading its PTX module on first use.
    pub fn function(&self, name: &str) -> Result<Arc<Function>> {
        if let Some(f) = lock(&self.functions).get(name) {
            return Ok(f.clone());
        }
        let (module, params) =
            ptx::kernel_spec(name).ok_or_else(|| Error::internal(format!("no GPU kernel named {name}")))?;
        let f = Arc::new(self.module(module)?.function(name, params)?);
        lock(&self.functions).insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Enqueues kernel `name` on this device's stream.
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        let f = self.function(name)?;
        self.stream.launch(&f, cfg, args)
    }
}

impl Device for CudaDevice {
    fn attributes(&self) -> &DeviceAttributes {
        &self.attrs
    }
    fn resource_mgr(&self) -> &ResourceMgr {
        &self.resources
    }
    fn schedule(&self, task: Task) {
        self.tasks.spawn(task)
    }
    fn intra_op(&self) -> &dyn IntraOpPool {
        &rill_graph::device::InlinePool
    }
    fn to_host(&self, t: &Tensor) -> Result<Tensor> {
        if t.is_host() {
            Ok(t.clone())
        } else {
            self.download(t)
        }
    }
    fn from_host(&self, t: Tensor) -> Result<Tensor> {
        if t.dtype().size().is_none() || t.dtype() == DType::I32 {
            // Strings and resource handles stay on the host, and so do int32 tensors, as in
            // TensorFlow: they are shapes and axes, which kernels read on the host; a kernel that
            // computes with one copies it over itself (`on_device`). Uploading them on arrival
            // would cost two synchronising copies per shape argument.
            return Ok(t);
        }
        self.on_device(&t)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Creates one `CudaDevice` per visible GPU. Owns the loaded driver it creates devices from, and
/// the result of the cuBLAS search, done once on first use (sessions create devices often).
#[derive(Debug)]
pub struct CudaDeviceFactory {
    library_names: Vec<String>,
    blas: OnceLock<BlasLibrary>,
}

impl Default for CudaDeviceFactory {
    fn default() -> Self {
        CudaDeviceFactory {
            library_names: driver::sys::LIBCUDA_NAMES.iter().map(|s| s.to_string()).collect(),
            blas: OnceLock::new(),
        }
    }
}

impl CudaDeviceFactory {
    pub fn new() -> CudaDeviceFactory {
        CudaDeviceFactory::default()
    }

    /// A factory that loads the driver from the given names or paths instead of `libcuda.so.1`.
    pub fn with_library_names(names: &[&str]) -> CudaDeviceFactory {
        CudaDeviceFactory {
            library_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The cuBLAS library devices of this factory use (searched on the first call).
    pub fn blas_library(&self) -> &BlasLibrary {
        self.blas.get_or_init(CublasLib::load)
    }

    /// Loads the driver and checks that it shows at least one GPU.
    pub fn load_driver(&self) -> Result<Arc<Driver>> {
        let names: Vec<&str> = self.library_names.iter().map(String::as_str).collect();
        let driver = Driver::load_from(&names)?;
        if driver.device_count()? == 0 {
            return Err(Error::unavailable(format!(
                "the CUDA driver shows no GPU (CUDA_VISIBLE_DEVICES={:?})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
            )));
        }
        Ok(driver)
    }
}

impl DeviceFactory for CudaDeviceFactory {
    fn device_type(&self) -> &'static str {
        "GPU"
    }

    fn create_devices(&self, opts: &SessionOptions, task: &DeviceName) -> Result<Vec<Arc<dyn Device>>> {
        let max = opts.device_count.get("GPU").copied().unwrap_or(usize::MAX);
        if max == 0 {
            return Ok(Vec::new());
        }
        let driver = self.load_driver()?;
        let mut ordinals = visible_ordinals(&opts.gpu_options.visible_device_list, driver.device_count()?)?;
        ordinals.truncate(max);
        ordinals
            .iter()
            .enumerate()
            .map(|(i, &ord)| {
                let mut name = task.clone();
                name.device_type = Some("GPU".into());
                name.id = Some(i as u32);
                let dev = CudaDevice::new(&driver, ord, name, &opts.gpu_options, self.blas_library())?;
                Ok(Arc::new(dev) as Arc<dyn Device>)
            })
            .collect()
    }
}
