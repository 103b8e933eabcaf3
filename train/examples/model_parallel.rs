//! Model parallelism on one machine: the digits MLP with its first layer on `/cpu:0` and the
//! others on `/cpu:1`. The placer puts each layer where its scope asks and the partitioner adds
//! the Send/Recv pairs that carry the activations forward and their gradients back; the program
//! checks that the split model computes the same logits and training losses as on one device.
//!
//! `cargo run -p rill-train --example model_parallel`

use rill_graph::{
    DType, DirectSession, Error, Graph, Result, RunMetadata, RunOptions, Session, SessionOptions,
};
use rill_train::digits::{self, Minibatches, IMAGE_PIXELS, NUM_CLASSES};
use rill_train::models::{accuracy, mlp_on_devices, softmax_loss};
use rill_train::{standard_runtime, Adam, Optimizer};
use std::collections::BTreeMap;

const HIDDEN: &[usize] = &[128, 64];
const STEPS: usize = 300;
const SEED: i64 = 3;

struct Outcome {
    logits: Vec<f32>,
    losses: Vec<f32>,
    accuracy: f32,
    cut_edges: usize,
}

fn train(layer_devices: &[&str], cpus: usize) -> Result<Outcome> {
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [None, Some(IMAGE_PIXELS)]);
    let y = g.placeholder("y", DType::I64, [None]);
    let logits = mlp_on_devices(&g, x, HIDDEN, NUM_CLASSES, SEED, layer_devices);
    let (loss, acc) = g.with_device(layer_devices.last().copied().unwrap_or(""), |g| {
        (softmax_loss(g, logits, y), accuracy(g, logits, y))
    });
    let train = Adam::new(0.005).minimize(&g, loss, None)?;
    let init = g.global_variables_initializer();
    let opts =
        SessionOptions { device_count: BTreeMap::from([("CPU".to_string(), cpus)]), ..Default::default() };
    let sess = DirectSession::new(&g, &standard_runtime(), opts)?;
    let run = RunOptions { output_partition_graphs: true, ..Default::default() };
    sess.run(&[], &[], &[init], &run)?;
    let dir = digits::digits_dir();
    let (images, labels) = digits::load_digits_csv(&dir.join(digits::TRAIN_CSV))?;
    let (test_x, test_y) = digits::load_digits_csv(&dir.join(digits::TEST_CSV))?;
    let logits = sess.run(&[(x, test_x.clone())], &[logits], &[], &run)?[0].to_vec::<f32>()?;
    let mut batches = Minibatches::new(&images, &labels, 9)?;
    let mut losses = Vec::with_capacity(STEPS);
    let mut meta = RunMetadata::default();
    for _ in 0..STEPS {
        let (bx, by) = batches.next_batch(64)?;
        let out = sess.run_with_metadata(&[(x, bx), (y, by)], &[loss], &[train], &run, Some(&mut meta))?;
        losses.push(out[0].scalar_value::<f32>()?);
    }
    let cut_edges = meta.partition_graphs.iter().flat_map(|p| &p.nodes).filter(|n| n.op == "_Send").count();
    let accuracy = sess.run(&[(x, test_x), (y, test_y)], &[acc], &[], &run)?[0].scalar_value::<f32>()?;
    Ok(Outcome { logits, losses, accuracy, cut_edges })
}

fn main() -> Result<()> {
    let one = train(&[], 1)?;
    let split = train(&["/cpu:0", "/cpu:1"], 2)?;
    let max_diff = one.logits.iter().zip(&split.logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("initial logits on the test set: largest difference {max_diff}");
    for (name, o) in [("one device", &one), ("split over /cpu:0 and /cpu:1", &split)] {
        println!(
            "{name}: loss {:.4} -> {:.4}, test accuracy {:.2}%, {} Send/Recv pairs per training step",
            o.losses[0],
            o.losses[STEPS - 1],
            o.accuracy * 100.0,
            o.cut_edges
        );
    }
    if one.logits != split.logits || one.losses != split.losses || split.cut_edges == 0 {
        return Err(Error::internal("the split model does not compute what the one-device model does"));
    }
    println!("the same logits and the same {STEPS} training losses on one and on two devices");
    Ok(())
}
