//! Asynchronous training policies: staleness measured against the global step read with the
//! parameters (dropped beyond `max_staleness`, or the learning rate scaled by 1/(1+s)), the
//! chief-only warm-up, the staleness histogram in TensorBoard events, two workers training
//! asynchronously on a cluster on 127.0.0.1; and half-precision transfer halving the bytes a
//! worker moves per step while training still converges.

use rill_graph::*;
use rill_train::summary::{decode_event, read_records};
use rill_train::*;
use rill_transport::{ClusterSpec, RemoteSession, Server, ServerDef};

fn ro() -> RunOptions {
    RunOptions { timeout_in_ms: 20_000, ..Default::default() }
}

fn local(g: &Graph) -> DirectSession {
    DirectSession::new(g, &standard_runtime(), SessionOptions::default()).unwrap()
}

/// `w` (init 1) minimising (w·x)²/2 with x = 1: the gradient is `w`.
struct Tiny {
    w: Output,
    gs: Output,
    ops: AsyncOps,
    init: Output,
    set_gs: (Output, Output),
}

fn tiny(policy: AsyncPolicy, is_chief: bool) -> (Graph, Tiny) {
    let g = Graph::new();
    let gs = create_global_step(&g).unwrap();
    let w = g.variable("w", g.scalar(1f32));
    let loss = g.mul(g.scalar(0.5f32), g.square(w));
    let opt = AsyncReplicasOptimizer::new(GradientDescent::new(0.5), policy, is_chief);
    opt.minimize(&g, loss, Some(gs)).unwrap();
    let ops = opt.async_ops().unwrap();
    let v = g.placeholder("gs_value", DType::I64, PartialShape::scalar());
    let set = g.assign(gs, v);
    let init = g.global_variables_initializer();
    g.status().unwrap();
    (g, Tiny { w, gs, ops, init, set_gs: (v, set) })
}

fn set_gs(s: &DirectSession, t: &Tiny, v: i64) {
    s.run(&[(t.set_gs.0, Tensor::scalar(v))], &[], &[t.set_gs.1], &ro()).unwrap();
}

/// One step whose gradients were computed at global step `read`; returns (w, gs, staleness).
fn step(s: &DirectSession, t: &Tiny, read: i64) -> (f32, i64, i64) {
    let out = s
        .run(&[(t.ops.global_step_read, Tensor::scalar(read))], &[t.ops.staleness], &[t.ops.train_op], &ro())
        .unwrap();
    let st = out[0].scalar_value::<i64>().unwrap();
    let now = s.run(&[], &[t.w, t.gs], &[], &ro()).unwrap();
    (now[0].scalar_value::<f32>().unwrap(), now[1].scalar_value::<i64>().unwrap(), st)
}

#[test]
fn stale_gradients_are_dropped_or_scaled() {
    let policy = AsyncPolicy { max_staleness: Some(2), ..AsyncPolicy::default() };
    let (g, t) = tiny(policy, true);
    let s = local(&g);
    s.run(&[], &[], &[t.init], &ro()).unwrap();
    set_gs(&s, &t, 10);
    // Fresh: w = 1 - 0.5·1, the global step advances.
    assert_eq!(step(&s, &t, 10), (0.5, 11, 0));
    // Staleness 2 is still applied; 3 is dropped and leaves w and the step alone.
    assert_eq!(step(&s, &t, 9), (0.25, 12, 2));
    assert_eq!(step(&s, &t, 9), (0.25, 12, 3));

    let policy = AsyncPolicy { scale_by_staleness: true, ..AsyncPolicy::default() };
    let (g, t) = tiny(policy, false);
    let s = local(&g);
    s.run(&[], &[], &[t.init], &ro()).unwrap();
    set_gs(&s, &t, 4);
    // Staleness 3: the rate is 0.5 / 4, so w = 1 - 0.125.
    let (w, gs, st) = step(&s, &t, 1);
    assert_eq!((gs, st), (5, 3));
    assert!((w - 0.875).abs() < 1e-6, "{w}");
    // Without a fed read, the step reads the global step itself: staleness 0 in one session.
    let out = s.run(&[], &[t.ops.staleness, t.ops.lr_factor], &[t.ops.train_op], &ro()).unwrap();
    assert_eq!(out[0].scalar_value::<i64>().unwrap(), 0);
    assert_eq!(out[1].scalar_value::<f32>().unwrap(), 1.0);
}

