//! The queue resource behind FIFOQueue, RandomShuffleQueue, PaddingFIFOQueue and PriorityQueue:
//! bounded storage of element tuples, FIFO lists of waiting enqueue and dequeue attempts, and
//! TensorFlow's rules for closing, blocking and partial progress.
//!
//! Elements are stored as rows of the batches they arrived in (`Row` holds an `Arc` of the batch),
//! so `enqueue_many` never splits a batch and a `dequeue_many` that takes a whole batch back
//! returns its tensors without copying.
//!
//! Attempts that cannot finish wait in the queue, never on a thread. A waiting attempt may hold
//! rows it already took (a `dequeue_many` drains as items arrive, as in TensorFlow); when it is
//! cancelled or meets a closed queue, those rows go back to the front, so nothing is lost.

use rill_graph::{
    Buffer, CancelToken, CancellationManager, DType, Error, PartialShape, Resource, Result, Shape, Tensor,
};
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Capacity of a queue created with a negative capacity ("unbounded" in TensorFlow): still a bound.
pub const QUEUE_CAPACITY_MAX: usize = i32::MAX as usize;
/// How long a blocking call waits for a cancelled attempt to report back before giving up.
const CANCEL_REPORT_MS: u64 = 5_000;

/// Which queue discipline a `Queue` follows.
#[derive(Clone, Debug, PartialEq)]
pub enum QueueKind {
    Fifo,
    /// Dequeues a uniformly random element while more than `min_after_dequeue` remain (or the
    /// queue is closed). `seed`/`seed2` both zero means a random seed.
    RandomShuffle {
        min_after_dequeue: usize,
        seed: i64,
        seed2: i64,
    },
    /// FIFO whose `dequeue_many`/`dequeue_up_to` pad variable dimensions with zeros.
    PaddingFifo,
    /// Dequeues the smallest int64 priority (component 0) first; ties in arrival order.
    Priority,
}

impl QueueKind {
    fn op_name(&self) -> &'static str {
        match self {
            QueueKind::Fifo => "FIFOQueue",
            QueueKind::RandomShuffle { .. } => "RandomShuffleQueue",
            QueueKind::PaddingFifo => "PaddingFIFOQueue",
            QueueKind::Priority => "PriorityQueue",
        }
    }
}

/// What a queue is: its discipline, capacity and element signature. For a priority queue,
/// `dtypes[0]` is the int64 priority.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueSpec {
    pub kind: QueueKind,
    pub capacity: usize,
    pub dtypes: Vec<DType>,
    /// Empty: shapes unspecified. Otherwise one per component.
    pub shapes: Vec<PartialShape>,
}

impl QueueSpec {
    pub fn new(kind: QueueKind, capacity: i64, dtypes: &[DType], shapes: &[PartialShape]) -> QueueSpec {
        let capacity =
            if capacity < 0 { QUEUE_CAPACITY_MAX } else { (capacity as usize).min(QUEUE_CAPACITY_MAX) };
        QueueSpec { kind, capacity, dtypes: dtypes.to_vec(), shapes: shapes.to_vec() }
    }

