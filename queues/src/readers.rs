//! Readers: resources that take file names from a queue and produce `(key, value)` records
//! (TextLineReader, FixedLengthRecordReader, TFRecordReader, WholeFileReader), with counters,
//! reset, and saved/restored positions; their ops and builders.

use crate::queue::Queue;
use crate::queue_ops::lookup_queue;
use crate::tfrecord::{Compression, TfRecordReader, TFRECORD_MAX_RECORD_BYTES};
use crate::{op_def, resource_name};
use rill_graph::kernel::{
    AsyncDone, AsyncKernelContext, AsyncOpKernel, Kernel, KernelInit, OpKernel, OpKernelContext, Value,
};
use rill_graph::{
    attrs, AttrsExt, CancellationManager, DType, Error, Graph, InferCtx, Output, PartialShape, Resource,
    Result, Shape, Tensor, TensorInfo,
};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Longest line a TextLineReader returns; a longer one is a DataLoss error, not a huge buffer.
pub const TEXT_LINE_MAX_BYTES: u64 = 64 << 20;
/// Largest file a WholeFileReader loads.
pub const WHOLE_FILE_MAX_BYTES: u64 = 1 << 30;
/// Most records one `ReaderReadUpTo` returns.
pub const READ_UP_TO_MAX: usize = 1 << 20;
/// Size of a reader's file buffer.
const FILE_BUFFER_BYTES: usize = 256 << 10;
/// Tag at the start of a serialized reader state.
const STATE_MAGIC: &[u8; 8] = b"rillrdr1";

/// What kind of reader, with its options.
#[derive(Clone, Debug, PartialEq)]
pub enum ReaderKind {
    TextLine { skip_header_lines: u64 },
    FixedLengthRecord { header_bytes: u64, record_bytes: u64, footer_bytes: u64, hop_bytes: u64 },
    TfRecord { compression: Compression, max_record_bytes: u64 },
    WholeFile,
}

/// An open work item (file) and the position in it.
enum Source {
    Text { r: BufReader<File>, offset: u64, line: u64 },
    Fixed { f: BufReader<File>, index: u64, end: u64 },
    Record(Box<TfRecordReader>),
    Whole { done: bool },
}

#[derive(Default)]
struct ReaderState {
    work: Option<String>,
    source: Option<Source>,
    pending_work: VecDeque<String>,
    produced: i64,
    completed: i64,
}

/// A reader resource.
pub struct Reader {
    name: String,
    kind: ReaderKind,
    state: Mutex<ReaderState>,
}

impl Resource for Reader {
    fn describe(&self) -> String {
        format!("Reader '{}' ({:?})", self.name, self.kind)
    }
}

fn io_err(path: &str, offset: u64, e: std::io::Error) -> Error {
    Error::data_loss(format!("read error at offset {offset} in {path}: {e}"))
}

/// Outcome of reading from the current work item.
type Record = (Vec<u8>, Vec<u8>);

impl Reader {
    pub fn new(name: &str, kind: ReaderKind) -> Result<Reader> {
        if let ReaderKind::FixedLengthRecord { record_bytes: 0, .. } = kind {
            return Err(Error::invalid_argument(format!(
                "FixedLengthRecordReader '{name}': record_bytes must be > 0"
            )));
        }
        Ok(Reader { name: name.to_string(), kind, state: Mutex::new(ReaderState::default()) })
    }

    pub fn kind(&self) -> &ReaderKind {
        &self.kind
    }

