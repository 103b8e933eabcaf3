//! cuBLAS loaded at run time with libloading, like the driver: the library is found by a search
//! (`RILL_CUBLAS`, the loader's path, CUDA's install directories, then the `nvidia-cublas` wheel
//! PyTorch installs into site-packages), owned by whoever loads it, and a `Cublas` handle is made
//! per device, bound to that device's stream. Without cuBLAS, MatMul uses the own tiled kernel.

use super::safe::{Context, Stream};
use rill_graph::{Code, DType, Error, Result};
use std::ffi::{c_int, c_void};
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Status = c_int;
type Handle = *mut c_void;

/// The environment variable naming the cuBLAS library to load (a path or a name), or `none` to
/// use the own MatMul kernel.
pub const CUBLAS_ENV: &str = "RILL_CUBLAS";
/// Library names the dynamic loader resolves itself. CUDA 12's cuBLAS comes before 13's: it runs
/// on every driver of recent years, while 13 needs a driver as new as itself.
pub const CUBLAS_NAMES: &[&str] = &["libcublas.so", "libcublas.so.12", "libcublas.so.13", "libcublas.so.11"];
/// Versioned file names looked for in directories, in the same order.
const CUBLAS_FILES: &[&str] = &["libcublas.so.12", "libcublas.so.13", "libcublas.so.11"];
/// Directories of a CUDA toolkit installation.
const CUDA_DIRS: &[&str] = &["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"];
/// Where a site-packages directory keeps cuBLAS: the `nvidia-cublas-cu12` wheel PyTorch depends on,
/// the CUDA 13 wheels' shared directory, and older PyTorch wheels that bundled it.
const SITE_SUBDIRS: &[&str] = &["nvidia/cublas/lib", "nvidia/cu13/lib", "torch/lib"];
/// How long asking `python3` for its site-packages may take before it is stopped.
const PYTHON_DEADLINE: Duration = Duration::from_secs(5);
/// `cublasComputeType_t` exists from cuBLAS 11 on.
const CUBLAS_MIN_VERSION: c_int = 11_000;

const CUBLAS_OP_N: c_int = 0;
const CUBLAS_OP_T: c_int = 1;
const CUDA_R_16F: c_int = 2;
const CUDA_R_16BF: c_int = 14;
const CUBLAS_COMPUTE_32F: c_int = 68;
/// `CUBLAS_GEMM_DEFAULT`: cuBLAS picks the algorithm; tensor cores for 16-bit inputs.
const CUBLAS_GEMM_DEFAULT: c_int = -1;

fn status_name(s: Status) -> &'static str {
    match s {
        0 => "CUBLAS_STATUS_SUCCESS",
        1 => "CUBLAS_STATUS_NOT_INITIALIZED",
        3 => "CUBLAS_STATUS_ALLOC_FAILED",
        7 => "CUBLAS_STATUS_INVALID_VALUE",
        8 => "CUBLAS_STATUS_ARCH_MISMATCH",
        11 => "CUBLAS_STATUS_MAPPING_ERROR",
        13 => "CUBLAS_STATUS_EXECUTION_FAILED",
        14 => "CUBLAS_STATUS_INTERNAL_ERROR",
        15 => "CUBLAS_STATUS_NOT_SUPPORTED",
        16 => "CUBLAS_STATUS_LICENSE_ERROR",
        _ => "unknown cuBLAS status",
    }
}

fn check(s: Status, call: &str) -> Result<()> {
    if s == 0 {
        return Ok(());
    }
    let code = match s {
        3 => Code::ResourceExhausted,
        7 => Code::InvalidArgument,
        _ => Code::Internal,
    };
    Err(Error::new(code, format!("{call} failed: {} ({s})", status_name(s))))
}

