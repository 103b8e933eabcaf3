//! `ConditionalAccumulator`: TensorFlow's rules as tables (stale gradients dropped, mean over
//! every gradient in, global step advanced by each take, argument checks), takes that wait
//! without a thread and withdraw only themselves, and the ops in a `DirectSession`.

use rill_device_cpu::cpu_runtime;
use rill_graph::{
    CancellationManager, Code, DType, DirectSession, Error, Graph, PartialShape, RunOptions, Session,
    SessionOptions, Tensor,
};
use rill_queues as rq;
use rq::{ConditionalAccumulator, Reduction};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// One action on an accumulator and what it must give.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// `apply(local_step, grad)` → accepted (`Ok(true)`), dropped (`Ok(false)`) or an error code.
    Apply(i64, &'static [f32], Result<bool, Code>),
    /// An f64 gradient (a dtype mismatch for an f32 accumulator).
    ApplyF64(i64, Result<bool, Code>),
    /// `take(num_required)` with a short deadline → the reduced gradient or an error code.
    Take(i64, Result<&'static [f32], Code>),
    SetStep(i64),
    /// Expect `num_accumulated` and `global_step`.
    State(usize, i64),
}
use Act::*;

const DROPPED: Result<bool, Code> = Ok(false);
const TAKEN: Result<bool, Code> = Ok(true);

fn check(name: &str, shape: PartialShape, reduction: Reduction, acts: &[Act]) {
    let acc = Arc::new(ConditionalAccumulator::new(name, DType::F32, shape, reduction).unwrap());
    let code = |r: Result<bool, Error>| r.map_err(|e| e.code);
    for (i, act) in acts.iter().enumerate() {
        let at = format!("{name}, action {i} {act:?}");
        match *act {
            Apply(step, g, want) => {
                let t = Tensor::vector(g);
                assert_eq!(code(acc.apply_grad(step, &t)), want, "{at}");
            }
            ApplyF64(step, want) => {
                assert_eq!(code(acc.apply_grad(step, &Tensor::vector(&[1f64, 2.0]))), want, "{at}")
            }
            Take(n, want) => {
                let got = acc.take_grad(n, Duration::from_millis(50)).map(|t| t.to_vec::<f32>().unwrap());
                match (got, want) {
                    (Ok(v), Ok(w)) => assert_eq!(v, w, "{at}"),
                    (Err(e), Err(c)) => assert_eq!(e.code, c, "{at}: {e}"),
                    (got, want) => panic!("{at}: got {got:?}, want {want:?}"),
                }
            }
            SetStep(s) => acc.set_global_step(s),
            State(n, s) => assert_eq!((acc.num_accumulated(), acc.global_step()), (n, s), "{at}"),
        }
    }
}

#[test]
fn accumulator_rules() {
    let two = || PartialShape::known(&[2]);
    let table: &[(&str, PartialShape, Reduction, &[Act])] = &[
        (
            "mean of fresh gradients; a take resets the sum and advances the step",
            two(),
            Reduction::Mean,
            &[
                State(0, 0),
                Apply(0, &[1., 2.], TAKEN),
                Apply(0, &[3., 4.], TAKEN),
                State(2, 0),
                Take(2, Ok(&[2., 3.])),
                State(0, 1),
                Apply(1, &[5., 5.], TAKEN),
                Take(1, Ok(&[5., 5.])),
                State(0, 2),
            ],
        ),
        (
            "stale gradients are dropped silently; newer ones count",
            two(),
            Reduction::Mean,
            &[
                SetStep(5),
                Apply(4, &[100., 100.], DROPPED),
                State(0, 5),
                Apply(5, &[2., 2.], TAKEN),
                Apply(9, &[4., 4.], TAKEN),
                Take(2, Ok(&[3., 3.])),
                State(0, 6),
                Apply(5, &[1., 1.], DROPPED),
                State(0, 6),
            ],
        ),
        (
            "the mean is over every gradient in, not over num_required",
            two(),
            Reduction::Mean,
            &[
                Apply(0, &[1., 0.], TAKEN),
                Apply(0, &[2., 0.], TAKEN),
                Apply(0, &[6., 3.], TAKEN),
                Take(2, Ok(&[3., 1.])),
            ],
        ),
        (
            "SUM reduction",
            two(),
            Reduction::Sum,
            &[Apply(0, &[1., 2.], TAKEN), Apply(0, &[3., 4.], TAKEN), Take(2, Ok(&[4., 6.]))],
        ),
        (
            "a take without enough gradients times out and leaves the accumulator as it was",
            two(),
            Reduction::Mean,
            &[
                Apply(0, &[1., 1.], TAKEN),
                Take(2, Err(Code::DeadlineExceeded)),
                State(1, 0),
                Apply(0, &[3., 3.], TAKEN),
                Take(2, Ok(&[2., 2.])),
                State(0, 1),
            ],
        ),
        (
            "num_required must be positive",
            two(),
            Reduction::Mean,
            &[
                Apply(0, &[1., 1.], TAKEN),
                Take(0, Err(Code::InvalidArgument)),
                Take(-3, Err(Code::InvalidArgument)),
                State(1, 0),
            ],
        ),
        (
            "a fresh gradient of the wrong shape or dtype is an error and is not counted",
            two(),
            Reduction::Mean,
            &[
                Apply(0, &[1., 2., 3.], Err(Code::InvalidArgument)),
                ApplyF64(0, Err(Code::InvalidArgument)),
                State(0, 0),
            ],
        ),
        (
            "staleness is decided before the gradient is looked at",
            two(),
            Reduction::Mean,
            &[SetStep(2), Apply(1, &[1., 2., 3.], DROPPED), ApplyF64(1, DROPPED), State(0, 2)],
        ),
        (
            "the global step may be set backwards",
            two(),
            Reduction::Mean,
            &[SetStep(7), SetStep(3), State(0, 3), Apply(3, &[1., 1.], TAKEN)],
        ),
        (
            "an unknown shape takes the first gradient's; later ones must match it until a take",
            PartialShape::unknown(),
            Reduction::Mean,
            &[
                Apply(0, &[1., 1., 1.], TAKEN),
                Apply(0, &[1., 1.], Err(Code::InvalidArgument)),
                Take(1, Ok(&[1., 1., 1.])),
                Apply(1, &[4., 2.], TAKEN),
                Take(1, Ok(&[4., 2.])),
            ],
        ),
    ];
    for (name, shape, reduction, acts) in table {
        check(name, shape.clone(), *reduction, acts);
    }
}

#[test]
fn only_floating_point_dtypes_accumulate() {
    for (dtype, ok) in [(DType::F32, true), (DType::F64, true), (DType::F16, true), (DType::I32, false)] {
        let r = ConditionalAccumulator::new("a", dtype, PartialShape::unknown(), Reduction::Mean);
        assert_eq!(r.is_ok(), ok, "{dtype}");
    }
}

#[test]
fn waiting_takes_are_served_in_order_by_later_gradients() {
    let acc = Arc::new(
        ConditionalAccumulator::new("a", DType::F32, PartialShape::scalar(), Reduction::Mean).unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    for (who, n) in [("first", 2), ("second", 1)] {
        let tx = tx.clone();
        acc.take_grad_async(
            n,
            None,
            Box::new(move |r| tx.send((who, r.unwrap().scalar_value::<f32>().unwrap())).unwrap()),
        );
    }
    assert!(rx.try_recv().is_err(), "no take is served before gradients arrive");
    // The second take needs one gradient but waits behind the first.
    acc.apply_grad(0, &Tensor::scalar(1f32)).unwrap();
    assert!(rx.try_recv().is_err(), "the head of the line needs two");
    let t = std::thread::spawn({
        let acc = acc.clone();
        move || acc.apply_grad(0, &Tensor::scalar(3f32)).unwrap()
    });
    assert!(t.join().unwrap());
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), ("first", 2.0));
    assert_eq!(acc.global_step(), 1);
    acc.apply_grad(1, &Tensor::scalar(8f32)).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), ("second", 8.0));
    assert_eq!(acc.global_step(), 2);
}

