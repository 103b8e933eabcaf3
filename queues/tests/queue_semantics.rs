//! TensorFlow's queue rules (queue_base.cc, fifo_queue.cc, random_shuffle_queue_op.cc,
//! padding_fifo_queue.cc, priority_queue.cc) checked on the queue resource's own API.

use rill_graph::{Code, DType, PartialShape, Tensor};
use rill_queues::{Queue, QueueKind, QueueSpec};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Long enough for any wait that must succeed; the tests never sleep this long.
const WAIT: Duration = Duration::from_secs(5);
/// How long a wait that must time out is given.
const SHORT: Duration = Duration::from_millis(20);

fn queue(kind: QueueKind, capacity: i64, shapes: &[PartialShape]) -> Arc<Queue> {
    let dtypes = vec![DType::I64; shapes.len().max(1)];
    Arc::new(Queue::new("q", QueueSpec::new(kind, capacity, &dtypes, shapes)).unwrap())
}

fn fifo(capacity: i64) -> Arc<Queue> {
    queue(QueueKind::Fifo, capacity, &[PartialShape::scalar()])
}

fn i(v: i64) -> Vec<Tensor> {
    vec![Tensor::scalar(v)]
}

fn many(v: &[i64]) -> Vec<Tensor> {
    vec![Tensor::vector(v)]
}

fn val(t: &[Tensor]) -> Vec<i64> {
    t[0].to_vec::<i64>().unwrap()
}

fn code<T: std::fmt::Debug>(r: rill_graph::Result<T>) -> Code {
    r.expect_err("expected an error").code
}

#[test]
fn fifo_order_and_capacity() {
    let q = fifo(2);
    assert!(q.try_enqueue(i(1)).unwrap());
    assert!(q.try_enqueue(i(2)).unwrap());
    assert!(!q.try_enqueue(i(3)).unwrap(), "full queue must not take a third element");
    assert_eq!(q.size(), 2);
    assert_eq!(q.num_waiting(), (0, 0), "a timed-out enqueue withdraws itself");
    assert_eq!(val(&q.dequeue(WAIT).unwrap()), vec![1]);
    assert_eq!(val(&q.dequeue(WAIT).unwrap()), vec![2]);
    assert_eq!(q.try_dequeue().unwrap(), None);
}

#[test]
fn blocked_dequeue_is_served_by_a_later_enqueue() {
    let q = fifo(10);
    let (tx, rx) = mpsc::channel();
    q.dequeue_async(None, Box::new(move |r| tx.send(r).unwrap()));
    assert!(rx.try_recv().is_err(), "dequeue on an empty queue waits");
    assert_eq!(q.num_waiting(), (0, 1));
    q.enqueue(i(7), WAIT).unwrap();
    assert_eq!(val(&rx.recv_timeout(WAIT).unwrap().unwrap()), vec![7]);
    assert_eq!(q.size(), 0);
}

#[test]
fn blocked_enqueue_is_served_by_a_later_dequeue() {
    let q = fifo(1);
    q.enqueue(i(1), WAIT).unwrap();
    let (tx, rx) = mpsc::channel();
    q.enqueue_async(i(2), None, Box::new(move |r| tx.send(r).unwrap()));
    assert!(rx.try_recv().is_err(), "enqueue on a full queue waits");
    assert_eq!(val(&q.dequeue(WAIT).unwrap()), vec![1]);
    rx.recv_timeout(WAIT).unwrap().unwrap();
    assert_eq!(val(&q.dequeue(WAIT).unwrap()), vec![2]);
}

