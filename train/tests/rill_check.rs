//! `rill check` as a harness runs it: each client-side scenario against a cluster of servers in
//! this test process on 127.0.0.1 (with a shared secret), the peer scenario with its peer
//! stopped and started again, and bad input refused with a message. Every `rill` process started
//! here is waited for or killed here, by its own handle.

use rill_transport::{ClusterSpec, Server, ServerDef};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RILL: &str = env!("CARGO_BIN_EXE_rill");
const SECRET: &str = "check-secret";
/// Bound on one check.
const TIMEOUT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

fn secret_file(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rill-check-{}-{tag}", std::process::id()));
    std::fs::write(&p, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn start(spec: &ClusterSpec, job: &str, task: u32) -> Server {
    let mut def = ServerDef::new(spec.clone(), job, task).unwrap();
    def.default_session_options.inter_op_parallelism_threads = 2;
    def.default_session_options.intra_op_parallelism_threads = 1;
    def.secret = Some(SECRET.as_bytes().to_vec());
    Server::start(def, rill_train::standard_runtime()).unwrap()
}

fn cluster() -> (ClusterSpec, Vec<Server>) {
    let spec = ClusterSpec::parse(&format!(
        "ps=127.0.0.1:{};worker=127.0.0.1:{},127.0.0.1:{}",
        free_port(),
        free_port(),
        free_port()
    ))
    .unwrap();
    let servers = vec![start(&spec, "ps", 0), start(&spec, "worker", 0), start(&spec, "worker", 1)];
    (spec, servers)
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A `rill check` process whose stdout lines arrive on a channel; killed when dropped.
struct Check {
    child: Child,
    lines: mpsc::Receiver<String>,
    deadline: Instant,
}

impl Drop for Check {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Check {
    fn start(scenario: &str, spec: &ClusterSpec, secret: &Path, extra: &[&str]) -> Check {
        let mut child = Command::new(RILL)
            .args(["check", scenario, "--cluster", &spec.to_string()])
            .args(["--secret-file", secret.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Check { child, lines: rx, deadline: Instant::now() + TIMEOUT }
    }

    fn line(&self, prefix: &str) -> String {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no '{prefix}' line in time");
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!("no '{prefix}' line: {e}"),
            }
        }
    }

    /// The `CHECK` line, which must say ok; the process must exit 0.
    fn ok(mut self) -> String {
        let l = self.line("CHECK ");
        assert_eq!(field(&l, "result"), Some("ok"), "{l}");
        assert!(self.child.wait().unwrap().success(), "{l}");
        l
    }
}

#[test]
fn client_checks_pass_against_a_running_cluster() {
    let (spec, _servers) = cluster();
    let secret = secret_file("client");
    let towers = Check::start("towers", &spec, &secret, &["--steps", "300"]).ok();
    assert_eq!(field(&towers, "towers"), Some("2"), "{towers}");
    assert!(field(&towers, "accuracy").unwrap().parse::<f32>().unwrap() >= 0.95, "{towers}");
    let queue = Check::start("queue", &spec, &secret, &["--items", "100"]).ok();
    assert_eq!(field(&queue, "items"), Some("100"), "{queue}");
    let refused = Check::start("secret", &spec, &secret, &[]).ok();
    assert!(refused.contains("wrong=Unauthenticated none=Unauthenticated right=served"), "{refused}");
    let _ = std::fs::remove_file(secret);
}

#[test]
fn the_peer_check_sees_a_stopped_peer_fail_named_and_come_back() {
    let (spec, mut servers) = cluster();
    let secret = secret_file("peer");
    let check = Check::start("peer", &spec, &secret, &["--peer", "ps:0", "--timeout-ms", "30000"]);
    check.line("STAGE scenario=peer stage=up");
    servers.remove(0).stop();
    let down = check.line("STAGE scenario=peer stage=down");
    assert_eq!(field(&down, "code"), Some("Unavailable"), "{down}");
    servers.push(start(&spec, "ps", 0));
    let l = check.ok();
    assert_eq!(field(&l, "peer"), Some("/job:ps/task:0"), "{l}");
    let _ = std::fs::remove_file(secret);
}

#[test]
fn a_failing_check_says_why_and_bad_input_is_refused() {
    let (spec, _servers) = cluster();
    let wrong = std::env::temp_dir().join(format!("rill-check-{}-wrong", std::process::id()));
    std::fs::write(&wrong, "not-the-secret\n").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = Check::start("queue", &spec, &wrong, &[]);
    let l = c.line("CHECK ");
    assert_eq!(field(&l, "result"), Some("fail"), "{l}");
    assert!(l.contains("error=Unauthenticated"), "{l}");
    assert_eq!(c.child.wait().unwrap().code(), Some(1));
    let _ = std::fs::remove_file(wrong);
    let s = spec.to_string();
    for (args, code, part) in [
        (vec!["check"], 2, "check needs a scenario (towers, queue, peer, secret)"),
        (vec!["check", "fly", "--cluster", &s], 2, "unknown scenario 'fly'"),
        (vec!["check", "queue", "--cluster", &s, "--items", "0"], 2, "--items must be above 0"),
        (vec!["check", "peer", "--cluster", &s, "--peer", "ps"], 2, "--peer 'ps' is not job:index"),
        (vec!["check", "secret", "--cluster", &s], 1, "needs --secret-file"),
    ] {
        let out = Command::new(RILL).args(&args).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(code), "{args:?}: {text}");
        assert!(text.contains(part), "{args:?}: '{text}' does not mention '{part}'");
    }
}
