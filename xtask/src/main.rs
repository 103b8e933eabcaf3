//! `cargo xtask`: the project's task runner, in plain Rust with the standard library.
//!
//! - `cargo xtask ci`: format check, clippy with warnings denied, the whole test suite, then the
//!   loopback tier of `cluster-test`.
//! - `cargo xtask demo [--workers N] [--ps N] [--mode sync|async] [--steps N] [--model mlp|cnn]`:
//!   the README's main job, a local cluster training the digits model.
//! - `cargo xtask cluster-test [--only a,b] [--release] [--netns] [--cluster-file F | --from-env]
//!   [--secret-file F]`: a deployment's acceptance test on local clusters of `rill` processes (or
//!   the client-side checks against a cluster the user started), printed as a table.
//! - `cargo xtask bench [--peer [DIR]] [--only NAME] [--rounds N]`: benchmark programs, beside TensorFlow's.
//! - `cargo xtask gpu-check [--build-only DIR]`: the one script for a machine with a GPU ("no GPU"
//!   is a failure); `--build-only` makes a bundle for a GPU machine without cargo (`DIR/run.sh`).
//! - `cargo xtask ptx`: regenerates the committed PTX from `device-cuda/cuda/*.cu`.

mod bench;
mod cluster_test;
mod demo;
mod gpu_check;
mod procs;

use std::process::{Command, ExitCode};

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn workspace_root() -> std::path::PathBuf {
    let here = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(|p| p.to_path_buf()).unwrap_or(here)
}

/// Runs a command, echoing it; `Err` names the step that failed.
pub(crate) fn step(name: &str, mut c: Command) -> Result<(), String> {
    eprintln!("== {name}: {c:?}");
    let status = c.status().map_err(|e| format!("{name}: cannot start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed ({status})"))
    }
}

fn ci() -> Result<(), String> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    step("fmt", fmt)?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    step("clippy", clippy)?;
    let mut test = cargo();
    test.args(["test", "--workspace"]);
    step("test", test)?;
    eprintln!("== cluster-test (loopback tier)");
    cluster_test::cluster_test(&workspace_root(), &cargo, &[])
}

fn ptx() -> Result<(), String> {
    let mut c = Command::new("bash");
    c.current_dir(workspace_root()).arg("device-cuda/cuda/build_ptx.sh");
    step("ptx", c)
}

fn usage() -> ExitCode {
    eprintln!("usage: cargo xtask <ci|demo|cluster-test|bench|gpu-check|ptx>");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { return usage() };
    let r = match cmd.as_str() {
        "ci" => ci(),
        "demo" => demo::demo(&workspace_root(), &cargo, &args[1..]),
        "cluster-test" => cluster_test::cluster_test(&workspace_root(), &cargo, &args[1..]),
        "bench" => bench::bench(&workspace_root(), &cargo, &args[1..]),
        "gpu-check" => gpu_check::gpu_check(&args[1..]),
        "ptx" => ptx(),
        _ => return usage(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
