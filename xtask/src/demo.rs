//! `cargo xtask demo`: a local cluster of `rill` processes on 127.0.0.1 (1 ps and 2 workers by
//! default) trains the digits model from its files, with live progress per worker; then prints
//! the test accuracy, throughput, bytes per step and where the trace, the TensorBoard events and
//! the checkpoint are. Every process it started is stopped at the end or when a task fails;
//! Ctrl-C reaches the whole process group, and `rill` tasks stop on SIGINT.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::procs::{field, free_ports, target_dir, Tasks};

/// The whole demo must finish within this, or it stops every task and fails.
const DEMO_TIMEOUT: Duration = Duration::from_secs(600);

struct Opts {
    workers: usize,
    ps: usize,
    mode: String,
    steps: u64,
    model: String,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts { workers: 2, ps: 1, mode: "sync".into(), steps: 400, model: "mlp".into() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--workers" => o.workers = val(a)?.parse().map_err(|_| "--workers wants a number".to_string())?,
            "--ps" => o.ps = val(a)?.parse().map_err(|_| "--ps wants a number".to_string())?,
            "--steps" => o.steps = val(a)?.parse().map_err(|_| "--steps wants a number".to_string())?,
            "--mode" => o.mode = val(a)?,
            "--model" => o.model = val(a)?,
            other => {
                return Err(format!(
                    "unknown demo flag {other} (flags: --workers N, --ps N, --mode sync|async, --steps N, --model mlp|cnn)"
                ))
            }
        }
    }
    if o.workers == 0 || o.ps == 0 {
        return Err("the demo needs at least one ps and one worker".into());
    }
    if !["sync", "async"].contains(&o.mode.as_str()) || !["mlp", "cnn"].contains(&o.model.as_str()) {
        return Err("--mode is sync or async; --model is mlp or cnn".into());
    }
    Ok(o)
}

#[derive(Default, Clone)]
struct Progress {
    step: u64,
    loss: f64,
    examples_per_sec: f64,
}

fn bar(step: u64, total: u64) -> String {
    let width = 30;
    let done = ((step.min(total) as f64 / total.max(1) as f64) * width as f64) as usize;
    format!("[{}{}]", "#".repeat(done), ".".repeat(width - done))
}

