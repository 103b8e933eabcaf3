//! Distributed data-parallel training on 127.0.0.1, the workload of the peer script
//! `bench_dist_train.py`: 1 ps and 2 worker processes (this program re-executed with a hidden
//! `--serve` / `--worker` argument), between-graph replication under `replica_device_setter`, the
//! MLP 784-256-256-10 with a constant batch of 128 baked into each worker's graph and
//! GradientDescent(0.01). Async: total worker steps/s; sync (`SyncReplicasOptimizer(2, 2)`):
//! global steps/s; the local single-session reference; wire bytes per worker step with and
//! without half-precision (f16) transfer. Rates are medians over chunks of the counting window.
//!
//! `bench_dist_train [SECONDS] [async|sync|local|half|tcp|half_tcp|single ...]` (default 10 s;
//! every mode but `half_tcp`). `tcp` is async with shared memory off, every tensor byte over the
//! sockets as between hosts; `half_tcp` is `half` so; `single` is async with one worker.

use rill_graph::{DType, DirectSession, Graph, Output, Result, RunOptions, Session, SessionOptions, Tensor};
use rill_train::{
    create_global_step, read_half, replica_device_setter, GradientDescent, HalfTransfer, Optimizer,
    ReplicaDeviceSetterOptions, SyncReplicasOptimizer,
};
use rill_transport::{ClusterSpec, RemoteSession, Server, ServerDef};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BATCH: usize = 128;
const WARM_S: f64 = 3.0;
/// Chunks of the counting window; the reported rate is their median.
const CHUNKS: usize = 5;
/// The longest a helper process lives, whatever happens to this one.
const HELPER_LIFETIME_S: u64 = 240;

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn ro(ms: u64) -> RunOptions {
    RunOptions { timeout_in_ms: ms, ..Default::default() }
}

struct Model {
    loss: Output,
    train: Output,
    init: Output,
    global_step: Option<Output>,
    sync: Option<rill_train::SyncReplicasOps>,
    init_tokens: Option<Output>,
}

/// The peer's MLP; `half` reads the parameters through f16 and sends the gradients as f16.
fn build(g: &Graph, mode: &str, half: bool) -> Result<Model> {
    let mut rng = rill_tests::Lcg(0);
    let xs: Vec<f32> = (0..BATCH * 784).map(|_| rng.normal()).collect();
    let ys: Vec<i64> = (0..BATCH).map(|_| (rng.uniform() * 10.0) as i64 % 10).collect();
    let global_step = if mode == "local" { None } else { Some(create_global_step(g)?) };
    let x = g.constant(Tensor::new([BATCH, 784], &xs)?);
    let y = g.constant(Tensor::vector(&ys));
    let read = |v: Output| if half { read_half(g, v, DType::F16) } else { Ok(v) };
    let dense = |x: Output, n_in: usize, n_out: usize, name: &str, act: bool, seed: i64| -> Result<Output> {
        // Glorot uniform, as the peer's glorot_uniform_initializer.
        let limit = (6.0 / (n_in + n_out) as f32).sqrt();
        let w = g.variable(&format!("{name}_w"), g.random_uniform([n_in, n_out], -limit, limit, seed));
        let b = g.variable(&format!("{name}_b"), g.zeros([n_out]));
        let y = g.bias_add(g.matmul(x, read(w)?), read(b)?);
        Ok(if act { g.relu(y) } else { y })
    };
    let h = dense(x, 784, 256, "l1", true, 1)?;
    let h = dense(h, 256, 256, "l2", true, 2)?;
    let logits = dense(h, 256, 10, "l3", false, 3)?;
    let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, y).0, &[], false);
    let gd = GradientDescent::new(0.01);
    let (train, sync, init_tokens) = if mode == "sync" {
        let opt = SyncReplicasOptimizer::new(gd, 2, 2);
        let train = opt.minimize(g, loss, global_step)?;
        let ops = opt.sync_ops()?;
        let tokens = ops.init_tokens_op(g, None)?;
        (train, Some(ops), Some(tokens))
    } else if half {
        (HalfTransfer::new(gd, DType::F16).minimize(g, loss, global_step)?, None, None)
    } else {
        (gd.minimize(g, loss, global_step)?, None, None)
    };
    let init = g.global_variables_initializer();
    g.status()?;
    Ok(Model { loss, train, init, global_step, sync, init_tokens })
}

