//! Executor overhead, the workloads of the peer script `bench_executor.py`: a chain of 1000 scalar
//! Adds, 1000 independent Adds (fetched, or run as one group), `run` of a no-op and of one tiny Add.

use rill_graph::{DirectSession, Graph, RunOptions, Session, SessionOptions, Tensor};
use rill_tests::{bench, line, median, spread};

const N: usize = 1000;

fn main() -> rill_graph::Result<()> {
    let g = Graph::new();
    let v = g.variable("v", g.constant(Tensor::scalar(1f32)));
    let start = g.identity(v);
    let one = g.constant_named("one", Tensor::scalar(1f32));
    let mut x = start;
    for _ in 0..N {
        x = g.add(x, one);
    }
    let chain = x;
    let wide: Vec<_> = (0..N).map(|_| g.add(start, one)).collect();
    let wide_group = g.group("wide_group", &wide);
    let noop = g.no_op("noop");
    let tiny = g.add(start, g.scalar(1f32));
    let init = g.global_variables_initializer();

    let rt = rill_train::standard_runtime();
    let opts = SessionOptions {
        inter_op_parallelism_threads: 2,
        intra_op_parallelism_threads: 2,
        ..Default::default()
    };
    let s = DirectSession::new(&g, &rt, opts)?;
    let ro = RunOptions::default();
    s.run(&[], &[], &[init], &ro)?;
    let got = s.run(&[], &[chain], &[], &ro)?[0].scalar_value::<f32>()?;
    assert!((got - (1.0 + N as f32)).abs() < 1e-3, "chain computes {got}");

    let tag = "inter_op=2";
    let noop_t = bench(|| drop(s.run(&[], &[], &[noop], &ro).unwrap()), 20000, 11);
    let tiny_t = bench(|| drop(s.run(&[], &[tiny], &[], &ro).unwrap()), 20000, 11);
    let chain_f = bench(|| drop(s.run(&[], &[chain], &[], &ro).unwrap()), 500, 9);
    let chain_t = bench(|| drop(s.run(&[], &[], &[chain], &ro).unwrap()), 500, 9);
    let wide_f = bench(|| drop(s.run(&[], &wide, &[], &ro).unwrap()), 200, 7);
    let wide_t = bench(|| drop(s.run(&[], &[], &[wide_group], &ro).unwrap()), 500, 9);
    let (mn, mt, mc, mct) = (median(&noop_t), median(&tiny_t), median(&chain_f), median(&chain_t));
    line(
        &format!("c.noop_run[{tag}]"),
        1.0 / mn,
        "runs/s",
        &format!("({:.2} us/run) {}", mn * 1e6, spread(&noop_t)),
    );
    line(
        &format!("c.tiny_add_fetch_run[{tag}]"),
        1.0 / mt,
        "runs/s",
        &format!("({:.2} us/run) {}", mt * 1e6, spread(&tiny_t)),
    );
    line(
        &format!("a.chain{N}_fetch_last_run[{tag}]"),
        mc * 1e6,
        "us/run",
        &format!(
            "({:.0} ns/op gross; net of 1-add fetch run: {:.0} ns/op) {}",
            mc / N as f64 * 1e9,
            (mc - mt) / (N - 1) as f64 * 1e9,
            spread(&chain_f)
        ),
    );
    line(
        &format!("a.chain{N}_target_run[{tag}]"),
        mct * 1e6,
        "us/run",
        &format!(
            "({:.0} ns/op gross; net of no-op run: {:.0} ns/op) {}",
            mct / N as f64 * 1e9,
            (mct - mn) / N as f64 * 1e9,
            spread(&chain_t)
        ),
    );
    let mw = median(&wide_f);
    line(
        &format!("b.wide{N}_fetch_all_run[{tag}]"),
        mw * 1e6,
        "us/run",
        &format!("({:.0} ns/op incl. {N} fetches) {}", mw / N as f64 * 1e9, spread(&wide_f)),
    );
    let mg = median(&wide_t);
    line(
        &format!("b.wide{N}_group_target_run[{tag}]"),
        mg * 1e6,
        "us/run",
        &format!("({:.0} ns/op, no fetch) {}", mg / N as f64 * 1e9, spread(&wide_t)),
    );
    Ok(())
}
