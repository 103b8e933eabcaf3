//! `cargo xtask cluster-test`: a deployment's acceptance test. It builds `rill`, runs a matrix of
//! scenarios, each on its own local cluster of `rill` processes, and prints a table (scenario,
//! result, time, key figure). Training scenarios run `rill train` tasks; client-side ones run
//! `rill check SCENARIO` and parse its `CHECK` line. Every wait is bounded and every process is
//! killed by its own handle at the end of its scenario, also on failure; Ctrl-C reaches the
//! whole process group.
//!
//! Tiers: loopback (127.0.0.1, free ports; what CI runs); `--netns` (as root with `ip`: each
//! task in its own network namespace on a bridge, 10.77.0.0/24, plus a cut link and packet loss);
//! `--cluster-file F` / `--from-env` (only the client-side checks, against servers the user
//! started, e.g. on real machines).

use crate::procs::{field, free_ports, target_dir, Tasks};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound on one scenario; its cluster is killed when it is exceeded.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on a server printing that it serves.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Test accuracy the training scenarios must reach on digits.
const ACCURACY_TARGET: f64 = 0.95;
/// Global steps of the training scenarios (the MLP reaches the target in a few hundred).
const TRAIN_STEPS: u64 = 500;
/// The fault scenarios strike once the victim reports this global step.
const FAULT_STEP: u64 = 150;
/// Checkpoint period of the ps-restart scenario.
const CHECKPOINT_EVERY: u64 = 50;
/// Packet loss of the netns tier's loss scenario, per direction at the ps, in percent.
const LOSS_PERCENT: u32 = 5;
/// Name prefix of every namespace and link the netns tier creates (stale ones are removed).
const NS_PREFIX: &str = "rillct";
/// The netns tier's subnet: the bridge is .1, tasks from .10 on.
const NS_SUBNET: &str = "10.77.0";
/// The port every task listens on in its own namespace.
const NS_PORT: u16 = 2222;
/// A scenario's figure with this prefix is a skip (a tool it needs is missing), not a pass.
const SKIPPED: &str = "skipped: ";

const USAGE: &str = "cargo xtask cluster-test [--only a,b] [--release] [--netns] \
[--cluster-file F | --from-env] [--secret-file F]";

/// Scenarios of the loopback tier, in order; `--netns` adds `NETNS_SCENARIOS`.
const SCENARIOS: &[&str] = &[
    "sync",
    "async",
    "towers",
    "queue",
    "kill-worker-sync",
    "kill-worker-async",
    "ps-restart",
    "stopped-peer",
    "wrong-secret",
];
const NETNS_SCENARIOS: &[&str] = &["link-cut", "packet-loss"];
/// What `--cluster-file` / `--from-env` run: the checks that start and kill nothing.
const CLIENT_CHECKS: &[(&str, &str)] =
    &[("towers", "towers"), ("queue", "queue"), ("wrong-secret", "secret")];

struct Opts {
    only: Option<Vec<String>>,
    release: bool,
    netns: bool,
    cluster_file: Option<PathBuf>,
    from_env: bool,
    secret_file: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        only: None,
        release: false,
        netns: false,
        cluster_file: None,
        from_env: false,
        secret_file: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--only" => o.only = Some(val(a)?.split(',').map(|s| s.trim().to_string()).collect()),
            "--release" => o.release = true,
            "--netns" => o.netns = true,
            "--cluster-file" => o.cluster_file = Some(PathBuf::from(val(a)?)),
            "--from-env" => o.from_env = true,
            "--secret-file" => o.secret_file = Some(PathBuf::from(val(a)?)),
            other => return Err(format!("unknown cluster-test flag {other}\nusage: {USAGE}")),
        }
    }
    if o.cluster_file.is_some() && o.from_env {
        return Err("give only one of --cluster-file and --from-env".into());
    }
    if o.netns && (o.cluster_file.is_some() || o.from_env) {
        return Err(
            "--netns starts its own clusters; it does not combine with --cluster-file/--from-env".into()
        );
    }
    if let Some(only) = &o.only {
        for s in only {
            if !SCENARIOS.contains(&s.as_str()) && !NETNS_SCENARIOS.contains(&s.as_str()) {
                let all: Vec<&str> = SCENARIOS.iter().chain(NETNS_SCENARIOS).copied().collect();
                return Err(format!("--only: unknown scenario '{s}' (scenarios: {})", all.join(", ")));
            }
        }
    }
    Ok(o)
}

/// One row of the result table.
struct Row {
    scenario: String,
    result: &'static str,
    secs: f64,
    figure: String,
}