#[test]
fn an_await_waits_like_a_take_but_takes_nothing() {
    let acc = Arc::new(
        ConditionalAccumulator::new("a", DType::F32, PartialShape::scalar(), Reduction::Mean).unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let cm = Arc::new(CancellationManager::new());
    let send = |tx: mpsc::Sender<_>| -> rq::TakeDone {
        Box::new(move |r: rill_graph::Result<Tensor>| {
            tx.send(r.map(|t| t.scalar_value::<i32>().unwrap())).unwrap()
        })
    };
    acc.await_grads_async(2, Some(&cm), send(tx.clone()));
    acc.apply_grad(0, &Tensor::scalar(1f32)).unwrap();
    assert!(rx.try_recv().is_err(), "one gradient of two");
    acc.apply_grad(0, &Tensor::scalar(3f32)).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap(), 2);
    // Nothing was taken: the count, the step and the mean are all still there.
    assert_eq!((acc.num_accumulated(), acc.global_step()), (2, 0));
    assert_eq!(acc.take_grad(2, Duration::from_secs(5)).unwrap().scalar_value::<f32>().unwrap(), 2.0);
    // A cancelled await leaves the gradients too.
    acc.apply_grad(1, &Tensor::scalar(5f32)).unwrap();
    acc.await_grads_async(2, Some(&cm), send(tx));
    cm.cancel(Error::cancelled("step cancelled"));
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap_err().code, Code::Cancelled);
    assert_eq!((acc.num_accumulated(), acc.global_step()), (1, 1));
}

