//! Between-graph replication on a cluster in one process (1 ps, 2 or 3 workers on 127.0.0.1):
//! every worker builds the same graph under `replica_device_setter` and trains through its own
//! `RemoteSession`. Synchronous training (`SyncReplicasOptimizer`) advances the global step once
//! per aggregated set of gradients and keeps going when a spare replica leaves; asynchronous
//! training applies every gradient. A stop ends the chief's loop at once, not when the round it
//! waits in reaches its deadline.

use rill_graph::*;
use rill_queues::Coordinator;
use rill_train::*;
use rill_transport::{ClusterSpec, RemoteSession, Server, ServerDef};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

/// A ps and `workers` worker servers on loopback.
fn start_cluster(workers: usize) -> (Server, Vec<Server>) {
    let ws: Vec<String> = (0..workers).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let spec = ClusterSpec::parse(&format!("ps=127.0.0.1:{};worker={}", free_port(), ws.join(","))).unwrap();
    let start = |job: &str, task: u32| {
        let mut def = ServerDef::new(spec.clone(), job, task).unwrap();
        def.default_session_options.inter_op_parallelism_threads = 2;
        def.default_session_options.intra_op_parallelism_threads = 1;
        Server::start(def, standard_runtime()).unwrap()
    };
    (start("ps", 0), (0..workers as u32).map(|t| start("worker", t)).collect())
}

/// The chief loop's round deadline in these tests.
const ROUND_TIMEOUT_MS: u64 = 2_000;

fn ro(ms: u64) -> RunOptions {
    RunOptions { timeout_in_ms: ms, ..Default::default() }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

const BATCH: usize = 32;

/// A batch of 2-D points labelled by the side of the line x0 + x1 = 0 they fall on.
fn batch(seed: u64) -> (Tensor, Tensor) {
    let p = values(BATCH * 2, seed);
    let labels: Vec<i32> = p.chunks(2).map(|q| i32::from(q[0] + q[1] > 0.0)).collect();
    (Tensor::new([BATCH, 2], &p).unwrap(), Tensor::vector(&labels))
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Async,
    Sync { aggregate: usize, total: usize },
}

struct Model {
    x: Output,
    y: Output,
    loss: Output,
    global_step: Output,
    train_op: Output,
    init: Output,
    ready: Vec<Output>,
    sync: Option<SyncReplicasOps>,
    /// Releases every waiting worker at the end (tokens for all replicas).
    release: Option<Output>,
}

/// The graph every worker builds: logistic regression, variables on the ps.
fn build(g: &Graph, task: u32, mode: Mode) -> Model {
    g.with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(1, task)), |g| {
        let global_step = create_global_step(g).unwrap();
        let x = g.placeholder("x", DType::F32, [None, Some(2)]);
        let y = g.placeholder("y", DType::I32, [None]);
        let w = g.variable("w", g.zeros([2, 2]));
        let b = g.variable("b", g.zeros([2]));
        let logits = g.bias_add(g.matmul(x, w), b);
        let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, y).0, &[], false);
        let (train_op, sync, release) = match mode {
            Mode::Async => {
                (GradientDescent::new(1.0).minimize(g, loss, Some(global_step)).unwrap(), None, None)
            }
            Mode::Sync { aggregate, total } => {
                let opt = SyncReplicasOptimizer::new(GradientDescent::new(1.0), aggregate, total);
                let train = opt.minimize(g, loss, Some(global_step)).unwrap();
                let ops = opt.sync_ops().unwrap();
                let release = ops.init_tokens_op(g, Some(total)).unwrap();
                (train, Some(ops), Some(release))
            }
        };
        let init = g.global_variables_initializer();
        let ready = g.global_variables().iter().map(|v| g.is_variable_initialized(v.var)).collect();
        g.status().unwrap();
        Model { x, y, loss, global_step, train_op, init, ready, sync, release }
    })
}

fn eval_loss(s: &dyn Session, m: &Model) -> f32 {
    let (x, y) = batch(7);
    s.run(&[(m.x, x), (m.y, y)], &[m.loss], &[], &ro(5_000)).unwrap()[0].scalar_value().unwrap()
}

