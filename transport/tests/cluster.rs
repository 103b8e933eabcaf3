//! Clusters in one test process: servers for a ps and a worker task on 127.0.0.1, remote
//! sessions (over a socket and in process), ops pinned across tasks, state shared between
//! sessions, reset, large tensors, a shared queue between clients, deadlines against a stopped
//! peer and a restarted peer.

use rill_graph::*;
use rill_queues::{dequeue, enqueue, fifo_queue, QueueOptions};
use rill_transport::{reset, ClusterSpec, ConnectOptions, RemoteSession, Server, ServerDef};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    rill_transport::cluster::free_loopback_port().unwrap()
}

fn runtime() -> Runtime {
    rill_device_cpu::cpu_runtime().with_ops(rill_queues::OPS).with_kernels(rill_queues::KERNELS)
}

fn cluster() -> ClusterSpec {
    ClusterSpec::parse(&format!("ps=127.0.0.1:{};worker=127.0.0.1:{}", free_port(), free_port())).unwrap()
}

fn start(c: &ClusterSpec, job: &str, task: u32) -> Server {
    start_with(c, job, task, true)
}

fn start_with(c: &ClusterSpec, job: &str, task: u32, shm: bool) -> Server {
    let mut def = ServerDef::new(c.clone(), job, task).unwrap();
    def.shm = shm;
    def.default_session_options.inter_op_parallelism_threads = 2;
    def.default_session_options.intra_op_parallelism_threads = 1;
    Server::start(def, runtime()).unwrap()
}

fn ro() -> RunOptions {
    RunOptions { timeout_in_ms: 20_000, ..Default::default() }
}

fn model(g: &Graph) -> (Output, Output, Output, Output) {
    let w = g.with_device("/job:ps/task:0", |g| g.variable("w", g.constant(Tensor::vector(&[1f32, 2., 3.]))));
    let x = g.placeholder("x", DType::F32, [Some(3)]);
    let y = g.with_device("/job:worker/task:0", |g| g.mul(g.add(w, x), g.scalar(2f32)));
    let init = g.global_variables_initializer();
    (w, x, y, init)
}

#[test]
fn ops_pinned_across_tasks_and_state_shared_between_sessions() {
    let c = cluster();
    let (ps, worker) = (start(&c, "ps", 0), start(&c, "worker", 0));
    let g = Graph::new();
    let (w, x, y, init) = model(&g);
    let s1 = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
    s1.run(&[], &[], &[init], &ro()).unwrap();
    let out = s1.run(&[(x, Tensor::vector(&[1f32, 1., 1.]))], &[y], &[], &ro()).unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![4.0, 6.0, 8.0]);
    let devices = s1.list_devices().unwrap();
    assert!(devices.iter().any(|d| d.name.to_string() == "/job:ps/replica:0/task:0/device:CPU:0"));
    // A second client, through the other server, sees the same variable.
    let s2 = RemoteSession::connect(&ps.target(), &g, SessionOptions::default()).unwrap();
    let bump = g.assign_add(w, g.constant(Tensor::vector(&[10f32, 10., 10.])));
    s2.extend(&g).unwrap();
    s2.run(&[], &[], &[bump], &ro()).unwrap();
    assert_eq!(s1.run(&[], &[w], &[], &ro()).unwrap()[0].to_vec::<f32>().unwrap(), vec![11.0, 12.0, 13.0]);
    // reset clears the containers of every task.
    reset(&worker.target(), &[], &ConnectOptions::default()).unwrap();
    let s3 = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
    let e = s3.run(&[], &[w], &[], &ro()).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
    assert!(e.msg.contains("/job:ps/task:0"), "the error names the task: {e}");
}

#[test]
fn a_large_tensor_crosses_tasks() {
    let c = cluster();
    let (_ps, worker) = (start(&c, "ps", 0), start(&c, "worker", 0));
    const N: usize = 48 << 20; // 192 MiB of f32
    let g = Graph::new();
    let big = g.with_device("/job:ps/task:0", |g| g.fill(Shape::vector(N), Tensor::scalar(0.5f32)));
    let s = g.with_device("/job:worker/task:0", |g| g.reduce_sum(big, &[0], false));
    let sess = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
    let out = sess.run(&[], &[s, big], &[], &ro()).unwrap();
    assert_eq!(out[0].scalar_value::<f32>().unwrap(), N as f32 * 0.5);
    let v = out[1].as_slice::<f32>().unwrap();
    assert_eq!(v.len(), N);
    assert!(v[0] == 0.5 && v[N / 2] == 0.5 && v[N - 1] == 0.5);
}

