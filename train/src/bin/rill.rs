//! The stock `rill` binary: `rill server` runs one task of a cluster until SIGTERM or SIGINT,
//! `rill cluster` prints the cluster a task would resolve, from flags, a file or the environment,
//! `rill train` runs one task of a training job, and `rill check` runs one acceptance check of a
//! running cluster as a client and prints a `CHECK` line (`cargo xtask cluster-test` parses it).

#![deny(unsafe_code)]

use nix::sys::signal::{SigSet, Signal};
use rill_train::resolver::{process_env, resolve, ResolvedCluster, ResolverOptions};
use rill_transport::Server;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// After SIGTERM/SIGINT the server has this long to close its sockets before the process exits
/// anyway: a stop must be prompt even when a peer misbehaves.
const STOP_GRACE_MS: u64 = 5_000;
/// Largest secret file accepted (a secret is a few dozen bytes; a big file is a wrong path).
const SECRET_SIZE_MAX: u64 = 64 << 10;
/// Largest `--inter-op`/`--intra-op` thread count accepted.
const THREADS_MAX: usize = 4096;

/// The subcommands that exist, with one line each for the usage text.
const COMMANDS: &[(&str, &str)] = &[
    ("server", "run one task of a cluster until SIGTERM or SIGINT (server.join())"),
    ("cluster", "print the resolved cluster, one task per line, and this task's role"),
    ("train", "run one task of a training job on the digits model (worker: trains; ps: serves)"),
    ("check", "run one check against a running cluster as a client: check SCENARIO (see below)"),
];

/// A flag: its name, the name of its value (`None`: it takes none), and its usage line.
struct Flag {
    name: &'static str,
    value: Option<&'static str>,
    help: &'static str,
}

const fn flag(name: &'static str, value: Option<&'static str>, help: &'static str) -> Flag {
    Flag { name, value, help }
}

const CLUSTER_FLAGS: &[Flag] = &[
    flag("--cluster", Some("SPEC"), "jobs and tasks: \"ps=h1:2222;worker=h2:2222,h3:2222\""),
    flag("--cluster-file", Some("F"), "the same syntax in a file, one job per line allowed"),
    flag("--from-env", None, "TF_CONFIG, Slurm, an MPI launcher or torchrun"),
    flag("--job", Some("NAME"), "this task's job (with --from-env: overrides the environment)"),
    flag("--task", Some("N"), "this task's index (default 0)"),
    flag("--ps-tasks", Some("N"), "--from-env launchers: the first N ranks are ps tasks (default 1)"),
    flag("--port", Some("P"), "--from-env launchers: base port, plus the task's index on its node"),
    flag("--hosts", Some("LIST"), "MPI/torchrun hosts, hostlist items with optional :SLOTS"),
    flag("--hostfile", Some("F"), "MPI/torchrun hostfile (host slots=N lines)"),
];

const SERVER_FLAGS: &[Flag] = &[
    flag("--secret-file", Some("F"), "shared secret for the handshake (mode 600 or stricter)"),
    flag("--inter-op", Some("N"), "inter-op threads of the task's devices (0: one per core)"),
    flag("--intra-op", Some("N"), "intra-op threads of the task's devices (0: one per core)"),
];

const TRAIN_FLAGS: &[Flag] = &[
    flag("--mode", Some("sync|async"), "how workers combine gradients (default sync)"),
    flag("--steps", Some("N"), "global steps to train (default 400)"),
    flag("--model", Some("mlp|cnn"), "the model (default mlp)"),
    flag("--batch", Some("N"), "examples per step and worker (default 64)"),
    flag("--lr", Some("X"), "Adam's learning rate at the first step (default 0.01)"),
    flag(
        "--lr-decay",
        Some("X"),
        "the rate decays exponentially to X times the first by the last step (default 0.1; 1: constant)",
    ),
    flag("--workers", Some("N"), "workers in the job, for sync (default: the cluster's worker tasks)"),
    flag("--out", Some("DIR"), "where the chief writes events, the trace and checkpoints (and resumes from)"),
    flag("--log-every", Some("N"), "a PROGRESS line every N local steps (default 20)"),
    flag(
        "--replicas-to-aggregate",
        Some("N"),
        "sync: gradients per update (default: --workers; fewer = spares)",
    ),
    flag("--checkpoint-every", Some("N"), "the chief saves every N global steps (default 0: at the end)"),
    flag("--step-timeout-ms", Some("MS"), "deadline of one step (default 10000)"),
    flag(
        "--recovery-timeout-ms",
        Some("MS"),
        "bound on recreating a session after a lost task (default 60000)",
    ),
    flag("--half-transfer", Some("f16|bf16"), "gradients cross to the ps at half precision"),
    flag("--max-staleness", Some("K"), "async: drop gradients more than K global steps old"),
    flag("--scale-by-staleness", None, "async: learning rate times 1/(1+staleness)"),
    flag("--warmup-steps", Some("N"), "async: only the chief's gradients count until step N"),
    flag("--warmup-lr-scale", Some("X"), "async: learning-rate factor during the warm-up (default 1)"),
];

