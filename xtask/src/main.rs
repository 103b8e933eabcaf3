//! `cargo xtask`: the project's task runner, in plain Rust with the standard library.
//!
//! - `cargo xtask ci`: format check, clippy with warnings denied, and the whole test suite.
//! - `cargo xtask demo`: the README's main job.
//! - `cargo xtask bench [--peer [DIR]] [--only NAME]`: benchmark programs, beside TensorFlow's.

mod bench;

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
    step("test", test)
}

fn demo(args: &[String]) -> Result<(), String> {
    let mut run = cargo();
    run.args(["run", "--release", "-p", "rill-tests", "--example", "readme", "--"]).args(args);
    step("demo", run)
}

fn usage() -> ExitCode {
    eprintln!("usage: cargo xtask <ci|demo|bench>");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { return usage() };
    let r = match cmd.as_str() {
        "ci" => ci(),
        "demo" => demo(&args[1..]),
        "bench" => bench::bench(&workspace_root(), &cargo, &args[1..]),
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
