//! Trains a model on the UCI digits end to end: TFRecord files through the reader pipeline
//! (string_input_producer, TFRecordReader, parse_example, shuffle_batch), one tower per CPU device
//! with averaged gradients (`--devices N`), test accuracy, TensorBoard scalars, a checkpoint,
//! then a restore into a fresh session that goes on training from the saved step.
//!
//! `cargo run --release -p rill-train --example train_digits -- [--devices N] [--epochs E]
//! [--model mlp|cnn|all] [OUT_DIR]`

use rill_graph::{
    Code, DType, DirectSession, Error, Graph, Output, Result, RunOptions, Session, SessionOptions, Tensor,
};
use rill_queues::{Coordinator, QueueRunner};
use rill_train::digits::{self, DigitsInput, InputOptions, IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES};
use rill_train::models::{self, accuracy, softmax_loss};
use rill_train::replication::{average_gradients, in_graph_towers, mean_loss};
use rill_train::{create_global_step, standard_runtime, Adam, FileWriter, Optimizer, Saver, SaverOptions};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const LEARNING_RATE: f64 = 0.01;
const SEED: i64 = 1;
/// Test accuracy a trained model must reach.
const ACCURACY_MIN: f32 = 0.95;
/// Steps between loss summaries.
const SUMMARY_EVERY: i64 = 10;
/// Steps run after the restore.
const RESUME_STEPS: usize = 20;
const STEP_TIMEOUT_MS: u64 = 60_000;
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Model {
    Mlp,
    Cnn,
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::Mlp => "mlp",
            Model::Cnn => "cnn",
        }
    }

    /// Logits of `images` (`[n, 64]`); variables are shared between calls.
    fn logits(self, g: &Graph, images: Output) -> Output {
        match self {
            Model::Mlp => models::mlp(g, images, &[64], NUM_CLASSES, SEED),
            Model::Cnn => models::small_cnn(g, models::as_nhwc(g, images, IMAGE_SIDE), NUM_CLASSES, SEED),
        }
    }
}

struct Args {
    devices: usize,
    epochs: u64,
    models: Vec<Model>,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let usage = || {
        Error::invalid_argument(
            "usage: train_digits [--devices N] [--epochs E] [--model mlp|cnn|all] [OUT_DIR]",
        )
    };
    let mut args = Args {
        devices: 1,
        epochs: 15,
        models: vec![Model::Mlp, Model::Cnn],
        out: std::env::temp_dir().join(format!("rill-train-digits-{}", std::process::id())),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(usage);
        match a.as_str() {
            "--devices" => args.devices = value()?.parse().map_err(|_| usage())?,
            "--epochs" => args.epochs = value()?.parse().map_err(|_| usage())?,
            "--model" => {
                args.models = match value()?.as_str() {
                    "mlp" => vec![Model::Mlp],
                    "cnn" => vec![Model::Cnn],
                    "all" => vec![Model::Mlp, Model::Cnn],
                    _ => return Err(usage()),
                }
            }
            s if !s.starts_with("--") => args.out = PathBuf::from(s),
            _ => return Err(usage()),
        }
    }
    if args.devices == 0 || args.epochs == 0 {
        return Err(usage());
    }
    Ok(args)
}

/// The training graph: towers reading batches from one input pipeline, an evaluation copy of
/// the model on fed test data, and a saver.
struct Program {
    graph: Graph,
    runners: Vec<QueueRunner>,
    train: Output,
    loss: Output,
    step: Output,
    eval: (Output, Output, Output),
    init: Output,
    saver: Saver,
}

