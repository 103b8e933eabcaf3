//! `replica_device_setter`: the device function of between-graph replication. Ops that hold
//! shared state (variables, accumulators, queues) go to the parameter-server tasks, round robin
//! or greedily by bytes; every other op goes to this replica's worker device. As in TensorFlow,
//! the function only fills fields the enclosing scopes left unset.

use rill_graph::{AttrsExt, DeviceName, DeviceScope, NodeDef};
use std::cell::RefCell;
use std::rc::Rc;

/// Ops placed on parameter servers by default: variables, accumulators and queue handles.
pub const STANDARD_PS_OPS: &[&str] = &[
    "Variable",
    "VariableV2",
    "VarHandleOp",
    "AutoReloadVariable",
    "ConditionalAccumulator",
    "FIFOQueueV2",
    "RandomShuffleQueueV2",
    "PaddingFIFOQueueV2",
    "PriorityQueueV2",
];

/// How ps ops are spread over the ps tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PsStrategy {
    /// Task 0, 1, .., ps_tasks-1, 0, .. in the order ops are created.
    #[default]
    RoundRobin,
    /// The task holding the fewest bytes so far (ties to the lowest index); an op's bytes are
    /// those of its `dtype` and fully known `shape` attributes, 0 when unknown.
    GreedyByBytes,
}

/// Options of `replica_device_setter`; `Default` gives TensorFlow's (no ps tasks: a no-op).
#[derive(Clone, Debug)]
pub struct ReplicaDeviceSetterOptions {
    /// Number of ps tasks; 0 leaves every device as the scopes set it.
    pub ps_tasks: usize,
    /// The (partial) device of the ps job, `/job:ps`; the task is chosen by `strategy`.
    pub ps_device: String,
    /// The device of everything else, `/job:worker/task:i`.
    pub worker_device: String,
    /// Op types placed on ps tasks.
    pub ps_ops: Vec<String>,
    pub strategy: PsStrategy,
}

impl Default for ReplicaDeviceSetterOptions {
    fn default() -> Self {
        ReplicaDeviceSetterOptions {
            ps_tasks: 0,
            ps_device: "/job:ps".into(),
            worker_device: "/job:worker".into(),
            ps_ops: STANDARD_PS_OPS.iter().map(|s| s.to_string()).collect(),
            strategy: PsStrategy::RoundRobin,
        }
    }
}

impl ReplicaDeviceSetterOptions {
    /// `ps_tasks` parameter servers, worker task `worker_task`, the standard ps ops, round robin.
    pub fn new(ps_tasks: usize, worker_task: u32) -> Self {
        ReplicaDeviceSetterOptions {
            ps_tasks,
            worker_device: format!("/job:worker/task:{worker_task}"),
            ..Default::default()
        }
    }

    /// The number of ps tasks taken from a cluster spec's `ps` job.
    pub fn from_cluster(cluster: &rill_transport::ClusterSpec, worker_task: u32) -> Self {
        ReplicaDeviceSetterOptions::new(cluster.num_tasks("ps"), worker_task)
    }
}

/// Bytes of the state a ps op holds, from its `dtype` and `shape` attributes (0 when unknown).
pub fn ps_op_bytes(node: &NodeDef) -> u64 {
    let size = node.attrs.dtype("dtype").ok().and_then(|d| d.size()).unwrap_or(0) as u64;
    let elems = node.attrs.shape("shape").ok().and_then(|s| s.num_elements()).unwrap_or(0) as u64;
    size.saturating_mul(elems)
}

fn parse(s: &str) -> DeviceName {
    // A malformed option is kept visibly, so the placer reports it against the node.
    DeviceName::parse(s)
        .unwrap_or_else(|_| DeviceName { job: Some(format!("<malformed:{s}>")), ..Default::default() })
}

/// The device function (`g.with_device(replica_device_setter(opts), |g| ..)`).
pub fn replica_device_setter(opts: ReplicaDeviceSetterOptions) -> DeviceScope {
    let ps_device = parse(&opts.ps_device);
    let worker_device = parse(&opts.worker_device);
    let loads = Rc::new(RefCell::new((0usize, vec![0u64; opts.ps_tasks])));
    DeviceScope::func(move |node: &NodeDef| {
        // What the enclosing scopes asked for wins, field by field (TF's `make_merged_spec`).
        let current = DeviceName::parse(&node.device).unwrap_or_default();
        if opts.ps_tasks == 0 {
            return current;
        }
        if !opts.ps_ops.iter().any(|o| o == &node.op) {
            return worker_device.override_with(&current);
        }
        let mut ps = ps_device.clone();
        let same_job = ps.job.is_some() && current.job.as_ref().is_none_or(|j| Some(j) == ps.job.as_ref());
        if same_job {
            let mut l = loads.borrow_mut();
            let task = match opts.strategy {
                PsStrategy::RoundRobin => {
                    let t = l.0;
                    l.0 = (l.0 + 1) % opts.ps_tasks;
                    t
                }
                PsStrategy::GreedyByBytes => {
                    let (t, _) = l.1.iter().enumerate().min_by_key(|&(i, b)| (*b, i)).unwrap_or((0, &0));
                    l.1[t] += ps_op_bytes(node);
                    t
                }
            };
            ps.task = Some(task as u32);
        }
        ps.override_with(&current)
    })
}