/// Waits (bounded) until the chief has initialised every global variable.
fn wait_until_ready(s: &dyn Session, m: &Model) {
    for _ in 0..200 {
        let flags = s.run(&[], &m.ready, &[], &ro(5_000)).unwrap();
        if flags.iter().all(|f| f.bool_values().unwrap().iter().all(|&b| b)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the chief did not initialise the model within 4 s");
}

/// What a worker saw.
#[derive(Debug)]
struct Report {
    steps: usize,
    loss_before: f32,
    loss_after: f32,
    global_step: i64,
    chief_loop: Option<ChiefLoop>,
    /// Rounds of the chief's loop once it has ended.
    chief_rounds: Option<u64>,
    /// From the stop request after the workers finished until every coordinated thread ended.
    stop_took: Duration,
}

/// How long a worker trains.
#[derive(Clone, Copy, Debug)]
enum Until {
    /// Exactly this many steps.
    Steps(usize),
    /// Until the global step reaches `goal` (or a stop is requested), at most `max` steps.
    GlobalStep { goal: i64, max: usize },
}

fn worker(target: String, task: u32, mode: Mode, until: Until, coord: Arc<Coordinator>) -> Report {
    let g = Graph::new();
    let m = build(&g, task, mode);
    let sess: Arc<dyn Session> =
        Arc::new(RemoteSession::connect(&target, &g, SessionOptions::default()).unwrap());
    let chief = task == 0;
    let mut chief_loop = None;
    if chief {
        sess.run(&[], &[], &[m.init], &ro(5_000)).unwrap();
    } else {
        wait_until_ready(&*sess, &m);
    }
    if let Some(ops) = &m.sync {
        let init = if chief { ops.chief_init_op } else { ops.local_step_init_op };
        sess.run(&[], &[], &[init], &ro(5_000)).unwrap();
        if chief {
            let opts = ChiefLoopOptions { round_timeout_in_ms: ROUND_TIMEOUT_MS, max_rounds: 1_000 };
            chief_loop = Some(ops.start_chief_loop(sess.clone(), &coord, opts));
        }
    }
    let loss_before = eval_loss(&*sess, &m);
    let max = match until {
        Until::Steps(n) => n,
        Until::GlobalStep { max, .. } => max,
    };
    let mut steps = 0;
    while steps < max {
        if matches!(until, Until::GlobalStep { .. }) && coord.should_stop() {
            break;
        }
        let (x, y) = batch(1_000 * u64::from(task) + steps as u64);
        let r = sess.run(&[(m.x, x), (m.y, y)], &[m.global_step], &[m.train_op], &ro(8_000));
        let gs = match r {
            Ok(v) => v[0].scalar_value::<i64>().unwrap(),
            // Released by a stop; the last round may never come.
            Err(e) if coord.should_stop() && e.code == Code::DeadlineExceeded => break,
            Err(e) => panic!("worker {task}, step {steps}: {e}"),
        };
        steps += 1;
        if let Until::GlobalStep { goal, .. } = until {
            if gs >= goal {
                coord.request_stop(None);
            }
        }
    }
    if matches!(until, Until::GlobalStep { .. }) {
        // Workers still waiting for a token get one and see the stop.
        if let Some(release) = m.release {
            sess.run(&[], &[], &[release], &ro(5_000)).unwrap();
        }
    }
    let loss_after = eval_loss(&*sess, &m);
    let global_step = sess.run(&[], &[m.global_step], &[], &ro(5_000)).unwrap()[0].scalar_value().unwrap();
    Report {
        steps,
        loss_before,
        loss_after,
        global_step,
        chief_loop,
        chief_rounds: None,
        stop_took: Duration::ZERO,
    }
}

/// Runs one worker thread per `(task, until)` and stops the chief loop once all are done.
fn train(workers: &[Server], mode: Mode, plan: &[Until]) -> Vec<Report> {
    let coord = Coordinator::new();
    let handles: Vec<_> = plan
        .iter()
        .enumerate()
        .map(|(task, &until)| {
            let (target, coord) = (workers[task].target(), coord.clone());
            std::thread::spawn(move || worker(target, task as u32, mode, until, coord))
        })
        .collect();
    let mut reports: Vec<Report> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let stopping = Instant::now();
    coord.request_stop(None);
    coord.join(Duration::from_secs(5)).unwrap();
    let stop_took = stopping.elapsed();
    for r in &mut reports {
        r.chief_rounds = r.chief_loop.as_ref().map(|c| c.rounds());
        r.stop_took = stop_took;
    }
    reports
}

#[test]
fn sync_training_advances_the_global_step_once_per_aggregated_pair() {
    let (_ps, workers) = start_cluster(2);
    const STEPS: usize = 20;
    let mode = Mode::Sync { aggregate: 2, total: 2 };
    let reports = train(&workers, mode, &[Until::Steps(STEPS), Until::Steps(STEPS)]);
    let chief = &reports[0];
    // Every step of each worker waits for a token; a round releases one per worker and needs
    // one fresh gradient from each: 2 × 20 gradients make exactly 20 updates.
    assert_eq!(chief.global_step, STEPS as i64, "{reports:?}");
    assert_eq!(chief.chief_rounds, Some(STEPS as u64), "{reports:?}");
    assert!(chief.loss_after < 0.6 * chief.loss_before, "{reports:?}");
}

/// After its last round the chief's loop always waits in one more, for gradients the finished
/// workers never send: the stop ends that round instead of letting it run to its deadline.
#[test]
fn a_normal_run_ends_without_waiting_out_a_round_deadline() {
    let (_ps, workers) = start_cluster(2);
    const STEPS: usize = 40;
    let mode = Mode::Sync { aggregate: 2, total: 2 };
    let t0 = Instant::now();
    let reports = train(&workers, mode, &[Until::Steps(STEPS), Until::Steps(STEPS)]);
    let took = t0.elapsed();
    let chief = &reports[0];
    assert_eq!(chief.global_step, STEPS as i64, "{reports:?}");
    assert_eq!(chief.chief_rounds, Some(STEPS as u64), "{reports:?}");
    let round_timeout = Duration::from_millis(ROUND_TIMEOUT_MS);
    assert!(chief.stop_took < round_timeout / 4, "the stop took {:?}: {reports:?}", chief.stop_took);
    assert!(took < round_timeout, "{STEPS} global steps took {took:?}: {reports:?}");
}

#[test]
fn async_training_applies_every_gradient() {
    let (_ps, workers) = start_cluster(2);
    const STEPS: usize = 20;
    let reports = train(&workers, Mode::Async, &[Until::Steps(STEPS), Until::Steps(STEPS)]);
    let last = reports.iter().map(|r| r.global_step).max().unwrap();
    assert_eq!(last, 2 * STEPS as i64, "{reports:?}");
    assert!(reports[0].loss_after < 0.6 * reports[0].loss_before, "{reports:?}");
}

#[test]
fn sync_training_with_a_spare_replica_keeps_going_when_one_leaves() {
    let (_ps, workers) = start_cluster(3);
    const GOAL: i64 = 12;
    let mode = Mode::Sync { aggregate: 2, total: 3 };
    let until = Until::GlobalStep { goal: GOAL, max: 100 };
    let reports = train(&workers, mode, &[until, until, Until::Steps(3)]);
    assert_eq!(reports[2].steps, 3, "the spare replica left after 3 steps: {reports:?}");
    let chief = &reports[0];
    assert!(chief.global_step >= GOAL, "{reports:?}");
    // Rounds may go on while the last workers are released, never fewer than the step shows.
    assert!(chief.chief_rounds.unwrap() >= chief.global_step as u64, "{reports:?}");
    assert!(chief.loss_after < 0.6 * chief.loss_before, "{reports:?}");
}

/// A replica whose gradients reach the accumulators one at a time, with a gap longer than the
/// chief's round deadline, still completes the round: no take starts before every accumulator
/// is full, so no gradient is taken and then lost to a cut round.
#[test]
fn a_round_waits_for_gradients_that_arrive_apart_without_losing_any() {
    let g = Graph::new();
    let global_step = create_global_step(&g).unwrap();
    let v0 = g.variable("v0", g.zeros([2]));
    let v1 = g.variable("v1", g.zeros([2]));
    let loss = g.add(g.reduce_sum(v0, &[], false), g.reduce_sum(v1, &[], false));
    let opt = SyncReplicasOptimizer::new(GradientDescent::new(1.0), 2, 2);
    let train_op = opt.minimize(&g, loss, Some(global_step)).unwrap();
    let ops = opt.sync_ops().unwrap();
    // The late replica's gradients, one accumulator at a time, tagged with step 0.
    let (step0, ones) = (g.scalar(0i64), g.fill_dynamic(g.ints(&[2]), g.scalar(1f32)));
    let late: Vec<Output> = ops
        .accumulators
        .iter()
        .map(|&acc| rill_queues::accumulator_apply_gradient(&g, acc, step0, ones))
        .collect();
    let init = g.global_variables_initializer();
    let sess = chief_session(&g, init, &ops);
    let coord = Coordinator::new();
    let opts = ChiefLoopOptions { round_timeout_in_ms: 30, max_rounds: 1 };
    let chief = ops.start_chief_loop(sess.clone(), &coord, opts);
    // The prompt replica: its step applies both gradients, then waits for a token.
    let s = sess.clone();
    let prompt = std::thread::spawn(move || s.run(&[], &[], &[train_op], &ro(10_000)));
    sess.run(&[], &[], &[late[0]], &ro(5_000)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    sess.run(&[], &[], &[late[1]], &ro(5_000)).unwrap();
    prompt.join().unwrap().expect("the prompt replica gets its token");
    // The token is out before the chief's run returns and counts the round.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while chief.rounds() < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(chief.rounds(), 1);
    let out = sess.run(&[], &[global_step, v0, v1], &[], &ro(5_000)).unwrap();
    assert_eq!(out[0].scalar_value::<i64>().unwrap(), 1);
    // Both replicas' gradients (1 each) averaged and applied once: every weight moved by -1.
    assert_eq!(out[1].to_vec::<f32>().unwrap(), vec![-1.0, -1.0]);
    assert_eq!(out[2].to_vec::<f32>().unwrap(), vec![-1.0, -1.0]);
    coord.request_stop(None);
    coord.join(Duration::from_secs(5)).unwrap();
}

/// A stop while the chief's round waits for gradients ends the round at once and takes nothing:
/// the gradients already in stay, the global step is unchanged, and the coordinator sees no error.
#[test]
fn a_stop_ends_a_waiting_round_without_taking_anything() {
    let g = Graph::new();
    let global_step = create_global_step(&g).unwrap();
    let v = g.variable("v", g.zeros([2]));
    let loss = g.reduce_sum(v, &[], false);
    let opt = SyncReplicasOptimizer::new(GradientDescent::new(1.0), 2, 2);
    opt.minimize(&g, loss, Some(global_step)).unwrap();
    let ops = opt.sync_ops().unwrap();
    let acc = ops.accumulators[0];
    let (step0, ones) = (g.scalar(0i64), g.fill_dynamic(g.ints(&[2]), g.scalar(1f32)));
    let one_gradient = rill_queues::accumulator_apply_gradient(&g, acc, step0, ones);
    let count = rill_queues::accumulator_num_accumulated(&g, acc);
    let init = g.global_variables_initializer();
    let sess = chief_session(&g, init, &ops);
    // One replica's gradient of the two the round needs.
    sess.run(&[], &[], &[one_gradient], &ro(5_000)).unwrap();
    let coord = Coordinator::new();
    let opts = ChiefLoopOptions { round_timeout_in_ms: 5_000, max_rounds: 0 };
    let chief = ops.start_chief_loop(sess.clone(), &coord, opts);
    // Long enough for the loop to be waiting in its first round.
    std::thread::sleep(Duration::from_millis(100));
    let stopping = Instant::now();
    coord.request_stop(None);
    coord.join(Duration::from_secs(2)).expect("a clean stop, well before the round's deadline");
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(1), "the stop took {took:?}");
    assert_eq!(chief.rounds(), 0);
    let out = sess.run(&[], &[global_step, count, v], &[], &ro(5_000)).unwrap();
    assert_eq!(out[0].scalar_value::<i64>().unwrap(), 0);
    assert_eq!(out[1].scalar_value::<i32>().unwrap(), 1);
    assert_eq!(out[2].to_vec::<f32>().unwrap(), vec![0.0, 0.0]);
}

/// A local session over `g` with its variables initialised and the chief's state set up.
fn chief_session(g: &Graph, init: Output, ops: &rill_train::SyncReplicasOps) -> Arc<dyn Session> {
    g.status().unwrap();
    let sess: Arc<dyn Session> =
        Arc::new(DirectSession::new(g, &standard_runtime(), SessionOptions::default()).unwrap());
    sess.run(&[], &[], &[init], &ro(5_000)).unwrap();
    sess.run(&[], &[], &[ops.chief_init_op], &ro(5_000)).unwrap();
    sess
}
