//! Coordination of input threads: `Coordinator` (stop requests, first error, join with a grace
//! period), `QueueRunner` (threads that run enqueue ops until their inputs run out), and the
//! `tf.train` helpers built on them: input producers, `batch`, `shuffle_batch`, `batch_join`,
//! and preloaded data sets.

use crate::queue::Rng;
use crate::queue_ops::{
    dequeue_many, dequeue_up_to, enqueue, enqueue_many, fifo_queue, padding_fifo_queue, queue_close,
    random_shuffle_queue, QueueOptions,
};
use crate::{op_def, resource_name};
use rill_graph::kernel::{Kernel, KernelInit, OpKernel, OpKernelContext};
use rill_graph::{
    attrs, AttrsExt, Code, DType, Error, Graph, InferCtx, Output, PartialShape, Resource, Result, RunOptions,
    Session, Tensor, TensorInfo, VariableOptions,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often `join` looks at its threads, and a close-on-stop thread at its runner's threads.
const POLL_MS: u64 = 10;

#[derive(Default)]
struct CoordState {
    stop: bool,
    stopped_at: Option<Instant>,
    error: Option<Error>,
    threads: Vec<JoinHandle<()>>,
}

/// `tf.train.Coordinator`: threads check `should_stop`; any of them may `request_stop` with an
/// error; `join` waits for them and re-raises the first error. `OutOfRange` is a clean stop.
#[derive(Default)]
pub struct Coordinator {
    state: Mutex<CoordState>,
    cv: Condvar,
}

impl Coordinator {
    pub fn new() -> Arc<Coordinator> {
        Arc::new(Coordinator::default())
    }

    fn lock(&self) -> MutexGuard<'_, CoordState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every thread to stop; keeps `error` if it is the first one that is not `OutOfRange`.
    pub fn request_stop(&self, error: Option<Error>) {
        let mut st = self.lock();
        if let Some(e) = error {
            if e.code != Code::OutOfRange && st.error.is_none() {
                st.error = Some(e);
            }
        }
        if !st.stop {
            st.stop = true;
            st.stopped_at = Some(Instant::now());
        }
        self.cv.notify_all();
    }

    pub fn should_stop(&self) -> bool {
        self.lock().stop
    }

    /// Waits at most `timeout` for a stop request; whether one came.
    pub fn wait_for_stop(&self, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self.cv.wait_timeout_while(st, timeout, |s| !s.stop).unwrap_or_else(|e| e.into_inner());
        st.stop
    }

    /// The first error reported, if any.
    pub fn error(&self) -> Option<Error> {
        self.lock().error.clone()
    }

    pub fn register_thread(&self, h: JoinHandle<()>) {
        self.lock().threads.push(h);
    }

    /// Waits for the registered threads. Once a stop is requested they get `stop_grace` to
    /// finish; threads still running then are an `Aborted` error. Otherwise returns the first
    /// error reported (a panicked thread counts as `Internal`).
    pub fn join(&self, stop_grace: Duration) -> Result<()> {
        loop {
            let (running, late) = {
                let mut st = self.lock();
                let mut i = 0;
                while i < st.threads.len() {
                    if st.threads[i].is_finished() {
                        let h = st.threads.swap_remove(i);
                        if h.join().is_err() && st.error.is_none() {
                            st.error = Some(Error::internal("a coordinated thread panicked"));
                        }
                    } else {
                        i += 1;
                    }
                }
                (st.threads.len(), st.stopped_at.is_some_and(|t| t.elapsed() > stop_grace))
            };
            if running == 0 {
                break;
            }
            if late {
                let e = Error::aborted(format!("Coordinator stopped with {running} threads still running"));
                return Err(self.error().unwrap_or(e));
            }
            let st = self.lock();
            drop(self.cv.wait_timeout(st, Duration::from_millis(POLL_MS)));
        }
        self.error().map_or(Ok(()), Err)
    }
}

/// `tf.train.QueueRunner`: one thread per enqueue op, each running it until the input runs out
/// (`OutOfRange`/`Cancelled`), when the last one closes the queue; other errors go to the
/// coordinator. A stop request closes the queue with `cancel_pending_enqueues`.
#[derive(Clone, Debug)]
pub struct QueueRunner {
    pub queue: Output,
    pub enqueue_ops: Vec<Output>,
    pub close_op: Output,
    pub cancel_op: Output,
}

impl QueueRunner {
    pub fn new(g: &Graph, queue: Output, enqueue_ops: Vec<Output>) -> QueueRunner {
        let close_op = queue_close(g, queue, false);
        let cancel_op = queue_close(g, queue, true);
        QueueRunner { queue, enqueue_ops, close_op, cancel_op }
    }

    /// Starts the threads and registers them with `coord`.
    pub fn create_threads(&self, sess: &Arc<dyn Session>, coord: &Arc<Coordinator>) {
        let live = Arc::new(AtomicUsize::new(self.enqueue_ops.len()));
        let opts = RunOptions::default();
        for &op in &self.enqueue_ops {
            let (sess, coord, live, close, opts) =
                (sess.clone(), coord.clone(), live.clone(), self.close_op, opts.clone());
            coord.clone().register_thread(std::thread::spawn(move || {
                let mut err = None;
                while !coord.should_stop() {
                    match sess.run(&[], &[], &[op], &opts) {
                        Ok(_) => {}
                        Err(e) if matches!(e.code, Code::OutOfRange | Code::Cancelled) => break,
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                if live.fetch_sub(1, Ordering::AcqRel) == 1 {
                    // The last thread closes the queue so its consumers drain it and stop.
                    if let Err(e) = sess.run(&[], &[], &[close], &opts) {
                        err.get_or_insert(e);
                    }
                }
                if let Some(e) = err {
                    coord.request_stop(Some(e));
                }
            }));
        }
        let (sess, c, cancel) = (sess.clone(), coord.clone(), self.cancel_op);
        coord.register_thread(std::thread::spawn(move || loop {
            if c.wait_for_stop(Duration::from_millis(POLL_MS)) {
                let _ = sess.run(&[], &[], &[cancel], &RunOptions::default());
                return;
            }
            if live.load(Ordering::Acquire) == 0 {
                return;
            }
        }));
    }
}

/// `tf.train.start_queue_runners`.
pub fn start_queue_runners(sess: &Arc<dyn Session>, coord: &Arc<Coordinator>, runners: &[QueueRunner]) {
    runners.iter().for_each(|r| r.create_threads(sess, coord));
}

// ---- input producers ----

/// The epoch state of one producer node: epochs emitted so far and its shuffle generator.
struct EpochState {
    state: Mutex<(u64, Rng)>,
}

impl Resource for EpochState {
    fn describe(&self) -> String {
        "input producer epoch counter".into()
    }
}

pub(crate) fn infer_input_producer_epoch(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    if c.shape(0).rank() == Some(0) {
        return Err(Error::invalid_argument("an input producer needs a tensor of rank >= 1"));
    }
    Ok(vec![TensorInfo::new(c.dtype(0), c.shape(0).clone())])
}

struct EpochK {
    container: String,
    name: String,
    num_epochs: u64,
    shuffle: bool,
    seed: i64,
}

impl OpKernel for EpochK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let seed = self.seed;
        let st = ctx.resource_mgr().lookup_or_create(&self.container, &self.name, || {
            Ok(EpochState { state: Mutex::new((0, Rng::from_seeds(seed, 0))) })
        })?;
        let t = ctx.input(0)?.clone();
        let mut g = st.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.num_epochs > 0 && g.0 >= self.num_epochs {
            return Err(Error::out_of_range(format!(
                "input producer '{}' reached its limit of {} epochs",
                self.name, self.num_epochs
            )));
        }
        g.0 += 1;
        let out = if self.shuffle && t.shape().dim(0) > 1 {
            let n = t.shape().dim(0);
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                order.swap(i, g.1.below(i + 1));
            }
            let rows: Vec<Tensor> = order.iter().map(|&i| t.slice_rows(i, i + 1)).collect::<Result<_>>()?;
            Tensor::concat_rows(&rows, *t.shape())?
        } else {
            t
        };
        ctx.set_output(0, out);
        Ok(())
    }
}

