//! Faults on a cluster of separate `rill` processes on 127.0.0.1: a worker killed mid-run while
//! sync training has a spare replica (the others finish), and the ps killed and restarted (the
//! workers recover and the chief resumes from the latest checkpoint), and a job started again on
//! its output directory resuming there. Only the processes this test starts are killed, by their
//! own handles; every wait is bounded.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound on one scenario.
const TIMEOUT: Duration = Duration::from_secs(120);
const STEPS: u64 = 400;
const CHECKPOINT_EVERY: u64 = 50;

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

/// Named processes, killed when dropped; their stdout lines arrive on one channel.
struct Procs {
    children: Vec<(String, Child)>,
    tx: mpsc::Sender<(String, String)>,
    rx: mpsc::Receiver<(String, String)>,
    spec: String,
    out: std::path::PathBuf,
    deadline: Instant,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.out.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.out);
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key}= in {line}"))
}

impl Procs {
    fn new(name: &str, workers: usize) -> Procs {
        let ws: Vec<String> = (0..workers).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let spec = format!("ps=127.0.0.1:{};worker={}", free_port(), ws.join(","));
        let out = std::env::temp_dir().join(format!("rill-faults-{}-{name}", std::process::id()));
        let (tx, rx) = mpsc::channel();
        Procs { children: Vec::new(), tx, rx, spec, out, deadline: Instant::now() + TIMEOUT }
    }

    fn start(&mut self, job: &str, task: usize, extra: &[&str]) {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rill"))
            .args(["train", "--cluster", &self.spec, "--job", job, "--task", &task.to_string()])
            .args(["--inter-op", "1", "--intra-op", "1", "--log-every", "10"])
            .args(["--out", &self.out.display().to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let name = format!("{job}/{task}");
        let (stdout, tx, n) = (c.stdout.take().unwrap(), self.tx.clone(), name.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((n.clone(), line)).is_err() {
                    break;
                }
            }
        });
        self.children.push((name, c));
    }

    fn kill(&mut self, name: &str) {
        let k = self.children.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.children.remove(k);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// The first line of `name` matching `pred`, within the scenario's deadline.
    fn wait_line(&self, name: &str, pred: impl Fn(&str) -> bool) -> String {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{name}: the awaited line did not come in time");
            if let Ok((n, l)) = self.rx.recv_timeout(left.min(Duration::from_millis(500))) {
                if n == name && pred(&l) {
                    return l;
                }
            }
        }
    }

    /// Waits for the worker to exit successfully.
    fn wait_success(&mut self, name: &str) {
        let (_, c) = self.children.iter_mut().find(|(n, _)| n == name).unwrap();
        while Instant::now() < self.deadline {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "{name} failed: {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{name} did not finish in time");
    }
}

fn past(step: u64) -> impl Fn(&str) -> bool {
    move |l: &str| {
        l.starts_with("PROGRESS") && field(l, "step").and_then(|s| s.parse::<u64>().ok()) >= Some(step)
    }
}

#[test]
fn sync_training_with_a_spare_replica_finishes_after_a_worker_is_killed() {
    let mut p = Procs::new("kill-worker", 3);
    p.start("ps", 0, &[]);
    let steps = STEPS.to_string();
    for w in 0..3 {
        p.start("worker", w, &["--mode", "sync", "--steps", &steps, "--replicas-to-aggregate", "2"]);
    }
    p.wait_line("worker/2", past(100));
    p.kill("worker/2");
    let done = p.wait_line("worker/0", |l| l.starts_with("DONE"));
    assert!(num(&done, "global_step") >= STEPS, "{done}");
    let acc: f64 = field(&done, "accuracy").unwrap().parse().unwrap();
    assert!(acc >= 0.9, "{done}");
    p.wait_success("worker/0");
    p.wait_success("worker/1");
}

#[test]
fn training_resumes_from_the_latest_checkpoint_after_the_ps_restarts() {
    let mut p = Procs::new("ps-restart", 2);
    p.start("ps", 0, &[]);
    let (steps, every) = (STEPS.to_string(), CHECKPOINT_EVERY.to_string());
    for w in 0..2 {
        p.start("worker", w, &["--mode", "sync", "--steps", &steps, "--checkpoint-every", &every]);
    }
    p.wait_line("worker/0", past(2 * CHECKPOINT_EVERY + 10));
    p.kill("ps/0");
    p.start("ps", 0, &[]);
    let rec = p.wait_line("worker/0", |l| l.starts_with("RECOVERED"));
    let (last, restored) = (num(&rec, "last_step"), num(&rec, "restored_step"));
    assert!(restored >= CHECKPOINT_EVERY && restored <= last, "{rec}");
    assert!(last - restored <= CHECKPOINT_EVERY + 2, "more steps lost than the checkpoint period: {rec}");
    let done = p.wait_line("worker/0", |l| l.starts_with("DONE"));
    assert!(num(&done, "global_step") >= STEPS && num(&done, "recoveries") == 1, "{done}");
    p.wait_success("worker/0");
    p.wait_success("worker/1");
}

#[test]
fn a_job_started_again_resumes_from_the_checkpoints_in_its_output_directory() {
    let mut first = Procs::new("resume", 1);
    first.start("ps", 0, &[]);
    first.start("worker", 0, &["--mode", "async", "--steps", "100"]);
    let done = first.wait_line("worker/0", |l| l.starts_with("DONE"));
    assert!(num(&done, "global_step") >= 100, "{done}");
    first.wait_success("worker/0");
    // A new cluster (new processes, new ports) with the same output directory.
    let mut second = Procs::new("resume-again", 1);
    // The output directory passes to the second cluster (and is removed with it).
    second.out = std::mem::take(&mut first.out);
    drop(first);
    second.start("ps", 0, &[]);
    second.start("worker", 0, &["--mode", "async", "--steps", "150"]);
    let resumed = second.wait_line("worker/0", |l| l.starts_with("RESUMED"));
    assert!(num(&resumed, "step") >= 100, "{resumed}");
    let done = second.wait_line("worker/0", |l| l.starts_with("DONE"));
    assert!(num(&done, "global_step") >= 150 && num(&done, "steps") <= 60, "{done}");
    second.wait_success("worker/0");
}
