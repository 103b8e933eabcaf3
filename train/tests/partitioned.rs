//! Partitioned variables: shard counts of the partitioners, `embedding_lookup` with the "mod" and
//! "div" strategies against a plain gather, and a model whose embedding table is split over two
//! ps tasks training across a cluster on 127.0.0.1 to the same values as the unpartitioned model.

use rill_graph::*;
use rill_train::*;
use rill_transport::{ClusterSpec, RemoteSession, Server, ServerDef};

fn ro() -> RunOptions {
    RunOptions { timeout_in_ms: 20_000, ..Default::default() }
}

fn local(g: &Graph) -> DirectSession {
    DirectSession::new(g, &standard_runtime(), SessionOptions::default()).unwrap()
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn partitioners_count_shards_as_tensorflow() {
    let s = Shape::new(&[10, 4]).unwrap();
    assert_eq!(fixed_size_partitioner(3).num_shards(&s, DType::F32).unwrap(), 3);
    // At most one shard per row.
    assert_eq!(fixed_size_partitioner(20).num_shards(&s, DType::F32).unwrap(), 10);
    assert!(fixed_size_partitioner(0).num_shards(&s, DType::F32).is_err());
    // 1000 rows of 64 f32 = 256 KB each: 64 KiB slices hold 256 rows, so 4 shards; capped at 3.
    let big = Shape::new(&[1000, 64]).unwrap();
    assert_eq!(min_max_variable_partitioner(8, 64 << 10).num_shards(&big, DType::F32).unwrap(), 4);
    assert_eq!(min_max_variable_partitioner(3, 64 << 10).num_shards(&big, DType::F32).unwrap(), 3);
    // TensorFlow's default 256 KiB slices: one shard for a small variable.
    assert_eq!(min_max_variable_partitioner(8, 256 << 10).num_shards(&s, DType::F32).unwrap(), 1);
    assert!(fixed_size_partitioner(2).num_shards(&Shape::scalar(), DType::F32).is_err());
    assert_eq!(partitioned::shard_rows(10, 3), vec![4, 3, 3]);
}

#[test]
fn shards_are_named_and_lookups_match_a_plain_gather() {
    let (rows, dim) = (11usize, 3usize);
    let table = Tensor::new([rows, dim], &values(rows * dim, 1)).unwrap();
    let g = Graph::new();
    let pv = partitioned_variable(
        &g,
        "emb",
        [rows, dim],
        DType::F32,
        fixed_size_partitioner(3),
        rows_of(table.clone()),
    )
    .unwrap();
    let names: Vec<&str> = pv.shards.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["emb/part_0", "emb/part_1", "emb/part_2"]);
    assert_eq!(pv.offsets, vec![0, 4, 8]);
    let ids_v: Vec<i64> = vec![0, 10, 3, 4, 7, 8, 1, 5, 10, 2];
    let ids = g.constant(Tensor::new([2, 5], &ids_v).unwrap());
    let whole = pv.as_tensor(&g);
    let div = pv.embedding_lookup(&g, ids, PartitionStrategy::Div).unwrap();
    // "mod" reads shards laid out by id % 3: build such shards from the same table.
    let mod_shards: Vec<Output> = (0..3)
        .map(|p| {
            let rows_p: Vec<f32> = (0..rows)
                .filter(|i| i % 3 == p)
                .flat_map(|i| table.as_slice::<f32>().unwrap()[i * dim..(i + 1) * dim].to_vec())
                .collect();
            g.variable(
                &format!("mod_{p}"),
                g.constant(Tensor::new([rows_p.len() / dim, dim], &rows_p).unwrap()),
            )
        })
        .collect();
    let modl = embedding_lookup(&g, &mod_shards, ids, PartitionStrategy::Mod).unwrap();
    let init = g.global_variables_initializer();
    let s = local(&g);
    s.run(&[], &[], &[init], &ro()).unwrap();
    let out = s.run(&[], &[whole, div, modl], &[], &ro()).unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), table.to_vec::<f32>().unwrap());
    let t = table.as_slice::<f32>().unwrap();
    let want: Vec<f32> =
        ids_v.iter().flat_map(|&i| t[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
    assert_eq!(out[1].shape().dims(), &[2, 5, dim]);
    assert_eq!(out[1].to_vec::<f32>().unwrap(), want);
    assert_eq!(out[2].to_vec::<f32>().unwrap(), want);
}

/// Embedding lookup, mean over the bag, a dense layer, softmax loss; trains for `steps` steps
/// with gradient descent. `partitions` = 0: one plain variable.
struct Model {
    train: Output,
    loss: Output,
    init: Output,
    table: Output,
    shards: Vec<VariableInfo>,
}

const ROWS: usize = 40;
const DIM: usize = 8;

fn build(g: &Graph, partitions: usize, strategy: PartitionStrategy) -> Model {
    let table_init = Tensor::new([ROWS, DIM], &values(ROWS * DIM, 2)).unwrap();
    let (emb, table, shards) = {
        let ids: Vec<i64> = (0..24).map(|i| (i * 7 + 3) % ROWS as i64).collect();
        let ids = g.constant(Tensor::new([6, 4], &ids).unwrap());
        if partitions == 0 {
            let t = g.variable("emb", g.constant(table_init));
            (g.gather(t, ids), t, Vec::new())
        } else {
            let init: Box<dyn FnMut(&Graph, Shape, usize) -> Output> = match strategy {
                PartitionStrategy::Div => Box::new(rows_of(table_init)),
                // Shard p holds ids p, p + n, p + 2n, ..: the same embeddings as the plain table.
                PartitionStrategy::Mod => {
                    let offsets: Vec<usize> = partitioned::shard_rows(ROWS, partitions)
                        .iter()
                        .scan(0, |o, &r| {
                            *o += r;
                            Some(*o - r)
                        })
                        .collect();
                    let t = table_init.to_vec::<f32>().unwrap();
                    Box::new(move |g: &Graph, shape: Shape, first: usize| {
                        let p = offsets.iter().position(|&o| o == first).unwrap();
                        let v: Vec<f32> = (0..ROWS)
                            .filter(|i| i % partitions == p)
                            .flat_map(|i| t[i * DIM..(i + 1) * DIM].to_vec())
                            .collect();
                        g.constant(Tensor::new(shape, &v).unwrap())
                    })
                }
            };
            let pv = partitioned_variable(
                g,
                "emb",
                [ROWS, DIM],
                DType::F32,
                fixed_size_partitioner(partitions),
                init,
            )
            .unwrap();
            let e = pv.embedding_lookup(g, ids, strategy).unwrap();
            (e, pv.as_tensor(g), pv.shards.clone())
        }
    };
    let bag = g.reduce_mean(emb, &[1], false);
    let w = g.variable("w", g.constant(Tensor::new([DIM, 3], &values(DIM * 3, 3)).unwrap()));
    let labels = g.constant(Tensor::vector(&[0i64, 1, 2, 0, 1, 2]));
    let logits = g.matmul(bag, w);
    let loss = g.reduce_mean(g.sparse_softmax_cross_entropy_with_logits(logits, labels).0, &[], false);
    let train = GradientDescent::new(0.5).minimize(g, loss, None).unwrap();
    let init = g.global_variables_initializer();
    g.status().unwrap();
    Model { train, loss, init, table, shards }
}

fn train(s: &dyn Session, m: &Model, steps: usize) -> (f32, f32, Vec<f32>) {
    s.run(&[], &[], &[m.init], &ro()).unwrap();
    let l0 = s.run(&[], &[m.loss], &[], &ro()).unwrap()[0].scalar_value::<f32>().unwrap();
    for _ in 0..steps {
        s.run(&[], &[], &[m.train], &ro()).unwrap();
    }
    let out = s.run(&[], &[m.loss, m.table], &[], &ro()).unwrap();
    (l0, out[0].scalar_value::<f32>().unwrap(), out[1].to_vec::<f32>().unwrap())
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs()))
}

