//! `cargo xtask gpu-check`: the one short script for a machine with a GPU.

use crate::{cargo, step};

/// Builds, runs the GPU tests with "no GPU" turned into a failure, then the self-check program
/// (every GPU kernel against the CPU, copy bandwidth), and prints a summary.
pub(crate) fn gpu_check() -> Result<(), String> {
    let mut test = cargo();
    test.env("RILL_REQUIRE_GPU", "1").args(["test", "--release", "-p", "rill-device-cuda"]);
    let tests = step("gpu tests", test);
    let mut check = cargo();
    check.env("RILL_REQUIRE_GPU", "1").args([
        "run",
        "--release",
        "-p",
        "rill-device-cuda",
        "--example",
        "gpu_check",
    ]);
    let checks = step("gpu self-check", check);
    eprintln!("== gpu-check summary: tests {:?}, self-check {:?}", tests, checks);
    tests.and(checks)
}