pub fn cluster_test(root: &Path, cargo: &dyn Fn() -> Command, args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    if o.netns {
        if let Some(why) = netns_unavailable() {
            println!("cluster-test: skipped the network-namespace tier: {why}");
            return Ok(());
        }
    }
    let mut build = cargo();
    build.args(["build", "-p", "rill-train", "--bin", "rill"]);
    if o.release {
        build.arg("--release");
    }
    crate::step("build rill", build)?;
    let target = target_dir(root);
    let rill = target.join(if o.release { "release" } else { "debug" }).join("rill");
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let logs = target.join("cluster-test").join(stamp.to_string());
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let secret = logs.join("secret");
    write_secret(&secret)?;
    let env = Env { rill, logs: logs.clone(), secret, net: None };
    let rows = if o.cluster_file.is_some() || o.from_env {
        remote_checks(&env, &o)
    } else if o.netns {
        let net = Netns::create()?;
        println!(
            "cluster-test: network namespaces {NS_PREFIX}-* on bridge {} ({NS_SUBNET}.0/24); packet loss by {}",
            net.bridge,
            net.loss_tool.name()
        );
        let env = Env { net: Some(net), ..env };
        let list: Vec<&str> = SCENARIOS.iter().chain(NETNS_SCENARIOS).copied().collect();
        run_matrix(&env, &list, &o)
    } else {
        run_matrix(&env, SCENARIOS, &o)
    };
    print_table(&rows);
    println!("logs: {}", logs.display());
    let failed: Vec<&str> = rows.iter().filter(|r| r.result == "FAIL").map(|r| r.scenario.as_str()).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("cluster-test: {} failed: {}", failed.len(), failed.join(", ")))
    }
}

fn write_secret(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let nonce =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    writeln!(f, "cluster-test-{nonce:x}-{}", std::process::id()).map_err(|e| e.to_string())
}

fn run_matrix(env: &Env, list: &[&str], o: &Opts) -> Vec<Row> {
    let mut rows = Vec::new();
    for &name in list {
        if o.only.as_ref().is_some_and(|only| !only.iter().any(|s| s == name)) {
            continue;
        }
        println!("== cluster-test: {name}");
        let t0 = Instant::now();
        let r = run_scenario(env, name);
        let secs = t0.elapsed().as_secs_f64();
        let (result, figure) = match r {
            Ok(f) if f.starts_with(SKIPPED) => ("skip", f[SKIPPED.len()..].to_string()),
            Ok(f) => ("ok", f),
            Err(e) => ("FAIL", e),
        };
        println!("   {result} in {secs:.1} s: {figure}");
        rows.push(Row { scenario: name.to_string(), result, secs, figure });
    }
    rows
}

fn run_scenario(env: &Env, name: &str) -> Result<String, String> {
    match name {
        "sync" | "async" => train_to_target(env, name),
        "towers" | "queue" | "wrong-secret" => {
            let mut c = Cluster::servers(env, name, 1, 2, true)?;
            client_check(&mut c, if name == "wrong-secret" { "secret" } else { name })
        }
        "kill-worker-sync" => kill_worker(env, name, "sync"),
        "kill-worker-async" => kill_worker(env, name, "async"),
        "ps-restart" => ps_restart(env, name),
        "stopped-peer" => peer_fault(env, name, Fault::Kill),
        "link-cut" => peer_fault(env, name, Fault::LinkDown),
        "packet-loss" => packet_loss(env, name),
        other => Err(format!("no scenario {other}")),
    }
}

fn print_table(rows: &[Row]) {
    let w = rows.iter().map(|r| r.scenario.len()).max().unwrap_or(8).max(8);
    println!("\n{:<w$}  {:<6}  {:>7}  key figure", "scenario", "result", "time");
    println!("{}", "-".repeat(w + 30));
    for r in rows {
        println!("{:<w$}  {:<6}  {:>6.1}s  {}", r.scenario, r.result, r.secs, r.figure);
    }
}

