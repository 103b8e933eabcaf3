//! Tests of the frame codec: golden bytes, chunked feeding, every limit, and a fixed-seed fuzz run.

use super::*;

/// A fixed-seed xorshift64* generator: reproducible randomness without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn limits(meta: u32, body: u64) -> FrameLimits {
    FrameLimits { frame_meta_size_max: meta, frame_body_size_max: body }
}

fn frame_bytes(kind: FrameKind, call_id: u64, meta: &[u8], body: Option<&[u8]>) -> Vec<u8> {
    let body = body.map(|b| BodySource::Bytes(Arc::new(b.to_vec())));
    OutFrame::new(kind, call_id, meta, body, &FrameLimits::default()).unwrap().to_vec()
}

/// What a decoded frame looked like, for comparisons.
fn summary(f: &Frame) -> (FrameKind, u64, Vec<u8>, Option<Vec<u8>>) {
    (f.header.kind, f.header.call_id, f.meta.clone(), f.body.as_ref().map(|b| b.as_bytes().to_vec()))
}

/// Feeds `bytes` in chunks of the sizes `chunk` returns; bodies go where `dest` says.
fn decode_all(
    bytes: &[u8],
    lim: FrameLimits,
    mut chunk: impl FnMut() -> usize,
    mut dest: impl FnMut(&FrameHeader) -> BodyDest,
) -> Result<Vec<Frame>> {
    let mut d = FrameDecoder::new(lim);
    let mut frames = Vec::new();
    let mut at = 0;
    // Bounded: every turn consumes a chunk, names a destination or yields a frame.
    for _ in 0..4 * bytes.len() + 16 {
        if at == bytes.len() {
            break;
        }
        let end = (at + chunk().max(1)).min(bytes.len());
        let mut off = at;
        while off < end {
            let (used, out) = d.feed(&bytes[off..end])?;
            off += used;
            match out {
                Decoded::NeedMore => {}
                Decoded::BodyWanted => {
                    let h = *d.pending_header().unwrap();
                    d.set_body_dest(dest(&h))?;
                }
                Decoded::Frame(f) => frames.push(f),
            }
        }
        at = end;
    }
    Ok(frames)
}

#[test]
fn golden_bytes() {
    let bytes = frame_bytes(FrameKind::Request, 0x0102_0304_0506_0708, b"meta", Some(b"body!"));
    #[rustfmt::skip]
    let want: &[u8] = &[
        b'R', b'I', b'L', b'L',                         // magic
        0x02, 0x00,                                     // version 2
        0x05,                                           // kind Request
        0x01,                                           // flags: body
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // call_id
        0x04, 0x00, 0x00, 0x00,                         // meta_len 4
        0x05, 0, 0, 0, 0, 0, 0, 0,                      // body_len 5
        0xb9, 0x3e, 0x8a, 0xb6,                         // FNV-1a 32 of bytes 0..28
        b'm', b'e', b't', b'a',                         // meta
        b'b', b'o', b'd', b'y', b'!',                   // body
    ];
    assert_eq!(bytes, want);
    // An Error frame's meta is postcard: code as one byte, message as varint length + UTF-8.
    let meta = to_meta(&WireError { code: Code::DeadlineExceeded as u8, msg: "late".into() }).unwrap();
    assert_eq!(meta, [4, 4, b'l', b'a', b't', b'e']);
}

#[test]
fn fnv_reference_values() {
    // Published FNV-1a 32 test vectors.
    for (input, want) in [(&b""[..], 0x811c_9dc5u32), (b"a", 0xe40c_292c), (b"foobar", 0xbf9c_f968)] {
        assert_eq!(fnv1a32(input), want, "{input:?}");
    }
}