pub(crate) fn create_input_producer_epoch(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    let (container, name) = resource_name(init);
    Ok(Kernel::expensive(EpochK {
        container,
        name,
        num_epochs: a.int_or("num_epochs", 0).max(0) as u64,
        shuffle: a.bool_or("shuffle", false),
        seed: a.int_or("seed", 0),
    }))
}

/// Options of the input producers; `Default` gives TensorFlow's (unlimited epochs, shuffled,
/// capacity 32).
#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// `None`: cycle forever; `Some(n)`: `OutOfRange` after `n` passes.
    pub num_epochs: Option<u64>,
    pub shuffle: bool,
    pub seed: i64,
    pub capacity: i64,
    pub shared_name: String,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions { num_epochs: None, shuffle: true, seed: 0, capacity: 32, shared_name: String::new() }
    }
}

/// `tf.train.input_producer`: the rows of `input`, one epoch per enqueue_many, into a FIFO
/// queue; returns the queue and its runner.
pub fn input_producer(g: &Graph, input: Output, opts: &ProducerOptions) -> (Output, QueueRunner) {
    let (dtype, shape) =
        g.info(input).map(|i| (i.dtype, i.shape)).unwrap_or((DType::F32, PartialShape::unknown()));
    let elem = match &shape.dims {
        Some(d) if !d.is_empty() => PartialShape::from_dims(&d[1..]),
        _ => PartialShape::unknown(),
    };
    let epoch = g.op(
        op_def("InputProducerEpoch"),
        "input_producer/epochs",
        &[input],
        attrs! { "num_epochs" => opts.num_epochs.unwrap_or(0) as i64, "shuffle" => opts.shuffle, "seed" => opts.seed },
    );
    let shapes = if elem.is_fully_known() { vec![elem] } else { vec![] };
    let q = fifo_queue(
        g,
        opts.capacity,
        &[dtype],
        &shapes,
        &QueueOptions { name: "input_producer".into(), shared_name: opts.shared_name.clone() },
    );
    let enq = enqueue_many(g, q, &[epoch]);
    (q, QueueRunner::new(g, q, vec![enq]))
}

