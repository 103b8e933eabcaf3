//! Shared helpers for rill's cross-crate tests and benchmark programs: timing in the format of
//! the TensorFlow peer scripts (`RESULT <name> = <value> <unit> [spread]`), medians of repetitions.

use std::time::Instant;

/// Runs `f` `inner` times per repetition after a warm-up; returns seconds per call of each
/// repetition.
pub fn bench(mut f: impl FnMut(), inner: usize, reps: usize) -> Vec<f64> {
    for _ in 0..(inner / 10).max(1) {
        f();
    }
    (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..inner {
                f();
            }
            t0.elapsed().as_secs_f64() / inner as f64
        })
        .collect()
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `[min X% max Y% of median, n=N]`, the peer scripts' noise indicator.
pub fn spread(xs: &[f64]) -> String {
    let m = median(xs);
    let min = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("[min {:.0}% max {:.0}% of median, n={}]", min / m * 100.0, max / m * 100.0, xs.len())
}

/// Prints one result line.
pub fn line(name: &str, value: f64, unit: &str, extra: &str) {
    println!("RESULT {name} = {value:.3} {unit} {extra}");
}

/// Deterministic pseudo-random values: a 64-bit LCG, then Box-Muller for normals.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}
