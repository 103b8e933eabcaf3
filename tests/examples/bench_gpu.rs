//! GPU benchmarks, measured as the PyTorch peer `device-cuda/peer/bench_torch.py` measures them:
//! MatMul 4096² in f32 (no TF32) and f16 (TFLOP/s, CUDA events around 10 products, median of 7),
//! 256 MiB host↔device copies through pinned memory (GB/s, median of 7), and training steps/s of
//! the MLP 784-256-256-10, batch 128, GradientDescent(0.01), with the variables and the step on
//! GPU:0 and the data constant in the graph (median of 7 chunks, each ended by fetching the loss,
//! which waits for the GPU). `bench_gpu [--quick]`; with no GPU it prints why and exits 0, or 1
//! under `RILL_REQUIRE_GPU=1`.

use rill_device_cuda::driver::{Event, PinnedBuffer};
use rill_device_cuda::kernels::{self, MatMulImpl};
use rill_device_cuda::{CudaDevice, CudaDeviceFactory};
use rill_graph::half::f16;
use rill_graph::{
    DType, Device, DeviceFactory, DeviceName, DirectSession, Graph, Output, Result, RunMetadata, RunOptions,
    Session, SessionOptions, Shape, Tensor, TraceLevel,
};
use rill_train::{GradientDescent, Optimizer};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

const MATMUL_N: usize = 4096;
const COPY_BYTES: usize = 256 << 20;
const MLP_BATCH: usize = 128;

/// Repetitions, products per repetition, MLP steps per chunk.
struct Sizes {
    reps: usize,
    products: usize,
    steps: usize,
}