/// `tf.train.string_input_producer(strings, num_epochs, shuffle, seed)`.
pub fn string_input_producer(g: &Graph, strings: &[String], opts: &ProducerOptions) -> (Output, QueueRunner) {
    let t = Tensor::from_strings(
        rill_graph::Shape::vector(strings.len()),
        strings.iter().map(|s| s.as_bytes().to_vec()).collect(),
    )
    .expect("one string per row");
    input_producer(g, g.constant(t), opts)
}

/// A data set loaded once into a variable that is neither trainable nor global (checkpoints
/// skip it); returns the variable and its initializer. Feed it to `input_producer` to get one
/// row per step.
pub fn preload(g: &Graph, name: &str, data: Tensor) -> (Output, Output) {
    let opts = VariableOptions { trainable: false, global: false, validate_shape: true };
    let v = g.variable_with(name, g.constant(data), opts);
    let init = g.variable_of(v).map(|i| Output::new(i.initializer, 0)).unwrap_or(v);
    (v, init)
}

// ---- batching ----

/// Options of `batch`, `shuffle_batch` and `batch_join`; `Default` gives TensorFlow's.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    pub batch_size: usize,
    pub num_threads: usize,
    pub capacity: i64,
    /// The inputs are batches already: enqueue their rows.
    pub enqueue_many: bool,
    /// The last batch may be smaller (`dequeue_up_to`).
    pub allow_smaller_final_batch: bool,
    /// Pad variable dimensions (a PaddingFIFOQueue; `batch` and `batch_join` only).
    pub dynamic_pad: bool,
    pub shared_name: String,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            batch_size: 32,
            num_threads: 1,
            capacity: 32,
            enqueue_many: false,
            allow_smaller_final_batch: false,
            dynamic_pad: false,
            shared_name: String::new(),
        }
    }
}

