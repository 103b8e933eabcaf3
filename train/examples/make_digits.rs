//! Builds `train/data/digits/` from scikit-learn's copy of the UCI digits
//! (`sklearn/datasets/data/digits.csv.gz`, decompressed): a stratified split of `TEST_ROWS` test
//! rows drawn with a fixed seed, the rest the training split, each in source order, written as
//! CSV and as gzipped TFRecords of Examples.
//!
//! `cargo run -p rill-train --example make_digits -- digits.csv [out_dir]`

use rill_graph::{Error, Result};
use rill_train::digits::{self, DigitRow};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Rows in the source file.
const ROWS: usize = 1797;
/// Rows in the test split.
const TEST_ROWS: usize = 297;
/// Seed of the split's shuffle.
const SPLIT_SEED: u64 = 1998;

/// Which rows are test rows: the rows shuffled by a seeded LCG, grouped by class (stable), and
/// every row where `k * TEST_ROWS / ROWS` steps up taken: each class gives its share, within one.
fn test_rows(rows: &[DigitRow]) -> Vec<bool> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut state = SPLIT_SEED;
    for i in (1..order.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        order.swap(i, ((state >> 33) % (i as u64 + 1)) as usize);
    }
    order.sort_by_key(|&r| rows[r].label);
    let mut test = vec![false; rows.len()];
    for (k, &r) in order.iter().enumerate() {
        test[r] = (k + 1) * TEST_ROWS / rows.len() > k * TEST_ROWS / rows.len();
    }
    test
}

fn write_csv(path: &Path, rows: &[DigitRow]) -> Result<()> {
    let mut text = String::with_capacity(rows.len() * 3 * (digits::IMAGE_PIXELS + 1));
    for r in rows {
        for p in r.pixels {
            let _ = write!(text, "{p},");
        }
        let _ = writeln!(text, "{}", r.label);
    }
    std::fs::write(path, text).map_err(|e| Error::from(e).context(path.display()))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(source) = args.next() else {
        return Err(Error::invalid_argument("usage: make_digits <digits.csv> [out_dir]"));
    };
    let out = args.next().map(PathBuf::from).unwrap_or_else(digits::digits_dir);
    let rows = digits::read_digits_csv(Path::new(&source))?;
    if rows.len() != ROWS {
        return Err(Error::invalid_argument(format!("{source}: {} rows, expected {ROWS}", rows.len())));
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::from(e).context(out.display()))?;
    let is_test = test_rows(&rows);
    let pick = |want: bool| -> Vec<DigitRow> {
        rows.iter().zip(&is_test).filter(|(_, &t)| t == want).map(|(r, _)| r.clone()).collect()
    };
    let (train, test) = (&pick(false)[..], &pick(true)[..]);
    write_csv(&out.join(digits::TRAIN_CSV), train)?;
    write_csv(&out.join(digits::TEST_CSV), test)?;
    let shard = train.len().div_ceil(digits::TRAIN_TFRECORDS.len());
    for (name, rows) in digits::TRAIN_TFRECORDS.iter().zip(train.chunks(shard)) {
        digits::write_digits_tfrecord(&out.join(name), rows)?;
    }
    digits::write_digits_tfrecord(&out.join(digits::TEST_TFRECORDS[0]), test)?;
    let count = |rows: &[DigitRow]| {
        let mut c = [0usize; digits::NUM_CLASSES];
        rows.iter().for_each(|r| c[usize::from(r.label)] += 1);
        c
    };
    println!("train {} rows, per class {:?}", train.len(), count(train));
    println!("test {} rows, per class {:?}", test.len(), count(test));
    println!("written to {}", out.display());
    Ok(())
}
