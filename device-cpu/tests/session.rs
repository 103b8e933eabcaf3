//! Local sessions end to end: deadlines and cancellation, isolation of sessions, control
//! dependencies, partitioning over several CPU devices, traces, panicking kernels, and the
//! work-stealing pool under contention.

use rill_device_cpu::cpu_runtime;
use rill_graph::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn out_f32(_: &InferCtx) -> Result<Vec<TensorInfo>> {
    Ok(vec![TensorInfo::new(DType::F32, PartialShape::scalar())])
}

fn same_as_input(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    Ok(vec![c.inputs[0].clone()])
}

static WAIT_FOREVER: OpDef =
    OpDef { name: "TestWaitForever", infer: out_f32, ref_inputs: &[], stateful: true };
static PANIC: OpDef = OpDef { name: "TestPanic", infer: out_f32, ref_inputs: &[], stateful: true };
static COUNT: OpDef = OpDef { name: "TestCount", infer: same_as_input, ref_inputs: &[], stateful: true };
static WHERE: OpDef = OpDef { name: "TestWhere", infer: same_as_input, ref_inputs: &[], stateful: true };
static TEST_OPS: [OpDef; 0] = [];

/// Waits until its step is cancelled, then fails with the cancellation's reason.
struct WaitForever;
impl AsyncOpKernel for WaitForever {
    fn compute_async(&self, ctx: AsyncKernelContext, done: AsyncDone) {
        let done = std::sync::Mutex::new(Some(done));
        let token = ctx.step.cancellation.register(move |e| {
            if let Some(d) = done.lock().unwrap().take() {
                d(Err(e.clone()))
            }
        });
        assert!(token.is_some(), "step not yet cancelled");
    }
}

struct Panics;
impl OpKernel for Panics {
    fn compute(&self, _: &mut OpKernelContext<'_>) -> Result<()> {
        panic!("deliberate")
    }
}

static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
struct Count;
impl OpKernel for Count {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        EXECUTIONS.fetch_add(1, Ordering::Relaxed);
        let t = ctx.input(0)?.clone();
        ctx.set_output(0, t);
        Ok(())
    }
}

/// Where each `TestWhere` ran: its input's bytes and its thread.
static RAN_ON: std::sync::Mutex<Vec<(usize, std::thread::ThreadId)>> = std::sync::Mutex::new(Vec::new());
struct Where;
impl OpKernel for Where {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let t = ctx.input(0)?.clone();
        RAN_ON.lock().unwrap().push((t.byte_size(), std::thread::current().id()));
        ctx.set_output(0, t);
        Ok(())
    }
}

static TEST_KERNELS: &[KernelDef] = &[
    KernelDef::new("TestWhere", "CPU", |_| Ok(Kernel::cheap(Where))),
    KernelDef::new("TestWaitForever", "CPU", |_| Ok(Kernel::asynchronous(WaitForever))),
    KernelDef::new("TestPanic", "CPU", |_| Ok(Kernel::expensive(Panics))),
    KernelDef::new("TestCount", "CPU", |_| Ok(Kernel::cheap(Count))),
];

fn runtime() -> Runtime {
    let mut rt = cpu_runtime().with_kernels(TEST_KERNELS).with_ops(&TEST_OPS);
    rt.ops.add(std::slice::from_ref(&WAIT_FOREVER));
    rt.ops.add(std::slice::from_ref(&PANIC));
    rt.ops.add(std::slice::from_ref(&COUNT));
    rt.ops.add(std::slice::from_ref(&WHERE));
    rt
}

fn opts() -> RunOptions {
    RunOptions::default()
}

