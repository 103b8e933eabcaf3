//! Graph building: names, scopes, device specs, inference errors, serde form.

use rill_graph::*;

#[test]
fn device_names_parse_and_print() {
    let cases: &[(&str, Option<&str>)] = &[
        ("", Some("")),
        ("/job:ps/replica:0/task:1/device:GPU:0", Some("/job:ps/replica:0/task:1/device:GPU:0")),
        ("/job:worker/task:3", Some("/job:worker/task:3")),
        ("/cpu:0", Some("/device:CPU:0")),
        ("/gpu:1", Some("/device:GPU:1")),
        ("/device:CPU:*", Some("/device:CPU:*")),
        ("/job:ps/task:0/cpu:1", Some("/job:ps/task:0/device:CPU:1")),
        ("/job:", None),
        ("/task:x", None),
        ("/foo:1", None),
        ("/job:ps/task", None),
    ];
    for (input, want) in cases {
        match (DeviceName::parse(input), want) {
            (Ok(d), Some(w)) => assert_eq!(d.to_string(), *w, "{input}"),
            (Err(e), None) => assert_eq!(e.code, Code::InvalidArgument, "{input}"),
            (r, w) => panic!("{input}: got {r:?}, want {w:?}"),
        }
    }
}

#[test]
fn device_names_merge_and_match() {
    let p = |s| DeviceName::parse(s).unwrap();
    let full = p("/job:ps/replica:0/task:1/device:CPU:0");
    assert!(p("/job:ps").matches(&full));
    assert!(p("/task:1/cpu:0").matches(&full));
    assert!(!p("/task:2").matches(&full));
    assert!(!p("/gpu:0").matches(&full));
    assert_eq!(p("/job:ps").merge(&p("/task:1")).unwrap().to_string(), "/job:ps/task:1");
    assert_eq!(p("/job:ps").merge(&p("/job:worker")).unwrap_err().code, Code::InvalidArgument);
    assert_eq!(p("/job:ps/task:0").override_with(&p("/task:2")).to_string(), "/job:ps/task:2");
}

#[test]
fn shape_inference_errors_name_the_node() {
    let cases: Vec<(&str, Box<dyn Fn(&Graph)>)> = vec![
        (
            "MatMul",
            Box::new(|g: &Graph| {
                let a = g.placeholder("a", DType::F32, [Some(2), Some(3)]);
                let b = g.placeholder("b", DType::F32, [Some(4), Some(5)]);
                g.matmul(a, b);
            }),
        ),
        (
            "Add",
            Box::new(|g: &Graph| {
                let a = g.placeholder("a", DType::F32, [Some(2)]);
                let b = g.placeholder("b", DType::I32, [Some(2)]);
                g.add(a, b);
            }),
        ),
        (
            "Add",
            Box::new(|g: &Graph| {
                let a = g.placeholder("a", DType::F32, [Some(2), Some(3)]);
                let b = g.placeholder("b", DType::F32, [Some(4)]);
                g.add(a, b);
            }),
        ),
        (
            "Reshape",
            Box::new(|g: &Graph| {
                let a = g.placeholder("a", DType::F32, [Some(2), Some(3)]);
                g.reshape(a, &[4, 2]);
            }),
        ),
        (
            "BiasAdd",
            Box::new(|g: &Graph| {
                let a = g.placeholder("a", DType::F32, [None, Some(3)]);
                let b = g.placeholder("b", DType::F32, [Some(4)]);
                g.bias_add(a, b);
            }),
        ),
    ];
    for (op, build) in cases {
        let g = Graph::new();
        build(&g);
        let e = g.status().unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{op}: {e}");
        assert!(e.msg.contains(&format!("({op})")), "{op}: {e}");
        assert!(e.msg.contains("node '"), "{op}: {e}");
    }
}

#[test]
fn inferred_shapes() {
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [None, Some(784)]);
    let w = g.variable("w", g.zeros([784, 10]));
    let y = g.matmul(x, w);
    assert_eq!(g.shape(y), PartialShape::from([None, Some(10)]));
    let s = g.reduce_sum(y, &[1], true);
    assert_eq!(g.shape(s), PartialShape::from([None, Some(1)]));
    let r = g.reshape(g.zeros([4, 6]), &[-1, 3]);
    assert_eq!(g.shape(r), PartialShape::from([8usize, 3]));
    let t = g.transpose(g.zeros([2, 3, 5]), &[2, 0, 1]);
    assert_eq!(g.shape(t), PartialShape::from([5usize, 2, 3]));
    let c = g.concat(&[g.zeros([2, 3]), g.zeros([4, 3])], 0);
    assert_eq!(g.shape(c), PartialShape::from([6usize, 3]));
    let b = g.add(g.zeros([3, 1]), g.zeros([4]));
    assert_eq!(g.shape(b), PartialShape::from([3usize, 4]));
    let (loss, _) = g.sparse_softmax_cross_entropy_with_logits(y, g.placeholder("l", DType::I64, [None]));
    assert_eq!(g.shape(loss), PartialShape::from([None]));
    g.status().unwrap();
}

#[test]
fn names_are_unique_and_scoped() {
    let g = Graph::new();
    let a = g.scalar(1f32);
    let b = g.scalar(2f32);
    assert_eq!(g.node_name(a.node), "Const");
    assert_eq!(g.node_name(b.node), "Const_1");
    let c = g.with_name_scope("layer", |g| g.add(a, b));
    assert_eq!(g.node_name(c.node), "layer/Add");
    let d = g.with_name_scope("layer", |g| g.add(a, b));
    assert_eq!(g.node_name(d.node), "layer_1/Add");
    let e = g.with_name_scope("outer", |g| g.with_name_scope("inner", |g| g.neg(a)));
    assert_eq!(g.node_name(e.node), "outer/inner/Neg");
}

