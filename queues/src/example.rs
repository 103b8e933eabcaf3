//! `tf.train.Example` in protobuf wire format, by hand: an encoder (packed or unpacked numeric
//! lists) and a decoder that checks every length against the bytes that remain before using it.

use rill_graph::{Error, Result};
use std::collections::BTreeMap;

/// Deepest varint: 10 bytes carry 64 bits.
const VARINT_MAX_BYTES: usize = 10;

/// One feature's values (`BytesList`, `FloatList` or `Int64List`).
#[derive(Clone, Debug, PartialEq)]
pub enum Feature {
    Bytes(Vec<Vec<u8>>),
    Float(Vec<f32>),
    Int64(Vec<i64>),
}

impl Feature {
    pub fn kind(&self) -> &'static str {
        match self {
            Feature::Bytes(_) => "bytes",
            Feature::Float(_) => "float",
            Feature::Int64(_) => "int64",
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Feature::Bytes(v) => v.len(),
            Feature::Float(v) => v.len(),
            Feature::Int64(v) => v.len(),
        }
    }
}

/// A `tf.train.Example`: named features. A feature whose list kind is unset decodes as absent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Example {
    pub features: BTreeMap<String, Feature>,
}

impl Example {
    pub fn new() -> Example {
        Example::default()
    }

    pub fn with(mut self, key: &str, f: Feature) -> Example {
        self.features.insert(key.to_string(), f);
        self
    }

    /// The wire form; `packed` chooses packed (proto3 default) or unpacked numeric lists.
    pub fn encode(&self, packed: bool) -> Vec<u8> {
        let mut features = Vec::new();
        for (k, f) in &self.features {
            let mut list = Vec::new();
            let field = match f {
                Feature::Bytes(v) => {
                    for b in v {
                        put_bytes(&mut list, 1, b);
                    }
                    1
                }
                Feature::Float(v) => {
                    if packed {
                        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        put_bytes(&mut list, 1, &raw);
                    } else {
                        for x in v {
                            put_varint(&mut list, (1 << 3) | 5);
                            list.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                    2
                }
                Feature::Int64(v) => {
                    if packed {
                        let mut raw = Vec::new();
                        v.iter().for_each(|&x| put_varint(&mut raw, x as u64));
                        put_bytes(&mut list, 1, &raw);
                    } else {
                        for &x in v {
                            put_varint(&mut list, 1 << 3);
                            put_varint(&mut list, x as u64);
                        }
                    }
                    3
                }
            };
            let mut feature = Vec::new();
            put_bytes(&mut feature, field, &list);
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, k.as_bytes());
            put_bytes(&mut entry, 2, &feature);
            put_bytes(&mut features, 1, &entry);
        }
        let mut out = Vec::new();
        put_bytes(&mut out, 1, &features);
        out
    }

    /// Parses the wire form. Unknown fields are skipped; a later map entry for a key wins.
    pub fn decode(bytes: &[u8]) -> Result<Example> {
        let mut ex = Example::new();
        let mut c = Cursor::new(bytes);
        while !c.done() {
            match c.key()? {
                (1, 2) => {
                    let mut fs = Cursor::sub(c.bytes()?, c.base + c.pos);
                    while !fs.done() {
                        match fs.key()? {
                            (1, 2) => {
                                let (k, f) = decode_entry(fs.bytes()?, fs.base + fs.pos)?;
                                match f {
                                    Some(f) => ex.features.insert(k, f),
                                    None => ex.features.remove(&k),
                                };
                            }
                            (_, w) => fs.skip(w)?,
                        }
                    }
                }
                (_, w) => c.skip(w)?,
            }
        }
        Ok(ex)
    }
}

fn decode_entry(b: &[u8], base: usize) -> Result<(String, Option<Feature>)> {
    let mut c = Cursor::sub(b, base);
    let (mut key, mut feature) = (String::new(), None);
    while !c.done() {
        match c.key()? {
            (1, 2) => {
                let at = c.base + c.pos;
                key = String::from_utf8(c.bytes()?.to_vec())
                    .map_err(|_| malformed(at, "feature name is not UTF-8"))?;
            }
            (2, 2) => feature = decode_feature(c.bytes()?, c.base + c.pos)?,
            (_, w) => c.skip(w)?,
        }
    }
    Ok((key, feature))
}

fn decode_feature(b: &[u8], base: usize) -> Result<Option<Feature>> {
    let mut c = Cursor::sub(b, base);
    let mut out = None;
    while !c.done() {
        let (field, wire) = c.key()?;
        if wire != 2 || !(1..=3).contains(&field) {
            c.skip(wire)?;
            continue;
        }
        let body = c.bytes()?;
        let at = c.base + c.pos;
        out = Some(match field {
            1 => Feature::Bytes(decode_bytes_list(body, at)?),
            2 => Feature::Float(decode_float_list(body, at)?),
            _ => Feature::Int64(decode_int64_list(body, at)?),
        });
    }
    Ok(out)
}

fn decode_bytes_list(b: &[u8], base: usize) -> Result<Vec<Vec<u8>>> {
    let mut c = Cursor::sub(b, base);
    let mut v = Vec::new();
    while !c.done() {
        match c.key()? {
            (1, 2) => v.push(c.bytes()?.to_vec()),
            (_, w) => c.skip(w)?,
        }
    }
    Ok(v)
}

fn decode_float_list(b: &[u8], base: usize) -> Result<Vec<f32>> {
    let mut c = Cursor::sub(b, base);
    let mut v = Vec::new();
    while !c.done() {
        match c.key()? {
            (1, 2) => {
                let at = c.base + c.pos;
                let packed = c.bytes()?;
                if packed.len() % 4 != 0 {
                    return Err(malformed(at, "packed float list length is not a multiple of 4"));
                }
                v.extend(packed.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]])));
            }
            (1, 5) => v.push(f32::from_le_bytes(c.fixed::<4>()?)),
            (_, w) => c.skip(w)?,
        }
    }
    Ok(v)
}

