//! One local training step of the MLP 784-256-256-10 (ReLU, sparse softmax cross-entropy, batch
//! 128, GradientDescent(0.01)), the workload of the peer script `train_worker.py local`: the batch
//! is a constant in the graph, steps/s is the median of 9 chunks. `bench_mlp [SECONDS]`.

use rill_graph::{DType, DirectSession, Graph, Output, RunOptions, Session, SessionOptions, Tensor};
use rill_train::{GradientDescent, Optimizer};
use std::time::Instant;

const BATCH: usize = 128;

fn dense(g: &Graph, x: Output, n_in: usize, n_out: usize, name: &str, act: bool, seed: i64) -> Output {
    // Glorot uniform, as the peer's glorot_uniform_initializer.
    let limit = (6.0 / (n_in + n_out) as f32).sqrt();
    let w = g.variable(&format!("{name}_w"), g.random_uniform([n_in, n_out], -limit, limit, seed));
    let b = g.variable(&format!("{name}_b"), g.zeros([n_out]));
    let y = g.bias_add(g.matmul(x, w), b);
    if act {
        g.relu(y)
    } else {
        y
    }
}

fn main() -> rill_graph::Result<()> {
    let seconds: f64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let mut rng = rill_tests::Lcg(0);
    let xs: Vec<f32> = (0..BATCH * 784).map(|_| rng.normal()).collect();
    let ys: Vec<i64> = (0..BATCH).map(|_| (rng.uniform() * 10.0) as i64 % 10).collect();
    let g = Graph::new();
    let x = g.constant(Tensor::new([BATCH, 784], &xs)?);
    let y = g.constant(Tensor::vector(&ys));
    let h = dense(&g, x, 784, 256, "l1", true, 1);
    let h = dense(&g, h, 256, 256, "l2", true, 2);
    let logits = dense(&g, h, 256, 10, "l3", false, 3);
    let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, y).0, &[], false);
    let train = GradientDescent::new(0.01).minimize(&g, loss, None)?;
    let init = g.global_variables_initializer();
    assert_eq!(g.dtype(loss), DType::F32);
    let rt = rill_train::standard_runtime();
    let opts = SessionOptions {
        inter_op_parallelism_threads: 2,
        intra_op_parallelism_threads: 2,
        ..Default::default()
    };
    let s = DirectSession::new(&g, &rt, opts)?;
    let ro = RunOptions::default();
    s.run(&[], &[], &[init], &ro)?;
    let l0 = s.run(&[], &[loss], &[], &ro)?[0].scalar_value::<f32>()?;
    for _ in 0..20 {
        s.run(&[], &[], &[train], &ro)?;
    }
    let chunk = seconds / 9.0;
    let mut rates = Vec::new();
    for _ in 0..9 {
        let (mut n, t0) = (0u64, Instant::now());
        while t0.elapsed().as_secs_f64() < chunk {
            s.run(&[], &[], &[train], &ro)?;
            n += 1;
        }
        rates.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    let l1 = s.run(&[], &[loss], &[], &ro)?[0].scalar_value::<f32>()?;
    let m = rill_tests::median(&rates);
    rill_tests::line(
        "local_single_session_steps[const]",
        m,
        "steps/s",
        &format!(
            "({:.0} examples/s; {:.2} ms/step; loss {l0:.3}->{l1:.3}) {}",
            m * BATCH as f64,
            1e3 / m,
            rill_tests::spread(&rates)
        ),
    );
    Ok(())
}
