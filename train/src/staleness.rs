//! Staleness policies for asynchronous between-graph training. A worker's step reads the global
//! step with the parameters (`global_step_read`, colocated with the global step, with no inputs
//! so it runs as the step starts) and again once its gradients are computed; the difference is
//! the staleness of the gradients: how many updates of other workers landed in between. By policy
//! the step then drops its gradients (older than `max_staleness`), scales its learning rate by
//! `1 / (1 + staleness)`, or, during a warm-up of `warmup_steps` global steps, applies only the
//! chief's gradients, optionally at a lower rate.
//!
//! A dropped step leaves the variables and the global step as they are: its learning rate and
//! gradients are zero. Optimizers with slots still see a zero gradient (Momentum's accumulator
//! and Adam's moments decay once); plain gradient descent is untouched.

use crate::optimizer::{apply_with_step, GradsAndVars, Optimizer, WithLearningRate};
use crate::summary::Histogram;
use rill_graph::{DType, Error, Graph, Output, Result, VariableInfo};
use std::cell::RefCell;

/// How an asynchronous worker treats stale gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsyncPolicy {
    /// Gradients more than this many global steps old are dropped; `None` keeps them all.
    pub max_staleness: Option<u64>,
    /// Multiply the learning rate by `1 / (1 + staleness)`.
    pub scale_by_staleness: bool,
    /// Until the global step reaches this, only the chief's gradients are applied.
    pub warmup_steps: u64,
    /// Factor of the learning rate during the warm-up (1 = the optimizer's own rate).
    pub warmup_lr_scale: f64,
}

impl Default for AsyncPolicy {
    /// Every gradient applied at the optimizer's rate (plain asynchronous training).
    fn default() -> Self {
        AsyncPolicy { max_staleness: None, scale_by_staleness: false, warmup_steps: 0, warmup_lr_scale: 1.0 }
    }
}

impl AsyncPolicy {
    fn validate(&self) -> Result<()> {
        if !(self.warmup_lr_scale.is_finite() && self.warmup_lr_scale >= 0.0) {
            return Err(Error::invalid_argument(format!(
                "AsyncPolicy: warmup_lr_scale must be finite and >= 0, not {}",
                self.warmup_lr_scale
            )));
        }
        if self.max_staleness.is_some_and(|k| k >= i64::MAX as u64) {
            return Err(Error::invalid_argument("AsyncPolicy: max_staleness is too large"));
        }
        Ok(())
    }
}

/// The ops `AsyncReplicasOptimizer::apply_gradients` built.
#[derive(Clone, Copy, Debug)]
pub struct AsyncOps {
    /// The worker's step: applies (or drops) the gradients, then adds 1 to the global step when
    /// they were applied.
    pub train_op: Output,
    /// The global step read with the parameters (int64). A worker that reads its parameters in
    /// an earlier run feeds the step it read then.
    pub global_step_read: Output,
    /// Global step at apply time minus `global_step_read` (int64 scalar); fetch it with the
    /// train op to record the histogram.
    pub staleness: Output,
    /// The factor of the learning rate this step (float32 scalar; 0 when dropped).
    pub lr_factor: Output,
    /// Whether this step's gradients were applied (bool scalar).
    pub applied: Output,
}

/// Wraps an optimizer for asynchronous replicas with a staleness `AsyncPolicy`. Build one per
/// worker graph: `is_chief` tells whether this worker's gradients count during the warm-up.
pub struct AsyncReplicasOptimizer<O: WithLearningRate> {
    pub opt: O,
    pub policy: AsyncPolicy,
    pub is_chief: bool,
    ops: RefCell<Option<AsyncOps>>,
}

impl<O: WithLearningRate> AsyncReplicasOptimizer<O> {
    pub fn new(opt: O, policy: AsyncPolicy, is_chief: bool) -> Self {
        AsyncReplicasOptimizer { opt, policy, is_chief, ops: RefCell::new(None) }
    }

    /// The ops built by `apply_gradients` (or `minimize`); `FailedPrecondition` before that.
    pub fn async_ops(&self) -> Result<AsyncOps> {
        self.ops.borrow().ok_or_else(|| {
            Error::failed_precondition("AsyncReplicasOptimizer: call apply_gradients() or minimize() first")
        })
    }

