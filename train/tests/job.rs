//! Between-graph training of the digits model on a 1 ps + 2 worker loopback cluster in one
//! process, synchronous and asynchronous, to the accuracy target; the chief writes its files.
//! Gradients at half precision halve their share of the bytes on the wire, and async workers
//! report the staleness of their gradients.

use rill_train::job::{run_worker, Mode, TrainOptions, TrainReport};
use rill_train::standard_runtime;
use rill_transport::{ClusterSpec, Server, ServerDef};

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

fn train(opts: TrainOptions) -> Vec<TrainReport> {
    let workers: Vec<String> = (0..opts.workers).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let spec =
        ClusterSpec::parse(&format!("ps=127.0.0.1:{};worker={}", free_port(), workers.join(","))).unwrap();
    let start = |job: &str, task: u32| {
        let mut def = ServerDef::new(spec.clone(), job, task).unwrap();
        def.default_session_options.inter_op_parallelism_threads = 2;
        def.default_session_options.intra_op_parallelism_threads = 1;
        Server::start(def, standard_runtime()).unwrap()
    };
    let _ps = start("ps", 0);
    let workers: Vec<Server> = (0..opts.workers as u32).map(|t| start("worker", t)).collect();
    let out =
        std::env::temp_dir().join(format!("rill-job-{}-{}", std::process::id(), rill_graph::random_u64()));
    let opts = TrainOptions { out_dir: out.clone(), ..opts };
    let reports: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(t, w)| {
                let o = opts.clone();
                s.spawn(move || run_worker(w, t as u32, &o))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    let chief = &reports[0];
    assert!(chief.trace.as_ref().unwrap().exists() && chief.checkpoint.as_ref().unwrap().exists());
    assert!(std::fs::read_dir(chief.events.as_ref().unwrap()).unwrap().count() > 0);
    std::fs::remove_dir_all(&out).unwrap();
    reports
}

fn options(mode: Mode) -> TrainOptions {
    TrainOptions { mode, steps: 500, log_every: 1000, ..Default::default() }
}

/// The chief's test accuracy and bytes per step; every worker reached the last step.
fn check(what: &str, reports: &[TrainReport]) -> (f32, f64) {
    let acc = reports[0].test_accuracy.unwrap();
    assert!(acc >= 0.95, "{what}: test accuracy {acc}");
    assert!(reports.iter().all(|r| r.global_step >= 499), "{what}: {reports:?}");
    (acc, reports[0].bytes_per_step)
}

#[test]
fn sync_and_async_training_reach_the_accuracy_target() {
    check("sync", &train(options(Mode::Sync)));
    let plain = train(options(Mode::Async));
    let (_, plain_bytes) = check("async", &plain);
    let staleness = plain[0].staleness.as_ref().expect("async workers measure staleness");
    // One sample per step of the chief, however the two workers shared the 500 steps.
    assert_eq!(staleness.num, plain[0].local_steps as f64, "{staleness:?}");
    assert!(staleness.min >= 0.0, "{staleness:?}");

    let half = TrainOptions { half_transfer: Some(rill_graph::DType::F16), ..options(Mode::Async) };
    let (_, half_bytes) = check("async, f16 gradients", &train(half));
    // Parameters still travel as f32: gradients are about half of the bytes.
    assert!(half_bytes < 0.85 * plain_bytes, "f16 gradients: {half_bytes} vs {plain_bytes} bytes per step");
}

/// A sync worker stops at the goal, not one step past it: the global step it fetches is read
/// before the round its own gradient completes, so it reads it again (as `StopAtStepHook`). With
/// one worker every local step is one round, so a step past the goal would show as step 61.
#[test]
fn a_sync_worker_stops_at_the_goal() {
    let reports = train(TrainOptions { workers: 1, steps: 60, ..options(Mode::Sync) });
    assert_eq!((reports[0].global_step, reports[0].local_steps), (60, 60), "{reports:?}");
}
