//! The README's example: build a small model's graph, initialise it, and run it in a local
//! session on this process's CPU devices.

use rill_graph::{DType, DirectSession, Graph, RunOptions, Session, SessionOptions, Tensor};

fn main() -> rill_graph::Result<()> {
    let runtime = rill_train::standard_runtime();
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [None, Some(784)]);
    let (w, b) = g.with_device("/cpu:0", |g| {
        (g.variable("w", g.truncated_normal([784, 10], 0.1, 7)), g.variable("b", g.zeros([10])))
    });
    let logits = g.with_device("/cpu:0", |g| g.add(g.matmul(x, w), b));
    let probs = g.softmax(logits);
    let init = g.global_variables_initializer();

    let sess = DirectSession::new(&g, &runtime, SessionOptions::default())?;
    sess.run(&[], &[], &[init], &RunOptions::default())?;
    let batch = Tensor::new([2usize, 784], &vec![0.5f32; 2 * 784])?;
    let out = sess.run(&[(x, batch)], &[probs], &[], &RunOptions::default())?;
    println!("probabilities of 2 examples over 10 classes: {:?}", out[0]);
    let row: f32 = out[0].as_slice::<f32>()?[..10].iter().sum();
    println!("first row sums to {row:.4}");
    Ok(())
}