/// The client-side checks against a cluster the user describes.
fn remote_checks(env: &Env, o: &Opts) -> Vec<Row> {
    let mut rows = Vec::new();
    let src: Vec<String> = match &o.cluster_file {
        Some(f) => vec!["--cluster-file".into(), f.display().to_string()],
        None => vec!["--from-env".into()],
    };
    for &(name, check) in CLIENT_CHECKS {
        if o.only.as_ref().is_some_and(|only| !only.iter().any(|s| s == name)) {
            continue;
        }
        let mut args: Vec<String> = vec!["check".into(), check.into()];
        args.extend(src.iter().cloned());
        if let Some(s) = &o.secret_file {
            args.extend(["--secret-file".into(), s.display().to_string()]);
        } else if check == "secret" {
            rows.push(Row {
                scenario: name.into(),
                result: "skip",
                secs: 0.0,
                figure: "no --secret-file given".into(),
            });
            continue;
        }
        println!("== cluster-test: {name} (rill {})", args.join(" "));
        let t0 = Instant::now();
        let r = run_check_process(env, &args);
        let secs = t0.elapsed().as_secs_f64();
        let (result, figure) = match r {
            Ok(f) => ("ok", f),
            Err(e) => ("FAIL", e),
        };
        println!("   {result} in {secs:.1} s: {figure}");
        rows.push(Row { scenario: name.into(), result, secs, figure });
    }
    rows
}

fn run_check_process(env: &Env, args: &[String]) -> Result<String, String> {
    let mut tasks = Tasks(Vec::new());
    let (tx, rx) = mpsc::channel();
    spawn_piped(&mut tasks, &tx, "check", Command::new(&env.rill).args(args), &env.logs.join("remote"))?;
    drop(tx);
    let deadline = Instant::now() + SCENARIO_TIMEOUT;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((_, line)) if line.starts_with("CHECK ") => return check_figure(&line),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("rill check ended without a CHECK line".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    Err(format!("no result within {} s", SCENARIO_TIMEOUT.as_secs()))
}

/// The key figure of an ok `CHECK` line, or its error.
fn check_figure(line: &str) -> Result<String, String> {
    let rest = line.split_once("ms=").map(|(_, r)| r).unwrap_or(line);
    let rest = rest.split_once(' ').map(|(_, r)| r).unwrap_or("");
    match field(line, "result") {
        Some("ok") => Ok(rest.to_string()),
        _ => Err(line.split_once("error=").map(|(_, e)| e.to_string()).unwrap_or_else(|| line.to_string())),
    }
}

/// What every scenario shares.
struct Env {
    rill: PathBuf,
    logs: PathBuf,
    /// A secret file (mode 600) for the clusters of the client checks.
    secret: PathBuf,
    net: Option<Netns>,
}

/// A scenario's cluster: its processes, their output, and where each task listens.
struct Cluster<'a> {
    env: &'a Env,
    logs: PathBuf,
    spec: String,
    secret: bool,
    tasks: Tasks,
    tx: mpsc::Sender<(String, String)>,
    rx: mpsc::Receiver<(String, String)>,
    lines: BTreeMap<String, Vec<String>>,
    deadline: Instant,
}