fn session_options() -> SessionOptions {
    SessionOptions { inter_op_parallelism_threads: 2, intra_op_parallelism_threads: 2, ..Default::default() }
}

fn server(cluster: &ClusterSpec, job: &str, task: u32) -> Result<Server> {
    let mut def = ServerDef::new(cluster.clone(), job, task)?;
    def.default_session_options = session_options();
    Server::start(def, rill_train::standard_runtime())
}

/// `--serve CLUSTER JOB TASK`: hosts one task until stdin closes or the lifetime ends.
fn serve(cluster: &str, job: &str, task: u32) -> Result<()> {
    let c = ClusterSpec::parse(cluster)?;
    let s = server(&c, job, task)?;
    println!("READY");
    std::io::stdout().flush()?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(HELPER_LIFETIME_S));
    s.stop();
    Ok(())
}

/// What a worker counted in each chunk of the window.
#[derive(Default, Clone)]
struct Chunk {
    steps: u64,
    /// The highest global step this worker saw by the end of the chunk.
    max_global_step: i64,
    /// This server's bytes moved during the chunk (`wire_bytes`).
    bytes: u64,
}

/// Bytes this server moved so far: sent and received over its sockets plus tensor bytes written
/// to and landed from same-host peers through shared memory.
fn wire_bytes(srv: &Server) -> u64 {
    let ((s, r), (w, l)) = (srv.bytes_transferred(), srv.shm_bytes_transferred());
    s + r + w + l
}

/// `--worker CLUSTER TASK MODE HALF`: hosts the worker task, builds its graph, trains from
/// `GO lo hi` until `hi`, prints `CHUNK` lines for `[lo, hi]` and `LOSS first last`.
fn worker(cluster: &str, task: u32, mode: &str, half: bool) -> Result<()> {
    let c = ClusterSpec::parse(cluster)?;
    let srv = server(&c, "worker", task)?;
    let g = Graph::new();
    let m = g.with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(1, task)), |g| {
        build(g, mode, half)
    })?;
    let opts = SessionOptions {
        device_filters: vec!["/job:ps".into(), format!("/job:worker/task:{task}")],
        ..session_options()
    };
    // The master of this task's own server, called in process as TensorFlow's
    // `tf.Session(server.target)` does (its LocalMaster), not through a socket to itself.
    let sess: Arc<dyn Session> = Arc::new(RemoteSession::in_process(&srv, &g, opts)?);
    let gs = m.global_step.ok_or_else(|| rill_graph::Error::internal("no global step"))?;
    let chief = task == 0;
    if chief {
        sess.run(&[], &[], &[m.init], &ro(30_000))?;
    } else {
        // The chief starts first and initialises before this worker is launched.
        sess.run(&[], &[gs], &[], &ro(30_000))?;
    }
    let coord = Arc::new(rill_queues::Coordinator::new());
    if let Some(ops) = &m.sync {
        let init = if chief { ops.chief_init_op } else { ops.local_step_init_op };
        sess.run(&[], &[], &[init], &ro(30_000))?;
        if chief {
            if let Some(t) = m.init_tokens {
                sess.run(&[], &[], &[t], &ro(30_000))?;
            }
            let lo = rill_train::ChiefLoopOptions { round_timeout_in_ms: 2_000, max_rounds: 0 };
            // The chief's rounds run entirely on the ps: through a master there, each round is
            // one request instead of one to this task's master and one from it to the ps.
            let ps = format!("tcp://{}", c.task_address("ps", 0)?);
            let o = SessionOptions { device_filters: vec!["/job:ps".into()], ..session_options() };
            let chief_sess: Arc<dyn Session> = Arc::new(RemoteSession::connect(&ps, &g, o)?);
            ops.start_chief_loop(chief_sess, &coord, lo);
        }
    }
    println!("SESSION_READY");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let parts: Vec<f64> = line.split_whitespace().skip(1).filter_map(|s| s.parse().ok()).collect();
    let (lo, hi) = match parts[..] {
        [lo, hi] => (lo, hi),
        _ => return Err(rill_graph::Error::invalid_argument(format!("expected 'GO lo hi', got {line:?}"))),
    };
    let width = (hi - lo) / CHUNKS as f64;
    let mut chunks = vec![Chunk::default(); CHUNKS];
    let (mut first_loss, mut last_loss, mut base_gs) = (f32::NAN, f32::NAN, 0i64);
    let mut last_bytes = 0u64;
    loop {
        let r = sess.run(&[], &[m.loss, gs], &[m.train], &ro(5_000));
        let t = now_s();
        let out = match r {
            Ok(v) => v,
            // A sync step may find its peer gone at the end.
            Err(e) if e.code == rill_graph::Code::DeadlineExceeded && t >= hi - 1.0 => break,
            Err(e) => return Err(e),
        };
        let (l, gsv) = (out[0].scalar_value::<f32>()?, out[1].scalar_value::<i64>()?);
        if first_loss.is_nan() {
            first_loss = l;
        }
        last_loss = l;
        let total = wire_bytes(&srv);
        let step_bytes = total.saturating_sub(last_bytes);
        last_bytes = total;
        if t < lo {
            base_gs = base_gs.max(gsv);
        } else if t <= hi {
            let i = (((t - lo) / width) as usize).min(CHUNKS - 1);
            chunks[i].steps += 1;
            chunks[i].max_global_step = chunks[i].max_global_step.max(gsv);
            chunks[i].bytes += step_bytes;
        } else {
            break;
        }
    }
    coord.request_stop(None);
    println!("BASE {base_gs}");
    for c in &chunks {
        println!("CHUNK {} {} {}", c.steps, c.max_global_step, c.bytes);
    }
    println!("LOSS {first_loss} {last_loss}");
    std::io::stdout().flush()?;
    // Sync queues may still hold a waiting chief round: leave without joining it.
    std::process::exit(0);
}

