//! Training the digits model on a 1 ps + 2 worker cluster of separate `rill` processes on
//! 127.0.0.1, synchronously and asynchronously, to the accuracy target. Only the processes this
//! test starts are stopped, by their own handles.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn train(mode: &str) -> Vec<String> {
    let rill = env!("CARGO_BIN_EXE_rill");
    let spec =
        format!("ps=127.0.0.1:{};worker=127.0.0.1:{},127.0.0.1:{}", free_port(), free_port(), free_port());
    let out = std::env::temp_dir().join(format!("rill-procs-{}-{}", std::process::id(), mode));
    let mut tasks = Kill(Vec::new());
    let ps = Command::new(rill)
        .args([
            "server",
            "--cluster",
            &spec,
            "--job",
            "ps",
            "--task",
            "0",
            "--inter-op",
            "1",
            "--intra-op",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tasks.0.push(ps);
    for t in 0..2 {
        let w = Command::new(rill)
            .args(["train", "--cluster", &spec, "--job", "worker", "--task", &t.to_string(), "--mode", mode])
            .args(["--steps", "500", "--log-every", "1000", "--out", &out.display().to_string()])
            .args(["--inter-op", "1", "--intra-op", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        tasks.0.push(w);
    }
    let mut done = Vec::new();
    for c in tasks.0.iter_mut().skip(1) {
        let stdout = c.stdout.take().unwrap();
        let lines: Vec<String> = BufReader::new(stdout).lines().map_while(Result::ok).collect();
        assert!(c.wait().unwrap().success(), "a worker failed: {lines:?}");
        done.extend(lines.into_iter().filter(|l| l.starts_with("DONE")));
    }
    let _ = std::fs::remove_dir_all(&out);
    done
}

#[test]
fn separate_processes_train_to_the_target_in_sync_and_async_modes() {
    for mode in ["sync", "async"] {
        let done = train(mode);
        assert_eq!(done.len(), 2, "{mode}: {done:?}");
        let chief = done.iter().find(|l| field(l, "task") == Some("0")).unwrap();
        let acc: f32 = field(chief, "accuracy").unwrap().parse().unwrap();
        assert!(acc >= 0.95, "{mode}: accuracy {acc} ({chief})");
        for l in &done {
            let gs: i64 = field(l, "global_step").unwrap().parse().unwrap();
            assert!(gs >= 499, "{mode}: {l}");
        }
    }
}