impl<'a> Cluster<'a> {
    fn new(
        env: &'a Env,
        scenario: &str,
        ps: usize,
        workers: usize,
        secret: bool,
    ) -> Result<Cluster<'a>, String> {
        let addrs: Vec<String> = match &env.net {
            Some(n) => (0..ps + workers)
                .map(|k| {
                    let name = if k < ps { format!("ps{k}") } else { format!("w{}", k - ps) };
                    n.addr(&name).map(|a| format!("{a}:{NS_PORT}"))
                })
                .collect::<Result<_, _>>()?,
            None => free_ports(ps + workers)?.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        };
        let spec = format!("ps={};worker={}", addrs[..ps].join(","), addrs[ps..].join(","));
        let logs = env.logs.join(scenario);
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let (tx, rx) = mpsc::channel();
        println!("   cluster: {spec}");
        Ok(Cluster {
            env,
            logs,
            spec,
            secret,
            tasks: Tasks(Vec::new()),
            tx,
            rx,
            lines: BTreeMap::new(),
            deadline: Instant::now() + SCENARIO_TIMEOUT,
        })
    }

    /// A cluster of `rill server` tasks, all serving.
    fn servers(
        env: &'a Env,
        scenario: &str,
        ps: usize,
        workers: usize,
        secret: bool,
    ) -> Result<Cluster<'a>, String> {
        let mut c = Cluster::new(env, scenario, ps, workers, secret)?;
        for i in 0..ps {
            c.server("ps", i)?;
        }
        for i in 0..workers {
            c.server("worker", i)?;
        }
        Ok(c)
    }

    /// `rill ARGS`, in the task's namespace on the netns tier.
    fn command(&self, ns: &str, args: &[String]) -> Command {
        let mut c = match &self.env.net {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.ns(ns)]).arg(&self.env.rill);
                c
            }
            None => Command::new(&self.env.rill),
        };
        c.args(args);
        c
    }

    fn task_args(&self, job: &str, task: usize) -> Vec<String> {
        let mut a: Vec<String> = vec!["--cluster".into(), self.spec.clone(), "--job".into(), job.into()];
        a.extend([
            "--task".into(),
            task.to_string(),
            "--inter-op".into(),
            "1".into(),
            "--intra-op".into(),
            "1".into(),
        ]);
        if self.secret {
            a.extend(["--secret-file".into(), self.env.secret.display().to_string()]);
        }
        a
    }

    fn spawn(&mut self, name: &str, ns: &str, args: &[String]) -> Result<(), String> {
        let mut cmd = self.command(ns, args);
        spawn_piped(&mut self.tasks, &self.tx, name, &mut cmd, &self.logs)
    }

    /// Starts `rill server` for a task and waits until it serves.
    fn server(&mut self, job: &str, task: usize) -> Result<(), String> {
        let name = format!("{job}/{task}");
        let mut args = vec!["server".to_string()];
        args.extend(self.task_args(job, task));
        self.spawn(&name, &ns_of(job, task), &args)?;
        let until = (Instant::now() + START_TIMEOUT).min(self.deadline);
        self.wait_line(&name, until, |l| l.starts_with("rill: serving")).map(|_| ())
    }

    /// Starts `rill train` for a worker (or a ps, which serves).
    fn train(&mut self, job: &str, task: usize, extra: &[&str]) -> Result<(), String> {
        let mut args = vec!["train".to_string()];
        args.extend(self.task_args(job, task));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--out".into(), self.logs.join("out").display().to_string()]);
        self.spawn(&format!("{job}/{task}"), &ns_of(job, task), &args)
    }

    /// Starts `rill check SCENARIO` as a client (in its own namespace on the netns tier).
    fn check(&mut self, scenario: &str, extra: &[&str]) -> Result<(), String> {
        let mut args: Vec<String> =
            vec!["check".into(), scenario.into(), "--cluster".into(), self.spec.clone()];
        if self.secret {
            args.extend(["--secret-file".into(), self.env.secret.display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn("check", "client", &args)
    }

    fn kill(&mut self, name: &str) -> Result<(), String> {
        // A task started again under this name is a new process with new output.
        self.lines.remove(name);
        if self.tasks.kill(name) {
            println!("   killed {name}");
            Ok(())
        } else {
            Err(format!("no running {name} to kill"))
        }
    }

    /// The next output line of any process, recorded; `None` after 200 ms without one.
    fn next_line(&mut self) -> Option<(String, String)> {
        let (name, line) = self.rx.recv_timeout(Duration::from_millis(200)).ok()?;
        self.lines.entry(name.clone()).or_default().push(line.clone());
        Some((name, line))
    }

    /// A process that exited although it should not have: its status and error output.
    fn died(&mut self) -> Option<String> {
        for (name, child) in self.tasks.0.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let ok_end = name.starts_with("worker/") || name == "check";
                if !(ok_end && status.success()) {
                    return Some(format!("{name} exited ({status}): {}", err_tail(&self.logs, name)));
                }
            }
        }
        None
    }

    /// Waits for a line of `name` that satisfies `pred` (bounded by `until` and the scenario).
    fn wait_line(
        &mut self,
        name: &str,
        until: Instant,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let until = until.min(self.deadline);
        // Lines already seen count too.
        if let Some(l) = self.lines.get(name).and_then(|ls| ls.iter().find(|l| pred(l))) {
            return Ok(l.clone());
        }
        while Instant::now() < until {
            if let Some((n, l)) = self.next_line() {
                if n == name && pred(&l) {
                    return Ok(l);
                }
                continue;
            }
            if let Some(e) = self.died() {
                return Err(e);
            }
        }
        Err(format!("{name}: the awaited line did not come in time ({})", err_tail(&self.logs, name)))
    }

    /// Waits until the process `name` exits (reading output meanwhile); its status.
    fn wait_exit(&mut self, name: &str) -> Result<ExitStatus, String> {
        while Instant::now() < self.deadline {
            while Instant::now() < self.deadline && self.next_line().is_some() {}
            let Some((_, child)) = self.tasks.0.iter_mut().find(|(n, _)| n == name) else {
                return Err(format!("{name} is not running"));
            };
            if let Ok(Some(status)) = child.try_wait() {
                // Lines still in the pipe.
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(500) && self.next_line().is_some() {}
                return Ok(status);
            }
            if let Some(e) = self.died().filter(|e| !e.starts_with(name)) {
                return Err(e);
            }
        }
        Err(format!("{name} did not finish within {} s", SCENARIO_TIMEOUT.as_secs()))
    }

    /// Waits for every worker to end successfully; their `DONE` lines by task.
    fn finish_workers(&mut self, workers: &[usize]) -> Result<BTreeMap<usize, String>, String> {
        let mut done = BTreeMap::new();
        for &w in workers {
            let name = format!("worker/{w}");
            let status = self.wait_exit(&name)?;
            if !status.success() {
                return Err(format!("{name} failed ({status}): {}", err_tail(&self.logs, &name)));
            }
            let line =
                self.lines.get(&name).and_then(|ls| ls.iter().find(|l| l.starts_with("DONE")).cloned());
            done.insert(w, line.ok_or_else(|| format!("{name} printed no DONE line"))?);
        }
        Ok(done)
    }
}

