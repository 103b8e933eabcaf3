//! TFRecord files: `u64 length | masked CRC-32C of length | data | masked CRC-32C of data`,
//! little-endian, optionally ZLIB- or GZIP-compressed as a whole stream.

use crate::crc32c;
use flate2::read::{MultiGzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use rill_graph::{Error, Result};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

/// Largest record a reader accepts unless configured otherwise: a corrupt length field must not
/// turn into a giant allocation.
pub const TFRECORD_MAX_RECORD_BYTES: u64 = 256 << 20;
/// Size of the buffer between the file and the decoder.
const READ_BUFFER_BYTES: usize = 256 << 10;

/// How a TFRecord stream is compressed (TensorFlow's `compression_type`: "", "ZLIB", "GZIP").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Zlib,
    Gzip,
}

impl Compression {
    pub fn parse(s: &str) -> Result<Compression> {
        match s {
            "" | "NONE" => Ok(Compression::None),
            "ZLIB" => Ok(Compression::Zlib),
            "GZIP" => Ok(Compression::Gzip),
            other => Err(Error::invalid_argument(format!(
                "unknown compression_type '{other}' (expected \"\", \"ZLIB\" or \"GZIP\")"
            ))),
        }
    }
}

enum Sink {
    Plain(BufWriter<File>),
    Zlib(ZlibEncoder<BufWriter<File>>),
    Gzip(GzEncoder<BufWriter<File>>),
}

/// Writes records to a TFRecord file (`tf.io.TFRecordWriter`).
pub struct TfRecordWriter {
    sink: Option<Sink>,
    path: String,
}

impl TfRecordWriter {
    pub fn create(path: impl AsRef<Path>, compression: Compression) -> Result<TfRecordWriter> {
        let p = path.as_ref();
        let f = BufWriter::new(File::create(p).map_err(|e| Error::from(e).context(p.display()))?);
        let level = flate2::Compression::default();
        let sink = match compression {
            Compression::None => Sink::Plain(f),
            Compression::Zlib => Sink::Zlib(ZlibEncoder::new(f, level)),
            Compression::Gzip => Sink::Gzip(GzEncoder::new(f, level)),
        };
        Ok(TfRecordWriter { sink: Some(sink), path: p.display().to_string() })
    }

    pub fn write(&mut self, record: &[u8]) -> Result<()> {
        let framed = frame(record);
        let w: &mut dyn Write = match self.sink.as_mut() {
            Some(Sink::Plain(w)) => w,
            Some(Sink::Zlib(w)) => w,
            Some(Sink::Gzip(w)) => w,
            None => {
                return Err(Error::failed_precondition(format!(
                    "TFRecord writer for {} is closed",
                    self.path
                )))
            }
        };
        w.write_all(&framed).map_err(|e| Error::from(e).context(&self.path))
    }

    /// Finishes the compressed stream and flushes the file.
    pub fn close(&mut self) -> Result<()> {
        let ctx = |e: std::io::Error| Error::from(e).context(&self.path);
        match self.sink.take() {
            Some(Sink::Plain(mut w)) => w.flush().map_err(ctx),
            Some(Sink::Zlib(w)) => w.finish().map_err(ctx)?.flush().map_err(ctx),
            Some(Sink::Gzip(w)) => w.finish().map_err(ctx)?.flush().map_err(ctx),
            None => Ok(()),
        }
    }
}