const CHECK_FLAGS: &[Flag] = &[
    flag("--secret-file", Some("F"), "the cluster's shared secret (required by the secret check)"),
    flag("--steps", Some("N"), "towers: training steps (default 300)"),
    flag("--items", Some("N"), "queue: items sent from the producer to the consumer (default 200)"),
    flag("--peer", Some("TASK"), "peer: the task that goes away, as job:index (default ps:0)"),
    flag("--timeout-ms", Some("MS"), "bound on the whole check (default 120000)"),
];

/// The scenarios of `rill check`, with one line each for the usage text.
const CHECKS: &[(&str, &str)] = &[
    ("towers", "in-graph replication: one tower per worker task, variables on the ps, mean gradients"),
    ("queue", "a producer client fills a shared queue on the ps, a consumer on another server drains it"),
    ("peer", "steps through the peer succeed, fail naming it once it stops, succeed once it is back"),
    ("secret", "clients with a wrong or no secret are refused; the right one is served"),
];

/// Why the program stops: bad usage (exit 2, with a hint) or a failure (exit 1).
enum Failure {
    Usage(String),
    Run(String),
}

impl From<rill_graph::Error> for Failure {
    fn from(e: rill_graph::Error) -> Failure {
        Failure::Run(e.msg)
    }
}

type Parsed = BTreeMap<&'static str, Option<String>>;

/// Parses `--name value`, `--name=value` and value-less flags from `allowed`.
fn parse_flags(cmd: &str, args: &[String], allowed: &[&[Flag]]) -> Result<Parsed, Failure> {
    let mut out = Parsed::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let Some(f) = allowed.iter().flat_map(|fs| fs.iter()).find(|f| f.name == name) else {
            return Err(Failure::Usage(if name.starts_with('-') {
                format!("{cmd}: unknown flag '{name}'")
            } else {
                format!("{cmd}: unexpected argument '{arg}'")
            }));
        };
        let value = match (f.value.is_some(), inline) {
            (true, Some(v)) => Some(v),
            (true, None) => match it.next() {
                Some(v) if !v.starts_with("--") => Some(v.clone()),
                _ => return Err(Failure::Usage(format!("{cmd}: {name} needs a value"))),
            },
            (false, Some(_)) => return Err(Failure::Usage(format!("{cmd}: {name} takes no value"))),
            (false, None) => None,
        };
        if out.insert(f.name, value).is_some() {
            return Err(Failure::Usage(format!("{cmd}: {name} is given twice")));
        }
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(p: &Parsed, name: &str, what: &str) -> Result<Option<T>, Failure> {
    match p.get(name) {
        Some(Some(v)) => {
            v.parse().map(Some).map_err(|_| Failure::Usage(format!("{name} '{v}' is not {what}")))
        }
        _ => Ok(None),
    }
}

fn text(p: &Parsed, name: &str) -> Option<String> {
    p.get(name).cloned().flatten()
}

fn resolver_options(p: &Parsed) -> Result<ResolverOptions, Failure> {
    let port = number::<u16>(p, "--port", "a port (1 to 65535)")?;
    if port == Some(0) {
        return Err(Failure::Usage("--port 0 is not a port (want 1 to 65535)".into()));
    }
    Ok(ResolverOptions {
        cluster: text(p, "--cluster"),
        cluster_file: text(p, "--cluster-file").map(PathBuf::from),
        from_env: p.contains_key("--from-env"),
        job: text(p, "--job"),
        task: number(p, "--task", "a task index")?,
        ps_tasks: number(p, "--ps-tasks", "a task count")?,
        port,
        hosts: text(p, "--hosts"),
        hostfile: text(p, "--hostfile").map(PathBuf::from),
    })
}

fn resolved(p: &Parsed) -> Result<ResolvedCluster, Failure> {
    Ok(resolve(&resolver_options(p)?, &process_env())?)
}

/// Reads the handshake secret as ssh reads a key: a regular file that neither group nor others may
/// access, not empty once a trailing newline is trimmed.
fn read_secret(path: &Path) -> Result<Vec<u8>, Failure> {
    use std::os::unix::fs::PermissionsExt;
    let name = path.display();
    let meta = std::fs::metadata(path).map_err(|e| Failure::Run(format!("--secret-file {name}: {e}")))?;
    if !meta.is_file() {
        return Err(Failure::Run(format!("--secret-file {name}: not a regular file")));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Failure::Run(format!(
            "--secret-file {name}: permissions {mode:04o} are too open; a secret must not be accessible \
             by group or others (chmod 600 {name})"
        )));
    }
    if meta.len() > SECRET_SIZE_MAX {
        return Err(Failure::Run(format!("--secret-file {name}: larger than {SECRET_SIZE_MAX} bytes")));
    }
    let mut secret = std::fs::read(path).map_err(|e| Failure::Run(format!("--secret-file {name}: {e}")))?;
    if secret.last() == Some(&b'\n') {
        secret.pop();
        if secret.last() == Some(&b'\r') {
            secret.pop();
        }
    }
    if secret.is_empty() {
        return Err(Failure::Run(format!("--secret-file {name}: the file is empty")));
    }
    Ok(secret)
}

fn threads(p: &Parsed, name: &str) -> Result<Option<usize>, Failure> {
    match number::<usize>(p, name, "a thread count")? {
        Some(n) if n > THREADS_MAX => Err(Failure::Usage(format!("{name} {n} is more than {THREADS_MAX}"))),
        n => Ok(n),
    }
}