    fn lock(&self) -> MutexGuard<'_, ReaderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn num_records_produced(&self) -> i64 {
        self.lock().produced
    }

    pub fn num_work_units_completed(&self) -> i64 {
        self.lock().completed
    }

    pub fn reset(&self) {
        *self.lock() = ReaderState::default();
    }

    fn open(&self, path: &str) -> Result<Source> {
        let ctx = |e: std::io::Error| Error::from(e).context(path);
        Ok(match &self.kind {
            ReaderKind::TextLine { skip_header_lines } => {
                let mut r = BufReader::with_capacity(FILE_BUFFER_BYTES, File::open(path).map_err(ctx)?);
                let (mut offset, mut line) = (0, 0);
                for _ in 0..*skip_header_lines {
                    match read_line(&mut r, path, offset)? {
                        Some((_, n)) => {
                            offset += n;
                            line += 1;
                        }
                        None => break,
                    }
                }
                Source::Text { r, offset, line }
            }
            ReaderKind::FixedLengthRecord { header_bytes, footer_bytes, .. } => {
                let f = File::open(path).map_err(ctx)?;
                let len = f.metadata().map_err(ctx)?.len();
                let end = len.saturating_sub(*footer_bytes).max(*header_bytes);
                Source::Fixed { f: BufReader::with_capacity(FILE_BUFFER_BYTES, f), index: 0, end }
            }
            ReaderKind::TfRecord { compression, max_record_bytes } => Source::Record(Box::new(
                TfRecordReader::open(path, *compression)?.with_max_record_bytes(*max_record_bytes),
            )),
            ReaderKind::WholeFile => Source::Whole { done: false },
        })
    }

    /// The next record of the open work item; `None` when it is finished.
    fn next_in(&self, src: &mut Source, path: &str) -> Result<Option<Record>> {
        match (src, &self.kind) {
            (Source::Text { r, offset, line }, _) => match read_line(r, path, *offset)? {
                Some((text, n)) => {
                    *offset += n;
                    *line += 1;
                    Ok(Some((format!("{path}:{line}").into_bytes(), text)))
                }
                None => Ok(None),
            },
            (
                Source::Fixed { f, index, end },
                ReaderKind::FixedLengthRecord { header_bytes, record_bytes, hop_bytes, .. },
            ) => {
                let step = if *hop_bytes > 0 { *hop_bytes } else { *record_bytes };
                let start = header_bytes + *index * step;
                if start + record_bytes > *end {
                    return Ok(None);
                }
                f.seek(SeekFrom::Start(start)).map_err(|e| io_err(path, start, e))?;
                let mut buf = vec![0u8; *record_bytes as usize];
                f.read_exact(&mut buf).map_err(|_| {
                    Error::data_loss(format!("truncated record at offset {start} in {path} (file shrank?)"))
                })?;
                let key = format!("{path}:{index}").into_bytes();
                *index += 1;
                Ok(Some((key, buf)))
            }
            (Source::Record(r), _) => {
                let at = r.offset();
                Ok(r.read_record()?.map(|v| (format!("{path}:{at}").into_bytes(), v)))
            }
            (Source::Whole { done }, _) => {
                if *done {
                    return Ok(None);
                }
                *done = true;
                let f = File::open(path).map_err(|e| Error::from(e).context(path))?;
                let len = f.metadata().map_err(|e| Error::from(e).context(path))?.len();
                if len > WHOLE_FILE_MAX_BYTES {
                    return Err(Error::resource_exhausted(format!(
                        "{path} has {len} bytes, more than WHOLE_FILE_MAX_BYTES ({WHOLE_FILE_MAX_BYTES})"
                    )));
                }
                let mut v = Vec::new();
                f.take(WHOLE_FILE_MAX_BYTES).read_to_end(&mut v).map_err(|e| io_err(path, 0, e))?;
                Ok(Some((path.as_bytes().to_vec(), v)))
            }
            _ => Err(Error::internal("reader source does not match its kind")),
        }
    }

    /// Reads from work already held; `Ok(None)` means the reader needs a new work item.
    fn try_read(&self) -> Result<Option<Record>> {
        let mut st = self.lock();
        loop {
            if st.source.is_none() {
                let Some(w) = st.pending_work.pop_front() else { return Ok(None) };
                let src = self.open(&w)?;
                st.work = Some(w);
                st.source = Some(src);
            }
            let st = &mut *st;
            let (Some(src), Some(path)) = (st.source.as_mut(), st.work.as_ref()) else { continue };
            match self.next_in(src, path)? {
                Some(rec) => {
                    st.produced += 1;
                    return Ok(Some(rec));
                }
                None => {
                    st.completed += 1;
                    st.source = None;
                    st.work = None;
                }
            }
        }
    }

    fn add_work(&self, work: String) {
        self.lock().pending_work.push_back(work);
    }

    /// Reads one record, dequeuing file names from `queue` as needed; `OutOfRange` once the
    /// queue is closed and empty.
    pub fn read_async(
        self: &Arc<Self>,
        queue: &Arc<Queue>,
        cancel: Option<&Arc<CancellationManager>>,
        done: Box<dyn FnOnce(Result<Record>) + Send>,
    ) {
        match self.try_read() {
            Ok(Some(rec)) => return done(Ok(rec)),
            Err(e) => return done(Err(e)),
            Ok(None) => {}
        }
        let (me, q, cm) = (self.clone(), queue.clone(), cancel.cloned());
        queue.dequeue_async(
            cancel,
            Box::new(move |r| match r.and_then(|t| work_name(&t)) {
                Ok(w) => {
                    me.add_work(w);
                    me.read_async(&q, cm.as_ref(), done)
                }
                Err(e) => done(Err(e)),
            }),
        );
    }

    /// Reads up to `n` records; fewer only when the queue runs out (then `OutOfRange` if none).
    pub fn read_up_to_async(
        self: &Arc<Self>,
        queue: &Arc<Queue>,
        n: usize,
        cancel: Option<&Arc<CancellationManager>>,
        done: Box<dyn FnOnce(Result<Vec<Record>>) + Send>,
    ) {
        self.read_more(queue.clone(), n, cancel.cloned(), Vec::new(), done)
    }

    fn read_more(
        self: &Arc<Self>,
        q: Arc<Queue>,
        n: usize,
        cm: Option<Arc<CancellationManager>>,
        mut got: Vec<Record>,
        done: Box<dyn FnOnce(Result<Vec<Record>>) + Send>,
    ) {
        // Take what the current work holds without waiting, then wait for more only if needed.
        while got.len() < n {
            match self.try_read() {
                Ok(Some(rec)) => got.push(rec),
                Ok(None) => break,
                Err(e) => return done(Err(e)),
            }
        }
        if got.len() == n {
            return done(Ok(got));
        }
        let me = self.clone();
        let (q2, cm2) = (q.clone(), cm.clone());
        self.read_async(
            &q,
            cm.as_ref(),
            Box::new(move |r| match r {
                Ok(rec) => {
                    got.push(rec);
                    me.read_more(q2, n, cm2, got, done)
                }
                Err(e) if e.code == rill_graph::Code::OutOfRange && !got.is_empty() => done(Ok(got)),
                Err(e) => done(Err(e)),
            }),
        )
    }

    /// Reads one record, waiting at most `timeout` (a plain API for tools and tests).
    pub fn read(self: &Arc<Self>, queue: &Arc<Queue>, timeout: Duration) -> Result<Record> {
        let cm = Arc::new(CancellationManager::new());
        let (tx, rx) = mpsc::sync_channel(1);
        self.read_async(queue, Some(&cm), Box::new(move |r| drop(tx.send(r))));
        rx.recv_timeout(timeout).unwrap_or_else(|_| {
            cm.cancel(Error::deadline_exceeded(format!("reader '{}' timed out", self.name)));
            Err(Error::deadline_exceeded(format!("reader '{}' timed out", self.name)))
        })
    }

    /// The reader's position: counters, current work and the offset in it.
    pub fn serialize_state(&self) -> Vec<u8> {
        let st = self.lock();
        let mut v = STATE_MAGIC.to_vec();
        v.extend_from_slice(&st.produced.to_le_bytes());
        v.extend_from_slice(&st.completed.to_le_bytes());
        let (offset, count) = match &st.source {
            Some(Source::Text { offset, line, .. }) => (*offset, *line),
            Some(Source::Fixed { index, .. }) => (0, *index),
            Some(Source::Record(r)) => (r.offset(), 0),
            Some(Source::Whole { done }) => (0, *done as u64),
            None => (0, 0),
        };
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&count.to_le_bytes());
        let work = st.work.as_deref().unwrap_or("");
        v.extend_from_slice(&(work.len() as u64).to_le_bytes());
        v.extend_from_slice(work.as_bytes());
        v
    }

    /// Restores a position saved by `serialize_state`, reopening its work item.
    pub fn restore_state(&self, state: &[u8]) -> Result<()> {
        let bad = || Error::invalid_argument(format!("reader '{}': malformed saved state", self.name));
        let rest = state.strip_prefix(STATE_MAGIC).ok_or_else(bad)?;
        if rest.len() < 40 {
            return Err(bad());
        }
        let word = |i: usize| u64::from_le_bytes(rest[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (produced, completed, offset, count, work_len) =
            (word(0) as i64, word(1) as i64, word(2), word(3), word(4));
        let work_bytes = rest.get(40..).filter(|w| w.len() as u64 == work_len).ok_or_else(bad)?;
        let work = String::from_utf8(work_bytes.to_vec()).map_err(|_| bad())?;
        let mut fresh = ReaderState { produced, completed, ..ReaderState::default() };
        if !work.is_empty() {
            let mut src = self.open(&work)?;
            match &mut src {
                Source::Text { r, offset: o, line } => {
                    r.seek(SeekFrom::Start(offset)).map_err(|e| io_err(&work, offset, e))?;
                    (*o, *line) = (offset, count);
                }
                Source::Fixed { index, .. } => *index = count,
                Source::Record(r) => r.skip_to(offset)?,
                Source::Whole { done } => *done = count != 0,
            }
            fresh.work = Some(work);
            fresh.source = Some(src);
        }
        *self.lock() = fresh;
        Ok(())
    }
}

fn work_name(t: &[Tensor]) -> Result<String> {
    let s = t.first().ok_or_else(|| Error::invalid_argument("work queue gave an empty tuple"))?;
    let v = s.strings().map_err(|_| Error::invalid_argument("a reader's work queue must hold strings"))?;
    Ok(String::from_utf8_lossy(v.first().map(|x| x.as_slice()).unwrap_or(b"")).into_owned())
}

/// One line without its `\n` or `\r\n`, and the bytes it took; `None` at the end of the file.
fn read_line(r: &mut BufReader<File>, path: &str, offset: u64) -> Result<Option<(Vec<u8>, u64)>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(TEXT_LINE_MAX_BYTES + 2)
        .read_until(b'\n', &mut line)
        .map_err(|e| io_err(path, offset, e))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    if line.len() as u64 > TEXT_LINE_MAX_BYTES {
        return Err(Error::data_loss(format!(
            "line at offset {offset} in {path} is longer than TEXT_LINE_MAX_BYTES ({TEXT_LINE_MAX_BYTES})"
        )));
    }
    Ok(Some((line, n as u64)))
}