    fn build(
        &self,
        g: &Graph,
        grads_and_vars: &[(Option<Output>, VariableInfo)],
        global_step: Option<Output>,
        name: &str,
    ) -> Result<AsyncOps> {
        g.status()?;
        self.policy.validate()?;
        if self.ops.borrow().is_some() {
            return Err(Error::failed_precondition(
                "AsyncReplicasOptimizer: apply_gradients() was already called",
            ));
        }
        let gs = global_step.ok_or_else(|| {
            Error::invalid_argument("AsyncReplicasOptimizer: a global step is required to measure staleness")
        })?;
        if g.dtype(gs) != DType::I64 {
            return Err(Error::invalid_argument(format!(
                "AsyncReplicasOptimizer: the global step must be int64, not {}",
                g.dtype(gs)
            )));
        }
        let grads: Vec<Output> = grads_and_vars.iter().filter_map(|(gr, _)| *gr).collect();
        if grads.is_empty() {
            let names: Vec<&str> = grads_and_vars.iter().map(|(_, v)| v.name.as_str()).collect();
            return Err(Error::invalid_argument(format!(
                "No gradients provided for any variable: {names:?}"
            )));
        }
        let p = self.policy;
        // The bookkeeping lives with the global step: only the staleness itself (a scalar)
        // leaves the ps when the worker fetches it.
        let (read, staleness, keep, factor) = g.colocate_with(gs, |g| {
            let read = g.identity_named(&format!("{name}/global_step_read"), gs);
            let ready = g.group(&format!("{name}/staleness_gradients_ready"), &grads);
            // After `read` too: a thread that sent the parameters may be preempted before it
            // reads the step, and then read it after another worker's update (staleness -1).
            let now = g.with_control_dependencies(&[ready, read], |g| {
                g.identity_named(&format!("{name}/global_step_at_apply"), gs)
            });
            let staleness = g.sub(now, read);
            let one = g.scalar(1f32);
            let mut keep = one;
            if let Some(k) = p.max_staleness {
                keep = g.mul(keep, g.cast(g.less(staleness, g.scalar(k as i64 + 1)), DType::F32));
            }
            let mut factor = one;
            if p.warmup_steps > 0 {
                let warming = g.cast(g.less(now, g.scalar(p.warmup_steps as i64)), DType::F32);
                if !self.is_chief {
                    keep = g.mul(keep, g.sub(one, warming));
                }
                if p.warmup_lr_scale != 1.0 {
                    // 1 + (scale - 1)·warming: the scale during the warm-up, 1 after.
                    let d = g.scalar((p.warmup_lr_scale - 1.0) as f32);
                    factor = g.add(one, g.mul(d, warming));
                }
            }
            if p.scale_by_staleness {
                factor = g.div(factor, g.add(one, g.cast(staleness, DType::F32)));
            }
            (read, staleness, keep, g.mul(factor, keep))
        });
        let may_drop = p.max_staleness.is_some() || (p.warmup_steps > 0 && !self.is_chief);
        let gv: GradsAndVars = grads_and_vars
            .iter()
            .map(|(grad, var)| {
                let grad = grad.map(|gr| {
                    if !may_drop {
                        return gr;
                    }
                    // A dropped step's gradient is zero, so slots do not take it in either.
                    g.colocate_with(var.var, |g| g.mul(gr, g.cast(keep, g.dtype(gr))))
                });
                (grad, var.clone())
            })
            .collect();
        let opt =
            g.colocate_with(gs, |g| self.opt.with_learning_rate(self.opt.learning_rate().scaled(g, factor)));
        let (applied, amount) = g.colocate_with(gs, |g| {
            let applied = g.greater(keep, g.scalar(0f32));
            (applied, g.cast(applied, DType::I64))
        });
        // The global step counts applied steps only.
        let train_op = apply_with_step(&opt, g, &gv, Some((gs, amount)), name)?;
        g.status()?;
        Ok(AsyncOps { train_op, global_step_read: read, staleness, lr_factor: factor, applied })
    }
}

impl<O: WithLearningRate> Optimizer for AsyncReplicasOptimizer<O> {
    fn name(&self) -> &str {
        "async_replicas"
    }

    fn build_updates(&self, g: &Graph, gv: &[(Output, VariableInfo)], scope: &str) -> Result<Vec<Output>> {
        self.opt.build_updates(g, gv, scope)
    }

    fn compute_gradients(&self, g: &Graph, loss: Output, var_list: &[VariableInfo]) -> Result<GradsAndVars> {
        self.opt.compute_gradients(g, loss, var_list)
    }

    /// Builds the policy's ops and returns the train op; the rest is in `async_ops()`. A global
    /// step (int64) is required.
    fn apply_gradients(
        &self,
        g: &Graph,
        grads_and_vars: &[(Option<Output>, VariableInfo)],
        global_step: Option<Output>,
        name: &str,
    ) -> Result<Output> {
        let ops = self.build(g, grads_and_vars, global_step, name)?;
        *self.ops.borrow_mut() = Some(ops);
        Ok(ops.train_op)
    }
}

/// The largest staleness with its own bucket in `staleness_histogram`; larger ones share the last.
pub const STALENESS_BUCKETS_MAX: u32 = 32;

/// An empty histogram for staleness values: one bucket per step count up to
/// `STALENESS_BUCKETS_MAX`, then one for the rest. Add each step's fetched `staleness` and write
/// it with `FileWriter::add_histogram` (tag `staleness`).
pub fn staleness_histogram() -> Histogram {
    Histogram::integers(STALENESS_BUCKETS_MAX)
}