/// The cuBLAS entry points rill calls; field names are the C symbols.
#[allow(non_snake_case)]
pub struct CublasLib {
    cublasCreate_v2: unsafe extern "C" fn(h: *mut Handle) -> Status,
    cublasDestroy_v2: unsafe extern "C" fn(h: Handle) -> Status,
    cublasGetVersion_v2: unsafe extern "C" fn(h: Handle, v: *mut c_int) -> Status,
    cublasSetStream_v2: unsafe extern "C" fn(h: Handle, s: *mut c_void) -> Status,
    cublasSgemm_v2: unsafe extern "C" fn(
        h: Handle,
        ta: c_int,
        tb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: *const f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: *const f32,
        c: *mut f32,
        ldc: c_int,
    ) -> Status,
    cublasGemmEx: unsafe extern "C" fn(
        h: Handle,
        ta: c_int,
        tb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: *const c_void,
        a: *const c_void,
        a_type: c_int,
        lda: c_int,
        b: *const c_void,
        b_type: c_int,
        ldb: c_int,
        beta: *const c_void,
        c: *mut c_void,
        c_type: c_int,
        ldc: c_int,
        compute: c_int,
        algo: c_int,
    ) -> Status,
    /// cuBLAS 11.x before 11.4 lacks it; then cuBLAS allocates its own workspace.
    cublasSetWorkspace_v2: Option<unsafe extern "C" fn(h: Handle, w: *mut c_void, bytes: usize) -> Status>,
    /// Where the library came from, for descriptions and logs.
    origin: String,
    // Never unloaded: cuBLAS registers thread-exit and process-exit handlers, which must not
    // outlive its code. The loader's reference count makes reloading cheap.
    _lib: ManuallyDrop<libloading::Library>,
    _lt: Option<ManuallyDrop<libloading::Library>>,
}

impl std::fmt::Debug for CublasLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CublasLib({})", self.origin)
    }
}

/// What a search for cuBLAS looks at: the environment and a `python3` to ask (tests fake both).
pub struct SearchEnv<'a> {
    pub var: &'a dyn Fn(&str) -> Option<String>,
    /// Site-packages directories reported by the Python on `PATH` (called only when nothing
    /// else was found).
    pub python_sites: &'a dyn Fn() -> Vec<PathBuf>,
}

/// Expands `prefix/lib/python3*/{site,dist}-packages`.
fn python_lib_sites(prefix: &Path, out: &mut Vec<PathBuf>) {
    let lib = prefix.join("lib");
    let Ok(entries) = std::fs::read_dir(&lib) else { return };
    let mut pythons: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path())
        .collect();
    // Newest Python first (python3.12 before python3.10), so the most recent install wins.
    pythons.sort_by(|a, b| b.cmp(a));
    for p in pythons {
        for sub in ["site-packages", "dist-packages"] {
            out.push(p.join(sub));
        }
    }
}

