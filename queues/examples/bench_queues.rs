//! Queue throughput in the format of ../shared/bench/peer/bench_queues.py: scalar int64 elements,
//! inter = intra = 2 threads, median of repetitions, printed as `RESULT <name> = <value> <unit>`.

use rill_device_cpu::cpu_runtime;
use rill_graph::{
    DType, DirectSession, Graph, Output, PartialShape, RunOptions, Session, SessionOptions, Tensor,
};
use rill_queues as rq;
use std::time::Instant;

/// Elements per enqueue_many / dequeue_many.
const B: usize = 1000;
/// Repetitions per figure; the median is reported.
const REPS: usize = 9;

fn bench(mut f: impl FnMut(), inner: usize) -> Vec<f64> {
    for _ in 0..(inner / 10).max(1) {
        f();
    }
    (0..REPS)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..inner {
                f();
            }
            t0.elapsed().as_secs_f64() / inner as f64
        })
        .collect()
}

fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn line(name: &str, value: f64, unit: &str) {
    println!("RESULT {name} = {value:.0} {unit}");
}

fn session(g: &Graph) -> DirectSession {
    let rt = cpu_runtime().with_ops(rq::OPS).with_kernels(rq::KERNELS);
    let opts = SessionOptions {
        inter_op_parallelism_threads: 2,
        intra_op_parallelism_threads: 2,
        ..Default::default()
    };
    DirectSession::new(g, &rt, opts).expect("session")
}

fn run(s: &DirectSession, fetches: &[Output], targets: &[Output]) {
    s.run(&[], fetches, targets, &RunOptions::default()).expect("bench step");
}

fn single_item() {
    let g = Graph::new();
    let q = rq::fifo_queue(&g, 100_000, &[DType::I64], &[PartialShape::scalar()], &Default::default());
    let enq = rq::enqueue(&g, q, &[g.scalar(7i64)]);
    let deq = rq::dequeue(&g, q);
    let enq2 = rq::enqueue(&g, q, &[g.scalar(7i64)]);
    let both = g.with_control_dependencies(&[enq2], |g| rq::dequeue(g, q));
    let s = session(&g);
    let t1 = med(bench(|| run(&s, &both, &[]), 2000));
    let t2 = med(bench(
        || {
            run(&s, &[], &[enq]);
            run(&s, &deq, &[]);
        },
        1000,
    ));
    line("fifo_int64_enq+deq_same_run", 1.0 / t1, "items/s");
    line("fifo_int64_enq_run_then_deq_run", 1.0 / t2, "items/s");
}

fn many(kind: &str) {
    let g = Graph::new();
    let (t, s) = ([DType::I64], [PartialShape::scalar()]);
    let q = match kind {
        "FIFOQueue" => rq::fifo_queue(&g, 100_000, &t, &s, &Default::default()),
        "RandomShuffleQueue" => rq::random_shuffle_queue(&g, 100_000, 0, &t, &s, 1, &Default::default()),
        _ => rq::padding_fifo_queue(&g, 100_000, &t, &s, &Default::default()),
    };
    let src = g.constant(Tensor::vector(&(0..B as i64).collect::<Vec<_>>()));
    let enq = rq::enqueue_many(&g, q, &[src]);
    let deq = rq::dequeue_many(&g, q, B);
    let both = g.with_control_dependencies(&[enq], |g| rq::dequeue_many(g, q, B));
    let sess = session(&g);
    let t1 = med(bench(|| run(&sess, &both, &[]), 200));
    let t2 = med(bench(
        || {
            run(&sess, &[], &[enq]);
            run(&sess, &deq, &[]);
        },
        200,
    ));
    for _ in 0..60 {
        run(&sess, &[], &[enq]);
    }
    let td = med(bench(|| run(&sess, &deq, &[]), 5));
    let b = B as f64;
    line(&format!("{kind}_int64_enq_many+deq_many{B}_same_run"), b / t1, "items/s");
    line(&format!("{kind}_int64_enq_many_run_then_deq_many_run{B}"), b / t2, "items/s");
    line(&format!("{kind}_int64_dequeue_many{B}_only"), b / td, "items/s");
}

fn main() {
    single_item();
    for k in ["FIFOQueue", "RandomShuffleQueue", "PaddingFIFOQueue"] {
        many(k);
    }
}