#[test]
fn variable_scopes_reuse_or_refuse() {
    let g = Graph::new();
    let init = |g: &Graph, s: Shape, _| g.zeros(s);
    let w1 = g.variable_scope("tower", Reuse::No, |g| g.get_variable("w", [3], DType::F32, init));
    let w2 = g.variable_scope("tower", Reuse::Yes, |g| g.get_variable("w", [3], DType::F32, init));
    assert_eq!(w1, w2);
    assert_eq!(g.node_name(w1.node), "tower/w");
    let w3 = g.variable_scope("tower", Reuse::Auto, |g| g.get_variable("v", [2], DType::F32, init));
    assert_eq!(g.node_name(w3.node), "tower/v");
    g.status().unwrap();
    // Creating again without reuse is refused.
    g.variable_scope("tower", Reuse::No, |g| g.get_variable("w", [3], DType::F32, init));
    assert_eq!(g.status().unwrap_err().code, Code::InvalidArgument);
    // Reusing a missing variable is refused.
    let g = Graph::new();
    g.variable_scope("t", Reuse::Yes, |g| g.get_variable("nope", [3], DType::F32, init));
    assert!(g.status().unwrap_err().msg.contains("does not exist"));
}

#[test]
fn device_scopes_and_functions() {
    let g = Graph::new();
    let a = g.with_device("/job:ps/task:0", |g| g.scalar(1f32));
    assert_eq!(g.node(a.node).device, "/job:ps/task:0");
    let b = g.with_device("/job:worker", |g| g.with_device("/task:2/cpu:0", |g| g.scalar(1f32)));
    assert_eq!(g.node(b.node).device, "/job:worker/task:2/device:CPU:0");
    // A device function sees the node and decides; inner scopes still override it.
    let setter = DeviceScope::func(|n: &NodeDef| {
        if n.op == "VariableV2" {
            DeviceName::parse("/job:ps/task:1").unwrap()
        } else {
            DeviceName::parse("/job:worker/task:0").unwrap()
        }
    });
    let (v, c, inner) = g.with_device(setter, |g| {
        let v = g.variable("v", g.scalar(0f32));
        let c = g.scalar(2f32);
        let inner = g.with_device("/task:7", |g| g.scalar(3f32));
        (v, c, inner)
    });
    assert_eq!(g.node(v.node).device, "/job:ps/task:1");
    assert_eq!(g.node(c.node).device, "/job:worker/task:0");
    assert_eq!(g.node(inner.node).device, "/job:worker/task:7");
}

#[test]
fn control_dependencies_colocation_and_containers() {
    let g = Graph::new();
    let a = g.scalar(1f32);
    let b = g.with_control_dependencies(&[a], |g| g.scalar(2f32));
    assert_eq!(g.node(b.node).control_inputs, vec![a.node]);
    let v = g.with_device("/job:ps/task:0", |g| g.variable("v", g.scalar(0f32)));
    let n = g.colocate_with(v, |g| g.scalar(5f32));
    assert_eq!(g.node(n.node).colocation_names(), vec!["v"]);
    assert_eq!(g.node(n.node).device, "/job:ps/task:0");
    let w = g.with_container("exp1", |g| g.variable("w", g.scalar(0f32)));
    assert_eq!(g.node(w.node).attrs.str("container").unwrap(), "exp1");
}

#[test]
fn graph_def_round_trips_through_postcard() {
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [None, Some(4)]);
    let w = g.variable("w", g.truncated_normal([4, 2], 0.1, 7));
    let y = g.add(g.matmul(x, w), g.constant(Tensor::vector(&[1f32, 2.0])));
    g.group("done", &[y]);
    let def = g.to_graph_def();
    let bytes = postcard::to_allocvec(&def).unwrap();
    let back: GraphDef = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, def);
    back.validate().unwrap();
    let mut broken = def.clone();
    broken.nodes[5].inputs.push(Output::new(NodeId(999), 0));
    assert_eq!(broken.validate().unwrap_err().code, Code::InvalidArgument);
}

#[test]
fn tensors_share_and_copy_on_write() {
    let a = Tensor::new([2usize, 3], &[1f32, 2., 3., 4., 5., 6.]).unwrap();
    let mut b = a.clone();
    b.as_mut_slice::<f32>().unwrap()[0] = 9.0;
    assert_eq!(a.as_slice::<f32>().unwrap()[0], 1.0);
    assert_eq!(b.as_slice::<f32>().unwrap()[0], 9.0);
    assert_eq!(a.as_slice::<i32>().unwrap_err().code, Code::InvalidArgument);
    assert_eq!(Tensor::new([4usize], &[1f32]).unwrap_err().code, Code::InvalidArgument);
    let big = Tensor::zeros(DType::F32, [1000usize]);
    assert_eq!(big.as_bytes().unwrap().as_ptr() as usize % 64, 0, "64-byte aligned");
    let s = Tensor::from_strings([2usize], vec![b"a".to_vec(), b"bc".to_vec()]).unwrap();
    assert_eq!(s.strings().unwrap()[1], b"bc");
    let h = Tensor::vector(&[half::f16::from_f32(1.5), half::f16::from_f32(2.0)]);
    assert_eq!(h.dtype(), DType::F16);
    let bytes = postcard::to_allocvec(&a).unwrap();
    assert_eq!(postcard::from_bytes::<Tensor>(&bytes).unwrap(), a);
    assert_eq!(a.reshape(Shape::new(&[3, 2]).unwrap()).unwrap().shape().dims(), &[3, 2]);
    assert_eq!(a.reshape(Shape::new(&[4]).unwrap()).unwrap_err().code, Code::InvalidArgument);
}
