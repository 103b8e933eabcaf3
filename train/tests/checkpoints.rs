//! Checkpoints and event files: save and restore round trips, the index and `max_to_keep`,
//! restore errors naming the variable, corrupt checkpoint headers, and TensorBoard records.

use rill_graph::*;
use rill_train::saver::{decode, read_checkpoint};
use rill_train::summary::{crc32c, decode_event, masked_crc32c, read_records};
use rill_train::*;
use std::path::{Path, PathBuf};

/// A fresh empty directory under the target's temp dir, unique per test.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rill-train-{name}-{}-{:x}", std::process::id(), random_u64()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Model {
    g: Graph,
    vars: [Output; 3],
    reads: [Output; 3],
}

/// Three variables of different dtypes; `scale` changes their initial values.
fn model(scale: f32, bias_len: usize) -> Model {
    let g = Graph::new();
    let w = g.variable("layer/w", g.constant(Tensor::new([2, 2], &[1.0 * scale, 2.0, 3.0, 4.0]).unwrap()));
    let b = g.variable(
        "layer/b",
        g.constant(Tensor::new([bias_len], &vec![0.5f64 * scale as f64; bias_len]).unwrap()),
    );
    let n = g.variable("count", g.scalar(7i64 * scale as i64));
    let reads = [g.identity(w), g.identity(b), g.identity(n)];
    Model { g, vars: [w, b, n], reads }
}

fn session(m: &Model) -> DirectSession {
    let sess = DirectSession::new(&m.g, &standard_runtime(), SessionOptions::default()).unwrap();
    let init = m.g.global_variables_initializer();
    sess.extend(&m.g).unwrap();
    sess.run(&[], &[], &[init], &RunOptions::default()).unwrap();
    sess
}

fn values(sess: &DirectSession, m: &Model) -> Vec<Vec<f64>> {
    let out = sess.run(&[], &m.reads, &[], &RunOptions::default()).unwrap();
    out.iter().map(|t| t.to_f64_vec().unwrap()).collect()
}

