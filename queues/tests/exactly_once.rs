//! Exactly-once delivery under stress: producers and consumers with random timeouts and a close;
//! every item enqueued is dequeued once or still in the queue, never lost or duplicated.

use rill_graph::{Code, DType, PartialShape, Tensor};
use rill_queues::{Queue, QueueKind, QueueSpec, Rng};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const PRODUCERS: i64 = 4;
const CONSUMERS: usize = 4;
const ITEMS_PER_PRODUCER: i64 = 2_000;
const CAPACITY: i64 = 16;
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// What a producer learned about each item it offered.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    /// The enqueue reported success: the item must be delivered exactly once.
    Confirmed,
    /// A single enqueue failed: the item must never appear.
    Rejected,
    /// Row `k` of an enqueue_many that failed: rows enter in order, so a prefix may appear.
    Partial { batch: i64, k: usize },
}

fn run(kind: QueueKind, seed: u64) {
    let q = Arc::new(
        Queue::new(
            "stress",
            QueueSpec::new(kind.clone(), CAPACITY, &[DType::I64], &[PartialShape::scalar()]),
        )
        .unwrap(),
    );
    let fates = Arc::new(Mutex::new(HashMap::new()));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (q, fates) = (q.clone(), fates.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (p as u64 * 7919));
                let mut next = 0;
                while next < ITEMS_PER_PRODUCER {
                    let timeout = Duration::from_micros(rng.below(3000) as u64);
                    let n = (1 + rng.below(5) as i64).min(ITEMS_PER_PRODUCER - next);
                    let ids: Vec<i64> = (next..next + n).map(|k| p * 1_000_000 + k).collect();
                    next += n;
                    let r = if n == 1 {
                        q.enqueue(vec![Tensor::scalar(ids[0])], timeout)
                    } else {
                        q.enqueue_many(vec![Tensor::vector(&ids)], timeout)
                    };
                    let mut f = fates.lock().unwrap();
                    for (k, id) in ids.iter().enumerate() {
                        let fate = match (&r, n) {
                            (Ok(()), _) => Fate::Confirmed,
                            (Err(_), 1) => Fate::Rejected,
                            (Err(_), _) => Fate::Partial { batch: ids[0], k },
                        };
                        f.insert(*id, fate);
                    }
                    if let Err(e) = &r {
                        assert!(matches!(e.code, Code::DeadlineExceeded | Code::Cancelled), "{e}");
                    }
                }
            })
        })
        .collect();
    let got = Arc::new(Mutex::new(Vec::new()));
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|c| {
            let (q, got) = (q.clone(), got.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(seed.wrapping_add(c as u64 * 104_729));
                loop {
                    let timeout = Duration::from_micros(rng.below(3000) as u64);
                    let k = 1 + rng.below(6);
                    let r = match rng.below(3) {
                        0 => q.dequeue(timeout),
                        1 => q.dequeue_many(k, timeout),
                        _ => q.dequeue_up_to(k, timeout),
                    };
                    match r {
                        Ok(t) => got.lock().unwrap().extend(t[0].to_vec::<i64>().unwrap()),
                        Err(e) if e.code == Code::DeadlineExceeded => {}
                        Err(e) if e.code == Code::OutOfRange => return,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    q.close(false);
    for c in consumers {
        c.join().unwrap();
    }
    // What is left after the consumers stopped (a dequeue_many can stop with items left).
    let mut delivered = got.lock().unwrap().clone();
    if q.size() > 0 {
        delivered.extend(q.dequeue_up_to(q.size(), DRAIN_WAIT).unwrap()[0].to_vec::<i64>().unwrap());
    }
    assert_eq!(q.size(), 0);
    let mut count: HashMap<i64, usize> = HashMap::new();
    for id in &delivered {
        *count.entry(*id).or_default() += 1;
    }
    let fates = fates.lock().unwrap();
    for (id, n) in &count {
        assert_eq!(*n, 1, "item {id} delivered {n} times ({kind:?})");
        assert!(fates.contains_key(id), "item {id} was never offered");
    }
    let mut confirmed = 0;
    for (id, fate) in fates.iter() {
        let present = count.contains_key(id);
        match fate {
            Fate::Confirmed => {
                confirmed += 1;
                assert!(present, "confirmed item {id} was lost ({kind:?})");
            }
            Fate::Rejected => assert!(!present, "rejected item {id} was delivered"),
            Fate::Partial { batch, k } if present && *k > 0 => {
                assert!(
                    count.contains_key(&(batch + *k as i64 - 1)),
                    "rows of batch {batch} entered out of order"
                );
            }
            Fate::Partial { .. } => {}
        }
    }
    assert!(confirmed > 0, "the stress test confirmed no item at all");
}

#[test]
fn fifo_delivers_exactly_once() {
    run(QueueKind::Fifo, 1);
}

#[test]
fn random_shuffle_delivers_exactly_once() {
    run(QueueKind::RandomShuffle { min_after_dequeue: 4, seed: 5, seed2: 0 }, 2);
}

#[test]
fn padding_fifo_delivers_exactly_once() {
    run(QueueKind::PaddingFifo, 3);
}
