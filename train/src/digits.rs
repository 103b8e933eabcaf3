//! The UCI handwritten digits shipped in `train/data/digits/`: where they are, a CSV loader into
//! tensors, the TFRecord encoding of one image, and an input pipeline built from rill's readers.

use rill_graph::{DType, Error, Graph, Output, Result, Shape, Tensor};
use rill_queues::{self as rq, BatchOptions, Compression, DenseFeature, Example, Feature, ProducerOptions};
use rill_queues::{QueueRunner, TfRecordWriter};
use std::path::{Path, PathBuf};

/// Pixels of one image (8 × 8).
pub const IMAGE_PIXELS: usize = 64;
/// Side of an image in pixels.
pub const IMAGE_SIDE: usize = 8;
pub const NUM_CLASSES: usize = 10;
/// Largest pixel value: each pixel counts the set bits of a 4 × 4 block.
pub const PIXEL_MAX: u8 = 16;
/// Environment variable that overrides `digits_dir()`.
pub const DIGITS_DIR_ENV: &str = "RILL_DIGITS_DIR";
/// Largest digits CSV file read; the shipped ones are about 200 KiB.
const CSV_BYTES_MAX: u64 = 16 << 20;

pub const TRAIN_CSV: &str = "train.csv";
pub const TEST_CSV: &str = "test.csv";
pub const TRAIN_TFRECORDS: &[&str] =
    &["train-00000-of-00002.tfrecord.gz", "train-00001-of-00002.tfrecord.gz"];
pub const TEST_TFRECORDS: &[&str] = &["test-00000-of-00001.tfrecord.gz"];

/// The folder of the shipped data set: `$RILL_DIGITS_DIR` when set, else `train/data/digits`
/// of this crate's source tree.
pub fn digits_dir() -> PathBuf {
    match std::env::var_os(DIGITS_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join("digits"),
    }
}

/// Paths of `names` in `digits_dir()`, as the strings a `string_input_producer` takes.
pub fn digits_files(names: &[&str]) -> Vec<String> {
    let dir = digits_dir();
    names.iter().map(|n| dir.join(n).display().to_string()).collect()
}

/// One image: 64 pixels in 0..=16, row-major, and its class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigitRow {
    pub pixels: [u8; IMAGE_PIXELS],
    pub label: u8,
}

impl DigitRow {
    /// The pixels scaled to [0, 1].
    pub fn scaled(&self) -> [f32; IMAGE_PIXELS] {
        self.pixels.map(|p| f32::from(p) / f32::from(PIXEL_MAX))
    }

    /// The `tf.train.Example` of this image: `image` (64 floats in [0, 1]) and `label` (int64).
    pub fn example(&self) -> Example {
        Example::new()
            .with("image", Feature::Float(self.scaled().to_vec()))
            .with("label", Feature::Int64(vec![i64::from(self.label)]))
    }
}

/// Parses digits CSV: one image per line, 64 pixel values then the label; blank lines are
/// skipped. `origin` names the source in errors.
pub fn parse_digits_csv(text: &str, origin: &str) -> Result<Vec<DigitRow>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| Error::invalid_argument(format!("{origin}:{}: {why}", i + 1));
        let mut values = [0u8; IMAGE_PIXELS + 1];
        let mut n = 0;
        for field in line.split(',') {
            if n == values.len() {
                return Err(bad(format!("more than {} fields", values.len())));
            }
            values[n] = field.trim().parse::<u8>().map_err(|e| bad(format!("field {}: {e}", n + 1)))?;
            n += 1;
        }
        if n != values.len() {
            return Err(bad(format!("{n} fields, expected {}", values.len())));
        }
        let mut pixels = [0u8; IMAGE_PIXELS];
        pixels.copy_from_slice(&values[..IMAGE_PIXELS]);
        if let Some(p) = pixels.iter().find(|&&p| p > PIXEL_MAX) {
            return Err(bad(format!("pixel value {p} is above {PIXEL_MAX}")));
        }
        let label = values[IMAGE_PIXELS];
        if usize::from(label) >= NUM_CLASSES {
            return Err(bad(format!("label {label} is not a digit")));
        }
        rows.push(DigitRow { pixels, label });
    }
    Ok(rows)
}

