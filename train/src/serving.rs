//! Serving replicas: a model copied onto every device of a session (one copy of the weights per
//! device, kept equal by a sync op), and a `Dispatcher` that spreads queries over the replicas
//! from any number of client threads. A replica serves one query at a time, as a device's
//! stream would: throughput grows with the devices, and extra client threads only queue.
use rill_graph::{
    DType, Error, Graph, Output, PartialShape, Result, RunOptions, Session, Tensor, VariableInfo,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a query waits for a free replica when its `RunOptions` set no deadline.
const DEFAULT_QUEUE_WAIT: Duration = Duration::from_secs(60);

/// One copy of the model: its device, the placeholder a query is fed to, and the output.
#[derive(Clone, Debug)]
pub struct Replica {
    pub device: String,
    pub input: Output,
    pub output: Output,
}

/// The replicas of a model and the op that makes their weights equal.
#[derive(Clone, Debug)]
pub struct ServingGraph {
    pub replicas: Vec<Replica>,
    /// Copies the variables of replica 0 (trained or restored there) into every other replica.
    pub sync: Output,
}

/// The variable scope of replica `i`; replica 0's variables are the primary set.
pub fn replica_scope(i: usize) -> String {
    format!("replica_{i}")
}

/// Builds `build(g, input)` once per device, replica `i` under device scope `devices[i]` and
/// variable scope `replica_{i}` with a placeholder of `dtype` and `shape` as its input. Each
/// replica has its own copy of the weights, so a query touches only its replica's device.
pub fn replicate_model(
    g: &Graph,
    devices: &[&str],
    dtype: DType,
    shape: impl Into<PartialShape>,
    build: impl Fn(&Graph, Output) -> Output,
) -> Result<ServingGraph> {
    if devices.is_empty() {
        return Err(Error::invalid_argument("replicate_model needs at least one device"));
    }
    let shape = shape.into();
    let mut replicas = Vec::with_capacity(devices.len());
    for (i, dev) in devices.iter().enumerate() {
        let scope = replica_scope(i);
        let (input, output) = g.with_device(*dev, |g| {
            g.variable_scope(&scope, rill_graph::Reuse::No, |g| {
                let input = g.placeholder("query", dtype, shape.clone());
                (input, build(g, input))
            })
        });
        replicas.push(Replica { device: dev.to_string(), input, output });
    }
    g.status()?;
    let sync = sync_op(g, devices.len())?;
    Ok(ServingGraph { replicas, sync })
}

/// One `Assign` per variable of replicas 1.. from its counterpart in replica 0.
fn sync_op(g: &Graph, replicas: usize) -> Result<Output> {
    let vars = g.global_variables();
    let of = |i: usize| -> Vec<VariableInfo> {
        let prefix = format!("{}/", replica_scope(i));
        vars.iter().filter(|v| v.name.starts_with(&prefix)).cloned().collect()
    };
    let primary = of(0);
    let mut assigns = Vec::new();
    for i in 1..replicas {
        let copy = of(i);
        if copy.len() != primary.len() {
            return Err(Error::invalid_argument(format!(
                "replica {i} has {} variables, replica 0 has {}",
                copy.len(),
                primary.len()
            )));
        }
        for (src, dst) in primary.iter().zip(&copy) {
            let suffix = |v: &VariableInfo| v.name.split_once('/').map(|(_, s)| s.to_string());
            if suffix(src) != suffix(dst) {
                return Err(Error::invalid_argument(format!(
                    "replica {i}: variable {} does not match {}",
                    dst.name, src.name
                )));
            }
            assigns.push(g.with_name_scope("sync_replicas", |g| g.assign(dst.var, src.var)));
        }
    }
    let op = g.group("sync_replicas", &assigns);
    g.status()?;
    Ok(op)
}

/// Spreads queries over replicas, the next free one in turn; shared by client threads
/// (`Arc<Dispatcher>`). Each replica runs one query at a time.
pub struct Dispatcher {
    sess: Arc<dyn Session>,
    replicas: Vec<Replica>,
    next: AtomicUsize,
    opts: RunOptions,
    /// `busy[i]`: replica `i` is serving a query.
    busy: Mutex<Vec<bool>>,
    freed: Condvar,
}

/// Marks a replica free again when its query ends, also by error or panic.
struct Claim<'a> {
    d: &'a Dispatcher,
    i: usize,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut busy = self.d.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy[self.i] = false;
        drop(busy);
        self.d.freed.notify_all();
    }
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dispatcher({} replicas)", self.replicas.len())
    }
}

impl Dispatcher {
    /// A dispatcher over `replicas` of a graph that `sess` runs; each query is one step with
    /// `opts` (a deadline, say).
    pub fn new(sess: Arc<dyn Session>, replicas: Vec<Replica>, opts: RunOptions) -> Result<Dispatcher> {
        if replicas.is_empty() {
            return Err(Error::invalid_argument("a dispatcher needs at least one replica"));
        }
        let busy = Mutex::new(vec![false; replicas.len()]);
        Ok(Dispatcher { sess, replicas, next: AtomicUsize::new(0), opts, busy, freed: Condvar::new() })
    }

