//! The master and worker services' messages (postcard-encoded control plane) and how tensors
//! travel with them: small ones inline in the message, large ones as raw bytes in the frame body.

use crate::data_path::Dest;
use crate::wire::BodySource;
use rill_graph::{
    Buffer, DType, DeviceAttributes, Error, GraphDef, NodeId, Output, Result, SessionOptions, Shape, StepId,
    StepStats, Tensor,
};
use serde::{Deserialize, Serialize};

/// Tensors of at most this many bytes travel inside the control message; larger ones in the body.
pub const INLINE_TENSOR_SIZE_MAX: usize = 64 * 1024;

/// Where one tensor of a message is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum TensorRef {
    Inline(Tensor),
    Body {
        dtype: DType,
        shape: Shape,
        offset: u64,
        len: u64,
    },
    /// Written by the sender into the destination the request named (`RecvTensor::dest`).
    Landed {
        dtype: DType,
        shape: Shape,
        len: u64,
    },
}

/// Requests of the master service (`CreateSession`...) and the worker service (`RegisterGraph`...).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Req {
    CreateSession {
        graph: GraphDef,
        options: SessionOptions,
    },
    ExtendSession {
        session: u64,
        graph: GraphDef,
    },
    RunStep {
        session: u64,
        feeds: Vec<Output>,
        fetches: Vec<Output>,
        targets: Vec<NodeId>,
        timeout_ms: u64,
        trace: bool,
        feed_values: Vec<TensorRef>,
    },
    CloseSession {
        session: u64,
    },
    ListDevices,
    Reset {
        containers: Vec<String>,
    },
    GetStatus,
    RegisterGraph {
        session: u64,
        partitions: Vec<(String, GraphDef)>,
    },
    RunGraph {
        /// Earlier steps that succeeded and whose state this task may drop (see `CleanupStep`).
        cleanup: Vec<StepId>,
        graph: u64,
        step: StepId,
        args: Vec<(u32, TensorRef)>,
        num_retvals: u32,
        timeout_ms: u64,
        trace: bool,
    },
    RecvTensor {
        step: StepId,
        key: String,
        /// Where the receiver wants a large tensor's bytes written (see `data_path`); without
        /// one, or when the sender cannot use it, they come in the answer's body.
        dest: Option<Dest>,
    },
    CleanupStep {
        step: StepId,
        error: Option<Error>,
    },
    CleanupGraph {
        graph: u64,
    },
    /// Clears the named containers (all when empty) of this task's devices only.
    ResetLocal {
        containers: Vec<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Resp {
    Ok,
    Session { session: u64 },
    Devices(Vec<DeviceAttributes>),
    Step { fetches: Vec<TensorRef>, stats: Option<StepStats> },
    Graph { graph: u64 },
    Retvals { values: Vec<(u32, TensorRef)>, stats: Option<StepStats> },
    Tensor(TensorRef),
}

/// Tensors of one message, ready to send: references for the meta, and the body.
pub struct Packed {
    pub refs: Vec<TensorRef>,
    pub body: Option<BodySource>,
}

fn align64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

/// Packs tensors: small or string ones inline; one large tensor is sent from its own buffer
/// without a copy; several are laid out 64-byte aligned in one body buffer.
pub fn pack(tensors: &[Tensor]) -> Result<Packed> {
    let big: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].dtype().size().is_some() && tensors[i].byte_size() > INLINE_TENSOR_SIZE_MAX)
        .collect();
    let mut refs = Vec::with_capacity(tensors.len());
    let mut offsets = vec![0usize; tensors.len()];
    let mut total = 0usize;
    for &i in &big {
        offsets[i] = total;
        total = align64(total + tensors[i].byte_size());
    }
    for (i, t) in tensors.iter().enumerate() {
        if big.contains(&i) {
            refs.push(TensorRef::Body {
                dtype: t.dtype(),
                shape: *t.shape(),
                offset: offsets[i] as u64,
                len: t.byte_size() as u64,
            });
        } else {
            if !t.is_host() {
                return Err(Error::internal("a device tensor must be copied to the host before it is sent"));
            }
            refs.push(TensorRef::Inline(t.clone()));
        }
    }
    let body = match big.len() {
        0 => None,
        1 => Some(BodySource::from_tensor(tensors[big[0]].clone())?),
        _ => {
            let last = *big.last().unwrap_or(&0);
            let mut buf = Buffer::zeroed(offsets[last] + tensors[last].byte_size());
            for &i in &big {
                let b = tensors[i].as_bytes()?;
                buf.as_bytes_mut()[offsets[i]..offsets[i] + b.len()].copy_from_slice(b);
            }
            Some(BodySource::Buffer(std::sync::Arc::new(buf)))
        }
    };
    Ok(Packed { refs, body })
}

/// Bytes of a `dtype` tensor of `shape`; `None` for strings and sizes that overflow.
pub fn flat_byte_size(dtype: DType, shape: &Shape) -> Option<usize> {
    dtype.size().and_then(|s| shape.checked_num_elements().ok().and_then(|n| n.checked_mul(s)))
}

