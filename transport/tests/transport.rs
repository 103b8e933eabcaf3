//! The transport over real sockets on 127.0.0.1: handshakes, calls, errors, deadlines, dropped peers,
//! large bodies, limits, and garbage thrown at a listening server.

use rill_graph::{Buffer, Code, Error, Result};
use rill_transport::handshake::{random_nonce, Handshake, Identity};
use rill_transport::wire::{FrameKind, OutFrame};
use rill_transport::{BodySource, CallOptions, Handler, Limits, PeerHandle, Transport, TransportOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TIMEOUT_MS: u64 = 5_000;
const CLUSTER: u64 = 0xc1;
/// How long the test service takes to answer `slow`.
const SLOW_MS: u64 = 30;

fn deadline() -> Instant {
    Instant::now() + Duration::from_millis(TIMEOUT_MS)
}

fn opts(job: &str, secret: Option<&[u8]>) -> TransportOptions {
    TransportOptions {
        secret: secret.map(|s| s.to_vec()),
        cluster_id: CLUSTER,
        job: job.into(),
        ..TransportOptions::default()
    }
}

/// The test service: meta names what to do with the request.
fn service() -> Handler {
    let parked: Arc<Mutex<Vec<rill_transport::Responder>>> = Arc::new(Mutex::new(Vec::new()));
    Arc::new(move |req, responder| {
        let reply = match req.meta.as_slice() {
            b"echo" => responder.respond(b"echoed", req.body.map(|b| BodySource::Buffer(Arc::new(b)))),
            b"sum" => {
                let body = req.body.unwrap_or_else(|| Buffer::zeroed(0));
                responder.respond(&checksum(body.as_bytes()).to_le_bytes(), None)
            }
            b"fail" => responder.fail(&Error::out_of_range("the queue is closed")),
            b"big" => responder.respond(b"", Some(BodySource::Bytes(Arc::new(vec![7; 1 << 20])))),
            b"slow" => {
                std::thread::sleep(Duration::from_millis(SLOW_MS));
                responder.respond(b"late", None)
            }
            b"panic" => panic!("test handler panics on purpose"),
            // Never answered while the test runs: the caller's deadline must fire.
            b"park" => {
                parked.lock().unwrap().push(responder);
                Ok(())
            }
            _ => responder.fail(&Error::unimplemented("unknown test verb")),
        };
        reply.unwrap();
    })
}

fn server(secret: Option<&[u8]>, limits: Limits) -> Transport {
    Transport::start(TransportOptions {
        bind: Some("127.0.0.1:0".parse().unwrap()),
        handler: Some(service()),
        limits,
        ..opts("ps", secret)
    })
    .unwrap()
}

fn client(secret: Option<&[u8]>) -> Transport {
    Transport::start(opts("worker", secret)).unwrap()
}

fn call(peer: &PeerHandle, verb: &[u8], body: Option<Vec<u8>>) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    let body = body.map(|b| BodySource::Bytes(Arc::new(b)));
    let opts = CallOptions::timeout(Duration::from_millis(TIMEOUT_MS)).body_size_max(64 << 20);
    let r = peer.call(verb, body, opts)?;
    Ok((r.meta, r.body.map(|b| b.as_bytes().to_vec())))
}

