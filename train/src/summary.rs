//! TensorBoard event files: `FileWriter` appends `Event` protobufs (hand-encoded, scalars and
//! histograms) to
//! `events.out.tfevents.<secs>.<host>` in TFRecord framing; `read_records` and `decode_event`
//! read them back.

use rill_graph::{Error, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest record accepted when reading, so a corrupt length cannot ask for gigabytes.
pub const RECORD_SIZE_MAX: u64 = 64 << 20;

const CRC32C_POLY: u32 = 0x82f6_3b78;

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ CRC32C_POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32C (Castagnoli), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC: rotated and offset so a CRC of data holding CRCs stays strong.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Splits a TFRecord stream into records, checking both CRCs of each.
pub fn read_records(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let head = bytes.get(at..at + 12).ok_or_else(|| Error::data_loss("truncated record header"))?;
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if masked_crc32c(&head[..8]).to_le_bytes() != head[8..12] {
            return Err(Error::data_loss(format!("corrupt length at byte {at}")));
        }
        if len > RECORD_SIZE_MAX {
            return Err(Error::data_loss(format!("record of {len} bytes at byte {at} is too large")));
        }
        let start = at + 12;
        let end = start + len as usize;
        let data = bytes.get(start..end).ok_or_else(|| Error::data_loss("truncated record"))?;
        let crc = bytes.get(end..end + 4).ok_or_else(|| Error::data_loss("truncated record CRC"))?;
        if masked_crc32c(data).to_le_bytes() != crc {
            return Err(Error::data_loss(format!("corrupt record at byte {at}")));
        }
        out.push(data.to_vec());
        at = end + 4;
    }
    Ok(out)
}

// ---- protobuf wire format ----

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// `Event { wall_time = 1; step = 2; file_version = 3 | summary = 5 }` with one simple value.
fn encode_event(wall_time: f64, step: i64, body: &EventBody<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    tag(&mut out, 1, 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        tag(&mut out, 2, 0);
        varint(&mut out, step as u64);
    }
    match body {
        EventBody::FileVersion(v) => bytes_field(&mut out, 3, v.as_bytes()),
        EventBody::Scalar(t, v) => {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, t.as_bytes());
            tag(&mut value, 2, 5);
            value.extend_from_slice(&v.to_le_bytes());
            let mut summary = Vec::new();
            bytes_field(&mut summary, 1, &value);
            bytes_field(&mut out, 5, &summary);
        }
        EventBody::Histogram(t, h) => {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, t.as_bytes());
            bytes_field(&mut value, 5, &h.encode());
            let mut summary = Vec::new();
            bytes_field(&mut summary, 1, &value);
            bytes_field(&mut out, 5, &summary);
        }
    }
    out
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalar(&'a str, f32),
    Histogram(&'a str, &'a Histogram),
}

/// A histogram summary (TensorBoard's `HistogramProto`): `bucket[i]` counts the values in
/// `(bucket_limit[i-1], bucket_limit[i]]`; the last limit is `f64::MAX`.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    pub bucket_limit: Vec<f64>,
    pub bucket: Vec<f64>,
}

impl Histogram {
    /// An empty histogram with the given increasing upper limits (`f64::MAX` is appended when
    /// the last limit is below it, so every value has a bucket).
    pub fn new(limits: &[f64]) -> Result<Histogram> {
        if limits.windows(2).any(|w| w[0] >= w[1]) || limits.iter().any(|l| l.is_nan()) {
            return Err(Error::invalid_argument("histogram bucket limits must increase"));
        }
        let mut bucket_limit = limits.to_vec();
        if bucket_limit.last().is_none_or(|&l| l < f64::MAX) {
            bucket_limit.push(f64::MAX);
        }
        let bucket = vec![0.0; bucket_limit.len()];
        Ok(Histogram {
            min: f64::MAX,
            max: -f64::MAX,
            num: 0.0,
            sum: 0.0,
            sum_squares: 0.0,
            bucket_limit,
            bucket,
        })
    }

    /// One bucket per integer `0..=max_value` (limits at `k + 0.5`), then the rest.
    pub fn integers(max_value: u32) -> Histogram {
        let limits: Vec<f64> = (0..=max_value).map(|k| f64::from(k) + 0.5).collect();
        Histogram::new(&limits).expect("increasing limits")
    }

    pub fn add(&mut self, v: f64) {
        let i = self.bucket_limit.partition_point(|&l| l < v).min(self.bucket.len() - 1);
        self.bucket[i] += 1.0;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.num += 1.0;
        self.sum += v;
        self.sum_squares += v * v;
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let (min, max) = if self.num > 0.0 { (self.min, self.max) } else { (0.0, 0.0) };
        for (f, v) in [(1, min), (2, max), (3, self.num), (4, self.sum), (5, self.sum_squares)] {
            tag(&mut out, f, 1);
            out.extend_from_slice(&v.to_le_bytes());
        }
        for (f, vs) in [(6, &self.bucket_limit), (7, &self.bucket)] {
            let packed: Vec<u8> = vs.iter().flat_map(|v| v.to_le_bytes()).collect();
            bytes_field(&mut out, f, &packed);
        }
        out
    }

