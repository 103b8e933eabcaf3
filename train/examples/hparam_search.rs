//! A learning-rate search on the digits with one model per device: every candidate is its own
//! MLP pinned to its own CPU device, all trained side by side from one session, one run per step.
//!
//! `cargo run --release -p rill-train --example hparam_search`

use rill_graph::Result;
use rill_train::digits;
use rill_train::hparam::{train_per_device, PerDeviceOptions, Trial};
use std::time::Instant;

const LEARNING_RATES: &[f64] = &[0.001, 0.01, 0.05, 0.2, 1.0];
const HIDDEN: &[usize] = &[64];

fn main() -> Result<()> {
    let dir = digits::digits_dir();
    let train = digits::load_digits_csv(&dir.join(digits::TRAIN_CSV))?;
    let test = digits::load_digits_csv(&dir.join(digits::TEST_CSV))?;
    let trials: Vec<Trial> =
        LEARNING_RATES.iter().map(|&lr| Trial { learning_rate: lr, hidden: HIDDEN.to_vec() }).collect();
    let opts = PerDeviceOptions { steps: 300, ..Default::default() };
    let start = Instant::now();
    let results = train_per_device(&rill_train::standard_runtime(), &trials, &train, &test, &opts)?;
    println!(
        "{} models on {} CPU devices, {} steps each, in {:.2} s",
        trials.len(),
        trials.len(),
        opts.steps,
        start.elapsed().as_secs_f64()
    );
    println!("{:<14} {:>13} {:>10} {:>14}", "device", "learning rate", "last loss", "test accuracy");
    for r in &results {
        println!(
            "{:<14} {:>13} {:>10.4} {:>13.2}%",
            r.device,
            r.trial.learning_rate,
            r.final_loss,
            r.accuracy * 100.0
        );
    }
    if let Some(best) = results.iter().max_by(|a, b| a.accuracy.total_cmp(&b.accuracy)) {
        println!(
            "best: learning rate {} on {} ({:.2}%)",
            best.trial.learning_rate,
            best.device,
            best.accuracy * 100.0
        );
    }
    Ok(())
}
