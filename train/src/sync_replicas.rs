//! `SyncReplicasOptimizer`: synchronous between-graph training, as TensorFlow's
//! `sync_replicas_optimizer.py`. Each worker applies its gradients to per-variable
//! `ConditionalAccumulator`s on the variables' ps devices, tagged with the global step it read
//! (its `local_step`), then waits for a token. The chief takes the mean of `replicas_to_aggregate`
//! gradients from every accumulator, applies it with the wrapped optimizer, increments the global
//! step and releases `total_num_replicas` tokens carrying the new step. A gradient older than its
//! accumulator's step is dropped, so spare replicas (`total_num_replicas > replicas_to_aggregate`)
//! and slow ones never corrupt an update; they only lose their work.
//!
//! The chief's loop always waits in a round: once the workers are done, in one whose gradients
//! never come. A stop cancels that round's awaits, so the loop ends at once instead of when the
//! round's deadline passes.

use crate::optimizer::{GradsAndVars, Optimizer};
use rill_graph::{
    Code, DType, Error, Graph, Output, PartialShape, Result, RunOptions, Session, VariableInfo,
    VariableOptions,
};
use rill_queues::{
    accumulator_apply_gradient, accumulator_await_gradients, accumulator_cancel_awaits,
    accumulator_set_global_step, accumulator_take_gradient, conditional_accumulator, dequeue, enqueue_many,
    fifo_queue, Coordinator, QueueOptions,
};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// Wraps an optimizer so that replicas update the variables in lock step.
pub struct SyncReplicasOptimizer<O: Optimizer> {
    pub opt: O,
    /// Gradients averaged into each update.
    pub replicas_to_aggregate: usize,
    /// Workers taking part; tokens released per update.
    pub total_num_replicas: usize,
    ops: RefCell<Option<SyncReplicasOps>>,
}

impl<O: Optimizer + std::fmt::Debug> std::fmt::Debug for SyncReplicasOptimizer<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SyncReplicasOptimizer({:?}, aggregate {} of {})",
            self.opt, self.replicas_to_aggregate, self.total_num_replicas
        )
    }
}

/// The ops `apply_gradients` built: the worker's train op and the chief's.
#[derive(Clone, Debug)]
pub struct SyncReplicasOps {
    /// A worker's step: apply every gradient at `local_step`, then take a token into `local_step`.
    pub train_op: Output,
    /// The worker-local step (int64, on the worker device, not in the global collection).
    pub local_step: Output,
    /// `local_step = global_step`: run by every worker once the model is initialised.
    pub local_step_init_op: Output,
    /// The chief's start: `local_step_init_op` and every accumulator's step set to the global step.
    pub chief_init_op: Output,
    /// Every accumulator's step set to the global step (the chief's repair after a cut round).
    pub resync_op: Output,
    /// One chief round: wait until every accumulator holds `replicas_to_aggregate` gradients,
    /// then take the means, apply them, increment the global step and release tokens. The takes
    /// start only once all are full, so a deadline that cuts a round has taken nothing.
    pub sync_op: Output,
    /// Ends a round that waits for gradients: its awaits fail with `Cancelled`, having taken
    /// nothing (run by the chief's loop on a stop).
    pub cancel_round_op: Output,
    pub token_queue: Output,
    pub global_step: Output,
    pub accumulators: Vec<Output>,
    pub replicas_to_aggregate: usize,
    pub total_num_replicas: usize,
    /// Tokens released per round: `max(total_num_replicas, replicas_to_aggregate)`.
    pub tokens_per_step: usize,
    global_step_device: String,
}

impl<O: Optimizer> SyncReplicasOptimizer<O> {
    pub fn new(opt: O, replicas_to_aggregate: usize, total_num_replicas: usize) -> Self {
        SyncReplicasOptimizer { opt, replicas_to_aggregate, total_num_replicas, ops: RefCell::new(None) }
    }

    /// The ops built by `apply_gradients` (or `minimize`); `FailedPrecondition` before that.
    pub fn sync_ops(&self) -> Result<SyncReplicasOps> {
        self.ops.borrow().clone().ok_or_else(|| {
            Error::failed_precondition("SyncReplicasOptimizer: call apply_gradients() or minimize() first")
        })
    }