// ---- ops ----

pub(crate) fn infer_reader(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(0)?;
    Ok(vec![TensorInfo::new(DType::Resource, PartialShape::scalar())])
}

fn strings_out(shape: PartialShape) -> Vec<TensorInfo> {
    vec![TensorInfo::new(DType::String, shape.clone()), TensorInfo::new(DType::String, shape)]
}

pub(crate) fn infer_reader_read(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    Ok(strings_out(PartialShape::scalar()))
}

pub(crate) fn infer_reader_read_up_to(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(3)?;
    c.expect_dtype(2, &[DType::I64])?;
    Ok(strings_out(PartialShape::from_dims(&[None])))
}

pub(crate) fn infer_reader_counter(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    Ok(vec![TensorInfo::new(DType::I64, PartialShape::scalar())])
}

pub(crate) fn infer_reader_serialize(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    Ok(vec![TensorInfo::new(DType::String, PartialShape::scalar())])
}

pub(crate) fn infer_reader_no_output(_: &InferCtx) -> Result<Vec<TensorInfo>> {
    Ok(vec![])
}

fn kind_from_attrs(op: &str, a: &rill_graph::Attrs) -> Result<ReaderKind> {
    let u = |k: &str| a.int_or(k, 0).max(0) as u64;
    Ok(match op {
        "TextLineReaderV2" => ReaderKind::TextLine { skip_header_lines: u("skip_header_lines") },
        "FixedLengthRecordReaderV2" => ReaderKind::FixedLengthRecord {
            header_bytes: u("header_bytes"),
            record_bytes: u("record_bytes"),
            footer_bytes: u("footer_bytes"),
            hop_bytes: u("hop_bytes"),
        },
        "TFRecordReaderV2" => ReaderKind::TfRecord {
            compression: Compression::parse(a.str_or("compression_type", ""))?,
            max_record_bytes: a.int_or("max_record_bytes", TFRECORD_MAX_RECORD_BYTES as i64).max(0) as u64,
        },
        "WholeFileReaderV2" => ReaderKind::WholeFile,
        other => return Err(Error::internal(format!("{other} is not a reader op"))),
    })
}