fn cmd_cluster(args: &[String]) -> Result<(), Failure> {
    let p = parse_flags("cluster", args, &[CLUSTER_FLAGS])?;
    let r = resolved(&p)?;
    println!("rill: cluster from {}: {}", r.source, r.cluster);
    for (job, task, addr) in r.cluster.tasks() {
        println!("/job:{job}/task:{task} {addr}");
    }
    println!("this task: {} at {}", r.task_name(), r.address()?);
    Ok(())
}

fn cmd_server(args: &[String]) -> Result<(), Failure> {
    serve(&parse_flags("server", args, &[CLUSTER_FLAGS, SERVER_FLAGS])?)
}

/// Runs this task's server until SIGTERM or SIGINT.
fn serve(p: &Parsed) -> Result<(), Failure> {
    let p = p.clone();
    let r = resolved(&p)?;
    let mut def = r.server_def()?;
    if let Some(f) = text(&p, "--secret-file") {
        def.secret = Some(read_secret(Path::new(&f))?);
    }
    if let Some(n) = threads(&p, "--inter-op")? {
        def.default_session_options.inter_op_parallelism_threads = n;
    }
    if let Some(n) = threads(&p, "--intra-op")? {
        def.default_session_options.intra_op_parallelism_threads = n;
    }
    println!("rill: {}", r.describe());
    // Block the stop signals before any thread starts, so every thread inherits the mask and only
    // the signal thread receives them (through sigwait: no handler, no unsafe code).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|e| Failure::Run(format!("cannot block SIGTERM/SIGINT: {e}")))?;
    let slot: Arc<Mutex<Option<Arc<Server>>>> = Arc::new(Mutex::new(None));
    let watched = slot.clone();
    std::thread::Builder::new()
        .name("rill-signals".into())
        .spawn(move || stop_on_signal(signals, watched))
        .map_err(|e| Failure::Run(format!("cannot start the signal thread: {e}")))?;
    let server = Arc::new(
        Server::start(def, rill_train::standard_runtime())
            .map_err(|e| e.context(format!("starting {}", r.task_name())))?,
    );
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(server.clone());
    println!("rill: serving {} at {}", r.task_name(), server.target());
    server.join();
    eprintln!("rill: {} stopped", r.task_name());
    Ok(())
}

/// Waits for SIGTERM or SIGINT, then stops the server; exits the process if it does not stop
/// within [`STOP_GRACE_MS`], or at once when the server has not started yet.
fn stop_on_signal(signals: SigSet, slot: Arc<Mutex<Option<Arc<Server>>>>) {
    let sig = match signals.wait() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rill: waiting for signals failed ({e}); SIGTERM/SIGINT will not stop the server");
            return;
        }
    };
    let server = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(server) = server else {
        eprintln!("rill: {} before the server started; exiting", sig.as_str());
        std::process::exit(1);
    };
    eprintln!("rill: {}, stopping", sig.as_str());
    // `stop` runs on its own thread so this one can enforce the grace period.
    let stopper = std::thread::Builder::new().name("rill-stop".into()).spawn(move || server.stop());
    if stopper.is_err() {
        std::process::exit(1);
    }
    std::thread::sleep(Duration::from_millis(STOP_GRACE_MS));
    eprintln!("rill: the server did not stop within {STOP_GRACE_MS} ms; exiting");
    std::process::exit(1);
}