impl Drop for TfRecordWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// One record framed as it sits in the file.
pub fn frame(record: &[u8]) -> Vec<u8> {
    let len = (record.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(record.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32c::mask(crc32c::value(&len)).to_le_bytes());
    out.extend_from_slice(record);
    out.extend_from_slice(&crc32c::mask(crc32c::value(record)).to_le_bytes());
    out
}

/// Reads records from a TFRecord stream, checking both CRCs and a length limit.
pub struct TfRecordReader {
    src: Box<dyn Read + Send>,
    name: String,
    /// Offset of the next record in the (decompressed) stream.
    offset: u64,
    max_record_bytes: u64,
}

impl TfRecordReader {
    pub fn open(path: impl AsRef<Path>, compression: Compression) -> Result<TfRecordReader> {
        let p = path.as_ref();
        let f = File::open(p).map_err(|e| Error::from(e).context(p.display()))?;
        let f = BufReader::with_capacity(READ_BUFFER_BYTES, f);
        let src: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(f),
            Compression::Zlib => Box::new(ZlibDecoder::new(f)),
            Compression::Gzip => Box::new(MultiGzDecoder::new(f)),
        };
        Ok(TfRecordReader::new(src, &p.display().to_string()))
    }

    pub fn new(src: Box<dyn Read + Send>, name: &str) -> TfRecordReader {
        TfRecordReader { src, name: name.to_string(), offset: 0, max_record_bytes: TFRECORD_MAX_RECORD_BYTES }
    }

    pub fn with_max_record_bytes(mut self, max: u64) -> TfRecordReader {
        self.max_record_bytes = max;
        self
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn loss(&self, at: u64, what: &str) -> Error {
        Error::data_loss(format!("{what} at offset {at} in TFRecord file {}", self.name))
    }

    /// Reads up to `buf.len()` bytes; returns how many were read before the end of the stream.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.src.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.loss(self.offset + n as u64, &format!("read error ({e})"))),
            }
        }
        Ok(n)
    }

    /// The next record, or `None` at a clean end of the stream.
    pub fn read_record(&mut self) -> Result<Option<Vec<u8>>> {
        let at = self.offset;
        let mut header = [0u8; 12];
        match self.fill(&mut header)? {
            0 => return Ok(None),
            12 => {}
            n => return Err(self.loss(at, &format!("truncated record header ({n} of 12 bytes)"))),
        }
        let len_bytes: [u8; 8] = header[..8].try_into().expect("8 bytes");
        let len_crc = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
        if crc32c::mask(crc32c::value(&len_bytes)) != len_crc {
            return Err(self.loss(at, "corrupted record (length CRC mismatch)"));
        }
        let len = u64::from_le_bytes(len_bytes);
        if len > self.max_record_bytes {
            return Err(self
                .loss(at, &format!("record of {len} bytes exceeds the limit of {}", self.max_record_bytes)));
        }
        // Grows with the bytes actually present, never to a declared-but-absent length.
        let mut data = Vec::new();
        let got = (&mut self.src)
            .take(len)
            .read_to_end(&mut data)
            .map_err(|e| self.loss(at, &format!("read error ({e})")))?;
        if (got as u64) < len {
            return Err(self.loss(at, &format!("truncated record (declared {len} bytes, found {got})")));
        }
        let mut crc = [0u8; 4];
        if self.fill(&mut crc)? != 4 {
            return Err(self.loss(at, "truncated record (missing data CRC)"));
        }
        if crc32c::mask(crc32c::value(&data)) != u32::from_le_bytes(crc) {
            return Err(self.loss(at, "corrupted record (data CRC mismatch)"));
        }
        self.offset += 16 + len;
        Ok(Some(data))
    }

    /// Skips forward to `offset` in the stream (to restore a saved position).
    pub fn skip_to(&mut self, offset: u64) -> Result<()> {
        if offset < self.offset {
            return Err(Error::invalid_argument(format!("cannot seek back to {offset} in {}", self.name)));
        }
        let want = offset - self.offset;
        let n = std::io::copy(&mut (&mut self.src).take(want), &mut std::io::sink())
            .map_err(|e| self.loss(self.offset, &format!("read error ({e})")))?;
        if n < want {
            return Err(self.loss(self.offset + n, "file ends before the saved position"));
        }
        self.offset = offset;
        Ok(())
    }
}

/// Every record of a TFRecord file (a convenience for tools and tests).
pub fn read_all(path: impl AsRef<Path>, compression: Compression) -> Result<Vec<Vec<u8>>> {
    let mut r = TfRecordReader::open(path, compression)?;
    let mut out = Vec::new();
    while let Some(rec) = r.read_record()? {
        out.push(rec);
    }
    Ok(out)
}