#[test]
fn only_the_chief_applies_during_the_warm_up() {
    let policy = AsyncPolicy { warmup_steps: 3, warmup_lr_scale: 0.5, ..AsyncPolicy::default() };
    let (g, t) = tiny(policy, false);
    let s = local(&g);
    s.run(&[], &[], &[t.init], &ro()).unwrap();
    // A non-chief step during the warm-up changes nothing.
    assert_eq!(step(&s, &t, 0), (1.0, 0, 0));
    set_gs(&s, &t, 3);
    assert_eq!(step(&s, &t, 3), (0.5, 4, 0));

    let (g, t) = tiny(policy, true);
    let s = local(&g);
    s.run(&[], &[], &[t.init], &ro()).unwrap();
    // The chief applies at half the rate during the warm-up, at the full rate after.
    assert_eq!(step(&s, &t, 0), (0.75, 1, 0));
    set_gs(&s, &t, 3);
    assert_eq!(step(&s, &t, 3), (0.375, 4, 0));
    assert!(AsyncReplicasOptimizer::new(
        GradientDescent::new(0.1),
        AsyncPolicy { warmup_lr_scale: f64::NAN, ..AsyncPolicy::default() },
        true
    )
    .minimize(&Graph::new(), Graph::new().scalar(1f32), None)
    .is_err());
}

fn cluster(ps: usize, workers: usize) -> (Vec<Server>, Vec<Server>) {
    let port = || format!("127.0.0.1:{}", rill_transport::cluster::free_loopback_port().unwrap());
    let p: Vec<String> = (0..ps).map(|_| port()).collect();
    let w: Vec<String> = (0..workers).map(|_| port()).collect();
    let spec = ClusterSpec::parse(&format!("ps={};worker={}", p.join(","), w.join(","))).unwrap();
    let start = |job: &str, task: u32| {
        let mut def = ServerDef::new(spec.clone(), job, task).unwrap();
        def.default_session_options.inter_op_parallelism_threads = 2;
        def.default_session_options.intra_op_parallelism_threads = 1;
        Server::start(def, standard_runtime()).unwrap()
    };
    (
        (0..ps as u32).map(|t| start("ps", t)).collect(),
        (0..workers as u32).map(|t| start("worker", t)).collect(),
    )
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

struct Mlp {
    loss: Output,
    train: Output,
    init: Output,
    gs: Output,
    staleness: Option<Output>,
}

/// A 64-256-4 MLP with a constant batch (labels from the sign pattern of two inputs), its
/// variables on the ps; `half` sends gradients at that precision, and reads the parameters
/// through it with `half_params`.
fn mlp(g: &Graph, task: u32, half: Option<DType>, half_params: bool, policy: Option<AsyncPolicy>) -> Mlp {
    g.with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(1, task)), |g| {
        let gs = create_global_step(g).unwrap();
        let xs = values(32 * 64, 5);
        let ys: Vec<i64> = xs.chunks(64).map(|r| i64::from(r[0] > 0.0) * 2 + i64::from(r[1] > 0.0)).collect();
        let x = g.constant(Tensor::new([32, 64], &xs).unwrap());
        let y = g.constant(Tensor::vector(&ys));
        let read = |v: Output| match half {
            Some(d) if half_params => read_half(g, v, d).unwrap(),
            _ => v,
        };
        let scaled =
            |n: usize, seed: u64, k: f32| values(n, seed).iter().map(|v| v * k).collect::<Vec<f32>>();
        let w1 = g.variable("w1", g.constant(Tensor::new([64, 256], &scaled(64 * 256, 6, 0.2)).unwrap()));
        let w1 = read(w1);
        let b1 = g.variable("b1", g.zeros([256]));
        let w2 = g.variable("w2", g.constant(Tensor::new([256, 4], &scaled(256 * 4, 7, 0.1)).unwrap()));
        let w2 = read(w2);
        let h = g.relu(g.bias_add(g.matmul(x, w1), read(b1)));
        let logits = g.matmul(h, w2);
        let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, y).0, &[], false);
        let gd = GradientDescent::new(0.5);
        let (train, staleness) = match (half, policy) {
            (Some(d), _) => (HalfTransfer::new(gd, d).minimize(g, loss, Some(gs)).unwrap(), None),
            (None, Some(p)) => {
                let opt = AsyncReplicasOptimizer::new(gd, p, task == 0);
                let t = opt.minimize(g, loss, Some(gs)).unwrap();
                (t, Some(opt.async_ops().unwrap().staleness))
            }
            (None, None) => (gd.minimize(g, loss, Some(gs)).unwrap(), None),
        };
        let init = g.global_variables_initializer();
        g.status().unwrap();
        Mlp { loss, train, init, gs, staleness }
    })
}