fn cmd_train(args: &[String]) -> Result<(), Failure> {
    use rill_train::job::{run_worker, Mode, ModelKind, TrainOptions};
    let p = parse_flags("train", args, &[CLUSTER_FLAGS, SERVER_FLAGS, TRAIN_FLAGS])?;
    let r = resolved(&p)?;
    if r.job != "worker" {
        // Parameter servers of a job only serve.
        return serve(&p);
    }
    let mut o = TrainOptions {
        workers: r.cluster.num_tasks("worker"),
        ps_tasks: r.cluster.num_tasks("ps").max(1),
        ..Default::default()
    };
    o.mode = match text(&p, "--mode").as_deref() {
        None | Some("sync") => Mode::Sync,
        Some("async") => Mode::Async,
        Some(m) => return Err(Failure::Usage(format!("--mode '{m}' is not sync or async"))),
    };
    o.model = match text(&p, "--model").as_deref() {
        None | Some("mlp") => ModelKind::Mlp,
        Some("cnn") => ModelKind::Cnn,
        Some(m) => return Err(Failure::Usage(format!("--model '{m}' is not mlp or cnn"))),
    };
    o.steps = number(&p, "--steps", "a step count")?.unwrap_or(o.steps);
    o.batch_size = number(&p, "--batch", "a batch size")?.unwrap_or(o.batch_size);
    o.learning_rate = number(&p, "--lr", "a learning rate")?.unwrap_or(o.learning_rate);
    o.lr_decay = number(&p, "--lr-decay", "a factor")?.unwrap_or(o.lr_decay);
    if !(o.learning_rate.is_finite() && o.learning_rate > 0.0 && o.lr_decay.is_finite() && o.lr_decay > 0.0) {
        return Err(Failure::Usage(format!(
            "--lr {} and --lr-decay {} must be finite and above 0",
            o.learning_rate, o.lr_decay
        )));
    }
    o.workers = number(&p, "--workers", "a worker count")?.unwrap_or(o.workers);
    o.log_every = number(&p, "--log-every", "a step count")?.unwrap_or(o.log_every).max(1);
    o.replicas_to_aggregate = number(&p, "--replicas-to-aggregate", "a replica count")?;
    if o.replicas_to_aggregate == Some(0) || o.workers == 0 {
        return Err(Failure::Usage("--replicas-to-aggregate and --workers must be above 0".into()));
    }
    o.checkpoint_every = number(&p, "--checkpoint-every", "a step count")?.unwrap_or(o.checkpoint_every);
    o.step_timeout_ms = number(&p, "--step-timeout-ms", "milliseconds")?.unwrap_or(o.step_timeout_ms).max(1);
    o.recovery_timeout_ms =
        number(&p, "--recovery-timeout-ms", "milliseconds")?.unwrap_or(o.recovery_timeout_ms).max(1);
    if let Some(d) = text(&p, "--out") {
        o.out_dir = PathBuf::from(d);
    }
    o.half_transfer = match text(&p, "--half-transfer").as_deref() {
        None => None,
        Some("f16") => Some(rill_graph::DType::F16),
        Some("bf16") => Some(rill_graph::DType::BF16),
        Some(d) => return Err(Failure::Usage(format!("--half-transfer '{d}' is not f16 or bf16"))),
    };
    o.async_policy.max_staleness = number(&p, "--max-staleness", "a step count")?;
    o.async_policy.scale_by_staleness = p.contains_key("--scale-by-staleness");
    o.async_policy.warmup_steps = number(&p, "--warmup-steps", "a step count")?.unwrap_or(0);
    let scale: f64 = number(&p, "--warmup-lr-scale", "a factor")?.unwrap_or(1.0);
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(Failure::Usage(format!("--warmup-lr-scale {scale} must be finite and at least 0")));
    }
    o.async_policy.warmup_lr_scale = scale;
    let mut def = r.server_def()?;
    if let Some(f) = text(&p, "--secret-file") {
        def.secret = Some(read_secret(Path::new(&f))?);
    }
    if let Some(n) = threads(&p, "--inter-op")? {
        def.default_session_options.inter_op_parallelism_threads = n;
    }
    if let Some(n) = threads(&p, "--intra-op")? {
        def.default_session_options.intra_op_parallelism_threads = n;
    }
    println!("rill: {}", r.describe());
    let server = Server::start(def, rill_train::standard_runtime())
        .map_err(|e| e.context(format!("starting {}", r.task_name())))?;
    let report = run_worker(&server, r.task_index, &o)?;
    let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let staleness = report.staleness.as_ref();
    println!(
        "DONE task={} steps={} global_step={} loss={:.4} examples_per_sec={:.0} bytes_per_step={:.0} recoveries={} accuracy={} staleness_mean={} staleness_max={} trace={} events={} checkpoint={}",
        r.task_index,
        report.local_steps,
        report.global_step,
        report.final_loss,
        report.examples_per_sec,
        report.bytes_per_step,
        report.recoveries,
        report.test_accuracy.map(|a| format!("{a:.4}")).unwrap_or_default(),
        staleness.map(|h| format!("{:.2}", h.sum / h.num.max(1.0))).unwrap_or_default(),
        staleness.map(|h| format!("{}", if h.num > 0.0 { h.max } else { 0.0 })).unwrap_or_default(),
        show(&report.trace),
        show(&report.events),
        show(&report.checkpoint),
    );
    server.stop();
    Ok(())
}

fn flag_line(f: &Flag) -> String {
    let left = match f.value {
        Some(v) => format!("{} {v}", f.name),
        None => f.name.to_string(),
    };
    format!("  {left:<26} {}\n", f.help)
}

fn usage() -> String {
    let mut s = String::from("usage: rill COMMAND [FLAGS]\n\ncommands:\n");
    for (name, help) in COMMANDS {
        s.push_str(&format!("  {name:<9}{help}\n"));
    }
    s.push_str("\ncluster flags (server and cluster; one of --cluster, --cluster-file, --from-env):\n");
    for f in CLUSTER_FLAGS {
        s.push_str(&flag_line(f));
    }
    s.push_str("\nserver flags (server and train):\n");
    for f in SERVER_FLAGS {
        s.push_str(&flag_line(f));
    }
    s.push_str("\ntrain flags:\n");
    for f in TRAIN_FLAGS {
        s.push_str(&flag_line(f));
    }
    s.push_str(
        "\ncheck SCENARIO (cluster flags; --job/--task name the client's server, default worker 0):\n",
    );
    for (name, help) in CHECKS {
        s.push_str(&format!("  {name:<9}{help}\n"));
    }
    for f in CHECK_FLAGS {
        s.push_str(&flag_line(f));
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprint!("{}", usage());
        std::process::exit(2);
    };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "server" => cmd_server(rest),
        "cluster" => cmd_cluster(rest),
        "train" => cmd_train(rest),
        "check" => check::cmd_check(rest),
        "help" | "--help" | "-h" => {
            print!("{}", usage());
            Ok(())
        }
        other => {
            let names: Vec<&str> = COMMANDS.iter().map(|c| c.0).collect();
            Err(Failure::Usage(format!("unknown command '{other}' (commands: {})", names.join(", "))))
        }
    };
    match r {
        Ok(()) => {}
        Err(Failure::Usage(msg)) => {
            eprintln!("rill: {msg}\n(rill help lists commands and flags)");
            std::process::exit(2);
        }
        Err(Failure::Run(msg)) => {
            eprintln!("rill: {msg}");
            std::process::exit(1);
        }
    }
}