/// A helper process whose stdout lines arrive on a channel, so every wait has a deadline.
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Helper {
    fn spawn(args: &[String], shm: bool) -> Result<Helper> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .env("RILL_SHM", if shm { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| rill_graph::Error::internal("no stdout"))?;
        let stdin = child.stdin.take();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Helper { child, stdin, lines })
    }

    /// Lines up to and including the first starting with `prefix`, waiting at most `timeout`.
    fn wait_for(&self, prefix: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let done = l.starts_with(prefix);
                    seen.push(l);
                    if done {
                        return Ok(seen);
                    }
                }
                Err(_) => {
                    return Err(rill_graph::Error::deadline_exceeded(format!(
                        "no '{prefix}' line from a helper in {timeout:?}"
                    )))
                }
            }
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let w = self.stdin.as_mut().ok_or_else(|| rill_graph::Error::internal("stdin closed"))?;
        writeln!(w, "{line}")?;
        w.flush()?;
        Ok(())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Stopped by its own PID, then reaped.
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    /// Per chunk: total steps of both workers, highest global step.
    steps: Vec<u64>,
    global: Vec<i64>,
    base_gs: i64,
    /// Per worker: bytes per local step over the window.
    bytes_per_step: Vec<f64>,
    per_worker_steps: Vec<u64>,
    losses: Vec<String>,
    window: f64,
}

