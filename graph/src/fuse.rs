//! Kernel fusion on a partition before it runs: `MatMul → BiasAdd (→ Relu)` becomes one
//! `_FusedMatMul` node where the device has a kernel for it, as TensorFlow's remapper does, and
//! so does `MatMul → ReluGrad` (the backward pass through a ReLU layer). The
//! fused node keeps the last node's name, outputs and place, so fetches, sends and errors name
//! what the user built; the product, bias and activation then share one pass over the output,
//! done by each thread on the part it computed.

use crate::{AttrValue, AttrsExt, DType, GraphDef, KernelRegistry, NodeDef, NodeId, Output};

/// The op that replaces a fusable chain; its `fused_ops` attribute lists what follows the product
/// (`BiasAdd`, `BiasAdd` then `Relu`, or `ReluGrad`), and its third input is what that takes
/// besides the product (the bias, or ReluGrad's features).
pub const FUSED_MATMUL: &str = "_FusedMatMul";

const BIAS_RELU: [&str; 2] = ["BiasAdd", "Relu"];
const BIAS: [&str; 1] = ["BiasAdd"];
const RELU_GRAD: [&str; 1] = ["ReluGrad"];

/// A fusable chain: the product, the BiasAdd between it and a Relu, the last node, what follows
/// the product, and the fused node's third input.
struct Chain {
    mm: usize,
    mid: Option<usize>,
    last: usize,
    ops: &'static [&'static str],
    extra: Output,
}

