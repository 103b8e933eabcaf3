//! Placement rules, one by one, over a fake CPU+GPU process whose kernel table, like
//! TensorFlow's, has no GPU kernel for int32 variables; and the partitioner's Send/Recv layout.

use rill_graph::kernels::create_no_op;
use rill_graph::partition::{partition, PartitionOptions};
use rill_graph::placer::{place, PlacerOptions};
use rill_graph::*;
use std::collections::HashMap;

const FLOATS: &[DType] = &[DType::F32, DType::F64, DType::F16, DType::BF16];

static FAKE_KERNELS: &[KernelDef] = &[
    KernelDef::new("Const", "CPU", create_no_op),
    KernelDef::new("Const", "GPU", create_no_op),
    KernelDef::new("Fill", "CPU", create_no_op),
    KernelDef::new("Add", "CPU", create_no_op),
    KernelDef::new("Add", "GPU", create_no_op).types(TypeOf::Input(0), FLOATS),
    KernelDef::new("VariableV2", "CPU", create_no_op),
    KernelDef::new("VariableV2", "GPU", create_no_op).types(TypeOf::Output(0), FLOATS),
    KernelDef::new("Assign", "CPU", create_no_op),
    KernelDef::new("Assign", "GPU", create_no_op).types(TypeOf::Input(1), FLOATS),
    KernelDef::new("AssignAdd", "CPU", create_no_op),
    KernelDef::new("NoOp", "CPU", create_no_op),
    KernelDef::new("NoOp", "GPU", create_no_op),
];

fn dev(t: &str, i: u32) -> DeviceAttributes {
    DeviceAttributes {
        name: DeviceName::local(t, i),
        device_type: t.into(),
        memory_limit_bytes: 0,
        incarnation: 1,
        description: String::new(),
    }
}

fn registries() -> (OpRegistry, KernelRegistry) {
    let mut ops = OpRegistry::new();
    ops.add(rill_graph::ops::OPS);
    let mut k = KernelRegistry::new();
    k.add(FAKE_KERNELS);
    (ops, k)
}

fn place_graph(g: &Graph, soft: bool, prev: &HashMap<String, DeviceName>) -> Result<Vec<String>> {
    let (ops, k) = registries();
    let devices = vec![dev("CPU", 0), dev("GPU", 0)];
    let opts = PlacerOptions { allow_soft_placement: soft, ..Default::default() };
    let p = place(&g.to_graph_def(), &devices, &ops, &k, prev, &opts)?;
    Ok(p.devices.iter().map(|d| d.to_string()).collect())
}

const CPU0: &str = "/job:localhost/replica:0/task:0/device:CPU:0";
const GPU0: &str = "/job:localhost/replica:0/task:0/device:GPU:0";

#[test]
fn default_prefers_gpu_when_it_has_a_kernel() {
    let g = Graph::new();
    let a = g.constant(Tensor::scalar(1f32));
    let s = g.add(a, a);
    let i = g.add(g.constant(Tensor::scalar(1i32)), g.constant(Tensor::scalar(2i32)));
    let p = place_graph(&g, false, &HashMap::new()).unwrap();
    assert_eq!(p[s.node.0 as usize], GPU0, "f32 Add has a GPU kernel");
    assert_eq!(p[i.node.0 as usize], CPU0, "int32 Add has none");
}

#[test]
fn requested_device_is_honoured() {
    let g = Graph::new();
    let s = g.with_device("/cpu:0", |g| g.add(g.scalar(1f32), g.scalar(2f32)));
    let p = place_graph(&g, false, &HashMap::new()).unwrap();
    assert_eq!(p[s.node.0 as usize], CPU0);
}