#[test]
fn two_async_workers_record_their_staleness_in_a_histogram() {
    let (_ps, workers) = cluster(1, 2);
    let policy = AsyncPolicy { max_staleness: Some(8), scale_by_staleness: true, ..AsyncPolicy::default() };
    let dir = std::env::temp_dir().join(format!("rill-staleness-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    const STEPS: usize = 40;
    let g0 = Graph::new();
    let m0 = mlp(&g0, 0, None, false, Some(policy));
    let s0 = RemoteSession::connect(&workers[0].target(), &g0, SessionOptions::default()).unwrap();
    s0.run(&[], &[], &[m0.init], &ro()).unwrap();
    let l0 = s0.run(&[], &[m0.loss], &[], &ro()).unwrap()[0].scalar_value::<f32>().unwrap();
    let target = workers[1].target();
    let other = std::thread::spawn(move || {
        let g = Graph::new();
        let m = mlp(&g, 1, None, false, Some(policy));
        let s = RemoteSession::connect(&target, &g, SessionOptions::default()).unwrap();
        let mut applied = Vec::new();
        for _ in 0..STEPS {
            let out = s.run(&[], &[m.staleness.unwrap()], &[m.train], &ro()).unwrap();
            applied.push(out[0].scalar_value::<i64>().unwrap());
        }
        applied
    });
    let mut hist = staleness_histogram();
    let mut w = FileWriter::new(&dir).unwrap();
    for i in 0..STEPS {
        let out = s0.run(&[], &[m0.staleness.unwrap(), m0.gs], &[m0.train], &ro()).unwrap();
        let st = out[0].scalar_value::<i64>().unwrap();
        assert!(st >= 0, "staleness is never negative: {st}");
        hist.add(st as f64);
        if i % 10 == 9 {
            w.add_histogram("staleness", &hist, out[1].scalar_value::<i64>().unwrap()).unwrap();
        }
    }
    let theirs = other.join().unwrap();
    assert!(theirs.iter().all(|&s| s >= 0));
    w.flush().unwrap();
    let out = s0.run(&[], &[m0.loss, m0.gs], &[], &ro()).unwrap();
    let (l1, gs) = (out[0].scalar_value::<f32>().unwrap(), out[1].scalar_value::<i64>().unwrap());
    assert!(l1 < 0.7 * l0, "training converges: {l0} -> {l1}");
    // Every step within the policy's bound was applied and counted once.
    let kept = |v: &[i64]| v.iter().filter(|&&s| s <= 8).count() as i64;
    assert_eq!(gs, kept(&theirs) + hist.bucket[..=8].iter().sum::<f64>() as i64);
    // The histogram is in the events, with every step of this worker.
    let bytes = std::fs::read(w.path()).unwrap();
    let events: Vec<_> = read_records(&bytes).unwrap().iter().map(|r| decode_event(r).unwrap()).collect();
    let hs: Vec<_> = events.iter().flat_map(|e| e.histograms.clone()).collect();
    assert_eq!(hs.len(), STEPS / 10);
    let (tag, last) = hs.last().unwrap();
    assert_eq!(tag, "staleness");
    assert_eq!(last, &hist);
    assert_eq!(last.num, STEPS as f64);
    assert_eq!(last.bucket.iter().sum::<f64>(), STEPS as f64);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bytes the worker server moved per step over `steps` steps, and the loss before and after.
fn bytes_per_step(half: Option<DType>, steps: usize) -> (f64, f32, f32) {
    bytes_per_step_with(half, true, steps)
}

fn bytes_per_step_with(half: Option<DType>, half_params: bool, steps: usize) -> (f64, f32, f32) {
    let (_ps, workers) = cluster(1, 1);
    let g = Graph::new();
    let m = mlp(&g, 0, half, half_params, None);
    let s = RemoteSession::connect(&workers[0].target(), &g, SessionOptions::default()).unwrap();
    s.run(&[], &[], &[m.init], &ro()).unwrap();
    let l0 = s.run(&[], &[m.loss], &[], &ro()).unwrap()[0].scalar_value::<f32>().unwrap();
    // The first step registers the graphs; count the steady state.
    s.run(&[], &[], &[m.train], &ro()).unwrap();
    // Socket bytes plus tensor bytes through shared memory (same-host peers use it).
    let moved = |w: &Server| {
        let ((s, r), (wr, l)) = (w.bytes_transferred(), w.shm_bytes_transferred());
        s + r + wr + l
    };
    let before = moved(&workers[0]);
    for _ in 0..steps {
        s.run(&[], &[], &[m.train], &ro()).unwrap();
    }
    let after = moved(&workers[0]);
    let l1 = s.run(&[], &[m.loss], &[], &ro()).unwrap()[0].scalar_value::<f32>().unwrap();
    ((after - before) as f64 / steps as f64, l0, l1)
}

#[test]
fn half_precision_transfer_halves_the_bytes_per_step() {
    let (full, f0, f1) = bytes_per_step(None, 30);
    // Parameters and gradients of 64·256 + 256 + 256·4 floats, each way.
    let floats = (64 * 256 + 256 + 256 * 4) as f64;
    assert!(full > 2.0 * 4.0 * floats, "f32 moves both ways: {full} bytes/step");
    for wire in [DType::F16, DType::BF16] {
        let (half, h0, h1) = bytes_per_step(Some(wire), 30);
        let ratio = half / full;
        assert!((0.45..0.6).contains(&ratio), "{wire}: {half} vs {full} bytes/step ({ratio:.3})");
        assert!((h0 - f0).abs() < 0.01, "{wire}: about the same start: {h0} vs {f0}");
        assert!(
            h1 < 0.5 * h0 && (h1 - f1).abs() < 0.05 + 0.1 * f1,
            "{wire}: converges: {h0} -> {h1} (f32 {f1})"
        );
    }
    assert!(f1 < 0.5 * f0, "f32 converges: {f0} -> {f1}");
    // Gradients alone at half precision (parameters read in f32): about three quarters.
    let (grads_only, _, g1) = bytes_per_step_with(Some(DType::F16), false, 30);
    let ratio = grads_only / full;
    assert!((0.7..0.8).contains(&ratio), "gradients only: {grads_only} vs {full} bytes/step ({ratio:.3})");
    assert!(g1 < 0.5 * f0, "gradients only: converges: {f0} -> {g1}");
}

#[test]
fn a_train_op_waits_for_each_ps_task_through_one_edge() {
    let g = Graph::new();
    let (train, with_step) =
        g.with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(2, 0)), |g| {
            let vars: Vec<Output> = (0..4).map(|i| g.variable(&format!("v{i}"), g.ones([3]))).collect();
            let loss =
                g.add_n(&vars.iter().map(|&v| g.reduce_sum(g.square(v), &[], false)).collect::<Vec<_>>());
            let train = GradientDescent::new(0.1).minimize(g, loss, None).unwrap();
            let gs = create_global_step(g).unwrap();
            let with_step = GradientDescent::new(0.1).minimize(g, loss, Some(gs)).unwrap();
            (train, with_step)
        });
    // Two variables on each ps task: one grouped edge from each task.
    let deps = g.node(train.node).control_inputs;
    let devices: Vec<String> = deps.iter().map(|&d| g.node(d).device).collect();
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert!(devices[0].contains("/job:ps/task:0") && devices[1].contains("/job:ps/task:1"), "{devices:?}");
    // With a global step, the increment (after every update) is the only dependency.
    let deps = g.node(with_step.node).control_inputs;
    assert_eq!(deps.len(), 1);
    assert_eq!(g.node(deps[0]).op, "AssignAdd");
}

#[test]
fn the_apply_time_read_of_the_step_waits_for_the_start_read() {
    // A thread that sent the parameters can be preempted before it reads the global step; the
    // apply-time read must still come after it, or another worker's update in between would
    // make the staleness negative.
    let (g, t) = tiny(AsyncPolicy::default(), true);
    let staleness = g.node(t.ops.staleness.node);
    let now = staleness.inputs[0].node;
    assert_eq!(staleness.inputs[1], t.ops.global_step_read);
    assert!(g.node(now).control_inputs.contains(&t.ops.global_step_read.node), "{:?}", g.node(now));
}