#[test]
fn a_queue_on_the_ps_is_shared_by_a_producer_and_a_consumer() {
    let c = cluster();
    let (ps, worker) = (start(&c, "ps", 0), start(&c, "worker", 0));
    let g = Graph::new();
    let opts = QueueOptions { shared_name: "shared_q".into(), ..Default::default() };
    let q = g.with_device("/job:ps/task:0", |g| {
        fifo_queue(g, 100, &[DType::I64], &[PartialShape::scalar()], &opts)
    });
    let item = g.placeholder("item", DType::I64, PartialShape::scalar());
    let enq = enqueue(&g, q, &[item]);
    let deq = dequeue(&g, q)[0];
    let producer = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
    let consumer = RemoteSession::connect(&ps.target(), &g, SessionOptions::default()).unwrap();
    for i in 0..20i64 {
        producer.run(&[(item, Tensor::scalar(i))], &[], &[enq], &ro()).unwrap();
    }
    let got: Vec<i64> = (0..20)
        .map(|_| consumer.run(&[], &[deq], &[], &ro()).unwrap()[0].scalar_value::<i64>().unwrap())
        .collect();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    // An empty queue times out for this step only; the queue still works afterwards.
    let e = consumer.run(&[], &[deq], &[], &RunOptions { timeout_in_ms: 200, ..ro() }).unwrap_err();
    assert_eq!(e.code, Code::DeadlineExceeded, "{e}");
    producer.run(&[(item, Tensor::scalar(99i64))], &[], &[enq], &ro()).unwrap();
    assert_eq!(consumer.run(&[], &[deq], &[], &ro()).unwrap()[0].scalar_value::<i64>().unwrap(), 99);
}

