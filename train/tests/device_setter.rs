//! `replica_device_setter` as tables: which device each op asks for under round robin and
//! greedy-by-bytes placement, with inner and outer scopes merged as TensorFlow merges them.

use rill_graph::{DType, Graph, Output, PartialShape, Shape};
use rill_queues::{conditional_accumulator, fifo_queue, QueueOptions};
use rill_train::{replica_device_setter, PsStrategy, ReplicaDeviceSetterOptions};

fn var(g: &Graph, name: &str, n: usize) -> Output {
    g.variable(name, g.zeros(Shape::vector(n)))
}

/// Builds ops under the setter and returns the ones whose requested device is checked.
type Build = fn(&Graph) -> Vec<Output>;

fn check(name: &str, opts: ReplicaDeviceSetterOptions, build: Build, want: &[&str]) {
    let g = Graph::new();
    let outs = g.with_device(replica_device_setter(opts), build);
    g.status().unwrap();
    let got: Vec<String> = outs.iter().map(|o| g.node(o.node).device).collect();
    assert_eq!(got, want, "{name}");
}

fn opts(ps_tasks: usize, strategy: PsStrategy) -> ReplicaDeviceSetterOptions {
    ReplicaDeviceSetterOptions { strategy, ..ReplicaDeviceSetterOptions::new(ps_tasks, 1) }
}

#[test]
fn placement_table() {
    use PsStrategy::*;
    let table: &[(&str, ReplicaDeviceSetterOptions, Build, &[&str])] = &[
        (
            "variables round robin over the ps tasks; compute on the worker",
            opts(3, RoundRobin),
            |g| {
                let vs: Vec<Output> = (0..5).map(|i| var(g, &format!("v{i}"), 4)).collect();
                let sum = g.add(vs[0], vs[1]);
                [vs, vec![sum]].concat()
            },
            &[
                "/job:ps/task:0",
                "/job:ps/task:1",
                "/job:ps/task:2",
                "/job:ps/task:0",
                "/job:ps/task:1",
                "/job:worker/task:1",
            ],
        ),
        (
            "a variable's initializer is colocated with it; its initial value is computed on the worker",
            opts(2, RoundRobin),
            |g| {
                let v = var(g, "v", 4);
                let info = g.variable_of(v).unwrap();
                vec![v, Output::new(info.initializer, 0), info.initial_value]
            },
            &["/job:ps/task:0", "/job:ps/task:0", "/job:worker/task:1"],
        ),
        (
            "accumulators and queue handles are ps ops too",
            opts(2, RoundRobin),
            |g| {
                let a = conditional_accumulator(g, DType::F32, PartialShape::known(&[2]), "");
                let q = fifo_queue(g, 4, &[DType::I64], &[PartialShape::scalar()], &QueueOptions::default());
                vec![a, q]
            },
            &["/job:ps/task:0", "/job:ps/task:1"],
        ),
        (
            "an inner device scope keeps its fields",
            opts(3, RoundRobin),
            |g| {
                let pinned = g.with_device("/job:ps/task:2", |g| var(g, "pinned", 1));
                let on_cpu = g.with_device("/device:CPU:0", |g| g.add(g.scalar(1f32), g.scalar(2f32)));
                vec![pinned, on_cpu]
            },
            &["/job:ps/task:2", "/job:worker/task:1/device:CPU:0"],
        ),
        (
            "no ps tasks: the setter changes nothing",
            opts(0, RoundRobin),
            |g| vec![var(g, "v", 1), g.scalar(1f32)],
            &["", ""],
        ),
        (
            "greedy by bytes: each variable goes to the least loaded task, ties to the lowest",
            opts(2, GreedyByBytes),
            |g| {
                vec![
                    var(g, "big", 100),
                    var(g, "a", 10),
                    var(g, "b", 10),
                    var(g, "c", 50),
                    var(g, "d", 100),
                    var(g, "e", 1),
                ]
            },
            // loads after each: [400,0] [400,40] [400,80] [400,280] [400,680] [404,680]
            &[
                "/job:ps/task:0",
                "/job:ps/task:1",
                "/job:ps/task:1",
                "/job:ps/task:1",
                "/job:ps/task:1",
                "/job:ps/task:0",
            ],
        ),
    ];
    for (name, o, build, want) in table {
        check(name, o.clone(), *build, want);
    }
}

#[test]
fn an_outer_scope_fills_what_the_setter_leaves_open_and_the_setter_fills_the_rest() {
    let g = Graph::new();
    let (v, y) = g.with_device("/device:CPU:0", |g| {
        g.with_device(replica_device_setter(ReplicaDeviceSetterOptions::new(2, 3)), |g| {
            let v = var(g, "v", 2);
            (v, g.mul(v, v))
        })
    });
    assert_eq!(g.node(v.node).device, "/job:ps/task:0/device:CPU:0");
    assert_eq!(g.node(y.node).device, "/job:worker/task:3/device:CPU:0");
}

#[test]
fn custom_ps_ops_and_devices() {
    let o = ReplicaDeviceSetterOptions {
        ps_tasks: 2,
        ps_device: "/job:params".into(),
        worker_device: "/job:trainer/task:0".into(),
        ps_ops: vec!["Const".into()],
        strategy: PsStrategy::RoundRobin,
    };
    let g = Graph::new();
    let (a, b, c) = g.with_device(replica_device_setter(o), |g| {
        let a = g.scalar(1f32);
        let b = g.scalar(2f32);
        (a, b, g.add(a, b))
    });
    let devs: Vec<String> = [a, b, c].iter().map(|o| g.node(o.node).device).collect();
    assert_eq!(devs, ["/job:params/task:0", "/job:params/task:1", "/job:trainer/task:0"]);
}