fn run_dist(mode: &str, half: bool, shm: bool, workers_n: u32, seconds: f64) -> Result<Run> {
    let port = || rill_transport::cluster::free_loopback_port().map(|p| format!("127.0.0.1:{p}"));
    let ps_addr = port()?;
    let worker_addrs: Vec<String> = (0..workers_n).map(|_| port()).collect::<Result<_>>()?;
    let cluster = format!("ps={ps_addr};worker={}", worker_addrs.join(","));
    let ps = Helper::spawn(&["--serve".into(), cluster.clone(), "ps".into(), "0".into()], shm)?;
    ps.wait_for("READY", Duration::from_secs(30))?;
    let mut workers = Vec::new();
    for task in 0..workers_n {
        // The chief first, so that worker 1 finds the variables initialised.
        let w = Helper::spawn(
            &["--worker".into(), cluster.clone(), task.to_string(), mode.into(), half.to_string()],
            shm,
        )?;
        w.wait_for("SESSION_READY", Duration::from_secs(60))?;
        workers.push(w);
    }
    let lo = now_s() + WARM_S;
    let hi = lo + seconds;
    for w in &mut workers {
        w.send(&format!("GO {lo} {hi}"))?;
    }
    let mut run = Run {
        steps: vec![0; CHUNKS],
        global: vec![0; CHUNKS],
        base_gs: 0,
        bytes_per_step: Vec::new(),
        per_worker_steps: Vec::new(),
        losses: Vec::new(),
        window: seconds,
    };
    for (task, w) in workers.iter().enumerate() {
        let lines = w.wait_for("LOSS", Duration::from_secs_f64(WARM_S + seconds + 30.0))?;
        let (mut steps, mut bytes) = (0u64, 0u64);
        let mut i = 0;
        for l in &lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["BASE", b] => run.base_gs = run.base_gs.max(b.parse().unwrap_or(0)),
                ["CHUNK", s, g, b] if i < CHUNKS => {
                    let (s, g, b): (u64, i64, u64) =
                        (s.parse().unwrap_or(0), g.parse().unwrap_or(0), b.parse().unwrap_or(0));
                    run.steps[i] += s;
                    run.global[i] = run.global[i].max(g);
                    steps += s;
                    bytes += b;
                    i += 1;
                }
                ["LOSS", a, b] => run.losses.push(format!("worker{task} {a}->{b}")),
                _ => {}
            }
        }
        run.per_worker_steps.push(steps);
        run.bytes_per_step.push(bytes as f64 / steps.max(1) as f64);
    }
    drop(workers);
    drop(ps);
    Ok(run)
}

fn chunk_rates(run: &Run) -> (Vec<f64>, Vec<f64>) {
    let width = run.window / CHUNKS as f64;
    let steps = run.steps.iter().map(|&s| s as f64 / width).collect();
    let mut prev = run.base_gs;
    let mut global = Vec::new();
    for &g in &run.global {
        let g = g.max(prev);
        global.push((g - prev) as f64 / width);
        prev = g;
    }
    (steps, global)
}

