//! GPU self-check: lists the GPUs, measures host↔device copies through pinned staging, runs every
//! GPU kernel against a CPU reference, and exits non-zero on any failure.
//!
//! Run: `cargo run --release -p rill-device-cuda --example gpu_check`
//! With `RILL_REQUIRE_GPU=1`, finding no GPU is a failure; otherwise it prints
//! "skipped: no GPU" and exits 0.

use rill_device_cuda::driver::{Event, PinnedBuffer};
use rill_device_cuda::{selfcheck, CudaDevice, CudaDeviceFactory};
use rill_graph::{DType, Device, DeviceFactory, DeviceName, Result, SessionOptions, Shape};
use std::process::ExitCode;

/// Bytes per timed copy, and timed repetitions after one warm-up.
const COPY_BYTES: usize = 256 << 20;
const COPY_REPS: usize = 5;

fn main() -> ExitCode {
    let require = std::env::var("RILL_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let task = DeviceName::parse("/job:localhost/replica:0/task:0").expect("a valid task name");
    let mut opts = SessionOptions::default();
    // Grow on demand so the check runs beside other GPU users.
    opts.gpu_options.allow_growth = true;
    let devs = match CudaDeviceFactory::new().create_devices(&opts, &task) {
        Ok(d) => d,
        Err(e) => {
            println!("no GPU: {e}");
            if require {
                println!("FAIL: RILL_REQUIRE_GPU=1 but no GPU device could be created");
                return ExitCode::FAILURE;
            }
            println!("skipped: no GPU");
            return ExitCode::SUCCESS;
        }
    };
    let mut failures = 0;
    for d in &devs {
        println!("device {}: {}", d.name(), d.attributes().description);
    }
    let Some(dev) = devs[0].as_any().downcast_ref::<CudaDevice>() else {
        println!("FAIL: device 0 is not a CudaDevice");
        return ExitCode::FAILURE;
    };
    println!("driver CUDA version {}", dev.context().driver().version());
    if let Err(e) = copies(dev) {
        println!("FAIL copy: {e}");
        failures += 1;
    }
    let checks = selfcheck::run_all(dev);
    for c in &checks {
        let verdict = if c.passed() { "pass" } else { "FAIL" };
        match &c.result {
            Ok(err) => println!("{verdict} {} (max error {err:.2e}, tolerance {:.0e})", c.name, c.tolerance),
            Err(e) => println!("{verdict} {}: {e}", c.name),
        }
        failures += usize::from(!c.passed());
    }
    if let Err(e) = oom(dev) {
        println!("FAIL oom: {e}");
        failures += 1;
    }
    let s = dev.memory().stats();
    println!("memory: {} bytes reserved, {} in use after the checks", s.reserved_bytes, s.in_use_bytes);
    println!("{} checks, {failures} failed", checks.len() + 2);
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Times raw copies through one pinned buffer, then checks a round trip of a tensor through the
/// device's own staging path.
fn copies(dev: &CudaDevice) -> Result<()> {
    let ctx = dev.context();
    let mut pinned = PinnedBuffer::alloc(ctx, COPY_BYTES)?;
    for (i, b) in pinned.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let t = dev.alloc(DType::U8, Shape::vector(COPY_BYTES))?;
    let dst = dev.ptr(&t)?;
    let stream = dev.stream();
    let (start, end) = (Event::new(ctx)?, Event::new(ctx)?);
    for (name, up) in [("h2d_copy", true), ("d2h_copy", false)] {
        let mut ms = 0f32;
        for rep in 0..=COPY_REPS {
            start.record(stream)?;
            if up {
                stream.upload(dst, &pinned, COPY_BYTES)?;
            } else {
                stream.download(&mut pinned, dst, COPY_BYTES)?;
            }
            end.record(stream)?;
            end.synchronize()?;
            if rep > 0 {
                ms += end.elapsed_ms_since(&start)?;
            }
        }
        let gbs = (COPY_BYTES * COPY_REPS) as f64 / (ms as f64 / 1e3) / 1e9;
        println!("RESULT {name} = {gbs:.2} GB/s");
    }
    let ok = pinned.as_slice().iter().enumerate().all(|(i, &b)| b == (i * 7 + 3) as u8);
    println!("{} raw copy round trip of {COPY_BYTES} bytes", if ok { "pass" } else { "FAIL" });
    let host = rill_graph::Tensor::new(
        Shape::vector(5_000_000),
        &(0..5_000_000).map(|i| i as f32).collect::<Vec<_>>(),
    )?;
    let back = dev.to_host(&dev.from_host(host.clone())?)?;
    let same = back.as_slice::<f32>()? == host.as_slice::<f32>()?;
    println!("{} tensor round trip (20 MB, two staging chunks)", if same { "pass" } else { "FAIL" });
    // int32 tensors (shapes, axes) arriving at the GPU stay in host memory, as in TensorFlow.
    let ints = dev.from_host(rill_graph::Tensor::vector(&[3i32, -1]))?;
    let kept = ints.is_host() && dev.on_device(&ints)?.device_memory().is_some();
    println!(
        "{} int32 tensors stay on the host until a kernel needs them",
        if kept { "pass" } else { "FAIL" }
    );
    if ok && same && kept {
        Ok(())
    } else {
        Err(rill_graph::Error::data_loss("copied bytes differ"))
    }
}

/// An allocation past the limit is `ResourceExhausted` naming the sizes, not a crash.
fn oom(dev: &CudaDevice) -> Result<()> {
    let too_big = dev.memory().plan().limit_bytes as usize + (1 << 30);
    match dev.alloc(DType::U8, Shape::vector(too_big)) {
        Err(e) if e.code == rill_graph::Code::ResourceExhausted => {
            println!("pass oversized allocation: {e}");
            Ok(())
        }
        Err(e) => Err(e),
        Ok(_) => Err(rill_graph::Error::internal(format!("allocating {too_big} bytes succeeded"))),
    }
}