/// The namespace a task runs in on the netns tier.
fn ns_of(job: &str, task: usize) -> String {
    if job == "ps" {
        format!("ps{task}")
    } else {
        format!("w{task}")
    }
}

/// Spawns a child with its stdout read line by line (into `logs/NAME.out` and the channel) and
/// its stderr into `logs/NAME.err`.
fn spawn_piped(
    tasks: &mut Tasks,
    tx: &mpsc::Sender<(String, String)>,
    name: &str,
    cmd: &mut Command,
    logs: &Path,
) -> Result<(), String> {
    std::fs::create_dir_all(logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let file = name.replace('/', "");
    let err = std::fs::File::create(logs.join(format!("{file}.err"))).map_err(|e| e.to_string())?;
    let mut out = std::fs::File::create(logs.join(format!("{file}.out"))).map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {name}: {e}"))?;
    if let Some(stdout) = child.stdout.take() {
        let (tx, name) = (tx.clone(), name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = writeln!(out, "{line}");
                if tx.send((name.clone(), line)).is_err() {
                    break;
                }
            }
        });
    }
    tasks.0.push((name.to_string(), child));
    Ok(())
}

fn err_tail(logs: &Path, name: &str) -> String {
    let text =
        std::fs::read_to_string(logs.join(format!("{}.err", name.replace('/', "")))).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
    tail.join(" | ")
}

fn num<T: std::str::FromStr>(line: &str, key: &str) -> Result<T, String> {
    field(line, key).and_then(|v| v.parse().ok()).ok_or_else(|| format!("no {key}= in '{line}'"))
}

/// The chief's accuracy, checked against the target; every worker reached the last step.
fn check_done(done: &BTreeMap<usize, String>, steps: u64) -> Result<f64, String> {
    let chief = done.get(&0).ok_or("the chief printed no DONE line")?;
    let acc: f64 = num(chief, "accuracy")?;
    if acc < ACCURACY_TARGET {
        return Err(format!("test accuracy {acc:.4} < {ACCURACY_TARGET}"));
    }
    for (w, l) in done {
        let gs: u64 = num(l, "global_step")?;
        if gs + 1 < steps {
            return Err(format!("worker {w} stopped at global step {gs} of {steps}"));
        }
    }
    Ok(acc)
}

fn steps_arg() -> String {
    TRAIN_STEPS.to_string()
}

/// (1), (2): between-graph training, 1 ps + 2 workers, to the accuracy target.
fn train_to_target(env: &Env, mode: &str) -> Result<String, String> {
    let mut c = Cluster::new(env, mode, 1, 2, false)?;
    c.train("ps", 0, &[])?;
    let steps = steps_arg();
    for w in 0..2 {
        c.train("worker", w, &["--mode", mode, "--steps", &steps, "--log-every", "50"])?;
    }
    let done = c.finish_workers(&[0, 1])?;
    let acc = check_done(&done, TRAIN_STEPS)?;
    let eps: f64 = done.values().filter_map(|l| num::<f64>(l, "examples_per_sec").ok()).sum();
    Ok(format!("accuracy {acc:.4} after {TRAIN_STEPS} steps, {eps:.0} examples/s"))
}

/// (3), (4), (8): a `rill check` against a running cluster.
fn client_check(c: &mut Cluster, check: &str) -> Result<String, String> {
    c.check(check, &[])?;
    let line = c.wait_line("check", c.deadline, |l| l.starts_with("CHECK "))?;
    check_figure(&line)
}

/// Global step of a `PROGRESS` line.
fn progress_step(l: &str) -> Option<u64> {
    l.strip_prefix("PROGRESS").and_then(|_| field(l, "step")).and_then(|s| s.parse().ok())
}