#[test]
fn close_rules() {
    // (closed with these items, operation, expected result)
    type Op = fn(&Arc<Queue>) -> rill_graph::Result<Vec<i64>>;
    let cases: &[(&[i64], Op, Result<Vec<i64>, Code>)] = &[
        (&[], |q| q.enqueue(i(1), WAIT).map(|_| vec![]), Err(Code::Cancelled)),
        (&[], |q| q.enqueue_many(many(&[1, 2]), WAIT).map(|_| vec![]), Err(Code::Cancelled)),
        (&[5], |q| q.dequeue(WAIT).map(|t| val(&t)), Ok(vec![5])),
        (&[], |q| q.dequeue(WAIT).map(|t| val(&t)), Err(Code::OutOfRange)),
        (&[1, 2, 3], |q| q.dequeue_many(2, WAIT).map(|t| val(&t)), Ok(vec![1, 2])),
        (&[1, 2], |q| q.dequeue_many(3, WAIT).map(|t| val(&t)), Err(Code::OutOfRange)),
        (&[1, 2], |q| q.dequeue_up_to(3, WAIT).map(|t| val(&t)), Ok(vec![1, 2])),
        (&[], |q| q.dequeue_up_to(3, WAIT).map(|t| val(&t)), Err(Code::OutOfRange)),
        (&[], |q| q.dequeue_many(0, WAIT).map(|t| val(&t)), Ok(vec![])),
    ];
    for (items, op, want) in cases {
        let q = fifo(10);
        if !items.is_empty() {
            q.enqueue_many(many(items), WAIT).unwrap();
        }
        q.close(false);
        assert!(q.is_closed());
        let got = op(&q).map_err(|e| e.code);
        assert_eq!(&got, want, "items {items:?}");
    }
}

#[test]
fn failed_dequeue_many_takes_nothing() {
    let q = fifo(10);
    q.enqueue_many(many(&[1, 2]), WAIT).unwrap();
    q.close(false);
    assert_eq!(code(q.dequeue_many(3, WAIT)), Code::OutOfRange);
    assert_eq!(q.size(), 2, "all or nothing");
    assert_eq!(val(&q.dequeue_many(2, WAIT).unwrap()), vec![1, 2]);
}

#[test]
fn waiting_dequeue_many_fails_on_close_and_gives_items_back() {
    let q = fifo(10);
    let (tx, rx) = mpsc::channel();
    q.dequeue_many_async(3, None, Box::new(move |r| tx.send(r).unwrap()));
    q.enqueue_many(many(&[1, 2]), WAIT).unwrap();
    assert_eq!(q.size(), 0, "the waiting dequeue_many holds the items it took");
    q.close(false);
    assert_eq!(rx.recv_timeout(WAIT).unwrap().unwrap_err().code, Code::OutOfRange);
    assert_eq!(val(&q.dequeue_up_to(5, WAIT).unwrap()), vec![1, 2], "items back, in order");
}

#[test]
fn waiting_dequeue_up_to_gets_the_remainder_on_close() {
    let q = fifo(10);
    let (tx, rx) = mpsc::channel();
    q.dequeue_up_to_async(3, None, Box::new(move |r| tx.send(r).unwrap()));
    q.enqueue(i(4), WAIT).unwrap();
    assert!(rx.try_recv().is_err(), "an open queue makes dequeue_up_to wait for all 3");
    q.close(false);
    assert_eq!(val(&rx.recv_timeout(WAIT).unwrap().unwrap()), vec![4]);
}

#[test]
fn pending_enqueues_survive_close_unless_cancelled() {
    for cancel in [false, true] {
        let q = fifo(1);
        q.enqueue(i(1), WAIT).unwrap();
        let (tx, rx) = mpsc::channel();
        q.enqueue_async(i(2), None, Box::new(move |r| tx.send(r).unwrap()));
        q.close(cancel);
        assert_eq!(val(&q.dequeue(WAIT).unwrap()), vec![1]);
        let pending = rx.recv_timeout(WAIT).unwrap();
        if cancel {
            assert_eq!(pending.unwrap_err().code, Code::Cancelled);
            assert_eq!(code(q.dequeue(WAIT)), Code::OutOfRange);
        } else {
            pending.unwrap();
            assert_eq!(val(&q.dequeue(WAIT).unwrap()), vec![2]);
        }
    }
}

#[test]
fn dequeue_many_larger_than_capacity_drains_as_items_arrive() {
    let q = fifo(2);
    let (tx, rx) = mpsc::channel();
    q.dequeue_many_async(5, None, Box::new(move |r| tx.send(r).unwrap()));
    for v in 0..5 {
        q.enqueue(i(v), WAIT).unwrap();
    }
    assert_eq!(val(&rx.recv_timeout(WAIT).unwrap().unwrap()), vec![0, 1, 2, 3, 4]);
}

