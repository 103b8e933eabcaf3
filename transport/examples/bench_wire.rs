//! Loopback benchmarks of the transport against plain sockets: one-way transfer of a 64 MiB body and
//! a tiny call's round trip. Prints `RESULT <name> = <value> <unit>` lines (median of the reps).
//!
//! Run: `cargo run --release -p rill-transport --example bench_wire`

use rill_graph::Buffer;
use rill_transport::{BodySource, CallOptions, Transport, TransportOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BODY_SIZE: usize = 64 << 20;
const REPS: usize = 9;
const TINY_CALLS_PER_REP: usize = 500;
const TIMEOUT_MS: u64 = 30_000;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn spread(xs: &[f64]) -> String {
    let m = median(xs.to_vec());
    let (lo, hi) = xs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("[min {:.0}% max {:.0}% of median, n={}]", lo / m * 100.0, hi / m * 100.0, xs.len())
}

fn line(name: &str, xs: Vec<f64>, unit: &str) {
    println!("RESULT {name} = {:.3} {unit} {}", median(xs.clone()), spread(&xs));
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn opts() -> CallOptions {
    CallOptions::timeout(Duration::from_millis(TIMEOUT_MS))
}

fn main() -> rill_graph::Result<()> {
    let mut payload = Buffer::zeroed(BODY_SIZE);
    payload.as_bytes_mut().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    let payload = Arc::new(payload);

    // The transport: the server answers "get" with the 64 MiB body, written from its buffer.
    let served = payload.clone();
    let server = Transport::start(TransportOptions {
        bind: Some("127.0.0.1:0".parse().expect("address")),
        handler: Some(Arc::new(move |req, responder| {
            let body = (req.meta == b"get").then(|| BodySource::Buffer(served.clone()));
            let _ = responder.respond(b"", body);
        })),
        ..TransportOptions::default()
    })?;
    let client = Transport::start(TransportOptions::default())?;
    let peer =
        client.connect(server.local_addr().expect("bound"), Instant::now() + Duration::from_secs(5))?;

    let mut fresh = Vec::new();
    let mut named = Vec::new();
    let mut buf = Some(Buffer::zeroed(BODY_SIZE));
    for _ in 0..REPS {
        let t = Instant::now();
        let r = peer.call(b"get", None, opts().body_size_max(BODY_SIZE as u64))?;
        fresh.push(gbps(BODY_SIZE, t.elapsed()));
        assert_eq!(r.body.as_ref().map(|b| b.len()), Some(BODY_SIZE));

        let t = Instant::now();
        let r = peer.call(b"get", None, opts().response_buffer(buf.take().expect("buffer returned")))?;
        named.push(gbps(BODY_SIZE, t.elapsed()));
        buf = r.body;
    }
    assert_eq!(buf.as_ref().map(|b| b.as_bytes()[12345]), Some(12345u32 as u8));

    let mut tiny = Vec::new();
    for _ in 0..REPS {
        let t = Instant::now();
        for _ in 0..TINY_CALLS_PER_REP {
            peer.call(b"ping", None, opts())?;
        }
        tiny.push(t.elapsed().as_secs_f64() * 1e6 / TINY_CALLS_PER_REP as f64);
    }

    // Plain sockets: a 1-byte request, then 64 MiB in one large write, read into a reused buffer.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sender_payload = payload.clone();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut req = [0u8; 1];
        // Bounded by the client's request count: it closes the socket when done.
        while s.read(&mut req)? == 1 {
            if req[0] == b'g' {
                s.write_all(sender_payload.as_bytes())?;
            } else {
                s.write_all(&req)?;
            }
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(TIMEOUT_MS)))?;
    let mut plain = Vec::new();
    let mut dst = Buffer::zeroed(BODY_SIZE);
    for _ in 0..REPS {
        let t = Instant::now();
        s.write_all(b"g")?;
        s.read_exact(dst.as_bytes_mut())?;
        plain.push(gbps(BODY_SIZE, t.elapsed()));
    }
    let mut plain_tiny = Vec::new();
    let mut one = [0u8; 1];
    for _ in 0..REPS {
        let t = Instant::now();
        for _ in 0..TINY_CALLS_PER_REP {
            s.write_all(b"p")?;
            s.read_exact(&mut one)?;
        }
        plain_tiny.push(t.elapsed().as_secs_f64() * 1e6 / TINY_CALLS_PER_REP as f64);
    }
    drop(s);
    sender.join().expect("sender thread").map_err(rill_graph::Error::from)?;

    line("loopback_echo_64MiB", fresh, "GB/s");
    line("loopback_echo_64MiB_named_buffer", named, "GB/s");
    line("loopback_plain_socket_64MiB", plain, "GB/s");
    line("loopback_tiny_call_rtt", tiny, "us");
    line("loopback_plain_socket_tiny_rtt", plain_tiny, "us");
    Ok(())
}
