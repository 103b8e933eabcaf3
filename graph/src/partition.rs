//! Step graphs and partitions. `prune_and_rewrite` keeps the nodes a step needs and turns feeds
//! into `_Arg` and fetches into `_Retval` nodes; `partition` splits a placed graph per device,
//! with one `_Send`/`_Recv` pair per tensor and destination, and dummy tensors for control edges.

use crate::{
    attrs, AttrsExt, DType, DeviceName, Error, GraphDef, NodeDef, NodeId, OpRegistry, Output, Result, Tensor,
    TensorInfo,
};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Where a step's feeds and fetches went in the rewritten graph.
#[derive(Clone, Debug)]
pub struct StepGraph {
    pub graph: GraphDef,
    /// Feed `i` is `_Arg` index `i`; its static type.
    pub feed_types: Vec<TensorInfo>,
    /// Original node id of each node of `graph` (`None` for added `_Arg`/`_Retval` nodes).
    pub origin: Vec<Option<NodeId>>,
}

/// Keeps the nodes needed for `fetches` and `targets`, replacing each fed output by an `_Arg`
/// node and each fetch by a `_Retval` node, both requested on `client_device`.
pub fn prune_and_rewrite(
    full: &GraphDef,
    feeds: &[Output],
    fetches: &[Output],
    targets: &[NodeId],
    client_device: &DeviceName,
    ops: &OpRegistry,
) -> Result<StepGraph> {
    let n = full.nodes.len();
    let check = |o: &Output, what: &str| -> Result<()> {
        let node = full.nodes.get(o.node.0 as usize).ok_or_else(|| {
            Error::failed_precondition(format!(
                "{what} {o:?} is not in the session's graph; call extend() after adding nodes"
            ))
        })?;
        if o.index as usize >= node.outputs.len() {
            return Err(Error::invalid_argument(format!(
                "{what} '{}:{}' does not exist: '{}' has {} outputs",
                node.name,
                o.index,
                node.name,
                node.outputs.len()
            )));
        }
        Ok(())
    };
    let mut fed: HashMap<Output, usize> = HashMap::new();
    for (i, f) in feeds.iter().enumerate() {
        check(f, "feed")?;
        if fed.insert(*f, i).is_some() {
            let name = &full.node(f.node).name;
            return Err(Error::invalid_argument(format!("'{name}:{}' is fed twice", f.index)));
        }
    }
    for f in fetches {
        check(f, "fetch")?;
    }
    for t in targets {
        if t.0 as usize >= n {
            return Err(Error::failed_precondition(format!(
                "target {t:?} is not in the session's graph; call extend() after adding nodes"
            )));
        }
    }
    // A node all of whose outputs are fed is replaced by the feeds: control edges from it wait
    // for its first `_Arg` instead, and it never runs.
    let fully_fed = |id: NodeId| {
        let outs = full.nodes[id.0 as usize].outputs.len();
        outs > 0 && (0..outs as u32).all(|i| fed.contains_key(&Output::new(id, i)))
    };
    // Backward reachability, not crossing fed edges.
    let mut needed = vec![false; n];
    let mut stack: Vec<usize> = Vec::new();
    for f in fetches {
        if !fed.contains_key(f) {
            stack.push(f.node.0 as usize);
        }
    }
    stack.extend(targets.iter().map(|t| t.0 as usize));
    while let Some(i) = stack.pop() {
        if needed[i] {
            continue;
        }
        needed[i] = true;
        let node = &full.nodes[i];
        for inp in &node.inputs {
            if !fed.contains_key(inp) {
                stack.push(inp.node.0 as usize);
            }
        }
        stack.extend(node.control_inputs.iter().filter(|c| !fully_fed(**c)).map(|c| c.0 as usize));
    }
    let mut new_id = vec![u32::MAX; n];
    let mut nodes = Vec::new();
    let mut origin = Vec::new();
    for (i, node) in full.nodes.iter().enumerate() {
        if needed[i] {
            new_id[i] = nodes.len() as u32;
            nodes.push(node.clone());
            origin.push(Some(NodeId(i as u32)));
        }
    }
    let dev = client_device.to_string();
    let mut feed_types = Vec::with_capacity(feeds.len());
    let mut arg_node = HashMap::new();
    for (i, f) in feeds.iter().enumerate() {
        let src = full.node(f.node);
        let info = src.outputs[f.index as usize].clone();
        feed_types.push(TensorInfo { is_ref: false, ..info.clone() });
        let id = nodes.len() as u32;
        nodes.push(NodeDef {
            name: format!("_arg_{}_{}_{i}", src.name, f.index),
            op: "_Arg".into(),
            inputs: vec![],
            control_inputs: vec![],
            device: dev.clone(),
            attrs: attrs! { "T" => info.dtype, "index" => i as i64, "shape" => info.shape.clone() },
            outputs: vec![TensorInfo { is_ref: false, ..info }],
        });
        origin.push(None);
        arg_node.insert(*f, id);
    }
    let remap = |o: &Output, consumer: &str, by_ref: bool| -> Result<Output> {
        if let Some(&a) = arg_node.get(o) {
            if by_ref {
                return Err(Error::invalid_argument(format!(
                    "'{}' updates variable '{}', which is fed; a fed value cannot be updated",
                    consumer,
                    full.node(o.node).name
                )));
            }
            return Ok(Output::new(NodeId(a), 0));
        }
        Ok(Output::new(NodeId(new_id[o.node.0 as usize]), o.index))
    };
    for node in nodes.iter_mut().take(origin.iter().filter(|o| o.is_some()).count()) {
        let refs_in = node.inputs.iter().map(|o| full.node(o.node).outputs[o.index as usize].is_ref);
        let flags: Vec<bool> = refs_in.collect();
        let name = node.name.clone();
        let mut ins = Vec::with_capacity(node.inputs.len());
        for (k, o) in node.inputs.iter().enumerate() {
            // A reference consumer of a fed variable is refused; others read the fed value.
            let by_ref = flags[k] && ops.get(&node.op).is_ok_and(|op| op.is_ref_input(k));
            ins.push(remap(o, &name, by_ref)?);
        }
        node.inputs = ins;
        node.control_inputs = node
            .control_inputs
            .iter()
            .map(|c| match fully_fed(*c) {
                true => NodeId(arg_node[&Output::new(*c, 0)]),
                false => NodeId(new_id[c.0 as usize]),
            })
            .collect();
    }
    for (j, f) in fetches.iter().enumerate() {
        let input = remap(f, "fetch", false)?;
        let src = full.node(f.node);
        nodes.push(NodeDef {
            name: format!("_retval_{}_{}_{j}", src.name, f.index),
            op: "_Retval".into(),
            inputs: vec![input],
            control_inputs: vec![],
            device: dev.clone(),
            attrs: attrs! { "index" => j as i64 },
            outputs: vec![],
        });
        origin.push(None);
    }
    Ok(StepGraph { graph: GraphDef { nodes }, feed_types, origin })
}

