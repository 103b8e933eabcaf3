//! Distributed transfer, the workloads of the peer script `bench_dist_transfer.py` (mode `remote`):
//! a ps task and a worker task run as separate server processes on 127.0.0.1 and this process is
//! the client. A float32 variable on the ps is pulled to the worker (`identity` on the worker, run
//! as a target) and fetched to the client; tiny scalar ops run on the worker, on the ps, and on the
//! ps feeding the worker. Everything runs twice: with the same-host shared-memory data path (rill's
//! default, `[remote]`) and with it disabled, over TCP only (`[remote,shm=off]`). The same run
//! measures this machine's limits (before and after the cluster runs; the better is reported):
//! plain loopback TCP throughput and round trip, and memcpy.
//!
//! Run: `cargo run --release -p rill-tests --example bench_transfer`
//! (the program re-executes itself with a hidden `--serve` argument for the server processes).

use rill_graph::{Graph, Output, RunOptions, Session, SessionOptions, Shape, Tensor};
use rill_tests::{bench, line, median, spread};
use rill_transport::{ClusterSpec, RemoteSession, Server, ServerDef};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SIZES: [(&str, usize); 4] =
    [("4KB", 4 << 10), ("1MB", 1 << 20), ("16MB", 16 << 20), ("64MB", 64 << 20)];
/// How long a server process may take to report that it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STEP_TIMEOUT_MS: u64 = 60_000;
const PS: &str = "/job:ps/task:0";
const WK: &str = "/job:worker/task:0";

