//! `cargo xtask bench [--peer [DIR]] [--only NAME] [--rounds N]`: runs rill's benchmark programs,
//! collects their `RESULT name = value unit` lines and, with `--peer`, runs the TensorFlow peer
//! scripts of the same workloads in the same run and prints rill beside TensorFlow with the
//! ratio. With `--rounds N` each program and its peers run N times, alternately, and the table
//! gives the medians and the spread of the per-round ratios (on a shared machine one run of
//! either side can be disturbed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One benchmark program and the peer script that measures the same workload.
struct Program {
    name: &'static str,
    package: &'static str,
    example: &'static str,
    args: &'static [&'static str],
    /// Peer scripts measuring the same workloads (and, for some, the machine's own limits).
    peers: &'static [(&'static str, &'static [&'static str])],
}

const PROGRAMS: &[Program] = &[
    Program {
        name: "executor",
        package: "rill-tests",
        example: "bench_executor",
        args: &[],
        peers: &[("bench_executor.py", &["1000"])],
    },
    Program {
        name: "dense",
        package: "rill-tests",
        example: "bench_dense",
        args: &[],
        peers: &[("bench_dense.py", &["2"]), ("bench_physical.py", &["gemm"])],
    },
    Program {
        name: "mlp",
        package: "rill-tests",
        example: "bench_mlp",
        args: &["10"],
        peers: &[("train_worker.py", &["local", "10", "const"])],
    },
    Program {
        name: "queues",
        package: "rill-queues",
        example: "bench_queues",
        args: &[],
        peers: &[("bench_queues.py", &[])],
    },
    Program {
        name: "transfer",
        package: "rill-tests",
        example: "bench_transfer",
        args: &[],
        peers: &[("bench_dist_transfer.py", &["remote"]), ("bench_physical.py", &["tcp"])],
    },
    Program {
        name: "dist_train",
        package: "rill-tests",
        example: "bench_dist_train",
        args: &["10", "async", "sync", "local", "half"],
        peers: &[("bench_dist_train.py", &["10", "const", "async", "sync"])],
    },
    Program {
        name: "cnn",
        package: "rill-tests",
        example: "bench_cnn",
        args: &[],
        peers: &[("tests/peer/bench_cnn.py", &["2"])],
    },
];

/// rill result name → (peer result name, higher is better).
const PAIRS: &[(&str, &str, bool)] = &[
    ("a.chain1000_target_run[inter_op=2]", "a.chain1000_target_run[grappler=off,inter_op=2]", false),
    ("a.chain1000_fetch_last_run[inter_op=2]", "a.chain1000_fetch_last_run[grappler=off,inter_op=2]", false),
    ("b.wide1000_fetch_all_run[inter_op=2]", "b.wide1000_fetch_all_run[grappler=off,inter_op=2]", false),
    (
        "b.wide1000_group_target_run[inter_op=2]",
        "b.wide1000_group_target_run[grappler=off,inter_op=2]",
        false,
    ),
    ("c.noop_run[inter_op=2]", "c.noop_run[grappler=off,inter_op=2]", true),
    ("c.tiny_add_fetch_run[inter_op=2]", "c.tiny_add_fetch_run[grappler=off,inter_op=2]", true),
    ("matmul_f32_1024[intra=2]", "matmul_f32_1024[intra=2]", true),
    ("matmul_f32_2048[intra=2]", "matmul_f32_2048[intra=2]", true),
    ("matmul_f32_2048[intra=2]", "numpy_sgemm_2048", true),
    ("add_f32_16M[intra=2]", "add_f32_16M[intra=2]", true),
    ("local_single_session_steps[const]", "local_single_session_steps[const]", true),
    ("cnn_train_step[batch=64]", "cnn_train_step[batch=64]", true),
    ("async_total_worker_steps", "async_total_worker_steps", true),
    ("sync_global_steps", "sync_global_steps", true),
    ("tiny_op_ps_to_worker[remote] target", "tiny_op_ps_to_worker[remote] target", false),
    ("tiny_op_ps_to_worker[remote] fetch", "tiny_op_ps_to_worker[remote] fetch", false),
    ("tiny_op_worker_only[remote] target", "tiny_op_worker_only[remote] target", false),
    ("tiny_op_ps_only[remote] target", "tiny_op_ps_only[remote] target", false),
    ("pull_ps_to_worker_4KB[remote]", "pull_ps_to_worker_4KB[remote]", true),
    ("pull_ps_to_worker_1MB[remote]", "pull_ps_to_worker_1MB[remote]", true),
    ("pull_ps_to_worker_16MB[remote]", "pull_ps_to_worker_16MB[remote]", true),
    ("pull_ps_to_worker_64MB[remote]", "pull_ps_to_worker_64MB[remote]", true),
    ("pull_ps_to_worker_64MB[remote,shm=off]", "pull_ps_to_worker_64MB[remote]", true),
    ("pull_ps_to_worker_64MB[remote,shm=off]", "python_socket_loopback_tcp", true),
    ("fetch_ps_var_to_client_64MB[remote]", "fetch_ps_var_to_client_64MB[remote]", true),
    ("fifo_int64_enq+deq_same_run", "fifo_int64_enq+deq_same_run", true),
    ("fifo_int64_enq_run_then_deq_run", "fifo_int64_enq_run_then_deq_run", true),
    (
        "FIFOQueue_int64_enq_many+deq_many1000_same_run",
        "FIFOQueue_int64_enq_many+deq_many1000_same_run",
        true,
    ),
    ("FIFOQueue_int64_dequeue_many1000_only", "FIFOQueue_int64_dequeue_many1000_only", true),
    (
        "RandomShuffleQueue_int64_enq_many+deq_many1000_same_run",
        "RandomShuffleQueue_int64_enq_many+deq_many1000_same_run",
        true,
    ),
    (
        "PaddingFIFOQueue_int64_enq_many+deq_many1000_same_run",
        "PaddingFIFOQueue_int64_enq_many+deq_many1000_same_run",
        true,
    ),
];

