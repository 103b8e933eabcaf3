//! `cargo xtask gpu-check`: the one short script for a machine with a GPU, in three forms.
//!
//! - `cargo xtask gpu-check`: builds the release binaries here and runs them.
//! - `cargo xtask gpu-check --build-only DIR`: builds them and copies them, stripped, with the
//!   PyTorch peer script, the digits data, this program and a `run.sh` into `DIR`, for a GPU
//!   machine without cargo: copy `DIR` there and run `DIR/run.sh` (which is
//!   `xtask gpu-check --prebuilt DIR`). Inside the repository, `target/gpu-check` is a good `DIR`.
//! - `xtask gpu-check --prebuilt DIR`: runs a bundle made by `--build-only`.
//!
//! The run, with "no GPU" turned into a failure (`RILL_REQUIRE_GPU=1`): the device-cuda tests;
//! the self-check (every GPU kernel against the CPU, cuBLAS and the tiled MatMul included);
//! `gpu_rules` (default and soft placement, memory fraction and growth on the real GPU);
//! `bench_gpu` and, in the same run, the PyTorch peer `bench_torch.py` (skipped with a note when
//! `python3` cannot import torch), printed side by side with the ratio and its target; the digits
//! MLP trained on GPU:0 to the accuracy target; a short synchronous between-graph training run on
//! the GPU. Every step has a deadline and the whole run a budget well inside ten minutes; the
//! summary at the end lists each part, and the exit status is non-zero when any step failed.
//! Benchmark targets (MatMul and pinned copies at ≥ 80% of PyTorch) are reported, not enforced.

use crate::{cargo, workspace_root};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The whole run's budget: the GPU machine is lent for minutes, and each command there may run
/// at most ten.
const BUDGET: Duration = Duration::from_secs(480);
/// A step is skipped (as failed) when less than this is left of the budget.
const STEP_MIN: Duration = Duration::from_secs(10);
/// Bytes of a step's output kept for the summary; the rest is only echoed.
const OUTPUT_KEEP_MAX: usize = 4 << 20;

/// Benchmark name, and the least rill/PyTorch ratio wanted (`None`: reported only).
const TARGETS: &[(&str, Option<f64>)] = &[
    ("gpu_matmul_f32_4096", Some(0.8)),
    ("gpu_matmul_f16_4096", Some(0.8)),
    ("gpu_h2d_pinned_256MiB", Some(0.8)),
    ("gpu_d2h_pinned_256MiB", Some(0.8)),
    ("gpu_mlp_train_steps[batch=128]", None),
];

/// Where the binaries and files of a run are.
struct Layout {
    tests: Vec<PathBuf>,
    gpu_check: PathBuf,
    bench_gpu: PathBuf,
    gpu_digits: PathBuf,
    gpu_rules: PathBuf,
    peer: PathBuf,
    /// `RILL_DIGITS_DIR` for a bundle; the compiled-in path otherwise.
    digits: Option<PathBuf>,
}

pub(crate) fn gpu_check(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        None => run(&build()?),
        Some("--build-only") => {
            let dir = args.get(1).ok_or("--build-only needs a directory")?;
            bundle(&build()?, Path::new(dir))
        }
        Some("--prebuilt") => {
            let dir = args.get(1).ok_or("--prebuilt needs a directory")?;
            run(&prebuilt(Path::new(dir))?)
        }
        Some(other) => {
            Err(format!("gpu-check: unknown argument {other:?} (--build-only DIR | --prebuilt DIR)"))
        }
    }
}

/// The value of `"key":"…"` in one line of cargo's JSON messages (paths and names here hold no
/// escaped quotes).
fn json_str(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].replace("\\\\", "\\"))
}

/// Runs a cargo build with `--message-format=json` and returns `(target name, executable)` of
/// every artifact with an executable; with `tests_only`, only test harnesses (`cargo test
/// --no-run` also builds the examples).
fn build_json(args: &[&str], tests_only: bool) -> Result<Vec<(String, PathBuf)>, String> {
    let mut c = cargo();
    c.args(args).args(["--release", "--message-format=json"]).stdout(Stdio::piped());
    eprintln!("== build: {c:?}");
    let out = c.output().map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("build failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter(|l| !tests_only || l.contains("\"test\":true"))
        .filter_map(|l| Some((json_str(l, "name")?, PathBuf::from(json_str(l, "executable")?))))
        .collect())
}