fn main() -> rill_graph::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        return serve(&args[2..]);
    }
    let t0 = Instant::now();
    // The machine's limits are measured before and after the cluster runs; the better of the two
    // is reported and used in the ratios, so a burst of other load cannot flatter rill.
    let before = physical();
    let shm = cluster_run(true, "[remote]")?;
    let tcp = cluster_run(false, "[remote,shm=off]")?;
    let after = physical();
    println!("# this machine (better of the measurements before and after the cluster runs)");
    let raw_tcp =
        best("socket_loopback_tcp", &before.stream, &after.stream, true, "GB/s", "two threads, 4 MiB writes");
    let raw_message = best(
        "socket_loopback_tcp_64MiB_message",
        &before.message,
        &after.message,
        true,
        "GB/s",
        "64 MiB buffer to 64 MiB buffer, on request",
    );
    best("socket_loopback_rtt_1byte", &before.rtt, &after.rtt, false, "us", "two threads, TCP_NODELAY");
    let memcpy = best("memcpy_256MiB", &before.memcpy, &after.memcpy, true, "GB/s", "bytes copied / time");
    println!("# ratios (same run)");
    line(
        "ratio_pull_64MB_tcp_over_raw_tcp",
        tcp.pull_64mb_gbps / raw_tcp,
        "x",
        &format!("({:.3} / {raw_tcp:.3} GB/s, the 4 MiB stream)", tcp.pull_64mb_gbps),
    );
    line(
        "ratio_pull_64MB_tcp_over_raw_tcp_64MiB_message",
        tcp.pull_64mb_gbps / raw_message,
        "x",
        &format!("({:.3} / {raw_message:.3} GB/s)", tcp.pull_64mb_gbps),
    );
    line(
        "ratio_pull_64MB_shm_over_memcpy",
        shm.pull_64mb_gbps / memcpy,
        "x",
        &format!("({:.3} / {memcpy:.3} GB/s)", shm.pull_64mb_gbps),
    );
    line(
        "ratio_pull_64MB_shm_over_tcp",
        shm.pull_64mb_gbps / tcp.pull_64mb_gbps,
        "x",
        &format!("({:.3} / {:.3} GB/s)", shm.pull_64mb_gbps, tcp.pull_64mb_gbps),
    );
    println!("# total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// `--serve CLUSTER JOB TASK SHM`: one server task; prints `READY` and serves until stdin closes
/// (so a server never outlives the benchmark, even when the benchmark is killed).
fn serve(args: &[String]) -> rill_graph::Result<()> {
    let [spec, job, task, shm] = args else {
        return Err(rill_graph::Error::invalid_argument("--serve CLUSTER JOB TASK SHM(0|1)"));
    };
    let task: u32 = task.parse().map_err(|_| rill_graph::Error::invalid_argument("bad task"))?;
    let mut def = ServerDef::new(ClusterSpec::parse(spec)?, job, task)?;
    def.default_session_options.inter_op_parallelism_threads = 2;
    def.default_session_options.intra_op_parallelism_threads = 2;
    def.shm = shm == "1";
    let server = Server::start(def, rill_train::standard_runtime())?;
    println!("READY {}", std::process::id());
    std::io::stdout().flush()?;
    let mut sink = [0u8; 64];
    // Bounded by the parent: it closes our stdin when it ends, normally or not.
    while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
    server.stop();
    Ok(())
}

/// Server processes started by this benchmark, killed by PID when dropped.
struct Servers(Vec<Child>);

impl Servers {
    fn spawn(spec: &str, job: &str, shm: bool) -> rill_graph::Result<Child> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["--serve", spec, job, "0", if shm { "1" } else { "0" }])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let _ = BufReader::new(out).read_line(&mut first);
            let _ = tx.send(first);
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(l) if l.starts_with("READY") => Ok(child),
            r => {
                let _ = child.kill();
                let _ = child.wait();
                Err(rill_graph::Error::unavailable(format!("server {job} did not start: {r:?}")))
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Figures {
    pull_64mb_gbps: f64,
}

fn cluster_run(shm: bool, tag: &str) -> rill_graph::Result<Figures> {
    let port = || rill_transport::cluster::free_loopback_port();
    let spec = format!("ps=127.0.0.1:{};worker=127.0.0.1:{}", port()?, port()?);
    let mut servers = Servers(Vec::new());
    servers.0.push(Servers::spawn(&spec, "ps", shm)?);
    servers.0.push(Servers::spawn(&spec, "worker", shm)?);
    let worker_target = format!("tcp://{}", ClusterSpec::parse(&spec)?.task_address("worker", 0)?);

    let g = Graph::new();
    let mut vars: Vec<(&str, usize, Output, Output)> = Vec::new();
    for (name, bytes) in SIZES {
        let v = g.with_device(PS, |g| {
            g.variable(&format!("v_{name}"), g.fill(Shape::vector(bytes / 4), Tensor::scalar(1f32)))
        });
        let pulled = g.with_device(WK, |g| g.identity(v));
        vars.push((name, bytes, v, pulled));
    }
    let ps_tiny = g.with_device(PS, |g| g.add(g.variable("scalar_ps", g.scalar(1f32)), g.scalar(1f32)));
    let wk_tiny = g.with_device(WK, |g| g.add(g.variable("scalar_wk", g.scalar(1f32)), g.scalar(1f32)));
    let cross = g.with_device(WK, |g| g.mul(ps_tiny, g.scalar(2f32)));
    let init = g.global_variables_initializer();
    let s = RemoteSession::connect(&worker_target, &g, SessionOptions::default())?;
    let ro = RunOptions { timeout_in_ms: STEP_TIMEOUT_MS, ..Default::default() };
    s.run(&[], &[], &[init], &ro)?;
    assert_eq!(s.run(&[], &[cross], &[], &ro)?[0].scalar_value::<f32>()?, 4.0, "the cross-task op computes");

    println!("# rill, mode=remote (ps, worker and client processes), shm={}", if shm { "on" } else { "off" });
    for (nm, op) in [("worker_only", wk_tiny), ("ps_only", ps_tiny), ("ps_to_worker", cross)] {
        let fetch = bench(|| drop(s.run(&[], &[op], &[], &ro).unwrap()), 300, 9);
        let target = bench(|| drop(s.run(&[], &[], &[op], &ro).unwrap()), 300, 9);
        for (kind, ts) in [("fetch", fetch), ("target", target)] {
            let m = median(&ts);
            line(
                &format!("tiny_op_{nm}{tag} {kind}"),
                m * 1e6,
                "us/run",
                &format!("({:.0} runs/s) {}", 1.0 / m, spread(&ts)),
            );
        }
    }
    let mut pull_64mb_gbps = f64::NAN;
    let v64 = vars[SIZES.len() - 1].2;
    for (name, bytes, v, pulled) in vars {
        let inner = match name {
            "4KB" => 300,
            "1MB" => 50,
            "16MB" => 5,
            _ => 2,
        };
        let reps = if name == "64MB" { 7 } else { 9 };
        let pull = bench(|| drop(s.run(&[], &[], &[pulled], &ro).unwrap()), inner, reps);
        let fetch = bench(|| drop(s.run(&[], &[v], &[], &ro).unwrap()), inner, reps);
        for (what, ts) in [("pull_ps_to_worker", pull), ("fetch_ps_var_to_client", fetch)] {
            let m = median(&ts);
            let gbps = bytes as f64 / m / 1e9;
            if what == "pull_ps_to_worker" && name == "64MB" {
                pull_64mb_gbps = gbps;
            }
            let full = format!("{what}_{name}{tag}");
            line(&full, gbps, "GB/s", &format!("(median {:.3} ms) {}", m * 1e3, spread(&ts)));
            line(&format!("{full} latency"), m * 1e3, "ms", "");
        }
    }
    let fetched = s.run(&[], &[v64], &[], &ro)?;
    assert!(fetched[0].as_slice::<f32>()?.iter().all(|&x| x == 1.0), "the fetched variable is intact");
    drop(s);
    drop(servers);
    Ok(Figures { pull_64mb_gbps })
}

/// Samples of this machine's limits (no rill code).
struct Physical {
    stream: Vec<f64>,
    message: Vec<f64>,
    rtt: Vec<f64>,
    memcpy: Vec<f64>,
}

fn physical() -> Physical {
    let (stream, message, rtt) = loopback_tcp();
    Physical { stream, message, rtt, memcpy: memcpy_bandwidth() }
}

/// Prints the better of two sample sets (by median) and returns that median.
fn best(name: &str, a: &[f64], b: &[f64], higher_is_better: bool, unit: &str, what: &str) -> f64 {
    let (ma, mb) = (median(a), median(b));
    let a_wins = if higher_is_better { ma >= mb } else { ma <= mb };
    let (win, m, other) = if a_wins { (a, ma, mb) } else { (b, mb, ma) };
    line(name, m, unit, &format!("({what}; the other run: {other:.3}) {}", spread(win)));
    m
}

/// Plain loopback TCP between two threads: a stream of 4 MiB writes into a reused 4 MiB read
/// buffer (what the peer's `python_socket_loopback_tcp` measures; both buffers stay in cache), and
/// 64 MiB messages from one 64 MiB buffer into another on request (the memory traffic of a 64 MiB
/// pull); then a 1-byte ping-pong with TCP_NODELAY. Returns GB/s samples of both and round trips
/// in microseconds.
fn loopback_tcp() -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    const CHUNK: usize = 4 << 20;
    const PER_REP: usize = 256 << 20;
    const MESSAGE: usize = 64 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let rx = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0usize;
        // Ends when the sender shuts its side down.
        while let Ok(k) = c.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    let mut tx = TcpStream::connect(addr).expect("connect");
    let data = vec![0x5au8; CHUNK];
    let reps: Vec<f64> = (0..9)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..PER_REP / CHUNK {
                tx.write_all(&data).expect("write");
            }
            PER_REP as f64 / t0.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    tx.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let got = rx.join().expect("receiver");
    assert_eq!(got, 9 * PER_REP);

    // Request-response: 1 byte asks for a 64 MiB message, or for a 1-byte echo.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        c.set_nodelay(true).expect("nodelay");
        let payload = vec![0x33u8; MESSAGE];
        let mut b = [0u8; 1];
        while matches!(c.read(&mut b), Ok(1)) {
            let sent = if b[0] == b'g' { c.write_all(&payload) } else { c.write_all(&b) };
            if sent.is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut dst = vec![0u8; MESSAGE];
    let msg = bench(
        || {
            c.write_all(b"g").expect("ask");
            c.read_exact(&mut dst).expect("message");
        },
        2,
        7,
    );
    let mut b = [0u8; 1];
    let rtt = bench(
        || {
            c.write_all(b"x").expect("ping");
            c.read_exact(&mut b).expect("pong");
        },
        2000,
        9,
    );
    drop(c);
    let _ = server.join();
    let message = msg.iter().map(|t| MESSAGE as f64 / t / 1e9).collect();
    (reps, message, rtt.iter().map(|t| t * 1e6).collect())
}

/// memcpy of 256 MiB between two faulted-in buffers: GB/s samples (bytes copied / time).
fn memcpy_bandwidth() -> Vec<f64> {
    const N: usize = 256 << 20;
    let src = vec![1u8; N];
    let mut dst = vec![0u8; N];
    dst.iter_mut().step_by(4096).for_each(|b| *b = 2);
    let ts = bench(|| dst.copy_from_slice(std::hint::black_box(&src)), 3, 9);
    std::hint::black_box(&dst);
    ts.iter().map(|t| N as f64 / t / 1e9).collect()
}