    fn build(
        &self,
        g: &Graph,
        grads_and_vars: &[(Option<Output>, VariableInfo)],
        global_step: Option<Output>,
        name: &str,
    ) -> Result<SyncReplicasOps> {
        g.status()?;
        if self.replicas_to_aggregate == 0 || self.total_num_replicas == 0 {
            return Err(Error::invalid_argument(format!(
                "SyncReplicasOptimizer needs replicas_to_aggregate ({}) and total_num_replicas ({}) above 0",
                self.replicas_to_aggregate, self.total_num_replicas
            )));
        }
        if self.ops.borrow().is_some() {
            return Err(Error::failed_precondition(
                "SyncReplicasOptimizer: apply_gradients() was already called",
            ));
        }
        let gs = global_step.ok_or_else(|| {
            Error::invalid_argument("SyncReplicasOptimizer: a global step is required to check staleness")
        })?;
        if g.dtype(gs) != DType::I64 {
            return Err(Error::invalid_argument(format!(
                "SyncReplicasOptimizer: the global step must be int64, not {}",
                g.dtype(gs)
            )));
        }
        let gs_dev = g.node(gs.node).device;
        let tokens_per_step = self.total_num_replicas.max(self.replicas_to_aggregate);

        // The local step lives with an anchor op, which the enclosing device scope (the replica
        // setter) puts on this worker: each worker has its own.
        let anchor = g.no_op(&format!("{name}/local_anchor"));
        let local_opts = VariableOptions { trainable: false, global: false, validate_shape: true };
        let local_step =
            g.colocate_with(anchor, |g| g.variable_with("sync_rep_local_step", g.scalar(0i64), local_opts));
        let local_step_init_op = g.assign(local_step, gs);

        let mut apply_ops = Vec::new();
        let mut aggregated: GradsAndVars = Vec::with_capacity(grads_and_vars.len());
        let mut accumulators = Vec::new();
        g.with_name_scope(name, |g| {
            for (grad, var) in grads_and_vars {
                let Some(grad) = *grad else {
                    aggregated.push((None, var.clone()));
                    continue;
                };
                let acc = g.colocate_with(var.var, |g| {
                    conditional_accumulator(
                        g,
                        g.dtype(grad),
                        var.shape.clone(),
                        &format!("{}/grad_accum", var.name),
                    )
                });
                apply_ops.push(accumulator_apply_gradient(g, acc, local_step, grad));
                // The accumulator for now; replaced by its take below.
                aggregated.push((Some(acc), var.clone()));
                accumulators.push(acc);
            }
            // The takes wait for every accumulator to be full, so they never wait themselves.
            let full: Vec<Output> = accumulators
                .iter()
                .map(|&acc| accumulator_await_gradients(g, acc, self.replicas_to_aggregate))
                .collect();
            g.with_control_dependencies(&full, |g| {
                for (grad, _) in aggregated.iter_mut() {
                    if let Some(acc) = *grad {
                        *grad = Some(accumulator_take_gradient(g, acc, self.replicas_to_aggregate));
                    }
                }
            });
        });
        g.status()?;
        if accumulators.is_empty() {
            let names: Vec<&str> = grads_and_vars.iter().map(|(_, v)| v.name.as_str()).collect();
            return Err(Error::invalid_argument(format!(
                "No gradients provided for any variable: {names:?}"
            )));
        }

        let (update_op, token_queue) = g.with_device(gs_dev.as_str(), |g| -> Result<(Output, Output)> {
            let update = self.opt.apply_gradients(g, &aggregated, Some(gs), &format!("{name}/update"))?;
            let shared = format!("{name}/sync_token_q");
            let opts = QueueOptions { name: shared.clone(), shared_name: shared };
            Ok((update, fifo_queue(g, -1, &[DType::I64], &[PartialShape::scalar()], &opts)))
        })?;

        // A worker waits for a token only after its gradients are in.
        let token = g.with_control_dependencies(&apply_ops, |g| {
            g.colocate_with(token_queue, |g| dequeue(g, token_queue).first().copied())
        });
        let token = token
            .ok_or_else(|| g.status().err().unwrap_or_else(|| Error::internal("dequeue has no output")))?;
        let train_op = g.assign(local_step, token);

        // The chief releases the next round's tokens once the update is in.
        let sync_op = g.with_control_dependencies(&[update_op], |g| {
            g.with_device(gs_dev.as_str(), |g| {
                let tokens = g.fill_dynamic(g.ints(&[tokens_per_step as i64]), gs);
                g.colocate_with(token_queue, |g| enqueue_many(g, token_queue, &[tokens]))
            })
        });
        let sets: Vec<Output> =
            accumulators.iter().map(|&acc| accumulator_set_global_step(g, acc, gs)).collect();
        let resync_op = g.group(&format!("{name}/resync_accumulators"), &sets);
        let cancels: Vec<Output> =
            accumulators.iter().map(|&acc| accumulator_cancel_awaits(g, acc)).collect();
        let cancel_round_op = g.group(&format!("{name}/cancel_round"), &cancels);
        let chief_init_op = g.group(&format!("{name}/chief_init"), &[local_step_init_op, resync_op]);
        g.status()?;
        Ok(SyncReplicasOps {
            train_op,
            local_step,
            local_step_init_op,
            chief_init_op,
            resync_op,
            sync_op,
            cancel_round_op,
            token_queue,
            global_step: gs,
            accumulators,
            replicas_to_aggregate: self.replicas_to_aggregate,
            total_num_replicas: self.total_num_replicas,
            tokens_per_step,
            global_step_device: gs_dev,
        })
    }
}

