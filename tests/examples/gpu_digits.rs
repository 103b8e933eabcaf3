//! The digits model trained with its ops on GPU:0, for `cargo xtask gpu-check`:
//!
//! - `gpu_digits local`: the MLP 64-64-10 trained in one `DirectSession` under the device scope
//!   `/device:GPU:0` (soft placement puts ops without a GPU kernel on the CPU), Adam(0.01), batch
//!   64; checks that MatMul and ApplyAdam ran on the GPU and that the test accuracy is at least
//!   `ACCURACY_TARGET`.
//! - `gpu_digits sync`: between-graph synchronous training (`SyncReplicasOptimizer`) on a 1 ps +
//!   2 worker loopback cluster in this process, every task with its GPU, as `rill train` runs it.
//!
//! Both print `RESULT` lines and end with `PASS` or `FAIL`; a watchdog ends the process with a
//! `FAIL ... deadline` line (exit 124) if a run stalls. Without a GPU they print
//! "skipped: no GPU" and exit 0, or fail under `RILL_REQUIRE_GPU=1`.

use rill_graph::{
    DType, DirectSession, Graph, Result, RunMetadata, RunOptions, Session, SessionOptions, TraceLevel,
};
use rill_train::digits::{
    digits_files, load_digits_tfrecords, Minibatches, IMAGE_PIXELS, NUM_CLASSES, TEST_TFRECORDS,
    TRAIN_TFRECORDS,
};
use rill_train::job::{run_worker, Mode, TrainOptions};
use rill_train::{models, standard_runtime, Adam, Optimizer};
use rill_transport::{ClusterSpec, Server, ServerDef};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const ACCURACY_TARGET: f32 = 0.95;
const LOCAL_STEPS: usize = 1500;
const SYNC_STEPS: i64 = 60;
/// The whole program's deadline: far above a healthy run (seconds), far below gpu-check's budget.
const DEADLINE: Duration = Duration::from_secs(150);
/// Deadline of one training step: a stalled round ends the worker's step with an error.
const STEP_TIMEOUT_MS: u64 = 20_000;

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "local".into());
    let require = std::env::var("RILL_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if !has_gpu() {
        println!("no GPU: {}", gpu_error());
        if require {
            println!("FAIL gpu_digits {mode}: RILL_REQUIRE_GPU=1 but there is no GPU");
            return ExitCode::FAILURE;
        }
        println!("skipped: no GPU");
        return ExitCode::SUCCESS;
    }
    let m = mode.clone();
    // The watchdog: this thread ends the process if the run has not ended by the deadline.
    std::thread::spawn(move || {
        std::thread::sleep(DEADLINE);
        println!("FAIL gpu_digits {m}: deadline of {}s exceeded (stalled)", DEADLINE.as_secs());
        std::process::exit(124);
    });
    let r = match mode.as_str() {
        "local" => local(),
        "sync" => sync(),
        other => {
            println!("usage: gpu_digits [local|sync], not {other:?}");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => {
            println!("PASS gpu_digits {mode}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL gpu_digits {mode}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn gpu_options() -> SessionOptions {
    let mut o = SessionOptions { allow_soft_placement: true, ..Default::default() };
    // Several devices of this process share the GPU: each grows its reservation on demand.
    o.gpu_options.allow_growth = true;
    o
}

fn gpu_error() -> String {
    use rill_graph::DeviceFactory;
    let task = rill_graph::DeviceName::parse("/job:localhost/replica:0/task:0").expect("a valid name");
    match rill_device_cuda::CudaDeviceFactory::new().create_devices(&gpu_options(), &task) {
        Ok(d) => format!("{} GPUs", d.len()),
        Err(e) => e.to_string(),
    }
}

fn has_gpu() -> bool {
    rill_device_cuda::CudaDeviceFactory::new().load_driver().is_ok()
}

fn ro() -> RunOptions {
    RunOptions { timeout_in_ms: STEP_TIMEOUT_MS, ..Default::default() }
}

fn local() -> Result<()> {
    let (images, labels) = load_digits_tfrecords(&digits_files(TRAIN_TFRECORDS))?;
    let (test_x, test_y) = load_digits_tfrecords(&digits_files(TEST_TFRECORDS))?;
    let g = Graph::new();
    let (x, y, loss, acc, train, init) = g.with_device("/device:GPU:0", |g| -> Result<_> {
        let x = g.placeholder("images", DType::F32, [None, Some(IMAGE_PIXELS)]);
        let y = g.placeholder("labels", DType::I64, [None]);
        let logits = models::mlp(g, x, &[64], NUM_CLASSES, 7);
        let loss = models::softmax_loss(g, logits, y);
        let acc = models::accuracy(g, logits, y);
        let train = Adam::new(0.01).minimize(g, loss, None)?;
        Ok((x, y, loss, acc, train, g.global_variables_initializer()))
    })?;
    g.status()?;
    let s = DirectSession::new(&g, &standard_runtime(), gpu_options())?;
    s.run(&[], &[], &[init], &ro())?;
    let mut batches = Minibatches::new(&images, &labels, 7)?;
    let t0 = Instant::now();
    let mut last = f32::NAN;
    let mut md = RunMetadata::default();
    for step in 0..LOCAL_STEPS {
        let (bx, by) = batches.next_batch(64)?;
        let feeds = [(x, bx), (y, by)];
        if step == 0 {
            let traced = RunOptions { trace_level: TraceLevel::FullTrace, ..ro() };
            s.run_with_metadata(&feeds, &[loss], &[train], &traced, Some(&mut md))?;
        } else if step % 500 == 499 {
            last = s.run(&feeds, &[loss], &[train], &ro())?[0].scalar_value::<f32>()?;
        } else {
            s.run(&feeds, &[], &[train], &ro())?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let on_gpu = |op: &str| md.step_stats.nodes.iter().any(|n| n.op == op && n.device.contains("GPU"));
    let missing: Vec<&str> = ["MatMul", "ApplyAdam"].into_iter().filter(|op| !on_gpu(op)).collect();
    if !missing.is_empty() {
        return Err(rill_graph::Error::internal(format!("{missing:?} did not run on the GPU")));
    }
    let accuracy = s.run(&[(x, test_x), (y, test_y)], &[acc], &[], &ro())?[0].scalar_value::<f32>()?;
    println!("RESULT gpu_digits_local_steps = {:.1} steps/s (loss {last:.3})", LOCAL_STEPS as f64 / secs);
    println!("RESULT gpu_digits_test_accuracy = {accuracy:.4} fraction (target {ACCURACY_TARGET})");
    if accuracy < ACCURACY_TARGET {
        return Err(rill_graph::Error::internal(format!(
            "test accuracy {accuracy:.4} is below {ACCURACY_TARGET}"
        )));
    }
    Ok(())
}

fn sync() -> Result<()> {
    let port = || rill_transport::cluster::free_loopback_port();
    let spec = ClusterSpec::parse(&format!(
        "ps=127.0.0.1:{};worker=127.0.0.1:{},127.0.0.1:{}",
        port()?,
        port()?,
        port()?
    ))?;
    let start = |job: &str, task: u32| -> Result<Server> {
        let mut def = ServerDef::new(spec.clone(), job, task)?;
        def.default_session_options = SessionOptions {
            inter_op_parallelism_threads: 2,
            intra_op_parallelism_threads: 1,
            ..gpu_options()
        };
        Server::start(def, standard_runtime())
    };
    let _ps = start("ps", 0)?;
    let workers = [start("worker", 0)?, start("worker", 1)?];
    let out = std::env::temp_dir().join(format!("rill-gpu-sync-{}", std::process::id()));
    let opts = TrainOptions {
        mode: Mode::Sync,
        steps: SYNC_STEPS,
        out_dir: out.clone(),
        log_every: 10,
        step_timeout_ms: STEP_TIMEOUT_MS,
        ..Default::default()
    };
    let t0 = Instant::now();
    let reports: Vec<Result<_>> = std::thread::scope(|s| {
        let hs: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(t, w)| {
                let o = opts.clone();
                s.spawn(move || run_worker(w, t as u32, &o))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(rill_graph::Error::internal("a worker panicked"))))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&out);
    let mut reps = Vec::new();
    for (t, r) in reports.into_iter().enumerate() {
        reps.push(r.map_err(|e| e.context(format!("worker {t}")))?);
    }
    let chief = &reps[0];
    let accuracy = chief.test_accuracy.unwrap_or(f32::NAN);
    println!(
        "RESULT gpu_sync_training_steps = {:.1} steps/s (global step {}, {secs:.1} s)",
        chief.global_step as f64 / secs,
        chief.global_step
    );
    println!("RESULT gpu_sync_test_accuracy = {accuracy:.4} fraction");
    if chief.global_step < SYNC_STEPS {
        return Err(rill_graph::Error::internal(format!(
            "the chief stopped at global step {} of {SYNC_STEPS}",
            chief.global_step
        )));
    }
    Ok(())
}