/// Parses `RESULT name = value unit ...` lines (values may carry thousands separators).
/// What a peer line measures: TensorFlow, or the machine's limits through NumPy/OpenBLAS or a
/// plain Python socket (`bench_physical.py`).
fn peer_label(name: &str) -> &'static str {
    if name.starts_with("numpy_") {
        "NumPy/OpenBLAS"
    } else if name.starts_with("python_socket") {
        "a plain Python socket, 4 MiB writes"
    } else {
        "TensorFlow"
    }
}

pub fn parse_results(text: &str) -> BTreeMap<String, (f64, String)> {
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("RESULT ") else { continue };
        let Some((name, rhs)) = rest.split_once(" = ") else { continue };
        let mut it = rhs.split_whitespace();
        let (Some(v), Some(unit)) = (it.next(), it.next()) else { continue };
        if let Ok(v) = v.replace(',', "").parse::<f64>() {
            out.insert(name.trim().to_string(), (v, unit.to_string()));
        }
    }
    out
}

fn peer_python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("RILL_PEER_PY") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").ok()?;
    let p = Path::new(&home).join(".rill-peer/bin/python");
    p.exists().then_some(p)
}

fn run_capture(mut c: Command, what: &str) -> Result<String, String> {
    eprintln!("== {what}: {c:?}");
    let out = c.output().map_err(|e| format!("{what}: cannot start: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    if !out.status.success() {
        return Err(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(text)
}

pub fn bench(root: &Path, cargo: &dyn Fn() -> Command, args: &[String]) -> Result<(), String> {
    let mut peer_dir: Option<PathBuf> = None;
    let mut only: Option<String> = None;
    let mut rounds = 1usize;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--peer" => {
                let default = root.join("../shared/bench/peer");
                match args.get(i + 1).filter(|a| !a.starts_with("--")) {
                    Some(d) => {
                        peer_dir = Some(PathBuf::from(d));
                        i += 1;
                    }
                    None => peer_dir = Some(default),
                }
            }
            "--only" => {
                only = args.get(i + 1).cloned();
                i += 1;
            }
            "--rounds" => {
                rounds = args
                    .get(i + 1)
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| (1..=ROUNDS_MAX).contains(&n))
                    .ok_or_else(|| format!("--rounds takes a number from 1 to {ROUNDS_MAX}"))?;
                i += 1;
            }
            a => return Err(format!("unknown bench option {a}")),
        }
        i += 1;
    }
    let mut build = cargo();
    build.args(["build", "--release", "-p", "rill-tests", "-p", "rill-queues", "--examples"]);
    crate::step("build benchmarks", build)?;
    let mut ours: Vec<Results> = vec![BTreeMap::new(); rounds];
    let mut theirs: Vec<Results> = vec![BTreeMap::new(); rounds];
    let py = peer_python();
    for p in PROGRAMS.iter().filter(|p| only.as_deref().is_none_or(|o| o == p.name)) {
        for round in 0..rounds {
            if rounds > 1 {
                println!("# {} round {} of {rounds}", p.name, round + 1);
            }
            let mut c = cargo();
            c.args(["run", "--quiet", "--release", "-p", p.package, "--example", p.example, "--"])
                .args(p.args);
            for (name, value) in parse_results(&run_capture(c, p.name)?) {
                if ours[round].contains_key(&name) {
                    eprintln!("warning: two programs print {name}; the table keeps the later one");
                }
                ours[round].insert(name, value);
            }
            for (script, sargs) in p.peers.iter().filter(|_| peer_dir.is_some()) {
                let dir = peer_dir.as_deref().unwrap_or(root);
                match &py {
                    Some(py) => {
                        // Peer scripts of this repository (no peer script upstream) are named
                        // from the workspace root; the others live in the peer folder.
                        let own = root.join(script);
                        let mut c = Command::new(py);
                        c.current_dir(dir).arg(if own.exists() { own } else { dir.join(script) }).args(*sargs);
                        // The peer scripts need the real OpenBLAS kernel selection, as their README says.
                        c.env_remove("OPENBLAS_CORETYPE").env_remove("OPENBLAS_L2_SIZE");
                        theirs[round].extend(parse_results(&run_capture(c, &format!("peer {script}"))?));
                    }
                    None => eprintln!(
                        "skipping peer {script}: no Python with TensorFlow (set RILL_PEER_PY or create ~/.rill-peer, see {})",
                        dir.join("README.md").display()
                    ),
                }
            }
        }
    }
    if theirs.iter().any(|t| !t.is_empty()) {
        println!("\n{:<45} {:>14} {:>14} {:>10}  unit", "workload", "rill", "peer", "rill/peer");
        for (ours_name, their_name, higher_better) in PAIRS {
            let mut unit = "";
            let pairs: Vec<(f64, f64)> = ours
                .iter()
                .zip(&theirs)
                .filter_map(|(o, t)| {
                    let (a, u) = o.get(*ours_name)?;
                    unit = u;
                    Some((*a, t.get(*their_name)?.0))
                })
                .collect();
            let Some(s) = Summary::of(&pairs) else { continue };
            let note = if *higher_better { "higher is better" } else { "lower is better" };
            let spread = if pairs.len() > 1 {
                format!("; ratios {:.3}–{:.3} over {} rounds", s.ratio_lo, s.ratio_hi, pairs.len())
            } else {
                String::new()
            };
            println!(
                "{ours_name:<45} {:>14.3} {:>14.3} {:>10.3}  {unit} ({note}; vs {}{spread})",
                s.ours,
                s.theirs,
                s.ratio,
                peer_label(their_name)
            );
        }
    }
    Ok(())
}