/// (5): a worker killed mid-run. Sync runs 3 workers aggregating 2 (one spare); async 2.
fn kill_worker(env: &Env, scenario: &str, mode: &str) -> Result<String, String> {
    let workers = if mode == "sync" { 3 } else { 2 };
    let victim = workers - 1;
    let mut c = Cluster::new(env, scenario, 1, workers, false)?;
    c.train("ps", 0, &[])?;
    let steps = steps_arg();
    for w in 0..workers {
        let mut extra = vec!["--mode", mode, "--steps", &steps, "--log-every", "10"];
        if mode == "sync" {
            extra.extend(["--replicas-to-aggregate", "2"]);
        }
        c.train("worker", w, &extra)?;
    }
    let name = format!("worker/{victim}");
    let line = c.wait_line(&name, c.deadline, |l| progress_step(l).is_some_and(|s| s >= FAULT_STEP))?;
    c.kill(&name)?;
    let at = progress_step(&line).unwrap_or(0);
    let alive: Vec<usize> = (0..victim).collect();
    let done = c.finish_workers(&alive)?;
    let acc = check_done(&done, TRAIN_STEPS)?;
    let spare = if mode == "sync" { ", aggregating 2 of 3" } else { "" };
    Ok(format!("{name} killed at step {at}; the rest reached {TRAIN_STEPS}{spare}, accuracy {acc:.4}"))
}

/// (6): the ps killed and restarted; the workers recover and the chief resumes from the latest
/// checkpoint, losing at most the steps since it.
fn ps_restart(env: &Env, scenario: &str) -> Result<String, String> {
    let mut c = Cluster::new(env, scenario, 1, 2, false)?;
    c.train("ps", 0, &[])?;
    let (steps, every) = (steps_arg(), CHECKPOINT_EVERY.to_string());
    for w in 0..2 {
        c.train(
            "worker",
            w,
            &["--mode", "sync", "--steps", &steps, "--log-every", "10", "--checkpoint-every", &every],
        )?;
    }
    let strike = FAULT_STEP + CHECKPOINT_EVERY / 2;
    c.wait_line("worker/0", c.deadline, |l| progress_step(l).is_some_and(|s| s >= strike))?;
    c.kill("ps/0")?;
    std::thread::sleep(Duration::from_millis(500));
    c.train("ps", 0, &[])?;
    let l = c.wait_line("worker/0", c.deadline, |l| l.starts_with("RECOVERED"))?;
    let (last, restored): (u64, u64) = (num(&l, "last_step")?, num(&l, "restored_step")?);
    let lost = last.saturating_sub(restored);
    // The chief reads the step after its own update; the other worker may be one ahead.
    if restored == 0 || lost > CHECKPOINT_EVERY + 2 {
        return Err(format!("resumed from step {restored} after {last}: lost {lost} > the checkpoint period {CHECKPOINT_EVERY}"));
    }
    let done = c.finish_workers(&[0, 1])?;
    let acc = check_done(&done, TRAIN_STEPS)?;
    Ok(format!(
        "ps killed at step {last}; resumed from checkpoint step {restored}, {lost} steps lost (period {CHECKPOINT_EVERY}); accuracy {acc:.4}"
    ))
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// The peer's process is killed, then started again.
    Kill,
    /// The peer's link to the bridge goes down, then up (netns tier).
    LinkDown,
}

/// (7) and the cut link: steps through the ps fail naming it while it is gone, then succeed.
fn peer_fault(env: &Env, scenario: &str, fault: Fault) -> Result<String, String> {
    let mut c = Cluster::servers(env, scenario, 1, 2, true)?;
    c.check("peer", &["--peer", "ps:0", "--timeout-ms", "90000"])?;
    c.wait_line("check", c.deadline, |l| l.starts_with("STAGE") && field(l, "stage") == Some("up"))?;
    match fault {
        Fault::Kill => c.kill("ps/0")?,
        Fault::LinkDown => env.net.as_ref().ok_or("no namespaces")?.link("ps0", false)?,
    }
    let down = c.wait_line("check", c.deadline, |l| {
        (l.starts_with("STAGE") && field(l, "stage") == Some("down")) || l.starts_with("CHECK")
    });
    // The peer comes back whatever the check said, so its result is complete.
    let back = match fault {
        Fault::Kill => c.server("ps", 0),
        Fault::LinkDown => env.net.as_ref().ok_or("no namespaces")?.link("ps0", true),
    };
    down?;
    back?;
    let line = c.wait_line("check", c.deadline, |l| l.starts_with("CHECK "))?;
    let f = check_figure(&line)?;
    Ok(format!(
        "{} with {} in {} ms; served again {} ms after it failed",
        if fault == Fault::Kill { "stopped ps failed the step" } else { "cut link failed the step" },
        field(&f, "down_code").unwrap_or("?"),
        field(&f, "fail_ms").unwrap_or("?"),
        field(&f, "back_after_ms").unwrap_or("?"),
    ))
}

