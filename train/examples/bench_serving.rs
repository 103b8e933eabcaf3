//! Serving throughput: the digits MLP replicated on every CPU device of one session, queries of
//! `QUERY_ROWS` images spread by a `Dispatcher` from two client threads (inter-op 2, intra-op 1:
//! a query's kernels run on one core; a replica serves one query at a time, so devices add
//! throughput and extra clients only queue). Prints
//! `RESULT serving_qps[devices=N,clients=C] = <queries/s> queries/s`, the median of `REPS` runs.
//!
//! `cargo run --release -p rill-train --example bench_serving`

use rill_graph::{DType, DirectSession, Graph, Result, RunOptions, Session, SessionOptions, Tensor};
use rill_train::digits::{self, IMAGE_PIXELS, NUM_CLASSES};
use rill_train::models::mlp;
use rill_train::serving::{replicate_model, Dispatcher};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HIDDEN: &[usize] = &[256, 256];
const QUERY_ROWS: usize = 32;
const REPS: usize = 5;
const RUN_TIME: Duration = Duration::from_millis(600);

/// Queries per second of `clients` threads on a session of `devices` replicas: `REPS` timed
/// runs of `RUN_TIME` each after a warm-up, median.
fn qps(devices: usize, clients: usize, query: &Tensor) -> Result<f64> {
    let g = Graph::new();
    let names: Vec<String> = (0..devices).map(|i| format!("/cpu:{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let serving = replicate_model(&g, &names, DType::F32, [None, Some(IMAGE_PIXELS)], |g, x| {
        g.softmax(mlp(g, x, HIDDEN, NUM_CLASSES, 1))
    })?;
    let init = g.global_variables_initializer();
    let opts = SessionOptions {
        device_count: BTreeMap::from([("CPU".to_string(), devices)]),
        inter_op_parallelism_threads: 2,
        intra_op_parallelism_threads: 1,
        ..Default::default()
    };
    let sess: Arc<dyn Session> = Arc::new(DirectSession::new(&g, &rill_train::standard_runtime(), opts)?);
    sess.run(&[], &[], &[init], &RunOptions::default())?;
    sess.run(&[], &[], &[serving.sync], &RunOptions::default())?;
    let d = Arc::new(Dispatcher::new(sess, serving.replicas, RunOptions::default())?);
    // Warm-up: every replica's step plan is built and cached.
    for _ in 0..4 * devices {
        d.infer(query.clone())?;
    }
    let mut runs = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let start = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (d, q) = (d.clone(), query.clone());
                std::thread::spawn(move || -> Result<u64> {
                    let mut n = 0;
                    while start.elapsed() < RUN_TIME {
                        d.infer(q.clone())?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for t in threads {
            total += t.join().map_err(|_| rill_graph::Error::internal("a client thread panicked"))??;
        }
        runs.push(total as f64 / start.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[REPS / 2])
}

fn main() -> Result<()> {
    let (images, _) = digits::load_digits_csv(&digits::digits_dir().join(digits::TEST_CSV))?;
    let query = images.slice_rows(0, QUERY_ROWS)?;
    // The same two clients throughout: the gain from 1 to 2 devices is the devices' alone.
    for (devices, clients) in [(1, 1), (1, 2), (2, 2)] {
        let v = qps(devices, clients, &query)?;
        println!("RESULT serving_qps[devices={devices},clients={clients}] = {v:.0} queries/s");
    }
    Ok(())
}
