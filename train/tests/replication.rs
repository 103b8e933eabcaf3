//! In-graph replication on several CPU devices of one session: synchronous towers train exactly
//! as one device on the concatenated batch; asynchronous towers, each run by its own client
//! thread on one shared session, all make progress and the loss falls.

use rill_graph::{DType, DirectSession, Graph, Output, RunOptions, Session, SessionOptions, Tensor};
use rill_train::digits::{self, Minibatches, IMAGE_PIXELS, NUM_CLASSES};
use rill_train::models::{mlp, softmax_loss};
use rill_train::replication::{average_gradients, in_graph_towers, mean_loss};
use rill_train::{create_global_step, standard_runtime, GradientDescent, Optimizer};
use std::collections::BTreeMap;
use std::sync::Arc;

const HIDDEN: &[usize] = &[32];
const TOWER_BATCH: usize = 16;
const SYNC_STEPS: usize = 5;
const LEARNING_RATE: f64 = 0.5;

fn session(g: &Graph, cpus: usize) -> DirectSession {
    let opts = SessionOptions {
        device_count: BTreeMap::from([("CPU".to_string(), cpus)]),
        inter_op_parallelism_threads: 2,
        ..Default::default()
    };
    DirectSession::new(g, &standard_runtime(), opts).unwrap()
}

fn run(
    sess: &dyn Session,
    feeds: &[(Output, Tensor)],
    fetches: &[Output],
    targets: &[Output],
) -> Vec<Tensor> {
    let opts = RunOptions { timeout_in_ms: 30_000, ..Default::default() };
    sess.run(feeds, fetches, targets, &opts).unwrap()
}

fn train_set() -> (Tensor, Tensor) {
    digits::load_digits_csv(&digits::digits_dir().join(digits::TRAIN_CSV)).unwrap()
}

fn x_y(g: &Graph, name: &str) -> (Output, Output) {
    (
        g.placeholder(&format!("{name}_x"), DType::F32, [None, Some(IMAGE_PIXELS)]),
        g.placeholder(&format!("{name}_y"), DType::I64, [None]),
    )
}

/// The losses of each step and the final variables (by name) of `SYNC_STEPS` steps on batches
/// of `towers * TOWER_BATCH` rows: on `towers` towers (one per CPU device) when `replicated`,
/// else on one device.
fn train_sync(towers: usize, replicated: bool) -> (Vec<f32>, BTreeMap<String, Vec<f32>>) {
    let g = Graph::new();
    let opt = GradientDescent::new(LEARNING_RATE);
    let (inputs, loss, train) = if replicated {
        let devices: Vec<String> = (0..towers).map(|i| format!("/cpu:{i}")).collect();
        let devices: Vec<&str> = devices.iter().map(String::as_str).collect();
        let built = in_graph_towers(&g, &devices, |g, i| {
            let (x, y) = x_y(g, &format!("t{i}"));
            let loss = softmax_loss(g, mlp(g, x, HIDDEN, NUM_CLASSES, 7), y);
            let grads = opt.compute_gradients(g, loss, &g.trainable_variables()).unwrap();
            ((x, y), loss, grads)
        })
        .unwrap();
        let grads: Vec<_> = built.iter().map(|t| t.2.clone()).collect();
        let train = opt.apply_gradients(&g, &average_gradients(&g, &grads).unwrap(), None, "train").unwrap();
        let losses: Vec<Output> = built.iter().map(|t| t.1).collect();
        (built.iter().map(|t| t.0).collect::<Vec<_>>(), mean_loss(&g, &losses), train)
    } else {
        let (x, y) = x_y(&g, "all");
        let loss = softmax_loss(&g, mlp(&g, x, HIDDEN, NUM_CLASSES, 7), y);
        (vec![(x, y)], loss, opt.minimize(&g, loss, None).unwrap())
    };
    let vars = g.trainable_variables();
    let init = g.global_variables_initializer();
    let sess = session(&g, if replicated { towers } else { 1 });
    run(&sess, &[], &[], &[init]);
    let (images, labels) = train_set();
    let mut batches = Minibatches::new(&images, &labels, 11).unwrap();
    let mut losses = Vec::new();
    for _ in 0..SYNC_STEPS {
        let (bx, by) = batches.next_batch(towers * TOWER_BATCH).unwrap();
        let part = inputs.len();
        let rows = towers * TOWER_BATCH / part;
        let mut feeds = Vec::new();
        for (i, &(x, y)) in inputs.iter().enumerate() {
            feeds.push((x, bx.slice_rows(i * rows, (i + 1) * rows).unwrap()));
            feeds.push((y, by.slice_rows(i * rows, (i + 1) * rows).unwrap()));
        }
        losses.push(run(&sess, &feeds, &[loss], &[train])[0].scalar_value::<f32>().unwrap());
    }
    let reads: Vec<Output> = vars.iter().map(|v| v.var).collect();
    let values = run(&sess, &[], &reads, &[]);
    let weights =
        vars.iter().zip(values).map(|(v, t)| (v.name.clone(), t.to_vec::<f32>().unwrap())).collect();
    (losses, weights)
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}[{i}]: {a} vs {b}");
    }
}