#[test]
fn enqueue_many_enters_rows_as_room_appears() {
    let q = fifo(2);
    let (tx, rx) = mpsc::channel();
    q.enqueue_many_async(many(&[1, 2, 3, 4]), None, Box::new(move |r| tx.send(r).unwrap()));
    assert_eq!(q.size(), 2);
    assert_eq!(val(&q.dequeue_many(4, WAIT).unwrap()), vec![1, 2, 3, 4]);
    rx.recv_timeout(WAIT).unwrap().unwrap();
}

#[test]
fn timeouts_leave_the_queue_usable_and_lose_nothing() {
    let q = fifo(10);
    assert_eq!(code(q.dequeue(SHORT)), Code::DeadlineExceeded);
    assert_eq!(q.num_waiting(), (0, 0));
    // A dequeue_many that took 2 of 3 and timed out gives both back, in order.
    q.enqueue_many(many(&[1, 2]), WAIT).unwrap();
    assert_eq!(code(q.dequeue_many(3, SHORT)), Code::DeadlineExceeded);
    assert_eq!(q.size(), 2);
    q.enqueue(i(3), WAIT).unwrap();
    assert_eq!(val(&q.dequeue_many(3, WAIT).unwrap()), vec![1, 2, 3]);
    // A full queue: a timed-out enqueue leaves room accounting intact.
    let q = fifo(1);
    q.enqueue(i(1), WAIT).unwrap();
    assert_eq!(code(q.enqueue(i(2), SHORT)), Code::DeadlineExceeded);
    assert_eq!(val(&q.dequeue(WAIT).unwrap()), vec![1]);
    q.enqueue(i(3), WAIT).unwrap();
    assert_eq!(val(&q.dequeue(WAIT).unwrap()), vec![3]);
}

#[test]
fn tuples_move_as_one_unit() {
    let q = Arc::new(
        Queue::new(
            "t",
            QueueSpec::new(
                QueueKind::Fifo,
                10,
                &[DType::I64, DType::String],
                &[PartialShape::scalar(), PartialShape::scalar()],
            ),
        )
        .unwrap(),
    );
    for v in 0..3i64 {
        q.enqueue(vec![Tensor::scalar(v), Tensor::scalar_string(format!("s{v}"))], WAIT).unwrap();
    }
    let one = q.dequeue(WAIT).unwrap();
    assert_eq!(
        (one[0].scalar_value::<i64>().unwrap(), one[1].strings().unwrap()[0].clone()),
        (0, b"s0".to_vec())
    );
    let two = q.dequeue_many(2, WAIT).unwrap();
    assert_eq!(two[0].to_vec::<i64>().unwrap(), vec![1, 2]);
    assert_eq!(two[1].strings().unwrap(), &[b"s1".to_vec(), b"s2".to_vec()]);
}

#[test]
fn malformed_elements_are_invalid_argument() {
    let q = queue(QueueKind::Fifo, 10, &[PartialShape::known(&[2])]);
    let cases: Vec<(&str, Vec<Tensor>, bool)> = vec![
        ("wrong dtype", vec![Tensor::vector(&[1f32, 2.0])], false),
        ("wrong shape", vec![Tensor::vector(&[1i64, 2, 3])], false),
        ("too many components", vec![Tensor::vector(&[1i64, 2]), Tensor::vector(&[1i64, 2])], false),
        ("enqueue_many of rows of the wrong shape", vec![Tensor::vector(&[1i64, 2])], true),
    ];
    for (what, t, is_many) in cases {
        let r = if is_many { q.enqueue_many(t, WAIT) } else { q.enqueue(t, WAIT) };
        assert_eq!(r.map_err(|e| e.code), Err(Code::InvalidArgument), "{what}");
    }
    assert_eq!(q.size(), 0);
    let unshaped = Arc::new(Queue::fifo("u", 10, &[DType::I64], &[]).unwrap());
    assert_eq!(code(unshaped.dequeue_many(1, WAIT)), Code::InvalidArgument, "dequeue_many needs shapes");
}

