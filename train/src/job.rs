//! One task of a between-graph training job (`rill train`): a worker builds the model under
//! `replica_device_setter`, opens a `MonitoredSession` on its own server and trains with the
//! others on the ps tasks' variables, synchronously (`SyncReplicasOptimizer`, optionally with
//! spare replicas) or asynchronously. The chief (worker 0) initialises or restores the latest
//! checkpoint of its output directory, writes checkpoints every N steps, TensorBoard scalars, a
//! Chrome trace of a step and a final checkpoint, and reports the test accuracy. A restarted ps
//! makes every worker recreate its session; the chief restores the latest checkpoint.

use crate::digits::{
    digits_files, load_digits_tfrecords, Minibatches, IMAGE_PIXELS, NUM_CLASSES, TEST_TFRECORDS,
    TRAIN_TFRECORDS,
};
use crate::{
    create_global_step, exponential_decay, models, replica_device_setter, staleness_histogram, Adam,
    AsyncPolicy, AsyncReplicasOptimizer, ChiefLoopOptions, FileWriter, HalfTransfer, Histogram,
    MonitoredSession, MonitoredSessionOptions, Optimizer, ReplicaDeviceSetterOptions, SaverOptions, Scaffold,
    SessionFactory, SyncReplicasOps, SyncReplicasOptimizer,
};
use rill_graph::{
    Code, DType, Graph, Output, Result, RunMetadata, RunOptions, Session, SessionOptions, TraceLevel,
};
use rill_queues::Coordinator;
use rill_transport::{RemoteSession, Server};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the workers combine their gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every gradient is applied at once (asynchronous between-graph replication).
    Async,
    /// One update per `workers` gradients, through per-variable accumulators on the ps.
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    Mlp,
    Cnn,
}

/// Options of one training task.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub mode: Mode,
    pub model: ModelKind,
    /// Training stops when the global step reaches this.
    pub steps: i64,
    pub batch_size: usize,
    /// Adam's learning rate at global step 0.
    pub learning_rate: f64,
    /// The factor the rate has decayed to (exponentially, step by step) when the global step
    /// reaches `steps`; 1 keeps it constant.
    pub lr_decay: f64,
    pub ps_tasks: usize,
    /// Workers in the job (sync: `total_num_replicas`, the tokens released per update).
    pub workers: usize,
    /// Sync: gradients averaged into each update; `None`: every worker's. Fewer than `workers`
    /// leaves spare replicas, so a lost worker does not stop training.
    pub replicas_to_aggregate: Option<usize>,
    /// The chief writes a checkpoint every this many global steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Bound on one recovery after a restarted or unreachable task.
    pub recovery_timeout_ms: u64,
    /// Where the chief writes events, the trace and checkpoints.
    pub out_dir: PathBuf,
    /// A progress line every this many local steps.
    pub log_every: u64,
    /// Deadline of each step.
    pub step_timeout_ms: u64,
    /// Gradients cross to the ps tasks as this dtype (`F16` or `BF16`); `None`: as computed.
    pub half_transfer: Option<DType>,
    /// Async: what happens to stale gradients.
    pub async_policy: AsyncPolicy,
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            mode: Mode::Sync,
            model: ModelKind::Mlp,
            steps: 400,
            batch_size: 64,
            learning_rate: 0.01,
            lr_decay: LR_DECAY,
            ps_tasks: 1,
            workers: 2,
            replicas_to_aggregate: None,
            checkpoint_every: 0,
            recovery_timeout_ms: 60_000,
            out_dir: std::env::temp_dir().join("rill-train"),
            log_every: 20,
            step_timeout_ms: 10_000,
            half_transfer: None,
            async_policy: AsyncPolicy::default(),
            seed: 7,
        }
    }
}