fn element_signature(g: &Graph, tensors: &[Output], many: bool) -> (Vec<DType>, Vec<PartialShape>) {
    tensors
        .iter()
        .map(|&t| {
            let i = g.info(t).unwrap_or_else(|| TensorInfo::new(DType::F32, PartialShape::unknown()));
            let s = match (&i.shape.dims, many) {
                (Some(d), true) if !d.is_empty() => PartialShape::from_dims(&d[1..]),
                (_, true) => PartialShape::unknown(),
                _ => i.shape,
            };
            (i.dtype, s)
        })
        .unzip()
}

fn finish_batch(
    g: &Graph,
    q: Output,
    lists: &[Vec<Output>],
    threads: usize,
    opts: &BatchOptions,
) -> (Vec<Output>, QueueRunner) {
    let mut ops = Vec::new();
    for list in lists {
        let op = if opts.enqueue_many { enqueue_many(g, q, list) } else { enqueue(g, q, list) };
        // As TensorFlow, `num_threads` threads share one enqueue op.
        ops.extend(std::iter::repeat_n(op, threads.max(1)));
    }
    let out = if opts.allow_smaller_final_batch {
        dequeue_up_to(g, q, opts.batch_size)
    } else {
        dequeue_many(g, q, opts.batch_size)
    };
    (out, QueueRunner::new(g, q, ops))
}

fn qopts(name: &str, opts: &BatchOptions) -> QueueOptions {
    QueueOptions { name: name.into(), shared_name: opts.shared_name.clone() }
}

/// `tf.train.batch`: batches of `tensors` from a FIFO (or padding FIFO) queue.
pub fn batch(g: &Graph, tensors: &[Output], opts: &BatchOptions) -> (Vec<Output>, QueueRunner) {
    let (types, shapes) = element_signature(g, tensors, opts.enqueue_many);
    let q = if opts.dynamic_pad {
        padding_fifo_queue(g, opts.capacity, &types, &shapes, &qopts("batch/padding_fifo_queue", opts))
    } else {
        fifo_queue(g, opts.capacity, &types, &shapes, &qopts("batch/fifo_queue", opts))
    };
    finish_batch(g, q, &[tensors.to_vec()], opts.num_threads, opts)
}

/// `tf.train.shuffle_batch`: batches drawn at random from a RandomShuffleQueue that keeps at
/// least `min_after_dequeue` elements until it is closed.
pub fn shuffle_batch(
    g: &Graph,
    tensors: &[Output],
    min_after_dequeue: i64,
    seed: i64,
    opts: &BatchOptions,
) -> (Vec<Output>, QueueRunner) {
    let (types, shapes) = element_signature(g, tensors, opts.enqueue_many);
    let q = random_shuffle_queue(
        g,
        opts.capacity,
        min_after_dequeue,
        &types,
        &shapes,
        seed,
        &qopts("shuffle_batch/random_shuffle_queue", opts),
    );
    finish_batch(g, q, &[tensors.to_vec()], opts.num_threads, opts)
}

/// `tf.train.batch_join`: one enqueue thread per tensor list, all into one queue.
pub fn batch_join(
    g: &Graph,
    tensor_lists: &[Vec<Output>],
    opts: &BatchOptions,
) -> (Vec<Output>, QueueRunner) {
    let Some(first) = tensor_lists.first() else {
        g.fail(Error::invalid_argument("batch_join needs at least one tensor list"));
        return (Vec::new(), QueueRunner::new(g, g.no_op("batch_join_failed"), Vec::new()));
    };
    let (types, shapes) = element_signature(g, first, opts.enqueue_many);
    let q = if opts.dynamic_pad {
        padding_fifo_queue(g, opts.capacity, &types, &shapes, &qopts("batch_join/padding_fifo_queue", opts))
    } else {
        fifo_queue(g, opts.capacity, &types, &shapes, &qopts("batch_join/fifo_queue", opts))
    };
    finish_batch(g, q, tensor_lists, 1, opts)
}
