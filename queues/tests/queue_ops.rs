//! Queue ops in a `DirectSession`: enqueue/dequeue kernels, close/size/is_closed, shared-name
//! checks, and a step deadline that withdraws only its own waiting attempt.

use rill_device_cpu::cpu_runtime;
use rill_graph::{
    Code, DType, DirectSession, Graph, PartialShape, RunOptions, Session, SessionOptions, Tensor,
};
use rill_queues as rq;

fn session(g: &Graph) -> DirectSession {
    let rt = cpu_runtime().with_ops(rq::OPS).with_kernels(rq::KERNELS);
    DirectSession::new(g, &rt, SessionOptions::default()).unwrap()
}

fn timeout(ms: u64) -> RunOptions {
    RunOptions { timeout_in_ms: ms, ..RunOptions::default() }
}

#[test]
fn enqueue_dequeue_close_size_in_a_session() {
    let g = Graph::new();
    let q = rq::fifo_queue(
        &g,
        10,
        &[DType::I64, DType::F32],
        &[PartialShape::scalar(), PartialShape::known(&[2])],
        &Default::default(),
    );
    let x = g.placeholder("x", DType::I64, PartialShape::scalar());
    let y = g.placeholder("y", DType::F32, [Some(2)]);
    let enq = rq::enqueue(&g, q, &[x, y]);
    let deq = rq::dequeue(&g, q);
    let deq2 = rq::dequeue_many(&g, q, 2);
    let up_to = rq::dequeue_up_to(&g, q, 5);
    let size = rq::queue_size(&g, q);
    let closed = rq::queue_is_closed(&g, q);
    let close = rq::queue_close(&g, q, false);
    g.status().unwrap();
    assert_eq!(g.shape(deq2[1]), PartialShape::known(&[2, 2]), "dequeue_many's static shape");
    let s = session(&g);
    let o = RunOptions::default();
    for v in 0..4i64 {
        s.run(&[(x, Tensor::scalar(v)), (y, Tensor::vector(&[v as f32, -(v as f32)]))], &[], &[enq], &o)
            .unwrap();
    }
    assert_eq!(s.run(&[], &[size], &[], &o).unwrap()[0].scalar_value::<i32>().unwrap(), 4);
    let one = s.run(&[], &deq, &[], &o).unwrap();
    assert_eq!(
        (one[0].scalar_value::<i64>().unwrap(), one[1].to_vec::<f32>().unwrap()),
        (0, vec![0.0, -0.0])
    );
    let two = s.run(&[], &deq2, &[], &o).unwrap();
    assert_eq!(two[0].to_vec::<i64>().unwrap(), vec![1, 2]);
    assert_eq!(two[1].shape().dims(), &[2, 2]);
    s.run(&[], &[], &[close], &o).unwrap();
    assert!(s.run(&[], &[closed], &[], &o).unwrap()[0].bool_values().unwrap()[0]);
    let e =
        s.run(&[(x, Tensor::scalar(9i64)), (y, Tensor::vector(&[0f32, 0.0]))], &[], &[enq], &o).unwrap_err();
    assert_eq!(e.code, Code::Cancelled, "{e}");
    assert_eq!(s.run(&[], &up_to, &[], &o).unwrap()[0].to_vec::<i64>().unwrap(), vec![3]);
    let e = s.run(&[], &up_to, &[], &o).unwrap_err();
    assert_eq!(e.code, Code::OutOfRange, "{e}");
}

#[test]
fn enqueue_then_dequeue_in_one_step() {
    let g = Graph::new();
    let q = rq::fifo_queue(&g, 10, &[DType::I64], &[PartialShape::scalar()], &Default::default());
    let enq = rq::enqueue(&g, q, &[g.scalar(7i64)]);
    let deq = g.with_control_dependencies(&[enq], |g| rq::dequeue(g, q));
    let s = session(&g);
    for _ in 0..3 {
        assert_eq!(
            s.run(&[], &deq, &[], &RunOptions::default()).unwrap()[0].scalar_value::<i64>().unwrap(),
            7
        );
    }
}