pub fn demo(root: &Path, cargo: &dyn Fn() -> Command, args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let mut build = cargo();
    build.args(["build", "--release", "-p", "rill-train", "--bin", "rill"]);
    crate::step("build rill", build)?;
    let rill = target_dir(root).join("release/rill");
    let ports = free_ports(o.ps + o.workers)?;
    let addr = |p: &u16| format!("127.0.0.1:{p}");
    let ps: Vec<String> = ports[..o.ps].iter().map(addr).collect();
    let ws: Vec<String> = ports[o.ps..].iter().map(addr).collect();
    let spec = format!("ps={};worker={}", ps.join(","), ws.join(","));
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let out = target_dir(root).join("demo").join(stamp.to_string());
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "cluster: {spec}\nmode: {}, model: {}, steps: {}, output: {}",
        o.mode,
        o.model,
        o.steps,
        out.display()
    );
    let mut tasks = Tasks(Vec::new());
    let log = |name: &str| -> Result<std::fs::File, String> {
        std::fs::File::create(out.join(format!("{name}.log"))).map_err(|e| e.to_string())
    };
    for i in 0..o.ps {
        let name = format!("ps/{i}");
        let child = Command::new(&rill)
            .args([
                "server",
                "--cluster",
                &spec,
                "--job",
                "ps",
                "--task",
                &i.to_string(),
                "--inter-op",
                "1",
                "--intra-op",
                "1",
            ])
            .stdout(Stdio::from(log(&format!("ps{i}"))?))
            .stderr(Stdio::from(log(&format!("ps{i}.err"))?))
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        tasks.0.push((name, child));
    }
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    for i in 0..o.workers {
        let name = format!("worker/{i}");
        let mut child = Command::new(&rill)
            .args(["train", "--cluster", &spec, "--job", "worker", "--task", &i.to_string()])
            .args(["--mode", &o.mode, "--model", &o.model, "--steps", &o.steps.to_string()])
            .args([
                "--out",
                &out.display().to_string(),
                "--log-every",
                "10",
                "--inter-op",
                "1",
                "--intra-op",
                "1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log(&format!("worker{i}.err"))?))
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        if let Some(stdout) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send((i, line)).is_err() {
                        break;
                    }
                }
            });
        }
        tasks.0.push((name, child));
    }
    drop(tx);
    let tty = std::io::stdout().is_terminal();
    let mut progress: BTreeMap<usize, Progress> = BTreeMap::new();
    let mut done: BTreeMap<usize, String> = BTreeMap::new();
    let t0 = Instant::now();
    loop {
        // A task that died is reported at once, with its error output.
        for (name, child) in tasks.0.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let worker_ok = name.starts_with("worker/") && status.success();
                if !worker_ok {
                    let err = std::fs::read_to_string(out.join(format!("{}.err.log", name.replace('/', ""))))
                        .unwrap_or_default();
                    let tail: Vec<&str> =
                        err.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
                    return Err(format!("task {name} exited ({status}):\n{}", tail.join("\n")));
                }
            }
        }
        if done.len() == o.workers {
            break;
        }
        if t0.elapsed() > DEMO_TIMEOUT {
            return Err(format!(
                "the demo did not finish within {} s; stopping every task",
                DEMO_TIMEOUT.as_secs()
            ));
        }
        let Ok((i, line)) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        if line.starts_with("PROGRESS") {
            let p = progress.entry(i).or_default();
            p.step = field(&line, "step").and_then(|v| v.parse().ok()).unwrap_or(p.step);
            p.loss = field(&line, "loss").and_then(|v| v.parse().ok()).unwrap_or(p.loss);
            p.examples_per_sec = field(&line, "examples_per_sec").and_then(|v| v.parse().ok()).unwrap_or(0.0);
            if tty {
                let s: Vec<String> = progress
                    .iter()
                    .map(|(w, p)| {
                        format!(
                            "w{w}: {} loss {:.3} {:.0} ex/s",
                            bar(p.step, o.steps),
                            p.loss,
                            p.examples_per_sec
                        )
                    })
                    .collect();
                print!("\r{}", s.join("  "));
                let _ = std::io::stdout().flush();
            } else {
                println!(
                    "worker {i}: step {} loss {:.4} {:.0} examples/s",
                    p.step, p.loss, p.examples_per_sec
                );
            }
        } else if line.starts_with("DONE") {
            done.insert(i, line);
        }
    }
    if tty {
        println!();
    }
    let chief = done.get(&0).cloned().unwrap_or_default();
    let total_eps: f64 =
        done.values().filter_map(|l| field(l, "examples_per_sec").and_then(|v| v.parse::<f64>().ok())).sum();
    let bytes: Vec<String> = done
        .iter()
        .map(|(w, l)| format!("worker {w}: {} B/step", field(l, "bytes_per_step").unwrap_or("?")))
        .collect();
    println!("\ntest accuracy: {}", field(&chief, "accuracy").unwrap_or("?"));
    println!("throughput: {total_eps:.0} examples/s over {} workers", o.workers);
    println!("bytes on the wire per step: {}", bytes.join(", "));
    println!("global step: {}", field(&chief, "global_step").unwrap_or("?"));
    println!("Chrome trace of a step: {}", field(&chief, "trace").unwrap_or("?"));
    println!("TensorBoard events: {}", field(&chief, "events").unwrap_or("?"));
    println!("checkpoint: {}", field(&chief, "checkpoint").unwrap_or("?"));
    println!("logs: {}", out.display());
    drop(tasks);
    Ok(())
}