/// `rill check SCENARIO`: one acceptance check of a running cluster, as a client through the
/// public API. It prints `STAGE scenario=S stage=NAME` lines where a harness may act (stop or
/// restart a peer) and ends with one `CHECK scenario=S result=ok|fail KEY=VALUE... [error=...]`
/// line; `error=` is last and runs to the end of the line.
mod check {
    use super::{
        number, parse_flags, read_secret, resolver_options, text, Failure, CHECKS, CHECK_FLAGS, CLUSTER_FLAGS,
    };
    use rill_graph::{
        Code, DType, Error, Graph, Output, PartialShape, Result, RunMetadata, RunOptions, Session,
        SessionOptions, Tensor, TraceLevel,
    };
    use rill_queues::{dequeue, enqueue, fifo_queue, QueueOptions};
    use rill_train::digits::{
        digits_files, load_digits_tfrecords, Minibatches, IMAGE_PIXELS, NUM_CLASSES, TEST_TFRECORDS,
        TRAIN_TFRECORDS,
    };
    use rill_train::replication::{average_gradients, in_graph_towers, mean_loss};
    use rill_train::resolver::{process_env, resolve};
    use rill_train::{models, replica_device_setter, Adam, Optimizer, ReplicaDeviceSetterOptions};
    use rill_transport::{ClusterSpec, ConnectOptions, RemoteSession};
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// Test accuracy the towers check must reach (the job's target on digits).
    const ACCURACY_TARGET: f32 = 0.95;
    /// Examples per tower and step.
    const TOWER_BATCH: usize = 64;
    /// Capacity of the shared queue: far below the items sent, so producer and consumer alternate.
    const QUEUE_CAPACITY: i64 = 16;
    /// Deadline of a step through the peer while it is down: how fast the failure must come.
    const PEER_STEP_TIMEOUT_MS: u64 = 2_000;
    /// Pause between steps while waiting for the peer to go or to come back.
    const POLL_MS: u64 = 200;
    /// Largest `--steps` / `--items` accepted.
    const COUNT_MAX: u64 = 1_000_000;

    /// What a check needs to reach the cluster.
    struct Ctx {
        cluster: ClusterSpec,
        /// The client's master: `tcp://host:port` of `--job/--task`.
        target: String,
        master_task: (String, u32),
        copts: ConnectOptions,
        secret: Option<Vec<u8>>,
        deadline: Instant,
        timeout_ms: u64,
    }

    impl Ctx {
        fn step_ms(&self) -> u64 {
            let left = self.deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
            left.clamp(1, 30_000)
        }

        fn ro(&self) -> RunOptions {
            RunOptions { timeout_in_ms: self.step_ms(), ..Default::default() }
        }

        fn connect(&self, target: &str, g: &Graph) -> Result<RemoteSession> {
            RemoteSession::connect_with(target, g, SessionOptions::default(), &self.copts)
        }

        fn expired(&self, what: &str) -> Error {
            Error::deadline_exceeded(format!("{what} within the check's {} ms", self.timeout_ms))
        }
    }

    fn target_of(c: &ClusterSpec, job: &str, task: u32) -> Result<String> {
        Ok(format!("tcp://{}", c.task_address(job, task)?))
    }

    fn device(job: &str, task: u32) -> String {
        format!("/job:{job}/task:{task}")
    }

    fn stage(scenario: &str, stage: &str, rest: &str) {
        println!("STAGE scenario={scenario} stage={stage}{rest}");
    }