fn stream_of_frames() -> (Vec<u8>, Vec<(FrameKind, u64, Vec<u8>, Option<Vec<u8>>)>) {
    let big: Vec<u8> = (0..3 * BODY_GROW_SIZE_MIN + 17).map(|i| (i * 7 % 251) as u8).collect();
    let frames: Vec<(FrameKind, u64, Vec<u8>, Option<Vec<u8>>)> = vec![
        (FrameKind::Hello, 0, b"hello".to_vec(), None),
        (FrameKind::Request, 1, vec![], Some(vec![])),
        (FrameKind::Request, 2, b"m".to_vec(), Some(b"0123456789".to_vec())),
        (FrameKind::Ping, 3, vec![], None),
        (FrameKind::Response, 4, vec![9; 300], Some(big)),
        (FrameKind::Close, 0, b"bye".to_vec(), None),
    ];
    let mut bytes = Vec::new();
    for (kind, id, meta, body) in &frames {
        bytes.extend(frame_bytes(*kind, *id, meta, body.as_deref()));
    }
    (bytes, frames)
}

#[test]
fn decoder_takes_any_chunking() {
    let (bytes, want) = stream_of_frames();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut chunkings: Vec<(&str, Box<dyn FnMut() -> usize>)> = vec![
        ("whole", Box::new(|| usize::MAX / 2)),
        ("header-sized", Box::new(|| FRAME_HEADER_SIZE)),
        ("odd", Box::new(|| 7)),
        ("random", Box::new(move || 1 + rng.below(70_000))),
    ];
    // Byte by byte over the part without the large body (the large body is covered by the rest).
    let small_end = bytes.len()
        - frame_bytes(FrameKind::Close, 0, b"bye", None).len()
        - want[4].3.as_ref().unwrap().len()
        - 300
        - 32;
    let small =
        decode_all(&bytes[..small_end], FrameLimits::default(), || 1, |h| dest_for(h, "grow")).unwrap();
    assert_eq!(small.iter().map(summary).collect::<Vec<_>>(), want[..4].to_vec(), "byte by byte");
    for (name, chunk) in chunkings.iter_mut() {
        for mode in ["grow", "fixed"] {
            let got = decode_all(&bytes, FrameLimits::default(), &mut *chunk, |h| dest_for(h, mode)).unwrap();
            assert_eq!(got.iter().map(summary).collect::<Vec<_>>(), want, "{name} {mode}");
        }
    }
}

fn dest_for(h: &FrameHeader, mode: &str) -> BodyDest {
    match mode {
        "fixed" => BodyDest::Buffer(Buffer::zeroed(h.body_len as usize)),
        "discard" => BodyDest::Discard,
        _ => BodyDest::Grow,
    }
}

#[test]
fn discarded_bodies_are_skipped() {
    let mut bytes = frame_bytes(FrameKind::Response, 1, b"a", Some(&[5; 1000]));
    bytes.extend(frame_bytes(FrameKind::Response, 2, b"b", None));
    let got = decode_all(&bytes, FrameLimits::default(), || 100, |h| dest_for(h, "discard")).unwrap();
    let got: Vec<_> = got.iter().map(summary).collect();
    assert_eq!(
        got,
        vec![(FrameKind::Response, 1, b"a".to_vec(), None), (FrameKind::Response, 2, b"b".to_vec(), None)]
    );
}

#[test]
fn body_spare_reads_straight_into_the_destination() {
    let bytes = frame_bytes(FrameKind::Response, 9, b"m", Some(b"abcdef"));
    let mut d = FrameDecoder::new(FrameLimits::default());
    let (used, out) = d.feed(&bytes).unwrap();
    assert!(matches!(out, Decoded::BodyWanted));
    assert_eq!(used, FRAME_HEADER_SIZE + 1);
    d.set_body_dest(BodyDest::Buffer(Buffer::zeroed(6))).unwrap();
    d.body_spare_mut().unwrap()[..4].copy_from_slice(b"abcd");
    assert!(d.advance_body(4).is_none());
    assert_eq!(d.body_spare_mut().unwrap().len(), 2);
    d.body_spare_mut().unwrap().copy_from_slice(b"ef");
    let f = d.advance_body(2).unwrap();
    assert_eq!(summary(&f), (FrameKind::Response, 9, b"m".to_vec(), Some(b"abcdef".to_vec())));
}

