//! The shipped digits: the CSV and TFRecord files hold the same rows, the reader pipeline yields
//! each of them once per epoch, and the MLP learns them to at least 95% test accuracy; the CNN
//! builds, and trains where the Conv2D and MaxPool kernels and gradients exist.

use rill_graph::{Code, DType, DirectSession, Graph, Output, RunOptions, Session, SessionOptions, Tensor};
use rill_queues::Coordinator;
use rill_train::digits::{self, InputOptions, Minibatches, IMAGE_PIXELS, NUM_CLASSES};
use rill_train::models::{self, accuracy, softmax_loss};
use rill_train::{standard_runtime, Adam, Optimizer};
use std::sync::Arc;
use std::time::Duration;

const GRACE: Duration = Duration::from_secs(5);

fn run(
    sess: &dyn Session,
    feeds: &[(Output, Tensor)],
    fetches: &[Output],
    targets: &[Output],
) -> Vec<Tensor> {
    let opts = RunOptions { timeout_in_ms: 30_000, ..Default::default() };
    sess.run(feeds, fetches, targets, &opts).unwrap()
}

#[test]
fn the_shipped_files_hold_the_split() {
    let dir = digits::digits_dir();
    let cases = [(digits::TRAIN_CSV, 1500), (digits::TEST_CSV, 297)];
    for (file, rows) in cases {
        let (images, labels) = digits::load_digits_csv(&dir.join(file)).unwrap();
        assert_eq!(images.shape().dims(), [rows, IMAGE_PIXELS], "{file}");
        assert_eq!(labels.shape().dims(), [rows], "{file}");
        let pixels = images.to_vec::<f32>().unwrap();
        assert!(pixels.iter().all(|p| (0.0..=1.0).contains(p)), "{file}: pixels scaled to [0, 1]");
        let mut per_class = [0; NUM_CLASSES];
        labels.to_vec::<i64>().unwrap().iter().for_each(|&l| per_class[l as usize] += 1);
        assert!(per_class.iter().all(|&n| n * NUM_CLASSES * 10 > rows * 8), "{file}: {per_class:?}");
    }
    let cases = [(digits::TRAIN_TFRECORDS, digits::TRAIN_CSV), (digits::TEST_TFRECORDS, digits::TEST_CSV)];
    for (records, csv) in cases {
        let (images, labels) = digits::load_digits_tfrecords(&digits::digits_files(records)).unwrap();
        let (want_images, want_labels) = digits::load_digits_csv(&dir.join(csv)).unwrap();
        assert_eq!(labels.to_vec::<i64>().unwrap(), want_labels.to_vec::<i64>().unwrap(), "{csv}");
        assert_eq!(images.to_vec::<f32>().unwrap(), want_images.to_vec::<f32>().unwrap(), "{csv}");
    }
}

/// The reader pipeline over the TFRecord files, unshuffled, yields the CSV rows in order.
#[test]
fn the_reader_pipeline_yields_the_csv_rows_once_per_epoch() {
    let cases = [(digits::TRAIN_TFRECORDS, digits::TRAIN_CSV), (digits::TEST_TFRECORDS, digits::TEST_CSV)];
    for (records, csv) in cases {
        let (want_images, want_labels) = digits::load_digits_csv(&digits::digits_dir().join(csv)).unwrap();
        let g = Graph::new();
        let opts =
            InputOptions { batch_size: 100, num_epochs: Some(1), shuffle: false, ..Default::default() };
        let input = digits::digits_input(&g, &digits::digits_files(records), &opts).unwrap();
        let sess: Arc<dyn Session> =
            Arc::new(DirectSession::new(&g, &standard_runtime(), SessionOptions::default()).unwrap());
        let coord = Coordinator::new();
        rill_queues::start_queue_runners(&sess, &coord, &input.runners);
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        let end = loop {
            match sess.run(&[], &[input.images, input.labels], &[], &RunOptions::default()) {
                Ok(t) => {
                    images.extend(t[0].to_vec::<f32>().unwrap());
                    labels.extend(t[1].to_vec::<i64>().unwrap());
                }
                Err(e) => break e,
            }
        };
        assert_eq!(end.code, Code::OutOfRange, "{end}");
        coord.request_stop(None);
        coord.join(GRACE).unwrap();
        assert_eq!(labels, want_labels.to_vec::<i64>().unwrap(), "{csv}");
        assert_eq!(images, want_images.to_vec::<f32>().unwrap(), "{csv}");
    }
}