/// Site-packages directories where a PyTorch install usually lives.
fn site_dirs(var: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for v in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = var(v).filter(|p| !p.is_empty()) {
            prefixes.push(PathBuf::from(p));
        }
    }
    if let Some(home) = var("HOME").filter(|h| !h.is_empty()) {
        prefixes.push(Path::new(&home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    let mut out = Vec::new();
    for p in &prefixes {
        python_lib_sites(p, &mut out);
    }
    // Debian's unversioned directory for system packages.
    out.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    out
}

/// Existing cuBLAS files under `dirs`, in `CUBLAS_FILES` order within each directory.
fn files_in(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in dirs {
        for f in CUBLAS_FILES {
            let p = d.join(f);
            if p.is_file() && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The candidates in search order, or `None` when `RILL_CUBLAS=none` turns cuBLAS off. A set
/// `RILL_CUBLAS` is the only candidate: asking for a library and silently getting another would
/// hide the mistake.
pub fn candidates(env: &SearchEnv<'_>) -> Option<Vec<String>> {
    match (env.var)(CUBLAS_ENV).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        Some(v) if ["none", "off", "0"].contains(&v.to_ascii_lowercase().as_str()) => return None,
        Some(v) => return Some(vec![v]),
        None => {}
    }
    let mut out: Vec<String> = CUBLAS_NAMES.iter().map(|s| s.to_string()).collect();
    let mut dirs: Vec<PathBuf> = CUDA_DIRS.iter().map(PathBuf::from).collect();
    if let Some(c) = (env.var)("CONDA_PREFIX").filter(|c| !c.is_empty()) {
        dirs.push(Path::new(&c).join("lib"));
    }
    for site in site_dirs(env.var) {
        dirs.extend(SITE_SUBDIRS.iter().map(|s| site.join(s)));
    }
    let mut found = files_in(&dirs);
    if found.is_empty() {
        let asked: Vec<PathBuf> = (env.python_sites)()
            .into_iter()
            .flat_map(|site| SITE_SUBDIRS.iter().map(move |s| site.join(s)))
            .collect();
        found = files_in(&asked);
    }
    out.extend(found.into_iter().map(|p| p.to_string_lossy().into_owned()));
    Some(out)
}

/// Site-packages directories of the `python3` on `PATH`, asked with a deadline; none when there
/// is no Python or it does not answer in time.
pub fn python_site_packages() -> Vec<PathBuf> {
    use std::process::{Command, Stdio};
    let script = "import site,sys\n\
                  d=list(getattr(site,'getsitepackages',lambda:[])())\n\
                  d.append(site.getusersitepackages())\n\
                  d.extend(p for p in sys.path if p.endswith('-packages'))\n\
                  print('\\n'.join(d))";
    let Ok(mut child) = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Vec::new();
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if start.elapsed() < PYTHON_DEADLINE => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                // The child is ours; a failed kill means it already exited.
                let _ = child.kill();
                let _ = child.wait();
                return Vec::new();
            }
        }
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        use std::io::Read;
        // The output is a few lines; the bound keeps a misbehaving interpreter from flooding us.
        let _ = out.by_ref().take(64 << 10).read_to_string(&mut text);
    }
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect()
}

#[allow(unsafe_code)]
fn open(path: &str, global: bool) -> std::result::Result<libloading::Library, libloading::Error> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LOCAL, RTLD_NOW};
    let flags = RTLD_NOW | if global { RTLD_GLOBAL } else { RTLD_LOCAL };
    // SAFETY: cuBLAS's and cuBLASLt's initialisers only set up their own state; they have no
    // preconditions on the loading thread.
    unsafe { Library::open(Some(path), flags) }.map(libloading::Library::from)
}

/// The cuBLASLt companion beside a cuBLAS file (`libcublasLt.so.12` for `libcublas.so.12`),
/// loaded first and globally so cuBLAS finds it even where the directory is not on the loader's
/// path (the pip wheels').
fn companion(path: &str) -> Option<libloading::Library> {
    let p = Path::new(path);
    let file = p.file_name()?.to_str()?;
    let lt = p.with_file_name(file.replacen("libcublas", "libcublasLt", 1));
    if p.parent().is_none_or(|d| d.as_os_str().is_empty()) || !lt.is_file() {
        return None;
    }
    open(&lt.to_string_lossy(), true).ok()
}

impl CublasLib {
    /// Searches for cuBLAS as `candidates` says, asking `python3` only when nothing else is
    /// found. `Unavailable` names every place tried, or says that `RILL_CUBLAS` turned it off.
    pub fn load() -> Result<Arc<CublasLib>> {
        let var = |k: &str| std::env::var(k).ok();
        let env = SearchEnv { var: &var, python_sites: &python_site_packages };
        match candidates(&env) {
            None => Err(Error::unavailable(format!("cuBLAS turned off by {CUBLAS_ENV}"))),
            Some(c) => CublasLib::load_from(&c),
        }
    }