fn build() -> Result<Layout, String> {
    let tests = build_json(&["test", "-p", "rill-device-cuda", "--no-run"], true)?;
    let examples = build_json(
        &[
            "build",
            "-p",
            "rill-device-cuda",
            "-p",
            "rill-tests",
            "--example",
            "gpu_check",
            "--example",
            "bench_gpu",
            "--example",
            "gpu_digits",
            "--example",
            "gpu_rules",
        ],
        false,
    )?;
    let example = |name: &str| {
        examples
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .ok_or(format!("the build produced no example {name}"))
    };
    let root = workspace_root();
    Ok(Layout {
        tests: tests.into_iter().map(|(_, p)| p).collect(),
        gpu_check: example("gpu_check")?,
        bench_gpu: example("bench_gpu")?,
        gpu_digits: example("gpu_digits")?,
        gpu_rules: example("gpu_rules")?,
        peer: root.join("device-cuda/peer/bench_torch.py"),
        digits: None,
    })
}

/// Copies `from` to `to`, stripped of debug information where `strip` exists (a bundle must
/// travel in tens of MiB).
fn install(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to).map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    let stripped = Command::new("strip").arg("--strip-debug").arg(to).status();
    if !stripped.is_ok_and(|s| s.success()) {
        eprintln!("gpu-check: {} left unstripped (no working strip)", to.display());
    }
    Ok(())
}

const RUN_SH: &str = "#!/bin/sh\n\
# Runs the GPU check from this bundle (made by `cargo xtask gpu-check --build-only DIR`).\n\
here=$(cd \"$(dirname \"$0\")\" && pwd)\n\
exec \"$here/xtask\" gpu-check --prebuilt \"$here\"\n";

fn bundle(l: &Layout, dir: &Path) -> Result<(), String> {
    let mkdir = |d: &Path| std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()));
    let (bin, tests, digits) = (dir.join("bin"), dir.join("tests"), dir.join("digits"));
    // A stale bundle's test binaries must not run beside the new ones.
    if tests.exists() {
        std::fs::remove_dir_all(&tests).map_err(|e| format!("clearing {}: {e}", tests.display()))?;
    }
    for d in [dir, &bin, &tests, &digits] {
        mkdir(d)?;
    }
    for t in &l.tests {
        let name = t.file_name().ok_or(format!("test binary without a name: {}", t.display()))?;
        install(t, &tests.join(name))?;
    }
    for (p, name) in [
        (&l.gpu_check, "gpu_check"),
        (&l.bench_gpu, "bench_gpu"),
        (&l.gpu_digits, "gpu_digits"),
        (&l.gpu_rules, "gpu_rules"),
    ] {
        install(p, &bin.join(name))?;
    }
    let me = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    install(&me, &dir.join("xtask"))?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).map(|_| ()).map_err(|e| format!("copying {}: {e}", from.display()))
    };
    copy(&l.peer, &dir.join("bench_torch.py"))?;
    let data = workspace_root().join("train/data/digits");
    for e in std::fs::read_dir(&data).map_err(|e| format!("reading {}: {e}", data.display()))? {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.is_file() {
            copy(&p, &digits.join(p.file_name().unwrap_or_default()))?;
        }
    }
    let run_sh = dir.join("run.sh");
    std::fs::write(&run_sh, RUN_SH).map_err(|e| format!("writing {}: {e}", run_sh.display()))?;
    make_executable(&run_sh)?;
    let size: u64 = walk(dir).iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum();
    eprintln!(
        "gpu-check: bundle in {} ({} MiB); run {}/run.sh on the GPU machine",
        dir.display(),
        size >> 20,
        dir.display()
    );
    Ok(())
}

fn make_executable(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", p.display()))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn prebuilt(dir: &Path) -> Result<Layout, String> {
    let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
    let need = |p: PathBuf| {
        if p.exists() {
            Ok(p)
        } else {
            Err(format!("{} is missing from the bundle", p.display()))
        }
    };
    let mut tests: Vec<PathBuf> = walk(&dir.join("tests"));
    tests.sort();
    if tests.is_empty() {
        return Err(format!("no test binaries in {}", dir.join("tests").display()));
    }
    Ok(Layout {
        tests,
        gpu_check: need(dir.join("bin/gpu_check"))?,
        bench_gpu: need(dir.join("bin/bench_gpu"))?,
        gpu_digits: need(dir.join("bin/gpu_digits"))?,
        gpu_rules: need(dir.join("bin/gpu_rules"))?,
        peer: need(dir.join("bench_torch.py"))?,
        digits: Some(need(dir.join("digits"))?),
    })
}