#[test]
fn deadline_exceeded_then_session_still_usable() {
    let g = Graph::new();
    let w = g.custom(&WAIT_FOREVER, "wait", &[], attrs! {});
    let v = g.variable("v", g.scalar(1f32));
    let init = g.global_variables_initializer();
    let rt = runtime();
    let sess = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    let t0 = Instant::now();
    let e = sess.run(&[], &[w], &[], &RunOptions { timeout_in_ms: 100, ..opts() }).unwrap_err();
    assert_eq!(e.code, Code::DeadlineExceeded, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The session keeps working after a timed-out step.
    sess.run(&[], &[], &[init], &opts()).unwrap();
    assert_eq!(sess.run(&[], &[v], &[], &opts()).unwrap()[0].scalar_value::<f32>().unwrap(), 1.0);
    // The session-wide operation timeout applies when the run sets none.
    let sess2 =
        DirectSession::new(&g, &rt, SessionOptions { operation_timeout_in_ms: 50, ..Default::default() })
            .unwrap();
    assert_eq!(sess2.run(&[], &[w], &[], &opts()).unwrap_err().code, Code::DeadlineExceeded);
}

#[test]
fn sessions_do_not_share_variables() {
    let g = Graph::new();
    let v = g.variable("v", g.scalar(5f32));
    let init = g.global_variables_initializer();
    let bump = g.assign_add(v, g.scalar(1f32));
    let rt = runtime();
    let s1 = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    let s2 = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    s1.run(&[], &[], &[init], &opts()).unwrap();
    s1.run(&[], &[], &[bump], &opts()).unwrap();
    assert_eq!(s1.run(&[], &[v], &[], &opts()).unwrap()[0].scalar_value::<f32>().unwrap(), 6.0);
    let e = s2.run(&[], &[v], &[], &opts()).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert!(e.msg.contains("uninitialized value v"), "{e}");
}

#[test]
fn control_dependencies_order_side_effects() {
    // read after the update when it depends on it; the fetched value is a snapshot.
    let g = Graph::new();
    let v = g.variable("v", g.scalar(0f32));
    let init = g.global_variables_initializer();
    let up = g.assign_add(v, g.scalar(10f32));
    let read_after = g.with_control_dependencies(&[up], |g| g.identity(v));
    let rt = runtime();
    let s = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    s.run(&[], &[], &[init], &opts()).unwrap();
    for k in 1..=5 {
        let got = s.run(&[], &[read_after], &[], &opts()).unwrap()[0].scalar_value::<f32>().unwrap();
        assert_eq!(got, 10.0 * k as f32);
    }
}

#[test]
fn several_cpu_devices_give_the_same_results() {
    let build = |devices: usize| {
        let g = Graph::new();
        let x = g.placeholder("x", DType::F32, [Some(4)]);
        let mut acc = x;
        let mut vars = Vec::new();
        for i in 0..6 {
            let d = format!("/cpu:{}", i % devices);
            acc = g.with_device(d.as_str(), |g| {
                let v = g.variable(&format!("v{i}"), g.constant(Tensor::vector(&[i as f32; 4])));
                vars.push(v);
                let up = g.assign_add(v, acc);
                g.identity(up)
            });
        }
        let init = g.global_variables_initializer();
        let rt = runtime();
        let so = SessionOptions {
            device_count: [("CPU".to_string(), devices)].into_iter().collect(),
            inter_op_parallelism_threads: 2,
            ..Default::default()
        };
        let s = DirectSession::new(&g, &rt, so).unwrap();
        assert_eq!(s.list_devices().unwrap().len(), devices);
        s.run(&[], &[], &[init], &opts()).unwrap();
        let mut md = RunMetadata::default();
        let feed = Tensor::vector(&[1f32, 2.0, 3.0, 4.0]);
        let out = s
            .run_with_metadata(
                &[(x, feed)],
                &[acc],
                &[],
                &RunOptions { output_partition_graphs: true, ..opts() },
                Some(&mut md),
            )
            .unwrap();
        assert_eq!(md.partition_graphs.len(), devices);
        out[0].to_vec::<f32>().unwrap()
    };
    let one = build(1);
    assert_eq!(one, build(3));
    assert_eq!(one, vec![16.0, 17.0, 18.0, 19.0], "x + 0 + 1 + ... + 5");
}

#[test]
fn an_error_in_one_partition_ends_the_step_at_once() {
    // CPU:1's partition is all cheap nodes (run in one go, without the scheduler); its read of an
    // uninitialised variable must end the step, not leave CPU:0 waiting for the value.
    let g = Graph::new();
    let read = g.with_device("/cpu:1", |g| {
        let v = g.variable("never_initialised", g.constant(Tensor::scalar(1f32)));
        g.identity(v)
    });
    let so =
        SessionOptions { device_count: [("CPU".to_string(), 2)].into_iter().collect(), ..Default::default() };
    let s = DirectSession::new(&g, &runtime(), so).unwrap();
    let t = Instant::now();
    let e =
        s.run(&[], &[read], &[], &RunOptions { timeout_in_ms: 10_000, ..Default::default() }).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "the step waited {:?} for its deadline", t.elapsed());
}