/// Trains `model` with Adam on fed minibatches of the training CSV; returns the test accuracy.
fn train_and_test(model: impl Fn(&Graph, Output) -> Output, steps: usize, lr: f64) -> f32 {
    train_and_test_on("", SessionOptions::default(), model, steps, lr).unwrap()
}

/// `train_and_test` with the model built under the device scope `device`.
fn train_and_test_on(
    device: &str,
    opts: SessionOptions,
    model: impl Fn(&Graph, Output) -> Output,
    steps: usize,
    lr: f64,
) -> rill_graph::Result<f32> {
    let dir = digits::digits_dir();
    let (train_x, train_y) = digits::load_digits_csv(&dir.join(digits::TRAIN_CSV)).unwrap();
    let (test_x, test_y) = digits::load_digits_csv(&dir.join(digits::TEST_CSV)).unwrap();
    let g = Graph::new();
    let (x, y, acc, train, init) = g.with_device(device, |g| {
        let x = g.placeholder("x", DType::F32, [None, Some(IMAGE_PIXELS)]);
        let y = g.placeholder("y", DType::I64, [None]);
        let logits = model(g, x);
        let loss = softmax_loss(g, logits, y);
        let acc = accuracy(g, logits, y);
        let train = Adam::new(lr).minimize(g, loss, None).unwrap();
        (x, y, acc, train, g.global_variables_initializer())
    });
    let sess = DirectSession::new(&g, &standard_runtime(), opts)?;
    sess.run(&[], &[], &[init], &RunOptions { timeout_in_ms: 30_000, ..Default::default() })?;
    let mut batches = Minibatches::new(&train_x, &train_y, 1).unwrap();
    for _ in 0..steps {
        let (bx, by) = batches.next_batch(64).unwrap();
        run(&sess, &[(x, bx), (y, by)], &[], &[train]);
    }
    run(&sess, &[(x, test_x), (y, test_y)], &[acc], &[])[0].scalar_value::<f32>()
}

#[test]
fn a_model_built_for_the_gpu_trains_wherever_soft_placement_puts_it() {
    // Without a GPU every op falls back to the CPU; with one, the GPU runs what it has kernels for.
    let soft = SessionOptions { allow_soft_placement: true, ..Default::default() };
    let mlp = |g: &Graph, x| models::mlp(g, x, &[64], NUM_CLASSES, 1);
    let acc = train_and_test_on("/device:GPU:0", soft, mlp, 300, 0.01).unwrap();
    assert!(acc >= 0.95, "test accuracy {acc}");
    if rill_device_cuda::CudaDeviceFactory::new().load_driver().is_err() {
        let e = train_and_test_on("/device:GPU:0", SessionOptions::default(), mlp, 1, 0.01).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{e}");
    }
}

#[test]
fn the_mlp_learns_the_digits() {
    let acc = train_and_test(|g, x| models::mlp(g, x, &[64], NUM_CLASSES, 1), 300, 0.01);
    assert!(acc >= 0.95, "test accuracy {acc}");
}

#[test]
fn the_cnn_builds_and_learns_where_its_kernels_exist() {
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [None, Some(IMAGE_PIXELS)]);
    let logits = models::small_cnn(&g, models::as_nhwc(&g, x, digits::IMAGE_SIDE), NUM_CLASSES, 1);
    g.status().unwrap();
    assert_eq!(g.shape(logits).dims, Some(vec![None, Some(NUM_CLASSES)]));
    if models::cnn_trainable_on_cpu() {
        let acc = train_and_test(
            |g, x| models::small_cnn(g, models::as_nhwc(g, x, digits::IMAGE_SIDE), NUM_CLASSES, 1),
            300,
            0.01,
        );
        assert!(acc >= 0.95, "CNN test accuracy {acc}");
    }
}