/// Rebuilds tensors, checking every offset and length against the body and the declared shape.
/// A body holding exactly one tensor becomes that tensor's buffer without a copy.
pub fn unpack(refs: Vec<TensorRef>, body: Option<Buffer>) -> Result<Vec<Tensor>> {
    let body_len = body.as_ref().map(|b| b.len()).unwrap_or(0) as u64;
    let body_parts = refs.iter().filter(|r| matches!(r, TensorRef::Body { .. })).count();
    let mut body = body;
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        match r {
            TensorRef::Inline(t) => out.push(t),
            TensorRef::Landed { .. } => {
                return Err(Error::invalid_argument(
                    "a landed tensor outside an answer that named a destination",
                ))
            }
            TensorRef::Body { dtype, shape, offset, len } => {
                let want = flat_byte_size(dtype, &shape)
                    .ok_or_else(|| Error::invalid_argument(format!("bad body tensor {dtype} {shape}")))?;
                let end = offset.checked_add(len).filter(|&e| e <= body_len);
                if want as u64 != len || end.is_none() {
                    return Err(Error::invalid_argument(format!(
                        "body tensor {dtype} {shape} at {offset}+{len} does not fit a {body_len}-byte body"
                    )));
                }
                if body_parts == 1 && offset == 0 && len == body_len {
                    if let Some(b) = body.take() {
                        out.push(Tensor::from_buffer(dtype, shape, b)?);
                        continue;
                    }
                }
                let b = body.as_ref().ok_or_else(|| Error::invalid_argument("body tensor without a body"))?;
                out.push(Tensor::from_bytes(
                    dtype,
                    shape,
                    &b.as_bytes()[offset as usize..(offset + len) as usize],
                )?);
            }
        }
    }
    Ok(out)
}

/// Whether `meta` encodes a request a server may answer on its event-loop thread: `RecvTensor`
/// (it only registers a callback with the step's rendezvous), `RunGraph` and `RunStep` (started
/// there when they need no dialling or planning). Reads just the enum tag (postcard writes the variant index first, as
/// one byte below 128), so other requests are not decoded twice.
pub fn answered_inline(meta: &[u8]) -> bool {
    static TAGS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let probes = [
            Req::RecvTensor { step: StepId(0), key: String::new(), dest: None },
            Req::RunGraph {
                cleanup: Vec::new(),
                graph: 0,
                step: StepId(0),
                args: Vec::new(),
                num_retvals: 0,
                timeout_ms: 0,
                trace: false,
            },
            Req::RunStep {
                session: 0,
                feeds: Vec::new(),
                fetches: Vec::new(),
                targets: Vec::new(),
                timeout_ms: 0,
                trace: false,
                feed_values: Vec::new(),
            },
        ];
        probes.iter().filter_map(|p| encode(p).ok().and_then(|b| b.first().copied())).collect()
    });
    meta.first().is_some_and(|t| tags.contains(t))
}

pub fn encode<T: Serialize>(m: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(m).map_err(|e| Error::internal(format!("encoding a message: {e}")))
}

/// Decodes a peer's message; malformed input is `InvalidArgument`, never a panic.
pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| Error::invalid_argument(format!("malformed message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trips() {
        let big1 = Tensor::new([20000usize], &vec![1.5f32; 20000]).unwrap();
        let big2 = Tensor::new([30000usize], &vec![7i32; 30000]).unwrap();
        let small = Tensor::scalar(3f64);
        let s = Tensor::scalar_string("hello");
        for set in [
            vec![small.clone()],
            vec![big1.clone()],
            vec![small.clone(), big1.clone(), s.clone(), big2.clone()],
        ] {
            let p = pack(&set).unwrap();
            let body = p.body.map(|b| Buffer::from_bytes(b.as_bytes()));
            let back = unpack(p.refs, body).unwrap();
            assert_eq!(back, set);
        }
    }

    #[test]
    fn only_recv_tensor_and_steps_may_be_answered_inline() {
        let recv = Req::RecvTensor { step: StepId(7), key: "k".into(), dest: None };
        assert!(answered_inline(&encode(&recv).unwrap()));
        let run = Req::RunGraph {
            cleanup: vec![StepId(3)],
            graph: 9,
            step: StepId(7),
            args: Vec::new(),
            num_retvals: 1,
            timeout_ms: 5,
            trace: true,
        };
        assert!(answered_inline(&encode(&run).unwrap()));
        for other in [Req::GetStatus, Req::CleanupStep { step: StepId(7), error: None }, Req::ListDevices] {
            assert!(!answered_inline(&encode(&other).unwrap()), "{other:?}");
        }
        assert!(!answered_inline(&[]));
    }

    #[test]
    fn unpack_refuses_bad_offsets() {
        let cases = [
            TensorRef::Body { dtype: DType::F32, shape: Shape::vector(4), offset: 0, len: 16 },
            TensorRef::Body { dtype: DType::F32, shape: Shape::vector(2), offset: 8, len: 16 },
            TensorRef::Body { dtype: DType::F32, shape: Shape::vector(2), offset: u64::MAX, len: 8 },
            TensorRef::Body { dtype: DType::String, shape: Shape::vector(1), offset: 0, len: 8 },
        ];
        for c in cases {
            let r = unpack(vec![c.clone()], Some(Buffer::zeroed(8)));
            assert_eq!(r.unwrap_err().code, rill_graph::Code::InvalidArgument, "{c:?}");
        }
    }
}
