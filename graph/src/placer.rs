//! The placer: assigns every node a device, following TensorFlow's rules in order — a node
//! placed in an earlier run stays; reference edges and colocation groups are placed together; a
//! requested (full or partial) device is honoured; otherwise the highest-priority device (GPU
//! before CPU) with a kernel for the node's op and dtypes. Soft placement relaxes a request that
//! cannot be met.

use crate::device::{device_type_priority, DeviceAttributes};
use crate::{DType, DeviceName, Error, GraphDef, KernelRegistry, OpRegistry, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Per node name, the device types with a kernel for every member of its colocation group in the
/// session's whole graph (see [`group_support`]).
pub type GroupSupport = HashMap<String, Vec<&'static str>>;

#[derive(Clone, Debug, Default)]
pub struct PlacerOptions {
    pub allow_soft_placement: bool,
    pub log_device_placement: bool,
    /// Fills the job, replica and task of requests that leave them out (the session's task).
    pub default_device: DeviceName,
    /// The whole graph's groups, which a step's pruned graph may show only in part: a variable
    /// first placed by its initializer's step must already land where its optimizer's update
    /// (another step) has a kernel, as when TensorFlow places the whole graph at once.
    pub group_support: Option<Arc<GroupSupport>>,
}

/// The device of each node (indexed like the graph) and, per node, why it went there.
#[derive(Clone, Debug)]
pub struct Placement {
    pub devices: Vec<DeviceName>,
    pub explanations: Vec<String>,
}

impl Placement {
    /// `name: (Op): device` lines, as `log_device_placement` prints them.
    pub fn log_lines(&self, g: &GraphDef) -> Vec<String> {
        g.nodes.iter().zip(&self.devices).map(|(n, d)| format!("{}: ({}): {d}", n.name, n.op)).collect()
    }

    /// One line per node saying why it went where it went.
    pub fn explain(&self, g: &GraphDef) -> String {
        g.nodes.iter().zip(&self.explanations).map(|(n, e)| format!("{} ({}): {e}\n", n.name, n.op)).collect()
    }
}

/// The colocation groups (reference edges and colocation attributes, by union-find) as lists of
/// node indices, and per node the reasons it joined its group.
fn colocation_groups(graph: &GraphDef, ops: &OpRegistry) -> Result<(Vec<Vec<usize>>, Vec<Vec<String>>)> {
    let n = graph.nodes.len();
    let names = graph.name_index();
    let mut parent: Vec<usize> = (0..n).collect();
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); n];
    for (i, node) in graph.nodes.iter().enumerate() {
        let op = ops.get(&node.op).map_err(|e| e.context(format!("node '{}'", node.name)))?;
        for (k, inp) in node.inputs.iter().enumerate() {
            let src = inp.node.0 as usize;
            let dt = graph.nodes[src].outputs[inp.index as usize].dtype;
            if op.is_ref_input(k) || dt == DType::Resource {
                union(&mut parent, i, src);
                reasons[i].push(format!("reference edge from '{}'", graph.nodes[src].name));
            }
        }
        for c in node.colocation_names() {
            if let Some(&j) = names.get(c) {
                union(&mut parent, i, j.0 as usize);
                reasons[i].push(format!("colocated with '{c}'"));
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        let r = find(&mut parent, i);
        groups.entry(r).or_default().push(i);
    }
    Ok((groups.into_values().collect(), reasons))
}

/// Device types with a kernel for every one of `members`.
fn supported_by_all(graph: &GraphDef, members: &[usize], kernels: &KernelRegistry) -> Vec<&'static str> {
    let mut supported: Option<Vec<&'static str>> = None;
    for &m in members {
        let node = &graph.nodes[m];
        let dts: Vec<DType> = node
            .inputs
            .iter()
            .map(|o| graph.nodes[o.node.0 as usize].outputs[o.index as usize].dtype)
            .collect();
        let types = kernels.device_types_for(node, &dts);
        supported = Some(match supported {
            None => types,
            Some(s) => s.into_iter().filter(|t| types.contains(t)).collect(),
        });
    }
    supported.unwrap_or_default()
}

/// For [`PlacerOptions::group_support`]: each node of the session's whole graph mapped to the
/// device types that can run its whole colocation group.
pub fn group_support(full: &GraphDef, ops: &OpRegistry, kernels: &KernelRegistry) -> Result<GroupSupport> {
    let (groups, _) = colocation_groups(full, ops)?;
    let mut out = HashMap::with_capacity(full.nodes.len());
    for members in groups.iter().filter(|m| m.len() > 1) {
        let types = supported_by_all(full, members, kernels);
        for &m in members {
            out.insert(full.nodes[m].name.clone(), types.clone());
        }
    }
    Ok(out)
}

fn find(parent: &mut [usize], mut x: usize) -> usize {
    while parent[x] != x {
        parent[x] = parent[parent[x]];
        x = parent[x];
    }
    x
}

fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    if ra != rb {
        parent[ra.max(rb)] = ra.min(rb);
    }
}

