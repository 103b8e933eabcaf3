//! Coordinator, QueueRunner and the tf.train input helpers end to end: files through a
//! string_input_producer, readers, decode_csv and shuffle_batch, stopping cleanly after the epochs.

use rill_device_cpu::cpu_runtime;
use rill_graph::{Code, DirectSession, Error, Graph, RunOptions, Session, SessionOptions, Tensor};
use rill_queues::{self as rq, BatchOptions, Coordinator, ProducerOptions};
use std::sync::Arc;
use std::time::Duration;

const GRACE: Duration = Duration::from_secs(5);

fn session(g: &Graph) -> Arc<dyn Session> {
    let rt = cpu_runtime().with_ops(rq::OPS).with_kernels(rq::KERNELS);
    Arc::new(DirectSession::new(g, &rt, SessionOptions::default()).unwrap())
}

#[test]
fn coordinator_rules() {
    let cases: [(&[Option<Error>], Result<(), Code>); 3] = [
        (&[Some(Error::out_of_range("done"))], Ok(())),
        (
            &[Some(Error::invalid_argument("first")), Some(Error::internal("second"))],
            Err(Code::InvalidArgument),
        ),
        (&[None], Ok(())),
    ];
    for (stops, want) in cases {
        let c = Coordinator::new();
        assert!(!c.should_stop());
        // Stops are requested in order (the first error is the one re-raised); the threads
        // only have to be joined.
        for e in stops.iter() {
            c.request_stop(e.clone());
            c.register_thread(std::thread::spawn(|| {}));
        }
        assert!(c.wait_for_stop(GRACE));
        assert_eq!(c.join(GRACE).map_err(|e| e.code), want);
    }
    // A thread that ignores the stop request outlives the grace period.
    let c = Coordinator::new();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    c.register_thread(std::thread::spawn(move || {
        let _ = rx.recv_timeout(GRACE);
    }));
    c.request_stop(None);
    assert_eq!(c.join(Duration::from_millis(20)).unwrap_err().code, Code::Aborted);
    drop(tx);
}

#[test]
fn csv_files_through_shuffle_batch_stop_after_their_epochs() {
    let dir = std::env::temp_dir().join(format!(
        "rill-queues-pipe-{}-{}",
        std::process::id(),
        rill_graph::random_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for f in 0..3 {
        let p = dir.join(format!("part{f}.csv"));
        let body: String = (0..10).map(|i| format!("{},{}.5\n", f * 10 + i, i)).collect();
        std::fs::write(&p, format!("id,x\n{body}")).unwrap();
        files.push(p.display().to_string());
    }
    let g = Graph::new();
    let (file_q, file_qr) = rq::string_input_producer(
        &g,
        &files,
        &ProducerOptions { num_epochs: Some(2), seed: 3, ..Default::default() },
    );
    // Two reader threads (batch_join), each its own reader on the shared file queue.
    let lists: Vec<Vec<rill_graph::Output>> = (0..2)
        .map(|_| {
            let reader = rq::text_line_reader(&g, 1, "");
            let (_, line) = rq::reader_read(&g, reader, file_q);
            rq::decode_csv(&g, line, &[Tensor::scalar(0i64), Tensor::scalar(0f32)], &Default::default())
        })
        .collect();
    let (joined, join_qr) =
        rq::batch_join(&g, &lists, &BatchOptions { batch_size: 1, capacity: 8, ..Default::default() });
    let (batch, shuffle_qr) = rq::shuffle_batch(
        &g,
        &joined,
        5,
        7,
        &BatchOptions {
            batch_size: 4,
            capacity: 20,
            num_threads: 2,
            enqueue_many: true,
            allow_smaller_final_batch: true,
            ..Default::default()
        },
    );
    g.status().unwrap();
    let sess = session(&g);
    let coord = Coordinator::new();
    rq::start_queue_runners(&sess, &coord, &[file_qr, join_qr, shuffle_qr]);
    let mut seen = vec![0; 30];
    let end = loop {
        match sess.run(&[], &batch, &[], &RunOptions { timeout_in_ms: 5_000, ..Default::default() }) {
            Ok(t) => t[0].to_vec::<i64>().unwrap().into_iter().for_each(|id| seen[id as usize] += 1),
            Err(e) => break e,
        }
    };
    assert_eq!(end.code, Code::OutOfRange, "{end}");
    coord.request_stop(None);
    coord.join(GRACE).unwrap();
    assert_eq!(seen, vec![2; 30], "every line once per epoch");
}

#[test]
fn preloaded_data_is_sliced_per_step_and_left_out_of_globals() {
    let g = Graph::new();
    let (data, init) = rq::preload(&g, "dataset", Tensor::vector(&[10i64, 20, 30]));
    assert!(g.global_variables().is_empty() && g.trainable_variables().is_empty());
    let (q, qr) = rq::input_producer(
        &g,
        data,
        &ProducerOptions { num_epochs: Some(1), shuffle: false, ..Default::default() },
    );
    let row = rq::dequeue(&g, q);
    let sess = session(&g);
    sess.run(&[], &[], &[init], &RunOptions::default()).unwrap();
    let coord = Coordinator::new();
    qr.create_threads(&sess, &coord);
    let mut got = Vec::new();
    while let Ok(t) = sess.run(&[], &row, &[], &RunOptions { timeout_in_ms: 5_000, ..Default::default() }) {
        got.push(t[0].scalar_value::<i64>().unwrap());
    }
    coord.join(GRACE).unwrap();
    assert_eq!(got, vec![10, 20, 30]);
}