    pub(super) fn cmd_check(args: &[String]) -> std::result::Result<(), Failure> {
        let names: Vec<&str> = CHECKS.iter().map(|c| c.0).collect();
        let Some(scenario) = args.first().filter(|a| !a.starts_with('-')) else {
            return Err(Failure::Usage(format!("check needs a scenario ({})", names.join(", "))));
        };
        if !names.contains(&scenario.as_str()) {
            return Err(Failure::Usage(format!(
                "check: unknown scenario '{scenario}' ({})",
                names.join(", ")
            )));
        }
        let p = parse_flags("check", &args[1..], &[CLUSTER_FLAGS, CHECK_FLAGS])?;
        let mut ro = resolver_options(&p)?;
        if ro.job.is_none() && !ro.from_env {
            ro.job = Some("worker".into());
        }
        let r = resolve(&ro, &process_env())?;
        let secret = match text(&p, "--secret-file") {
            Some(f) => Some(read_secret(Path::new(&f))?),
            None => None,
        };
        let timeout_ms: u64 = number(&p, "--timeout-ms", "milliseconds")?.unwrap_or(120_000).max(1);
        let count = |name: &str, default: u64| -> std::result::Result<u64, Failure> {
            match number::<u64>(&p, name, "a count")?.unwrap_or(default) {
                0 => Err(Failure::Usage(format!("{name} must be above 0"))),
                n if n > COUNT_MAX => Err(Failure::Usage(format!("{name} {n} is more than {COUNT_MAX}"))),
                n => Ok(n),
            }
        };
        let ctx = Ctx {
            target: target_of(&r.cluster, &r.job, r.task_index)?,
            master_task: (r.job.clone(), r.task_index),
            cluster: r.cluster.clone(),
            copts: ConnectOptions { secret: secret.clone(), ..Default::default() },
            secret,
            deadline: Instant::now() + Duration::from_millis(timeout_ms),
            timeout_ms,
        };
        let t0 = Instant::now();
        let result = match scenario.as_str() {
            "towers" => towers(&ctx, count("--steps", 300)?),
            "queue" => queue(&ctx, count("--items", 200)?),
            "peer" => {
                let spec = text(&p, "--peer").unwrap_or_else(|| "ps:0".into());
                let (job, task) = spec
                    .split_once(':')
                    .and_then(|(j, t)| Some((j.to_string(), t.parse::<u32>().ok()?)))
                    .ok_or_else(|| Failure::Usage(format!("--peer '{spec}' is not job:index")))?;
                peer(&ctx, &job, task)
            }
            _ => secret_check(&ctx),
        };
        let ms = t0.elapsed().as_millis();
        match result {
            Ok(fields) => {
                println!("CHECK scenario={scenario} result=ok ms={ms} {fields}");
                Ok(())
            }
            Err(e) => {
                let msg = format!("{:?}: {}", e.code, e.msg).replace('\n', " ");
                println!("CHECK scenario={scenario} result=fail ms={ms} error={msg}");
                Err(Failure::Run(format!("check {scenario} failed")))
            }
        }
    }

    /// One tower per worker task, the variables spread over the ps tasks, one client: the
    /// towers' gradients are averaged and applied once per step. Checks that every tower ran on
    /// its task, that the loss falls and that the test accuracy reaches the target.
    fn towers(ctx: &Ctx, steps: u64) -> Result<String> {
        let workers = ctx.cluster.task_indices("worker");
        let ps_tasks = ctx.cluster.num_tasks("ps");
        if workers.is_empty() || ps_tasks == 0 {
            return Err(Error::invalid_argument("towers needs a ps job and a worker job"));
        }
        let g = Graph::new();
        let opt = Adam::new(0.01);
        // Each tower's ops on its worker task, its variables (created by tower 0) on the ps.
        let none: Vec<&str> = vec![""; workers.len()];
        let built = in_graph_towers(&g, &none, |g, i| {
            let setter = replica_device_setter(ReplicaDeviceSetterOptions::new(ps_tasks, workers[i]));
            g.with_device(setter, |g| -> Result<_> {
                let x = g.placeholder("images", DType::F32, [None, Some(IMAGE_PIXELS)]);
                let y = g.placeholder("labels", DType::I64, [None]);
                let logits = models::mlp(g, x, &[64], NUM_CLASSES, 7);
                let loss = models::softmax_loss(g, logits, y);
                let acc = models::accuracy(g, logits, y);
                let grads = opt.compute_gradients(g, loss, &g.trainable_variables())?;
                Ok((x, y, loss, acc, grads))
            })
        })?
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        let grads: Vec<_> = built.iter().map(|t| t.4.clone()).collect();
        let train = g.with_device(device("ps", 0).as_str(), |g| {
            opt.apply_gradients(g, &average_gradients(g, &grads)?, None, "train")
        })?;
        let losses: Vec<Output> = built.iter().map(|t| t.2).collect();
        let loss = mean_loss(&g, &losses);
        let init = g.global_variables_initializer();
        g.status()?;
        let sess = ctx.connect(&ctx.target, &g)?;
        sess.run(&[], &[], &[init], &ctx.ro())?;
        let (images, labels) = load_digits_tfrecords(&digits_files(TRAIN_TFRECORDS))?;
        let mut batches = Minibatches::new(&images, &labels, 11)?;
        let (mut first, mut last) = (None, 0f32);
        let mut md = RunMetadata::default();
        for step in 0..steps {
            if Instant::now() >= ctx.deadline {
                return Err(ctx.expired(&format!("{steps} steps not done")));
            }
            let mut feeds = Vec::new();
            for t in &built {
                let (x, y) = batches.next_batch(TOWER_BATCH)?;
                feeds.extend([(t.0, x), (t.1, y)]);
            }
            let traced = step == 0;
            let opts = RunOptions {
                trace_level: if traced { TraceLevel::FullTrace } else { TraceLevel::NoTrace },
                ..ctx.ro()
            };
            let out = sess.run_with_metadata(&feeds, &[loss], &[train], &opts, traced.then_some(&mut md))?;
            last = out[0].scalar_value::<f32>()?;
            first.get_or_insert(last);
        }
        // Every tower's ops ran on its own worker task.
        for (i, w) in workers.iter().enumerate() {
            let want = format!("/job:worker/replica:0/task:{w}/");
            let prefix = format!("tower_{i}/");
            let on_task = md
                .step_stats
                .nodes
                .iter()
                .any(|n| n.node.starts_with(&prefix) && n.device.starts_with(&want));
            let elsewhere = md.step_stats.nodes.iter().find(|n| {
                n.node.starts_with(&prefix) && !n.device.starts_with(&want) && !n.op.starts_with('_')
            });
            if !on_task || elsewhere.is_some() {
                return Err(Error::internal(format!(
                    "tower {i} did not run on /job:worker/task:{w} only (a node on {:?})",
                    elsewhere.map(|n| n.device.clone())
                )));
            }
        }
        let (tx, ty) = load_digits_tfrecords(&digits_files(TEST_TFRECORDS))?;
        let accuracy = sess.run(&[(built[0].0, tx), (built[0].1, ty)], &[built[0].3], &[], &ctx.ro())?[0]
            .scalar_value::<f32>()?;
        let first = first.unwrap_or(last);
        if last.partial_cmp(&first) != Some(std::cmp::Ordering::Less) || accuracy < ACCURACY_TARGET {
            return Err(Error::internal(format!(
                "loss {first:.4} -> {last:.4}, test accuracy {accuracy:.4} (target {ACCURACY_TARGET})"
            )));
        }
        Ok(format!(
            "towers={} steps={steps} loss_first={first:.4} loss_last={last:.4} accuracy={accuracy:.4}",
            workers.len()
        ))
    }