/// Reads a digits CSV file into rows.
pub fn read_digits_csv(path: &Path) -> Result<Vec<DigitRow>> {
    let ctx = |e: std::io::Error| Error::from(e).context(path.display());
    let size = std::fs::metadata(path).map_err(ctx)?.len();
    if size > CSV_BYTES_MAX {
        return Err(Error::invalid_argument(format!(
            "{}: {size} bytes is more than a digits file can be ({CSV_BYTES_MAX})",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(ctx)?;
    parse_digits_csv(&text, &path.display().to_string())
}

/// Images `[n, 64]` f32 scaled to [0, 1] and labels `[n]` i64 of `rows`.
pub fn rows_to_tensors(rows: &[DigitRow]) -> Result<(Tensor, Tensor)> {
    let pixels: Vec<f32> = rows.iter().flat_map(|r| r.scaled()).collect();
    let labels: Vec<i64> = rows.iter().map(|r| i64::from(r.label)).collect();
    Ok((Tensor::new([rows.len(), IMAGE_PIXELS], &pixels)?, Tensor::vector(&labels)))
}

/// Loads a digits CSV file: images `[n, 64]` f32 scaled to [0, 1] and labels `[n]` i64.
pub fn load_digits_csv(path: &Path) -> Result<(Tensor, Tensor)> {
    rows_to_tensors(&read_digits_csv(path)?)
}

/// Loads digits TFRecord files (as written by `write_digits_tfrecord`) without a graph:
/// images `[n, 64]` f32 and labels `[n]` i64, in file order.
pub fn load_digits_tfrecords(files: &[String]) -> Result<(Tensor, Tensor)> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for file in files {
        for (i, rec) in rill_queues::tfrecord::read_all(file, compression_of(file))?.iter().enumerate() {
            let bad = |why: &str| Error::invalid_argument(format!("{file}: record {i}: {why}"));
            let ex = Example::decode(rec).map_err(|e| e.context(format!("{file}: record {i}")))?;
            match (ex.features.get("image"), ex.features.get("label")) {
                (Some(Feature::Float(px)), Some(Feature::Int64(l)))
                    if px.len() == IMAGE_PIXELS && l.len() == 1 =>
                {
                    images.extend_from_slice(px);
                    labels.push(l[0]);
                }
                _ => return Err(bad("needs 64 float 'image' values and one int64 'label'")),
            }
        }
    }
    Ok((Tensor::new([labels.len(), IMAGE_PIXELS], &images)?, Tensor::vector(&labels)))
}

/// Minibatches drawn from a data set held in memory, for programs that feed placeholders:
/// each epoch visits every row once, in an order shuffled by a seeded generator.
#[derive(Clone, Debug)]
pub struct Minibatches {
    images: Vec<f32>,
    labels: Vec<i64>,
    order: Vec<usize>,
    next: usize,
    state: u64,
}

impl Minibatches {
    /// Batches of the rows of `images` (`[n, 64]` f32) and `labels` (`[n]` i64).
    pub fn new(images: &Tensor, labels: &Tensor, seed: u64) -> Result<Minibatches> {
        let n = labels.num_elements();
        if images.shape().rank() != 2 || images.shape().dim(0) != n || n == 0 {
            return Err(Error::invalid_argument(format!(
                "Minibatches: images {} do not match {n} labels",
                images.shape()
            )));
        }
        let mut m = Minibatches {
            images: images.to_vec()?,
            labels: labels.to_vec()?,
            order: (0..n).collect(),
            next: n,
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
        };
        m.reshuffle();
        Ok(m)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    fn width(&self) -> usize {
        self.images.len() / self.labels.len()
    }

    /// Fisher–Yates with a 64-bit LCG: reproducible across platforms.
    fn reshuffle(&mut self) {
        for i in (1..self.order.len()).rev() {
            self.state = self.state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = ((self.state >> 33) % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
        self.next = 0;
    }

    /// The next `batch` rows (`[batch, 64]` f32, `[batch]` i64), starting a new epoch when the
    /// current one has fewer left.
    pub fn next_batch(&mut self, batch: usize) -> Result<(Tensor, Tensor)> {
        let batch = batch.clamp(1, self.len());
        if self.next + batch > self.len() {
            self.reshuffle();
        }
        let width = self.width();
        let rows = &self.order[self.next..self.next + batch];
        self.next += batch;
        let images: Vec<f32> =
            rows.iter().flat_map(|&r| &self.images[r * width..(r + 1) * width]).copied().collect();
        let labels: Vec<i64> = rows.iter().map(|&r| self.labels[r]).collect();
        Ok((Tensor::new([batch, width], &images)?, Tensor::vector(&labels)))
    }
}

/// Writes `rows` as a TFRecord file of `tf.train.Example`s (see `DigitRow::example`), gzipped
/// when the name ends in `.gz`.
pub fn write_digits_tfrecord(path: &Path, rows: &[DigitRow]) -> Result<()> {
    let mut w = TfRecordWriter::create(path, compression_of(&path.display().to_string()))?;
    for r in rows {
        w.write(&r.example().encode(true))?;
    }
    w.close()
}

fn compression_of(file: &str) -> Compression {
    if file.ends_with(".gz") {
        Compression::Gzip
    } else {
        Compression::None
    }
}

/// Options of `digits_input`; `Default` gives one shuffled pass in batches of 32.
#[derive(Clone, Debug)]
pub struct InputOptions {
    pub batch_size: usize,
    /// `None`: cycle forever; `Some(n)`: the batches end (`OutOfRange`) after `n` passes.
    pub num_epochs: Option<u64>,
    /// Shuffle the file order and draw examples at random from a shuffle queue.
    pub shuffle: bool,
    pub seed: i64,
    /// Records read and parsed per reader step.
    pub read_chunk: u64,
}

impl Default for InputOptions {
    fn default() -> Self {
        InputOptions { batch_size: 32, num_epochs: Some(1), shuffle: true, seed: 0, read_chunk: 64 }
    }
}

/// The batches of an input pipeline and the queue runners that fill it (start them with
/// `rill_queues::start_queue_runners` once the session exists).
#[derive(Clone, Debug)]
pub struct DigitsInput {
    /// `[batch, 64]` f32.
    pub images: Output,
    /// `[batch]` i64.
    pub labels: Output,
    pub runners: Vec<QueueRunner>,
    /// The queue the batches come from.
    pub queue: Output,
    batch_size: usize,
    smaller_final_batch: bool,
}

impl DigitsInput {
    /// Another dequeue of a batch from the same queue, for one more consumer (a tower): each
    /// run of it takes its own batch.
    pub fn dequeue(&self, g: &Graph) -> (Output, Output) {
        let out = if self.smaller_final_batch {
            rq::dequeue_up_to(g, self.queue, self.batch_size)
        } else {
            rq::dequeue_many(g, self.queue, self.batch_size)
        };
        match out[..] {
            [images, labels] => (images, labels),
            // A failed build is recorded in the graph; the outputs are never run.
            _ => (self.images, self.labels),
        }
    }
}

/// `tf.train`-style input: file names through `string_input_producer`, a TFRecord reader reading
/// chunks of records, `parse_example`, then `shuffle_batch` (or `batch`). With a number of
/// epochs the last batch may be smaller, and the batches end with `OutOfRange`.
pub fn digits_input(g: &Graph, files: &[String], opts: &InputOptions) -> Result<DigitsInput> {
    let Some(first) = files.first() else {
        return Err(Error::invalid_argument("digits_input needs at least one file"));
    };
    let compression = compression_of(first);
    if files.iter().any(|f| compression_of(f) != compression) {
        return Err(Error::invalid_argument("digits_input: files mix gzipped and plain TFRecords"));
    }
    let (images, labels, runners) = g
        .with_name_scope("digits_input", |g| {
            let producer = ProducerOptions {
                num_epochs: opts.num_epochs,
                shuffle: opts.shuffle,
                seed: opts.seed,
                ..Default::default()
            };
            let (files_q, files_qr) = rq::string_input_producer(g, files, &producer);
            let reader = rq::tf_record_reader(g, compression, "");
            let (_, records) = rq::reader_read_up_to(g, reader, files_q, opts.read_chunk.max(1));
            let parsed = rq::parse_example(
                g,
                records,
                &[
                    DenseFeature::required("image", DType::F32, Shape::vector(IMAGE_PIXELS)),
                    DenseFeature::required("label", DType::I64, Shape::SCALAR),
                ],
            );
            let batch = BatchOptions {
                batch_size: opts.batch_size,
                // Room for a few batches and a full read chunk beyond the shuffle reserve.
                capacity: (4 * opts.batch_size as u64 + 2 * opts.read_chunk) as i64,
                enqueue_many: true,
                allow_smaller_final_batch: opts.num_epochs.is_some(),
                ..Default::default()
            };
            let (out, batch_qr) = if opts.shuffle {
                let min_after_dequeue = (2 * opts.batch_size as u64 + opts.read_chunk) as i64;
                rq::shuffle_batch(g, &parsed, min_after_dequeue, opts.seed.wrapping_add(1), &batch)
            } else {
                rq::batch(g, &parsed, &batch)
            };
            match out[..] {
                [images, labels] => Some((images, labels, vec![files_qr, batch_qr])),
                _ => None,
            }
        })
        .ok_or_else(|| {
            g.status().err().unwrap_or_else(|| Error::internal("digits_input: no batch outputs"))
        })?;
    g.status()?;
    let queue = runners[1].queue;
    Ok(DigitsInput {
        images,
        labels,
        runners,
        queue,
        batch_size: opts.batch_size,
        smaller_final_batch: opts.num_epochs.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pixel: u8, label: u8) -> String {
        let mut v = vec![pixel.to_string(); IMAGE_PIXELS];
        v.push(label.to_string());
        v.join(",")
    }

    #[test]
    fn csv_rows_are_checked() {
        let cases: [(String, std::result::Result<usize, &str>); 6] = [
            (format!("{}\n\n{}\n", row(0, 3), row(16, 9)), Ok(2)),
            (String::new(), Ok(0)),
            (row(17, 1), Err("above 16")),
            (row(1, 10), Err("not a digit")),
            (format!("{},0", row(1, 1)), Err("more than 65")),
            ("1,2,3".to_string(), Err("3 fields")),
        ];
        for (text, want) in cases {
            match (parse_digits_csv(&text, "t.csv"), want) {
                (Ok(rows), Ok(n)) => assert_eq!(rows.len(), n),
                (Err(e), Err(msg)) => assert!(e.msg.contains(msg), "{e} should say {msg}"),
                (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn an_example_holds_scaled_pixels_and_the_label() {
        let mut pixels = [0u8; IMAGE_PIXELS];
        pixels[0] = 16;
        pixels[1] = 4;
        let ex = DigitRow { pixels, label: 7 }.example();
        let back = Example::decode(&ex.encode(true)).unwrap();
        let Some(Feature::Float(image)) = back.features.get("image") else { panic!("no image") };
        assert_eq!((image.len(), image[0], image[1], image[2]), (IMAGE_PIXELS, 1.0, 0.25, 0.0));
        assert_eq!(back.features.get("label"), Some(&Feature::Int64(vec![7])));
    }
}
