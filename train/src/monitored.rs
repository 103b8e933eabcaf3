//! `MonitoredSession`: a `Session` that survives a restarted task. A step that fails with
//! `Aborted` or `Unavailable` closes the session, waits (with backoff, every wait bounded) until
//! the cluster answers again, creates a new session through the factory, brings the model back —
//! the chief restores the latest checkpoint (or initialises), a non-chief waits until the chief
//! has — and runs the step again. The chief also writes a checkpoint every N steps or seconds.

use crate::saver::{latest_checkpoint, Saver, SaverOptions};
use rill_graph::{
    Code, DeviceAttributes, Error, Graph, GraphDef, Output, Result, RunMetadata, RunOptions, Session, Tensor,
    VariableInfo,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Creates a session for a graph (a `RemoteSession::connect` to this task's server, typically).
pub type SessionFactory = Box<dyn Fn(&Graph) -> Result<Arc<dyn Session>> + Send + Sync>;

/// How often a non-chief looks whether the model has been initialised.
const READY_POLL_MS: u64 = 50;
/// File-name prefix of the checkpoints a chief writes in `checkpoint_dir`.
pub const CHECKPOINT_PREFIX: &str = "model.ckpt";

/// Options of a `MonitoredSession`; `Default` gives a non-chief without checkpoints.
#[derive(Clone, Debug)]
pub struct MonitoredSessionOptions {
    /// The chief initialises or restores the model and writes checkpoints; others wait for it.
    pub is_chief: bool,
    /// Where the chief restores from and saves to; `None`: initialise only, never save.
    pub checkpoint_dir: Option<PathBuf>,
    /// Save after this many global steps since the last save; 0 = not by steps.
    pub save_checkpoint_steps: u64,
    /// Save when this many seconds passed since the last save; 0 = not by time.
    pub save_checkpoint_secs: u64,
    pub saver: SaverOptions,
    /// How often one `run` may recover and try again (TensorFlow retries once).
    pub max_step_retries: usize,
    /// Bound on one recovery: connecting, restoring, waiting for the chief.
    pub recovery_timeout_ms: u64,
    /// First wait between connection attempts; it doubles up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Deadline of the steps this session runs itself (init, restore, readiness checks, saves).
    pub control_timeout_in_ms: u64,
}

impl Default for MonitoredSessionOptions {
    fn default() -> Self {
        MonitoredSessionOptions {
            is_chief: false,
            checkpoint_dir: None,
            save_checkpoint_steps: 0,
            save_checkpoint_secs: 0,
            saver: SaverOptions::default(),
            max_step_retries: 1,
            recovery_timeout_ms: 60_000,
            backoff_initial_ms: 50,
            backoff_max_ms: 2_000,
            control_timeout_in_ms: 10_000,
        }
    }
}

/// Ops a `MonitoredSession` runs besides the user's (TensorFlow's `Scaffold`).
#[derive(Clone, Debug, Default)]
pub struct Scaffold {
    /// Initialises the model on the chief when there is no checkpoint; default: every global
    /// variable's initializer.
    pub init_op: Option<Output>,
    /// Run on every task after the model is ready (a sync replica's `local_step_init_op`).
    pub local_init_op: Option<Output>,
    /// Variables that must be initialised for the model to be ready; default: the global ones.
    pub ready_variables: Option<Vec<VariableInfo>>,
}

struct Current {
    session: Arc<dyn Session>,
    /// Bumped by each recovery, so threads that failed on the same session recover once.
    generation: u64,
}

struct CheckpointState {
    saver: Saver,
    last_step: Option<i64>,
    last_time: Instant,
}

/// What a session is made and prepared from.
struct Core {
    def: Mutex<GraphDef>,
    factory: SessionFactory,
    opts: MonitoredSessionOptions,
    init_op: Output,
    local_init_op: Option<Output>,
    ready_ops: Vec<Output>,
    global_step: Option<Output>,
    checkpoint: Option<Mutex<CheckpointState>>,
    /// The checkpoint the chief last restored and the global step it held.
    last_restore: Mutex<Option<(PathBuf, Option<i64>)>>,
}

/// A recoverable session; see the module documentation.
pub struct MonitoredSession {
    core: Core,
    current: Mutex<Current>,
    recovery: Mutex<()>,
}

impl std::fmt::Debug for MonitoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MonitoredSession(chief: {}, generation {})",
            self.core.opts.is_chief,
            lock(&self.current).generation
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its state whole, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Codes that mean "the cluster changed under this session: make a new one".
fn needs_new_session(e: &Error) -> bool {
    matches!(e.code, Code::Aborted | Code::Unavailable)
}

impl MonitoredSession {
    /// Adds the scaffold's ops (initialiser, readiness checks, saver) to `g`, then creates and
    /// prepares the first session: the chief restores the latest checkpoint or initialises, a
    /// non-chief waits until the model is initialised. `global_step` (if the graph has
    /// `global_step`) numbers checkpoints and drives step-based saving.
    pub fn new(
        g: &Graph,
        scaffold: Scaffold,
        factory: SessionFactory,
        opts: MonitoredSessionOptions,
    ) -> Result<MonitoredSession> {
        g.status()?;
        let ready_vars = scaffold.ready_variables.unwrap_or_else(|| g.global_variables());
        let ready_ops = ready_vars.iter().map(|v| g.is_variable_initialized(v.var)).collect();
        let init_op = scaffold.init_op.unwrap_or_else(|| g.global_variables_initializer());
        let checkpoint = match (&opts.checkpoint_dir, opts.is_chief) {
            (Some(_), true) => Some(Mutex::new(CheckpointState {
                saver: Saver::new(g, None, opts.saver.clone())?,
                last_step: None,
                last_time: Instant::now(),
            })),
            _ => None,
        };
        g.status()?;
        let core = Core {
            def: Mutex::new(g.to_graph_def()),
            factory,
            global_step: crate::optimizer::global_step(g),
            opts,
            init_op,
            local_init_op: scaffold.local_init_op,
            ready_ops,
            checkpoint,
            last_restore: Mutex::new(None),
        };
        let session = core.connect_and_prepare()?;
        Ok(MonitoredSession {
            core,
            current: Mutex::new(Current { session, generation: 0 }),
            recovery: Mutex::new(()),
        })
    }

    /// The session in use now.
    pub fn raw_session(&self) -> Arc<dyn Session> {
        lock(&self.current).session.clone()
    }

    /// How many times this session has been recreated.
    pub fn recoveries(&self) -> u64 {
        lock(&self.current).generation
    }

    /// Replaces the session that failed in `generation` (once, however many threads saw it fail).
    fn recover(&self, generation: u64) -> Result<()> {
        let _one = lock(&self.recovery);
        let old = {
            let cur = lock(&self.current);
            if cur.generation != generation {
                return Ok(());
            }
            cur.session.clone()
        };
        let _ = old.close();
        let s = self.core.connect_and_prepare()?;
        let mut cur = lock(&self.current);
        cur.session = s;
        cur.generation += 1;
        Ok(())
    }

    /// The checkpoint the chief last restored (when it started or recovered) and its global step.
    pub fn last_restore(&self) -> Option<(PathBuf, Option<i64>)> {
        lock(&self.core.last_restore).clone()
    }

    /// Writes a checkpoint now (chief with a checkpoint dir); returns its path.
    pub fn save_checkpoint(&self) -> Result<Option<PathBuf>> {
        self.core.save_checkpoint(&*self.raw_session())
    }
}

impl Core {
    fn control(&self) -> RunOptions {
        RunOptions { timeout_in_ms: self.opts.control_timeout_in_ms.max(1), ..Default::default() }
    }

    /// Whether every variable the model needs is initialised.
    fn is_ready(&self, sess: &dyn Session) -> Result<bool> {
        if self.ready_ops.is_empty() {
            return Ok(true);
        }
        let flags = sess.run(&[], &self.ready_ops, &[], &self.control())?;
        let mut all = true;
        for f in flags {
            all &= f.bool_values()?.into_iter().all(|b| b);
        }
        Ok(all)
    }

    /// Brings the model up in a fresh session: restore or initialise (chief), or wait for the
    /// chief (others); then the local init op.
    fn prepare(&self, sess: &dyn Session) -> Result<()> {
        if self.opts.is_chief {
            // A model still intact (only this client's session was lost) keeps its progress.
            if !self.is_ready(sess)? {
                match self.latest_checkpoint()? {
                    Some(path) => self.restore(sess, &path)?,
                    None => {
                        sess.run(&[], &[], &[self.init_op], &self.control())?;
                    }
                }
            }
        } else {
            let deadline = Instant::now() + Duration::from_millis(self.opts.recovery_timeout_ms);
            while !self.is_ready(sess)? {
                if Instant::now() >= deadline {
                    return Err(Error::deadline_exceeded(format!(
                        "the model was not initialised by the chief within {} ms",
                        self.opts.recovery_timeout_ms
                    )));
                }
                std::thread::sleep(Duration::from_millis(READY_POLL_MS));
            }
        }
        if let Some(op) = self.local_init_op {
            sess.run(&[], &[], &[op], &self.control())?;
        }
        Ok(())
    }

    fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        match (&self.opts.checkpoint_dir, &self.checkpoint) {
            (Some(dir), Some(_)) => latest_checkpoint(dir),
            _ => Ok(None),
        }
    }

    fn restore(&self, sess: &dyn Session, path: &Path) -> Result<()> {
        let Some(ck) = &self.checkpoint else { return Ok(()) };
        let mut ck = lock(ck);
        ck.saver.restore(sess, path)?;
        // What was restored counts as saved: the next save comes N steps after it.
        let step = match self.global_step {
            Some(gs) => sess.run(&[], &[gs], &[], &self.control())?[0].scalar_value::<i64>().ok(),
            None => None,
        };
        ck.last_step = step;
        ck.last_time = Instant::now();
        *lock(&self.last_restore) = Some((path.to_path_buf(), step));
        Ok(())
    }

    /// Creates a session and prepares it, retrying with backoff while the cluster is not back.
    fn connect_and_prepare(&self) -> Result<Arc<dyn Session>> {
        let deadline = Instant::now() + Duration::from_millis(self.opts.recovery_timeout_ms);
        let mut backoff = Duration::from_millis(self.opts.backoff_initial_ms.max(1));
        let backoff_max = Duration::from_millis(self.opts.backoff_max_ms.max(1));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let r = (|| {
                let g = Graph::from_graph_def(&lock(&self.def))?;
                let s = (self.factory)(&g)?;
                match self.prepare(&*s) {
                    Ok(()) => Ok(s),
                    Err(e) => {
                        let _ = s.close();
                        Err(e)
                    }
                }
            })();
            match r {
                Ok(s) => return Ok(s),
                Err(e) if needs_new_session(&e) || e.code == Code::DeadlineExceeded => {
                    if Instant::now() + backoff >= deadline {
                        return Err(Error::new(
                            e.code,
                            format!("could not recreate the session in {attempts} attempts: {}", e.msg),
                        ));
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(backoff_max);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn save_checkpoint(&self, sess: &dyn Session) -> Result<Option<PathBuf>> {
        let (Some(dir), Some(ck)) = (&self.opts.checkpoint_dir, &self.checkpoint) else { return Ok(None) };
        let step = match self.global_step {
            Some(gs) => Some(sess.run(&[], &[gs], &[], &self.control())?[0].scalar_value::<i64>()?),
            None => None,
        };
        let mut ck = lock(ck);
        let path = ck.saver.save(sess, &dir.join(CHECKPOINT_PREFIX), step)?;
        ck.last_step = step;
        ck.last_time = Instant::now();
        Ok(Some(path))
    }

    /// Saves when the steps or seconds since the last save reach the configured period.
    fn maybe_save(&self, sess: &dyn Session, step: Option<i64>) -> Result<()> {
        let Some(ck) = &self.checkpoint else { return Ok(()) };
        let due = {
            let ck = lock(ck);
            let by_steps = self.opts.save_checkpoint_steps > 0
                && step.is_some_and(|s| {
                    s - ck.last_step.unwrap_or(0) >= self.opts.save_checkpoint_steps as i64
                        && ck.last_step != Some(s)
                });
            let by_time = self.opts.save_checkpoint_secs > 0
                && ck.last_time.elapsed() >= Duration::from_secs(self.opts.save_checkpoint_secs);
            by_steps || by_time
        };
        if due {
            self.save_checkpoint(sess)?;
        }
        Ok(())
    }
}

impl Session for MonitoredSession {
    fn run_with_metadata(
        &self,
        feeds: &[(Output, Tensor)],
        fetches: &[Output],
        targets: &[Output],
        opts: &RunOptions,
        mut metadata: Option<&mut RunMetadata>,
    ) -> Result<Vec<Tensor>> {
        // The chief reads the global step in the same step, to decide on saving for free.
        let core = &self.core;
        let step_fetch =
            core.global_step.filter(|_| core.checkpoint.is_some() && core.opts.save_checkpoint_steps > 0);
        let mut all_fetches = fetches.to_vec();
        all_fetches.extend(step_fetch);
        let mut retries = 0;
        let (sess, mut out) = loop {
            let (sess, generation) = {
                let cur = lock(&self.current);
                (cur.session.clone(), cur.generation)
            };
            match sess.run_with_metadata(feeds, &all_fetches, targets, opts, metadata.as_deref_mut()) {
                Err(e) if needs_new_session(&e) && retries < core.opts.max_step_retries => {
                    retries += 1;
                    self.recover(generation)
                        .map_err(|r| Error::new(r.code, format!("{} (recovering from: {})", r.msg, e.msg)))?;
                }
                r => break (sess, r?),
            }
        };
        let saved = if step_fetch.is_some() {
            let step = out.pop().and_then(|t| t.scalar_value::<i64>().ok());
            core.maybe_save(&*sess, step)
        } else if core.checkpoint.is_some() && core.opts.save_checkpoint_secs > 0 {
            core.maybe_save(&*sess, None)
        } else {
            Ok(())
        };
        match saved {
            // The step itself succeeded; the task lost during the save fails the next step,
            // which recovers, and the save is due again after it.
            Err(e) if needs_new_session(&e) => {
                eprintln!("rill: checkpoint not written, a task was lost during the save: {e}");
                Ok(out)
            }
            r => r.map(|()| out),
        }
    }

    fn extend(&self, graph: &Graph) -> Result<()> {
        self.raw_session().extend(graph)?;
        *lock(&self.core.def) = graph.to_graph_def();
        Ok(())
    }

    fn list_devices(&self) -> Result<Vec<DeviceAttributes>> {
        self.raw_session().list_devices()
    }

    fn close(&self) -> Result<()> {
        self.raw_session().close()
    }
}