/// Async training with packets to and from the ps dropped at random (netns tier).
fn packet_loss(env: &Env, scenario: &str) -> Result<String, String> {
    let net = env.net.as_ref().ok_or("no namespaces")?;
    if net.loss_tool == LossTool::None {
        return Ok(format!("{SKIPPED}neither nft nor tc netem works here"));
    }
    let mut c = Cluster::new(env, scenario, 1, 2, false)?;
    c.train("ps", 0, &[])?;
    net.set_loss("ps0", LOSS_PERCENT)?;
    let steps = steps_arg();
    for w in 0..2 {
        c.train("worker", w, &["--mode", "async", "--steps", &steps, "--log-every", "50"])?;
    }
    let done = c.finish_workers(&[0, 1]);
    let cleared = net.clear_loss("ps0");
    let done = done?;
    cleared?;
    let acc = check_done(&done, TRAIN_STEPS)?;
    Ok(format!("{LOSS_PERCENT}% loss each way at the ps ({}): accuracy {acc:.4}", net.loss_tool.name()))
}

// ---- the network-namespace tier ----

/// Why the namespace tier cannot run here, if it cannot.
fn netns_unavailable() -> Option<String> {
    let root =
        Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root != Some(true) {
        return Some("not running as root".into());
    }
    if !ok(Command::new("ip").args(["-V"])) {
        return Some("the ip command is missing".into());
    }
    // Root in a container may still lack the right to create namespaces.
    let probe = format!("{NS_PREFIX}-probe");
    let _ = sh("ip", &["netns", "del", &probe]);
    if let Err(e) = sh("ip", &["netns", "add", &probe]) {
        return Some(format!("cannot create network namespaces ({e})"));
    }
    let _ = sh("ip", &["netns", "del", &probe]);
    None
}

fn ok(c: &mut Command) -> bool {
    c.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs `ip ARGS` (or another tool), failing with its error output.
fn sh(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog).args(args).output().map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{prog} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum LossTool {
    Nft,
    Netem,
    None,
}

impl LossTool {
    fn name(self) -> &'static str {
        match self {
            LossTool::Nft => "nftables numgen random",
            LossTool::Netem => "tc netem",
            LossTool::None => "none available",
        }
    }
}

/// The namespaces, veth pairs and bridge of the netns tier. Dropping it removes them all (after
/// the scenarios' processes, which die with their clusters); a sentinel process removes them
/// if this process dies without dropping it (Ctrl-C).
struct Netns {
    bridge: String,
    /// Namespace short name -> index (address `NS_SUBNET.(10 + index)`).
    members: Vec<String>,
    loss_tool: LossTool,
    sentinel: Option<std::process::Child>,
}

impl Netns {
    fn ns(&self, short: &str) -> String {
        format!("{NS_PREFIX}-{short}")
    }

    fn addr(&self, short: &str) -> Result<String, String> {
        let k =
            self.members.iter().position(|m| m == short).ok_or_else(|| format!("no namespace {short}"))?;
        Ok(format!("{NS_SUBNET}.{}", 10 + k))
    }

    fn host_link(&self, short: &str) -> Result<String, String> {
        let k =
            self.members.iter().position(|m| m == short).ok_or_else(|| format!("no namespace {short}"))?;
        Ok(format!("{NS_PREFIX}h{k}"))
    }

    /// Removes every namespace and link of an earlier run (by the name prefix), killing the
    /// processes still inside those namespaces.
    fn clean_stale() {
        let list = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
        for ns in String::from_utf8_lossy(&list).lines().filter_map(|l| l.split_whitespace().next()) {
            if let Some(rest) = ns.strip_prefix(NS_PREFIX) {
                if rest.starts_with('-') {
                    let pids = Command::new("ip")
                        .args(["netns", "pids", ns])
                        .output()
                        .map(|o| o.stdout)
                        .unwrap_or_default();
                    for pid in String::from_utf8_lossy(&pids).split_whitespace() {
                        let _ = ok(Command::new("kill").args(["-9", pid]));
                    }
                    let _ = sh("ip", &["netns", "del", ns]);
                }
            }
        }
        let _ = ok(Command::new("ip").args(["link", "del", &format!("{NS_PREFIX}-br")]));
    }