/// Places `graph` on `devices`. `previous` holds placements from earlier runs (by node name).
pub fn place(
    graph: &GraphDef,
    devices: &[DeviceAttributes],
    ops: &OpRegistry,
    kernels: &KernelRegistry,
    previous: &HashMap<String, DeviceName>,
    opts: &PlacerOptions,
) -> Result<Placement> {
    let n = graph.nodes.len();
    let (groups, reasons) = colocation_groups(graph, ops)?;
    let mut out = vec![DeviceName::default(); n];
    let mut expl = vec![String::new(); n];
    for members in &groups {
        let group_names: Vec<&str> = members.iter().map(|&m| graph.nodes[m].name.as_str()).collect();
        let group_note =
            if members.len() > 1 { format!(" [group: {}]", group_names.join(", ")) } else { String::new() };
        let mut supported = supported_by_all(graph, members, kernels);
        if let Some(whole) = &opts.group_support {
            let mut narrowed = supported.clone();
            for &m in members {
                if let Some(types) = whole.get(&graph.nodes[m].name) {
                    narrowed.retain(|t| types.contains(t));
                }
            }
            // A whole-graph group no device runs entirely still places this step's part of it.
            if !narrowed.is_empty() {
                supported = narrowed;
            }
        }
        // Rule 1: an earlier placement of any member holds for the whole group, while that
        // device has a kernel for every member (a later step may add members, such as the
        // gradient ops colocated with a forward op, that it cannot run).
        if let Some(prev) = members.iter().find_map(|&m| previous.get(&graph.nodes[m].name)) {
            let held = devices.iter().find(|d| &d.name == prev);
            if held.is_some_and(|d| supported.contains(&d.device_type.as_str())) {
                for &m in members {
                    out[m] = prev.clone();
                    expl[m] = format!("{prev}: placed there by an earlier run{group_note}");
                }
                continue;
            }
        }
        // Rule 2 + 3: merge the members' requests.
        let mut spec = DeviceName::default();
        let mut spec_from: Option<&str> = None;
        for &m in members {
            let node = &graph.nodes[m];
            let req = DeviceName::parse(&node.device).map_err(|e| {
                Error::invalid_argument(format!(
                    "node '{}' ({}) requests a malformed device: {}",
                    node.name, node.op, e.msg
                ))
            })?;
            match spec.merge(&req) {
                Ok(s) => {
                    if !req.is_unspecified() && spec_from.is_none() {
                        spec_from = Some(&node.name);
                    }
                    spec = s;
                }
                Err(e) if opts.allow_soft_placement => {
                    let _ = e;
                }
                Err(e) => {
                    return Err(Error::invalid_argument(format!(
                        "Cannot colocate nodes {group_names:?}: node '{}' requests '{}' but '{}' requests '{spec}' ({})",
                        node.name,
                        node.device,
                        spec_from.unwrap_or("?"),
                        e.msg
                    )))
                }
            }
        }
        let requested = spec.clone();
        let d = &opts.default_device;
        spec.job = spec.job.or_else(|| d.job.clone());
        spec.replica = spec.replica.or(d.replica);
        spec.task = spec.task.or(d.task);
        fn by_priority(mut v: Vec<&DeviceAttributes>) -> Vec<&DeviceAttributes> {
            v.sort_by(|a, b| {
                device_type_priority(&b.device_type)
                    .cmp(&device_type_priority(&a.device_type))
                    .then_with(|| a.name.cmp(&b.name))
            });
            v
        }
        let ok = |dv: &&DeviceAttributes| supported.contains(&dv.device_type.as_str());
        let exact = by_priority(devices.iter().filter(|dv| spec.matches(&dv.name)).filter(ok).collect());
        let (chosen, how) = if let Some(c) = exact.first() {
            let how = if requested.is_unspecified() {
                format!("no request; highest-priority device with a kernel ({})", c.device_type)
            } else {
                format!("requested '{requested}'")
            };
            (*c, how)
        } else if opts.allow_soft_placement {
            let task_spec = spec.task_name();
            let relaxed =
                by_priority(devices.iter().filter(|dv| task_spec.matches(&dv.name)).filter(ok).collect());
            let any = by_priority(devices.iter().filter(ok).collect());
            match relaxed.first().or(any.first()) {
                Some(c) => (
                    *c,
                    format!(
                        "requested '{requested}' could not be met; soft placement chose {}",
                        c.device_type
                    ),
                ),
                None => return Err(no_kernel(graph, members, &group_names, &requested, devices, &supported)),
            }
        } else {
            return Err(no_kernel(graph, members, &group_names, &requested, devices, &supported));
        };
        for &m in members {
            out[m] = chosen.name.clone();
            let why =
                if reasons[m].is_empty() { String::new() } else { format!("; {}", reasons[m].join(", ")) };
            expl[m] = format!("{}: {how}{why}{group_note}", chosen.name);
        }
    }
    let p = Placement { devices: out, explanations: expl };
    if opts.log_device_placement {
        for l in p.log_lines(graph) {
            eprintln!("{l}");
        }
    }
    Ok(p)
}

fn no_kernel(
    graph: &GraphDef,
    members: &[usize],
    group_names: &[&str],
    requested: &DeviceName,
    devices: &[DeviceAttributes],
    supported: &[&str],
) -> Error {
    let node = &graph.nodes[members[0]];
    let with_kernel: Vec<String> = devices
        .iter()
        .filter(|d| supported.contains(&d.device_type.as_str()))
        .map(|d| d.name.to_string())
        .collect();
    let matching = devices.iter().filter(|d| requested.matches(&d.name)).count();
    let why = if matching == 0 {
        "no device of this process matches it".to_string()
    } else {
        format!(
            "no kernel for {} on the matching devices (kernels exist for device types {supported:?})",
            node.op
        )
    };
    Error::invalid_argument(format!(
        "Cannot assign a device for operation '{}' ({}): could not satisfy the device specification '{requested}' because {why}. \
         Colocation group: {group_names:?}. Devices with a kernel: {with_kernel:?}. \
         Set allow_soft_placement to fall back to a device that has one.",
        node.name, node.op
    ))
}
