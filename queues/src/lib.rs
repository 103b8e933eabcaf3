//! TensorFlow-style input pipelines for rill: queues (FIFO, random shuffle, padding, priority),
//! readers and decoders, QueueRunner and Coordinator, and conditional accumulators.
//!
//! A program adds `OPS` and `KERNELS` to its `Runtime`; queues, readers and accumulators live in
//! the device's `ResourceMgr` under `(container, shared_name)`, and their handle ops output a
//! scalar resource handle that every consumer op takes as input 0.

#![forbid(unsafe_code)]

mod accumulator;
mod coord;
pub mod crc32c;
mod decode;
pub mod example;
mod queue;
mod queue_ops;
mod readers;
pub mod tfrecord;

pub use queue::{
    DequeueDone, EnqueueDone, FifoQueue, PaddingFifoQueue, PriorityQueue, Queue, QueueKind, QueueSpec,
    RandomShuffleQueue, Rng, QUEUE_CAPACITY_MAX,
};
pub use queue_ops::{
    dequeue, dequeue_many, dequeue_many_dynamic, dequeue_up_to, enqueue, enqueue_many, fifo_queue,
    lookup_queue, padding_fifo_queue, priority_queue, queue_close, queue_is_closed, queue_signature,
    queue_size, random_shuffle_queue, QueueOptions,
};

pub use accumulator::{
    accumulator_apply_gradient, accumulator_await_gradients, accumulator_cancel_awaits,
    accumulator_num_accumulated, accumulator_set_global_step, accumulator_take_gradient,
    accumulator_take_gradient_dynamic, conditional_accumulator, conditional_accumulator_with,
    lookup_accumulator, ConditionalAccumulator, Reduction, TakeDone,
};
pub use coord::{
    batch, batch_join, input_producer, preload, shuffle_batch, start_queue_runners, string_input_producer,
    BatchOptions, Coordinator, ProducerOptions, QueueRunner,
};
pub use decode::{decode_csv, decode_raw, parse_example, split_csv, CsvOptions, DenseFeature};
pub use example::{Example, Feature};
pub use readers::{
    fixed_length_record_reader, reader_num_records_produced, reader_num_work_units_completed, reader_read,
    reader_read_up_to, reader_reset, reader_restore_state, reader_serialize_state, text_line_reader,
    tf_record_reader, whole_file_reader, Reader, ReaderKind, READ_UP_TO_MAX, TEXT_LINE_MAX_BYTES,
    WHOLE_FILE_MAX_BYTES,
};
pub use tfrecord::{Compression, TfRecordReader, TfRecordWriter, TFRECORD_MAX_RECORD_BYTES};

use rill_graph::kernel::KernelInit;
use rill_graph::{AttrsExt, KernelDef, OpDef, DEFAULT_CONTAINER};

macro_rules! stateful {
    ($name:literal, $infer:expr) => {
        OpDef { name: $name, infer: $infer, ref_inputs: &[], stateful: true }
    };
}

macro_rules! stateless {
    ($name:literal, $infer:expr) => {
        OpDef { name: $name, infer: $infer, ref_inputs: &[], stateful: false }
    };
}

/// The ops of this crate. Those that own or touch resources are stateful.
pub const OPS: &[OpDef] = &[
    stateful!("FIFOQueueV2", queue_ops::infer_queue),
    stateful!("RandomShuffleQueueV2", queue_ops::infer_queue),
    stateful!("PaddingFIFOQueueV2", queue_ops::infer_queue),
    stateful!("PriorityQueueV2", queue_ops::infer_queue),
    stateful!("QueueEnqueueV2", queue_ops::infer_enqueue),
    stateful!("QueueEnqueueManyV2", queue_ops::infer_enqueue),
    stateful!("QueueDequeueV2", queue_ops::infer_dequeue),
    stateful!("QueueDequeueManyV2", queue_ops::infer_dequeue_many),
    stateful!("QueueDequeueUpToV2", queue_ops::infer_dequeue_up_to),
    stateful!("QueueCloseV2", queue_ops::infer_close),
    stateful!("QueueSizeV2", queue_ops::infer_size),
    stateful!("QueueIsClosedV2", queue_ops::infer_is_closed),
    stateful!("TextLineReaderV2", readers::infer_reader),
    stateful!("FixedLengthRecordReaderV2", readers::infer_reader),
    stateful!("TFRecordReaderV2", readers::infer_reader),
    stateful!("WholeFileReaderV2", readers::infer_reader),
    stateful!("ReaderReadV2", readers::infer_reader_read),
    stateful!("ReaderReadUpToV2", readers::infer_reader_read_up_to),
    stateful!("ReaderNumRecordsProducedV2", readers::infer_reader_counter),
    stateful!("ReaderNumWorkUnitsCompletedV2", readers::infer_reader_counter),
    stateful!("ReaderResetV2", readers::infer_reader_no_output),
    stateful!("ReaderSerializeStateV2", readers::infer_reader_serialize),
    stateful!("ReaderRestoreStateV2", readers::infer_reader_no_output),
    stateful!("InputProducerEpoch", coord::infer_input_producer_epoch),
    stateful!("ConditionalAccumulator", accumulator::infer_accumulator),
    stateful!("AccumulatorApplyGradient", accumulator::infer_apply_gradient),
    stateful!("AccumulatorTakeGradient", accumulator::infer_take_gradient),
    stateful!("AccumulatorNumAccumulated", accumulator::infer_num_accumulated),
    stateful!("AccumulatorAwaitGradients", accumulator::infer_await_gradients),
    stateful!("AccumulatorCancelAwaits", accumulator::infer_cancel_awaits),
    stateful!("AccumulatorSetGlobalStep", accumulator::infer_set_global_step),
    stateless!("DecodeCSV", decode::infer_decode_csv),
    stateless!("DecodeRaw", decode::infer_decode_raw),
    stateless!("ParseExample", decode::infer_parse_example),
];

