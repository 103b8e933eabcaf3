//! One task of a between-graph training job (`rill train`): a worker builds the model under
//! `replica_device_setter`, opens a session on its own server and trains with the others on
//! the ps tasks' variables, synchronously (`SyncReplicasOptimizer`) or asynchronously. The chief
//! (worker 0) initialises, writes TensorBoard scalars, a Chrome trace of a step and a
//! checkpoint, and reports the test accuracy.

use crate::digits::{
    digits_files, load_digits_tfrecords, Minibatches, IMAGE_PIXELS, NUM_CLASSES, TEST_TFRECORDS,
    TRAIN_TFRECORDS,
};
use crate::{
    create_global_step, models, replica_device_setter, Adam, ChiefLoopOptions, FileWriter, Optimizer,
    ReplicaDeviceSetterOptions, Saver, SaverOptions, SyncReplicasOps, SyncReplicasOptimizer,
};
use rill_graph::{
    Code, DType, Error, Graph, Output, Result, RunMetadata, RunOptions, Session, SessionOptions, TraceLevel,
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
    pub learning_rate: f64,
    pub ps_tasks: usize,
    pub workers: usize,
    /// Where the chief writes events, the trace and checkpoints.
    pub out_dir: PathBuf,
    /// A progress line every this many local steps.
    pub log_every: u64,
    /// Deadline of each step.
    pub step_timeout_ms: u64,
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
            ps_tasks: 1,
            workers: 2,
            out_dir: std::env::temp_dir().join("rill-train"),
            log_every: 20,
            step_timeout_ms: 30_000,
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
}

struct Model {
    x: Output,
    y: Output,
    loss: Output,
    accuracy: Output,
    global_step: Output,
    train_op: Output,
    init: Output,
    ready: Vec<Output>,
    sync: Option<SyncReplicasOps>,
    release: Option<Output>,
    saver: Saver,
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
        let opt = Adam::new(o.learning_rate);
        let (train_op, sync, release) = match o.mode {
            Mode::Async => (opt.minimize(g, loss, Some(global_step))?, None, None),
            Mode::Sync => {
                let sync = SyncReplicasOptimizer::new(opt, o.workers, o.workers);
                let train = sync.minimize(g, loss, Some(global_step))?;
                let ops = sync.sync_ops()?;
                let release = ops.init_tokens_op(g, Some(o.workers))?;
                (train, Some(ops), Some(release))
            }
        };
        let init = g.global_variables_initializer();
        let ready = g.global_variables().iter().map(|v| g.is_variable_initialized(v.var)).collect();
        let saver = Saver::new(g, None, SaverOptions { max_to_keep: 3 })?;
        g.status()?;
        Ok(Model { x, y, loss, accuracy, global_step, train_op, init, ready, sync, release, saver })
    })
}

fn ro(ms: u64) -> RunOptions {
    RunOptions { timeout_in_ms: ms, ..Default::default() }
}

/// Waits (bounded) until the chief has initialised every global variable.
fn wait_until_ready(s: &dyn Session, m: &Model, deadline: Instant) -> Result<()> {
    loop {
        let flags = s.run(&[], &m.ready, &[], &ro(5_000))?;
        if flags.iter().all(|f| f.bool_values().is_ok_and(|v| v.iter().all(|&b| b))) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::deadline_exceeded("the chief did not initialise the model in time"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs this worker's part of the job against `server` (this task's own server).
pub fn run_worker(server: &Server, task: u32, o: &TrainOptions) -> Result<TrainReport> {
    let g = Graph::new();
    let mut m = build(&g, task, o)?;
    let sess: Arc<dyn Session> =
        Arc::new(RemoteSession::connect(&server.target(), &g, SessionOptions::default())?);
    let chief = task == 0;
    if chief {
        sess.run(&[], &[], &[m.init], &ro(o.step_timeout_ms))?;
    } else {
        wait_until_ready(&*sess, &m, Instant::now() + Duration::from_millis(o.step_timeout_ms))?;
    }
    let coord = Arc::new(Coordinator::new());
    if let Some(ops) = &m.sync {
        let init = if chief { ops.chief_init_op } else { ops.local_step_init_op };
        sess.run(&[], &[], &[init], &ro(o.step_timeout_ms))?;
        if chief {
            let opts = ChiefLoopOptions { round_timeout_in_ms: 2_000, max_rounds: o.steps as u64 + 10 };
            ops.start_chief_loop(sess.clone(), &coord, opts);
        }
    }
    let (images, labels) = load_digits_tfrecords(&digits_files(TRAIN_TFRECORDS))?;
    let mut batches = Minibatches::new(&images, &labels, o.seed + u64::from(task))?;
    let mut events = if chief { Some(FileWriter::new(&o.out_dir.join("events"))?) } else { None };
    let (sent0, recv0) = server.bytes_transferred();
    let t0 = Instant::now();
    let mut report = TrainReport::default();
    loop {
        let (x, y) = batches.next_batch(o.batch_size)?;
        let r =
            sess.run(&[(m.x, x), (m.y, y)], &[m.loss, m.global_step], &[m.train_op], &ro(o.step_timeout_ms));
        let out = match r {
            Ok(v) => v,
            // In sync mode the last round may never come for a worker once the goal is reached.
            Err(e) if e.code == Code::DeadlineExceeded && report.global_step + 1 >= o.steps => break,
            Err(e) => {
                // The chief's update loop may have failed first: its error is the cause.
                coord.request_stop(None);
                if let Err(cause) = coord.join(Duration::from_secs(2)) {
                    return Err(cause.context(format!("worker {task}: the chief's update loop failed")));
                }
                return Err(e.context(format!("worker {task} at local step {}", report.local_steps)));
            }
        };
        report.local_steps += 1;
        report.final_loss = out[0].scalar_value::<f32>()?;
        report.global_step = out[1].scalar_value::<i64>()?;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        report.examples_per_sec = report.local_steps as f64 * o.batch_size as f64 / secs;
        if report.local_steps % o.log_every == 0 || report.global_step >= o.steps {
            println!(
                "PROGRESS task={task} step={} loss={:.4} examples_per_sec={:.0}",
                report.global_step, report.final_loss, report.examples_per_sec
            );
            if let Some(w) = events.as_mut() {
                w.add_scalar("loss", report.final_loss, report.global_step)?;
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
        let traced = RunOptions { trace_level: TraceLevel::FullTrace, ..ro(o.step_timeout_ms) };
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
        let ckpt_dir = o.out_dir.join("checkpoints");
        std::fs::create_dir_all(&ckpt_dir)?;
        report.checkpoint = Some(m.saver.save(&*sess, &ckpt_dir.join("model"), Some(report.global_step))?);
        let _ = coord.join(Duration::from_secs(5));
    }
    Ok(report)
}
