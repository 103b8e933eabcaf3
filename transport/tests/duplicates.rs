//! Duplicate requests against a live server, at the wire level: a client that speaks raw frames
//! sends the same request frame twice; the second is refused with `Aborted` and its side effect
//! (an `AssignAdd` on a variable) happens once.

use rill_graph::{Code, Graph, SessionOptions, Tensor};
use rill_transport::handshake::{random_nonce, Handshake, Identity, CLIENT_CLUSTER_ID};
use rill_transport::proto::{decode, encode, unpack, Req, Resp};
use rill_transport::wire::{
    from_meta, BodyDest, Decoded, Frame, FrameDecoder, FrameKind, OutFrame, WireError,
};
use rill_transport::{ClusterSpec, Server, ServerDef};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A client that writes frames itself and decodes what comes back.
struct RawClient {
    s: TcpStream,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl RawClient {
    fn connect(addr: &str) -> RawClient {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut c = RawClient { s, dec: FrameDecoder::new(Default::default()), buf: Vec::new() };
        let id = Identity {
            cluster_id: CLIENT_CLUSTER_ID,
            job: "client".into(),
            task: 0,
            incarnation: rill_graph::random_u64(),
            host: None,
        };
        let (mut hs, (kind, meta)) = Handshake::client(id, None, random_nonce().unwrap()).unwrap();
        c.write(OutFrame::new(kind, 0, &meta, None, &Default::default()).unwrap().to_vec());
        let ack = c.next_frame();
        let step = hs.on_frame(ack.header.kind, &ack.meta).unwrap();
        assert!(step.done.is_some() && step.send.is_none(), "an open server finishes in one round trip");
        c
    }

    fn write(&mut self, bytes: Vec<u8>) {
        self.s.write_all(&bytes).unwrap();
    }

    fn request_bytes(call_id: u64, req: &Req) -> Vec<u8> {
        OutFrame::new(FrameKind::Request, call_id, &encode(req).unwrap(), None, &Default::default())
            .unwrap()
            .to_vec()
    }

    /// The next frame from the server, within `TIMEOUT`.
    fn next_frame(&mut self) -> Frame {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut off = 0;
            while off < self.buf.len() {
                let (used, d) = self.dec.feed(&self.buf[off..]).unwrap();
                off += used;
                match d {
                    Decoded::NeedMore => {}
                    Decoded::BodyWanted => self.dec.set_body_dest(BodyDest::Grow).unwrap(),
                    Decoded::Frame(f) => {
                        self.buf.drain(..off);
                        return f;
                    }
                }
            }
            self.buf.clear();
            assert!(Instant::now() < deadline, "no frame from the server in time");
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("the server closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading: {e}"),
            }
        }
    }

    /// Sends one request and returns its answer.
    fn call(&mut self, call_id: u64, req: &Req) -> (Resp, Option<rill_graph::Buffer>) {
        self.write(Self::request_bytes(call_id, req));
        let f = self.next_frame();
        assert_eq!(f.header.call_id, call_id);
        assert_eq!(f.header.kind, FrameKind::Response, "{:?}", from_meta::<WireError>(&f.meta, "Error"));
        (decode(&f.meta).unwrap(), f.body)
    }
}

fn run_step(session: u64, fetches: Vec<rill_graph::Output>, targets: Vec<rill_graph::NodeId>) -> Req {
    Req::RunStep {
        session,
        feeds: vec![],
        fetches,
        targets,
        timeout_ms: 10_000,
        trace: false,
        feed_values: vec![],
    }
}

#[test]
fn a_request_sent_twice_runs_once_and_the_copy_is_refused() {
    let port = rill_transport::cluster::free_loopback_port().unwrap();
    let cluster = ClusterSpec::parse(&format!("worker=127.0.0.1:{port}")).unwrap();
    let server =
        Server::start(ServerDef::new(cluster, "worker", 0).unwrap(), rill_device_cpu::cpu_runtime()).unwrap();
    let g = Graph::new();
    let w = g.variable("w", g.constant(Tensor::scalar(1f32)));
    let bump = g.assign_add(w, g.scalar(10f32));
    let init = g.global_variables_initializer();

    let mut c = RawClient::connect(server.local_addr().unwrap().to_string().as_str());
    let session = match c
        .call(1, &Req::CreateSession { graph: g.to_graph_def(), options: SessionOptions::default() })
        .0
    {
        Resp::Session { session } => session,
        other => panic!("CreateSession answered {other:?}"),
    };
    c.call(2, &run_step(session, vec![], vec![init.node]));

    // The same frame twice: one answer is the step's, the other refuses the copy.
    let frame = RawClient::request_bytes(3, &run_step(session, vec![], vec![bump.node]));
    c.write(frame.clone());
    c.write(frame);
    let answers = [c.next_frame(), c.next_frame()];
    let mut kinds: Vec<FrameKind> = answers.iter().map(|f| f.header.kind).collect();
    kinds.sort_by_key(|k| *k as u8);
    assert_eq!(kinds, [FrameKind::Response, FrameKind::Error]);
    let refusal = answers.iter().find(|f| f.header.kind == FrameKind::Error).unwrap();
    assert_eq!(refusal.header.call_id, 3);
    let e: rill_graph::Error = from_meta::<WireError>(&refusal.meta, "Error").unwrap().into();
    assert_eq!(e.code, Code::Aborted, "{e}");
    assert!(e.msg.contains("duplicate request") && e.msg.contains("request 3"), "{e}");

    // A reused id is refused even after other requests; the variable moved once.
    let (resp, body) = c.call(4, &run_step(session, vec![w], vec![]));
    let Resp::Step { fetches, .. } = resp else { panic!("RunStep answered {resp:?}") };
    assert_eq!(unpack(fetches, body).unwrap()[0].scalar_value::<f32>().unwrap(), 11.0);
    c.write(RawClient::request_bytes(2, &run_step(session, vec![], vec![bump.node])));
    let f = c.next_frame();
    assert_eq!((f.header.kind, f.header.call_id), (FrameKind::Error, 2));
    let (resp, body) = c.call(5, &run_step(session, vec![w], vec![]));
    let Resp::Step { fetches, .. } = resp else { panic!("RunStep answered {resp:?}") };
    assert_eq!(unpack(fetches, body).unwrap()[0].scalar_value::<f32>().unwrap(), 11.0);
}
