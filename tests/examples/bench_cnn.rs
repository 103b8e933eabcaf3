//! One training step of a small CNN on 28×28×1 images, batch 64: conv 5×5×32 SAME + ReLU +
//! maxpool 2×2, conv 5×5×64 SAME + ReLU + maxpool 2×2, dense 3136→256 ReLU, dense 256→10,
//! softmax cross-entropy, GradientDescent(0.01); inter_op 2, intra_op 2 (or `bench_cnn [INTRA]`).

use rill_graph::{
    DirectSession, Graph, Output, RunMetadata, RunOptions, Session, SessionOptions, Shape, Tensor, TraceLevel,
};
use rill_tests::{bench, line, median, spread};
use rill_train::{GradientDescent, Optimizer};
use std::collections::BTreeMap;

const BATCH: usize = 64;
/// Steps per timed repetition, and repetitions.
const STEPS: usize = 10;
const REPS: usize = 7;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A weight variable (truncated normal, stddev 0.1) and a zero bias variable.
fn layer(g: &Graph, name: &str, shape: Shape, out: usize, seed: i64) -> (Output, Output) {
    let w = g.variable(&format!("{name}/w"), g.truncated_normal(shape, 0.1, seed));
    let b = g.variable(&format!("{name}/b"), g.zeros([out]));
    (w, b)
}

fn main() -> rill_graph::Result<()> {
    let intra = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let g = Graph::new();
    let images = g.constant(Tensor::new([BATCH, 28, 28, 1], &values(BATCH * 28 * 28, 1))?);
    let labels: Vec<i32> = (0..BATCH as i32).map(|i| i % 10).collect();
    let labels = g.constant(Tensor::vector(&labels));

    let (w1, b1) = layer(&g, "conv1", Shape::new(&[5, 5, 1, 32])?, 32, 1);
    let h1 = g.relu(g.bias_add(g.conv2d(images, w1, [1, 1], "SAME"), b1));
    let p1 = g.max_pool(h1, [2, 2], [2, 2], "SAME");
    let (w2, b2) = layer(&g, "conv2", Shape::new(&[5, 5, 32, 64])?, 64, 2);
    let h2 = g.relu(g.bias_add(g.conv2d(p1, w2, [1, 1], "SAME"), b2));
    let p2 = g.max_pool(h2, [2, 2], [2, 2], "SAME");
    let flat = g.reshape(p2, &[BATCH as i64, 7 * 7 * 64]);
    let (w3, b3) = layer(&g, "fc1", Shape::new(&[7 * 7 * 64, 256])?, 256, 3);
    let h3 = g.relu(g.bias_add(g.matmul(flat, w3), b3));
    let (w4, b4) = layer(&g, "fc2", Shape::new(&[256, 10])?, 10, 4);
    let logits = g.bias_add(g.matmul(h3, w4), b4);
    let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, labels).0, &[], false);
    let train = GradientDescent::new(0.01).minimize(&g, loss, None)?;
    let init = g.global_variables_initializer();
    g.status()?;

    let opts = SessionOptions {
        inter_op_parallelism_threads: 2,
        intra_op_parallelism_threads: intra,
        ..Default::default()
    };
    let s = DirectSession::new(&g, &rill_train::standard_runtime(), opts)?;
    let ro = RunOptions::default();
    s.run(&[], &[], &[init], &ro)?;
    let loss_of =
        |s: &DirectSession| -> rill_graph::Result<f32> { s.run(&[], &[loss], &[], &ro)?[0].scalar_value() };
    let first = loss_of(&s)?;
    let ts = bench(|| drop(s.run(&[], &[], &[train], &ro).expect("a training step runs")), STEPS, REPS);
    let last = loss_of(&s)?;
    let m = median(&ts);
    line(
        &format!("cnn_train_step[batch={BATCH}]"),
        1.0 / m,
        "steps/s",
        &format!("({:.1} ms/step, intra={intra}, loss {first:.3} -> {last:.3}) {}", m * 1e3, spread(&ts)),
    );
    op_breakdown(&s, train)
}

/// Prints the kernel time of one traced step per op type, largest first (ops overlap when the
/// executor runs them in parallel, so the total can exceed the step time).
fn op_breakdown(s: &DirectSession, train: Output) -> rill_graph::Result<()> {
    let ro = RunOptions { trace_level: TraceLevel::FullTrace, ..Default::default() };
    let mut md = RunMetadata::default();
    s.run_with_metadata(&[], &[], &[train], &ro, Some(&mut md))?;
    let mut per_op: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    for n in &md.step_stats.nodes {
        let e = per_op.entry(n.op.as_str()).or_default();
        e.0 += n.end_us.saturating_sub(n.start_us);
        e.1 += 1;
    }
    let mut rows: Vec<_> = per_op.into_iter().collect();
    rows.sort_by_key(|(_, (us, _))| std::cmp::Reverse(*us));
    for (op, (us, count)) in rows.iter().take(12) {
        println!("  {op:<28} {:>8.2} ms  ({count} nodes)", *us as f64 / 1e3);
    }
    Ok(())
}
