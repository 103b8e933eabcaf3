//! `MonitoredSession` on a cluster in one process: the chief saves checkpoints every N steps and,
//! when the ps restarts (losing its variables), recreates its session and restores the latest
//! checkpoint, so the global step resumes from the saved value; a non-chief waits for the chief.

use rill_graph::*;
use rill_train::*;
use rill_transport::{ClusterSpec, RemoteSession, Server, ServerDef};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

fn start(spec: &ClusterSpec, job: &str, task: u32) -> Server {
    let mut def = ServerDef::new(spec.clone(), job, task).unwrap();
    def.default_session_options.inter_op_parallelism_threads = 2;
    def.default_session_options.intra_op_parallelism_threads = 1;
    Server::start(def, standard_runtime()).unwrap()
}

fn cluster() -> ClusterSpec {
    ClusterSpec::parse(&format!("ps=127.0.0.1:{};worker=127.0.0.1:{}", free_port(), free_port())).unwrap()
}

fn ro() -> RunOptions {
    RunOptions { timeout_in_ms: 5_000, ..Default::default() }
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rill-{tag}-{}-{:x}", std::process::id(), random_u64()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Model {
    x: Output,
    y: Output,
    loss: Output,
    w: Output,
    global_step: Output,
    train_op: Output,
}

/// Least squares on y = 2·x0 − x1, variables and the global step on the ps.
fn build(g: &Graph) -> Model {
    g.with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(1, 0)), |g| {
        let global_step = create_global_step(g).unwrap();
        let x = g.placeholder("x", DType::F32, [None, Some(2)]);
        let y = g.placeholder("y", DType::F32, [None, Some(1)]);
        let w = g.variable("w", g.zeros([2, 1]));
        let loss = g.reduce_mean(g.square(g.sub(g.matmul(x, w), y)), &[], false);
        let train_op = GradientDescent::new(0.2).minimize(g, loss, Some(global_step)).unwrap();
        g.status().unwrap();
        Model { x, y, loss, w, global_step, train_op }
    })
}

fn feeds(m: &Model) -> Vec<(Output, Tensor)> {
    let x = [1f32, 0., 0., 1., 1., 1., -1., 2.];
    let y: Vec<f32> = x.chunks(2).map(|p| 2.0 * p[0] - p[1]).collect();
    vec![(m.x, Tensor::new([4, 2], &x).unwrap()), (m.y, Tensor::new([4, 1], &y).unwrap())]
}

fn factory(target: String) -> SessionFactory {
    Box::new(move |g| {
        Ok(Arc::new(RemoteSession::connect(&target, g, SessionOptions::default())?) as Arc<dyn Session>)
    })
}

fn scalar<T: Element>(s: &dyn Session, o: Output) -> T {
    s.run(&[], &[o], &[], &ro()).unwrap()[0].scalar_value().unwrap()
}

#[test]
fn the_chief_recovers_a_restarted_ps_from_the_latest_checkpoint() {
    let spec = cluster();
    let ps = start(&spec, "ps", 0);
    let worker = start(&spec, "worker", 0);
    let dir = temp_dir("monitored");
    let g = Graph::new();
    let m = build(&g);
    let opts = MonitoredSessionOptions {
        is_chief: true,
        checkpoint_dir: Some(dir.clone()),
        save_checkpoint_steps: 5,
        recovery_timeout_ms: 8_000,
        ..Default::default()
    };
    let ms = MonitoredSession::new(&g, Scaffold::default(), factory(worker.target()), opts).unwrap();
    let f = feeds(&m);
    let loss_before: f32 = ms.run(&f, &[m.loss], &[], &ro()).unwrap()[0].scalar_value().unwrap();
    for _ in 0..12 {
        ms.run(&f, &[], &[m.train_op], &ro()).unwrap();
    }
    assert_eq!(scalar::<i64>(&ms, m.global_step), 12);
    let ckpt = latest_checkpoint(&dir).unwrap().expect("the chief saved a checkpoint");
    let saved = rill_train::saver::read_checkpoint(&ckpt).unwrap();
    let saved_step = saved["global_step"].scalar_value::<i64>().unwrap();
    assert!((5..=12).contains(&saved_step), "saved at step {saved_step}");

    // The ps goes away and comes back empty on the same address a little later.
    drop(ps);
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        start(&spec, "ps", 0)
    });
    let t0 = Instant::now();
    ms.run(&f, &[], &[m.train_op], &ro()).unwrap();
    let _ps = restarter.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(8), "recovery took {:?}", t0.elapsed());
    assert_eq!(ms.recoveries(), 1);
    // Restored, then the retried step: the global step resumes from the checkpoint, not from 0.
    assert_eq!(scalar::<i64>(&ms, m.global_step), saved_step + 1);
    let loss_after: f32 = ms.run(&f, &[m.loss], &[], &ro()).unwrap()[0].scalar_value().unwrap();
    assert!(loss_after < 0.5 * loss_before, "the model kept its training: {loss_before} -> {loss_after}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_non_chief_waits_until_the_chief_has_initialised_the_model() {
    let spec = cluster();
    let (_ps, worker) = (start(&spec, "ps", 0), start(&spec, "worker", 0));
    let target = worker.target();
    // Alone, a non-chief gives up at its deadline.
    let g = Graph::new();
    build(&g);
    let short = MonitoredSessionOptions { recovery_timeout_ms: 300, ..Default::default() };
    let e = MonitoredSession::new(&g, Scaffold::default(), factory(target.clone()), short).unwrap_err();
    assert_eq!(e.code, Code::DeadlineExceeded, "{e}");
    // With a chief starting later, it returns once the model is initialised.
    let t = target.clone();
    let non_chief = std::thread::spawn(move || {
        let g = Graph::new();
        let m = build(&g);
        let opts = MonitoredSessionOptions { recovery_timeout_ms: 8_000, ..Default::default() };
        let ms = MonitoredSession::new(&g, Scaffold::default(), factory(t), opts)?;
        ms.run(&[], &[m.w], &[], &ro()).map(|v| v[0].to_vec::<f32>().unwrap())
    });
    std::thread::sleep(Duration::from_millis(200));
    let g = Graph::new();
    build(&g);
    let chief = MonitoredSessionOptions { is_chief: true, ..Default::default() };
    let _ms = MonitoredSession::new(&g, Scaffold::default(), factory(target), chief).unwrap();
    assert_eq!(non_chief.join().unwrap().unwrap(), vec![0.0, 0.0]);
}