/// The partition with every fusable chain replaced, or `None` when nothing was fused (or
/// `device_type` has no fused kernel).
pub fn fuse_matmul_chains(g: &GraphDef, kernels: &KernelRegistry, device_type: &str) -> Option<GraphDef> {
    if !kernels.has_op(FUSED_MATMUL, device_type) {
        return None;
    }
    let n = g.nodes.len();
    // Data and control edges out of each node: an intermediate must feed only the next link.
    let mut uses = vec![0usize; n];
    for node in &g.nodes {
        for i in &node.inputs {
            uses[i.node.0 as usize] += 1;
        }
        for c in &node.control_inputs {
            uses[c.0 as usize] += 1;
        }
    }
    // The only producer of input 0 of `id`, when it is output 0 of an `op` node used nowhere else.
    let sole_producer = |id: usize, op: &str| -> Option<usize> {
        let src = *g.nodes[id].inputs.first()?;
        let p = src.node.0 as usize;
        (src.index == 0 && g.nodes[p].op == op && uses[p] == 1).then_some(p)
    };
    let f32_matmul =
        |m: usize| g.nodes[m].outputs.first().is_some_and(|t| t.dtype == DType::F32 && !t.is_ref);
    // The chains, longest first: a BiasAdd that ends up inside a Relu chain ends no other.
    let mut chains: Vec<Chain> = Vec::new();
    let mut in_chain = vec![false; n];
    let kinds: [(&'static [&'static str], &str); 3] =
        [(&BIAS_RELU, "Relu"), (&BIAS, "BiasAdd"), (&RELU_GRAD, "ReluGrad")];
    for (ops, last_op) in kinds {
        for (last, node) in g.nodes.iter().enumerate() {
            if node.op != last_op || in_chain[last] {
                continue;
            }
            let mid = match last_op {
                "Relu" => match sole_producer(last, "BiasAdd") {
                    Some(b) => Some(b),
                    None => continue,
                },
                _ => None,
            };
            // The node that takes the product, with the fused node's third input as its second.
            let taker = mid.unwrap_or(last);
            if g.nodes[taker].inputs.len() != 2 || in_chain[taker] {
                continue;
            }
            let Some(mm) = sole_producer(taker, "MatMul").filter(|&m| f32_matmul(m)) else {
                continue;
            };
            for i in [Some(mm), mid, Some(last)].into_iter().flatten() {
                in_chain[i] = true;
            }
            chains.push(Chain { mm, mid, last, ops, extra: g.nodes[taker].inputs[1] });
        }
    }
    if chains.is_empty() {
        return None;
    }
    let mut nodes: Vec<Option<NodeDef>> = g.nodes.iter().cloned().map(Some).collect();
    for chain in &chains {
        let (m, l) = (&g.nodes[chain.mm], &g.nodes[chain.last]);
        let mut control: Vec<NodeId> = Vec::new();
        let mid_control = chain.mid.map(|b| g.nodes[b].control_inputs.as_slice()).unwrap_or_default();
        for c in m.control_inputs.iter().chain(mid_control).chain(&l.control_inputs) {
            if !control.contains(c) {
                control.push(*c);
            }
        }
        let mut attrs = crate::Attrs::new();
        attrs.insert("T".into(), AttrValue::Type(DType::F32));
        for t in ["transpose_a", "transpose_b"] {
            attrs.insert(t.into(), AttrValue::Bool(m.attrs.bool_or(t, false)));
        }
        attrs.insert("fused_ops".into(), AttrValue::Strs(chain.ops.iter().map(|o| o.to_string()).collect()));
        nodes[chain.last] = Some(NodeDef {
            name: l.name.clone(),
            op: FUSED_MATMUL.into(),
            inputs: vec![m.inputs[0], m.inputs[1], chain.extra],
            control_inputs: control,
            device: l.device.clone(),
            attrs,
            outputs: l.outputs.clone(),
        });
        nodes[chain.mm] = None;
        if let Some(b) = chain.mid {
            nodes[b] = None;
        }
    }
    // Renumber what is left; no kept node reads a removed one (each fed only its chain).
    let mut new_id = vec![u32::MAX; n];
    let mut kept = 0u32;
    for (i, node) in nodes.iter().enumerate() {
        if node.is_some() {
            new_id[i] = kept;
            kept += 1;
        }
    }
    let remap = |id: NodeId| NodeId(new_id[id.0 as usize]);
    let nodes = nodes
        .into_iter()
        .flatten()
        .map(|mut node| {
            node.inputs = node.inputs.iter().map(|o| Output::new(remap(o.node), o.index)).collect();
            node.control_inputs = node.control_inputs.iter().map(|&c| remap(c)).collect();
            node
        })
        .collect();
    Some(GraphDef { nodes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Graph, KernelDef, KernelInit, Result};

    fn no_kernel(_: &KernelInit<'_>) -> Result<crate::Kernel> {
        Err(crate::Error::internal("not instantiated by these tests"))
    }

    static FUSED_ON_CPU: [KernelDef; 1] = [KernelDef::new(FUSED_MATMUL, "CPU", no_kernel)];

    fn cpu_fused() -> KernelRegistry {
        let mut r = KernelRegistry::new();
        r.add(&FUSED_ON_CPU);
        r
    }

    fn ops(g: &GraphDef) -> Vec<(String, String)> {
        g.nodes.iter().map(|n| (n.name.clone(), n.op.clone())).collect()
    }

    fn find<'a>(g: &'a GraphDef, name: &str) -> &'a NodeDef {
        g.nodes.iter().find(|n| n.name == name).expect("node kept")
    }

    #[test]
    fn chains_fuse_into_their_last_node_and_everything_else_stays() {
        let g = Graph::new();
        let x = g.placeholder("x", DType::F32, [4, 3]);
        let w = g.placeholder("w", DType::F32, [5, 3]);
        let b = g.placeholder("b", DType::F32, [5]);
        let gate = g.no_op("gate");
        // MatMul → BiasAdd → Relu, with control inputs on the links: one node, all of them.
        let h =
            g.with_control_dependencies(&[gate], |g| g.relu(g.bias_add(g.matmul_t(x, w, false, true), b)));
        // MatMul → BiasAdd read twice: the BiasAdd is the chain's end, both Relus stay.
        let y = g.bias_add(g.matmul_t(h, g.placeholder("v", DType::F32, [5, 2]), false, false), g.zeros([2]));
        let (r1, r2) = (g.relu(y), g.relu(y));
        // A product also read elsewhere is not fused.
        let shared = g.matmul_t(x, w, false, true);
        let kept = g.bias_add(shared, b);
        let also = g.identity(shared);
        // MatMul → ReluGrad (the product as the gradients): fused with the features as input.
        let relu_grad = |dy: Output, features: Output| {
            g.custom(crate::ops::core_op("ReluGrad"), "relu_grad", &[dy, features], crate::Attrs::new())
        };
        let dx = relu_grad(g.matmul_t(x, x, true, false), g.placeholder("f", DType::F32, [3, 3]));
        // The product as the features is no gradient chain.
        let not_grad = relu_grad(g.placeholder("dy", DType::F32, [4, 5]), g.matmul_t(x, w, false, true));
        let def = g.to_graph_def();
        let fused = fuse_matmul_chains(&def, &cpu_fused(), "CPU").expect("three chains fuse");
        fused.validate().unwrap();
        assert_eq!(fused.nodes.len(), def.nodes.len() - 4, "{:?}", ops(&fused));
        let grad = find(&fused, &def.node(dx.node).name);
        assert_eq!(
            (grad.op.as_str(), grad.attrs.strs("fused_ops").unwrap()),
            (FUSED_MATMUL, &["ReluGrad".to_string()][..])
        );
        let names: Vec<&str> = grad.inputs.iter().map(|o| fused.node(o.node).name.as_str()).collect();
        assert_eq!(names, ["x", "x", "f"]);
        assert!(grad.attrs.bool_or("transpose_a", false) && !grad.attrs.bool_or("transpose_b", true));
        assert_eq!(find(&fused, &def.node(not_grad.node).name).op, "ReluGrad");
        let relu = find(&fused, &def.node(h.node).name);
        assert_eq!(relu.op, FUSED_MATMUL);
        assert_eq!(relu.attrs.strs("fused_ops").unwrap(), ["BiasAdd", "Relu"]);
        assert!(relu.attrs.bool_or("transpose_b", false) && !relu.attrs.bool_or("transpose_a", true));
        let names: Vec<&str> = relu.inputs.iter().map(|o| fused.node(o.node).name.as_str()).collect();
        assert_eq!(names, ["x", "w", "b"]);
        let control: Vec<&str> = relu.control_inputs.iter().map(|&c| fused.node(c).name.as_str()).collect();
        assert_eq!(control, ["gate"]);
        let bias_add = find(&fused, &def.node(y.node).name);
        assert_eq!(bias_add.op, FUSED_MATMUL);
        assert_eq!(bias_add.attrs.strs("fused_ops").unwrap(), ["BiasAdd"]);
        assert_eq!(fused.node(bias_add.inputs[0].node).name, relu.name, "reads the first chain");
        for r in [r1, r2] {
            let node = find(&fused, &def.node(r.node).name);
            assert_eq!(
                (node.op.as_str(), fused.node(node.inputs[0].node).name.as_str()),
                ("Relu", &*bias_add.name)
            );
        }
        for (o, op) in [(shared, "MatMul"), (kept, "BiasAdd"), (also, "Identity")] {
            assert_eq!(find(&fused, &def.node(o.node).name).op, op);
        }
    }

    #[test]
    fn nothing_fuses_without_a_fused_kernel_or_a_chain() {
        let g = Graph::new();
        let x = g.placeholder("x", DType::F32, [4, 3]);
        let _ = g.relu(g.bias_add(g.matmul_t(x, x, true, false), g.zeros([3])));
        let def = g.to_graph_def();
        assert!(fuse_matmul_chains(&def, &cpu_fused(), "GPU").is_none());
        assert!(fuse_matmul_chains(&def, &KernelRegistry::new(), "CPU").is_none());
        let g = Graph::new();
        let x = g.placeholder("x", DType::F64, [4, 3]);
        let _ = g.relu(g.bias_add(
            g.matmul_t(x, x, true, false),
            g.fill(crate::Shape::vector(3), crate::Tensor::scalar(0f64)),
        ));
        let _ = g.relu(g.bias_add(g.placeholder("y", DType::F32, [2, 2]), g.zeros([2])));
        assert!(fuse_matmul_chains(&g.to_graph_def(), &cpu_fused(), "CPU").is_none(), "f64, or no product");
    }
}