#[test]
fn sync_towers_train_as_one_device_on_the_whole_batch() {
    for towers in [2, 3] {
        let (tower_losses, tower_weights) = train_sync(towers, true);
        let (losses, weights) = train_sync(towers, false);
        assert_close(&format!("{towers} towers: losses"), &tower_losses, &losses);
        assert!(losses.last() < losses.first(), "{towers} towers: loss falls: {losses:?}");
        assert_eq!(tower_weights.keys().collect::<Vec<_>>(), weights.keys().collect::<Vec<_>>());
        for (name, w) in &weights {
            assert_close(&format!("{towers} towers: {name}"), &tower_weights[name], w);
        }
    }
}

#[test]
fn a_tower_that_creates_its_own_variables_is_refused() {
    let g = Graph::new();
    let err = in_graph_towers(&g, &["/cpu:0", "/cpu:1"], |g, i| g.variable(&format!("v{i}"), g.zeros([1])))
        .unwrap_err();
    assert!(err.msg.contains("tower 1") && err.msg.contains("v1"), "{err}");
}

const ASYNC_STEPS: usize = 150;

#[test]
fn async_towers_each_make_progress_and_the_loss_falls() {
    for towers in [2, 3] {
        let g = Graph::new();
        let step = create_global_step(&g).unwrap();
        let opt = GradientDescent::new(0.2);
        let devices: Vec<String> = (0..towers).map(|i| format!("/cpu:{i}")).collect();
        let devices: Vec<&str> = devices.iter().map(String::as_str).collect();
        let built = in_graph_towers(&g, &devices, |g, i| {
            let (x, y) = x_y(g, &format!("t{i}"));
            let loss = softmax_loss(g, mlp(g, x, HIDDEN, NUM_CLASSES, 7), y);
            let grads = opt.compute_gradients(g, loss, &g.trainable_variables()).unwrap();
            let train = opt.apply_gradients(g, &grads, Some(step), &format!("train_{i}")).unwrap();
            (x, y, train)
        })
        .unwrap();
        let (ex, ey) = x_y(&g, "eval");
        let eval_loss = softmax_loss(&g, mlp(&g, ex, HIDDEN, NUM_CLASSES, 7), ey);
        let init = g.global_variables_initializer();
        let sess = Arc::new(session(&g, towers));
        run(sess.as_ref(), &[], &[], &[init]);
        let (images, labels) = train_set();
        let full_loss = |sess: &DirectSession| {
            let feeds = [(ex, images.clone()), (ey, labels.clone())];
            run(sess, &feeds, &[eval_loss], &[])[0].scalar_value::<f32>().unwrap()
        };
        let before = full_loss(&sess);
        let threads: Vec<_> = built
            .iter()
            .enumerate()
            .map(|(i, &(x, y, train))| {
                let (sess, images, labels) = (sess.clone(), images.clone(), labels.clone());
                std::thread::spawn(move || {
                    let mut batches = Minibatches::new(&images, &labels, i as u64).unwrap();
                    let mut done = 0;
                    for _ in 0..ASYNC_STEPS {
                        let (bx, by) = batches.next_batch(TOWER_BATCH).unwrap();
                        run(sess.as_ref(), &[(x, bx), (y, by)], &[], &[train]);
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        let done: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(done, vec![ASYNC_STEPS; towers]);
        let steps = run(sess.as_ref(), &[], &[step], &[])[0].scalar_value::<i64>().unwrap();
        assert_eq!(steps, (towers * ASYNC_STEPS) as i64, "every tower's steps count");
        let after = full_loss(&sess);
        assert!(after < 0.3 * before, "{towers} towers: loss {before} -> {after}");
    }
}
