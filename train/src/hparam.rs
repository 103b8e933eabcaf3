//! One model per device: independent copies of a model, each with its own hyper-parameters and
//! variables, each pinned to its own device, trained side by side from one session (one run per
//! step feeds one minibatch to all of them and runs all their train ops).

use crate::digits::{Minibatches, IMAGE_PIXELS};
use crate::models::{accuracy, mlp, softmax_loss};
use crate::optimizer::{Momentum, Optimizer};
use rill_graph::{
    DType, DirectSession, Error, Graph, Output, Result, RunOptions, Runtime, Session, SessionOptions, Tensor,
};
use std::collections::BTreeMap;

/// Hyper-parameters of one model: an MLP trained with momentum 0.9.
#[derive(Clone, Debug, PartialEq)]
pub struct Trial {
    pub learning_rate: f64,
    pub hidden: Vec<usize>,
}

/// Options of `train_per_device`.
#[derive(Clone, Debug)]
pub struct PerDeviceOptions {
    pub steps: usize,
    pub batch_size: usize,
    pub classes: usize,
    /// Seeds the weights (the same for every trial) and the minibatch order.
    pub seed: i64,
    /// Threads of the session's inter-op pool (0 = one per core).
    pub inter_op_threads: usize,
}

impl Default for PerDeviceOptions {
    fn default() -> Self {
        PerDeviceOptions { steps: 200, batch_size: 64, classes: 10, seed: 1, inter_op_threads: 0 }
    }
}

/// What one trial reached.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialResult {
    pub trial: Trial,
    pub device: String,
    /// Loss on the last training minibatch.
    pub final_loss: f32,
    pub accuracy: f32,
}

struct Built {
    loss: Output,
    accuracy: Output,
    train: Output,
}

/// Trains one model per trial, trial `i` on `/cpu:i` of a session with one CPU device per
/// trial, on minibatches of `train` (images `[n, 64]` f32, labels `[n]` i64), and reports each
/// model's accuracy on `test`.
pub fn train_per_device(
    runtime: &Runtime,
    trials: &[Trial],
    train: &(Tensor, Tensor),
    test: &(Tensor, Tensor),
    opts: &PerDeviceOptions,
) -> Result<Vec<TrialResult>> {
    if trials.is_empty() {
        return Err(Error::invalid_argument("train_per_device needs at least one trial"));
    }
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, [None, Some(IMAGE_PIXELS)]);
    let y = g.placeholder("y", DType::I64, [None]);
    let devices: Vec<String> = (0..trials.len()).map(|i| format!("/cpu:{i}")).collect();
    let mut built = Vec::with_capacity(trials.len());
    for (i, trial) in trials.iter().enumerate() {
        let scope = format!("trial_{i}");
        let b = g.with_device(devices[i].as_str(), |g| -> Result<Built> {
            let logits = g.variable_scope(&scope, rill_graph::Reuse::No, |g| {
                mlp(g, x, &trial.hidden, opts.classes, opts.seed)
            });
            let loss = softmax_loss(g, logits, y);
            let own: Vec<_> = g
                .trainable_variables()
                .into_iter()
                .filter(|v| v.name.starts_with(&format!("{scope}/")))
                .collect();
            let opt = Momentum::new(trial.learning_rate, 0.9);
            let grads = opt.compute_gradients(g, loss, &own)?;
            let train = opt.apply_gradients(g, &grads, None, &format!("{scope}/train"))?;
            Ok(Built { loss, accuracy: accuracy(g, logits, y), train })
        })?;
        built.push(b);
    }
    let init = g.global_variables_initializer();
    let sess_opts = SessionOptions {
        device_count: BTreeMap::from([("CPU".to_string(), trials.len())]),
        inter_op_parallelism_threads: opts.inter_op_threads,
        ..Default::default()
    };
    let sess = DirectSession::new(&g, runtime, sess_opts)?;
    let run = RunOptions::default();
    sess.run(&[], &[], &[init], &run)?;
    let losses: Vec<Output> = built.iter().map(|b| b.loss).collect();
    let trains: Vec<Output> = built.iter().map(|b| b.train).collect();
    let mut batches = Minibatches::new(&train.0, &train.1, opts.seed as u64)?;
    let mut last = vec![f32::NAN; trials.len()];
    for _ in 0..opts.steps {
        let (bx, by) = batches.next_batch(opts.batch_size)?;
        let out = sess.run(&[(x, bx), (y, by)], &losses, &trains, &run)?;
        for (l, t) in last.iter_mut().zip(&out) {
            *l = t.scalar_value::<f32>()?;
        }
    }
    let accs: Vec<Output> = built.iter().map(|b| b.accuracy).collect();
    let out = sess.run(&[(x, test.0.clone()), (y, test.1.clone())], &accs, &[], &run)?;
    trials
        .iter()
        .zip(devices)
        .zip(last.into_iter().zip(out))
        .map(|((trial, device), (final_loss, acc))| {
            Ok(TrialResult { trial: trial.clone(), device, final_loss, accuracy: acc.scalar_value::<f32>()? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digits::{digits_dir, load_digits_csv, TEST_CSV, TRAIN_CSV};

    #[test]
    fn each_trial_trains_on_its_own_device() {
        let train = load_digits_csv(&digits_dir().join(TRAIN_CSV)).unwrap();
        let test = load_digits_csv(&digits_dir().join(TEST_CSV)).unwrap();
        let trials = [1e-4, 0.05].map(|lr| Trial { learning_rate: lr, hidden: vec![32] });
        let opts = PerDeviceOptions { steps: 150, ..Default::default() };
        let r = train_per_device(&crate::standard_runtime(), &trials, &train, &test, &opts).unwrap();
        let devices: Vec<&str> = r.iter().map(|t| t.device.as_str()).collect();
        assert_eq!(devices, ["/cpu:0", "/cpu:1"]);
        assert!(r[1].accuracy > 0.9, "a good rate learns: {r:?}");
        assert!(r[0].accuracy < r[1].accuracy, "a tiny rate learns less: {r:?}");
    }
}
