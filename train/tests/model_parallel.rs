//! Model parallelism: the MLP's layers split over `/cpu:0` and `/cpu:1` compute the same logits
//! and the same training losses as on one device, with the activations (and their gradients)
//! crossing devices through Send/Recv pairs.

use rill_graph::{
    DType, DirectSession, Graph, Output, RunMetadata, RunOptions, Session, SessionOptions, Tensor,
};
use rill_train::digits::{self, Minibatches, IMAGE_PIXELS, NUM_CLASSES};
use rill_train::models::{mlp_on_devices, softmax_loss};
use rill_train::{standard_runtime, GradientDescent, Optimizer};
use std::collections::BTreeMap;

const HIDDEN: &[usize] = &[64, 32];
const STEPS: usize = 10;

struct Run {
    logits: Vec<f32>,
    losses: Vec<f32>,
    partitions: Vec<Vec<String>>,
}

/// Trains the MLP with layer `i` on `layer_devices[i]` in a session of `cpus` devices.
fn train(layer_devices: &[&str], cpus: usize) -> Run {
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [None, Some(IMAGE_PIXELS)]);
    let y = g.placeholder("y", DType::I64, [None]);
    let logits = mlp_on_devices(&g, x, HIDDEN, NUM_CLASSES, 5, layer_devices);
    let loss = g.with_device(layer_devices.last().copied().unwrap_or(""), |g| softmax_loss(g, logits, y));
    let train = GradientDescent::new(0.3).minimize(&g, loss, None).unwrap();
    let init = g.global_variables_initializer();
    let opts =
        SessionOptions { device_count: BTreeMap::from([("CPU".to_string(), cpus)]), ..Default::default() };
    let sess = DirectSession::new(&g, &standard_runtime(), opts).unwrap();
    let run = RunOptions { output_partition_graphs: true, timeout_in_ms: 30_000, ..Default::default() };
    sess.run(&[], &[], &[init], &run).unwrap();
    let (images, labels) = digits::load_digits_csv(&digits::digits_dir().join(digits::TRAIN_CSV)).unwrap();
    let mut batches = Minibatches::new(&images, &labels, 4).unwrap();
    let (test_x, _) = batches.next_batch(20).unwrap();
    let logits = sess.run(&[(x, test_x)], &[logits], &[], &run).unwrap()[0].to_vec::<f32>().unwrap();
    let mut losses = Vec::new();
    let mut meta = RunMetadata::default();
    for _ in 0..STEPS {
        let (bx, by): (Tensor, Tensor) = batches.next_batch(32).unwrap();
        let feeds = [(x, bx), (y, by)];
        let out: Vec<Tensor> =
            sess.run_with_metadata(&feeds, &[loss], &[train], &run, Some(&mut meta)).unwrap();
        losses.push(out[0].scalar_value::<f32>().unwrap());
    }
    // The ops of each partition of the training step.
    let partitions =
        meta.partition_graphs.iter().map(|p| p.nodes.iter().map(|n| n.op.clone()).collect()).collect();
    Run { logits, losses, partitions }
}

#[test]
fn split_layers_compute_what_one_device_computes() {
    let one = train(&[], 1);
    let split = train(&["/cpu:0", "/cpu:1", "/cpu:1"], 2);
    assert_eq!(split.logits, one.logits, "same logits");
    assert_eq!(split.losses, one.losses, "same training losses");
    assert!(one.losses[STEPS - 1] < one.losses[0], "the loss falls: {:?}", one.losses);
    let count = |ops: &[String], op: &str| ops.iter().filter(|o| *o == op).count();
    let cases: [(&Run, usize); 2] = [(&one, 1), (&split, 2)];
    for (run, parts) in cases {
        assert_eq!(run.partitions.len(), parts);
        for ops in &run.partitions {
            // One device has no cut edges; two devices cut the activations and their gradients.
            let want_cut = parts > 1;
            assert_eq!(count(ops, "_Send") > 0, want_cut, "{ops:?}");
            assert_eq!(count(ops, "_Recv") > 0, want_cut, "{ops:?}");
        }
    }
}

/// The devices each node of a model-parallel graph is placed on follow the layer scopes.
#[test]
fn layers_are_placed_on_their_devices() {
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [None, Some(IMAGE_PIXELS)]);
    let logits: Output = mlp_on_devices(&g, x, HIDDEN, NUM_CLASSES, 5, &["/cpu:0", "/cpu:1"]);
    let cases = [
        ("mlp/layer0/weights", "/device:CPU:0"),
        ("mlp/layer1/weights", "/device:CPU:1"),
        ("mlp/layer2/weights", "/device:CPU:1"),
    ];
    for (name, dev) in cases {
        let node = g.node(g.find(name).unwrap());
        assert!(node.device.ends_with(dev), "{name} requested on {}", node.device);
    }
    assert!(g.node(logits.node).device.ends_with("/device:CPU:1"));
}