    fn validate(&self, name: &str) -> Result<()> {
        let what = self.kind.op_name();
        if self.dtypes.is_empty() {
            return Err(Error::invalid_argument(format!(
                "{what} '{name}' needs at least one component dtype"
            )));
        }
        if self.dtypes.contains(&DType::Resource) {
            return Err(Error::invalid_argument(format!("{what} '{name}' cannot hold resource handles")));
        }
        if !self.shapes.is_empty() && self.shapes.len() != self.dtypes.len() {
            return Err(Error::invalid_argument(format!(
                "{what} '{name}': {} shapes for {} components",
                self.shapes.len(),
                self.dtypes.len()
            )));
        }
        match &self.kind {
            QueueKind::RandomShuffle { min_after_dequeue, .. } if *min_after_dequeue >= self.capacity => {
                Err(Error::invalid_argument(format!(
                    "{what} '{name}': min_after_dequeue ({min_after_dequeue}) must be less than capacity ({})",
                    self.capacity
                )))
            }
            QueueKind::PaddingFifo if self.shapes.iter().any(|s| s.rank().is_none()) || self.shapes.is_empty() => {
                Err(Error::invalid_argument(format!(
                    "{what} '{name}' needs a shape of known rank for every component"
                )))
            }
            QueueKind::Priority => {
                if self.dtypes[0] != DType::I64 {
                    return Err(Error::invalid_argument(format!("{what} '{name}': component 0 must be int64")));
                }
                if self.shapes.is_empty() {
                    return Err(Error::invalid_argument(format!("{what} '{name}' needs component shapes")));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether every component has a fully defined shape (needed to batch without padding).
    fn shapes_fully_defined(&self) -> bool {
        !self.shapes.is_empty() && self.shapes.iter().all(|s| s.is_fully_known())
    }
}

/// A batch of elements as enqueued: each component's first dimension counts the elements.
struct Batch {
    comps: Vec<Tensor>,
    rows: usize,
}

/// One element: a row of a batch.
#[derive(Clone)]
struct Row {
    batch: Arc<Batch>,
    row: usize,
}

/// A priority-queue entry: smallest priority first, then arrival order.
struct Prioritized {
    priority: i64,
    seq: u64,
    row: Row,
}

impl PartialEq for Prioritized {
    fn eq(&self, o: &Self) -> bool {
        (self.priority, self.seq) == (o.priority, o.seq)
    }
}
impl Eq for Prioritized {}
impl PartialOrd for Prioritized {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Prioritized {
    // Reversed so `BinaryHeap` (a max-heap) pops the smallest priority first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.priority, o.seq).cmp(&(self.priority, self.seq))
    }
}

/// A small, seedable generator (splitmix64) for the shuffle queue; not for secrets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator from TensorFlow's `(seed, seed2)` pair; both zero means a random seed.
    pub fn from_seeds(seed: i64, seed2: i64) -> Rng {
        if seed == 0 && seed2 == 0 {
            return Rng(rill_graph::random_u64());
        }
        Rng((seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (seed2 as u64).rotate_left(29))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

enum Store {
    Fifo(VecDeque<Row>),
    Shuffle { rows: Vec<Row>, rng: Rng },
    Priority { heap: BinaryHeap<Prioritized>, seq: u64 },
}

impl Store {
    fn len(&self) -> usize {
        match self {
            Store::Fifo(q) => q.len(),
            Store::Shuffle { rows, .. } => rows.len(),
            Store::Priority { heap, .. } => heap.len(),
        }
    }

    fn push(&mut self, row: Row) {
        match self {
            Store::Fifo(q) => q.push_back(row),
            Store::Shuffle { rows, .. } => rows.push(row),
            Store::Priority { heap, seq } => {
                let priority = row.batch.comps[0].as_slice::<i64>().map(|p| p[row.row]).unwrap_or(0);
                *seq += 1;
                heap.push(Prioritized { priority, seq: *seq, row });
            }
        }
    }

    fn take(&mut self) -> Option<Row> {
        match self {
            Store::Fifo(q) => q.pop_front(),
            Store::Shuffle { rows, rng } => {
                if rows.is_empty() {
                    return None;
                }
                let i = rng.below(rows.len());
                Some(rows.swap_remove(i))
            }
            Store::Priority { heap, .. } => heap.pop().map(|p| p.row),
        }
    }

    /// Puts rows taken by an attempt back, as if never taken (FIFO: at the front, in order).
    fn restore(&mut self, taken: Vec<Row>) {
        match self {
            Store::Fifo(q) => {
                for r in taken.into_iter().rev() {
                    q.push_front(r);
                }
            }
            // Priority rows get a fresh sequence number; their priority still orders them.
            _ => taken.into_iter().for_each(|r| self.push(r)),
        }
    }
}

/// A completion callback of an enqueue attempt.
pub type EnqueueDone = Box<dyn FnOnce(Result<()>) + Send>;
/// A completion callback of a dequeue attempt: one tensor per component.
pub type DequeueDone = Box<dyn FnOnce(Result<Vec<Tensor>>) + Send>;

/// The step's cancellation manager and, once registered, the token of an attempt's callback.
type CancelSlot = Option<(Arc<CancellationManager>, Arc<OnceLock<CancelToken>>)>;

struct EnqueueAttempt {
    id: u64,
    batch: Arc<Batch>,
    next: usize,
    done: EnqueueDone,
    cancel: CancelSlot,
}

struct DequeueAttempt {
    id: u64,
    requested: usize,
    allow_small: bool,
    batched: bool,
    taken: Vec<Row>,
    done: DequeueDone,
    cancel: CancelSlot,
}

enum Outcome {
    Complete,
    Progress,
    NoProgress,
}

/// A finished attempt, completed after the queue's lock is released.
enum Completion {
    Enqueue(EnqueueDone, Result<()>, CancelSlot),
    Dequeue { done: DequeueDone, rows: Result<Vec<Row>>, batched: bool, cancel: CancelSlot },
}

struct State {
    store: Store,
    closed: bool,
    enqueuers: VecDeque<EnqueueAttempt>,
    dequeuers: VecDeque<DequeueAttempt>,
    next_id: u64,
}

/// A queue resource. `FifoQueue`, `RandomShuffleQueue`, `PaddingFifoQueue` and `PriorityQueue`
/// name the same type; `spec().kind` tells them apart.
pub struct Queue {
    name: String,
    spec: QueueSpec,
    state: Mutex<State>,
}

pub type FifoQueue = Queue;
pub type RandomShuffleQueue = Queue;
pub type PaddingFifoQueue = Queue;
pub type PriorityQueue = Queue;

impl Resource for Queue {
    fn describe(&self) -> String {
        format!(
            "{} '{}' (capacity {}, {:?})",
            self.spec.kind.op_name(),
            self.name,
            self.spec.capacity,
            self.spec.dtypes
        )
    }
}

impl Queue {
    pub fn new(name: &str, spec: QueueSpec) -> Result<Queue> {
        spec.validate(name)?;
        let store = match &spec.kind {
            QueueKind::Fifo | QueueKind::PaddingFifo => Store::Fifo(VecDeque::new()),
            QueueKind::RandomShuffle { seed, seed2, .. } => {
                Store::Shuffle { rows: Vec::new(), rng: Rng::from_seeds(*seed, *seed2) }
            }
            QueueKind::Priority => Store::Priority { heap: BinaryHeap::new(), seq: 0 },
        };
        let state = State {
            store,
            closed: false,
            enqueuers: VecDeque::new(),
            dequeuers: VecDeque::new(),
            next_id: 0,
        };
        Ok(Queue { name: name.to_string(), spec, state: Mutex::new(state) })
    }

    pub fn fifo(name: &str, capacity: i64, dtypes: &[DType], shapes: &[PartialShape]) -> Result<Queue> {
        Queue::new(name, QueueSpec::new(QueueKind::Fifo, capacity, dtypes, shapes))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn spec(&self) -> &QueueSpec {
        &self.spec
    }

    /// A queue found under a shared name must be the one the caller declares.
    pub fn check_matches(&self, spec: &QueueSpec) -> Result<()> {
        let s = &self.spec;
        let what = s.kind.op_name();
        let mismatch = |field: &str, have: String, want: String| {
            Err(Error::invalid_argument(format!(
                "shared queue '{}' has {field} {have}, but this node declares {want}",
                self.name
            )))
        };
        if std::mem::discriminant(&s.kind) != std::mem::discriminant(&spec.kind) {
            return mismatch("kind", what.to_string(), spec.kind.op_name().to_string());
        }
        if s.capacity != spec.capacity {
            return mismatch("capacity", s.capacity.to_string(), spec.capacity.to_string());
        }
        if s.dtypes != spec.dtypes {
            return mismatch("component types", format!("{:?}", s.dtypes), format!("{:?}", spec.dtypes));
        }
        if s.shapes != spec.shapes {
            return mismatch("component shapes", format!("{:?}", s.shapes), format!("{:?}", spec.shapes));
        }
        if s.kind != spec.kind {
            return mismatch("options", format!("{:?}", s.kind), format!("{:?}", spec.kind));
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update under this lock is a sequence of single pushes and pops, so a panic in
        // between leaves a usable queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn size(&self) -> usize {
        self.lock().store.len()
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Number of enqueue and dequeue attempts waiting.
    pub fn num_waiting(&self) -> (usize, usize) {
        let st = self.lock();
        (st.enqueuers.len(), st.dequeuers.len())
    }

    fn closed_error(&self) -> Error {
        Error::cancelled(format!("{} '{}' is closed.", self.spec.kind.op_name(), self.name))
    }

    // ---- validation ----

    fn check_components(&self, comps: &[Tensor]) -> Result<()> {
        if comps.len() != self.spec.dtypes.len() {
            return Err(Error::invalid_argument(format!(
                "{} '{}' has {} components, got a tuple of {}",
                self.spec.kind.op_name(),
                self.name,
                self.spec.dtypes.len(),
                comps.len()
            )));
        }
        for (i, (t, d)) in comps.iter().zip(&self.spec.dtypes).enumerate() {
            if t.dtype() != *d {
                return Err(Error::invalid_argument(format!(
                    "Type mismatch in tuple component {i}. Expected {d}, got {}",
                    t.dtype()
                )));
            }
        }
        Ok(())
    }

    fn check_element_shape(&self, i: usize, s: &Shape) -> Result<()> {
        if let Some(want) = self.spec.shapes.get(i) {
            if !want.is_compatible_with(s) {
                return Err(Error::invalid_argument(format!(
                    "Shape mismatch in tuple component {i}. Expected {want}, got {s}"
                )));
            }
        }
        Ok(())
    }

    /// One element as a batch of one row.
    fn element_batch(&self, comps: Vec<Tensor>) -> Result<Batch> {
        self.check_components(&comps)?;
        let mut rows = Vec::with_capacity(comps.len());
        for (i, t) in comps.into_iter().enumerate() {
            self.check_element_shape(i, t.shape())?;
            let s = t.shape().prepend(1)?;
            rows.push(t.reshape(s)?);
        }
        self.check_priority(&rows)?;
        Ok(Batch { comps: rows, rows: 1 })
    }

    /// Elements stacked along dimension 0 of every component.
    fn many_batch(&self, comps: Vec<Tensor>) -> Result<Batch> {
        self.check_components(&comps)?;
        let mut n = None;
        for (i, t) in comps.iter().enumerate() {
            if t.shape().rank() == 0 {
                return Err(Error::invalid_argument(format!(
                    "Shape mismatch in tuple component {i}: enqueue_many needs rank >= 1, got a scalar"
                )));
            }
            let d0 = t.shape().dim(0);
            if *n.get_or_insert(d0) != d0 {
                return Err(Error::invalid_argument(format!(
                    "Shape mismatch in tuple component {i}: enqueue_many components must share dimension 0 \
                     ({} vs {d0})",
                    n.unwrap_or(0)
                )));
            }
            self.check_element_shape(i, &t.shape().tail())?;
        }
        self.check_priority(&comps)?;
        Ok(Batch { rows: n.unwrap_or(0), comps })
    }

    fn check_priority(&self, comps: &[Tensor]) -> Result<()> {
        if self.spec.kind == QueueKind::Priority && comps[0].shape().rank() != 1 {
            return Err(Error::invalid_argument(format!(
                "PriorityQueue '{}': the priority must be an int64 scalar per element",
                self.name
            )));
        }
        Ok(())
    }

    fn check_batchable(&self) -> Result<()> {
        match self.spec.kind {
            QueueKind::PaddingFifo => Ok(()),
            _ if self.spec.shapes_fully_defined() => Ok(()),
            _ => Err(Error::invalid_argument(format!(
                "{}'s DequeueMany and DequeueUpTo require the components to have specified shapes ('{}')",
                self.spec.kind.op_name(),
                self.name
            ))),
        }
    }

    // ---- asynchronous API (what the kernels use) ----

    /// Enqueues one element; `done` runs when it is in the queue, on `Cancelled` when the queue
    /// is closed, or with the step's reason when `cancel` fires first.
    pub fn enqueue_async(
        self: &Arc<Self>,
        comps: Vec<Tensor>,
        cancel: Option<&Arc<CancellationManager>>,
        done: EnqueueDone,
    ) {
        match self.element_batch(comps) {
            Ok(b) => self.submit_enqueue(b, cancel, done),
            Err(e) => done(Err(e)),
        }
    }

    /// Enqueues the rows of `comps` (dimension 0); as TensorFlow, rows enter as room appears,
    /// and rows already in stay there if the attempt is cancelled.
    pub fn enqueue_many_async(
        self: &Arc<Self>,
        comps: Vec<Tensor>,
        cancel: Option<&Arc<CancellationManager>>,
        done: EnqueueDone,
    ) {
        match self.many_batch(comps) {
            Ok(b) => self.submit_enqueue(b, cancel, done),
            Err(e) => done(Err(e)),
        }
    }

    fn submit_enqueue(
        self: &Arc<Self>,
        batch: Batch,
        cancel: Option<&Arc<CancellationManager>>,
        done: EnqueueDone,
    ) {
        let slot = new_slot(cancel);
        let (id, done_list) = {
            let mut st = self.lock();
            if st.closed {
                drop(st);
                return done(Err(self.closed_error()));
            }
            if batch.rows == 0 {
                drop(st);
                return done(Ok(()));
            }
            st.next_id += 1;
            let id = st.next_id;
            st.enqueuers.push_back(EnqueueAttempt {
                id,
                batch: Arc::new(batch),
                next: 0,
                done,
                cancel: slot.clone(),
            });
            let list = self.flush(&mut st);
            let waiting = st.enqueuers.iter().any(|a| a.id == id);
            (waiting.then_some(id), list)
        };
        complete(done_list, &self.spec);
        if let Some(id) = id {
            self.register_cancel(id, slot);
        }
    }

    /// Dequeues one element.
    pub fn dequeue_async(self: &Arc<Self>, cancel: Option<&Arc<CancellationManager>>, done: DequeueDone) {
        self.submit_dequeue(1, false, false, cancel, done)
    }

    /// Dequeues exactly `n` elements stacked along a new dimension 0; all or nothing: on a
    /// closed queue with fewer than `n` left it fails with `OutOfRange` and takes none.
    pub fn dequeue_many_async(
        self: &Arc<Self>,
        n: usize,
        cancel: Option<&Arc<CancellationManager>>,
        done: DequeueDone,
    ) {
        if let Err(e) = self.check_batchable() {
            return done(Err(e));
        }
        self.submit_dequeue(n, false, true, cancel, done)
    }

    /// Like `dequeue_many`, but a closed queue with `0 < k < n` elements left returns those `k`.
    pub fn dequeue_up_to_async(
        self: &Arc<Self>,
        n: usize,
        cancel: Option<&Arc<CancellationManager>>,
        done: DequeueDone,
    ) {
        if let Err(e) = self.check_batchable() {
            return done(Err(e));
        }
        self.submit_dequeue(n, true, true, cancel, done)
    }

    fn submit_dequeue(
        self: &Arc<Self>,
        n: usize,
        allow_small: bool,
        batched: bool,
        cancel: Option<&Arc<CancellationManager>>,
        done: DequeueDone,
    ) {
        if n == 0 {
            return done(self.empty_batch());
        }
        let slot = new_slot(cancel);
        let (id, list) = {
            let mut st = self.lock();
            st.next_id += 1;
            let id = st.next_id;
            st.dequeuers.push_back(DequeueAttempt {
                id,
                requested: n,
                allow_small,
                batched,
                taken: Vec::new(),
                done,
                cancel: slot.clone(),
            });
            let list = self.flush(&mut st);
            let waiting = st.dequeuers.iter().any(|a| a.id == id);
            (waiting.then_some(id), list)
        };
        complete(list, &self.spec);
        if let Some(id) = id {
            self.register_cancel(id, slot);
        }
    }

    fn empty_batch(&self) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.spec.dtypes.len());
        for (i, d) in self.spec.dtypes.iter().enumerate() {
            let tail = self.spec.shapes.get(i).and_then(|s| s.to_shape()).unwrap_or_else(|| {
                Shape::new(&vec![0; self.spec.shapes.get(i).and_then(|s| s.rank()).unwrap_or(0)])
                    .unwrap_or_default()
            });
            out.push(Tensor::try_zeros(*d, tail.prepend(0)?)?);
        }
        Ok(out)
    }

    /// Closes the queue. Later enqueues fail with `Cancelled`; waiting enqueues still complete
    /// unless `cancel_pending_enqueues`; dequeues drain what is left, then get `OutOfRange`.
    pub fn close(&self, cancel_pending_enqueues: bool) {
        let list = {
            let mut st = self.lock();
            st.closed = true;
            let mut list = Vec::new();
            if cancel_pending_enqueues {
                for a in st.enqueuers.drain(..) {
                    list.push(Completion::Enqueue(
                        a.done,
                        Err(Error::cancelled("Enqueue operation was cancelled")),
                        a.cancel,
                    ));
                }
            }
            list.extend(self.flush(&mut st));
            list
        };
        complete(list, &self.spec);
    }

    fn register_cancel(self: &Arc<Self>, id: u64, slot: CancelSlot) {
        let Some((cm, token)) = slot else { return };
        let weak = Arc::downgrade(self);
        let r = cm.register(move |reason| {
            if let Some(q) = weak.upgrade() {
                q.withdraw(id, reason.clone());
            }
        });
        match r {
            Some(t) => {
                let _ = token.set(t);
            }
            None => self.withdraw(id, cm.reason().unwrap_or_else(|| Error::cancelled("step was cancelled"))),
        }
    }

    /// Removes attempt `id` (if still waiting), puts back what it took, and fails it with `reason`.
    fn withdraw(&self, id: u64, reason: Error) {
        let list = {
            let mut st = self.lock();
            let mut list = Vec::new();
            if let Some(i) = st.enqueuers.iter().position(|a| a.id == id) {
                let a = st.enqueuers.remove(i).expect("index from position");
                list.push(Completion::Enqueue(a.done, Err(reason), None));
            } else if let Some(i) = st.dequeuers.iter().position(|a| a.id == id) {
                let a = st.dequeuers.remove(i).expect("index from position");
                st.store.restore(a.taken);
                list.push(Completion::Dequeue {
                    done: a.done,
                    rows: Err(reason),
                    batched: a.batched,
                    cancel: None,
                });
            }
            if !list.is_empty() {
                list.extend(self.flush(&mut st));
            }
            list
        };
        complete(list, &self.spec);
    }

    /// Runs waiting attempts, head of each list first, until none can move.
    fn flush(&self, st: &mut State) -> Vec<Completion> {
        let mut out = Vec::new();
        loop {
            let mut progress = false;
            while let Some(mut a) = st.dequeuers.pop_front() {
                match self.run_dequeue(&mut a, st) {
                    Ok(Outcome::Complete) => {
                        progress = true;
                        out.push(Completion::Dequeue {
                            rows: Ok(std::mem::take(&mut a.taken)),
                            done: a.done,
                            batched: a.batched,
                            cancel: a.cancel,
                        });
                    }
                    Err(e) => {
                        progress = true;
                        out.push(Completion::Dequeue {
                            done: a.done,
                            rows: Err(e),
                            batched: a.batched,
                            cancel: a.cancel,
                        });
                    }
                    Ok(o) => {
                        progress |= matches!(o, Outcome::Progress);
                        st.dequeuers.push_front(a);
                        break;
                    }
                }
            }
            while let Some(mut a) = st.enqueuers.pop_front() {
                match self.run_enqueue(&mut a, st) {
                    Outcome::Complete => {
                        progress = true;
                        out.push(Completion::Enqueue(a.done, Ok(()), a.cancel));
                    }
                    o => {
                        progress |= matches!(o, Outcome::Progress);
                        st.enqueuers.push_front(a);
                        break;
                    }
                }
            }
            if !progress {
                break;
            }
        }
        self.invariants(st);
        out
    }

    fn run_enqueue(&self, a: &mut EnqueueAttempt, st: &mut State) -> Outcome {
        let start = a.next;
        while a.next < a.batch.rows && st.store.len() < self.spec.capacity {
            st.store.push(Row { batch: a.batch.clone(), row: a.next });
            a.next += 1;
        }
        if a.next == a.batch.rows {
            Outcome::Complete
        } else if a.next > start {
            Outcome::Progress
        } else {
            Outcome::NoProgress
        }
    }

    fn run_dequeue(&self, a: &mut DequeueAttempt, st: &mut State) -> Result<Outcome> {
        let keep = match self.spec.kind {
            QueueKind::RandomShuffle { min_after_dequeue, .. } if !st.closed => min_after_dequeue,
            _ => 0,
        };
        let needed = a.requested - a.taken.len();
        let available = st.store.len().saturating_sub(keep);
        if st.closed && available < needed {
            // Not enough will ever come: give back what this attempt holds, all or nothing.
            st.store.restore(std::mem::take(&mut a.taken));
            if a.allow_small && st.store.len() > 0 {
                a.requested = st.store.len().min(a.requested);
            } else if a.allow_small && !st.enqueuers.is_empty() {
                // Pending enqueues still honoured after close may bring more.
                return Ok(Outcome::NoProgress);
            } else {
                return Err(Error::out_of_range(format!(
                    "{} '{}' is closed and has insufficient elements (requested {}, current size {})",
                    self.spec.kind.op_name(),
                    self.name,
                    a.requested,
                    st.store.len()
                )));
            }
        }
        let needed = a.requested - a.taken.len();
        let available = st.store.len().saturating_sub(keep);
        let n = needed.min(available);
        a.taken.reserve(n);
        for _ in 0..n {
            a.taken.extend(st.store.take());
        }
        Ok(if a.taken.len() == a.requested {
            Outcome::Complete
        } else if n > 0 {
            Outcome::Progress
        } else {
            Outcome::NoProgress
        })
    }

    /// What must hold whenever the lock is released after a flush.
    fn invariants(&self, st: &State) {
        // A dequeue still waiting at the head could not take more: the store is empty (or at the
        // shuffle floor), or the queue is open.
        if let Some(a) = st.dequeuers.front() {
            debug_assert!(a.taken.len() < a.requested);
        }
        // An enqueue still waiting at the head means the queue is full.
        if st.enqueuers.front().is_some() {
            debug_assert!(st.store.len() >= self.spec.capacity);
        }
    }

    // ---- blocking API (tests, tools) ----

    /// Runs an asynchronous call and waits at most `timeout` for it; a timed-out attempt is
    /// withdrawn (`DeadlineExceeded`) and leaves the queue as if never made.
    fn blocking<T: Send + 'static>(
        &self,
        timeout: Duration,
        call: impl FnOnce(&Arc<CancellationManager>, Box<dyn FnOnce(Result<T>) + Send>),
    ) -> Result<T> {
        let cm = Arc::new(CancellationManager::new());
        let (tx, rx) = mpsc::sync_channel(1);
        call(&cm, Box::new(move |r| drop(tx.send(r))));
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => {
                cm.cancel(Error::deadline_exceeded(format!(
                    "{} '{}': wait timed out after {} ms",
                    self.spec.kind.op_name(),
                    self.name,
                    timeout.as_millis()
                )));
                rx.recv_timeout(Duration::from_millis(CANCEL_REPORT_MS))
                    .unwrap_or_else(|_| Err(Error::internal("a cancelled queue attempt did not report back")))
            }
        }
    }

    pub fn enqueue(self: &Arc<Self>, comps: Vec<Tensor>, timeout: Duration) -> Result<()> {
        self.blocking(timeout, |cm, d| self.enqueue_async(comps, Some(cm), d))
    }

    pub fn enqueue_many(self: &Arc<Self>, comps: Vec<Tensor>, timeout: Duration) -> Result<()> {
        self.blocking(timeout, |cm, d| self.enqueue_many_async(comps, Some(cm), d))
    }

    pub fn dequeue(self: &Arc<Self>, timeout: Duration) -> Result<Vec<Tensor>> {
        self.blocking(timeout, |cm, d| self.dequeue_async(Some(cm), d))
    }

    pub fn dequeue_many(self: &Arc<Self>, n: usize, timeout: Duration) -> Result<Vec<Tensor>> {
        self.blocking(timeout, |cm, d| self.dequeue_many_async(n, Some(cm), d))
    }

    pub fn dequeue_up_to(self: &Arc<Self>, n: usize, timeout: Duration) -> Result<Vec<Tensor>> {
        self.blocking(timeout, |cm, d| self.dequeue_up_to_async(n, Some(cm), d))
    }

    /// Enqueues one element if there is room now; `Ok(false)` when full.
    pub fn try_enqueue(self: &Arc<Self>, comps: Vec<Tensor>) -> Result<bool> {
        match self.enqueue(comps, Duration::ZERO) {
            Ok(()) => Ok(true),
            Err(e) if e.code == rill_graph::Code::DeadlineExceeded => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Dequeues one element if one is there now; `Ok(None)` when none is.
    pub fn try_dequeue(self: &Arc<Self>) -> Result<Option<Vec<Tensor>>> {
        match self.dequeue(Duration::ZERO) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.code == rill_graph::Code::DeadlineExceeded => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn new_slot(cancel: Option<&Arc<CancellationManager>>) -> CancelSlot {
    cancel.map(|cm| (cm.clone(), Arc::new(OnceLock::new())))
}

fn release(slot: CancelSlot) {
    if let Some((cm, token)) = slot {
        if let Some(t) = token.get() {
            cm.deregister(*t);
        }
    }
}

/// Runs completions outside the queue's lock (a completion may run another step's kernels).
fn complete(list: Vec<Completion>, spec: &QueueSpec) {
    for c in list {
        match c {
            Completion::Enqueue(done, r, slot) => {
                release(slot);
                done(r);
            }
            Completion::Dequeue { done, rows, batched, cancel } => {
                release(cancel);
                done(rows.and_then(|rows| gather(&rows, batched, spec)));
            }
        }
    }
}

/// The tensors of `rows`: one element (`batched == false`) or the rows stacked along a new
/// dimension 0, zero-padded to the largest row when the queue pads.
fn gather(rows: &[Row], batched: bool, spec: &QueueSpec) -> Result<Vec<Tensor>> {
    let pad = spec.kind == QueueKind::PaddingFifo;
    let whole = rows.first().is_some_and(|f| {
        f.row == 0
            && f.batch.rows == rows.len()
            && rows.iter().enumerate().all(|(i, r)| r.row == i && Arc::ptr_eq(&r.batch, &f.batch))
    });
    let mut out = Vec::with_capacity(spec.dtypes.len());
    for (c, &dtype) in spec.dtypes.iter().enumerate() {
        let t = if whole {
            // The rows are exactly one enqueued batch: hand its tensor back without copying.
            rows[0].batch.comps[c].clone()
        } else {
            gather_component(rows, c, dtype, pad)?
        };
        out.push(if batched { t } else { t.reshape(t.shape().tail())? });
    }
    Ok(out)
}

fn gather_component(rows: &[Row], c: usize, dtype: DType, pad: bool) -> Result<Tensor> {
    let tail_of = |r: &Row| r.batch.comps[c].shape().tail();
    let first = tail_of(&rows[0]);
    let mut tail = first;
    for r in rows {
        let s = tail_of(r);
        if s == tail {
            continue;
        }
        if !pad || s.rank() != tail.rank() {
            return Err(Error::invalid_argument(format!(
                "cannot batch component {c}: elements have shapes {first} and {s}"
            )));
        }
        for i in 0..s.rank() {
            tail.set_dim(i, tail.dim(i).max(s.dim(i)));
        }
    }
    let shape = tail.prepend(rows.len())?;
    let row_elems = tail.num_elements();
    if matches!(dtype, DType::String) {
        let mut v = vec![Vec::new(); shape.checked_num_elements()?];
        for (i, r) in rows.iter().enumerate() {
            let src = r.batch.comps[c].strings()?;
            let s = tail_of(r);
            let n = s.num_elements();
            let part = &src[r.row * n..(r.row + 1) * n];
            copy_padded(part, s.dims(), &mut v[i * row_elems..(i + 1) * row_elems], tail.dims());
        }
        return Tensor::from_strings(shape, v);
    }
    let es = dtype.size().unwrap_or(1);
    let mut buf = Buffer::zeroed(shape.checked_num_elements()?.checked_mul(es).ok_or_else(|| {
        Error::resource_exhausted(format!("a batch of shape {shape} does not fit in memory"))
    })?);
    let dst = buf.as_bytes_mut();
    let rb = row_elems * es;
    for (i, r) in rows.iter().enumerate() {
        let src = r.batch.comps[c].as_bytes()?;
        let s = tail_of(r);
        let n = s.num_elements() * es;
        let part = &src[r.row * n..(r.row + 1) * n];
        if s == tail {
            dst[i * rb..(i + 1) * rb].copy_from_slice(part);
        } else {
            copy_padded_bytes(part, s.dims(), &mut dst[i * rb..(i + 1) * rb], tail.dims(), es);
        }
    }
    Tensor::from_buffer(dtype, shape, buf)
}

/// Copies a row-major block of dims `src_dims` into the top-left corner of one of `dst_dims`.
fn copy_padded<T: Clone>(src: &[T], src_dims: &[usize], dst: &mut [T], dst_dims: &[usize]) {
    match src_dims.len() {
        0 => dst[0] = src[0].clone(),
        1 => dst[..src_dims[0]].clone_from_slice(&src[..src_dims[0]]),
        _ => {
            let sn: usize = src_dims[1..].iter().product();
            let dn: usize = dst_dims[1..].iter().product();
            for i in 0..src_dims[0] {
                copy_padded(
                    &src[i * sn..(i + 1) * sn],
                    &src_dims[1..],
                    &mut dst[i * dn..(i + 1) * dn],
                    &dst_dims[1..],
                );
            }
        }
    }
}

fn copy_padded_bytes(src: &[u8], src_dims: &[usize], dst: &mut [u8], dst_dims: &[usize], es: usize) {
    match src_dims.len() {
        0 => dst[..es].copy_from_slice(&src[..es]),
        1 => dst[..src_dims[0] * es].copy_from_slice(&src[..src_dims[0] * es]),
        _ => {
            let sn: usize = src_dims[1..].iter().product::<usize>() * es;
            let dn: usize = dst_dims[1..].iter().product::<usize>() * es;
            for i in 0..src_dims[0] {
                copy_padded_bytes(
                    &src[i * sn..(i + 1) * sn],
                    &src_dims[1..],
                    &mut dst[i * dn..(i + 1) * dn],
                    &dst_dims[1..],
                    es,
                );
            }
        }
    }
}