#[test]
fn random_shuffle_keeps_min_after_dequeue_until_closed() {
    let q = queue(
        QueueKind::RandomShuffle { min_after_dequeue: 2, seed: 7, seed2: 0 },
        10,
        &[PartialShape::scalar()],
    );
    q.enqueue_many(many(&[1, 2, 3]), WAIT).unwrap();
    let first = val(&q.dequeue(WAIT).unwrap())[0];
    assert_eq!(code(q.dequeue(SHORT)), Code::DeadlineExceeded, "2 left = min_after_dequeue");
    q.close(false);
    let mut rest = val(&q.dequeue_up_to(5, WAIT).unwrap());
    rest.push(first);
    rest.sort();
    assert_eq!(rest, vec![1, 2, 3]);
}

#[test]
fn random_shuffle_seed_fixes_the_order() {
    let order = |seed: i64| {
        let q = queue(
            QueueKind::RandomShuffle { min_after_dequeue: 0, seed, seed2: 0 },
            100,
            &[PartialShape::scalar()],
        );
        q.enqueue_many(many(&(0..50).collect::<Vec<_>>()), WAIT).unwrap();
        val(&q.dequeue_many(50, WAIT).unwrap())
    };
    let a = order(3);
    assert_eq!(a, order(3));
    assert_ne!(a, order(4));
    assert_ne!(a, (0..50).collect::<Vec<_>>(), "shuffled");
    let mut s = a.clone();
    s.sort();
    assert_eq!(s, (0..50).collect::<Vec<_>>(), "a permutation");
}

#[test]
fn padding_fifo_pads_variable_dimensions_with_zeros() {
    let q = queue(QueueKind::PaddingFifo, 10, &[PartialShape::from_dims(&[None])]);
    for v in [vec![1i64], vec![2, 3, 4], vec![]] {
        q.enqueue(vec![Tensor::vector(&v)], WAIT).unwrap();
    }
    let b = q.dequeue_many(3, WAIT).unwrap();
    assert_eq!(b[0].shape().dims(), &[3, 3]);
    assert_eq!(val(&b), vec![1, 0, 0, 2, 3, 4, 0, 0, 0]);
    q.enqueue(vec![Tensor::vector(&[5i64, 6])], WAIT).unwrap();
    q.close(false);
    let b = q.dequeue_up_to(4, WAIT).unwrap();
    assert_eq!((b[0].shape().dims().to_vec(), val(&b)), (vec![1, 2], vec![5, 6]));
}

#[test]
fn priority_queue_dequeues_smallest_first() {
    let q = Arc::new(
        Queue::new(
            "p",
            QueueSpec::new(
                QueueKind::Priority,
                10,
                &[DType::I64, DType::String],
                &[PartialShape::scalar(), PartialShape::scalar()],
            ),
        )
        .unwrap(),
    );
    for (p, s) in [(5i64, "e"), (1, "a"), (3, "c"), (1, "b")] {
        q.enqueue(vec![Tensor::scalar(p), Tensor::scalar_string(s)], WAIT).unwrap();
    }
    let b = q.dequeue_many(4, WAIT).unwrap();
    assert_eq!(b[0].to_vec::<i64>().unwrap(), vec![1, 1, 3, 5]);
    assert_eq!(b[1].strings().unwrap(), &[b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"e".to_vec()]);
}

#[test]
fn invalid_specs_are_rejected() {
    let cases = [
        (
            "min_after_dequeue >= capacity",
            QueueSpec::new(
                QueueKind::RandomShuffle { min_after_dequeue: 5, seed: 0, seed2: 0 },
                5,
                &[DType::I64],
                &[],
            ),
        ),
        (
            "padding needs known ranks",
            QueueSpec::new(QueueKind::PaddingFifo, 5, &[DType::I64], &[PartialShape::unknown()]),
        ),
        (
            "priority needs int64 first",
            QueueSpec::new(QueueKind::Priority, 5, &[DType::F32], &[PartialShape::scalar()]),
        ),
        ("no components", QueueSpec::new(QueueKind::Fifo, 5, &[], &[])),
    ];
    for (what, spec) in cases {
        assert_eq!(Queue::new("x", spec).err().map(|e| e.code), Some(Code::InvalidArgument), "{what}");
    }
}