    /// A task other than the client's master, for the consumer: a ps task first.
    fn other_task(ctx: &Ctx) -> Result<(String, u32)> {
        let mut tasks: Vec<(String, u32)> = ctx
            .cluster
            .tasks()
            .map(|(j, t, _)| (j.to_string(), t))
            .filter(|t| *t != ctx.master_task)
            .collect();
        tasks.sort_by_key(|(j, t)| (j != "ps", *t));
        tasks
            .into_iter()
            .next()
            .ok_or_else(|| Error::invalid_argument("queue needs two tasks in the cluster"))
    }

    /// A producer client (through the client's master) and a consumer client (through another
    /// task) share a FIFO queue on the first ps task (or the consumer's task) by its
    /// `shared_name`; every item must arrive once and in order, and an empty queue must time
    /// out for the step only.
    fn queue(ctx: &Ctx, items: u64) -> Result<String> {
        let (cjob, ctask) = other_task(ctx)?;
        let home = if ctx.cluster.num_tasks("ps") > 0 { device("ps", 0) } else { device(&cjob, ctask) };
        let shared = format!("rill_check_queue_{:016x}", rill_graph::random_u64());
        let g = Graph::new();
        let opts = QueueOptions { shared_name: shared.clone(), ..Default::default() };
        let q = g.with_device(home.as_str(), |g| {
            fifo_queue(g, QUEUE_CAPACITY, &[DType::I64], &[PartialShape::scalar()], &opts)
        });
        let item = g.placeholder("item", DType::I64, PartialShape::scalar());
        let enq = enqueue(&g, q, &[item]);
        let deq = dequeue(&g, q)[0];
        g.status()?;
        let producer = ctx.connect(&ctx.target, &g)?;
        let consumer = ctx.connect(&target_of(&ctx.cluster, &cjob, ctask)?, &g)?;
        // Values that could not come from another run of this check.
        let base = (rill_graph::random_u64() >> 20) as i64;
        let t0 = Instant::now();
        let got = std::thread::scope(|s| -> Result<Vec<i64>> {
            let prod = s.spawn(|| -> Result<()> {
                for i in 0..items as i64 {
                    producer.run(&[(item, Tensor::scalar(base + i))], &[], &[enq], &ctx.ro())?;
                }
                Ok(())
            });
            let mut got = Vec::with_capacity(items as usize);
            let mut err = None;
            for _ in 0..items {
                match consumer.run(&[], &[deq], &[], &ctx.ro()).and_then(|o| o[0].scalar_value::<i64>()) {
                    Ok(v) => got.push(v),
                    Err(e) => {
                        err = Some(e.context("consumer"));
                        break;
                    }
                }
            }
            prod.join()
                .map_err(|_| Error::internal("the producer thread panicked"))?
                .map_err(|e| e.context("producer"))?;
            match err {
                Some(e) => Err(e),
                None => Ok(got),
            }
        })?;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        if let Some(k) = (0..items as usize).find(|&k| got[k] != base + k as i64) {
            return Err(Error::internal(format!("item {k} arrived as {} (want {})", got[k] - base, k)));
        }
        let quick = RunOptions { timeout_in_ms: 300, ..Default::default() };
        match consumer.run(&[], &[deq], &[], &quick) {
            Err(e) if e.code == Code::DeadlineExceeded => {}
            Err(e) => return Err(e.context("dequeue from the drained queue")),
            Ok(v) => return Err(Error::internal(format!("the drained queue still held {:?}", v[0]))),
        }
        Ok(format!(
            "items={items} queue={home} consumer={} items_per_sec={:.0}",
            device(&cjob, ctask),
            items as f64 / secs
        ))
    }

