//! A two-layer perceptron on a linearly separable problem: every optimizer must cut the loss
//! by far, and the global step must count the steps.

use rill_graph::*;
use rill_train::*;

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

const BATCH: usize = 32;
const HIDDEN: usize = 8;
const STEPS: usize = 100;

/// Trains with `opt` and returns the loss before and after.
fn train(opt: &dyn Optimizer) -> (f32, f32) {
    let points = values(BATCH * 2, 7);
    let labels: Vec<i32> = points.chunks(2).map(|p| i32::from(p[0] + p[1] > 0.0)).collect();
    let g = Graph::new();
    let x = g.constant(Tensor::new([BATCH, 2], &points).unwrap());
    let y = g.constant(Tensor::vector(&labels));
    let w1 = g.variable("w1", g.constant(Tensor::new([2, HIDDEN], &values(2 * HIDDEN, 1)).unwrap()));
    let b1 = g.variable("b1", g.constant(Tensor::new([HIDDEN], &[0f32; HIDDEN]).unwrap()));
    let w2 = g.variable("w2", g.constant(Tensor::new([HIDDEN, 2], &values(HIDDEN * 2, 2)).unwrap()));
    let b2 = g.variable("b2", g.constant(Tensor::vector(&[0f32, 0.0])));
    let h = g.tanh(g.bias_add(g.matmul(x, w1), b1));
    let logits = g.bias_add(g.matmul(h, w2), b2);
    let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, y).0, &[], false);
    let step = create_global_step(&g).unwrap();
    let train = opt.minimize(&g, loss, Some(step)).unwrap();
    let init = g.global_variables_initializer();
    let read_step = g.identity(step);
    let sess = DirectSession::new(&g, &standard_runtime(), SessionOptions::default()).unwrap();
    let opts = RunOptions::default();
    sess.run(&[], &[], &[init], &opts).unwrap();
    let first = sess.run(&[], &[loss], &[], &opts).unwrap()[0].scalar_value::<f32>().unwrap();
    for _ in 0..STEPS {
        sess.run(&[], &[], &[train], &opts).unwrap();
    }
    let last = sess.run(&[], &[loss], &[], &opts).unwrap()[0].scalar_value::<f32>().unwrap();
    let steps = sess.run(&[], &[read_step], &[], &opts).unwrap()[0].scalar_value::<i64>().unwrap();
    assert_eq!(steps, STEPS as i64, "{}: global step", opt.name());
    (first, last)
}

#[test]
fn every_optimizer_learns() {
    let nesterov = Momentum { use_nesterov: true, ..Momentum::new(0.1, 0.9) };
    let optimizers: [&dyn Optimizer; 5] = [
        &GradientDescent::new(1.0),
        &Momentum::new(0.1, 0.9),
        &nesterov,
        &Adam::new(0.05),
        &RMSProp::new(0.05),
    ];
    for opt in optimizers {
        let (first, last) = train(opt);
        assert!(last < 0.2 * first, "{}: loss {first} -> {last}", opt.name());
    }
}