/// What a task reports at the end.
#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    pub local_steps: u64,
    pub global_step: i64,
    pub final_loss: f32,
    pub examples_per_sec: f64,
    /// Bytes this task's connections sent plus received, per local step.
    pub bytes_per_step: f64,
    /// Chief only.
    pub test_accuracy: Option<f32>,
    pub trace: Option<PathBuf>,
    pub events: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    /// Sessions recreated after a task was lost or restarted.
    pub recoveries: u64,
    /// Async: the staleness of this worker's gradients (global steps), step by step.
    pub staleness: Option<Histogram>,
}

/// The default `TrainOptions::lr_decay`.
pub const LR_DECAY: f64 = 0.1;

/// Consecutive step deadlines a worker tolerates before it gives up (each is `step_timeout_ms`).
const STEP_TIMEOUTS_MAX: u32 = 5;
/// Deadline of the chief's final evaluation on the whole test set.
const EVAL_TIMEOUT_MS: u64 = 120_000;

struct Model {
    x: Output,
    y: Output,
    loss: Output,
    accuracy: Output,
    global_step: Output,
    train_op: Output,
    sync: Option<SyncReplicasOps>,
    release: Option<Output>,
    /// Async: the staleness of the step's gradients (int64 scalar).
    staleness: Option<Output>,
}

/// `opt.minimize`, through `HalfTransfer` when gradients travel at half precision; returns the
/// optimizer for its built ops.
fn minimize<O: Optimizer>(
    opt: O,
    half: Option<DType>,
    g: &Graph,
    loss: Output,
    gs: Output,
) -> Result<(Output, O)> {
    match half {
        Some(wire) => {
            let h = HalfTransfer::new(opt, wire);
            let train = h.minimize(g, loss, Some(gs))?;
            Ok((train, h.opt))
        }
        None => Ok((opt.minimize(g, loss, Some(gs))?, opt)),
    }
}

fn build(g: &Graph, task: u32, o: &TrainOptions) -> Result<Model> {
    g.with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(o.ps_tasks, task)), |g| {
        let global_step = create_global_step(g)?;
        let x = g.placeholder("images", DType::F32, [None, Some(IMAGE_PIXELS)]);
        let y = g.placeholder("labels", DType::I64, [None]);
        let logits = match o.model {
            ModelKind::Mlp => models::mlp(g, x, &[64], NUM_CLASSES, o.seed as i64),
            ModelKind::Cnn => models::small_cnn(g, models::as_nhwc(g, x, 8), NUM_CLASSES, o.seed as i64),
        };
        let loss = models::softmax_loss(g, logits, y);
        let accuracy = models::accuracy(g, logits, y);
        let opt = if o.lr_decay == 1.0 {
            Adam::new(o.learning_rate)
        } else {
            Adam::new(exponential_decay(g, o.learning_rate, global_step, o.steps.max(1), o.lr_decay, false))
        };
        let (train_op, sync, release, staleness) = match o.mode {
            Mode::Async => {
                let opt = AsyncReplicasOptimizer::new(opt, o.async_policy, task == 0);
                let (train, opt) = minimize(opt, o.half_transfer, g, loss, global_step)?;
                (train, None, None, Some(opt.async_ops()?.staleness))
            }
            Mode::Sync => {
                let aggregate = o.replicas_to_aggregate.unwrap_or(o.workers);
                let sync = SyncReplicasOptimizer::new(opt, aggregate, o.workers);
                let (train, sync) = minimize(sync, o.half_transfer, g, loss, global_step)?;
                let ops = sync.sync_ops()?;
                let release = ops.init_tokens_op(g, Some(ops.tokens_per_step))?;
                (train, Some(ops), Some(release), None)
            }
        };
        g.status()?;
        Ok(Model { x, y, loss, accuracy, global_step, train_op, sync, release, staleness })
    })
}

fn ro(ms: u64) -> RunOptions {
    RunOptions { timeout_in_ms: ms, ..Default::default() }
}

