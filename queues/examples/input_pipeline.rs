//! An input pipeline in TensorFlow 1.x style: CSV and TFRecord files, several reader threads
//! feeding one RandomShuffleQueue, batches drawn from it, and a clean stop after the epochs.

use rill_device_cpu::cpu_runtime;
use rill_graph::{
    Code, DType, DirectSession, Graph, Output, PartialShape, RunOptions, Session, SessionOptions, Shape,
    Tensor,
};
use rill_queues::{
    self as rq, Compression, Coordinator, DenseFeature, Example, Feature, ProducerOptions, QueueRunner,
};
use std::sync::Arc;
use std::time::Duration;

const EPOCHS: u64 = 2;
const ROWS_PER_FILE: i64 = 50;
const READER_THREADS: usize = 2;
const BATCH: usize = 16;
/// Deadline of one training step's dequeue.
const STEP_TIMEOUT_MS: u64 = 10_000;
const STOP_GRACE: Duration = Duration::from_secs(5);

fn main() -> rill_graph::Result<()> {
    let dir = std::env::temp_dir().join(format!("rill-input-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(rill_graph::Error::from)?;
    // Two CSV files (ids 0..100) and two gzipped TFRecord files of Examples (ids 100..200).
    let mut csv_files = Vec::new();
    let mut tfr_files = Vec::new();
    for f in 0..2i64 {
        let p = dir.join(format!("part{f}.csv"));
        let rows: String =
            (0..ROWS_PER_FILE).map(|i| format!("{},{}\n", f * ROWS_PER_FILE + i, i as f32 * 0.5)).collect();
        std::fs::write(&p, format!("id,x\n{rows}")).map_err(rill_graph::Error::from)?;
        csv_files.push(p.display().to_string());
        let p = dir.join(format!("part{f}.tfrecord.gz"));
        let mut w = rq::TfRecordWriter::create(&p, Compression::Gzip)?;
        for i in 0..ROWS_PER_FILE {
            let id = 100 + f * ROWS_PER_FILE + i;
            w.write(
                &Example::new()
                    .with("id", Feature::Int64(vec![id]))
                    .with("x", Feature::Float(vec![i as f32]))
                    .encode(true),
            )?;
        }
        w.close()?;
        tfr_files.push(p.display().to_string());
    }

    let g = Graph::new();
    let producer = ProducerOptions { num_epochs: Some(EPOCHS), seed: 1, ..Default::default() };
    let (csv_q, csv_qr) = rq::string_input_producer(&g, &csv_files, &producer);
    let (tfr_q, tfr_qr) = rq::string_input_producer(&g, &tfr_files, &producer);
    let mut examples: Vec<Vec<Output>> = Vec::new();
    for _ in 0..READER_THREADS {
        let reader = rq::text_line_reader(&g, 1, "");
        let (_, line) = rq::reader_read(&g, reader, csv_q);
        examples.push(rq::decode_csv(
            &g,
            line,
            &[Tensor::scalar(0i64), Tensor::scalar(0f32)],
            &Default::default(),
        ));
        let reader = rq::tf_record_reader(&g, Compression::Gzip, "");
        let (_, record) = rq::reader_read(&g, reader, tfr_q);
        examples.push(rq::parse_example(
            &g,
            record,
            &[
                DenseFeature::required("id", DType::I64, Shape::SCALAR),
                DenseFeature::required("x", DType::F32, Shape::SCALAR),
            ],
        ));
    }
    // One RandomShuffleQueue fed by every reader thread; batches drawn at random from it.
    let shapes = [PartialShape::scalar(), PartialShape::scalar()];
    let shuffle_q =
        rq::random_shuffle_queue(&g, 200, 40, &[DType::I64, DType::F32], &shapes, 7, &Default::default());
    let enqueues: Vec<Output> = examples.iter().map(|e| rq::enqueue(&g, shuffle_q, e)).collect();
    let shuffle_qr = QueueRunner::new(&g, shuffle_q, enqueues);
    let batch = rq::dequeue_up_to(&g, shuffle_q, BATCH);
    g.status()?;

    let rt = cpu_runtime().with_ops(rq::OPS).with_kernels(rq::KERNELS);
    let sess: Arc<dyn Session> = Arc::new(DirectSession::new(&g, &rt, SessionOptions::default())?);
    let coord = Coordinator::new();
    rq::start_queue_runners(&sess, &coord, &[csv_qr, tfr_qr, shuffle_qr]);
    let mut seen = vec![0u64; 200];
    let mut steps = 0;
    let opts = RunOptions { timeout_in_ms: STEP_TIMEOUT_MS, ..Default::default() };
    loop {
        match sess.run(&[], &batch, &[], &opts) {
            Ok(t) => {
                steps += 1;
                for id in t[0].to_vec::<i64>()? {
                    seen[id as usize] += 1;
                }
            }
            Err(e) if e.code == Code::OutOfRange => break,
            Err(e) => {
                coord.request_stop(Some(e));
                break;
            }
        }
    }
    coord.request_stop(None);
    coord.join(STOP_GRACE)?;
    let complete = seen.iter().all(|&n| n == EPOCHS);
    println!(
        "{steps} batches, {} examples, every example seen {EPOCHS} times: {complete}",
        seen.iter().sum::<u64>()
    );
    let _ = std::fs::remove_dir_all(&dir);
    if !complete {
        return Err(rill_graph::Error::internal("the pipeline lost or duplicated examples"));
    }
    Ok(())
}