    /// Steps through `job:task` from the client's master: they succeed; once the peer stops they
    /// fail within the step deadline with `Unavailable` or `DeadlineExceeded` naming it; once it
    /// is back (a new session where the restart aborted the old one) they succeed again.
    fn peer(ctx: &Ctx, job: &str, task: u32) -> Result<String> {
        ctx.cluster.task_address(job, task)?;
        if (job.to_string(), task) == ctx.master_task {
            return Err(Error::invalid_argument("--peer must not be the client's own master (--job/--task)"));
        }
        let peer = device(job, task);
        let g = Graph::new();
        let x = g.placeholder("x", DType::F32, PartialShape::scalar());
        let far = g.with_device(peer.as_str(), |g| g.add(x, g.scalar(1f32)));
        let (mjob, mtask) = &ctx.master_task;
        let y = g.with_device(device(mjob, *mtask).as_str(), |g| g.mul(far, g.scalar(2f32)));
        g.status()?;
        let step = |s: &RemoteSession, ms: u64| -> Result<()> {
            let out = s.run(
                &[(x, Tensor::scalar(1f32))],
                &[y],
                &[],
                &RunOptions { timeout_in_ms: ms, ..Default::default() },
            )?;
            match out[0].scalar_value::<f32>()? {
                4.0 => Ok(()),
                v => Err(Error::internal(format!("the step computed {v}, not 4"))),
            }
        };
        let mut sess = ctx.connect(&ctx.target, &g)?;
        step(&sess, ctx.step_ms())?;
        stage("peer", "up", &format!(" peer={peer}"));
        // Wait for the peer to go away; each failing step must fail in time and name it.
        let (down_err, fail_ms) = loop {
            if Instant::now() >= ctx.deadline {
                return Err(ctx.expired(&format!("{peer} did not stop")));
            }
            let t = Instant::now();
            match step(&sess, PEER_STEP_TIMEOUT_MS) {
                Ok(()) => std::thread::sleep(Duration::from_millis(POLL_MS)),
                Err(e) => break (e, t.elapsed().as_millis() as u64),
            }
        };
        if !matches!(down_err.code, Code::Unavailable | Code::DeadlineExceeded)
            || !down_err.msg.contains(&peer)
        {
            return Err(Error::internal(format!(
                "the step against the stopped {peer} failed with {:?} not naming it: {}",
                down_err.code, down_err.msg
            )));
        }
        // The client's wait is bounded by the step deadline plus the cancel grace.
        let bound = PEER_STEP_TIMEOUT_MS + 2 * rill_graph::session::CANCEL_GRACE.as_millis() as u64;
        if fail_ms > bound {
            return Err(Error::internal(format!("the failing step took {fail_ms} ms (bound {bound} ms)")));
        }
        stage("peer", "down", &format!(" code={:?} ms={fail_ms}", down_err.code));
        let t_down = Instant::now();
        let mut attempts = 0u32;
        let mut last = down_err.clone();
        loop {
            if Instant::now() >= ctx.deadline {
                let what = format!("{peer} did not come back (last error: {:?}: {})", last.code, last.msg);
                return Err(ctx.expired(&what));
            }
            attempts += 1;
            match step(&sess, PEER_STEP_TIMEOUT_MS) {
                Ok(()) => break,
                // The peer restarted: this session's partitions there are gone.
                Err(e) if e.code == Code::Aborted => {
                    sess = ctx.connect(&ctx.target, &g)?;
                    last = e;
                }
                Err(e) if matches!(e.code, Code::Unavailable | Code::DeadlineExceeded) => {
                    std::thread::sleep(Duration::from_millis(POLL_MS));
                    last = e;
                }
                Err(e) => return Err(e.context("a step after the peer came back")),
            }
        }
        Ok(format!(
            "peer={peer} down_code={:?} fail_ms={fail_ms} back_after_ms={} attempts={attempts}",
            down_err.code,
            t_down.elapsed().as_millis()
        ))
    }

    /// With `--secret-file`: a wrong secret and no secret are refused with `Unauthenticated`;
    /// the right one runs a step.
    fn secret_check(ctx: &Ctx) -> Result<String> {
        let Some(secret) = &ctx.secret else {
            return Err(Error::invalid_argument(
                "the secret check needs --secret-file (the cluster's secret)",
            ));
        };
        let g = Graph::new();
        let (mjob, mtask) = &ctx.master_task;
        let one = g.with_device(device(mjob, *mtask).as_str(), |g| g.add(g.scalar(1f32), g.scalar(1f32)));
        g.status()?;
        let mut wrong = secret.clone();
        wrong.extend_from_slice(b"-wrong");
        let mut codes = Vec::new();
        for (what, s) in [("wrong", Some(wrong)), ("none", None)] {
            let copts = ConnectOptions { secret: s, ..Default::default() };
            match RemoteSession::connect_with(&ctx.target, &g, SessionOptions::default(), &copts) {
                Err(e) if e.code == Code::Unauthenticated => codes.push(format!("{what}={:?}", e.code)),
                Err(e) => return Err(e.context(format!("a client with {what} secret"))),
                Ok(_) => return Err(Error::internal(format!("a client with {what} secret was served"))),
            }
        }
        let filters = vec![device(mjob, *mtask)];
        let opts = SessionOptions { device_filters: filters, ..Default::default() };
        let s = RemoteSession::connect_with(&ctx.target, &g, opts, &ctx.copts)?;
        let v = s.run(&[], &[one], &[], &ctx.ro())?[0].scalar_value::<f32>()?;
        if v != 2.0 {
            return Err(Error::internal(format!("the served client computed {v}, not 2")));
        }
        Ok(format!("{} right=served", codes.join(" ")))
    }
}