#[test]
fn int32_variable_on_gpu_needs_soft_placement() {
    let g = Graph::new();
    let v = g.with_device("/device:GPU:0", |g| g.variable("counter", g.constant(Tensor::scalar(0i32))));
    let e = place_graph(&g, false, &HashMap::new()).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    for needle in ["'counter'", "/device:GPU:0", CPU0, "allow_soft_placement"] {
        assert!(e.msg.contains(needle), "missing {needle} in: {e}");
    }
    let p = place_graph(&g, true, &HashMap::new()).unwrap();
    assert_eq!(p[v.node.0 as usize], CPU0);
    // A float variable goes to the GPU with its Assign (reference edge).
    let g = Graph::new();
    let v = g.with_device("/device:GPU:0", |g| g.variable("w", g.constant(Tensor::scalar(0f32))));
    let info = g.variable_of(v).unwrap();
    let p = place_graph(&g, false, &HashMap::new()).unwrap();
    assert_eq!(p[v.node.0 as usize], GPU0);
    assert_eq!(p[info.initializer.0 as usize], GPU0);
}

#[test]
fn reference_edges_keep_a_group_together() {
    // AssignAdd has no GPU kernel here, so the variable it updates stays on the CPU too.
    let g = Graph::new();
    let v = g.variable("w", g.constant(Tensor::scalar(0f32)));
    let up = g.assign_add(v, g.scalar(1f32));
    let p = place_graph(&g, false, &HashMap::new()).unwrap();
    assert_eq!(p[v.node.0 as usize], CPU0);
    assert_eq!(p[up.node.0 as usize], CPU0);
}

#[test]
fn conflicting_requests_in_a_group() {
    let g = Graph::new();
    let v = g.with_device("/device:GPU:0", |g| g.variable("w", g.scalar(0f32)));
    g.with_device("/device:CPU:0", |g| {
        let a = g.custom(rill_graph::ops::core_op("Assign"), "bad_assign", &[v, g.scalar(1f32)], attrs! {});
        let _ = a;
    });
    let e = place_graph(&g, false, &HashMap::new()).unwrap_err();
    assert!(e.msg.contains("Cannot colocate"), "{e}");
    place_graph(&g, true, &HashMap::new()).unwrap();
}

#[test]
fn unknown_device_is_a_clear_error() {
    let g = Graph::new();
    g.with_device("/device:GPU:5", |g| g.scalar(1f32));
    let e = place_graph(&g, false, &HashMap::new()).unwrap_err();
    assert!(e.msg.contains("no device of this process matches"), "{e}");
    assert_eq!(place_graph(&g, true, &HashMap::new()).unwrap()[0], GPU0);
}

#[test]
fn earlier_placement_is_kept() {
    let g = Graph::new();
    let s = g.add(g.scalar(1f32), g.scalar(2f32));
    let mut prev = HashMap::new();
    prev.insert(g.node_name(s.node), DeviceName::parse(CPU0).unwrap());
    let p = place_graph(&g, false, &prev).unwrap();
    assert_eq!(p[s.node.0 as usize], CPU0);
}

#[test]
fn earlier_placement_yields_to_a_member_it_cannot_run() {
    // A forward op placed on the GPU by one step, then a later step's op colocated with it
    // (as gradients are) that has no GPU kernel: the group is placed again, on the CPU.
    let g = Graph::new();
    let s = g.add(g.scalar(1f32), g.scalar(2f32));
    let i = g.colocate_with(s, |g| g.add(g.scalar(1i32), g.scalar(2i32)));
    let mut prev = HashMap::new();
    prev.insert(g.node_name(s.node), DeviceName::parse(GPU0).unwrap());
    let p = place_graph(&g, true, &prev).unwrap();
    assert_eq!((p[s.node.0 as usize].as_str(), p[i.node.0 as usize].as_str()), (CPU0, CPU0));
    // Where the earlier device runs every member, the group stays there.
    let g = Graph::new();
    let s = g.add(g.scalar(1f32), g.scalar(2f32));
    let f = g.colocate_with(s, |g| g.add(s, s));
    let p = place_graph(&g, true, &prev).unwrap();
    assert_eq!((p[s.node.0 as usize].as_str(), p[f.node.0 as usize].as_str()), (GPU0, GPU0));
}