    /// Loads the first of `names` (names or paths) that opens and has every symbol.
    pub fn load_from(names: &[String]) -> Result<Arc<CublasLib>> {
        let mut tried = Vec::new();
        for name in names {
            let lt = companion(name);
            let lib = match open(name, false) {
                Ok(lib) => lib,
                Err(e) => {
                    tried.push(format!("{name}: {e}"));
                    continue;
                }
            };
            match CublasLib::resolve(lib, lt, name) {
                Ok(l) => return Ok(Arc::new(l)),
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(Error::unavailable(format!("cuBLAS not loadable: {}", tried.join("; "))))
    }

    #[allow(unsafe_code)]
    fn resolve(
        lib: libloading::Library,
        lt: Option<libloading::Library>,
        origin: &str,
    ) -> std::result::Result<CublasLib, libloading::Error> {
        macro_rules! sym {
            ($name:ident) => {{
                // SAFETY: the field's type is the C prototype of this symbol in cublas_api.h.
                *unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes())? }
            }};
        }
        Ok(CublasLib {
            cublasCreate_v2: sym!(cublasCreate_v2),
            cublasDestroy_v2: sym!(cublasDestroy_v2),
            cublasGetVersion_v2: sym!(cublasGetVersion_v2),
            cublasSetStream_v2: sym!(cublasSetStream_v2),
            cublasSgemm_v2: sym!(cublasSgemm_v2),
            cublasGemmEx: sym!(cublasGemmEx),
            // SAFETY: as in `sym!`.
            cublasSetWorkspace_v2: unsafe { lib.get(b"cublasSetWorkspace_v2\0") }.ok().map(|f| *f),
            origin: origin.to_string(),
            _lib: ManuallyDrop::new(lib),
            _lt: lt.map(ManuallyDrop::new),
        })
    }

    /// The name or path the library was loaded from.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// A cuBLAS handle of one device, bound to the device's stream, so GEMMs run in stream order
/// with the device's own kernels. Calls are serialised: a handle is not for concurrent use.
pub struct Cublas {
    lib: Arc<CublasLib>,
    ctx: Arc<Context>,
    handle: Mutex<Handle>,
    version: i32,
}

// SAFETY: the handle is only used under the mutex, with its context bound first.
#[allow(unsafe_code)]
unsafe impl Send for Cublas {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Cublas {}

impl std::fmt::Debug for Cublas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cublas({} from {})", self.version_text(), self.lib.origin)
    }
}

/// Column-major GEMM arguments of a row-major `C[m,n] = op(A)·op(B)` (see `Cublas::gemm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmArgs {
    pub op_first: c_int,
    pub op_second: c_int,
    pub m: c_int,
    pub n: c_int,
    pub k: c_int,
    pub ld_first: c_int,
    pub ld_second: c_int,
    pub ldc: c_int,
}