fn decode_int64_list(b: &[u8], base: usize) -> Result<Vec<i64>> {
    let mut c = Cursor::sub(b, base);
    let mut v = Vec::new();
    while !c.done() {
        match c.key()? {
            (1, 2) => {
                let mut p = Cursor::sub(c.bytes()?, c.base + c.pos);
                while !p.done() {
                    v.push(p.varint()? as i64);
                }
            }
            (1, 0) => v.push(c.varint()? as i64),
            (_, w) => c.skip(w)?,
        }
    }
    Ok(v)
}

fn malformed(at: usize, what: &str) -> Error {
    Error::invalid_argument(format!("malformed Example: {what} at byte {at}"))
}

/// A read position in a message nested at `base` in the whole record (for error offsets).
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Cursor<'a> {
        Cursor { b, pos: 0, base: 0 }
    }

    /// A cursor over `b`, which ended at `end` in the whole record.
    fn sub(b: &'a [u8], end: usize) -> Cursor<'a> {
        Cursor { b, pos: 0, base: end - b.len() }
    }

    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..VARINT_MAX_BYTES {
            let Some(&byte) = self.b.get(self.pos) else {
                return Err(malformed(self.base + self.pos, "truncated varint"));
            };
            self.pos += 1;
            v |= ((byte & 0x7f) as u64) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed(self.base + self.pos, "varint longer than 10 bytes"))
    }

    fn key(&mut self) -> Result<(u64, u8)> {
        let k = self.varint()?;
        Ok((k >> 3, (k & 7) as u8))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(malformed(self.base + self.pos, &format!("field declares {n} bytes, {left} remain")));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.varint()?;
        self.take(n)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("N bytes"))
    }

    fn skip(&mut self, wire: u8) -> Result<()> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            2 => self.bytes().map(drop),
            5 => self.take(4).map(drop),
            w => Err(malformed(self.base + self.pos, &format!("unsupported wire type {w}"))),
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Example {
        Example::new()
            .with("label", Feature::Int64(vec![3, -1, 1 << 40]))
            .with("x", Feature::Float(vec![0.5, -2.25]))
            .with("name", Feature::Bytes(vec![b"abc".to_vec(), Vec::new()]))
    }

    #[test]
    fn round_trips_packed_and_unpacked() {
        for packed in [true, false] {
            assert_eq!(Example::decode(&sample().encode(packed)).unwrap(), sample(), "packed {packed}");
        }
    }

    #[test]
    fn every_truncation_is_an_error_or_a_prefix_never_a_panic() {
        let full = sample().encode(true);
        for cut in 0..full.len() {
            // Either an error or a (smaller) valid message; the point is no panic.
            let _ = Example::decode(&full[..cut]);
        }
        for bad in [&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f][..], &[0x0a, 0x05, 0x0a], &[0x0b], &[0xff; 11]] {
            let e = Example::decode(bad).unwrap_err();
            assert_eq!(e.code, rill_graph::Code::InvalidArgument, "{bad:?}");
            assert!(e.msg.contains("at byte"), "{e}");
        }
    }

    #[test]
    fn known_wire_bytes() {
        // features { feature { key: "a" value { int64_list { value: 1 } } } }, packed.
        let want = [0x0a, 0x0c, 0x0a, 0x0a, 0x0a, 0x01, b'a', 0x12, 0x05, 0x1a, 0x03, 0x0a, 0x01, 0x01];
        assert_eq!(Example::new().with("a", Feature::Int64(vec![1])).encode(true), want);
    }
}