/// The monitored session of worker `task`: on its own server, over the ps tasks and itself only
/// (as TensorFlow's device filters), so a lost peer worker never blocks a session's creation.
fn monitored_session(
    server: &Server,
    g: &Graph,
    m: &Model,
    task: u32,
    o: &TrainOptions,
) -> Result<MonitoredSession> {
    let chief = task == 0;
    let target = server.target();
    let filters = vec!["/job:ps".to_string(), format!("/job:worker/task:{task}")];
    let factory: SessionFactory = Box::new(move |g: &Graph| {
        let opts = SessionOptions { device_filters: filters.clone(), ..Default::default() };
        Ok(Arc::new(RemoteSession::connect(&target, g, opts)?) as Arc<dyn Session>)
    });
    let local_init_op = m.sync.as_ref().map(|s| if chief { s.chief_init_op } else { s.local_step_init_op });
    let opts = MonitoredSessionOptions {
        is_chief: chief,
        checkpoint_dir: Some(o.out_dir.join("checkpoints")),
        save_checkpoint_steps: o.checkpoint_every,
        saver: SaverOptions { max_to_keep: 3 },
        recovery_timeout_ms: o.recovery_timeout_ms,
        control_timeout_in_ms: o.step_timeout_ms,
        ..Default::default()
    };
    MonitoredSession::new(g, Scaffold { local_init_op, ..Default::default() }, factory, opts)
}

