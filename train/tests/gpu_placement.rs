//! Where training graphs built under `/device:GPU:0` land, placed step by step as a session does,
//! against GPU attributes and the real kernel table (no GPU needed): every node placed on a GPU
//! has a GPU kernel there, no node moves between steps (a moved variable would lose its value),
//! and the model's products, updates and variables are on the GPU.

use rill_graph::partition::prune_and_rewrite;
use rill_graph::placer::{group_support, place, PlacerOptions};
use rill_graph::*;
use rill_train::{
    create_global_step, models, replica_device_setter, standard_runtime, Adam, GradientDescent, Optimizer,
    ReplicaDeviceSetterOptions, SyncReplicasOptimizer,
};
use std::collections::HashMap;
use std::sync::Arc;

fn dev(name: &str, t: &str) -> DeviceAttributes {
    DeviceAttributes {
        name: DeviceName::parse(&format!("{name}/device:{t}:0")).unwrap(),
        device_type: t.into(),
        memory_limit_bytes: 1 << 30,
        incarnation: 1,
        description: String::new(),
    }
}

/// Places each step (feeds, fetches, targets) in turn as a session does, earlier placements
/// carried over, and returns `(op, device type)` of every node of the last step.
fn place_steps(g: &Graph, steps: &[(&[Output], &[Output], &[Output])]) -> Vec<(String, String)> {
    let local = "/job:localhost/replica:0/task:0";
    place_steps_on(g, &[dev(local, "CPU"), dev(local, "GPU")], steps)
}

fn place_steps_on(
    g: &Graph,
    devices: &[DeviceAttributes],
    steps: &[(&[Output], &[Output], &[Output])],
) -> Vec<(String, String)> {
    let rt = standard_runtime();
    let client = devices[0].name.clone();
    let gd = g.to_graph_def();
    let support = Arc::new(group_support(&gd, &rt.ops, &rt.kernels).unwrap());
    let opts = PlacerOptions {
        allow_soft_placement: true,
        default_device: client.task_name(),
        group_support: Some(support),
        ..Default::default()
    };
    let mut prev: HashMap<String, DeviceName> = HashMap::new();
    let mut last = Vec::new();
    for (feeds, fetches, targets) in steps {
        let t: Vec<NodeId> = targets.iter().map(|o| o.node).collect();
        let sg = prune_and_rewrite(&gd, feeds, fetches, &t, &client, &rt.ops).unwrap();
        let p = place(&sg.graph, devices, &rt.ops, &rt.kernels, &prev, &opts).unwrap();
        last.clear();
        for (i, (n, d)) in sg.graph.nodes.iter().zip(&p.devices).enumerate() {
            let ty = devices.iter().find(|a| &a.name == d).unwrap().device_type.clone();
            let dts: Vec<DType> = n
                .inputs
                .iter()
                .map(|o| sg.graph.nodes[o.node.0 as usize].outputs[o.index as usize].dtype)
                .collect();
            assert!(
                rt.kernels.find(n, &dts, &ty).is_some(),
                "'{}' ({}) placed on {ty} without a kernel",
                n.name,
                n.op
            );
            let first = prev.entry(n.name.clone()).or_insert_with(|| d.clone());
            assert_eq!(first, d, "'{}' ({}) moved between steps: {}", n.name, n.op, p.explanations[i]);
            last.push((n.op.clone(), ty));
        }
    }
    last
}

fn on_gpu(placed: &[(String, String)], op: &str) -> bool {
    let mut of_op = placed.iter().filter(|(o, _)| o == op).peekable();
    of_op.peek().is_some() && of_op.all(|(_, d)| d == "GPU")
}

#[test]
fn adam_slots_and_updates_stay_on_the_gpu() {
    let g = Graph::new();
    let (x, y, loss, train, init) = g
        .with_device("/device:GPU:0", |g| -> Result<_> {
            let x = g.placeholder("images", DType::F32, [None, Some(64)]);
            let y = g.placeholder("labels", DType::I64, [None]);
            let logits = models::mlp(g, x, &[64], 10, 7);
            let loss = models::softmax_loss(g, logits, y);
            let train = Adam::new(0.01).minimize(g, loss, None)?;
            Ok((x, y, loss, train, g.global_variables_initializer()))
        })
        .unwrap();
    let placed = place_steps(&g, &[(&[], &[], &[init]), (&[x, y], &[loss], &[train])]);
    for op in ["MatMul", "ApplyAdam", "VariableV2", "BiasAddGrad", "ReluGrad"] {
        assert!(on_gpu(&placed, op), "{op} is not (only) on the GPU: {placed:?}");
    }
}

#[test]
fn a_forward_op_placed_by_an_earlier_step_takes_its_gradient_along() {
    // The loss runs alone first, placing its Mean on the GPU; the training step then adds the
    // Mean's gradient (Reshape, Tile, int32 constants) colocated with it.
    let g = Graph::new();
    let (loss, train, init) = g
        .with_device("/device:GPU:0", |g| -> Result<_> {
            let x = g.constant(Tensor::new([8, 4], &[0.5f32; 32])?);
            let y = g.constant(Tensor::vector(&[1i64; 8]));
            let w = g.variable("w", g.random_uniform([4, 3], -0.1, 0.1, 1));
            let b = g.variable("b", g.zeros([3]));
            let logits = g.bias_add(g.matmul(x, w), b);
            let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, y).0, &[], false);
            let train = GradientDescent::new(0.01).minimize(g, loss, None)?;
            Ok((loss, train, g.global_variables_initializer()))
        })
        .unwrap();
    let placed = place_steps(&g, &[(&[], &[], &[init]), (&[], &[loss], &[]), (&[], &[], &[train])]);
    for op in ["Mean", "Tile", "Reshape", "ExpandDims", "ApplyGradientDescent"] {
        assert!(on_gpu(&placed, op), "{op} is not (only) on the GPU: {placed:?}");
    }
}

#[test]
fn sync_replicas_on_gpu_tasks_keep_every_variable_where_it_was_initialised() {
    // As `gpu_digits sync`: ps and worker tasks with a GPU each; the chief initialises, then
    // trains. The accumulators colocated with each variable have no GPU kernel, so the whole
    // group, the variable with it, is on the ps CPU from the first step on.
    let g = Graph::new();
    let (x, y, loss, train, init, chief_init) = g
        .with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(1, 0)), |g| -> Result<_> {
            let gs = create_global_step(g)?;
            let x = g.placeholder("images", DType::F32, [None, Some(64)]);
            let y = g.placeholder("labels", DType::I64, [None]);
            let logits = models::mlp(g, x, &[64], 10, 7);
            let loss = models::softmax_loss(g, logits, y);
            let sync = SyncReplicasOptimizer::new(Adam::new(0.01), 2, 2);
            let train = sync.minimize(g, loss, Some(gs))?;
            let ops = sync.sync_ops()?;
            Ok((x, y, loss, train, g.global_variables_initializer(), ops.chief_init_op))
        })
        .unwrap();
    let (ps, worker) = ("/job:ps/replica:0/task:0", "/job:worker/replica:0/task:0");
    let devices = [dev(worker, "CPU"), dev(worker, "GPU"), dev(ps, "CPU"), dev(ps, "GPU")];
    let placed = place_steps_on(
        &g,
        &devices,
        &[(&[], &[], &[init]), (&[], &[], &[chief_init]), (&[x, y], &[loss], &[train])],
    );
    assert!(on_gpu(&placed, "MatMul"), "the worker's products run on its GPU: {placed:?}");
}
