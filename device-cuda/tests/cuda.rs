//! The device-cuda crate's integration tests: the clean `Unavailable` path without a driver, the
//! allocator tables, the PTX table, and, where a GPU is present, every kernel against the CPU.

use rill_device_cuda::alloc::{oom_error, round_up, BestFit, Plan, ALIGN_BYTES, GROWTH_CHUNK_MIN_BYTES};
use rill_device_cuda::driver::cublas::{self, gemm_args, GemmArgs, SearchEnv, CUBLAS_NAMES};
use rill_device_cuda::driver::{CublasLib, Param};
use rill_device_cuda::ptx::{kernel_spec, PtxModule, KERNELS as PTX_KERNELS};
use rill_device_cuda::{selfcheck, visible_ordinals, CudaDevice, CudaDeviceFactory, GpuOptions, KERNELS};
use rill_graph::{Code, DType, DeviceFactory, DeviceName, SessionOptions, TypeOf};

const MIB: u64 = 1 << 20;

fn task() -> DeviceName {
    DeviceName::parse("/job:localhost/replica:0/task:0").unwrap()
}

#[test]
fn missing_driver_library_is_unavailable() {
    let f = CudaDeviceFactory::with_library_names(&["/nonexistent/libcuda.so.1"]);
    let err = f.create_devices(&SessionOptions::default(), &task()).err().map(|e| e.code);
    assert_eq!(err, Some(Code::Unavailable));
}

#[test]
fn default_factory_gives_gpus_or_unavailable() {
    // Growth, not the default 90% reservation: other tests of this binary hold GPU memory at
    // the same time, as two TensorFlow processes on one GPU would.
    let mut opts = SessionOptions::default();
    opts.gpu_options.allow_growth = true;
    match CudaDeviceFactory::new().create_devices(&opts, &task()) {
        Ok(devs) => {
            assert!(!devs.is_empty());
            for (i, d) in devs.iter().enumerate() {
                assert_eq!(d.name().to_string(), format!("/job:localhost/replica:0/task:0/device:GPU:{i}"));
                // The description says which MatMul runs: cuBLAS exactly when the device has it.
                let gpu = d.as_any().downcast_ref::<CudaDevice>().expect("a CudaDevice");
                let desc = &d.attributes().description;
                assert!(desc.ends_with(&format!("matmul: {}", gpu.matmul_backend())), "{desc}");
                assert_eq!(gpu.matmul_backend().starts_with("cuBLAS"), gpu.cublas().is_some(), "{desc}");
            }
        }
        Err(e) => assert_eq!(e.code, Code::Unavailable, "{e}"),
    }
}