/// A valid header with one field changed and the checksum recomputed, so the field check is reached.
fn header_with(edit: impl Fn(&mut [u8; FRAME_HEADER_SIZE])) -> [u8; FRAME_HEADER_SIZE] {
    let mut h =
        FrameHeader { kind: FrameKind::Request, flags: FLAG_BODY, call_id: 1, meta_len: 4, body_len: 8 }
            .encode();
    edit(&mut h);
    let sum = fnv1a32(&h[0..28]);
    h[28..32].copy_from_slice(&sum.to_le_bytes());
    h
}

#[test]
fn malformed_headers_are_refused() {
    let lim = limits(100, 1000);
    let cases: Vec<(&str, [u8; FRAME_HEADER_SIZE], Option<Code>, &str)> = vec![
        ("valid", header_with(|_| {}), None, ""),
        ("meta at limit", header_with(|h| h[16..20].copy_from_slice(&100u32.to_le_bytes())), None, ""),
        ("body at limit", header_with(|h| h[20..28].copy_from_slice(&1000u64.to_le_bytes())), None, ""),
        (
            "meta over limit",
            header_with(|h| h[16..20].copy_from_slice(&101u32.to_le_bytes())),
            Some(Code::ResourceExhausted),
            "meta of 101 bytes",
        ),
        (
            "body over limit",
            header_with(|h| h[20..28].copy_from_slice(&1001u64.to_le_bytes())),
            Some(Code::ResourceExhausted),
            "body of 1001 bytes",
        ),
        (
            "body u64::MAX",
            header_with(|h| h[20..28].copy_from_slice(&u64::MAX.to_le_bytes())),
            Some(Code::ResourceExhausted),
            "exceeds",
        ),
        ("bad magic", header_with(|h| h[0] = b'X'), Some(Code::InvalidArgument), "bad magic"),
        (
            "bad checksum",
            {
                let mut h = header_with(|_| {});
                h[31] ^= 1;
                h
            },
            Some(Code::InvalidArgument),
            "checksum",
        ),
        ("other version", header_with(|h| h[4] = 1), Some(Code::FailedPrecondition), "wire version 1"),
        ("unknown kind", header_with(|h| h[6] = 0), Some(Code::InvalidArgument), "unknown frame kind 0"),
        (
            "unknown kind 200",
            header_with(|h| h[6] = 200),
            Some(Code::InvalidArgument),
            "unknown frame kind 200",
        ),
        ("unknown flags", header_with(|h| h[7] = 0x81), Some(Code::InvalidArgument), "unknown frame flags"),
        (
            "length without flag",
            header_with(|h| h[7] = 0),
            Some(Code::InvalidArgument),
            "without the body flag",
        ),
        (
            "body on Hello",
            header_with(|h| h[6] = FrameKind::Hello as u8),
            Some(Code::InvalidArgument),
            "cannot carry a body",
        ),
    ];
    for (name, header, code, text) in cases {
        let got = FrameHeader::decode(&header, &lim);
        match got {
            Ok(_) => assert_eq!(code, None, "{name}: accepted"),
            Err(e) => {
                assert_eq!((Some(e.code), e.msg.contains(text)), (code, true), "{name}: {e}");
                // The decoder refuses the same header, and stays failed afterwards.
                let mut d = FrameDecoder::new(lim);
                assert_eq!(Some(d.feed(&header).unwrap_err().code), code, "{name}");
                assert!(d.feed(&header).is_err(), "{name}: decoder recovered from a broken stream");
            }
        }
    }
}

#[test]
fn encoder_refuses_oversized_frames() {
    let lim = limits(4, 8);
    let body = |n: usize| Some(BodySource::Bytes(Arc::new(vec![0; n])));
    let cases: Vec<(&str, usize, Option<BodySource>, Option<Code>)> = vec![
        ("fits", 4, body(8), None),
        ("meta over", 5, None, Some(Code::ResourceExhausted)),
        ("body over", 0, body(9), Some(Code::ResourceExhausted)),
    ];
    for (name, meta_len, body, want) in cases {
        let got = OutFrame::new(FrameKind::Request, 1, &vec![0; meta_len], body, &lim);
        assert_eq!(got.err().map(|e| e.code), want, "{name}");
    }
    let strings = Tensor::from_strings([1usize], vec![b"x".to_vec()]).unwrap();
    assert_eq!(BodySource::from_tensor(strings).unwrap_err().code, Code::InvalidArgument);
}