#[test]
fn save_restore_round_trip_and_index() {
    let dir = temp_dir("roundtrip");
    let prefix = dir.join("model");
    let a = model(1.0, 2);
    let mut saver = Saver::new(&a.g, None, SaverOptions { max_to_keep: 2 }).unwrap();
    let sess_a = session(&a);
    assert_eq!(latest_checkpoint(&dir).unwrap(), None);
    let mut paths = Vec::new();
    for step in 1..=3 {
        paths.push(saver.save(&sess_a, &prefix, Some(step)).unwrap());
    }
    assert_eq!(paths[2], dir.join("model-3.safetensors"));
    assert_eq!(latest_checkpoint(&dir).unwrap(), Some(paths[2].clone()));
    assert!(!paths[0].exists(), "max_to_keep 2 deletes the oldest");
    assert!(paths[1].exists() && paths[2].exists());
    let index = std::fs::read_to_string(dir.join("checkpoint")).unwrap();
    assert!(index.contains("all_model_checkpoint_paths: \"model-2.safetensors\""), "{index}");

    let b = model(3.0, 2);
    let restorer = Saver::new(&b.g, None, SaverOptions::default()).unwrap();
    let sess_b = session(&b);
    assert_ne!(values(&sess_b, &b), values(&sess_a, &a));
    restorer.restore(&sess_b, &paths[2]).unwrap();
    assert_eq!(values(&sess_b, &b), values(&sess_a, &a));
    let names: Vec<String> = read_checkpoint(&paths[2]).unwrap().into_keys().collect();
    assert_eq!(names, ["count", "layer/b", "layer/w"]);
    let _ = b.vars;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restore_names_the_variable_that_does_not_fit() {
    let dir = temp_dir("mismatch");
    let a = model(1.0, 2);
    let only_w = [a.g.variable_of(a.vars[0]).unwrap()];
    let mut partial = Saver::new(&a.g, Some(&only_w), SaverOptions::default()).unwrap();
    let mut full = Saver::new(&a.g, None, SaverOptions::default()).unwrap();
    let sess = session(&a);
    let w_only = partial.save(&sess, &dir.join("w"), None).unwrap();
    let all = full.save(&sess, &dir.join("all"), Some(0)).unwrap();
    let other = model(1.0, 3);
    let restorer = Saver::new(&other.g, None, SaverOptions::default()).unwrap();
    let other_sess = session(&other);
    for (path, code, needle) in [
        (&w_only, Code::NotFound, "no variable 'layer/b'"),
        (&all, Code::InvalidArgument, "'layer/b' has shape [3]"),
        (&dir.join("absent.safetensors"), Code::NotFound, "absent"),
    ] {
        let e = restorer.restore(&other_sess, path).unwrap_err();
        assert_eq!(e.code, code, "{e}");
        assert!(e.msg.contains(needle), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A header `{"t": <entry>}` over `data_len` bytes of data.
fn decode_one(entry: &str, data_len: usize) -> Result<usize> {
    decode(format!("{{\"t\":{entry}}}").as_bytes(), &vec![0u8; data_len]).map(|m| m.len())
}

#[test]
fn corrupt_headers_are_data_loss() {
    let ok = r#"{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
    assert_eq!(decode_one(ok, 8).unwrap(), 1);
    for (entry, data_len) in [
        (r#"{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#, 4),
        (r#"{"dtype":"F32","shape":[2],"data_offsets":[4,8]}"#, 8),
        (r#"{"dtype":"F32","shape":[2],"data_offsets":[8,0]}"#, 8),
        (r#"{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}"#, 8),
        (r#"{"dtype":"F32","shape":[2],"data_offsets":[0,99999999999999999999]}"#, 8),
        (r#"{"dtype":"Q8","shape":[2],"data_offsets":[0,2]}"#, 8),
        (r#"{"dtype":"F32","shape":[2]}"#, 8),
        (r#"[[[[[[[[[[[[1]]]]]]]]]]]]"#, 8),
        (r#"{"dtype":"F32","shape":[2],"data_offsets":[0,8]"#, 8),
    ] {
        let e = decode_one(entry, data_len).unwrap_err();
        assert_eq!(e.code, Code::DataLoss, "{entry}: {e}");
    }
    let two = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
    let e = decode(two.as_bytes(), &[0; 4]).unwrap_err();
    assert!(e.msg.contains("overlap"), "{e}");

    let dir = temp_dir("corrupt");
    for (name, bytes) in [
        ("short", vec![1u8, 2, 3]),
        ("huge-header", [u64::MAX.to_le_bytes().as_slice(), b"{}"].concat()),
        ("past-end", [64u64.to_le_bytes().as_slice(), b"{}      "].concat()),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(read_checkpoint(&p).unwrap_err().code, Code::DataLoss, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn event_file(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    files.pop().unwrap()
}

#[test]
fn event_files_decode() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283, "the CRC-32C check value");
    assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    let dir = temp_dir("events");
    let mut w = FileWriter::new(&dir).unwrap();
    w.add_scalar("loss", 0.5, 1).unwrap();
    w.add_scalar("accuracy", 0.25, 2).unwrap();
    w.flush().unwrap();
    let path = event_file(&dir);
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let bytes = std::fs::read(&path).unwrap();
    let events: Vec<_> = read_records(&bytes).unwrap().iter().map(|r| decode_event(r).unwrap()).collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].wall_time > 1.0e9);
    assert_eq!((events[1].step, events[1].scalars.clone()), (1, vec![("loss".to_string(), 0.5)]));
    assert_eq!((events[2].step, events[2].scalars.clone()), (2, vec![("accuracy".to_string(), 0.25)]));
    let mut corrupt = bytes.clone();
    let last = corrupt.len() - 5;
    corrupt[last] ^= 1;
    assert_eq!(read_records(&corrupt).unwrap_err().code, Code::DataLoss);
    std::fs::remove_dir_all(&dir).unwrap();
}