#[test]
fn a_partitioned_table_trains_across_two_ps_tasks_like_an_unpartitioned_one() {
    let port = || rill_transport::cluster::free_loopback_port().unwrap();
    let spec = ClusterSpec::parse(&format!(
        "ps=127.0.0.1:{},127.0.0.1:{};worker=127.0.0.1:{}",
        port(),
        port(),
        port()
    ))
    .unwrap();
    let start = |job: &str, task: u32| {
        let mut def = ServerDef::new(spec.clone(), job, task).unwrap();
        def.default_session_options.inter_op_parallelism_threads = 2;
        def.default_session_options.intra_op_parallelism_threads = 1;
        Server::start(def, standard_runtime()).unwrap()
    };
    let (ps0, ps1, worker) = (start("ps", 0), start("ps", 1), start("worker", 0));

    let reference = Graph::new();
    let rm = build(&reference, 0, PartitionStrategy::Div);
    let (l0, l1, want) = train(&local(&reference), &rm, 30);
    assert!(l1 < 0.5 * l0, "the reference model learns: {l0} -> {l1}");

    for strategy in [PartitionStrategy::Div, PartitionStrategy::Mod] {
        let g = Graph::new();
        let m = g.with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(2, 0)), |g| {
            build(g, 2, strategy)
        });
        let devices: Vec<String> = m.shards.iter().map(|s| g.node(s.var.node).device).collect();
        assert_eq!(m.shards.len(), 2);
        assert!(
            devices[0].contains("/job:ps/task:0") && devices[1].contains("/job:ps/task:1"),
            "{devices:?}"
        );
        let (b0, b1) = (ps0.bytes_transferred(), ps1.bytes_transferred());
        let s = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
        let (p0, p1, got) = train(&s, &m, 30);
        // Each ps task served its shard.
        assert!(ps0.bytes_transferred().0 > b0.0 && ps1.bytes_transferred().0 > b1.0);
        assert!((p0 - l0).abs() < 1e-5, "{strategy:?}: the same start: {p0} vs {l0}");
        assert!((p1 - l1).abs() < 1e-4, "{strategy:?}: the same end: {p1} vs {l1}");
        // The concatenated shards in table order: "div" shards are row ranges, "mod" shard p
        // holds rows p, p + 2, ...
        let table: Vec<f32> = match strategy {
            PartitionStrategy::Div => got,
            PartitionStrategy::Mod => (0..ROWS)
                .flat_map(|i| {
                    let r = (i % 2) * (ROWS / 2) + i / 2;
                    got[r * DIM..(r + 1) * DIM].to_vec()
                })
                .collect(),
        };
        assert!(close(&table, &want), "{strategy:?}: the trained table differs");
    }
}
