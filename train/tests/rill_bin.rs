//! The `rill` binary as users run it: `rill cluster` from flags, files and fake launcher
//! environments; `rill server` on 127.0.0.1 serving a remote session until a signal stops it;
//! bad input exiting non-zero with a message. Every process started here is stopped here, by its pid.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rill_graph::{Graph, RunOptions, Session, SessionOptions};
use rill_transport::{ConnectOptions, RemoteSession};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const RILL: &str = env!("CARGO_BIN_EXE_rill");
/// Longest wait for a server to come up or to exit after a signal.
const WAIT_MS: u64 = 20_000;

/// Runs `rill ARGS` to completion with exactly the environment `env`.
fn rill(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(RILL).args(args).env_clear().envs(env.iter().copied()).output().unwrap()
}

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

/// A file under the temp dir with `text` and permission bits `mode`.
fn temp_file(tag: &str, text: &str, mode: u32) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rill-bin-{}-{tag}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn cluster_prints_the_resolved_cluster() {
    let file = temp_file("cluster", "ps=h1:2222\nworker=h2:2222,h3:2222 # two workers\n", 0o644);
    let file_arg = file.to_str().unwrap();
    let slurm = [
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_STEP_NODELIST", "n[01-02]"),
        ("SLURM_STEP_TASKS_PER_NODE", "3,1"),
    ];
    let tf_config = [(
        "TF_CONFIG",
        r#"{"cluster":{"chief":["c:1"],"worker":["w:2"]},"task":{"type":"chief","index":0}}"#,
    )];
    let cases: &[(&[&str], &[(&str, &str)], &str)] = &[
        (
            &["cluster", "--cluster", "ps=h1:2222;worker=h2:2222,h3:2222", "--job", "worker", "--task", "1"],
            &[],
            "rill: cluster from --cluster: ps=h1:2222;worker=h2:2222,h3:2222\n\
             /job:ps/task:0 h1:2222\n/job:worker/task:0 h2:2222\n/job:worker/task:1 h3:2222\n\
             this task: /job:worker/task:1 at h3:2222\n",
        ),
        (
            &["cluster", "--cluster-file", file_arg, "--job=ps"],
            &[],
            "rill: cluster from --cluster-file: ps=h1:2222;worker=h2:2222,h3:2222\n\
             /job:ps/task:0 h1:2222\n/job:worker/task:0 h2:2222\n/job:worker/task:1 h3:2222\n\
             this task: /job:ps/task:0 at h1:2222\n",
        ),
        (
            &["cluster", "--from-env"],
            &slurm,
            "rill: cluster from Slurm (SLURM_STEP_NODELIST): ps=n01:2222;worker=n01:2223,n01:2224,n02:2222\n\
             /job:ps/task:0 n01:2222\n/job:worker/task:0 n01:2223\n/job:worker/task:1 n01:2224\n\
             /job:worker/task:2 n02:2222\nthis task: /job:worker/task:2 at n02:2222\n",
        ),
        (
            &["cluster", "--from-env", "--ps-tasks", "0", "--port", "7000"],
            &slurm,
            "rill: cluster from Slurm (SLURM_STEP_NODELIST): worker=n01:7000,n01:7001,n01:7002,n02:7000\n\
             /job:worker/task:0 n01:7000\n/job:worker/task:1 n01:7001\n/job:worker/task:2 n01:7002\n\
             /job:worker/task:3 n02:7000\nthis task: /job:worker/task:3 at n02:7000\n",
        ),
        (
            &["cluster", "--from-env"],
            &tf_config,
            "rill: cluster from TF_CONFIG: chief=c:1;worker=w:2\n/job:chief/task:0 c:1\n/job:worker/task:0 w:2\n\
             this task: /job:chief/task:0 at c:1\n",
        ),
        (
            &["cluster", "--from-env", "--hosts", "a,b"],
            &[("PMI_RANK", "1"), ("PMI_SIZE", "2")],
            "rill: cluster from MPI (PMI_RANK): ps=a:2222;worker=b:2222\n/job:ps/task:0 a:2222\n\
             /job:worker/task:0 b:2222\nthis task: /job:worker/task:0 at b:2222\n",
        ),
    ];
    for (args, env, want) in cases {
        let out = rill(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), *want, "{args:?}");
    }
    let _ = std::fs::remove_file(file);
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    let open = temp_file("secret-open", "s3cret\n", 0o644);
    let empty = temp_file("secret-empty", "\n", 0o600);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_spec = format!("worker={}", busy.local_addr().unwrap());
    let one = "worker=127.0.0.1:1";
    let cases: &[(&[&str], &[(&str, &str)], i32, &str)] = &[
        (&[], &[], 2, "usage: rill COMMAND"),
        (&["fly"], &[], 2, "unknown command 'fly' (commands: server, cluster, train, check)"),
        (
            &["train", "--cluster", "worker=127.0.0.1:1", "--job", "worker", "--mode", "never"],
            &[],
            2,
            "--mode 'never' is not sync or async",
        ),
        (&["cluster", "--bogus"], &[], 2, "cluster: unknown flag '--bogus'"),
        (&["cluster", "stray"], &[], 2, "unexpected argument 'stray'"),
        (&["cluster", "--job"], &[], 2, "--job needs a value"),
        (&["cluster", "--job=a", "--job=b"], &[], 2, "--job is given twice"),
        (&["cluster", "--from-env=yes"], &[], 2, "--from-env takes no value"),
        (
            &["cluster", "--cluster", one, "--job", "worker", "--task", "x"],
            &[],
            2,
            "--task 'x' is not a task index",
        ),
        (&["cluster", "--from-env", "--port", "0"], &[], 2, "--port 0 is not a port"),
        (&["cluster", "--secret-file", "f"], &[], 2, "cluster: unknown flag '--secret-file'"),
        (&["cluster"], &[], 1, "no cluster given"),
        (&["cluster", "--from-env"], &[], 1, "--from-env found no cluster"),
        (
            &["cluster", "--from-env"],
            &[("SLURM_PROCID", "abc")],
            1,
            "SLURM_PROCID='abc' is not a valid number",
        ),
        (
            &["cluster", "--from-env"],
            &[("TF_CONFIG", "{\"cluster\":")],
            1,
            "TF_CONFIG: JSON: unexpected end of input at byte 11",
        ),
        (&["server", "--cluster", "ps=h1", "--job", "ps"], &[], 1, "--cluster: bad address 'h1'"),
        (&["server", "--cluster", one, "--job", "ps"], &[], 1, "/job:ps/task:0 is not in the cluster spec"),
        (
            &["server", "--cluster", one, "--job", "worker", "--inter-op", "-1"],
            &[],
            2,
            "--inter-op '-1' is not a thread count",
        ),
        (
            &["server", "--cluster", one, "--job", "worker", "--secret-file", open.to_str().unwrap()],
            &[],
            1,
            "permissions 0644 are too open",
        ),
        (
            &["server", "--cluster", one, "--job", "worker", "--secret-file", empty.to_str().unwrap()],
            &[],
            1,
            "the file is empty",
        ),
        (
            &["server", "--cluster", one, "--job", "worker", "--secret-file", "/nonexistent/rill-secret"],
            &[],
            1,
            "--secret-file /nonexistent/rill-secret",
        ),
        (&["server", "--cluster", &busy_spec, "--job", "worker"], &[], 1, "starting /job:worker/task:0"),
    ];
    for (args, env, code, part) in cases {
        let out = rill(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(part), "{args:?}: '{stderr}' does not mention '{part}'");
    }
    let _ = (std::fs::remove_file(open), std::fs::remove_file(empty));
}