/// At most this many rounds (each runs every chosen program and its peers).
const ROUNDS_MAX: usize = 20;

type Results = BTreeMap<String, (f64, String)>;

/// Medians over rounds of (rill, peer) figures measured side by side, and of their ratios.
#[derive(Debug, PartialEq)]
struct Summary {
    ours: f64,
    theirs: f64,
    ratio: f64,
    ratio_lo: f64,
    ratio_hi: f64,
}

impl Summary {
    fn of(pairs: &[(f64, f64)]) -> Option<Summary> {
        let median = |mut v: Vec<f64>| -> Option<f64> {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            match n {
                0 => None,
                _ if n % 2 == 1 => Some(v[n / 2]),
                _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
            }
        };
        let ratios: Vec<f64> = pairs.iter().map(|(a, b)| a / b).collect();
        Some(Summary {
            ours: median(pairs.iter().map(|p| p.0).collect())?,
            theirs: median(pairs.iter().map(|p| p.1).collect())?,
            ratio: median(ratios.clone())?,
            ratio_lo: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratio_hi: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_results, Summary};

    #[test]
    fn rounds_give_medians_and_the_spread_of_per_round_ratios() {
        assert_eq!(Summary::of(&[]), None);
        let one = Summary::of(&[(3.0, 1.0)]).unwrap();
        assert_eq!((one.ours, one.theirs, one.ratio, one.ratio_lo, one.ratio_hi), (3.0, 1.0, 3.0, 3.0, 3.0));
        // The ratio is the median of the rounds' ratios, not the ratio of the medians.
        let s = Summary::of(&[(700.0, 200.0), (500.0, 250.0), (720.0, 240.0)]).unwrap();
        assert_eq!((s.ours, s.theirs), (700.0, 240.0));
        assert_eq!((s.ratio, s.ratio_lo, s.ratio_hi), (3.0, 2.0, 3.5));
        let even = Summary::of(&[(2.0, 1.0), (4.0, 1.0)]).unwrap();
        assert_eq!((even.ours, even.ratio), (3.0, 3.0));
    }

    #[test]
    fn parses_peer_and_rill_lines() {
        let r = parse_results(
            "# header\nRESULT c.noop_run[x] = 29,703 runs/s (33.7 us/run) [min 92%]\nRESULT m = 1.5 GB/s\nnoise\n",
        );
        assert_eq!(r["c.noop_run[x]"], (29703.0, "runs/s".to_string()));
        assert_eq!(r["m"], (1.5, "GB/s".to_string()));
        assert_eq!(r.len(), 2);
    }
}
