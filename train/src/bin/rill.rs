//! The stock `rill` binary: `rill server` runs one task of a cluster until SIGTERM or SIGINT, and
//! `rill cluster` prints the cluster a task would resolve, from flags, a file or the environment.

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
    flag("--workers", Some("N"), "workers in the job, for sync (default: the cluster's worker tasks)"),
    flag("--out", Some("DIR"), "where the chief writes events, the trace and checkpoints"),
    flag("--log-every", Some("N"), "a PROGRESS line every N local steps (default 20)"),
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
    o.workers = number(&p, "--workers", "a worker count")?.unwrap_or(o.workers);
    o.log_every = number(&p, "--log-every", "a step count")?.unwrap_or(o.log_every).max(1);
    if let Some(d) = text(&p, "--out") {
        o.out_dir = PathBuf::from(d);
    }
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
    println!(
        "DONE task={} steps={} global_step={} loss={:.4} examples_per_sec={:.0} bytes_per_step={:.0} accuracy={} trace={} events={} checkpoint={}",
        r.task_index,
        report.local_steps,
        report.global_step,
        report.final_loss,
        report.examples_per_sec,
        report.bytes_per_step,
        report.test_accuracy.map(|a| format!("{a:.4}")).unwrap_or_default(),
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
    format!("  {left:<18} {}\n", f.help)
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