struct ReaderHandleK {
    container: String,
    name: String,
    kind: ReaderKind,
}

impl OpKernel for ReaderHandleK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let r = ctx
            .resource_mgr()
            .lookup_or_create(&self.container, &self.name, || Reader::new(&self.name, self.kind.clone()))?;
        if r.kind != self.kind {
            return Err(Error::invalid_argument(format!(
                "shared reader '{}' is {:?}, this node declares {:?}",
                self.name, r.kind, self.kind
            )));
        }
        ctx.set_output(0, Tensor::resource_handle(&self.container, &self.name));
        Ok(())
    }
}

pub(crate) fn create_reader(init: &KernelInit<'_>) -> Result<Kernel> {
    let kind = kind_from_attrs(&init.node.op, init.attrs())?;
    let (container, name) = resource_name(init);
    Ok(Kernel::cheap(ReaderHandleK { container, name, kind }))
}

fn lookup_reader(mgr: &rill_graph::ResourceMgr, t: &Tensor) -> Result<Arc<Reader>> {
    let (c, n) = t.as_resource_handle()?;
    mgr.lookup::<Reader>(&c, &n)
}

struct ReadK {
    up_to: bool,
}

impl AsyncOpKernel for ReadK {
    fn compute_async(&self, ctx: AsyncKernelContext, done: AsyncDone) {
        let r = (|| {
            let reader = lookup_reader(ctx.resource_mgr(), ctx.input(0)?)?;
            let queue = lookup_queue(ctx.resource_mgr(), ctx.input(1)?)?;
            let n = if self.up_to { ctx.input(2)?.scalar_value::<i64>()? } else { 1 };
            if n < 1 || n as usize > READ_UP_TO_MAX {
                return Err(Error::invalid_argument(format!(
                    "num_records must be in 1..={READ_UP_TO_MAX}, got {n}"
                )));
            }
            Ok((reader, queue, n as usize))
        })();
        let (reader, queue, n) = match r {
            Ok(x) => x,
            Err(e) => return done(Err(e)),
        };
        let cm = ctx.step.cancellation.clone();
        if !self.up_to {
            return reader.read_async(
                &queue,
                Some(&cm),
                Box::new(move |r| {
                    done(r.map(|(k, v)| {
                        vec![Value::Tensor(Tensor::scalar_string(k)), Value::Tensor(Tensor::scalar_string(v))]
                    }))
                }),
            );
        }
        reader.read_up_to_async(
            &queue,
            n,
            Some(&cm),
            Box::new(move |r| {
                done(r.and_then(|recs| {
                    let n = recs.len();
                    let (k, v): (Vec<_>, Vec<_>) = recs.into_iter().unzip();
                    Ok(vec![
                        Value::Tensor(Tensor::from_strings(Shape::vector(n), k)?),
                        Value::Tensor(Tensor::from_strings(Shape::vector(n), v)?),
                    ])
                }))
            }),
        )
    }
}