impl<O: Optimizer> Optimizer for SyncReplicasOptimizer<O> {
    fn name(&self) -> &str {
        "sync_replicas"
    }

    /// The wrapped optimizer's updates (what the chief applies to the aggregated gradients).
    fn build_updates(&self, g: &Graph, gv: &[(Output, VariableInfo)], scope: &str) -> Result<Vec<Output>> {
        self.opt.build_updates(g, gv, scope)
    }

    fn compute_gradients(&self, g: &Graph, loss: Output, var_list: &[VariableInfo]) -> Result<GradsAndVars> {
        self.opt.compute_gradients(g, loss, var_list)
    }

    /// Builds the worker's and the chief's ops and returns the worker's train op; the rest is in
    /// `sync_ops()`. A global step (int64) is required.
    fn apply_gradients(
        &self,
        g: &Graph,
        grads_and_vars: &[(Option<Output>, VariableInfo)],
        global_step: Option<Output>,
        name: &str,
    ) -> Result<Output> {
        let ops = self.build(g, grads_and_vars, global_step, name)?;
        let train_op = ops.train_op;
        *self.ops.borrow_mut() = Some(ops);
        Ok(train_op)
    }
}

impl SyncReplicasOps {
    /// The chief's op that fills the token queue before the first round: `num_tokens` tokens
    /// (TensorFlow's default, `replicas_to_aggregate`, when `None`) carrying the global step.
    /// Fewer than `replicas_to_aggregate - total_num_replicas` could never finish a round.
    pub fn init_tokens_op(&self, g: &Graph, num_tokens: Option<usize>) -> Result<Output> {
        let needed = self.replicas_to_aggregate.saturating_sub(self.total_num_replicas);
        let n = num_tokens.unwrap_or(self.replicas_to_aggregate);
        if n < needed {
            return Err(Error::invalid_argument(format!(
                "Too few tokens to finish the first step: {n} (given) vs {needed} (needed)"
            )));
        }
        let op = g.with_device(self.global_step_device.as_str(), |g| {
            if n == 0 {
                return g.no_op("no_init_tokens");
            }
            let tokens = g.fill_dynamic(g.ints(&[n as i64]), self.global_step);
            g.colocate_with(self.token_queue, |g| enqueue_many(g, self.token_queue, &[tokens]))
        });
        g.status()?;
        Ok(op)
    }