#[test]
fn a_trace_is_produced() {
    let g = Graph::new();
    let v = g.variable("v", g.scalar(0f32));
    let init = g.global_variables_initializer();
    let rt = runtime();
    let s = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    let mut md = RunMetadata::default();
    s.run_with_metadata(
        &[],
        &[],
        &[init],
        &RunOptions { trace_level: TraceLevel::FullTrace, ..opts() },
        Some(&mut md),
    )
    .unwrap();
    assert!(md.step_stats.nodes.iter().any(|n| n.node == "v/Assign" && n.op == "Assign"));
    let dir = std::env::temp_dir().join(format!("rill-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.json");
    md.write_chrome_trace(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("{\"traceEvents\":["), "{text}");
    assert!(text.contains("\"ph\":\"X\"") && text.contains("v/Assign"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
    let _ = v;
}

#[test]
fn a_panicking_kernel_fails_its_step_with_internal() {
    let g = Graph::new();
    let p = g.custom(&PANIC, "boom", &[], attrs! {});
    let c = g.scalar(3f32);
    let rt = runtime();
    let s = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    for _ in 0..3 {
        let e = s.run(&[], &[p], &[], &opts()).unwrap_err();
        assert_eq!(e.code, Code::Internal, "{e}");
        assert!(e.msg.contains("boom") && e.msg.contains("deliberate"), "{e}");
    }
    // The pool survived.
    assert_eq!(s.run(&[], &[c], &[], &opts()).unwrap()[0].scalar_value::<f32>().unwrap(), 3.0);
}

#[test]
fn feeds_and_fetch_errors() {
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [Some(2)]);
    let y = g.identity(x);
    let rt = runtime();
    let s = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    let e = s.run(&[], &[y], &[], &opts()).unwrap_err();
    assert!(e.msg.contains("You must feed a value for placeholder tensor 'x'"), "{e}");
    let e = s.run(&[(x, Tensor::vector(&[1i32, 2]))], &[y], &[], &opts()).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    let e = s.run(&[(x, Tensor::vector(&[1f32, 2., 3.]))], &[y], &[], &opts()).unwrap_err();
    assert!(e.msg.contains("shape"), "{e}");
    let ok = s.run(&[(x, Tensor::vector(&[1f32, 2.]))], &[y, x], &[], &opts()).unwrap();
    assert_eq!(ok[0], ok[1]);
    let later = g.identity(y);
    assert_eq!(s.run(&[], &[later], &[], &opts()).unwrap_err().code, Code::FailedPrecondition);
}

#[test]
fn work_stealing_under_contention_runs_each_node_once() {
    const THREADS: usize = 6;
    const STEPS: usize = 40;
    const WIDTH: usize = 25;
    let g = Graph::new();
    let x = g.scalar(1f32);
    let mut outs = Vec::new();
    for _ in 0..WIDTH {
        let mut a = x;
        for _ in 0..4 {
            a = g.custom(&COUNT, "c", &[a], attrs! {});
        }
        outs.push(a);
    }
    let all = g.group("all", &outs);
    let rt = runtime();
    let s = Arc::new(
        DirectSession::new(&g, &rt, SessionOptions { inter_op_parallelism_threads: 2, ..Default::default() })
            .unwrap(),
    );
    s.run(&[], &[], &[all], &opts()).unwrap();
    let before = EXECUTIONS.load(Ordering::SeqCst);
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..STEPS {
                    s.run(&[], &[], &[all], &RunOptions::default()).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(EXECUTIONS.load(Ordering::SeqCst) - before, THREADS * STEPS * WIDTH * 4);
}

#[test]
fn an_io_thread_runs_only_small_cheap_nodes_itself() {
    let g = Graph::new();
    let small = g.placeholder("small", DType::F32, [Some(4)]);
    let big = g.placeholder("big", DType::F32, [None]);
    let ws = g.custom(&WHERE, "ws", &[small], attrs! {});
    let wb = g.custom(&WHERE, "wb", &[big], attrs! {});
    let rt = runtime();
    let s = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    let big_len = executor::IO_INLINE_BYTES_MAX / 4 + 1;
    let run = move |s: &DirectSession| {
        RAN_ON.lock().unwrap().clear();
        let feeds = [(small, Tensor::vector(&[1f32; 4])), (big, Tensor::vector(&vec![2f32; big_len]))];
        let out = s.run(&feeds, &[ws, wb], &[], &opts()).unwrap();
        assert_eq!(out[1].as_slice::<f32>().unwrap().len(), big_len);
        let me = std::thread::current().id();
        let ran = RAN_ON.lock().unwrap().clone();
        let here = |bytes: usize| ran.iter().find(|r| r.0 == bytes).map(|r| r.1 == me).unwrap();
        (here(16), here(big_len * 4))
    };
    // An ordinary caller runs every cheap node itself.
    assert_eq!(run(&s), (true, true));
    // An event-loop thread hands the large input's node to the pool.
    let on_io = std::thread::spawn(move || {
        executor::mark_io_thread();
        run(&s)
    });
    assert_eq!(on_io.join().unwrap(), (true, false));
}