pub(crate) fn create_read(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::asynchronous(ReadK { up_to: init.node.op == "ReaderReadUpToV2" }))
}

#[derive(Clone, Copy)]
enum Query {
    Produced,
    Completed,
    Reset,
    Serialize,
    Restore,
}

struct ReaderQueryK(Query);

impl OpKernel for ReaderQueryK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let r = lookup_reader(ctx.resource_mgr(), ctx.input(0)?)?;
        match self.0 {
            Query::Produced => ctx.set_output(0, Tensor::scalar(r.num_records_produced())),
            Query::Completed => ctx.set_output(0, Tensor::scalar(r.num_work_units_completed())),
            Query::Reset => r.reset(),
            Query::Serialize => ctx.set_output(0, Tensor::scalar_string(r.serialize_state())),
            Query::Restore => {
                let s = ctx.input(1)?.strings()?.first().cloned().unwrap_or_default();
                r.restore_state(&s)?
            }
        }
        Ok(())
    }
}

pub(crate) fn create_reader_query(init: &KernelInit<'_>) -> Result<Kernel> {
    let q = match init.node.op.as_str() {
        "ReaderNumRecordsProducedV2" => Query::Produced,
        "ReaderNumWorkUnitsCompletedV2" => Query::Completed,
        "ReaderResetV2" => Query::Reset,
        "ReaderSerializeStateV2" => Query::Serialize,
        _ => Query::Restore,
    };
    Ok(Kernel::cheap(ReaderQueryK(q)))
}