    fn decode(b: &[u8]) -> Result<Histogram> {
        let mut h = Histogram {
            min: 0.0,
            max: 0.0,
            num: 0.0,
            sum: 0.0,
            sum_squares: 0.0,
            bucket_limit: Vec::new(),
            bucket: Vec::new(),
        };
        let f64_of = |x: &[u8]| f64::from_le_bytes(x[..8].try_into().expect("8 bytes"));
        for (f, w, x) in fields(b)? {
            match (f, w) {
                (1, 1) => h.min = f64_of(&x),
                (2, 1) => h.max = f64_of(&x),
                (3, 1) => h.num = f64_of(&x),
                (4, 1) => h.sum = f64_of(&x),
                (5, 1) => h.sum_squares = f64_of(&x),
                (6, 2) | (7, 2) => {
                    if x.len() % 8 != 0 {
                        return Err(Error::data_loss("packed doubles of a histogram are truncated"));
                    }
                    let vs = x.chunks_exact(8).map(f64_of);
                    if f == 6 {
                        h.bucket_limit.extend(vs)
                    } else {
                        h.bucket.extend(vs)
                    }
                }
                _ => {}
            }
        }
        Ok(h)
    }
}

/// What `decode_event` finds in an `Event`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodedEvent {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// `(tag, simple_value)` of each summary value.
    pub scalars: Vec<(String, f32)>,
    /// `(tag, histo)` of each histogram value.
    pub histograms: Vec<(String, Histogram)>,
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let c = *self.b.get(self.i).ok_or_else(|| Error::data_loss("truncated varint"))?;
            self.i += 1;
            v |= u64::from(c & 0x7f) << shift;
            if c & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::data_loss("varint too long"))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.i.checked_add(n).ok_or_else(|| Error::data_loss("length overflows"))?;
        let s = self.b.get(self.i..end).ok_or_else(|| Error::data_loss("truncated field"))?;
        self.i = end;
        Ok(s)
    }

    /// The next `(field, wire type, payload)`; varints come back as their 8 little-endian bytes.
    fn field(&mut self) -> Result<(u64, u8, Vec<u8>)> {
        let key = self.varint()?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        let payload = match wire {
            0 => self.varint()?.to_le_bytes().to_vec(),
            1 => self.take(8)?.to_vec(),
            2 => {
                let n = self.varint()?;
                self.take(usize::try_from(n).map_err(|_| Error::data_loss("length too large"))?)?.to_vec()
            }
            5 => self.take(4)?.to_vec(),
            w => return Err(Error::data_loss(format!("unsupported wire type {w}"))),
        };
        Ok((field, wire, payload))
    }

    fn done(&self) -> bool {
        self.i >= self.b.len()
    }
}

fn fields(b: &[u8]) -> Result<Vec<(u64, u8, Vec<u8>)>> {
    let mut r = Reader { b, i: 0 };
    let mut out = Vec::new();
    while !r.done() {
        out.push(r.field()?);
    }
    Ok(out)
}

fn utf8(b: Vec<u8>) -> Result<String> {
    String::from_utf8(b).map_err(|_| Error::data_loss("string is not UTF-8"))
}

/// Decodes the fields of an `Event` that `FileWriter` writes; other fields are skipped.
pub fn decode_event(b: &[u8]) -> Result<DecodedEvent> {
    let mut ev = DecodedEvent::default();
    for (f, w, p) in fields(b)? {
        match (f, w) {
            (1, 1) => ev.wall_time = f64::from_le_bytes(p[..8].try_into().expect("8 bytes")),
            (2, 0) => ev.step = u64::from_le_bytes(p[..8].try_into().expect("8 bytes")) as i64,
            (3, 2) => ev.file_version = Some(utf8(p)?),
            (5, 2) => {
                for (vf, vw, value) in fields(&p)? {
                    if (vf, vw) != (1, 2) {
                        continue;
                    }
                    let (mut tag, mut v, mut histo) = (String::new(), 0f32, None);
                    for (k, kw, x) in fields(&value)? {
                        match (k, kw) {
                            (1, 2) => tag = utf8(x)?,
                            (2, 5) => v = f32::from_le_bytes(x[..4].try_into().expect("4 bytes")),
                            (5, 2) => histo = Some(Histogram::decode(&x)?),
                            _ => {}
                        }
                    }
                    match histo {
                        Some(h) => ev.histograms.push((tag, h)),
                        None => ev.scalars.push((tag, v)),
                    }
                }
            }
            _ => {}
        }
    }
    Ok(ev)
}

/// Writes scalar and histogram summaries to a TensorBoard event file.
pub struct FileWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl std::fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileWriter({})", self.path.display())
    }
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::unavailable(format!("event file {}: {e}", path.display()))
}

impl FileWriter {
    /// A new event file in `logdir` (created if missing), starting with the version record.
    pub fn new(logdir: &Path) -> Result<FileWriter> {
        fs::create_dir_all(logdir).map_err(|e| io(logdir, e))?;
        let wall = now_secs();
        let path = logdir.join(format!("events.out.tfevents.{}.{}", wall as u64, host_name()));
        let file = File::create(&path).map_err(|e| io(&path, e))?;
        let mut w = FileWriter { path, out: BufWriter::new(file) };
        w.write_event(wall, 0, &EventBody::FileVersion("brain.Event:2"))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, wall: f64, step: i64, body: &EventBody<'_>) -> Result<()> {
        let rec = frame_record(&encode_event(wall, step, body));
        self.out.write_all(&rec).map_err(|e| io(&self.path, e))
    }

    /// Appends one scalar `value` for `tag` at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        self.write_event(now_secs(), step, &EventBody::Scalar(tag, value))
    }

    /// Appends one histogram for `tag` at `step`.
    pub fn add_histogram(&mut self, tag: &str, histogram: &Histogram, step: i64) -> Result<()> {
        self.write_event(now_secs(), step, &EventBody::Histogram(tag, histogram))
    }

    /// Pushes buffered events to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| io(&self.path, e))
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        // Best effort: an explicit `flush` is how a caller learns of a failed write.
        let _ = self.out.flush();
    }
}