fn main() -> ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick {
        Sizes { reps: 3, products: 3, steps: 20 }
    } else {
        Sizes { reps: 7, products: 10, steps: 100 }
    };
    let require = std::env::var("RILL_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match run(&sizes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.code == rill_graph::Code::Unavailable && !require => {
            println!("skipped: no GPU ({e})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL bench_gpu: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(sizes: &Sizes) -> Result<()> {
    let mut opts = SessionOptions::default();
    opts.gpu_options.allow_growth = true;
    let task = DeviceName::parse("/job:localhost/replica:0/task:0")?;
    {
        let devs = CudaDeviceFactory::new().create_devices(&opts, &task)?;
        let dev = devs[0]
            .as_any()
            .downcast_ref::<CudaDevice>()
            .ok_or_else(|| rill_graph::Error::internal("GPU:0 is not a CudaDevice"))?;
        println!("device: {}", dev.attributes().description);
        matmul(dev, DType::F32, MatMulImpl::Auto, "", sizes)?;
        matmul(dev, DType::F16, MatMulImpl::Auto, "", sizes)?;
        if dev.cublas().is_some() {
            // The fallback's speed, for reference: one repetition of one product is enough.
            matmul(dev, DType::F32, MatMulImpl::Tiled, "[tiled]", &Sizes { reps: 3, products: 1, steps: 0 })?;
        }
        copies(dev, sizes)?;
    }
    mlp(&opts, sizes)
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Median over repetitions of the time of `products` products, by CUDA events on the stream.
fn matmul(dev: &CudaDevice, d: DType, imp: MatMulImpl, tag: &str, sizes: &Sizes) -> Result<()> {
    let n = MATMUL_N;
    let host = |seed| -> Result<Tensor> {
        let v = random(n * n, seed);
        match d {
            DType::F16 => Tensor::new([n, n], &v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
            _ => Tensor::new([n, n], &v),
        }
    };
    let (a, b) = (dev.from_host(host(1)?)?, dev.from_host(host(2)?)?);
    let ctx = dev.context();
    let (start, end) = (Event::new(ctx)?, Event::new(ctx)?);
    kernels::matmul_using(dev, imp, &a, &b, false, false)?;
    dev.synchronize()?;
    let mut rates = Vec::new();
    for _ in 0..sizes.reps {
        start.record(dev.stream())?;
        for _ in 0..sizes.products {
            kernels::matmul_using(dev, imp, &a, &b, false, false)?;
        }
        end.record(dev.stream())?;
        end.synchronize()?;
        let secs = end.elapsed_ms_since(&start)? as f64 / 1e3;
        rates.push(2.0 * (n * n * n * sizes.products) as f64 / secs / 1e12);
    }
    let name = format!("gpu_matmul_{}_{n}{tag}", if d == DType::F16 { "f16" } else { "f32" });
    rill_tests::line(&name, rill_tests::median(&rates), "TFLOP/s", &rill_tests::spread(&rates));
    Ok(())
}

/// Host↔device copies of one pinned buffer, each timed by events around the copy.
fn copies(dev: &CudaDevice, sizes: &Sizes) -> Result<()> {
    let ctx = dev.context();
    let mut pinned = PinnedBuffer::alloc(ctx, COPY_BYTES)?;
    for (i, b) in pinned.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let t = dev.alloc(DType::U8, Shape::vector(COPY_BYTES))?;
    let dst = dev.ptr(&t)?;
    let stream = dev.stream();
    let (start, end) = (Event::new(ctx)?, Event::new(ctx)?);
    for (name, up) in [("gpu_h2d_pinned_256MiB", true), ("gpu_d2h_pinned_256MiB", false)] {
        let mut rates = Vec::new();
        for rep in 0..=sizes.reps {
            start.record(stream)?;
            if up {
                stream.upload(dst, &pinned, COPY_BYTES)?;
            } else {
                stream.download(&mut pinned, dst, COPY_BYTES)?;
            }
            end.record(stream)?;
            end.synchronize()?;
            if rep > 0 {
                rates.push(COPY_BYTES as f64 / (end.elapsed_ms_since(&start)? as f64 / 1e3) / 1e9);
            }
        }
        rill_tests::line(name, rill_tests::median(&rates), "GB/s", &rill_tests::spread(&rates));
    }
    let intact = pinned.as_slice().iter().enumerate().all(|(i, &b)| b == (i % 251) as u8);
    if !intact {
        return Err(rill_graph::Error::data_loss("the copied bytes differ after the round trips"));
    }
    Ok(())
}

fn dense(g: &Graph, x: Output, n_in: usize, n_out: usize, name: &str, relu: bool, seed: i64) -> Output {
    let limit = (6.0 / (n_in + n_out) as f32).sqrt();
    let w = g.variable(&format!("{name}_w"), g.random_uniform([n_in, n_out], -limit, limit, seed));
    let b = g.variable(&format!("{name}_b"), g.zeros([n_out]));
    let y = g.bias_add(g.matmul(x, w), b);
    if relu {
        g.relu(y)
    } else {
        y
    }
}

/// Nodes per device of one traced step, e.g. `GPU:0 41, CPU:0 5 (Fill, Reshape, ...)`.
fn placement(md: &RunMetadata) -> String {
    let mut per: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in &md.step_stats.nodes {
        let dev = n.device.rsplit('/').next().unwrap_or(&n.device).replace("device:", "");
        per.entry(dev).or_default().push(n.op.clone());
    }
    per.iter()
        .map(|(d, ops)| {
            if d.starts_with("GPU") {
                format!("{d} {}", ops.len())
            } else {
                let mut names = ops.clone();
                names.sort();
                names.dedup();
                format!("{d} {} ({})", ops.len(), names.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn mlp(opts: &SessionOptions, sizes: &Sizes) -> Result<()> {
    let g = Graph::new();
    let xs = random(MLP_BATCH * 784, 3);
    let ys: Vec<i64> = (0..MLP_BATCH as i64).map(|i| (i * 7) % 10).collect();
    let (loss, train, init) = g.with_device("/device:GPU:0", |g| -> Result<_> {
        let x = g.constant(Tensor::new([MLP_BATCH, 784], &xs)?);
        let y = g.constant(Tensor::vector(&ys));
        let h = dense(g, x, 784, 256, "l1", true, 1);
        let h = dense(g, h, 256, 256, "l2", true, 2);
        let logits = dense(g, h, 256, 10, "l3", false, 3);
        let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, y).0, &[], false);
        let train = GradientDescent::new(0.01).minimize(g, loss, None)?;
        Ok((loss, train, g.global_variables_initializer()))
    })?;
    g.status()?;
    // Ops without a GPU kernel (initialisers, int64 label constants, shape ops) go to the CPU.
    let opts = SessionOptions { allow_soft_placement: true, ..opts.clone() };
    let s = DirectSession::new(&g, &rill_train::standard_runtime(), opts)?;
    let ro = RunOptions { timeout_in_ms: 60_000, ..Default::default() };
    s.run(&[], &[], &[init], &ro)?;
    let l0 = s.run(&[], &[loss], &[], &ro)?[0].scalar_value::<f32>()?;
    let mut md = RunMetadata::default();
    let traced = RunOptions { trace_level: TraceLevel::FullTrace, ..ro.clone() };
    s.run_with_metadata(&[], &[], &[train], &traced, Some(&mut md))?;
    println!("mlp step placement: {}", placement(&md));
    for _ in 0..10 {
        s.run(&[], &[], &[train], &ro)?;
    }
    let mut rates = Vec::new();
    let mut last = l0;
    for _ in 0..sizes.reps {
        let t0 = Instant::now();
        for _ in 0..sizes.steps {
            s.run(&[], &[], &[train], &ro)?;
        }
        last = s.run(&[], &[loss], &[], &ro)?[0].scalar_value::<f32>()?;
        rates.push(sizes.steps as f64 / t0.elapsed().as_secs_f64());
    }
    // A NaN loss fails too: it compares as not smaller.
    if last.partial_cmp(&l0) != Some(std::cmp::Ordering::Less) {
        return Err(rill_graph::Error::internal(format!("MLP loss did not fall: {l0} -> {last}")));
    }
    let m = rill_tests::median(&rates);
    rill_tests::line(
        "gpu_mlp_train_steps[batch=128]",
        m,
        "steps/s",
        &format!("({:.2} ms/step; loss {l0:.3}->{last:.3}) {}", 1e3 / m, rill_tests::spread(&rates)),
    );
    Ok(())
}