/// Options of `partition`.
pub struct PartitionOptions<'a> {
    /// The incarnation of each device, written into rendezvous keys.
    pub incarnation: &'a dyn Fn(&DeviceName) -> u64,
    /// Cast tensors on edges that cross tasks to this dtype (f16/bf16) and back, halving bytes.
    pub cross_task_cast: Option<DType>,
}

/// Splits a placed graph into one graph per device. `devices[i]` is node `i`'s device.
pub fn partition(
    graph: &GraphDef,
    devices: &[DeviceName],
    opts: &PartitionOptions<'_>,
) -> Result<BTreeMap<DeviceName, GraphDef>> {
    let mut parts: BTreeMap<DeviceName, GraphDef> = BTreeMap::new();
    let mut local = Vec::with_capacity(graph.nodes.len());
    for (node, d) in graph.nodes.iter().zip(devices) {
        let p = parts.entry(d.clone()).or_default();
        local.push(p.nodes.len() as u32);
        let mut copy = node.clone();
        copy.device = d.to_string();
        p.nodes.push(copy);
    }
    // (src output, dst device) -> recv node in dst partition
    let mut recvs: HashMap<(Output, DeviceName), u32> = HashMap::new();
    let mut ctrl_recvs: HashMap<(NodeId, DeviceName), u32> = HashMap::new();
    let mut used_names: HashSet<String> = graph.nodes.iter().map(|n| n.name.clone()).collect();
    let mut fresh = |base: String| -> String {
        let mut name = base.clone();
        let mut k = 0;
        while !used_names.insert(name.clone()) {
            k += 1;
            name = format!("{base}_{k}");
        }
        name
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        let dst = &devices[i];
        let mut new_inputs = Vec::with_capacity(node.inputs.len());
        for inp in &node.inputs {
            let s = inp.node.0 as usize;
            let src = &devices[s];
            if src == dst {
                new_inputs.push(Output::new(NodeId(local[s]), inp.index));
                continue;
            }
            let info = graph.nodes[s].outputs[inp.index as usize].clone();
            let key = (*inp, dst.clone());
            let r = match recvs.get(&key) {
                Some(&r) => r,
                None => {
                    let edge = format!("{}:{}", graph.nodes[s].name, inp.index);
                    let cast =
                        opts.cross_task_cast.filter(|_| !src.same_task(dst) && info.dtype == DType::F32);
                    let wire_type = cast.unwrap_or(info.dtype);
                    // Sender side (with an optional cast down to the wire dtype).
                    let sp = parts.get_mut(src).ok_or_else(|| Error::internal("source partition missing"))?;
                    let mut send_input = Output::new(NodeId(local[s]), inp.index);
                    if let Some(ct) = cast {
                        let id = sp.nodes.len() as u32;
                        sp.nodes.push(NodeDef {
                            name: fresh(format!(
                                "{}/_cast_{}_to_{}",
                                graph.nodes[s].name,
                                inp.index,
                                ct.name()
                            )),
                            op: "Cast".into(),
                            inputs: vec![send_input],
                            control_inputs: vec![],
                            device: src.to_string(),
                            attrs: attrs! { "SrcT" => info.dtype, "DstT" => ct },
                            outputs: vec![TensorInfo::new(ct, info.shape.clone())],
                        });
                        send_input = Output::new(NodeId(id), 0);
                    }
                    let key_attrs = attrs! {
                        "tensor_name" => edge.clone(),
                        "send_device" => src.to_string(),
                        "recv_device" => dst.to_string(),
                        "send_device_incarnation" => (opts.incarnation)(src) as i64,
                        "tensor_type" => wire_type,
                        "shape" => info.shape.clone()
                    };
                    sp.nodes.push(NodeDef {
                        name: fresh(format!("{}/_send_{}", graph.nodes[s].name, inp.index)),
                        op: "_Send".into(),
                        inputs: vec![send_input],
                        control_inputs: vec![],
                        device: src.to_string(),
                        attrs: key_attrs.clone(),
                        outputs: vec![],
                    });
                    let dp =
                        parts.get_mut(dst).ok_or_else(|| Error::internal("destination partition missing"))?;
                    let rid = dp.nodes.len() as u32;
                    dp.nodes.push(NodeDef {
                        name: fresh(format!("{}/_recv_{}", graph.nodes[s].name, inp.index)),
                        op: "_Recv".into(),
                        inputs: vec![],
                        control_inputs: vec![],
                        device: dst.to_string(),
                        attrs: key_attrs,
                        outputs: vec![TensorInfo::new(wire_type, info.shape.clone())],
                    });
                    let out_id = if cast.is_some() {
                        let cid = dp.nodes.len() as u32;
                        dp.nodes.push(NodeDef {
                            name: fresh(format!("{}/_uncast_{}", graph.nodes[s].name, inp.index)),
                            op: "Cast".into(),
                            inputs: vec![Output::new(NodeId(rid), 0)],
                            control_inputs: vec![],
                            device: dst.to_string(),
                            attrs: attrs! { "SrcT" => wire_type, "DstT" => info.dtype },
                            outputs: vec![TensorInfo::new(info.dtype, info.shape.clone())],
                        });
                        cid
                    } else {
                        rid
                    };
                    recvs.insert(key, out_id);
                    out_id
                }
            };
            new_inputs.push(Output::new(NodeId(r), 0));
        }
        let mut new_ctrl = Vec::with_capacity(node.control_inputs.len());
        for c in &node.control_inputs {
            let s = c.0 as usize;
            let src = &devices[s];
            if src == dst {
                new_ctrl.push(NodeId(local[s]));
                continue;
            }
            let key = (*c, dst.clone());
            let r = match ctrl_recvs.get(&key) {
                Some(&r) => r,
                None => {
                    let edge = format!("{}:control", graph.nodes[s].name);
                    let sp = parts.get_mut(src).ok_or_else(|| Error::internal("source partition missing"))?;
                    let dummy = sp.nodes.len() as u32;
                    sp.nodes.push(NodeDef {
                        name: fresh(format!("{}/_control_dummy", graph.nodes[s].name)),
                        op: "Const".into(),
                        inputs: vec![],
                        control_inputs: vec![NodeId(local[s])],
                        device: src.to_string(),
                        attrs: attrs! { "value" => Tensor::scalar(0f32) },
                        outputs: vec![TensorInfo::new(DType::F32, crate::PartialShape::scalar())],
                    });
                    let key_attrs = attrs! {
                        "tensor_name" => edge,
                        "send_device" => src.to_string(),
                        "recv_device" => dst.to_string(),
                        "send_device_incarnation" => (opts.incarnation)(src) as i64,
                        "tensor_type" => DType::F32,
                        "shape" => crate::PartialShape::scalar()
                    };
                    sp.nodes.push(NodeDef {
                        name: fresh(format!("{}/_control_send", graph.nodes[s].name)),
                        op: "_Send".into(),
                        inputs: vec![Output::new(NodeId(dummy), 0)],
                        control_inputs: vec![],
                        device: src.to_string(),
                        attrs: key_attrs.clone(),
                        outputs: vec![],
                    });
                    let dp =
                        parts.get_mut(dst).ok_or_else(|| Error::internal("destination partition missing"))?;
                    let rid = dp.nodes.len() as u32;
                    dp.nodes.push(NodeDef {
                        name: fresh(format!("{}/_control_recv", graph.nodes[s].name)),
                        op: "_Recv".into(),
                        inputs: vec![],
                        control_inputs: vec![],
                        device: dst.to_string(),
                        attrs: key_attrs,
                        outputs: vec![TensorInfo::new(DType::F32, crate::PartialShape::scalar())],
                    });
                    ctrl_recvs.insert(key, rid);
                    rid
                }
            };
            new_ctrl.push(NodeId(r));
        }
        let p = parts.get_mut(dst).ok_or_else(|| Error::internal("partition missing"))?;
        let me = &mut p.nodes[local[i] as usize];
        me.inputs = new_inputs;
        me.control_inputs = new_ctrl;
    }
    Ok(parts)
}

/// The rendezvous key attributes of a `_Send`/`_Recv` node, parsed.
pub fn rendezvous_key_of(node: &NodeDef) -> Result<crate::RendezvousKey> {
    let a = &node.attrs;
    let src = DeviceName::parse(a.str("send_device")?)?;
    let dst = DeviceName::parse(a.str("recv_device")?)?;
    let inc = a.int("send_device_incarnation")? as u64;
    Ok(crate::RendezvousKey::new(&src, inc, &dst, a.str("tensor_name")?))
}
