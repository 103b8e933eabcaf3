//! TensorFlow's placement and GPU memory rules on a real GPU, for `cargo xtask gpu-check`:
//!
//! - default placement: with no device requested, a float MatMul runs on GPU:0 and an int32 Add,
//!   which has no GPU kernel, on the CPU; the product matches the CPU's;
//! - an int32 variable requested on `/device:GPU:0` is an `InvalidArgument` error without soft
//!   placement and lives on the CPU with it;
//! - `per_process_gpu_memory_fraction` reserves that fraction of the GPU up front, and a node
//!   asking for more is `ResourceExhausted` naming the node and the sizes;
//! - `allow_growth` starts with only the device's own workspace reserved and grows on demand.
//!
//! Prints one `pass`/`FAIL` line per rule and exits non-zero on any failure. Without a GPU it
//! prints "skipped: no GPU" and exits 0, or fails under `RILL_REQUIRE_GPU=1`.

use rill_device_cuda::CudaDevice;
use rill_graph::{
    Code, DirectSession, Error, Graph, Result, RunMetadata, RunOptions, Session, SessionOptions, Shape,
    Tensor, TraceLevel,
};
use rill_train::standard_runtime;
use std::process::ExitCode;

const RUN_TIMEOUT_MS: u64 = 20_000;
/// The whole program's deadline: far above a healthy run (seconds), below gpu-check's step limit.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(50);