// ---- builders ----

fn reader_node(
    g: &Graph,
    op: &str,
    default_name: &str,
    shared_name: &str,
    mut a: rill_graph::Attrs,
) -> Output {
    if !shared_name.is_empty() {
        a.insert("shared_name".into(), shared_name.into());
    }
    g.op(op_def(op), default_name, &[], a)
}

pub fn text_line_reader(g: &Graph, skip_header_lines: u64, shared_name: &str) -> Output {
    reader_node(
        g,
        "TextLineReaderV2",
        "TextLineReader",
        shared_name,
        attrs! { "skip_header_lines" => skip_header_lines as i64 },
    )
}

pub fn fixed_length_record_reader(
    g: &Graph,
    header_bytes: u64,
    record_bytes: u64,
    footer_bytes: u64,
    hop_bytes: u64,
    shared_name: &str,
) -> Output {
    let a = attrs! {
        "header_bytes" => header_bytes as i64, "record_bytes" => record_bytes as i64,
        "footer_bytes" => footer_bytes as i64, "hop_bytes" => hop_bytes as i64,
    };
    reader_node(g, "FixedLengthRecordReaderV2", "FixedLengthRecordReader", shared_name, a)
}

pub fn tf_record_reader(g: &Graph, compression: Compression, shared_name: &str) -> Output {
    let c = match compression {
        Compression::None => "",
        Compression::Zlib => "ZLIB",
        Compression::Gzip => "GZIP",
    };
    reader_node(g, "TFRecordReaderV2", "TFRecordReader", shared_name, attrs! { "compression_type" => c })
}

pub fn whole_file_reader(g: &Graph, shared_name: &str) -> Output {
    reader_node(g, "WholeFileReaderV2", "WholeFileReader", shared_name, attrs! {})
}

/// `reader.read(queue)`: `(key, value)` string scalars.
pub fn reader_read(g: &Graph, reader: Output, queue: Output) -> (Output, Output) {
    let id = g.add_node(op_def("ReaderReadV2"), "ReaderRead", &[reader, queue], attrs! {});
    (Output::new(id, 0), Output::new(id, 1))
}

/// `reader.read_up_to(queue, n)`: `(keys, values)` string vectors.
pub fn reader_read_up_to(g: &Graph, reader: Output, queue: Output, n: u64) -> (Output, Output) {
    let n = g.scalar(n as i64);
    let id = g.add_node(op_def("ReaderReadUpToV2"), "ReaderReadUpTo", &[reader, queue, n], attrs! {});
    (Output::new(id, 0), Output::new(id, 1))
}

pub fn reader_num_records_produced(g: &Graph, reader: Output) -> Output {
    g.op(op_def("ReaderNumRecordsProducedV2"), "", &[reader], attrs! {})
}

pub fn reader_num_work_units_completed(g: &Graph, reader: Output) -> Output {
    g.op(op_def("ReaderNumWorkUnitsCompletedV2"), "", &[reader], attrs! {})
}

pub fn reader_reset(g: &Graph, reader: Output) -> Output {
    g.op(op_def("ReaderResetV2"), "", &[reader], attrs! {})
}

pub fn reader_serialize_state(g: &Graph, reader: Output) -> Output {
    g.op(op_def("ReaderSerializeStateV2"), "", &[reader], attrs! {})
}

pub fn reader_restore_state(g: &Graph, reader: Output, state: Output) -> Output {
    g.op(op_def("ReaderRestoreStateV2"), "", &[reader, state], attrs! {})
}
