//! Casts between f32 and f16/bf16 on tensors large enough to be split over the intra-op pool
//! match the `half` crate's element-wise rounding (nearest even), special values included.

use rill_graph::half::{bf16, f16};
use rill_graph::*;

fn run(x: Tensor, to: DType) -> Tensor {
    let g = Graph::new();
    let y = g.cast(g.constant(x), to);
    let opts = SessionOptions { intra_op_parallelism_threads: 2, ..Default::default() };
    let s = DirectSession::new(&g, &rill_device_cpu::cpu_runtime(), opts).unwrap();
    s.run(&[], &[y], &[], &RunOptions::default()).unwrap().remove(0)
}

fn inputs() -> Vec<f32> {
    let specials =
        [0.0, -0.0, 1.0, 2049.0, 65520.0, 1e-8, 6e-8, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e30];
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut v: Vec<f32> = specials.to_vec();
    v.extend((0..300_000).map(|_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        f32::from_bits((s >> 32) as u32)
    }));
    v
}

fn same_bits(a: &[u16], b: &[u16], nan: impl Fn(u16) -> bool) {
    assert_eq!(a.len(), b.len());
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(x == y || (nan(x) && nan(y)), "element {i}: {x:#06x} vs {y:#06x}");
    }
}

#[test]
fn f32_to_half_and_back_rounds_like_the_half_crate() {
    let v = inputs();
    let x = Tensor::new([v.len()], &v).unwrap();
    let h = run(x.clone(), DType::F16);
    let want: Vec<u16> = v.iter().map(|&f| f16::from_f32(f).to_bits()).collect();
    let got: Vec<u16> = h.as_slice::<f16>().unwrap().iter().map(|f| f.to_bits()).collect();
    same_bits(&got, &want, |b| f16::from_bits(b).is_nan());
    let b = run(x, DType::BF16);
    let want: Vec<u16> = v.iter().map(|&f| bf16::from_f32(f).to_bits()).collect();
    let got: Vec<u16> = b.as_slice::<bf16>().unwrap().iter().map(|f| f.to_bits()).collect();
    same_bits(&got, &want, |b| bf16::from_bits(b).is_nan());
    // Back to f32: exact.
    for t in [h, b] {
        let back = run(t.clone(), DType::F32);
        let want: Vec<f32> = match t.dtype() {
            DType::F16 => t.as_slice::<f16>().unwrap().iter().map(|f| f.to_f32()).collect(),
            _ => t.as_slice::<bf16>().unwrap().iter().map(|f| f.to_f32()).collect(),
        };
        for (x, y) in back.as_slice::<f32>().unwrap().iter().zip(&want) {
            assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
        }
    }
}
