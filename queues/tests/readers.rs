//! Readers, TFRecord files and decoders: round trips, positions, and corrupt input reported as
//! DataLoss/InvalidArgument errors that name the file and offset.

use rill_device_cpu::cpu_runtime;
use rill_graph::{
    Code, DType, DirectSession, Graph, PartialShape, RunOptions, Session, SessionOptions, Shape, Tensor,
};
use rill_queues::{
    self as rq, Compression, Example, Feature, Queue, Reader, ReaderKind, TfRecordReader, TfRecordWriter,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rill-queues-{tag}-{}-{}",
        std::process::id(),
        rill_graph::random_u64()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn file_queue(files: &[&PathBuf]) -> Arc<Queue> {
    let q = Arc::new(Queue::fifo("files", 100, &[DType::String], &[PartialShape::scalar()]).unwrap());
    for f in files {
        q.enqueue(vec![Tensor::scalar_string(f.display().to_string())], WAIT).unwrap();
    }
    q.close(false);
    q
}

/// Every `(key, value)` a reader produces until its queue runs out.
fn read_all(reader: &Arc<Reader>, q: &Arc<Queue>) -> (Vec<(String, Vec<u8>)>, Option<rill_graph::Error>) {
    let mut out = Vec::new();
    loop {
        match reader.read(q, WAIT) {
            Ok((k, v)) => out.push((String::from_utf8(k).unwrap(), v)),
            Err(e) if e.code == Code::OutOfRange => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

#[test]
fn tfrecord_round_trips_in_every_compression() {
    let dir = temp_dir("tfr");
    let records: Vec<Vec<u8>> = vec![b"a".to_vec(), Vec::new(), vec![7u8; 100_000], b"last".to_vec()];
    for c in [Compression::None, Compression::Zlib, Compression::Gzip] {
        let p = dir.join(format!("{c:?}.tfrecord"));
        let mut w = TfRecordWriter::create(&p, c).unwrap();
        records.iter().for_each(|r| w.write(r).unwrap());
        w.close().unwrap();
        assert_eq!(rq::tfrecord::read_all(&p, c).unwrap(), records, "{c:?}");
        let reader = Arc::new(
            Reader::new("r", ReaderKind::TfRecord { compression: c, max_record_bytes: 1 << 20 }).unwrap(),
        );
        let (got, err) = read_all(&reader, &file_queue(&[&p, &p]));
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got.len(), 8);
        assert_eq!(got[1].0, format!("{}:17", p.display()), "key is file:offset");
        assert_eq!((reader.num_records_produced(), reader.num_work_units_completed()), (8, 2));
    }
}

#[test]
fn corrupt_tfrecords_are_data_loss_naming_file_and_offset() {
    let good = [rq::tfrecord::frame(b"hello"), rq::tfrecord::frame(b"world")].concat();
    let mut bad_data_crc = good.clone();
    bad_data_crc[30] ^= 1; // inside the second record's data
    let mut bad_len_crc = good.clone();
    bad_len_crc[8] ^= 1;
    let mut huge = (u64::MAX / 2).to_le_bytes().to_vec();
    huge.extend_from_slice(&rq::crc32c::mask(rq::crc32c::value(&huge)).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("data crc", bad_data_crc, "offset 21"),
        ("length crc", bad_len_crc, "offset 0"),
        ("truncated data", good[..good.len() - 6].to_vec(), "offset 21"),
        ("truncated header", good[..25].to_vec(), "offset 21"),
        ("length beyond the limit", huge, "exceeds the limit"),
    ];
    for (what, bytes, want) in cases {
        let mut r = TfRecordReader::new(Box::new(std::io::Cursor::new(bytes)), "f.tfrecord");
        let e = loop {
            match r.read_record() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("{what}: corrupt input read cleanly"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code, Code::DataLoss, "{what}: {e}");
        assert!(e.msg.contains(want) && e.msg.contains("f.tfrecord"), "{what}: {e}");
    }
}

#[test]
fn text_line_reader_skips_headers_and_strips_line_ends() {
    let dir = temp_dir("text");
    let (a, b) = (dir.join("a.csv"), dir.join("b.csv"));
    std::fs::write(&a, "h1,h2\n1,2\r\n3,4").unwrap();
    std::fs::write(&b, "h1,h2\n").unwrap();
    let reader = Arc::new(Reader::new("t", ReaderKind::TextLine { skip_header_lines: 1 }).unwrap());
    let (got, err) = read_all(&reader, &file_queue(&[&a, &b]));
    assert!(err.is_none());
    let want = vec![
        (format!("{}:2", a.display()), b"1,2".to_vec()),
        (format!("{}:3", a.display()), b"3,4".to_vec()),
    ];
    assert_eq!(got, want);
    assert_eq!(reader.num_work_units_completed(), 2);
}

#[test]
fn fixed_length_reader_honours_header_footer_and_hop() {
    let dir = temp_dir("fixed");
    let p = dir.join("f.bin");
    std::fs::write(&p, b"HHabcdefgFF").unwrap(); // header 2, data "abcdefg", footer 2
    let cases: [(u64, &[&[u8]]); 2] = [(0, &[b"abc", b"def"]), (2, &[b"abc", b"cde", b"efg"])];
    for (hop, want) in cases {
        let kind = ReaderKind::FixedLengthRecord {
            header_bytes: 2,
            record_bytes: 3,
            footer_bytes: 2,
            hop_bytes: hop,
        };
        let reader = Arc::new(Reader::new("f", kind).unwrap());
        let (got, _) = read_all(&reader, &file_queue(&[&p]));
        let vals: Vec<&[u8]> = got.iter().map(|(_, v)| v.as_slice()).collect();
        assert_eq!(vals, want, "hop {hop}");
    }
}

#[test]
fn whole_file_reader_and_save_restore() {
    let dir = temp_dir("whole");
    let p = dir.join("w.txt");
    std::fs::write(&p, b"all of it").unwrap();
    let reader = Arc::new(Reader::new("w", ReaderKind::WholeFile).unwrap());
    assert_eq!(
        reader.read(&file_queue(&[&p]), WAIT).unwrap(),
        (p.display().to_string().into_bytes(), b"all of it".to_vec())
    );

    let t = dir.join("lines.txt");
    std::fs::write(&t, "l1\nl2\nl3\nl4\n").unwrap();
    let r = Arc::new(Reader::new("t", ReaderKind::TextLine { skip_header_lines: 0 }).unwrap());
    let q = file_queue(&[&t]);
    assert_eq!(r.read(&q, WAIT).unwrap().1, b"l1");
    let saved = r.serialize_state();
    assert_eq!(r.read(&q, WAIT).unwrap().1, b"l2");
    r.restore_state(&saved).unwrap();
    let (k, v) = r.read(&q, WAIT).unwrap();
    assert_eq!((String::from_utf8(k).unwrap(), v), (format!("{}:2", t.display()), b"l2".to_vec()));
    assert_eq!(r.num_records_produced(), 2);
    r.reset();
    assert_eq!(r.num_records_produced(), 0);
    assert_eq!(r.restore_state(b"garbage").unwrap_err().code, Code::InvalidArgument);
}

fn session(g: &Graph) -> DirectSession {
    let rt = cpu_runtime().with_ops(rq::OPS).with_kernels(rq::KERNELS);
    DirectSession::new(g, &rt, SessionOptions::default()).unwrap()
}

#[test]
fn reader_ops_read_tfrecords_of_examples_and_parse_them() {
    let dir = temp_dir("ops");
    let p = dir.join("ex.tfrecord");
    let mut w = TfRecordWriter::create(&p, Compression::Gzip).unwrap();
    for i in 0..5i64 {
        let ex = Example::new()
            .with("label", Feature::Int64(vec![i]))
            .with("x", Feature::Float(vec![i as f32, 0.5]))
            .with("name", Feature::Bytes(vec![format!("n{i}").into_bytes()]));
        w.write(&ex.encode(i % 2 == 0)).unwrap();
    }
    w.close().unwrap();
    let g = Graph::new();
    let files = rq::fifo_queue(&g, 10, &[DType::String], &[PartialShape::scalar()], &Default::default());
    let fname = g.placeholder("fname", DType::String, PartialShape::scalar());
    let add = rq::enqueue(&g, files, &[fname]);
    let close = rq::queue_close(&g, files, false);
    let reader = rq::tf_record_reader(&g, Compression::Gzip, "");
    let (_, values) = rq::reader_read_up_to(&g, reader, files, 3);
    let parsed = rq::parse_example(
        &g,
        values,
        &[
            rq::DenseFeature::required("label", DType::I64, Shape::SCALAR),
            rq::DenseFeature::required("x", DType::F32, [2]),
            rq::DenseFeature::required("name", DType::String, Shape::SCALAR),
            rq::DenseFeature::with_default("missing", Tensor::scalar(-1i64)),
        ],
    );
    let produced = rq::reader_num_records_produced(&g, reader);
    let s = session(&g);
    let o = RunOptions::default();
    s.run(&[(fname, Tensor::scalar_string(p.display().to_string()))], &[], &[add], &o).unwrap();
    s.run(&[], &[], &[close], &o).unwrap();
    let first = s.run(&[], &parsed, &[], &o).unwrap();
    assert_eq!(first[0].to_vec::<i64>().unwrap(), vec![0, 1, 2]);
    assert_eq!(first[1].shape().dims(), &[3, 2]);
    assert_eq!(first[3].to_vec::<i64>().unwrap(), vec![-1, -1, -1]);
    let rest = s.run(&[], &parsed, &[], &o).unwrap();
    assert_eq!(rest[0].to_vec::<i64>().unwrap(), vec![3, 4], "read_up_to returns the rest at the end");
    assert_eq!(rest[2].strings().unwrap(), &[b"n3".to_vec(), b"n4".to_vec()]);
    assert_eq!(s.run(&[], &parsed, &[], &o).unwrap_err().code, Code::OutOfRange);
    assert_eq!(s.run(&[], &[produced], &[], &o).unwrap()[0].scalar_value::<i64>().unwrap(), 5);
}

#[test]
fn parse_example_rejects_bad_records() {
    let g = Graph::new();
    let ser = g.placeholder("ser", DType::String, [None]);
    let out = rq::parse_example(&g, ser, &[rq::DenseFeature::required("x", DType::F32, [2])]);
    let s = session(&g);
    let enc = |e: Example| e.encode(true);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("missing required", enc(Example::new())),
        ("wrong count", enc(Example::new().with("x", Feature::Float(vec![1.0])))),
        ("wrong type", enc(Example::new().with("x", Feature::Int64(vec![1, 2])))),
        ("malformed bytes", vec![0x0a, 0x7f, 0x01]),
    ];
    for (what, rec) in cases {
        let t = Tensor::from_strings(Shape::vector(1), vec![rec]).unwrap();
        let e = s.run(&[(ser, t)], &out, &[], &RunOptions::default()).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{what}: {e}");
    }
}

#[test]
fn decode_csv_follows_record_defaults() {
    let g = Graph::new();
    let rec = g.placeholder("rec", DType::String, [None]);
    let defaults = [
        Tensor::scalar(0i32),
        Tensor::zeros(DType::F32, Shape::vector(0)),
        Tensor::scalar_string("?"),
        Tensor::scalar(5i64),
    ];
    let cols = rq::decode_csv(&g, rec, &defaults, &rq::CsvOptions::default());
    let s = session(&g);
    let run = |rows: &[&str]| {
        let t = Tensor::from_strings(
            Shape::vector(rows.len()),
            rows.iter().map(|r| r.as_bytes().to_vec()).collect(),
        )
        .unwrap();
        s.run(&[(rec, t)], &cols, &[], &RunOptions::default())
    };
    let out = run(&["1,2.5,abc,7", ",0.5,\"a,\"\"b\"\"\","]).unwrap();
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![1, 0]);
    assert_eq!(out[1].to_vec::<f32>().unwrap(), vec![2.5, 0.5]);
    assert_eq!(out[2].strings().unwrap(), &[b"abc".to_vec(), b"a,\"b\"".to_vec()]);
    assert_eq!(out[3].to_vec::<i64>().unwrap(), vec![7, 5]);
    for (what, row) in [
        ("required field missing", "1,,x,2"),
        ("too few fields", "1,2"),
        ("not a number", "x,1,a,2"),
        ("unterminated quote", "1,2,\"abc,3"),
        ("quote inside a field", "1,2,a\"b,3"),
    ] {
        assert_eq!(run(&[row]).unwrap_err().code, Code::InvalidArgument, "{what}");
    }
}

#[test]
fn decode_raw_reinterprets_bytes() {
    let g = Graph::new();
    let b = g.placeholder("b", DType::String, [None]);
    let le = rq::decode_raw(&g, b, DType::I32, true);
    let be = rq::decode_raw(&g, b, DType::I32, false);
    let s = session(&g);
    let t = Tensor::from_strings(
        Shape::vector(2),
        vec![vec![1, 0, 0, 0, 2, 0, 0, 0], vec![0, 0, 0, 3, 0, 0, 0, 4]],
    )
    .unwrap();
    let out = s.run(&[(b, t)], &[le, be], &[], &RunOptions::default()).unwrap();
    assert_eq!(out[0].shape().dims(), &[2, 2]);
    assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![1, 2, 3 << 24, 4 << 24]);
    assert_eq!(out[1].to_vec::<i32>().unwrap(), vec![1 << 24, 2 << 24, 3, 4]);
    let ragged = Tensor::from_strings(Shape::vector(2), vec![vec![0; 4], vec![0; 8]]).unwrap();
    assert_eq!(
        s.run(&[(b, ragged)], &[le], &[], &RunOptions::default()).unwrap_err().code,
        Code::InvalidArgument
    );
}