fn build(model: Model, devices: usize, epochs: u64) -> Result<Program> {
    let g = Graph::new();
    let step = create_global_step(&g)?;
    let files = digits::digits_files(digits::TRAIN_TFRECORDS);
    let opts = InputOptions {
        batch_size: BATCH,
        num_epochs: Some(epochs),
        shuffle: true,
        seed: SEED,
        ..Default::default()
    };
    let input: DigitsInput = digits::digits_input(&g, &files, &opts)?;
    // One dequeue per tower, next to the queue; the batches cross to the towers' devices.
    let batches: Vec<(Output, Output)> =
        (0..devices).map(|i| if i == 0 { (input.images, input.labels) } else { input.dequeue(&g) }).collect();
    let names: Vec<String> = (0..devices).map(|i| format!("/cpu:{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let opt = Adam::new(LEARNING_RATE);
    let towers = in_graph_towers(&g, &names, |g, i| {
        let (images, labels) = batches[i];
        let loss = softmax_loss(g, model.logits(g, images), labels);
        (loss, opt.compute_gradients(g, loss, &g.trainable_variables()))
    })?;
    let mut losses = Vec::new();
    let mut grads = Vec::new();
    for (loss, gv) in towers {
        losses.push(loss);
        grads.push(gv?);
    }
    let train = opt.apply_gradients(&g, &average_gradients(&g, &grads)?, Some(step), "train")?;
    let loss = mean_loss(&g, &losses);
    let x = g.placeholder("test_images", DType::F32, [None, Some(IMAGE_PIXELS)]);
    let y = g.placeholder("test_labels", DType::I64, [None]);
    let acc = accuracy(&g, model.logits(&g, x), y);
    let saver = Saver::new(&g, None, SaverOptions::default())?;
    let init = g.global_variables_initializer();
    g.status()?;
    Ok(Program { graph: g, runners: input.runners, train, loss, step, eval: (x, y, acc), init, saver })
}

fn session(p: &Program, devices: usize) -> Result<Arc<DirectSession>> {
    let opts = SessionOptions {
        device_count: BTreeMap::from([("CPU".to_string(), devices)]),
        inter_op_parallelism_threads: 2,
        ..Default::default()
    };
    Ok(Arc::new(DirectSession::new(&p.graph, &standard_runtime(), opts)?))
}

/// Runs the train op until the pipeline's epochs end or `max_steps` are done; writes the loss
/// every `SUMMARY_EVERY` steps. Returns the last global step and loss.
fn train_loop(
    p: &Program,
    sess: &Arc<DirectSession>,
    writer: &mut FileWriter,
    max_steps: Option<usize>,
) -> Result<(i64, f32)> {
    let dyn_sess: Arc<dyn Session> = sess.clone();
    let coord = Coordinator::new();
    rill_queues::start_queue_runners(&dyn_sess, &coord, &p.runners);
    let opts = RunOptions { timeout_in_ms: STEP_TIMEOUT_MS, ..Default::default() };
    // Counted here: a fetch of the variable in the train step could read it before or after
    // the step's own increment.
    let mut step = sess.run(&[], &[p.step], &[], &opts)?[0].scalar_value::<i64>()?;
    let (mut loss, mut done) = (f32::NAN, 0);
    let end = loop {
        if max_steps.is_some_and(|m| done >= m) {
            break None;
        }
        match sess.run(&[], &[p.loss], &[p.train], &opts) {
            Ok(t) => {
                loss = t[0].scalar_value::<f32>()?;
                step += 1;
                done += 1;
                if step % SUMMARY_EVERY == 0 {
                    writer.add_scalar("loss", loss, step)?;
                }
            }
            Err(e) if e.code == Code::OutOfRange => break None,
            Err(e) => break Some(e),
        }
    };
    coord.request_stop(end.clone());
    coord.join(STOP_GRACE)?;
    writer.flush()?;
    end.map_or(Ok((step, loss)), Err)
}

fn test_accuracy(p: &Program, sess: &DirectSession, test: &(Tensor, Tensor)) -> Result<f32> {
    let (x, y, acc) = p.eval;
    let feeds = [(x, test.0.clone()), (y, test.1.clone())];
    sess.run(&feeds, &[acc], &[], &RunOptions::default())?[0].scalar_value::<f32>()
}

fn run_model(model: Model, args: &Args, test: &(Tensor, Tensor)) -> Result<f32> {
    let out = args.out.join(format!("{}-{}dev", model.name(), args.devices));
    let mut p = build(model, args.devices, args.epochs)?;
    let mut writer = FileWriter::new(&out.join("logs"))?;
    let sess = session(&p, args.devices)?;
    sess.run(&[], &[], &[p.init], &RunOptions::default())?;
    let start = Instant::now();
    let (step, loss) = train_loop(&p, &sess, &mut writer, None)?;
    let secs = start.elapsed().as_secs_f64();
    let acc = test_accuracy(&p, &sess, test)?;
    writer.add_scalar("test_accuracy", acc, step)?;
    writer.flush()?;
    println!(
        "{}: {} device(s), {} epochs, {step} steps in {secs:.2} s, final loss {loss:.4}, test accuracy {:.2}%",
        model.name(),
        args.devices,
        args.epochs,
        acc * 100.0
    );
    let ckpt = p.saver.save(sess.as_ref(), &out.join("ckpt").join("model"), Some(step))?;
    println!("  checkpoint {}, events {}", ckpt.display(), writer.path().display());

    // A fresh session knows nothing of the first one: restore, check, and go on training.
    let fresh = session(&p, args.devices)?;
    p.saver.restore(fresh.as_ref(), &ckpt)?;
    let restored = test_accuracy(&p, &fresh, test)?;
    if restored != acc {
        return Err(Error::internal(format!("restored accuracy {restored} differs from saved {acc}")));
    }
    let (resumed, loss) = train_loop(&p, &fresh, &mut writer, Some(RESUME_STEPS))?;
    let acc_after = test_accuracy(&p, &fresh, test)?;
    writer.add_scalar("test_accuracy", acc_after, resumed)?;
    writer.flush()?;
    let ckpt = p.saver.save(fresh.as_ref(), &out.join("ckpt").join("model"), Some(resumed))?;
    println!(
        "  restored at step {step} (accuracy {:.2}%), continued to step {resumed}: loss {loss:.4}, test accuracy {:.2}%, {}",
        restored * 100.0,
        acc_after * 100.0,
        ckpt.display()
    );
    if resumed != step + RESUME_STEPS as i64 {
        return Err(Error::internal(format!("resumed at the wrong step: {resumed}")));
    }
    Ok(acc)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let test = digits::load_digits_tfrecords(&digits::digits_files(digits::TEST_TFRECORDS))?;
    for &model in &args.models {
        if model == Model::Cnn && !models::cnn_trainable_on_cpu() {
            println!("cnn: skipped, this build lacks the Conv2D/MaxPool CPU kernels or their gradients");
            continue;
        }
        let acc = run_model(model, &args, &test)?;
        if acc < ACCURACY_MIN {
            return Err(Error::internal(format!(
                "{}: test accuracy {acc} is below {ACCURACY_MIN}",
                model.name()
            )));
        }
    }
    println!("output in {}", args.out.display());
    Ok(())
}