/// FNV-1a 64 over a sample of positions plus the length: cheap enough for 256 MiB in a test.
fn checksum(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ bytes.len() as u64;
    for &b in bytes.iter().step_by(4093) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[test]
fn handshakes() {
    let k: &[u8] = b"cluster secret";
    let cases: &[(&str, Option<&[u8]>, Option<&[u8]>, u64, Option<Code>)] = &[
        ("no secrets", None, None, CLUSTER, None),
        ("same secret", Some(k), Some(k), CLUSTER, None),
        ("wrong secret", Some(k), Some(b"guess"), CLUSTER, Some(Code::Unauthenticated)),
        ("client without secret", Some(k), None, CLUSTER, Some(Code::Unauthenticated)),
        ("server without secret", None, Some(k), CLUSTER, Some(Code::Unauthenticated)),
        ("other cluster", None, None, 0xdead, Some(Code::FailedPrecondition)),
    ];
    for (name, server_secret, client_secret, cluster_id, want) in cases {
        let s = server(*server_secret, Limits::default());
        let c =
            Transport::start(TransportOptions { cluster_id: *cluster_id, ..opts("worker", *client_secret) })
                .unwrap();
        let got = c.connect(s.local_addr().unwrap(), deadline());
        match (&got, want) {
            (Ok(peer), None) => {
                assert_eq!(peer.info().name(), "/job:ps/task:0", "{name}");
                assert_eq!(peer.info().authenticated, server_secret.is_some(), "{name}");
                assert_eq!(call(peer, b"echo", None).unwrap().0, b"echoed", "{name}");
            }
            (Err(e), Some(code)) => assert_eq!(e.code, *code, "{name}: {e}"),
            _ => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

#[test]
fn callers_spin_only_through_short_calls() {
    let s = server(None, Limits::default());
    let c = client(None);
    let peer = c.connect(s.local_addr().unwrap(), deadline()).unwrap();
    for _ in 0..20 {
        assert_eq!(call(&peer, b"echo", None).unwrap().0, b"echoed");
    }
    // After one slow call the connection's calls count as long: the caller sleeps through them.
    assert_eq!(call(&peer, b"slow", None).unwrap().0, b"late");
    let (cpu, wall) = (thread_cpu_time(), Instant::now());
    const SLOW_CALLS: u32 = 8;
    for _ in 0..SLOW_CALLS {
        assert_eq!(call(&peer, b"slow", None).unwrap().0, b"late");
    }
    let (cpu, wall) = (thread_cpu_time() - cpu, wall.elapsed());
    assert!(wall >= Duration::from_millis(SLOW_CALLS as u64 * SLOW_MS));
    // Spinning through each would cost at least `CALL_SPIN` a call.
    let spun = rill_transport::CALL_SPIN * SLOW_CALLS;
    assert!(cpu < spun / 2, "the caller used {cpu:?} of CPU in {wall:?} of slow calls");
    // A transport told never to spin answers all the same.
    let still =
        Transport::start(TransportOptions { call_spin: Duration::ZERO, ..opts("worker", None) }).unwrap();
    let p2 = still.connect(s.local_addr().unwrap(), deadline()).unwrap();
    assert_eq!(call(&p2, b"echo", Some(vec![9])).unwrap(), (b"echoed".to_vec(), Some(vec![9])));
}

#[test]
fn calls_and_errors_cross_the_wire() {
    let s = server(None, Limits::default());
    let c = client(None);
    let peer = c.connect(s.local_addr().unwrap(), deadline()).unwrap();
    let cases: Vec<(&str, &[u8], Option<Vec<u8>>, Result<(Vec<u8>, Option<Vec<u8>>)>)> = vec![
        ("echo no body", b"echo", None, Ok((b"echoed".to_vec(), None))),
        ("echo empty body", b"echo", Some(vec![]), Ok((b"echoed".to_vec(), Some(vec![])))),
        ("echo body", b"echo", Some(vec![1, 2, 3]), Ok((b"echoed".to_vec(), Some(vec![1, 2, 3])))),
        ("error code kept", b"fail", None, Err(Error::out_of_range("the queue is closed"))),
        ("unknown verb", b"nope", None, Err(Error::unimplemented("unknown test verb"))),
        (
            "panicking handler",
            b"panic",
            None,
            Err(Error::internal("the request handler dropped the request without answering")),
        ),
        ("still serving", b"echo", None, Ok((b"echoed".to_vec(), None))),
    ];
    for (name, verb, body, want) in cases {
        assert_eq!(call(&peer, verb, body), want, "{name}");
    }
    // A process with no handler answers Unimplemented; its own calls still work.
    let s2 =
        Transport::start(TransportOptions { bind: Some("127.0.0.1:0".parse().unwrap()), ..opts("ps", None) })
            .unwrap();
    let peer2 = c.connect(s2.local_addr().unwrap(), deadline()).unwrap();
    assert_eq!(call(&peer2, b"echo", None).unwrap_err().code, Code::Unimplemented);
}

#[test]
fn many_calls_in_flight_from_many_threads() {
    let s = server(None, Limits::default());
    let c = client(None);
    let peer = c.connect(s.local_addr().unwrap(), deadline()).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4u8 {
            let peer = peer.clone();
            scope.spawn(move || {
                for i in 0..200u32 {
                    let body = vec![t; (i as usize * 37) % 5000];
                    let (_, got) = call(&peer, b"echo", Some(body.clone())).unwrap();
                    assert_eq!(got.unwrap(), body);
                }
            });
        }
    });
}

#[test]
fn body_limits() {
    let limits = Limits { request_body_size_max: 1000, ..Limits::default() };
    let s = server(None, limits);
    let c = client(None);
    let peer = c.connect(s.local_addr().unwrap(), deadline()).unwrap();
    let small_bound = CallOptions::timeout(Duration::from_millis(TIMEOUT_MS)).body_size_max(1000);
    let cases: Vec<(&str, Result<(Vec<u8>, Option<Vec<u8>>)>, Option<Code>)> = vec![
        ("request body at limit", call(&peer, b"echo", Some(vec![1; 1000])), None),
        ("request body over limit", call(&peer, b"echo", Some(vec![1; 1001])), Some(Code::ResourceExhausted)),
        (
            "response over the caller's bound",
            peer.call(b"big", None, small_bound).map(|r| (r.meta, None)),
            Some(Code::ResourceExhausted),
        ),
        ("connection still usable", call(&peer, b"echo", None), None),
    ];
    for (name, got, want) in cases {
        assert_eq!(got.as_ref().err().map(|e| e.code), want, "{name}: {got:?}");
    }
    // A caller-named destination buffer receives the body.
    let opts =
        CallOptions::timeout(Duration::from_millis(TIMEOUT_MS)).response_buffer(Buffer::zeroed(1 << 20));
    let r = peer.call(b"big", None, opts).unwrap();
    assert!(r.body.unwrap().as_bytes().iter().all(|&b| b == 7));
}

#[test]
fn deadlines_name_the_peer() {
    // A raw listener that accepts and never answers: the handshake cannot finish.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let c = client(None);
    let started = Instant::now();
    let e = c.connect(addr, Instant::now() + Duration::from_millis(300)).unwrap_err();
    assert_eq!(e.code, Code::DeadlineExceeded, "{e}");
    assert!(e.msg.contains(&addr.to_string()), "{e}");
    assert!(started.elapsed() < Duration::from_millis(2_000));

    // A handshaken peer whose handler never answers: the call's deadline fires.
    let s = server(None, Limits::default());
    let peer = c.connect(s.local_addr().unwrap(), deadline()).unwrap();
    let started = Instant::now();
    let e = peer.call(b"park", None, CallOptions::timeout(Duration::from_millis(200))).unwrap_err();
    let waited = started.elapsed();
    assert_eq!(e.code, Code::DeadlineExceeded, "{e}");
    assert!(e.msg.contains("/job:ps/task:0") && e.msg.contains(&s.local_addr().unwrap().to_string()), "{e}");
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_millis(1_500), "{waited:?}");
    assert_eq!(call(&peer, b"echo", None).unwrap().0, b"echoed");
}

#[test]
fn a_dropped_peer_is_unavailable() {
    let s = server(None, Limits::default());
    let addr = s.local_addr().unwrap();
    let c = client(None);
    let peer = c.connect(addr, deadline()).unwrap();
    let waiting = {
        let peer = peer.clone();
        std::thread::spawn(move || {
            peer.call(b"park", None, CallOptions::timeout(Duration::from_millis(TIMEOUT_MS)))
        })
    };
    // Let the parked call reach the server, then take the server away.
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    let e = waiting.join().unwrap().unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(e.msg.contains(&addr.to_string()), "{e}");
    let e = call(&peer, b"echo", None).unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(e.msg.contains(&addr.to_string()) && e.msg.contains("/job:ps/task:0"), "{e}");
    let e = c.connect(addr, deadline()).unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
}

#[test]
fn a_large_body_round_trips() {
    const BODY_SIZE: usize = 256 << 20;
    let s = server(None, Limits::default());
    let c = client(None);
    let peer = c.connect(s.local_addr().unwrap(), deadline()).unwrap();
    let mut buf = Buffer::zeroed(BODY_SIZE);
    for (i, chunk) in buf.as_bytes_mut().chunks_mut(4096).enumerate() {
        chunk.fill((i % 251) as u8);
    }
    let want = checksum(buf.as_bytes());
    let body = BodySource::Buffer(Arc::new(buf));
    let opts = CallOptions::timeout(Duration::from_secs(20)).body_size_max(BODY_SIZE as u64);
    let r = peer.call(b"echo", Some(body), opts).unwrap();
    let got = r.body.unwrap();
    assert_eq!(got.len(), BODY_SIZE);
    assert_eq!(checksum(got.as_bytes()), want);
    for i in [0, 4095, 4096, BODY_SIZE / 2 + 1, BODY_SIZE - 1] {
        assert_eq!(got.as_bytes()[i], ((i / 4096) % 251) as u8, "byte {i}");
    }
}

/// A valid client `Hello` so that garbage can also reach a connection past its handshake.
fn hello_bytes() -> Vec<u8> {
    let id = Identity { cluster_id: CLUSTER, job: "raw".into(), task: 9, incarnation: 1, host: None };
    let (_, (kind, meta)) = Handshake::client(id, None, random_nonce().unwrap()).unwrap();
    OutFrame::new(kind, 0, &meta, None, &Default::default()).unwrap().to_vec()
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes `bytes`, then reads until the server closes or a short wait passes.
fn throw(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(TIMEOUT_MS)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // The server may close mid-write; that is the point.
    let _ = s.write_all(bytes);
    let mut sink = [0u8; 4096];
    for _ in 0..64 {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[test]
fn garbage_does_not_hurt_a_live_server() {
    let s = server(None, Limits { request_body_size_max: 1 << 20, ..Limits::default() });
    let addr = s.local_addr().unwrap();
    let hello = hello_bytes();
    let header = |kind: FrameKind, meta_len: u32, body_len: u64| {
        let flags = if body_len > 0 { 1 } else { 0 };
        rill_transport::wire::FrameHeader { kind, flags, call_id: 1, meta_len, body_len }.encode().to_vec()
    };
    let with_hello = |tail: Vec<u8>| [hello.clone(), tail].concat();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("nothing", vec![]),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("zeros", vec![0; 100]),
        ("huge meta declared", header(FrameKind::Hello, u32::MAX, 0)),
        ("huge body declared", with_hello(header(FrameKind::Request, 0, u64::MAX))),
        (
            "64 GiB body declared, 1 byte sent",
            with_hello([header(FrameKind::Request, 0, 64 << 30), vec![1]].concat()),
        ),
        ("request before hello", header(FrameKind::Request, 0, 10)),
        ("hello then noise", with_hello(vec![0xab; 500])),
        ("response for no call", with_hello([header(FrameKind::Response, 0, 3), vec![1, 2, 3]].concat())),
        ("hello twice", with_hello(hello.clone())),
        ("truncated hello", hello[..hello.len() - 3].to_vec()),
    ];
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for i in 0..40 {
        let mut bytes = if i % 2 == 0 { hello.clone() } else { vec![] };
        bytes.extend((0..(rng.next() % 2000)).map(|_| rng.next() as u8));
        if i % 4 == 1 {
            let at = (rng.next() as usize) % hello.len();
            let mut h = hello.clone();
            h[at] ^= 0x40;
            bytes = h;
        }
        cases.push(("random", bytes));
    }
    for (name, bytes) in &cases {
        throw(addr, bytes);
        // The server lives on and serves a proper client after every case.
        let c = client(None);
        let peer = c.connect(addr, deadline()).unwrap_or_else(|e| panic!("after {name}: {e}"));
        assert_eq!(call(&peer, b"echo", Some(vec![5; 10])).unwrap().1, Some(vec![5; 10]), "after {name}");
    }
}

#[test]
fn connections_are_bounded() {
    let s = server(None, Limits { connections_max: 1, ..Limits::default() });
    let addr = s.local_addr().unwrap();
    let c = client(None);
    let first = c.connect(addr, deadline()).unwrap();
    let e = c.connect(addr, deadline()).unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    first.close().unwrap();
    // The server notices the close on its next read; retry for a bounded time.
    let mut connected = None;
    for _ in 0..50 {
        if let Ok(p) = c.connect(addr, deadline()) {
            connected = Some(p);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(call(&connected.expect("a slot frees up"), b"echo", None).unwrap().0, b"echoed");
}
