//! Between-graph training of the digits model on a 1 ps + 2 worker loopback cluster in one
//! process, synchronous and asynchronous, to the accuracy target; the chief writes its files.

use rill_train::job::{run_worker, Mode, TrainOptions};
use rill_train::standard_runtime;
use rill_transport::{ClusterSpec, Server, ServerDef};

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

fn train(mode: Mode) -> (f32, Vec<i64>) {
    let spec = ClusterSpec::parse(&format!(
        "ps=127.0.0.1:{};worker=127.0.0.1:{},127.0.0.1:{}",
        free_port(),
        free_port(),
        free_port()
    ))
    .unwrap();
    let start = |job: &str, task: u32| {
        let mut def = ServerDef::new(spec.clone(), job, task).unwrap();
        def.default_session_options.inter_op_parallelism_threads = 2;
        def.default_session_options.intra_op_parallelism_threads = 1;
        Server::start(def, standard_runtime()).unwrap()
    };
    let _ps = start("ps", 0);
    let workers: Vec<Server> = (0..2).map(|t| start("worker", t)).collect();
    let out =
        std::env::temp_dir().join(format!("rill-job-{}-{}", std::process::id(), rill_graph::random_u64()));
    let opts = TrainOptions { mode, steps: 500, out_dir: out.clone(), log_every: 1000, ..Default::default() };
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
    (chief.test_accuracy.unwrap(), reports.iter().map(|r| r.global_step).collect())
}

#[test]
fn sync_and_async_training_reach_the_accuracy_target() {
    for mode in [Mode::Sync, Mode::Async] {
        let (acc, steps) = train(mode);
        assert!(acc >= 0.95, "{mode:?}: test accuracy {acc}");
        assert!(steps.iter().all(|&s| s >= 499), "{mode:?}: {steps:?}");
    }
}