#[test]
fn a_group_is_placed_as_the_whole_graph_has_it() {
    // The initialiser's step sees a variable with its Assign (both have GPU kernels); the whole
    // graph also updates it with AssignAdd, which has none. Placed with the whole graph's groups,
    // the variable starts on the CPU, where its later update can run.
    let build = |with_update: bool| {
        let g = Graph::new();
        let v = g.variable("v", g.constant(Tensor::scalar(1f32)));
        if with_update {
            g.assign_add(v, g.scalar(2f32));
        }
        (g, v)
    };
    let (full, _) = build(true);
    let (step, v) = build(false);
    let (ops, k) = registries();
    let support = rill_graph::placer::group_support(&full.to_graph_def(), &ops, &k).unwrap();
    let devices = vec![dev("CPU", 0), dev("GPU", 0)];
    let place_with = |s: Option<std::sync::Arc<rill_graph::placer::GroupSupport>>| {
        let opts = PlacerOptions { allow_soft_placement: true, group_support: s, ..Default::default() };
        let p = place(&step.to_graph_def(), &devices, &ops, &k, &HashMap::new(), &opts).unwrap();
        p.devices[v.node.0 as usize].to_string()
    };
    assert_eq!(place_with(None), GPU0, "the step alone would put it on the GPU");
    assert_eq!(place_with(Some(std::sync::Arc::new(support))), CPU0);
}

#[test]
fn explain_says_why() {
    let g = Graph::new();
    g.with_device("/cpu:0", |g| g.variable("w", g.scalar(0f32)));
    let (ops, k) = registries();
    let def = g.to_graph_def();
    let p =
        place(&def, &[dev("CPU", 0), dev("GPU", 0)], &ops, &k, &HashMap::new(), &PlacerOptions::default())
            .unwrap();
    let text = p.explain(&def);
    assert!(
        text.contains("w (VariableV2): /job:localhost/replica:0/task:0/device:CPU:0: requested"),
        "{text}"
    );
    assert!(text.contains("reference edge from 'w'"), "{text}");
    assert!(p.log_lines(&def)[0].starts_with("Const: (Const): /job:localhost"));
}

#[test]
fn partition_inserts_one_send_per_tensor_and_destination() {
    let g = Graph::new();
    let a = g.with_device("/cpu:0", |g| g.scalar(1f32));
    let (b, c) = g.with_device("/cpu:1", |g| (g.add(a, a), g.neg(a)));
    let d = g.with_device("/cpu:2", |g| g.with_control_dependencies(&[b], |g| g.neg(a)));
    let def = g.to_graph_def();
    let devs: Vec<DeviceName> = def.nodes.iter().map(|n| DeviceName::parse(&n.device).unwrap()).collect();
    let devs: Vec<DeviceName> = devs
        .into_iter()
        .map(|d| DeviceName { job: Some("localhost".into()), replica: Some(0), task: Some(0), ..d })
        .collect();
    let parts =
        partition(&def, &devs, &PartitionOptions { incarnation: &|_| 7, cross_task_cast: None }).unwrap();
    assert_eq!(parts.len(), 3);
    let count = |p: &GraphDef, op: &str| p.nodes.iter().filter(|n| n.op == op).count();
    let cpu0 = &parts[&DeviceName::local("CPU", 0)];
    let cpu1 = &parts[&DeviceName::local("CPU", 1)];
    let cpu2 = &parts[&DeviceName::local("CPU", 2)];
    assert_eq!(count(cpu0, "_Send"), 2, "one send to CPU:1 (used three times), one to CPU:2");
    assert_eq!(count(cpu1, "_Recv"), 1);
    assert_eq!(count(cpu1, "_Send"), 1, "the control edge b -> d crosses as a dummy tensor");
    assert_eq!(count(cpu1, "Const"), 1, "the dummy");
    assert_eq!(count(cpu2, "_Recv"), 2);
    for p in parts.values() {
        p.validate().unwrap();
    }
    let _ = (c, d);
}