/// A `rill server` this test started; dropping it kills that process (by its pid) if it still runs.
struct Running {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

impl Running {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut child = Command::new(RILL)
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (out_tx, stdout) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let (err_tx, stderr) = channel();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut all = String::new();
            let _ = err.read_to_string(&mut all);
            let _ = err_tx.send(all);
        });
        Running { child, stdout, stderr }
    }

    /// Stdout lines up to the first that contains `part`.
    fn wait_for(&self, part: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        let mut lines = Vec::new();
        while let Ok(line) = self.stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            let done = line.contains(part);
            lines.push(line);
            if done {
                return lines;
            }
        }
        panic!("no line with '{part}' within {WAIT_MS} ms; got {lines:?}");
    }

    /// Sends `sig` to this process only, and waits for it to exit; returns its stderr.
    fn signal_and_wait(&mut self, sig: Signal) -> (std::process::ExitStatus, String) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let stderr = self.stderr.recv_timeout(Duration::from_millis(WAIT_MS)).unwrap_or_default();
                return (status, stderr);
            }
            assert!(Instant::now() < deadline, "rill server did not exit within {WAIT_MS} ms of {sig}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn server_serves_a_session_and_stops_on_a_signal() {
    let secret = temp_file("secret", "let me in\n", 0o600);
    for (sig, from_env) in [(Signal::SIGTERM, false), (Signal::SIGINT, true)] {
        let port = free_port();
        let port_s = port.to_string();
        let spec = format!("worker=127.0.0.1:{port}");
        let secret_arg = secret.to_str().unwrap();
        let slurm = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_STEP_NODELIST", "127.0.0.1")];
        let mut server = if from_env {
            Running::start(
                &["server", "--from-env", "--ps-tasks", "0", "--port", &port_s, "--secret-file", secret_arg],
                &slurm,
            )
        } else {
            Running::start(
                &[
                    "server",
                    "--cluster",
                    &spec,
                    "--job",
                    "worker",
                    "--task",
                    "0",
                    "--inter-op",
                    "2",
                    "--secret-file",
                    secret_arg,
                ],
                &[],
            )
        };
        let lines = server.wait_for("rill: serving");
        let source = if from_env { "Slurm (SLURM_STEP_NODELIST)" } else { "--cluster" };
        assert_eq!(
            lines,
            [
                format!(
                    "rill: cluster from {source}: {spec}; this task: /job:worker/task:0 at 127.0.0.1:{port}"
                ),
                format!("rill: serving /job:worker/task:0 at tcp://127.0.0.1:{port}"),
            ]
        );

        let target = format!("tcp://127.0.0.1:{port}");
        let g = Graph::new();
        let y = g.with_device("/job:worker/task:0", |g| g.add(g.scalar(2f32), g.scalar(3f32)));
        let with_secret = ConnectOptions { secret: Some(b"let me in".to_vec()), ..Default::default() };
        let sess = RemoteSession::connect_with(&target, &g, SessionOptions::default(), &with_secret).unwrap();
        let ro = RunOptions { timeout_in_ms: WAIT_MS, ..Default::default() };
        assert_eq!(sess.run(&[], &[y], &[], &ro).unwrap()[0].scalar_value::<f32>().unwrap(), 5.0);
        drop(sess);
        let wrong = ConnectOptions { secret: Some(b"let me inn".to_vec()), ..Default::default() };
        assert!(RemoteSession::connect_with(&target, &g, SessionOptions::default(), &wrong).is_err());

        let (status, stderr) = server.signal_and_wait(sig);
        assert!(status.success(), "{sig}: {status:?}: {stderr}");
        assert!(stderr.contains(&format!("rill: {}, stopping", sig.as_str())), "{stderr}");
        // Gone: the process was reaped and its port is free again.
        assert!(server.child.try_wait().unwrap().is_some());
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
    let _ = std::fs::remove_file(secret);
}