    pub fn num_replicas(&self) -> usize {
        self.replicas.len()
    }

    /// Runs one query (a batch) on the first free replica, starting from the next one in turn;
    /// waits for one to free up until the query's deadline. Returns the replica's output.
    pub fn infer(&self, query: Tensor) -> Result<Tensor> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.replicas.len();
        let claim = self.claim(|busy| (0..n).map(|k| (start + k) % n).find(|&i| !busy[i]))?;
        self.run_on(claim, query)
    }

    /// Runs one query on replica `i`, once it is free.
    pub fn infer_on(&self, i: usize, query: Tensor) -> Result<Tensor> {
        if i >= self.replicas.len() {
            return Err(Error::invalid_argument(format!("no replica {i} of {}", self.replicas.len())));
        }
        let claim = self.claim(|busy| (!busy[i]).then_some(i))?;
        self.run_on(claim, query)
    }

    /// Waits until `pick` finds a free replica, marks it busy and returns the claim on it.
    fn claim(&self, pick: impl Fn(&[bool]) -> Option<usize>) -> Result<Claim<'_>> {
        let wait = match self.opts.timeout_in_ms {
            0 => DEFAULT_QUEUE_WAIT,
            ms => Duration::from_millis(ms),
        };
        let deadline = Instant::now() + wait;
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(i) = pick(&busy) {
                busy[i] = true;
                return Ok(Claim { d: self, i });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::deadline_exceeded(format!(
                    "no serving replica became free within {} ms",
                    wait.as_millis()
                )));
            }
            busy = self.freed.wait_timeout(busy, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn run_on(&self, claim: Claim<'_>, query: Tensor) -> Result<Tensor> {
        let r = &self.replicas[claim.i];
        let mut out = self.sess.run(&[(r.input, query)], &[r.output], &[], &self.opts)?;
        out.pop().ok_or_else(|| Error::internal("a query returned no output"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::mlp;
    use rill_graph::{DirectSession, SessionOptions};
    use std::collections::BTreeMap;

    /// Replicas seeded differently answer differently until synced, then the same on every device.
    #[test]
    fn synced_replicas_answer_alike_and_queries_take_turns() {
        let g = Graph::new();
        let seed = std::cell::Cell::new(1);
        let serving = replicate_model(&g, &["/cpu:0", "/cpu:1"], DType::F32, [None, Some(4)], |g, x| {
            seed.set(seed.get() + 1);
            mlp(g, x, &[8], 3, seed.get())
        })
        .unwrap();
        let init = g.global_variables_initializer();
        let opts =
            SessionOptions { device_count: BTreeMap::from([("CPU".to_string(), 2)]), ..Default::default() };
        let sess: Arc<dyn Session> =
            Arc::new(DirectSession::new(&g, &crate::standard_runtime(), opts).unwrap());
        sess.run(&[], &[], &[init], &RunOptions::default()).unwrap();
        let d = Dispatcher::new(sess.clone(), serving.replicas.clone(), RunOptions::default()).unwrap();
        let query = Tensor::new([2usize, 4], &[0.1f32, 0.2, 0.3, 0.4, -1.0, 0.0, 1.0, 2.0]).unwrap();
        let answers = |d: &Dispatcher| -> Vec<Vec<f32>> {
            (0..2).map(|_| d.infer(query.clone()).unwrap().to_vec::<f32>().unwrap()).collect()
        };
        let before = answers(&d);
        assert_ne!(before[0], before[1], "different seeds, different weights");
        sess.run(&[], &[], &[serving.sync], &RunOptions::default()).unwrap();
        let after = answers(&d);
        assert_eq!(after[0], after[1]);
        assert_eq!(after[0], before[0], "replica 0 keeps its weights");
        assert_eq!(d.infer_on(2, query).unwrap_err().code, rill_graph::Code::InvalidArgument);
    }

    /// A busy replica takes no second query: it waits, and gives up at the query's deadline.
    #[test]
    fn a_replica_serves_one_query_at_a_time() {
        let g = Graph::new();
        let serving =
            replicate_model(&g, &["/cpu:0"], DType::F32, [None, Some(4)], |g, x| mlp(g, x, &[8], 3, 1))
                .unwrap();
        let init = g.global_variables_initializer();
        let sess: Arc<dyn Session> =
            Arc::new(DirectSession::new(&g, &crate::standard_runtime(), SessionOptions::default()).unwrap());
        sess.run(&[], &[], &[init], &RunOptions::default()).unwrap();
        let opts = RunOptions { timeout_in_ms: 50, ..Default::default() };
        let d = Dispatcher::new(sess, serving.replicas, opts).unwrap();
        let query = Tensor::new([1usize, 4], &[0.1f32, 0.2, 0.3, 0.4]).unwrap();
        let held = d.claim(|busy| (!busy[0]).then_some(0)).unwrap();
        let start = std::time::Instant::now();
        assert_eq!(d.infer(query.clone()).unwrap_err().code, rill_graph::Code::DeadlineExceeded);
        assert!(start.elapsed() >= Duration::from_millis(50));
        drop(held);
        assert_eq!(d.infer(query).unwrap().shape().dims(), &[1, 3]);
    }
}