    /// Starts the chief's update loop on a thread registered with `coord` (TensorFlow's chief
    /// queue runner): `sync_op` round after round until a stop is requested. A second registered
    /// thread ends the round waiting at the stop (as a queue runner closes its queue then).
    pub fn start_chief_loop(
        &self,
        sess: Arc<dyn Session>,
        coord: &Arc<Coordinator>,
        opts: ChiefLoopOptions,
    ) -> ChiefLoop {
        let rounds = Arc::new(AtomicU64::new(0));
        let (sync_op, resync_op, cancel_op) = (self.sync_op, self.resync_op, self.cancel_round_op);
        // Dropped when the loop ends: tells the other thread that nothing waits any more.
        let (ended_tx, ended) = mpsc::channel::<()>();
        let (c, r, s) = (coord.clone(), rounds.clone(), sess.clone());
        coord.register_thread(std::thread::spawn(move || {
            let _ended = ended_tx;
            chief_loop(&*s, &c, &r, sync_op, resync_op, &opts)
        }));
        let c = coord.clone();
        coord
            .register_thread(std::thread::spawn(move || cancel_round_on_stop(&*sess, &c, cancel_op, &ended)));
        ChiefLoop { rounds }
    }
}

/// Options of the chief's loop.
#[derive(Clone, Debug)]
pub struct ChiefLoopOptions {
    /// Deadline of one round: how long the chief waits for gradients before it realigns the
    /// accumulators and starts the round again. A stop does not wait for it.
    pub round_timeout_in_ms: u64,
    /// Rounds after which the loop ends by itself; 0 = until a stop is requested.
    pub max_rounds: u64,
}

impl Default for ChiefLoopOptions {
    fn default() -> Self {
        ChiefLoopOptions { round_timeout_in_ms: 1_000, max_rounds: 0 }
    }
}

/// A running chief loop.
#[derive(Clone, Debug)]
pub struct ChiefLoop {
    rounds: Arc<AtomicU64>,
}

impl ChiefLoop {
    /// Rounds completed: updates applied and token sets released.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Acquire)
    }
}

fn chief_loop(
    sess: &dyn Session,
    coord: &Coordinator,
    rounds: &AtomicU64,
    sync_op: Output,
    resync_op: Output,
    opts: &ChiefLoopOptions,
) {
    let ro = RunOptions { timeout_in_ms: opts.round_timeout_in_ms.max(1), ..Default::default() };
    while !coord.should_stop() && (opts.max_rounds == 0 || rounds.load(Ordering::Acquire) < opts.max_rounds) {
        match sess.run(&[], &[], &[sync_op], &ro) {
            Ok(_) => {
                rounds.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) if e.code == Code::DeadlineExceeded => {
                // Not enough gradients in time: the round took nothing. Realigning the
                // accumulators with the global step is a no-op then, and repairs the rare cut
                // after the takes began (whose workers retry with fresh gradients).
                if let Err(e) = sess.run(&[], &[], &[resync_op], &ro) {
                    if !matches!(e.code, Code::DeadlineExceeded) {
                        coord.request_stop(Some(e));
                        return;
                    }
                }
            }
            Err(e) if matches!(e.code, Code::Cancelled | Code::OutOfRange) => return,
            Err(e) => {
                coord.request_stop(Some(e));
                return;
            }
        }
    }
}

/// How often the stop watcher looks whether the loop ended by itself (no stop to wait for).
const LOOP_ENDED_POLL: Duration = Duration::from_millis(50);
/// How long the watcher gives the loop to end after a cancel before it cancels again.
const CANCEL_RETRY: Duration = Duration::from_millis(20);
/// Deadline of one cancel step.
const CANCEL_TIMEOUT_MS: u64 = 1_000;

/// Waits for a stop, then cancels the round the loop waits in, again until the loop has ended:
/// it may have looked at the coordinator just before the stop and start its round after a cancel.
fn cancel_round_on_stop(sess: &dyn Session, coord: &Coordinator, cancel_op: Output, ended: &Receiver<()>) {
    while !coord.wait_for_stop(LOOP_ENDED_POLL) {
        if let Err(TryRecvError::Disconnected) = ended.try_recv() {
            return;
        }
    }
    let ro = RunOptions { timeout_in_ms: CANCEL_TIMEOUT_MS, ..Default::default() };
    while let Err(TryRecvError::Empty) = ended.try_recv() {
        // A cancel that fails (a lost ps) leaves the round to its deadline.
        let _ = sess.run(&[], &[], &[cancel_op], &ro);
        if let Err(RecvTimeoutError::Disconnected) = ended.recv_timeout(CANCEL_RETRY) {
            return;
        }
    }
}