/// The CPU kernels of this crate's ops.
pub const KERNELS: &[KernelDef] = &[
    KernelDef::new("FIFOQueueV2", "CPU", queue_ops::create_queue),
    KernelDef::new("RandomShuffleQueueV2", "CPU", queue_ops::create_queue),
    KernelDef::new("PaddingFIFOQueueV2", "CPU", queue_ops::create_queue),
    KernelDef::new("PriorityQueueV2", "CPU", queue_ops::create_queue),
    KernelDef::new("QueueEnqueueV2", "CPU", queue_ops::create_enqueue),
    KernelDef::new("QueueEnqueueManyV2", "CPU", queue_ops::create_enqueue),
    KernelDef::new("QueueDequeueV2", "CPU", queue_ops::create_dequeue),
    KernelDef::new("QueueDequeueManyV2", "CPU", queue_ops::create_dequeue),
    KernelDef::new("QueueDequeueUpToV2", "CPU", queue_ops::create_dequeue),
    KernelDef::new("QueueCloseV2", "CPU", queue_ops::create_close),
    KernelDef::new("QueueSizeV2", "CPU", queue_ops::create_size),
    KernelDef::new("QueueIsClosedV2", "CPU", queue_ops::create_is_closed),
    KernelDef::new("TextLineReaderV2", "CPU", readers::create_reader),
    KernelDef::new("FixedLengthRecordReaderV2", "CPU", readers::create_reader),
    KernelDef::new("TFRecordReaderV2", "CPU", readers::create_reader),
    KernelDef::new("WholeFileReaderV2", "CPU", readers::create_reader),
    KernelDef::new("ReaderReadV2", "CPU", readers::create_read),
    KernelDef::new("ReaderReadUpToV2", "CPU", readers::create_read),
    KernelDef::new("ReaderNumRecordsProducedV2", "CPU", readers::create_reader_query),
    KernelDef::new("ReaderNumWorkUnitsCompletedV2", "CPU", readers::create_reader_query),
    KernelDef::new("ReaderResetV2", "CPU", readers::create_reader_query),
    KernelDef::new("ReaderSerializeStateV2", "CPU", readers::create_reader_query),
    KernelDef::new("ReaderRestoreStateV2", "CPU", readers::create_reader_query),
    KernelDef::new("InputProducerEpoch", "CPU", coord::create_input_producer_epoch),
    KernelDef::new("ConditionalAccumulator", "CPU", accumulator::create_accumulator),
    KernelDef::new("AccumulatorApplyGradient", "CPU", accumulator::create_apply_gradient),
    KernelDef::new("AccumulatorTakeGradient", "CPU", accumulator::create_take_gradient),
    KernelDef::new("AccumulatorNumAccumulated", "CPU", accumulator::create_num_accumulated),
    KernelDef::new("AccumulatorAwaitGradients", "CPU", accumulator::create_await_gradients),
    KernelDef::new("AccumulatorCancelAwaits", "CPU", accumulator::create_cancel_awaits),
    KernelDef::new("AccumulatorSetGlobalStep", "CPU", accumulator::create_set_global_step),
    KernelDef::new("DecodeCSV", "CPU", decode::create_decode_csv),
    KernelDef::new("DecodeRaw", "CPU", decode::create_decode_raw),
    KernelDef::new("ParseExample", "CPU", decode::create_parse_example),
];

/// The op definition named `name` from `OPS`; a missing name is a bug in this crate.
pub(crate) fn op_def(name: &str) -> &'static OpDef {
    OPS.iter().find(|o| o.name == name).unwrap_or_else(|| panic!("op {name} is not in rill_queues::OPS"))
}

/// `(container, shared_name)` of a resource op: the `container` attr, and the `shared_name`
/// attr defaulting to the node's name.
pub(crate) fn resource_name(init: &KernelInit<'_>) -> (String, String) {
    let a = init.attrs();
    let shared = a.str_or("shared_name", "");
    let name = if shared.is_empty() { init.node.name.clone() } else { shared.to_string() };
    (a.str_or("container", DEFAULT_CONTAINER).to_string(), name)
}