#[test]
fn a_timed_out_dequeue_leaves_the_queue_usable() {
    let g = Graph::new();
    let q = rq::fifo_queue(&g, 2, &[DType::I64], &[PartialShape::scalar()], &Default::default());
    let x = g.placeholder("x", DType::I64, PartialShape::scalar());
    let enq = rq::enqueue(&g, q, &[x]);
    let deq = rq::dequeue(&g, q);
    let deq3 = rq::dequeue_many(&g, q, 3);
    let size = rq::queue_size(&g, q);
    let s = session(&g);
    let e = s.run(&[], &deq, &[], &timeout(30)).unwrap_err();
    assert_eq!(e.code, Code::DeadlineExceeded, "{e}");
    // A dequeue_many(3) that took both items, then timed out, gives them back.
    for v in [1i64, 2] {
        s.run(&[(x, Tensor::scalar(v))], &[], &[enq], &timeout(1000)).unwrap();
    }
    assert_eq!(s.run(&[], &deq3, &[], &timeout(30)).unwrap_err().code, Code::DeadlineExceeded);
    assert_eq!(s.run(&[], &[size], &[], &timeout(1000)).unwrap()[0].scalar_value::<i32>().unwrap(), 2);
    // A timed-out enqueue on a full queue does not leave a phantom element behind.
    assert_eq!(
        s.run(&[(x, Tensor::scalar(3i64))], &[], &[enq], &timeout(30)).unwrap_err().code,
        Code::DeadlineExceeded
    );
    for want in [1i64, 2] {
        assert_eq!(s.run(&[], &deq, &[], &timeout(1000)).unwrap()[0].scalar_value::<i64>().unwrap(), want);
    }
    s.run(&[(x, Tensor::scalar(4i64))], &[], &[enq], &timeout(1000)).unwrap();
    assert_eq!(s.run(&[], &deq, &[], &timeout(1000)).unwrap()[0].scalar_value::<i64>().unwrap(), 4);
}

#[test]
fn shared_queues_must_match() {
    let g = Graph::new();
    let a = rq::fifo_queue(&g, 10, &[DType::I64], &[], &rq::QueueOptions::shared("shared"));
    let same = rq::fifo_queue(&g, 10, &[DType::I64], &[], &rq::QueueOptions::shared("shared"));
    let cases = [
        ("capacity", rq::fifo_queue(&g, 5, &[DType::I64], &[], &rq::QueueOptions::shared("shared"))),
        ("dtypes", rq::fifo_queue(&g, 10, &[DType::F32], &[], &rq::QueueOptions::shared("shared"))),
        (
            "shapes",
            rq::fifo_queue(
                &g,
                10,
                &[DType::I64],
                &[PartialShape::scalar()],
                &rq::QueueOptions::shared("shared"),
            ),
        ),
        (
            "kind",
            rq::padding_fifo_queue(
                &g,
                10,
                &[DType::I64],
                &[PartialShape::scalar()],
                &rq::QueueOptions::shared("shared"),
            ),
        ),
    ];
    let enq = rq::enqueue(&g, a, &[g.scalar(5i64)]);
    let deq = rq::dequeue(&g, same);
    let s = session(&g);
    let o = RunOptions::default();
    s.run(&[], &[], &[enq], &o).unwrap();
    assert_eq!(
        s.run(&[], &deq, &[], &o).unwrap()[0].scalar_value::<i64>().unwrap(),
        5,
        "one queue under one name"
    );
    for (what, q) in cases {
        let e = s.run(&[], &[q], &[], &o).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{what}: {e}");
    }
}

#[test]
fn containers_separate_queues() {
    let g = Graph::new();
    let a =
        g.with_container("a", |g| rq::fifo_queue(g, 10, &[DType::I64], &[], &rq::QueueOptions::shared("q")));
    let b =
        g.with_container("b", |g| rq::fifo_queue(g, 10, &[DType::I64], &[], &rq::QueueOptions::shared("q")));
    let enq = rq::enqueue(&g, a, &[g.scalar(1i64)]);
    let (sa, sb) = (rq::queue_size(&g, a), rq::queue_size(&g, b));
    let s = session(&g);
    s.run(&[], &[], &[enq], &RunOptions::default()).unwrap();
    let sizes = s.run(&[], &[sa, sb], &[], &RunOptions::default()).unwrap();
    assert_eq!((sizes[0].scalar_value::<i32>().unwrap(), sizes[1].scalar_value::<i32>().unwrap()), (1, 0));
}
