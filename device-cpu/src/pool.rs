//! A work-stealing thread pool on crossbeam-deque, owned by a device (never global).
//!
//! Finding work (after crossbeam-deque's `find_task`): pop the thread's own deque, then take a
//! batch from the shared injector, then steal from the other workers starting at a random one.
//!
//! Sleeping and waking, the protocol that keeps a job from being stranded:
//! - A worker that found nothing spins (at least `SPIN_ROUNDS`, and for as long as the pool's
//!   `spin` time), then takes the `sleep` lock, increments
//!   `sleepers`, issues a SeqCst fence and looks at the injector once more. Only if it is still
//!   empty does it wait on the condition variable (with a timeout as a backstop).
//! - `spawn` pushes the job, issues a SeqCst fence, and if `sleepers` is non-zero takes the lock
//!   and notifies one waiter. Because both sides fence between their write and their read, either
//!   the sleeper sees the job or the spawner sees the sleeper; the lock orders the notify after
//!   the wait begins.
//! - Jobs pushed to a worker's own deque need no wake-up for correctness (that worker is awake
//!   and will run them); sleepers are still woken so they can steal.

use crossbeam_deque::{Injector, Steal, Stealer, Worker};
use std::cell::RefCell;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Spin rounds before a worker sleeps: long enough to catch the next node of a step handed off
/// by another thread, short enough not to starve the client thread on a 2-core machine.
const SPIN_ROUNDS: usize = 64;
/// Backstop for a sleeping worker, so even a missed wake-up costs at most this much latency.
const SLEEP_TIMEOUT: Duration = Duration::from_millis(100);
/// How long an intra-op worker stays awake after its last chunk (`ThreadPool::with_spin`): a
/// step's kernels hand it chunks every few tens of µs, and waking a sleeping worker is not just
/// slow but unreliable on a busy machine: the scheduler tends to queue it behind the thread that
/// woke it, which then does all the chunks itself (measured on 2 vCPUs: most helpers of a
/// 128×784×256 MatMul started after the caller had finished, the product ran at one core's
/// speed; with this spin they start within 2 µs).
pub const INTRA_OP_SPIN: Duration = Duration::from_micros(200);
/// The same for inter-op workers, which take the next expensive node of a step (measured: the
/// MLP training step ran 15% more steps/s with this on top of `INTRA_OP_SPIN`).
pub const INTER_OP_SPIN: Duration = Duration::from_micros(100);

struct Shared {
    id: usize,
    injector: Injector<Job>,
    stealers: Vec<Stealer<Job>>,
    sleepers: AtomicUsize,
    /// Workers idle but awake (in their spin), which start a job handed out now at once.
    spinning: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// How long an idle worker keeps looking for work before it sleeps.
    spin: Duration,
    /// A pool whose queued jobs this pool's idle workers also take (see `ThreadPool::helping`).
    helps: Option<Arc<Shared>>,
}

thread_local! {
    /// The pool id and local deque of the current thread, if it is a pool worker.
    static LOCAL: RefCell<Option<(usize, Worker<Job>, usize)>> = const { RefCell::new(None) };
}

/// A fixed-size work-stealing pool.
pub struct ThreadPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadPool({} threads)", self.threads.len())
    }
}

static NEXT_POOL: AtomicUsize = AtomicUsize::new(1);

impl ThreadPool {
    /// A pool of `n` threads named `{name}-{i}` (n may be 0: then jobs run on the caller) whose
    /// idle workers spin only briefly before they sleep.
    pub fn new(name: &str, n: usize) -> ThreadPool {
        ThreadPool::with_spin(name, n, Duration::ZERO)
    }

    /// A pool whose idle workers keep looking for work for `spin` before they sleep, trading
    /// that much CPU time after each burst of jobs for workers that are awake for the next one.
    pub fn with_spin(name: &str, n: usize, spin: Duration) -> ThreadPool {
        ThreadPool::build(name, n, spin, None)
    }