/// What one step printed and how it ended.
struct Outcome {
    ok: bool,
    /// "exit status: 0", "timed out after 120 s", "cannot start: …".
    how: String,
    lines: Vec<String>,
}

/// Runs `c`, echoing its output as it comes and keeping it, and kills it at `limit` (the child
/// is ours; it is killed by its handle, never by name).
fn run_step(name: &str, mut c: Command, limit: Duration) -> Outcome {
    eprintln!("== {name} (limit {} s): {c:?}", limit.as_secs());
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => return Outcome { ok: false, how: format!("cannot start: {e}"), lines: Vec::new() },
    };
    let kept = Arc::new(Mutex::new((Vec::<String>::new(), 0usize)));
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| {
        let kept = kept.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                println!("  | {line}");
                let mut k = kept.lock().unwrap_or_else(|e| e.into_inner());
                if k.1 + line.len() <= OUTPUT_KEEP_MAX {
                    k.1 += line.len();
                    k.0.push(line);
                }
            }
        })
    })
    .collect();
    let start = Instant::now();
    let how = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if start.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {:.0} s", limit.as_secs_f64()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("waiting: {e}")),
        }
    };
    for r in readers {
        let _ = r.join();
    }
    let lines = std::mem::take(&mut kept.lock().unwrap_or_else(|e| e.into_inner()).0);
    match how {
        Ok(s) => Outcome { ok: s.success(), how: s.to_string(), lines },
        Err(how) => Outcome { ok: false, how, lines },
    }
}

/// `RESULT name = value unit …` lines: name → (value, unit).
fn results(lines: &[String]) -> BTreeMap<String, (f64, String)> {
    let mut out = BTreeMap::new();
    for l in lines {
        let Some(rest) = l.trim().strip_prefix("RESULT ") else { continue };
        let Some((name, value)) = rest.split_once(" = ") else { continue };
        let mut parts = value.split_whitespace();
        if let (Some(Ok(v)), Some(unit)) = (parts.next().map(str::parse::<f64>), parts.next()) {
            out.insert(name.trim().to_string(), (v, unit.to_string()));
        }
    }
    out
}

/// Sums libtest's `test result: ok. P passed; F failed; I ignored; …` lines.
fn test_counts(lines: &[String]) -> (u64, u64, u64) {
    let (mut p, mut f, mut i) = (0, 0, 0);
    for l in lines.iter().filter_map(|l| l.strip_prefix("test result: ")) {
        for part in l.split(';') {
            let mut w = part.split_whitespace().rev();
            let (Some(word), Some(n)) = (w.next(), w.next()) else { continue };
            let n: u64 = n.parse().unwrap_or(0);
            match word {
                "passed" => p += n,
                "failed" => f += n,
                "ignored" => i += n,
                _ => {}
            }
        }
    }
    (p, f, i)
}

fn find_line(lines: &[String], f: impl Fn(&str) -> bool) -> Option<&str> {
    lines.iter().map(|l| l.trim()).find(|l| f(l))
}

/// Why a failed step failed: its status and its first `FAIL` line, or its first panic with the
/// message on the line after.
fn failure(o: &Outcome) -> String {
    let l = &o.lines;
    let why =
        l.iter().position(|x| x.trim().starts_with("FAIL")).map(|i| l[i].trim().to_string()).or_else(|| {
            let i = l.iter().position(|x| x.contains("panicked at"))?;
            Some(format!("{} {}", l[i].trim(), l.get(i + 1).map_or("", |m| m.trim())))
        });
    match why {
        Some(w) => format!("{} ({w})", o.how),
        None => o.how.clone(),
    }
}