/// The swap-operands trick: a row-major matrix is its transpose in column-major order, so
/// row-major `C = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLAS gets B first, A
/// second, with m and n exchanged. Each leading dimension is the stored row length.
pub fn gemm_args(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Result<GemmArgs> {
    let int = |v: usize| {
        c_int::try_from(v)
            .map_err(|_| Error::invalid_argument(format!("MatMul dimension {v} exceeds cuBLAS's int")))
    };
    Ok(GemmArgs {
        op_first: if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
        op_second: if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
        m: int(n)?,
        n: int(m)?,
        k: int(k)?,
        ld_first: int(if tb { k } else { n }.max(1))?,
        ld_second: int(if ta { m } else { k }.max(1))?,
        ldc: int(n.max(1))?,
    })
}

impl Cublas {
    /// Creates a handle in `stream`'s context and binds it to `stream`.
    #[allow(unsafe_code)]
    pub fn new(lib: Arc<CublasLib>, stream: &Stream) -> Result<Cublas> {
        let ctx = stream.context().clone();
        ctx.bind()?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: `h` is valid for one write; the context is current on this thread.
        check(unsafe { (lib.cublasCreate_v2)(&mut h) }, "cublasCreate")?;
        // Owned from here on, so an error below destroys the handle.
        let mut me = Cublas { lib, ctx, handle: Mutex::new(h), version: 0 };
        let mut v: c_int = 0;
        // SAFETY: `h` is a live handle, `v` valid for one write.
        check(unsafe { (me.lib.cublasGetVersion_v2)(h, &mut v) }, "cublasGetVersion")?;
        if v < CUBLAS_MIN_VERSION {
            return Err(Error::unavailable(format!(
                "cuBLAS {v} from {} is older than 11, which rill needs",
                me.lib.origin
            )));
        }
        // SAFETY: the stream is live and belongs to the handle's context; the device owning
        // both drops this handle before its stream (field order in `CudaDevice`).
        check(unsafe { (me.lib.cublasSetStream_v2)(h, stream.raw()) }, "cublasSetStream")?;
        me.version = v;
        Ok(me)
    }

    /// Makes `bytes` of device memory at `addr` this handle's workspace, so cuBLAS takes no
    /// memory of its own beside the device's reservation. `false` where cuBLAS cannot (before
    /// 11.4); the memory must outlive the handle.
    #[allow(unsafe_code)]
    pub fn set_workspace(&self, addr: u64, bytes: usize) -> Result<bool> {
        let Some(f) = self.lib.cublasSetWorkspace_v2 else { return Ok(false) };
        let h = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        self.ctx.bind()?;
        // SAFETY: `addr` is device memory of `bytes` bytes that the caller keeps until the handle
        // is destroyed. Set after `cublasSetStream`, which resets the workspace.
        check(unsafe { f(*h, addr as *mut c_void, bytes) }, "cublasSetWorkspace")?;
        Ok(true)
    }

    /// `major.minor.patch` of the loaded cuBLAS.
    pub fn version_text(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", v / 10_000, v / 100 % 100, v % 100)
    }

    pub fn origin(&self) -> &str {
        &self.lib.origin
    }

    /// Enqueues row-major `C[m,n] = op(A)·op(B)` for device addresses `a`, `b`, `c` of `dtype`
    /// (f32 through `cublasSgemm`, without TF32; f16 and bf16 through `cublasGemmEx` with f32
    /// accumulation and tensor cores). `k` must be at least 1 (the caller zero-fills for 0).
    #[allow(unsafe_code)]
    pub fn gemm(
        &self,
        dtype: DType,
        (m, n, k): (usize, usize, usize),
        (ta, tb): (bool, bool),
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<()> {
        if m == 0 || n == 0 || k == 0 {
            return Err(Error::internal(format!("cuBLAS GEMM called with empty shape {m}x{n}x{k}")));
        }
        let g = gemm_args(m, n, k, ta, tb)?;
        let (alpha, beta) = (1f32, 0f32);
        let h = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        self.ctx.bind()?;
        let l = &self.lib;
        let (pa, pb, pc) = (a as *const c_void, b as *const c_void, c as *mut c_void);
        let s = match dtype {
            // SAFETY: the addresses are device memory of at least the sizes the shapes imply
            // (checked by the caller's allocation); alpha and beta are host scalars, read
            // before the call returns (the default host pointer mode).
            DType::F32 => unsafe {
                (l.cublasSgemm_v2)(
                    *h,
                    g.op_first,
                    g.op_second,
                    g.m,
                    g.n,
                    g.k,
                    &alpha,
                    pb.cast(),
                    g.ld_first,
                    pa.cast(),
                    g.ld_second,
                    &beta,
                    pc.cast(),
                    g.ldc,
                )
            },
            DType::F16 | DType::BF16 => {
                let t = if dtype == DType::F16 { CUDA_R_16F } else { CUDA_R_16BF };
                // SAFETY: as above; the scale type of CUBLAS_COMPUTE_32F is float.
                unsafe {
                    (l.cublasGemmEx)(
                        *h,
                        g.op_first,
                        g.op_second,
                        g.m,
                        g.n,
                        g.k,
                        (&alpha as *const f32).cast(),
                        pb,
                        t,
                        g.ld_first,
                        pa,
                        t,
                        g.ld_second,
                        (&beta as *const f32).cast(),
                        pc,
                        t,
                        g.ldc,
                        CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT,
                    )
                }
            }
            d => return Err(Error::unimplemented(format!("no cuBLAS GEMM for {d}"))),
        };
        check(s, if dtype == DType::F32 { "cublasSgemm" } else { "cublasGemmEx" })
    }
}

impl Drop for Cublas {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        let h = *self.handle.get_mut().unwrap_or_else(|e| e.into_inner());
        if self.ctx.bind().is_ok() {
            // SAFETY: `h` is live and destroyed once; its stream is still alive (see `new`).
            let _ = unsafe { (self.lib.cublasDestroy_v2)(h) };
        }
    }
}