#[test]
fn cancelling_the_awaits_ends_them_and_leaves_takes_and_gradients() {
    let acc = Arc::new(
        ConditionalAccumulator::new("a", DType::F32, PartialShape::scalar(), Reduction::Mean).unwrap(),
    );
    let cm = Arc::new(CancellationManager::new());
    let (tx, rx) = mpsc::channel();
    let send = |tag: &'static str, tx: mpsc::Sender<_>| -> rq::TakeDone {
        Box::new(move |r: rill_graph::Result<Tensor>| tx.send((tag, r.map_err(|e| e.code))).unwrap())
    };
    acc.apply_grad(0, &Tensor::scalar(2f32)).unwrap();
    // An await at the head of the line holds back a take that one gradient would serve.
    acc.await_grads_async(2, Some(&cm), send("await", tx.clone()));
    acc.take_grad_async(1, Some(&cm), send("take", tx.clone()));
    assert!(rx.try_recv().is_err());
    assert_eq!(acc.cancel_awaits(), 1);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), ("await", Err(Code::Cancelled)));
    let (tag, took) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((tag, took.map(|t| t.scalar_value::<f32>().unwrap())), ("take", Ok(2.0)));
    // A waiting take is not an await: it stays, and so does the gradient it waits for more of.
    acc.apply_grad(1, &Tensor::scalar(4f32)).unwrap();
    acc.take_grad_async(2, Some(&cm), send("take", tx));
    assert_eq!(acc.cancel_awaits(), 0);
    assert!(rx.try_recv().is_err());
    assert_eq!((acc.num_accumulated(), acc.global_step()), (1, 1));
    acc.apply_grad(1, &Tensor::scalar(6f32)).unwrap();
    let (tag, took) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((tag, took.map(|t| t.scalar_value::<f32>().unwrap())), ("take", Ok(5.0)));
}

#[test]
fn a_cancelled_take_withdraws_only_itself() {
    let acc = Arc::new(
        ConditionalAccumulator::new("a", DType::F32, PartialShape::scalar(), Reduction::Mean).unwrap(),
    );
    let cm = Arc::new(CancellationManager::new());
    let (tx, rx) = mpsc::channel();
    acc.take_grad_async(2, Some(&cm), Box::new(move |r| tx.send(r.map_err(|e| e.code)).unwrap()));
    acc.apply_grad(0, &Tensor::scalar(2f32)).unwrap();
    cm.cancel(Error::cancelled("step cancelled"));
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap_err(), Code::Cancelled);
    // The gradient stays for the next take; an already-cancelled manager fails a take at once.
    assert_eq!((acc.num_accumulated(), acc.global_step()), (1, 0));
    let (tx, rx) = mpsc::channel();
    acc.take_grad_async(1, Some(&cm), Box::new(move |r| tx.send(r.map_err(|e| e.code)).unwrap()));
    let early = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // Enough gradients were in, so the take was served before it needed to register.
    assert_eq!(early.map(|t| t.scalar_value::<f32>().unwrap()), Ok(2.0));
    let (tx, rx) = mpsc::channel();
    acc.take_grad_async(1, Some(&cm), Box::new(move |r| tx.send(r.map_err(|e| e.code)).unwrap()));
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap_err(), Code::Cancelled);
}

fn timeout(ms: u64) -> RunOptions {
    RunOptions { timeout_in_ms: ms, ..RunOptions::default() }
}

