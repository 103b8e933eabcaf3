//! Dense compute, the workloads of the peer script `bench_dense.py`: MatMul f32 1024² and 2048²
//! (GFLOP/s) and Add of two 16M-float tensors (GB/s, the bytes of all three tensors), operands in
//! variables, the result op run as a target. `bench_dense [INTRA]`, INTRA defaults to 2.

use rill_graph::{DirectSession, Graph, Output, RunOptions, Session, SessionOptions};
use rill_tests::{bench, line, median, spread};

fn session(g: &Graph, intra: usize) -> rill_graph::Result<DirectSession> {
    let rt = rill_train::standard_runtime();
    let opts = SessionOptions {
        inter_op_parallelism_threads: 2,
        intra_op_parallelism_threads: intra,
        ..Default::default()
    };
    let init = g.global_variables_initializer();
    let s = DirectSession::new(g, &rt, opts)?;
    s.run(&[], &[], &[init], &RunOptions::default())?;
    Ok(s)
}

fn two_vars(g: &Graph, shape: &[usize]) -> (Output, Output) {
    let s = rill_graph::Shape::new(shape).expect("small rank");
    (g.variable("a", g.random_normal(s, 1.0, 1)), g.variable("b", g.random_normal(s, 1.0, 2)))
}

fn matmul(n: usize, intra: usize) -> rill_graph::Result<()> {
    let g = Graph::new();
    let (a, b) = two_vars(&g, &[n, n]);
    let c = g.matmul(a, b);
    let s = session(&g, intra)?;
    let ro = RunOptions::default();
    let inner = if n <= 1024 { 20 } else { 4 };
    let ts = bench(|| drop(s.run(&[], &[], &[c], &ro).expect("matmul runs")), inner, 7);
    let m = median(&ts);
    let gf = 2.0 * (n as f64).powi(3) / m / 1e9;
    line(
        &format!("matmul_f32_{n}[intra={intra}]"),
        gf,
        "GFLOP/s",
        &format!("({:.2} ms/run) {}", m * 1e3, spread(&ts)),
    );
    Ok(())
}

fn add16m(intra: usize) -> rill_graph::Result<()> {
    let n = 16 * 1024 * 1024;
    let g = Graph::new();
    let (a, b) = two_vars(&g, &[n]);
    let c = g.add(a, b);
    let s = session(&g, intra)?;
    let ro = RunOptions::default();
    let ts = bench(|| drop(s.run(&[], &[], &[c], &ro).expect("add runs")), 20, 11);
    let m = median(&ts);
    let moved = 3.0 * 4.0 * n as f64;
    line(
        &format!("add_f32_16M[intra={intra}]"),
        moved / m / 1e9,
        "GB/s",
        &format!("(3x64MiB moved; {:.2} ms/run) {}", m * 1e3, spread(&ts)),
    );
    Ok(())
}

fn main() -> rill_graph::Result<()> {
    let intra = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    matmul(1024, intra)?;
    matmul(2048, intra)?;
    add16m(intra)
}