#[test]
fn partial_input_is_not_an_error() {
    let bytes = frame_bytes(FrameKind::Request, 1, b"meta", Some(b"body"));
    for cut in 0..bytes.len() {
        let mut d = FrameDecoder::new(FrameLimits::default());
        let (used, out) = d.feed(&bytes[..cut]).unwrap();
        let waiting = matches!(out, Decoded::NeedMore) || (matches!(out, Decoded::BodyWanted) && cut >= 36);
        assert!(waiting && used <= cut, "cut at {cut}: {out:?}");
    }
}

#[test]
fn meta_decoding_refuses_garbage_and_trailing_bytes() {
    let ok = to_meta(&WireError { code: 3, msg: "x".into() }).unwrap();
    let mut trailing = ok.clone();
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("valid", ok, true),
        ("trailing", trailing, false),
        ("empty", vec![], false),
        ("bad utf8", vec![3, 1, 0xff], false),
    ];
    for (name, meta, good) in cases {
        assert_eq!(from_meta::<WireError>(&meta, "Error").is_ok(), good, "{name}");
    }
}

#[test]
fn error_codes_keep_their_meaning() {
    for code in [
        Code::Cancelled,
        Code::DeadlineExceeded,
        Code::OutOfRange,
        Code::Aborted,
        Code::Unavailable,
        Code::Unauthenticated,
    ] {
        let meta = to_meta(&WireError::from(&Error::new(code, "m"))).unwrap();
        let back: Error = from_meta::<WireError>(&meta, "Error").unwrap().into();
        assert_eq!(back, Error::new(code, "m"));
    }
    let unknown: Error = WireError { code: 200, msg: "m".into() }.into();
    assert_eq!(unknown.code, Code::Unknown);
}

/// 20k random and mutated streams: the decoder must end in frames, "not yet" or an error, never a
/// panic, and never hold a body larger than the declared (bounded) size.
#[test]
fn fuzz_decoder_never_panics() {
    let lim = limits(4096, 4 << 20);
    let (valid, _) = stream_of_frames();
    let valid = &valid[..valid.len().min(4096)];
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let (mut frames, mut errors) = (0usize, 0usize);
    for case in 0..20_000 {
        let bytes: Vec<u8> = match case % 4 {
            // Pure noise.
            0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
            // A valid stream with a few bytes flipped.
            1 => {
                let mut b = valid.to_vec();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                b
            }
            // A header with random fields and a correct checksum, then noise.
            2 => {
                let mut h = [0u8; FRAME_HEADER_SIZE];
                h.iter_mut().for_each(|x| *x = rng.next() as u8);
                h[0..4].copy_from_slice(&WIRE_MAGIC);
                h[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
                h[6] = rng.below(12) as u8;
                h[7] = rng.below(3) as u8;
                h[16..20].copy_from_slice(&(rng.below(5000) as u32).to_le_bytes());
                let body = if rng.below(2) == 0 { rng.below(3000) as u64 } else { rng.next() };
                h[20..28].copy_from_slice(&body.to_le_bytes());
                let sum = fnv1a32(&h[0..28]);
                h[28..32].copy_from_slice(&sum.to_le_bytes());
                let mut b = h.to_vec();
                b.extend((0..rng.below(6000)).map(|_| rng.next() as u8));
                b
            }
            // A valid stream cut short at a random point.
            _ => valid[..rng.below(valid.len())].to_vec(),
        };
        let mode = ["grow", "fixed", "discard"][rng.below(3)];
        let mut sizes = XorShift(case as u64 + 1);
        match decode_all(&bytes, lim, || 1 + sizes.below(300), |h| dest_for(h, mode)) {
            Ok(got) => {
                frames += got.len();
                for f in got {
                    assert!(f.meta.len() <= 4096 && f.body.as_ref().map_or(0, |b| b.len()) <= 4 << 20);
                }
            }
            Err(_) => errors += 1,
        }
    }
    // The generator reached both outcomes, so the run exercised more than the magic check.
    assert!(frames > 1000 && errors > 1000, "frames {frames}, errors {errors}");
}
