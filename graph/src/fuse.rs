//! Kernel fusion on a partition before it runs: `MatMul → BiasAdd (→ Relu)` becomes one
//! `_FusedMatMul` node where the device has a kernel for it, as TensorFlow's remapper does. The
//! fused node keeps the last node's name, outputs and place, so fetches, sends and errors name
//! what the user built; the product, bias and activation then share one pass over the output,
//! done by each thread on the part it computed.

use crate::{AttrValue, AttrsExt, DType, GraphDef, KernelRegistry, NodeDef, NodeId, Output};

/// The op that replaces a fusable chain; its `fused_ops` attribute lists what follows the product.
pub const FUSED_MATMUL: &str = "_FusedMatMul";

/// The partition with every fusable chain replaced, or `None` when nothing was fused (or
/// `device_type` has no fused kernel).
pub fn fuse_matmul_bias(g: &GraphDef, kernels: &KernelRegistry, device_type: &str) -> Option<GraphDef> {
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
    // (MatMul, BiasAdd, last node, with ReLU) per chain; a BiasAdd joins at most one chain.
    let mut chains: Vec<(usize, usize, usize, bool)> = Vec::new();
    let mut in_chain = vec![false; n];
    for relu in [true, false] {
        for (last, node) in g.nodes.iter().enumerate() {
            let bias_add = if relu {
                if node.op != "Relu" {
                    continue;
                }
                match sole_producer(last, "BiasAdd") {
                    Some(b) => b,
                    None => continue,
                }
            } else if node.op == "BiasAdd" {
                last
            } else {
                continue;
            };
            if in_chain[bias_add] || g.nodes[bias_add].inputs.len() != 2 {
                continue;
            }
            let Some(mm) = sole_producer(bias_add, "MatMul").filter(|&m| f32_matmul(m)) else {
                continue;
            };
            for i in [mm, bias_add, last] {
                in_chain[i] = true;
            }
            chains.push((mm, bias_add, last, relu));
        }
    }
    if chains.is_empty() {
        return None;
    }
    let mut nodes: Vec<Option<NodeDef>> = g.nodes.iter().cloned().map(Some).collect();
    for &(mm, bias_add, last, relu) in &chains {
        let (m, b, l) = (&g.nodes[mm], &g.nodes[bias_add], &g.nodes[last]);
        let mut control: Vec<NodeId> = Vec::new();
        for c in m.control_inputs.iter().chain(&b.control_inputs).chain(&l.control_inputs) {
            if !control.contains(c) {
                control.push(*c);
            }
        }
        let mut attrs = crate::Attrs::new();
        attrs.insert("T".into(), AttrValue::Type(DType::F32));
        for t in ["transpose_a", "transpose_b"] {
            attrs.insert(t.into(), AttrValue::Bool(m.attrs.bool_or(t, false)));
        }
        let ops =
            if relu { vec!["BiasAdd".to_string(), "Relu".to_string()] } else { vec!["BiasAdd".to_string()] };
        attrs.insert("fused_ops".into(), AttrValue::Strs(ops));
        nodes[last] = Some(NodeDef {
            name: l.name.clone(),
            op: FUSED_MATMUL.into(),
            inputs: vec![m.inputs[0], m.inputs[1], b.inputs[1]],
            control_inputs: control,
            device: l.device.clone(),
            attrs,
            outputs: l.outputs.clone(),
        });
        nodes[mm] = None;
        if bias_add != last {
            nodes[bias_add] = None;
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
        let def = g.to_graph_def();
        let fused = fuse_matmul_bias(&def, &cpu_fused(), "CPU").expect("two chains fuse");
        fused.validate().unwrap();
        assert_eq!(fused.nodes.len(), def.nodes.len() - 3, "{:?}", ops(&fused));
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
        assert!(fuse_matmul_bias(&def, &cpu_fused(), "GPU").is_none());
        assert!(fuse_matmul_bias(&def, &KernelRegistry::new(), "CPU").is_none());
        let g = Graph::new();
        let x = g.placeholder("x", DType::F64, [4, 3]);
        let _ = g.relu(g.bias_add(
            g.matmul_t(x, x, true, false),
            g.fill(crate::Shape::vector(3), crate::Tensor::scalar(0f64)),
        ));
        let _ = g.relu(g.bias_add(g.placeholder("y", DType::F32, [2, 2]), g.zeros([2])));
        assert!(fuse_matmul_bias(&g.to_graph_def(), &cpu_fused(), "CPU").is_none(), "f64, or no product");
    }
}