#[test]
fn a_stopped_peer_fails_the_step_naming_it_and_the_session_stays_usable() {
    let c = cluster();
    let (ps, worker) = (start(&c, "ps", 0), start(&c, "worker", 0));
    let g = Graph::new();
    let (_w, x, y, init) = model(&g);
    let local_only = g.with_device("/job:worker/task:0", |g| g.add(g.scalar(1f32), g.scalar(2f32)));
    let s = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
    s.run(&[], &[], &[init], &ro()).unwrap();
    drop(ps);
    let t0 = Instant::now();
    let e = s
        .run(&[(x, Tensor::vector(&[0f32; 3]))], &[y], &[], &RunOptions { timeout_in_ms: 2000, ..ro() })
        .unwrap_err();
    assert!(matches!(e.code, Code::Unavailable | Code::DeadlineExceeded), "{e}");
    assert!(e.msg.contains("/job:ps/task:0"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert_eq!(s.run(&[], &[local_only], &[], &ro()).unwrap()[0].scalar_value::<f32>().unwrap(), 3.0);
}

#[test]
fn a_restarted_peer_is_detected() {
    let c = cluster();
    let (ps, worker) = (start(&c, "ps", 0), start(&c, "worker", 0));
    let g = Graph::new();
    let (_w, x, y, init) = model(&g);
    let s = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
    s.run(&[], &[], &[init], &ro()).unwrap();
    s.run(&[(x, Tensor::vector(&[0f32; 3]))], &[y], &[], &ro()).unwrap();
    drop(ps);
    let _ps2 = start(&c, "ps", 0);
    let e = s.run(&[(x, Tensor::vector(&[0f32; 3]))], &[y], &[], &ro()).unwrap_err();
    assert!(matches!(e.code, Code::Aborted | Code::Unavailable), "{e}");
    // A new session works against the restarted task (its variables are gone, as in TF).
    let s2 = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
    s2.run(&[], &[], &[init], &ro()).unwrap();
    assert_eq!(
        s2.run(&[(x, Tensor::vector(&[0f32; 3]))], &[y], &[], &ro()).unwrap()[0].to_vec::<f32>().unwrap(),
        vec![2.0, 4.0, 6.0]
    );
}

#[test]
fn a_client_with_the_wrong_secret_is_refused() {
    let c = cluster();
    let mut def = ServerDef::new(c.clone(), "worker", 0).unwrap();
    def.secret = Some(b"s3cret".to_vec());
    let worker = Server::start(def, runtime()).unwrap();
    let g = Graph::new();
    g.scalar(1f32);
    let bad = ConnectOptions { secret: Some(b"wrong".to_vec()), ..Default::default() };
    let e = RemoteSession::connect_with(&worker.target(), &g, SessionOptions::default(), &bad).unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    let none = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap_err();
    assert_eq!(none.code, Code::Unauthenticated, "{none}");
    let good = ConnectOptions { secret: Some(b"s3cret".to_vec()), ..Default::default() };
    // Only the worker runs: the session's devices come from the tasks matching its filter.
    let opts = SessionOptions { device_filters: vec!["/job:worker".into()], ..Default::default() };
    let one = g.add(g.scalar(1f32), g.scalar(1f32));
    let s = RemoteSession::connect_with(&worker.target(), &g, opts, &good).unwrap();
    assert_eq!(s.run(&[], &[one], &[], &ro()).unwrap()[0].scalar_value::<f32>().unwrap(), 2.0);
}

#[test]
fn tensors_between_tasks_on_one_host_use_shared_memory_and_tcp_gives_the_same_results() {
    const N: usize = 1 << 18; // 1 MiB of f32
    let data: Vec<f32> = (0..N).map(|i| i as f32).collect();
    for shm in [true, false] {
        let c = cluster();
        let (ps, worker) = (start_with(&c, "ps", 0, shm), start_with(&c, "worker", 0, shm));
        let g = Graph::new();
        let v = g
            .with_device("/job:ps/task:0", |g| g.variable("v", g.constant(Tensor::new([N], &data).unwrap())));
        let pulled = g.with_device("/job:worker/task:0", |g| g.identity(v));
        let init = g.global_variables_initializer();
        let s = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
        s.run(&[], &[], &[init], &ro()).unwrap();
        // The first pull teaches the worker the tensor's size; later ones name a region for it.
        assert_eq!(s.run(&[], &[pulled], &[], &ro()).unwrap()[0].as_slice::<f32>().unwrap(), &data[..]);
        let socket_before = ps.bytes_transferred().0;
        for _ in 0..2 {
            assert_eq!(s.run(&[], &[pulled], &[], &ro()).unwrap()[0].as_slice::<f32>().unwrap(), &data[..]);
        }
        let socket = ps.bytes_transferred().0 - socket_before;
        let (written, _) = ps.shm_bytes_transferred();
        let (_, landed) = worker.shm_bytes_transferred();
        if shm {
            assert_eq!((written, landed), (2 * 4 * N as u64, 2 * 4 * N as u64), "shm on");
            assert!(socket < 64 << 10, "only control messages crossed the socket: {socket} bytes");
        } else {
            assert_eq!((written, landed), (0, 0), "shm off");
            assert!(socket >= 2 * 4 * N as u64, "the tensors crossed the socket: {socket} bytes");
        }
    }
}

#[test]
fn an_in_process_session_runs_like_a_connected_one_until_its_server_stops() {
    let c = cluster();
    let (_ps, worker) = (start(&c, "ps", 0), start(&c, "worker", 0));
    let g = Graph::new();
    let (w, x, y, init) = model(&g);
    let local = RemoteSession::in_process(&worker, &g, SessionOptions::default()).unwrap();
    local.run(&[], &[], &[init], &ro()).unwrap();
    let feed = [(x, Tensor::vector(&[1f32, 1., 1.]))];
    assert_eq!(local.run(&feed, &[y], &[], &ro()).unwrap()[0].to_vec::<f32>().unwrap(), vec![4.0, 6.0, 8.0]);
    // The same master state as a client over the socket, and the same devices.
    let remote = RemoteSession::connect(&worker.target(), &g, SessionOptions::default()).unwrap();
    let bump = g.assign_add(w, g.constant(Tensor::vector(&[10f32, 10., 10.])));
    local.extend(&g).unwrap();
    local.run(&[], &[], &[bump], &ro()).unwrap();
    let seen = remote.run(&[], &[w], &[], &ro()).unwrap();
    assert_eq!(seen[0].to_vec::<f32>().unwrap(), vec![11.0, 12.0, 13.0]);
    let names = |s: &RemoteSession| {
        let mut d: Vec<String> = s.list_devices().unwrap().iter().map(|d| d.name.to_string()).collect();
        d.sort();
        d
    };
    assert_eq!(names(&local), names(&remote));
    // A missing feed is the master's error, as over the socket.
    let e = local.run(&[], &[y], &[], &ro()).unwrap_err();
    assert_eq!(e.code, remote.run(&[], &[y], &[], &ro()).unwrap_err().code, "{e}");
    drop(remote);
    worker.stop();
    let e = local.run(&feed, &[y], &[], &ro()).unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
}