    /// A pool like `with_spin` whose idle workers also take the jobs queued on `other`'s
    /// injector. An inter-op pool helps its device's intra-op pool so that a product's chunks
    /// start on whichever thread holds a free CPU: with more threads than CPUs, the scheduler
    /// may stack the intra-op helper on the CPU of the thread whose chunks it should share, and
    /// the product then runs at one CPU's pace while an idle inter-op worker spins on the other.
    /// Measured on 2 vCPUs (2 inter-op threads, 1 intra-op helper): in such stretches, lasting
    /// seconds, the MLP training step took ~750 µs instead of ~480 µs, and in 1 of 14 products
    /// the helper started before its caller had taken every chunk; with this, 1 step in 100 is
    /// slow instead of 1 in 6.
    pub fn helping(name: &str, n: usize, spin: Duration, other: &ThreadPool) -> ThreadPool {
        ThreadPool::build(name, n, spin, Some(other.shared.clone()))
    }

    fn build(name: &str, n: usize, spin: Duration, helps: Option<Arc<Shared>>) -> ThreadPool {
        let workers: Vec<Worker<Job>> = (0..n).map(|_| Worker::new_lifo()).collect();
        let shared = Arc::new(Shared {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            injector: Injector::new(),
            stealers: workers.iter().map(|w| w.stealer()).collect(),
            sleepers: AtomicUsize::new(0),
            spinning: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            spin,
            helps,
        });
        let threads = workers
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || worker_main(s, w, i))
                    .expect("the OS can start a pool thread")
            })
            .collect();
        ThreadPool { shared, threads }
    }

    pub fn num_threads(&self) -> usize {
        self.threads.len()
    }

    /// Whether the current thread is one of this pool's workers.
    pub fn on_pool_thread(&self) -> bool {
        LOCAL.with(|l| l.borrow().as_ref().is_some_and(|(id, _, _)| *id == self.shared.id))
    }

    /// Queues a job; never blocks. On a pool thread the job goes to its own deque.
    pub fn spawn(&self, job: Job) {
        if self.threads.is_empty() {
            job();
            return;
        }
        let rejected = LOCAL.with(|l| match l.borrow().as_ref() {
            Some((id, w, _)) if *id == self.shared.id => {
                w.push(job);
                None
            }
            _ => Some(job),
        });
        if let Some(job) = rejected {
            self.shared.injector.push(job);
        }
        fence(Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_one();
        }
    }

    /// Runs one queued job on the calling thread if there is one (used while waiting).
    pub fn help_once(&self) -> bool {
        match find_task(&self.shared, None, 0) {
            Some(job) => {
                job();
                true
            }
            None => false,
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // A pool dropped from one of its own jobs cannot join itself; that thread exits on
            // its own once the job returns and it sees the shutdown flag.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

fn find_task(s: &Shared, local: Option<&Worker<Job>>, me: usize) -> Option<Job> {
    if let Some(w) = local {
        if let Some(j) = w.pop() {
            return Some(j);
        }
    }
    loop {
        let st = match local {
            Some(w) => s.injector.steal_batch_and_pop(w),
            None => s.injector.steal(),
        };
        match st {
            Steal::Success(j) => return Some(j),
            Steal::Retry => continue,
            Steal::Empty => break,
        }
    }
    let n = s.stealers.len();
    let start = me.wrapping_add(fast_rand()) % n.max(1);
    for k in 0..n {
        let v = (start + k) % n;
        if local.is_some() && v == me {
            continue;
        }
        loop {
            match s.stealers[v].steal() {
                Steal::Success(j) => return Some(j),
                Steal::Retry => continue,
                Steal::Empty => break,
            }
        }
    }
    // Only a pool's own workers help another pool (`help_once` callers wait on this pool).
    if let (Some(h), Some(_)) = (&s.helps, local) {
        loop {
            match h.injector.steal() {
                Steal::Success(j) => return Some(j),
                Steal::Retry => continue,
                Steal::Empty => break,
            }
        }
    }
    None
}

fn fast_rand() -> usize {
    thread_local!(static X: std::cell::Cell<u32> = const { std::cell::Cell::new(0x9e37_79b9) });
    X.with(|x| {
        let mut v = x.get();
        v ^= v << 13;
        v ^= v >> 17;
        v ^= v << 5;
        x.set(v);
        v as usize
    })
}

fn worker_main(s: Arc<Shared>, w: Worker<Job>, me: usize) {
    LOCAL.with(|l| *l.borrow_mut() = Some((s.id, w, me)));
    loop {
        let job = LOCAL.with(|l| {
            let b = l.borrow();
            let (_, w, _) = b.as_ref().expect("set above");
            find_task(&s, Some(w), me)
        });
        if let Some(job) = job {
            // A panicking job must not kill the worker; the executor already turns kernel
            // panics into step errors, so this only guards against bugs outside kernels.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            continue;
        }
        if s.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let mut found = false;
        let idle_since = std::time::Instant::now();
        s.spinning.fetch_add(1, Ordering::Relaxed);
        for i in 0.. {
            if i >= SPIN_ROUNDS && (s.spin.is_zero() || idle_since.elapsed() >= s.spin) {
                break;
            }
            if !s.injector.is_empty()
                || s.stealers.iter().any(|st| !st.is_empty())
                || s.helps.as_ref().is_some_and(|h| !h.injector.is_empty())
            {
                found = true;
                break;
            }
            if i % 8 == 7 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        s.spinning.fetch_sub(1, Ordering::Relaxed);
        if found {
            continue;
        }
        let g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if s.injector.is_empty() && !s.shutdown.load(Ordering::SeqCst) {
            let _ = s.wake.wait_timeout(g, SLEEP_TIMEOUT).unwrap_or_else(|e| e.into_inner());
        } else {
            drop(g);
        }
        s.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
    LOCAL.with(|l| *l.borrow_mut() = None);
}

/// The state of one `parallel_for`: indices are claimed from `next`; the caller returns only
/// when `done == n`, and a job that claims an index `>= n` never touches `f`.
struct ForState {
    next: AtomicUsize,
    done: AtomicUsize,
    n: usize,
    f: *const (dyn Fn(usize) + Sync + 'static),
    lock: Mutex<bool>,
    cv: Condvar,
}

// SAFETY: `f` points to a `Sync` closure that outlives every dereference: `parallel_for` does
// not return before all `n` claimed indices have completed, and an index is claimed before `f`
// is used (see `run_indices`).
#[allow(unsafe_code)]
unsafe impl Send for ForState {}
// SAFETY: as above; all other fields are thread-safe.
#[allow(unsafe_code)]
unsafe impl Sync for ForState {}

impl ForState {
    fn run_indices(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.n {
                return;
            }
            // SAFETY: `i < n` was claimed, so the owning `parallel_for` call is still waiting
            // for this index and the closure behind `f` is alive.
            #[allow(unsafe_code)]
            let f = unsafe { &*self.f };
            // A panic in one chunk must still count the chunk as done, or the caller would
            // wait forever; the panic is re-raised on the caller's thread below.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i)));
            if r.is_err() {
                *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            }
            if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
                let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.cv.notify_all();
            }
        }
    }
}

impl rill_graph::IntraOpPool for ThreadPool {
    /// The caller takes part, so one more than the pool's own threads.
    fn num_threads(&self) -> usize {
        self.threads.len() + 1
    }

    fn idle_workers(&self) -> Option<rill_graph::IdleWorkers> {
        Some(rill_graph::IdleWorkers {
            awake: self.shared.spinning.load(Ordering::Relaxed),
            asleep: self.shared.sleepers.load(Ordering::Relaxed),
        })
    }

    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.threads.is_empty() {
            (0..n).for_each(f);
            return;
        }
        // SAFETY: only the lifetime is erased; see `ForState` for why the pointer stays valid.
        #[allow(unsafe_code)]
        let f_static: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let st = Arc::new(ForState {
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            n,
            f: f_static as *const _,
            lock: Mutex::new(false),
            cv: Condvar::new(),
        });
        let helpers = (n - 1).min(self.threads.len());
        for _ in 0..helpers {
            let s = st.clone();
            self.spawn(Box::new(move || s.run_indices()));
        }
        st.run_indices();
        let mut spins = 0;
        while st.done.load(Ordering::Acquire) < n {
            if spins < 2000 {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let g = st.lock.lock().unwrap_or_else(|e| e.into_inner());
            if st.done.load(Ordering::Acquire) < n {
                let _ = st.cv.wait_timeout(g, Duration::from_millis(1));
            }
        }
        if *st.lock.lock().unwrap_or_else(|e| e.into_inner()) {
            panic!("a parallel chunk panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Waits up to 10 s for `pool`'s one worker to be asleep.
    fn asleep_within_10s(pool: &ThreadPool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if pool.shared.sleepers.load(Ordering::SeqCst) == 1 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn idle_workers_stay_awake_for_their_spin_then_sleep() {
        for (spin, awake_at_20ms) in [(Duration::ZERO, false), (Duration::from_millis(300), true)] {
            let pool = ThreadPool::with_spin("spin-test", 1, spin);
            let (tx, rx) = std::sync::mpsc::channel();
            pool.spawn(Box::new(move || tx.send(Instant::now()).expect("receiver alive")));
            let done = rx.recv_timeout(Duration::from_secs(10)).expect("the job ran");
            if awake_at_20ms {
                std::thread::sleep(Duration::from_millis(20).saturating_sub(done.elapsed()));
                // The spin is timed by the wall clock from after the job, so a worker seen asleep
                // before `spin` has passed since then slept early. (Read first, then the clock:
                // a test thread held up past the spin proves nothing and checks nothing.)
                let sleepers = pool.shared.sleepers.load(Ordering::SeqCst);
                let idle = rill_graph::IntraOpPool::idle_workers(&pool).expect("the pool tells");
                if done.elapsed() < spin {
                    assert_eq!(sleepers, 0, "asleep during its spin");
                    assert_eq!(
                        idle,
                        rill_graph::IdleWorkers { awake: 1, asleep: 0 },
                        "awake, so idle and awake"
                    );
                }
            }
            assert!(asleep_within_10s(&pool), "a worker with spin {spin:?} never went to sleep");
            let idle = rill_graph::IntraOpPool::idle_workers(&pool);
            assert_eq!(idle, Some(rill_graph::IdleWorkers { awake: 0, asleep: 1 }), "asleep");
        }
    }

    #[test]
    fn an_idle_helping_worker_runs_the_other_pools_queued_job() {
        let intra = ThreadPool::with_spin("helped", 1, Duration::ZERO);
        // The helped pool's only worker is held busy (before the helper exists, so the helper
        // cannot take this job), so only the helper can run the next job.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, busy) = std::sync::mpsc::channel();
        intra.spawn(Box::new(move || {
            started.send(()).expect("receiver alive");
            let _ = held.recv_timeout(Duration::from_secs(10));
        }));
        busy.recv_timeout(Duration::from_secs(10)).expect("the helped pool's worker started");
        let inter = ThreadPool::helping("helper", 1, Duration::ZERO, &intra);
        let (tx, rx) = std::sync::mpsc::channel();
        intra.spawn(Box::new(move || {
            let name = std::thread::current().name().map(str::to_string);
            tx.send(name).expect("receiver alive");
        }));
        let ran_on = rx.recv_timeout(Duration::from_secs(10)).expect("the queued job ran");
        assert_eq!(ran_on.as_deref(), Some("helper-0"));
        release.send(()).expect("the held job waits");
        drop(inter);
    }
}