fn run(l: &Layout) -> Result<(), String> {
    let end = Instant::now() + BUDGET;
    let mut failed: Vec<String> = Vec::new();
    let mut summary: Vec<String> = Vec::new();
    let step = |name: &str, c: Command, limit_s: u64, failed: &mut Vec<String>| -> Outcome {
        let left = end.saturating_duration_since(Instant::now());
        if left < STEP_MIN {
            failed.push(name.to_string());
            return Outcome {
                ok: false,
                how: "skipped: the run's time budget is spent".into(),
                lines: Vec::new(),
            };
        }
        let o = run_step(name, c, Duration::from_secs(limit_s).min(left));
        if !o.ok {
            failed.push(name.to_string());
        }
        o
    };
    let gpu = |p: &Path| {
        let mut c = Command::new(p);
        c.env("RILL_REQUIRE_GPU", "1");
        if let Some(d) = &l.digits {
            c.env("RILL_DIGITS_DIR", d);
        }
        c
    };

    let (mut tp, mut tf, mut ti) = (0, 0, 0);
    let mut test_notes = Vec::new();
    for t in &l.tests {
        let name = t.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let o = step(&format!("tests {name}"), gpu(t), 120, &mut failed);
        let (p, f, i) = test_counts(&o.lines);
        (tp, tf, ti) = (tp + p, tf + f, ti + i);
        if !o.ok {
            test_notes.push(format!("{name}: {}", failure(&o)));
        }
    }
    summary.push(format!(
        "tests: {tp} passed, {tf} failed, {ti} ignored in {} binaries {}",
        l.tests.len(),
        test_notes.join("; ")
    ));

    let o = step("self-check", gpu(&l.gpu_check), 120, &mut failed);
    let counts = find_line(&o.lines, |l| l.ends_with("failed") && l.contains(" checks, "))
        .unwrap_or("no count printed");
    let matmul = find_line(&o.lines, |l| l.starts_with("device ") && l.contains("matmul: "))
        .and_then(|l| l.split("matmul: ").nth(1))
        .unwrap_or("unknown");
    let copies = results(&o.lines);
    let copy = |k: &str| copies.get(k).map_or("-".to_string(), |(v, u)| format!("{v:.1} {u}"));
    summary.push(format!(
        "self-check: {counts}{}; matmul: {matmul}; staging copies h2d {}, d2h {}",
        if o.ok { "" } else { " — FAILED" },
        copy("h2d_copy"),
        copy("d2h_copy")
    ));

    let o = step("placement and memory rules", gpu(&l.gpu_rules), 60, &mut failed);
    let counts = find_line(&o.lines, |l| l.ends_with("failed") && l.contains(" rules, "))
        .unwrap_or("no count printed");
    let mut notes: Vec<&str> = o.lines.iter().map(|l| l.trim()).filter(|l| l.starts_with("FAIL")).collect();
    if !o.ok {
        notes.push(&o.how);
    }
    summary.push(format!(
        "placement and memory rules: {counts}{}",
        if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) }
    ));

    let o = step("bench_gpu", gpu(&l.bench_gpu), 150, &mut failed);
    let ours = results(&o.lines);
    if !o.ok {
        summary.push(format!("bench_gpu failed: {}", failure(&o)));
    }
    let mut py = Command::new("python3");
    py.arg(&l.peer);
    let p = step("PyTorch peer", py, 150, &mut Vec::new());
    let peer = results(&p.lines);
    let peer_note = if p.ok {
        find_line(&p.lines, |l| l.starts_with("peer:")).unwrap_or("peer ran").to_string()
    } else {
        let why = find_line(&p.lines, |l| l.starts_with("peer skipped")).map(str::to_string);
        format!("PyTorch peer not measured: {}", why.unwrap_or_else(|| failure(&p)))
    };
    summary.push(format!("benchmarks ({peer_note}):"));
    summary.push(format!("  {:<34} {:>10} {:>10} {:>7}  {}", "name", "rill", "PyTorch", "ratio", "target"));
    for &(name, target) in TARGETS {
        let r = ours.get(name);
        let t = peer.get(name);
        let ratio = match (r, t) {
            (Some((a, _)), Some((b, _))) if *b > 0.0 => Some(a / b),
            _ => None,
        };
        let verdict = match (target, ratio) {
            (None, _) => "-".to_string(),
            (Some(want), Some(x)) => format!(">= {want:.2}: {}", if x >= want { "met" } else { "MISSED" }),
            (Some(want), None) => format!(">= {want:.2}: not measured"),
        };
        let unit = r.or(t).map_or(String::new(), |(_, u)| format!(" ({u})"));
        let fmt = |v: Option<&(f64, String)>| v.map_or("-".to_string(), |(v, _)| format!("{v:.2}"));
        summary.push(format!(
            "  {:<34} {:>10} {:>10} {:>7}  {verdict}",
            format!("{name}{unit}"),
            fmt(r),
            fmt(t),
            ratio.map_or("-".to_string(), |x| format!("{x:.2}"))
        ));
    }

    let mut digits = gpu(&l.gpu_digits);
    digits.arg("local");
    let o = step("digits on GPU:0", digits, 120, &mut failed);
    let acc = results(&o.lines).get("gpu_digits_test_accuracy").map(|(v, _)| *v);
    summary.push(format!(
        "digits on GPU:0: test accuracy {} (target 0.95): {}",
        acc.map_or("-".to_string(), |a| format!("{a:.4}")),
        if o.ok { "PASS".to_string() } else { format!("FAIL {}", failure(&o)) }
    ));

    let mut sync = gpu(&l.gpu_digits);
    sync.arg("sync");
    let o = step("sync training on GPU", sync, 170, &mut failed);
    let r = results(&o.lines);
    let rate = r.get("gpu_sync_training_steps").map_or("-".to_string(), |(v, u)| format!("{v:.1} {u}"));
    let acc = r.get("gpu_sync_test_accuracy").map_or("-".to_string(), |(v, _)| format!("{v:.4}"));
    summary.push(format!(
        "sync training (1 ps + 2 workers, GPUs): {rate}, test accuracy {acc}: {}",
        if o.ok { "PASS".to_string() } else { format!("FAIL {}", failure(&o)) }
    ));

    println!("\n== gpu-check summary");
    for s in &summary {
        println!("{s}");
    }
    if failed.is_empty() {
        println!("gpu-check: PASS");
        Ok(())
    } else {
        println!("gpu-check: FAIL ({})", failed.join(", "));
        Err(format!("gpu-check failed: {}", failed.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn result_lines_parse_with_and_without_extras() {
        let r = results(&lines(
            "device GPU:0\n\
             RESULT gpu_matmul_f32_4096 = 51.234 TFLOP/s [min 99% max 101% of median, n=7]\n\
             RESULT gpu_mlp_train_steps[batch=128] = 812.000 steps/s (1.23 ms/step)\n\
             RESULT broken = x GB/s\n\
             RESULT no_unit = 3\n\
             not a RESULT line = 4 GB/s",
        ));
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r["gpu_matmul_f32_4096"], (51.234, "TFLOP/s".to_string()));
        assert_eq!(r["gpu_mlp_train_steps[batch=128]"], (812.0, "steps/s".to_string()));
    }

    #[test]
    fn libtest_counts_add_up_over_binaries() {
        let l = lines(
            "test result: ok. 16 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.02s\n\
             test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
             test foo ... ok",
        );
        assert_eq!(test_counts(&l), (19, 1, 2));
        assert_eq!(test_counts(&[]), (0, 0, 0));
    }

    #[test]
    fn cargo_json_fields() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/device-cuda#0.1.0","target":{"kind":["test"],"name":"cuda","src_path":"/w/device-cuda/tests/cuda.rs"},"profile":{"test":true},"executable":"/t/release/deps/cuda-0123"}"#;
        assert_eq!(json_str(line, "name").as_deref(), Some("cuda"));
        assert_eq!(json_str(line, "executable").as_deref(), Some("/t/release/deps/cuda-0123"));
        assert_eq!(json_str(r#"{"executable":null}"#, "executable"), None);
    }

    #[test]
    fn a_failure_names_its_cause() {
        let o = Outcome {
            ok: false,
            how: "exit status: 101".into(),
            lines: lines("running 3 tests\nthread 'x' panicked at a.rs:1:2:\nboom\nmore"),
        };
        assert_eq!(failure(&o), "exit status: 101 (thread 'x' panicked at a.rs:1:2: boom)");
        let o = Outcome {
            ok: false,
            how: "exit status: 1".into(),
            lines: lines("ok\nFAIL digits: 0.5\nFAIL later"),
        };
        assert_eq!(failure(&o), "exit status: 1 (FAIL digits: 0.5)");
    }

    #[test]
    fn a_step_past_its_limit_is_killed() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let t0 = Instant::now();
        let o = run_step("sleeper", c, Duration::from_millis(300));
        assert!(!o.ok && o.how.starts_with("timed out"), "{}", o.how);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}