    fn create() -> Result<Netns, String> {
        Netns::clean_stale();
        let members: Vec<String> =
            ["ps0", "w0", "w1", "w2", "client"].iter().map(|s| s.to_string()).collect();
        let mut net =
            Netns { bridge: format!("{NS_PREFIX}-br"), members, loss_tool: LossTool::None, sentinel: None };
        net.start_sentinel();
        sh("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        sh("ip", &["addr", "add", &format!("{NS_SUBNET}.1/24"), "dev", &net.bridge])?;
        sh("ip", &["link", "set", &net.bridge, "up"])?;
        for short in net.members.clone() {
            let ns = net.ns(&short);
            let host = net.host_link(&short)?;
            let inner = format!("{host}n");
            sh("ip", &["netns", "add", &ns])?;
            sh("ip", &["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            sh("ip", &["link", "set", &inner, "netns", &ns])?;
            sh("ip", &["link", "set", &host, "master", &net.bridge])?;
            sh("ip", &["link", "set", &host, "up"])?;
            let cidr = format!("{}/24", net.addr(&short)?);
            sh("ip", &["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
            sh("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        net.loss_tool = net.probe_loss_tool();
        Ok(net)
    }

    /// A process in its own session (so Ctrl-C does not reach it) that removes the namespaces
    /// once this process is gone without having removed them itself.
    fn start_sentinel(&mut self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             for ns in $(ip netns list | awk '{{print $1}}' | grep '^{p}-'); do \
               for q in $(ip netns pids $ns); do kill -9 $q; done; ip netns del $ns; done; \
             ip link del {p}-br 2>/dev/null; true",
            pid = std::process::id(),
            p = NS_PREFIX
        );
        self.sentinel = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
    }

    /// nftables first (a `numgen random` drop rule), else tc netem; `None` when neither works.
    fn probe_loss_tool(&self) -> LossTool {
        let ns = self.ns("client");
        if ok(Command::new("nft").args(["-v"])) && self.nft(&ns, 0).is_ok() {
            let _ = sh("ip", &["netns", "exec", &ns, "nft", "delete", "table", "inet", NS_PREFIX]);
            return LossTool::Nft;
        }
        if sh(
            "ip",
            &["netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "loss", "0%"],
        )
        .is_ok()
        {
            let _ = sh("ip", &["netns", "exec", &ns, "tc", "qdisc", "del", "dev", "eth0", "root"]);
            return LossTool::Netem;
        }
        LossTool::None
    }

    fn nft(&self, ns: &str, percent: u32) -> Result<(), String> {
        let rules = format!(
            "table inet {NS_PREFIX} {{\n chain in {{ type filter hook input priority 0; numgen random mod 100 < {percent} drop; }}\n \
             chain out {{ type filter hook output priority 0; numgen random mod 100 < {percent} drop; }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("{NS_PREFIX}-{}.nft", std::process::id()));
        std::fs::write(&file, rules).map_err(|e| e.to_string())?;
        let r = sh("ip", &["netns", "exec", ns, "nft", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        r
    }

    fn set_loss(&self, short: &str, percent: u32) -> Result<(), String> {
        let ns = self.ns(short);
        match self.loss_tool {
            LossTool::Nft => self.nft(&ns, percent),
            LossTool::Netem => {
                let p = format!("{percent}%");
                sh(
                    "ip",
                    &["netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "loss", &p],
                )?;
                // netem shapes egress only: the host side of the pair drops toward the task.
                sh("tc", &["qdisc", "add", "dev", &self.host_link(short)?, "root", "netem", "loss", &p])
            }
            LossTool::None => Err("no packet-loss tool".into()),
        }
    }

    fn clear_loss(&self, short: &str) -> Result<(), String> {
        let ns = self.ns(short);
        match self.loss_tool {
            LossTool::Nft => sh("ip", &["netns", "exec", &ns, "nft", "delete", "table", "inet", NS_PREFIX]),
            LossTool::Netem => {
                sh("ip", &["netns", "exec", &ns, "tc", "qdisc", "del", "dev", "eth0", "root"])?;
                sh("tc", &["qdisc", "del", "dev", &self.host_link(short)?, "root"])
            }
            LossTool::None => Ok(()),
        }
    }

    /// Sets the task's link to the bridge up or down.
    fn link(&self, short: &str, up: bool) -> Result<(), String> {
        let host = self.host_link(short)?;
        println!("   link {host} ({short}) {}", if up { "up" } else { "down" });
        sh("ip", &["link", "set", &host, if up { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for short in &self.members {
            let ns = self.ns(short);
            // Every cluster killed its processes already; anything left in our namespace is ours.
            let pids = Command::new("ip")
                .args(["netns", "pids", &ns])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default();
            for pid in String::from_utf8_lossy(&pids).split_whitespace() {
                eprintln!("cluster-test: killing process {pid} left in {ns}");
                let _ = ok(Command::new("kill").args(["-9", pid]));
            }
            let _ = sh("ip", &["netns", "del", &ns]);
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
        if let Some(mut s) = self.sentinel.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}