#[test]
fn accumulator_ops_in_a_session() {
    let g = Graph::new();
    let acc = rq::conditional_accumulator(&g, DType::F32, PartialShape::known(&[2]), "grad_accum");
    let step = g.placeholder("local_step", DType::I64, PartialShape::scalar());
    let grad = g.placeholder("grad", DType::F32, [Some(2)]);
    let apply = rq::accumulator_apply_gradient(&g, acc, step, grad);
    let take = rq::accumulator_take_gradient(&g, acc, 2);
    let count = rq::accumulator_num_accumulated(&g, acc);
    let new_step = g.placeholder("new_step", DType::I64, PartialShape::scalar());
    let set = rq::accumulator_set_global_step(&g, acc, new_step);
    // A second handle node with the same shared name reaches the same accumulator.
    let same = rq::conditional_accumulator(&g, DType::F32, PartialShape::known(&[2]), "grad_accum");
    let same_count = rq::accumulator_num_accumulated(&g, same);
    g.status().unwrap();
    assert_eq!(g.shape(take), PartialShape::known(&[2]), "the take's static shape is the accumulator's");
    let rt = cpu_runtime().with_ops(rq::OPS).with_kernels(rq::KERNELS);
    let s = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    let o = timeout(5_000);
    let run_apply = |st: i64, v: [f32; 2]| {
        s.run(&[(step, Tensor::scalar(st)), (grad, Tensor::vector(&v))], &[], &[apply], &o).unwrap();
    };
    let counts = |s: &DirectSession| -> (i32, i32) {
        let r = s.run(&[], &[count, same_count], &[], &o).unwrap();
        (r[0].scalar_value().unwrap(), r[1].scalar_value().unwrap())
    };
    run_apply(0, [1.0, 3.0]);
    assert_eq!(counts(&s), (1, 1));
    // A take that cannot finish fails its own step at the deadline and takes nothing.
    let e = s.run(&[], &[take], &[], &timeout(100)).unwrap_err();
    assert_eq!(e.code, Code::DeadlineExceeded, "{e}");
    assert_eq!(counts(&s), (1, 1));
    run_apply(0, [3.0, 5.0]);
    assert_eq!(s.run(&[], &[take], &[], &o).unwrap()[0].to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
    // The take advanced the global step to 1: a gradient of step 0 is now stale.
    run_apply(0, [9.0, 9.0]);
    assert_eq!(counts(&s), (0, 0));
    s.run(&[(new_step, Tensor::scalar(0i64))], &[], &[set], &o).unwrap();
    run_apply(0, [9.0, 9.0]);
    assert_eq!(counts(&s), (1, 1));
    // A wrong-shape gradient fails its step, naming the node.
    let e = s
        .run(
            &[
                (step, Tensor::scalar(5i64)),
                (grad, Tensor::vector(&[1f32, 2.0]).reshape([2, 1].into()).unwrap()),
            ],
            &[],
            &[apply],
            &o,
        )
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
}

#[test]
fn a_take_waits_without_holding_a_pool_thread() {
    // One inter-op thread: the take waits in the accumulator while another step applies.
    let g = Graph::new();
    let acc = rq::conditional_accumulator(&g, DType::F32, PartialShape::scalar(), "");
    let grad = g.placeholder("grad", DType::F32, PartialShape::scalar());
    let apply = rq::accumulator_apply_gradient(&g, acc, g.scalar(0i64), grad);
    let take = rq::accumulator_take_gradient(&g, acc, 1);
    let rt = cpu_runtime().with_ops(rq::OPS).with_kernels(rq::KERNELS);
    let opts = SessionOptions { inter_op_parallelism_threads: 1, ..Default::default() };
    let s = Arc::new(DirectSession::new(&g, &rt, opts).unwrap());
    let taker = std::thread::spawn({
        let s = s.clone();
        move || s.run(&[], &[take], &[], &timeout(10_000)).map(|r| r[0].scalar_value::<f32>().unwrap())
    });
    std::thread::sleep(Duration::from_millis(50));
    s.run(&[(grad, Tensor::scalar(7f32))], &[], &[apply], &timeout(5_000)).unwrap();
    assert_eq!(taker.join().unwrap().unwrap(), 7.0);
}

#[test]
fn a_take_reuses_the_last_buffer_only_once_nobody_reads_it() {
    let acc = Arc::new(
        ConditionalAccumulator::new("a", DType::F32, PartialShape::unknown(), Reduction::Mean).unwrap(),
    );
    let grad = |v: f32, n: usize| Tensor::new([n], &vec![v; n]).unwrap();
    let take = |step: i64, v: f32, n: usize| {
        acc.apply_grad(step, &grad(v, n)).unwrap();
        acc.take_grad(1, Duration::from_secs(5)).unwrap()
    };
    let first = take(0, 1.0, 64);
    // The first take is still held: the second one must not write into it.
    let second = take(1, 2.0, 64);
    assert_eq!(first.to_vec::<f32>().unwrap(), vec![1.0; 64], "a held take is never overwritten");
    assert_eq!(second.to_vec::<f32>().unwrap(), vec![2.0; 64]);
    let at = second.as_bytes().unwrap().as_ptr() as usize;
    drop(second);
    // Released: the next take of that shape writes into the same buffer.
    let third = take(2, 3.0, 64);
    assert_eq!(third.to_vec::<f32>().unwrap(), vec![3.0; 64]);
    assert_eq!(third.as_bytes().unwrap().as_ptr() as usize, at, "the released buffer is reused");
    drop(third);
    // Another shape gets its own buffer.
    assert_eq!(take(3, 4.0, 32).to_vec::<f32>().unwrap(), vec![4.0; 32]);
    assert_eq!(first.to_vec::<f32>().unwrap(), vec![1.0; 64]);
}