fn local(seconds: f64) -> Result<()> {
    let g = Graph::new();
    let m = build(&g, "local", false)?;
    let s = DirectSession::new(&g, &rill_train::standard_runtime(), session_options())?;
    let r = RunOptions::default();
    s.run(&[], &[], &[m.init], &r)?;
    let l0 = s.run(&[], &[m.loss], &[], &r)?[0].scalar_value::<f32>()?;
    for _ in 0..20 {
        s.run(&[], &[], &[m.train], &r)?;
    }
    let chunk = seconds / 9.0;
    let mut rates = Vec::new();
    for _ in 0..9 {
        let (mut n, t0) = (0u64, Instant::now());
        while t0.elapsed().as_secs_f64() < chunk {
            s.run(&[], &[], &[m.train], &r)?;
            n += 1;
        }
        rates.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    let l1 = s.run(&[], &[m.loss], &[], &r)?[0].scalar_value::<f32>()?;
    let med = rill_tests::median(&rates);
    // Named apart from `bench_mlp`'s line of the same workload, which `cargo xtask bench` pairs
    // with TensorFlow's: one invocation prints both, and a shared name would keep only the last.
    rill_tests::line(
        "local_single_session_steps[const,dist_train]",
        med,
        "steps/s",
        &format!(
            "({:.0} examples/s; {:.2} ms/step; loss {l0:.3}->{l1:.3}) {}",
            med * BATCH as f64,
            1e3 / med,
            rill_tests::spread(&rates)
        ),
    );
    Ok(())
}

fn report_async(run: &Run, name: &str) -> f64 {
    let (steps, _) = chunk_rates(run);
    let m = rill_tests::median(&steps);
    let w: Vec<String> = run
        .per_worker_steps
        .iter()
        .enumerate()
        .map(|(i, &s)| format!("worker{i} {:.1}/s", s as f64 / run.window))
        .collect();
    rill_tests::line(
        name,
        m,
        "steps/s",
        &format!(
            "({:.0} examples/s; {}; {}) {}",
            m * BATCH as f64,
            w.join(", "),
            run.losses.join(", "),
            rill_tests::spread(&steps)
        ),
    );
    m
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--serve") if args.len() == 5 => {
            return serve(
                &args[2],
                &args[3],
                args[4].parse().map_err(|_| rill_graph::Error::invalid_argument("task"))?,
            )
        }
        Some("--worker") if args.len() == 6 => {
            let task = args[3].parse().map_err(|_| rill_graph::Error::invalid_argument("task"))?;
            return worker(&args[2], task, &args[4], args[5] == "true");
        }
        _ => {}
    }
    let seconds: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let mut modes: Vec<&str> = args.iter().skip(2).map(String::as_str).collect();
    if modes.is_empty() {
        modes = vec!["async", "sync", "local", "half", "tcp", "single"];
    }
    println!("# seconds={seconds} warm={WARM_S} data=const chunks={CHUNKS}");
    let mut plain_bytes = None;
    for mode in modes {
        match mode {
            "async" => {
                let run = run_dist("async", false, true, 2, seconds)?;
                report_async(&run, "async_total_worker_steps");
                let b = rill_tests::median(&run.bytes_per_step);
                plain_bytes = Some(b);
                rill_tests::line(
                    "dist_async_wire_bytes_per_step[f32]",
                    b,
                    "bytes",
                    "(worker server: socket sent+received plus shared memory written+landed)",
                );
            }
            "sync" => {
                let run = run_dist("sync", false, true, 2, seconds)?;
                let (_, global) = chunk_rates(&run);
                let m = rill_tests::median(&global);
                let w: Vec<String> = run
                    .per_worker_steps
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| format!("worker{i} local steps {:.1}/s", s as f64 / run.window))
                    .collect();
                rill_tests::line(
                    "sync_global_steps",
                    m,
                    "global steps/s",
                    &format!(
                        "({:.0} examples/s aggregated over 2x{BATCH}; {}; {}) {}",
                        m * 2.0 * BATCH as f64,
                        w.join(", "),
                        run.losses.join(", "),
                        rill_tests::spread(&global)
                    ),
                );
            }
            "local" => local(seconds.min(10.0))?,
            "half" => {
                let run = run_dist("async", true, true, 2, seconds)?;
                report_async(&run, "async_total_worker_steps[half=f16]");
                let b = rill_tests::median(&run.bytes_per_step);
                let extra = match plain_bytes {
                    Some(p) => format!("(worker server: socket plus shared memory; {:.2}x of f32)", b / p),
                    None => "(worker server: socket sent+received plus shared memory written+landed)".into(),
                };
                rill_tests::line("dist_async_wire_bytes_per_step[f16]", b, "bytes", &extra);
            }
            "half_tcp" => {
                let run = run_dist("async", true, false, 2, seconds)?;
                report_async(&run, "async_total_worker_steps[half=f16,shm=off]");
                let b = rill_tests::median(&run.bytes_per_step);
                rill_tests::line(
                    "dist_async_wire_bytes_per_step[f16,shm=off]",
                    b,
                    "bytes",
                    "(worker server, socket only)",
                );
            }
            "single" => {
                // One worker alone: the cost of the distribution without a second worker
                // competing for the cores.
                let run = run_dist("async", false, true, 1, seconds)?;
                report_async(&run, "async_single_worker_steps");
            }
            "tcp" => {
                // Every tensor byte over the sockets, as between hosts.
                let run = run_dist("async", false, false, 2, seconds)?;
                report_async(&run, "async_total_worker_steps[shm=off]");
                let b = rill_tests::median(&run.bytes_per_step);
                rill_tests::line(
                    "dist_async_wire_bytes_per_step[f32,shm=off]",
                    b,
                    "bytes",
                    "(worker server, socket only)",
                );
            }
            other => {
                return Err(rill_graph::Error::invalid_argument(format!(
                    "unknown mode {other:?}: async, sync, local, half, tcp, half_tcp or single"
                )))
            }
        }
    }
    Ok(())
}