fn main() -> ExitCode {
    let require = std::env::var("RILL_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if let Err(e) = rill_device_cuda::CudaDeviceFactory::new().load_driver() {
        println!("no GPU: {e}");
        if require {
            println!("FAIL gpu_rules: RILL_REQUIRE_GPU=1 but there is no GPU");
            return ExitCode::FAILURE;
        }
        println!("skipped: no GPU");
        return ExitCode::SUCCESS;
    }
    let rules: [(&str, fn() -> Result<String>); 4] = [
        ("default placement", default_placement),
        ("int32 variable on GPU:0", int32_variable),
        ("per_process_gpu_memory_fraction", memory_fraction),
        ("allow_growth", allow_growth),
    ];
    // The watchdog: a rule that stalls ends the process with a line naming it.
    let current = std::sync::Arc::new(std::sync::Mutex::new(""));
    let watched = current.clone();
    std::thread::spawn(move || {
        std::thread::sleep(DEADLINE);
        let rule = *watched.lock().unwrap_or_else(|e| e.into_inner());
        println!("FAIL {rule}: deadline of {}s exceeded (stalled)", DEADLINE.as_secs());
        std::process::exit(124);
    });
    let mut failed = 0;
    for (name, rule) in rules {
        *current.lock().unwrap_or_else(|e| e.into_inner()) = name;
        match rule() {
            Ok(how) => println!("pass {name}: {how}"),
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    println!("{} rules, {failed} failed", rules.len());
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn ro() -> RunOptions {
    RunOptions { timeout_in_ms: RUN_TIMEOUT_MS, ..Default::default() }
}

/// Growth, so that each rule's session takes only what it uses beside the others.
fn growing() -> SessionOptions {
    let mut o = SessionOptions::default();
    o.gpu_options.allow_growth = true;
    o
}

fn fail(msg: String) -> Error {
    Error::internal(msg)
}

/// The device type each traced node of `op` ran on.
fn ran_on(md: &RunMetadata, op: &str) -> Vec<String> {
    md.step_stats
        .nodes
        .iter()
        .filter(|n| n.op == op)
        .map(|n| if n.device.contains("GPU") { "GPU" } else { "CPU" }.to_string())
        .collect()
}

fn gpu_of(s: &DirectSession) -> Result<&CudaDevice> {
    s.devices()
        .iter()
        .find_map(|d| d.as_any().downcast_ref::<CudaDevice>())
        .ok_or_else(|| fail("the session has no GPU device".into()))
}

fn default_placement() -> Result<String> {
    let (m, k, n) = (96, 80, 72);
    let av: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
    let bv: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
    let g = Graph::new();
    let c = g.matmul(g.constant(Tensor::new([m, k], &av)?), g.constant(Tensor::new([k, n], &bv)?));
    let i = g.add(g.constant(Tensor::scalar(2i32)), g.constant(Tensor::scalar(3i32)));
    g.status()?;
    let s = DirectSession::new(&g, &standard_runtime(), growing())?;
    let mut md = RunMetadata::default();
    let traced = RunOptions { trace_level: TraceLevel::FullTrace, ..ro() };
    let out = s.run_with_metadata(&[], &[c, i], &[], &traced, Some(&mut md))?;
    let (mm, add) = (ran_on(&md, "MatMul"), ran_on(&md, "Add"));
    if mm != ["GPU"] || add != ["CPU"] {
        return Err(fail(format!("MatMul ran on {mm:?} and the int32 Add on {add:?}")));
    }
    let got = out[0].to_vec::<f32>()?;
    let mut worst = 0f32;
    for r in 0..m {
        for col in 0..n {
            let want: f32 = (0..k).map(|j| av[r * k + j] * bv[j * n + col]).sum();
            worst = worst.max((got[r * n + col] - want).abs() / want.abs().max(1.0));
        }
    }
    if worst > 1e-3 || out[1].scalar_value::<i32>()? != 5 {
        return Err(fail(format!("wrong values: MatMul relative error {worst:e}, Add {:?}", out[1])));
    }
    Ok(format!("MatMul on GPU:0 (relative error {worst:.1e}), int32 Add on CPU:0"))
}

fn int32_variable() -> Result<String> {
    let build = || {
        let g = Graph::new();
        let (v, init) = g.with_device("/device:GPU:0", |g| {
            let v = g.variable("counter", g.constant(Tensor::scalar(41i32)));
            (v, g.global_variables_initializer())
        });
        (g, v, init)
    };
    let (g, _, init) = build();
    let s = DirectSession::new(&g, &standard_runtime(), growing())?;
    match s.run(&[], &[], &[init], &ro()) {
        Err(e) if e.code == Code::InvalidArgument => {}
        other => return Err(fail(format!("without soft placement: {other:?}, not InvalidArgument"))),
    }
    let (g, v, init) = build();
    let bumped = g.add(v, g.constant(Tensor::scalar(1i32)));
    let s = DirectSession::new(
        &g,
        &standard_runtime(),
        SessionOptions { allow_soft_placement: true, ..growing() },
    )?;
    s.run(&[], &[], &[init], &ro())?;
    let mut md = RunMetadata::default();
    let traced = RunOptions { trace_level: TraceLevel::FullTrace, ..ro() };
    let out = s.run_with_metadata(&[], &[bumped], &[], &traced, Some(&mut md))?;
    let on = ran_on(&md, "VariableV2");
    if on != ["CPU"] || out[0].scalar_value::<i32>()? != 42 {
        return Err(fail(format!("with soft placement: variable on {on:?}, value {:?}", out[0])));
    }
    Ok("InvalidArgument without soft placement; on CPU:0 with it".into())
}

fn memory_fraction() -> Result<String> {
    const FRACTION: f64 = 0.02;
    let mut opts = SessionOptions::default();
    opts.gpu_options.per_process_gpu_memory_fraction = FRACTION;
    let g = Graph::new();
    g.zeros([1]);
    println!("  {FRACTION} of the GPU reserved up front...");
    let s = DirectSession::new(&g, &standard_runtime(), opts.clone())?;
    let dev = gpu_of(&s)?;
    let (_, total) = dev.context().mem_info()?;
    let (plan, stats) = (dev.memory().plan(), dev.memory().stats());
    let want = total as f64 * FRACTION;
    if stats.reserved_bytes != plan.limit_bytes || (plan.limit_bytes as f64 - want).abs() > want * 0.01 {
        return Err(fail(format!(
            "reserved {} bytes with limit {}, want {FRACTION} of {total} = {want:.0} up front",
            stats.reserved_bytes, plan.limit_bytes
        )));
    }
    // One float more than the whole reservation.
    let floats = plan.limit_bytes as usize / 4 + 1;
    let g = Graph::new();
    let shape = Shape::new(&[floats])?;
    let too_big = g.with_name_scope("too_big", |g| g.zeros(shape));
    drop(s);
    println!("  a tensor of {floats} floats past the limit...");
    let s = DirectSession::new(&g, &standard_runtime(), opts)?;
    match s.run(&[], &[too_big], &[], &ro()) {
        Err(e) if e.code == Code::ResourceExhausted && e.msg.contains("too_big") && e.msg.contains("OOM") => {
            Ok(format!("{} of {total} bytes reserved up front; {}", plan.limit_bytes, e.msg))
        }
        other => Err(fail(format!("{floats} floats past the limit gave {other:?}, not ResourceExhausted"))),
    }
}

fn allow_growth() -> Result<String> {
    const FLOATS: usize = 64 << 20;
    let g = Graph::new();
    let t = g.ones([FLOATS]);
    let sum = g.reduce_sum(t, &[0], false);
    let s = DirectSession::new(&g, &standard_runtime(), growing())?;
    let dev = gpu_of(&s)?;
    let before = dev.memory().stats().reserved_bytes;
    let got = s.run(&[], &[sum], &[], &ro())?[0].scalar_value::<f32>()?;
    let after = dev.memory().stats().reserved_bytes;
    let limit = dev.memory().plan().limit_bytes;
    let off = (f64::from(got) / FLOATS as f64 - 1.0).abs();
    // At creation only what the device itself keeps (cuBLAS's workspace); the tensor grows it.
    let tensor = (FLOATS * 4) as u64;
    if before >= tensor || after < before + tensor || after > limit || off > 1e-3 {
        return Err(fail(format!(
            "reserved {before} bytes before and {after} after a {} byte tensor (limit {limit}); sum {got}",
            FLOATS * 4
        )));
    }
    Ok(format!("reserved {before} bytes at creation, {after} after a {tensor} byte tensor"))
}