#[test]
fn missing_or_broken_cublas_is_unavailable() {
    let dir = scratch_dir("broken");
    let fake = dir.join("libcublas.so.12");
    std::fs::write(&fake, b"not a shared object").unwrap();
    let names = ["/nonexistent/libcublas.so.12".to_string(), fake.to_string_lossy().into_owned()];
    let e = CublasLib::load_from(&names).unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(e.msg.contains("/nonexistent/libcublas.so.12") && e.msg.contains(&names[1]), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn scratch_dir(what: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rill-cublas-{what}-{}-{}",
        std::process::id(),
        rill_graph::random_u64()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn cublas_loads_with_every_symbol_or_is_unavailable() {
    // Loading needs no GPU: where cuBLAS is installed this resolves every symbol rill calls.
    match CublasLib::load() {
        Ok(lib) => assert!(lib.origin().contains("libcublas"), "{lib:?}"),
        Err(e) => assert_eq!(e.code, Code::Unavailable, "{e}"),
    }
}

#[test]
fn cublas_search_order() {
    let venv = scratch_dir("venv");
    let lib = venv.join("lib/python3.11/site-packages/nvidia/cublas/lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("libcublas.so.12"), b"").unwrap();
    let wheel = lib.join("libcublas.so.12").to_string_lossy().into_owned();
    let asked = std::cell::Cell::new(0);
    let python = || {
        asked.set(asked.get() + 1);
        vec![venv.join("lib/python3.11/site-packages")]
    };
    let vars = |set: Vec<(&'static str, String)>| {
        move |k: &str| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    };
    // The loader's names first, then files found under the virtual environment.
    let v = vars(vec![("VIRTUAL_ENV", venv.to_string_lossy().into_owned())]);
    let c = cublas::candidates(&SearchEnv { var: &v, python_sites: &python }).unwrap();
    assert_eq!(&c[..CUBLAS_NAMES.len()], CUBLAS_NAMES);
    assert!(c.contains(&wheel), "{c:?}");
    assert_eq!(asked.get(), 0, "python is asked only when the scan finds nothing");
    // Without the environment variable, the python fallback finds the same wheel, unless this
    // machine has a cuBLAS of its own in a standard place (then python is not asked).
    let none = vars(vec![]);
    let c = cublas::candidates(&SearchEnv { var: &none, python_sites: &python }).unwrap();
    assert!(c.len() > CUBLAS_NAMES.len(), "{c:?}");
    assert!(asked.get() == 0 || c.contains(&wheel), "{c:?}");
    // RILL_CUBLAS names the only candidate, or turns cuBLAS off.
    let set = vars(vec![("RILL_CUBLAS", "/opt/x/libcublas.so.12".into())]);
    let c = cublas::candidates(&SearchEnv { var: &set, python_sites: &python });
    assert_eq!(c, Some(vec!["/opt/x/libcublas.so.12".to_string()]));
    for off in ["none", "OFF", "0"] {
        let v = vars(vec![("RILL_CUBLAS", off.into())]);
        assert_eq!(cublas::candidates(&SearchEnv { var: &v, python_sites: &python }), None);
    }
    std::fs::remove_dir_all(&venv).unwrap();
}

#[test]
fn row_major_gemm_swaps_operands() {
    let (n_op, t_op) = (0, 1);
    // (m, n, k, ta, tb) -> column-major call computing C^T = op(B)^T op(A)^T
    let cases = [
        ((2, 3, 4, false, false), (n_op, n_op, 3, 2, 4, 3, 4, 3)),
        ((2, 3, 4, true, false), (n_op, t_op, 3, 2, 4, 3, 2, 3)),
        ((2, 3, 4, false, true), (t_op, n_op, 3, 2, 4, 4, 4, 3)),
        ((2, 3, 4, true, true), (t_op, t_op, 3, 2, 4, 4, 2, 3)),
        ((1, 1, 1, false, false), (n_op, n_op, 1, 1, 1, 1, 1, 1)),
    ];
    for ((m, n, k, ta, tb), (op_first, op_second, cm, cn, ck, ld_first, ld_second, ldc)) in cases {
        let want = GemmArgs { op_first, op_second, m: cm, n: cn, k: ck, ld_first, ld_second, ldc };
        assert_eq!(gemm_args(m, n, k, ta, tb).unwrap(), want, "{m}x{n}x{k} ta={ta} tb={tb}");
    }
    assert_eq!(gemm_args(1 << 31, 1, 1, false, false).map_err(|e| e.code), Err(Code::InvalidArgument));
}

#[test]
fn device_count_zero_hides_gpus_without_loading_the_driver() {
    let mut opts = SessionOptions::default();
    opts.device_count.insert("GPU".into(), 0);
    let f = CudaDeviceFactory::with_library_names(&["/nonexistent/libcuda.so.1"]);
    assert_eq!(f.create_devices(&opts, &task()).map(|d| d.len()).ok(), Some(0));
}

#[test]
fn visible_device_list_remaps() {
    let check = |list: &str, count: usize, want: Result<Vec<usize>, Code>| {
        assert_eq!(visible_ordinals(list, count).map_err(|e| e.code), want, "{list:?} of {count}");
    };
    check("", 3, Ok(vec![0, 1, 2]));
    check("  ", 0, Ok(vec![]));
    check("1,0", 2, Ok(vec![1, 0]));
    check("2", 3, Ok(vec![2]));
    check(" 0 , 2 ", 3, Ok(vec![0, 2]));
    check("3", 3, Err(Code::InvalidArgument));
    check("0,0", 2, Err(Code::InvalidArgument));
    check("x", 2, Err(Code::InvalidArgument));
}

/// Runs `ops` on a fresh allocator over `regions`: `a N` allocates N bytes, `f I` frees the I-th
/// allocation. Returns the addresses, offsets from the first region, as allocated (None = failed).
fn run(regions: &[(u64, u64)], ops: &[(char, u64)]) -> (Vec<Option<u64>>, BestFit) {
    let mut b = BestFit::new();
    for &(base, len) in regions {
        b.add_region(base, len);
    }
    let mut got = Vec::new();
    for &(op, v) in ops {
        match op {
            'a' => got.push(b.alloc(v)),
            _ => {
                b.free(got[v as usize].expect("freeing a failed allocation"));
            }
        }
        b.invariants();
    }
    let base = regions[0].0;
    (got.into_iter().map(|a| a.map(|a| a - base)).collect(), b)
}

#[test]
fn best_fit_allocation_table() {
    let k = 1024;
    // (case, ops, addresses as offsets, in-use bytes, free blocks, largest free)
    let cases: &[(&str, &[(char, u64)], &[Option<u64>], u64, usize, u64)] = &[
        ("sizes round up to 256", &[('a', 1), ('a', 300)], &[Some(0), Some(256)], 768, 1, 4 * k - 768),
        ("zero bytes still takes a unit", &[('a', 0), ('a', 0)], &[Some(0), Some(256)], 512, 1, 4 * k - 512),
        ("exact fill", &[('a', 4 * k)], &[Some(0)], 4 * k, 0, 0),
        ("too big fails", &[('a', 4 * k + 1)], &[None], 0, 1, 4 * k),
        (
            "best fit picks the smallest hole",
            // holes of 1k (at 0) and 512 (at 1.5k); a 512 request takes the 512 hole
            &[('a', k), ('a', 512), ('a', 512), ('a', 512), ('f', 0), ('f', 2), ('a', 512)],
            &[Some(0), Some(k), Some(1536), Some(2048), Some(1536)],
            1536,
            2,
            1536,
        ),
        (
            "fragmentation: free space exists but no block is big enough",
            &[('a', k), ('a', k), ('a', k), ('a', k), ('f', 0), ('f', 2), ('a', 2 * k)],
            &[Some(0), Some(k), Some(2 * k), Some(3 * k), None],
            2 * k,
            2,
            k,
        ),
    ];
    for &(name, ops, want, in_use, free_blocks, largest) in cases {
        let (got, b) = run(&[(1 << 20, 4 * k)], ops);
        assert_eq!(got, want, "{name}");
        let s = b.stats();
        assert_eq!(
            (s.in_use_bytes, s.free_blocks, s.largest_free_bytes),
            (in_use, free_blocks, largest),
            "{name}"
        );
    }
}

#[test]
fn coalescing_table() {
    let k = 1024;
    // Four 1k blocks then frees in some order; after the frees: (free blocks, largest free block).
    let cases: &[(&str, &[u64], usize, u64)] = &[
        ("free left then right neighbour", &[0, 1], 1, 2 * k),
        ("free middle joins both sides", &[0, 2, 1], 1, 3 * k),
        ("free all in any order is one block", &[3, 0, 2, 1], 1, 4 * k),
        ("non-adjacent frees stay apart", &[0, 2], 2, k),
    ];
    for &(name, frees, blocks, largest) in cases {
        let mut ops: Vec<(char, u64)> = vec![('a', k); 4];
        ops.extend(frees.iter().map(|&i| ('f', i)));
        // One extra 256-byte block at the end keeps the tail from joining the last 1k block.
        ops.insert(4, ('a', 256));
        let (_, b) = run(&[(0, 4 * k + 256)], &ops);
        let s = b.stats();
        assert_eq!((s.free_blocks, s.largest_free_bytes), (blocks, largest), "{name}");
    }
}

#[test]
fn blocks_never_span_regions() {
    // Two regions that touch in the address space: freeing everything leaves two blocks, and a
    // request as big as both together fails.
    let (got, b) =
        run(&[(0, 1024), (1024, 1024)], &[('a', 1024), ('a', 1024), ('f', 0), ('f', 1), ('a', 2048)]);
    assert_eq!(got, vec![Some(0), Some(1024), None]);
    assert_eq!(b.stats().free_blocks, 2);
}

#[test]
fn reservation_plan_table() {
    let gib = 1u64 << 30;
    let opts = |fraction: f64, growth: bool| GpuOptions {
        visible_device_list: String::new(),
        per_process_gpu_memory_fraction: fraction,
        allow_growth: growth,
    };
    // (case, options, total, free, limit, initial, grow)
    let cases = [
        ("fraction reserves up front", opts(0.5, false), 80 * gib, 70 * gib, 40 * gib, 40 * gib, false),
        ("growth starts empty", opts(0.0, true), 80 * gib, 70 * gib, 63 * gib, 0, true),
        ("growth capped by fraction", opts(0.25, true), 80 * gib, 70 * gib, 20 * gib, 0, true),
        ("default takes 90% of free", opts(0.0, false), 80 * gib, 10 * gib, 9 * gib, 9 * gib, false),
    ];
    for (name, o, total, free, limit, initial, grow) in cases {
        let p = Plan::new(&o, total, free).unwrap();
        assert_eq!(p.limit_bytes, limit / ALIGN_BYTES * ALIGN_BYTES, "{name}");
        assert_eq!((p.initial_bytes, p.grow), (initial.min(p.limit_bytes), grow), "{name}");
    }
    assert_eq!(Plan::new(&opts(1.5, false), gib, gib).map_err(|e| e.code), Err(Code::InvalidArgument));
}

#[test]
fn growth_chunk_table() {
    let p = Plan { limit_bytes: 64 * MIB, initial_bytes: 0, grow: true };
    // (reserved so far, request, next chunk)
    let cases = [
        (0, 1000, Some(GROWTH_CHUNK_MIN_BYTES)),
        (2 * MIB, 1000, Some(2 * MIB)),
        (8 * MIB, 1000, Some(8 * MIB)),
        (8 * MIB, 20 * MIB, Some(20 * MIB)),
        (48 * MIB, 1000, Some(16 * MIB)),
        (60 * MIB, 5 * MIB, None),
        (64 * MIB, 1, None),
    ];
    for (reserved, request, want) in cases {
        assert_eq!(p.next_chunk(reserved, request), want, "reserved {reserved}, request {request}");
    }
    let fixed = Plan { grow: false, ..p };
    assert_eq!(fixed.next_chunk(0, 1), None);
    assert_eq!(round_up(257), 512);
}

#[test]
fn oom_error_names_the_sizes() {
    let (_, b) = run(&[(0, 4096)], &[('a', 4096)]);
    let p = Plan { limit_bytes: 4096, initial_bytes: 4096, grow: false };
    let e = oom_error("/job:w/replica:0/task:0/device:GPU:0", 8192, &p, &b.stats());
    assert_eq!(e.code, Code::ResourceExhausted);
    for part in ["8192 bytes", "GPU:0", "4096 bytes in use", "limit 4096", "largest free block 0"] {
        assert!(e.msg.contains(part), "{part:?} missing from {e}");
    }
}

/// The `(name, params)` of each `.entry` in PTX text.
fn ptx_entries(ptx: &str) -> Vec<(String, Vec<Param>)> {
    let mut out = Vec::new();
    let mut lines = ptx.lines();
    while let Some(l) = lines.next() {
        let Some(rest) = l.trim().strip_prefix(".visible .entry ") else { continue };
        let name = rest.trim_end_matches('(').to_string();
        let mut params = Vec::new();
        for p in lines.by_ref() {
            let p = p.trim();
            if p.starts_with(')') {
                break;
            }
            params.push(if p.contains(".b8") {
                Param::Words25
            } else if p.contains(".u32") {
                Param::U32
            } else if p.contains(".f32") {
                Param::F32
            } else {
                Param::U64
            });
        }
        out.push((name, params));
    }
    out
}

#[test]
fn ptx_table_matches_kernel_specs() {
    let mut seen = 0;
    for m in PtxModule::ALL {
        let entries = ptx_entries(m.ptx());
        assert!(!entries.is_empty(), "module {} has no kernels", m.name());
        for (name, params) in entries {
            let (module, want) = kernel_spec(&name).unwrap_or_else(|| panic!("{name} has no spec"));
            assert_eq!((module, want), (m, params.as_slice()), "{name}");
            seen += 1;
        }
    }
    // Every table prefix exists for each float type.
    for (prefix, m, _) in PTX_KERNELS {
        for d in ["f32", "f16", "bf16"] {
            let entry = format!(".entry {prefix}_{d}");
            assert!(m.ptx().contains(&entry), "{entry} missing from {}", m.name());
        }
    }
    assert_eq!(seen, 42);
}

#[test]
fn gpu_kernel_table() {
    fn find(op: &'static str) -> impl Iterator<Item = &'static rill_graph::KernelDef> {
        KERNELS.iter().filter(move |k| k.op == op)
    }
    // Like TensorFlow: float variables on the GPU, no int32 variable kernel.
    let var: Vec<_> = find("VariableV2").collect();
    assert_eq!(var.len(), 1);
    assert_eq!(
        (var[0].type_of, var[0].types),
        (TypeOf::Output(0), &[DType::F32, DType::F16, DType::BF16][..])
    );
    for op in [
        "Const",
        "Identity",
        "NoOp",
        "_Send",
        "_Recv",
        "_Arg",
        "_Retval",
        "Assign",
        "MatMul",
        "Softmax",
        "ApplyAdam",
    ] {
        assert!(find(op).count() >= 1, "no GPU kernel for {op}");
    }
    assert!(KERNELS.iter().all(|k| k.device_type == "GPU"));
}

#[test]
fn kernels_match_cpu_reference_where_a_gpu_exists() {
    let devs = match CudaDeviceFactory::new().create_devices(&SessionOptions::default(), &task()) {
        Ok(d) => d,
        Err(e) => {
            // No GPU here: the Unavailable path is covered above, unless a GPU is required.
            let required = std::env::var("RILL_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(!required, "RILL_REQUIRE_GPU=1 but no GPU device: {e}");
            return;
        }
    };
    let dev = devs[0].as_any().downcast_ref::<CudaDevice>().expect("a CudaDevice");
    let failed: Vec<String> = selfcheck::run_all(dev)
        .into_iter()
        .filter(|c| !c.passed())
        .map(|c| format!("{}: {:?} (tolerance {})", c.name, c.result, c.tolerance))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