/// Runs this worker's part of the job against `server` (this task's own server).
pub fn run_worker(server: &Server, task: u32, o: &TrainOptions) -> Result<TrainReport> {
    let g = Graph::new();
    let m = build(&g, task, o)?;
    let chief = task == 0;
    if chief {
        std::fs::create_dir_all(o.out_dir.join("checkpoints"))?;
    }
    let sess = Arc::new(monitored_session(server, &g, &m, task, o)?);
    if let Some((path, step)) = sess.last_restore() {
        println!("RESUMED task={task} step={} checkpoint={}", step.unwrap_or(0), path.display());
    }
    let coord = Arc::new(Coordinator::new());
    if let (Some(ops), true) = (&m.sync, chief) {
        // Through the monitored session, so the loop survives a restarted ps too.
        let opts = ChiefLoopOptions { round_timeout_in_ms: 2_000, max_rounds: 0 };
        ops.start_chief_loop(sess.clone(), &coord, opts);
    }
    let (images, labels) = load_digits_tfrecords(&digits_files(TRAIN_TFRECORDS))?;
    let mut batches = Minibatches::new(&images, &labels, o.seed + u64::from(task))?;
    let mut events = if chief { Some(FileWriter::new(&o.out_dir.join("events"))?) } else { None };
    let (sent0, recv0) = server.bytes_transferred();
    let t0 = Instant::now();
    let mut report = TrainReport::default();
    let mut timeouts = 0u32;
    let mut fetches = vec![m.loss, m.global_step];
    fetches.extend(m.staleness);
    let mut staleness = m.staleness.map(|_| staleness_histogram());
    loop {
        let (x, y) = batches.next_batch(o.batch_size)?;
        let r = sess.run(&[(m.x, x), (m.y, y)], &fetches, &[m.train_op], &ro(o.step_timeout_ms));
        let out = match r {
            Ok(v) => v,
            // In sync mode the last round may never come for a worker once the goal is reached.
            Err(e) if e.code == Code::DeadlineExceeded && report.global_step + 1 >= o.steps => break,
            // A sync worker waits for the token of a round that stalled on an overloaded task and
            // was resynced: a fresh gradient (still at its local step) completes the next one.
            // The chief's loop failing first is the real cause.
            Err(e)
                if e.code == Code::DeadlineExceeded
                    && timeouts < STEP_TIMEOUTS_MAX
                    && !coord.should_stop() =>
            {
                timeouts += 1;
                eprintln!("rill: worker {task}: step deadline ({}); computing a new gradient", e.msg);
                continue;
            }
            Err(e) => {
                // The chief's update loop may have failed first: its error is the cause.
                coord.request_stop(None);
                if let Err(cause) = coord.join(Duration::from_secs(2)) {
                    return Err(cause.context(format!("worker {task}: the chief's update loop failed")));
                }
                return Err(e.context(format!("worker {task} at local step {}", report.local_steps)));
            }
        };
        timeouts = 0;
        let before = report.global_step;
        report.local_steps += 1;
        report.final_loss = out[0].scalar_value::<f32>()?;
        report.global_step = out[1].scalar_value::<i64>()?;
        if report.global_step + 1 == o.steps {
            // The step fetched may predate this run's own update (a sync round is applied by the
            // chief while the worker waits for its token): read it again before one more step,
            // as TensorFlow's `StopAtStepHook` does. Should the read fail, the next step meets
            // the same fault and handles it as any step does.
            if let Ok(now) = sess.run(&[], &[m.global_step], &[], &ro(o.step_timeout_ms)) {
                report.global_step = now[0].scalar_value::<i64>()?;
            }
        }
        if let (Some(h), Some(t)) = (staleness.as_mut(), out.get(2)) {
            h.add(t.scalar_value::<i64>()? as f64);
        }
        if sess.recoveries() > report.recoveries {
            report.recoveries = sess.recoveries();
            let restored = sess.last_restore().and_then(|r| r.1).map(|s| s.to_string()).unwrap_or_default();
            println!(
                "RECOVERED task={task} recoveries={} last_step={before} restored_step={restored} step={}",
                report.recoveries, report.global_step
            );
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        report.examples_per_sec = report.local_steps as f64 * o.batch_size as f64 / secs;
        if report.local_steps % o.log_every == 0 || report.global_step >= o.steps {
            println!(
                "PROGRESS task={task} step={} loss={:.4} examples_per_sec={:.0}",
                report.global_step, report.final_loss, report.examples_per_sec
            );
            if let Some(w) = events.as_mut() {
                w.add_scalar("loss", report.final_loss, report.global_step)?;
                if let Some(h) = &staleness {
                    w.add_histogram("staleness", h, report.global_step)?;
                }
            }
        }
        if report.global_step >= o.steps {
            break;
        }
    }
    let (sent, recv) = server.bytes_transferred();
    report.bytes_per_step = (sent - sent0 + recv - recv0) as f64 / report.local_steps.max(1) as f64;
    if chief {
        coord.request_stop(None);
        if let Some(release) = m.release {
            // Frees workers still waiting for a token of a round that will not come.
            sess.run(&[], &[], &[release], &ro(o.step_timeout_ms))?;
        }
        let (tx, ty) = load_digits_tfrecords(&digits_files(TEST_TFRECORDS))?;
        let mut md = RunMetadata::default();
        let traced =
            RunOptions { trace_level: TraceLevel::FullTrace, ..ro(EVAL_TIMEOUT_MS.max(o.step_timeout_ms)) };
        let acc =
            sess.run_with_metadata(&[(m.x, tx), (m.y, ty)], &[m.accuracy], &[], &traced, Some(&mut md))?;
        let accuracy = acc[0].scalar_value::<f32>()?;
        report.test_accuracy = Some(accuracy);
        std::fs::create_dir_all(&o.out_dir)?;
        let trace = o.out_dir.join("trace.json");
        md.write_chrome_trace(&trace)?;
        report.trace = Some(trace);
        if let Some(mut w) = events.take() {
            w.add_scalar("test_accuracy", accuracy, report.global_step)?;
            w.flush()?;
            report.events = Some(o.out_dir.join("events"));
        }
        report.checkpoint = sess.save_checkpoint()?;
        let _ = coord.join(Duration::from_secs(5));
    }
    report.recoveries = sess.recoveries();
    report.staleness = staleness;
    Ok(report)
}
