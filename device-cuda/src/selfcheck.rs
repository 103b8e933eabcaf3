//! Every GPU kernel against a CPU reference on random inputs, for `examples/gpu_check.rs` and the
//! tests on machines with a GPU. Half types are compared with a tolerance for their precision.

use crate::kernels::{self, BinaryOp, MatMulImpl, ReduceOp, UnaryOp, GPU_FLOATS};
use crate::CudaDevice;
use rill_graph::half::{bf16, f16};
use rill_graph::{DType, Device, Error, Result, Shape, Tensor};

/// One kernel check: its name and the largest error seen, or why it could not run.
#[derive(Debug)]
pub struct Check {
    pub name: String,
    pub result: Result<f64>,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        matches!(self.result, Ok(e) if e <= self.tolerance)
    }
}

/// A small deterministic generator (xorshift64*), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32) / (1u64 << 24) as f32
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.next()).collect()
    }
}

fn tensor(d: DType, dims: &[usize], v: &[f32]) -> Result<Tensor> {
    let s = Shape::new(dims)?;
    match d {
        DType::F32 => Tensor::new(s, v),
        DType::F16 => Tensor::new(s, &v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
        DType::BF16 => Tensor::new(s, &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        _ => Err(Error::internal(format!("no check data for {d}"))),
    }
}

/// A host tensor's values as f32, whatever its float type.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>(),
        DType::F16 => Ok(t.as_slice::<f16>()?.iter().map(|x| x.to_f32()).collect()),
        DType::BF16 => Ok(t.as_slice::<bf16>()?.iter().map(|x| x.to_f32()).collect()),
        d => Err(Error::internal(format!("cannot read {d} values"))),
    }
}

/// Inputs rounded to `d`, as the GPU sees them, so the reference starts from the same numbers.
fn rounded(d: DType, v: &[f32]) -> Result<Vec<f32>> {
    values(&tensor(d, &[v.len()], v)?)
}

fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 4e-2,
    }
}

/// Largest error relative to `max(1, |expected|)`, comparing the GPU result with `want`.
fn compare(dev: &CudaDevice, got: &Tensor, want: &[f32], dims: &[usize]) -> Result<f64> {
    let host = dev.to_host(got)?;
    if host.shape().dims() != dims {
        return Err(Error::internal(format!("shape {} != expected {dims:?}", host.shape())));
    }
    let g = values(&host)?;
    let mut worst = 0f64;
    for (a, b) in g.iter().zip(want) {
        let e = if a.is_nan() && b.is_nan() { 0.0 } else { ((a - b).abs() / b.abs().max(1.0)) as f64 };
        worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    Ok(worst)
}

fn unary_ref(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Square => x * x,
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sign => (x > 0.0) as i32 as f32 - (x < 0.0) as i32 as f32,
        UnaryOp::Zeros => 0.0,
        UnaryOp::Ones => 1.0,
    }
}

fn binary_ref(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Maximum => a.max(b),
        BinaryOp::Minimum => a.min(b),
        BinaryOp::SquaredDifference => (a - b) * (a - b),
        BinaryOp::Pow => a.powf(b),
        BinaryOp::ReluGrad => {
            if b > 0.0 {
                a
            } else {
                0.0
            }
        }
        BinaryOp::SigmoidGrad => b * a * (1.0 - a),
        BinaryOp::TanhGrad => b * (1.0 - a * a),
        BinaryOp::SqrtGrad => b * 0.5 / a,
    }
}

fn matmul_ref(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f32;
            for p in 0..k {
                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                s += x * y;
            }
            c[i * n + j] = s;
        }
    }
    c
}

fn softmax_row(x: &[f32]) -> (f32, f32) {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    (m, x.iter().map(|v| (v - m).exp()).sum())
}

/// Runs every check on `dev` and returns them in order.
pub fn run_all(dev: &CudaDevice) -> Vec<Check> {
    let mut out = Vec::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut push =
        |name: String, d: DType, r: Result<f64>| out.push(Check { name, result: r, tolerance: tolerance(d) });
    let push = &mut push;
    for &d in GPU_FLOATS {
        for op in UnaryOp::ALL {
            let positive = matches!(op, UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Log | UnaryOp::Reciprocal);
            let v = if positive { rng.vec(1000, 0.1, 3.0) } else { rng.vec(1000, -3.0, 3.0) };
            let r = (|| {
                let x = rounded(d, &v)?;
                let want: Vec<f32> = x.iter().map(|&x| unary_ref(op, x)).collect();
                compare(dev, &kernels::unary(dev, op, &tensor(d, &[10, 100], &v)?)?, &want, &[10, 100])
            })();
            push(format!("unary {op:?} {d}"), d, r);
        }
        for op in BinaryOp::ALL {
            let grad = matches!(
                op,
                BinaryOp::ReluGrad | BinaryOp::SigmoidGrad | BinaryOp::TanhGrad | BinaryOp::SqrtGrad
            );
            let (da, db, dy): (&[usize], &[usize], &[usize]) =
                if grad { (&[6, 7], &[6, 7], &[6, 7]) } else { (&[4, 1, 5], &[3, 1], &[4, 3, 5]) };
            let positive = matches!(op, BinaryOp::Pow | BinaryOp::Div | BinaryOp::SqrtGrad);
            let (lo, hi) = if positive { (0.5, 2.0) } else { (-2.0, 2.0) };
            let va = rng.vec(da.iter().product(), lo, hi);
            let vb = rng.vec(db.iter().product(), lo, hi);
            let r = (|| {
                let (a, b) = (rounded(d, &va)?, rounded(d, &vb)?);
                let (ta, tb) = (tensor(d, da, &va)?, tensor(d, db, &vb)?);
                let (_, bc) = kernels::broadcast(ta.shape(), tb.shape())?;
                let n: usize = dy.iter().product();
                let want: Vec<f32> = (0..n)
                    .map(|i| {
                        let (mut rem, mut ia, mut ib) = (i as u64, 0u64, 0u64);
                        for k in (0..bc[0] as usize).rev() {
                            let c = rem % bc[1 + k];
                            rem /= bc[1 + k];
                            ia += c * bc[9 + k];
                            ib += c * bc[17 + k];
                        }
                        binary_ref(op, a[ia as usize], b[ib as usize])
                    })
                    .collect();
                compare(dev, &kernels::binary(dev, op, &ta, &tb)?, &want, dy)
            })();
            push(format!("binary {op:?} {d}"), d, r);
        }
        let (vx, vb) = (rng.vec(35, -1.0, 1.0), rng.vec(5, -1.0, 1.0));
        let r = (|| {
            let (x, b) = (rounded(d, &vx)?, rounded(d, &vb)?);
            let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + b[i % 5]).collect();
            compare(
                dev,
                &kernels::bias_add(dev, &tensor(d, &[7, 5], &vx)?, &tensor(d, &[5], &vb)?)?,
                &want,
                &[7, 5],
            )
        })();
        push(format!("BiasAdd {d}"), d, r);
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min, ReduceOp::Prod] {
            let (lo, hi) = if op == ReduceOp::Prod { (0.9, 1.1) } else { (-1.0, 1.0) };
            let v = rng.vec(3 * 50 * 4, lo, hi);
            let r = (|| {
                let x = rounded(d, &v)?;
                let mut want = vec![0f32; 12];
                for o in 0..3 {
                    for j in 0..4 {
                        let col = (0..50).map(|k| x[(o * 50 + k) * 4 + j]);
                        want[o * 4 + j] = match op {
                            ReduceOp::Sum => col.sum(),
                            ReduceOp::Mean => col.sum::<f32>() / 50.0,
                            ReduceOp::Max => col.fold(f32::NEG_INFINITY, f32::max),
                            ReduceOp::Min => col.fold(f32::INFINITY, f32::min),
                            ReduceOp::Prod => col.product(),
                        };
                    }
                }
                compare(
                    dev,
                    &kernels::reduce(dev, op, &tensor(d, &[3, 50, 4], &v)?, &[1], true)?,
                    &want,
                    &[3, 1, 4],
                )
            })();
            push(format!("reduce {op:?} axis 1 {d}"), d, r);
        }
        for log in [false, true] {
            let v = rng.vec(6 * 37, -4.0, 4.0);
            let r = (|| {
                let x = rounded(d, &v)?;
                let mut want = Vec::new();
                for row in x.chunks(37) {
                    let (m, s) = softmax_row(row);
                    want.extend(row.iter().map(|z| if log { z - m - s.ln() } else { (z - m).exp() / s }));
                }
                compare(dev, &kernels::softmax(dev, &tensor(d, &[6, 37], &v)?, log)?, &want, &[6, 37])
            })();
            push(format!("{} {d}", if log { "LogSoftmax" } else { "Softmax" }), d, r);
        }
        for sparse in [None, Some(DType::I32), Some(DType::I64)] {
            let v = rng.vec(5 * 11, -3.0, 3.0);
            let idx: Vec<usize> = (0..5).map(|i| (i * 7 + 3) % 11).collect();
            let r = (|| {
                let x = rounded(d, &v)?;
                let mut dense = vec![0f32; 55];
                for (row, &c) in idx.iter().enumerate() {
                    dense[row * 11 + c] = 1.0;
                }
                let labels = match sparse {
                    None => tensor(d, &[5, 11], &dense)?,
                    Some(DType::I32) => Tensor::vector(&idx.iter().map(|&i| i as i32).collect::<Vec<_>>()),
                    Some(_) => Tensor::vector(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>()),
                };
                let (mut loss, mut back) = (Vec::new(), Vec::new());
                for (row, z) in x.chunks(11).enumerate() {
                    let (m, s) = softmax_row(z);
                    loss.push(s.ln() + m - z[idx[row]]);
                    back.extend(z.iter().enumerate().map(|(c, v)| (v - m).exp() / s - dense[row * 11 + c]));
                }
                let (gl, gb) = kernels::cross_entropy(dev, &tensor(d, &[5, 11], &v)?, &labels)?;
                Ok(compare(dev, &gl, &loss, &[5])?.max(compare(dev, &gb, &back, &[5, 11])?))
            })();
            let what = sparse.map_or("SoftmaxCrossEntropyWithLogits".to_string(), |l| {
                format!("SparseSoftmaxCrossEntropyWithLogits labels {l}")
            });
            push(format!("{what} {d}"), d, r);
        }
        matmul_checks(dev, d, &mut rng, push);
        for &to in GPU_FLOATS {
            let v = rng.vec(300, -100.0, 100.0);
            let r = (|| {
                let want = rounded(to, &rounded(d, &v)?)?;
                compare(dev, &kernels::cast(dev, &tensor(d, &[300], &v)?, to)?, &want, &[300])
            })();
            push(format!("Cast {d} to {to}"), d.max(to), r);
        }
        // Tile through every case of a dimension: repeated with an extra axis (2 x 3), broadcast
        // from size 1 (x 4), and repeated (3 x 2); then Fill's scalar broadcast.
        let v = rng.vec(6, -1.0, 1.0);
        let r = (|| {
            let x = rounded(d, &v)?;
            let want: Vec<f32> = (0..6 * 4 * 6).map(|i| x[(i / 24 % 2) * 3 + i % 6 % 3]).collect();
            compare(dev, &kernels::tile(dev, &tensor(d, &[2, 1, 3], &v)?, &[3, 4, 2])?, &want, &[6, 4, 6])
        })();
        push(format!("Tile {d}"), d, r);
        let r = (|| {
            let want = vec![rounded(d, &v[..1])?[0]; 35];
            let y = kernels::broadcast_to(dev, &tensor(d, &[], &v[..1])?, Shape::new(&[5, 7])?)?;
            compare(dev, &y, &want, &[5, 7])
        })();
        push(format!("Fill {d}"), d, r);
    }
    apply_checks(dev, &mut rng, &mut out);
    out
}

/// `(m, n, k)` of the MatMul checks: odd sizes that cross tile edges, a vector, single elements,
/// an empty sum (k = 0), and one large enough for cuBLAS to pick a tensor-core algorithm.
const MATMUL_SHAPES: [(usize, usize, usize); 5] =
    [(33, 29, 47), (1, 1, 1), (1, 130, 257), (5, 3, 0), (257, 129, 300)];

/// Every MatMul implementation the device has (the tiled kernel, and cuBLAS where loaded), every
/// transpose combination, against the CPU reference.
fn matmul_checks(
    dev: &CudaDevice,
    d: DType,
    rng: &mut Rng,
    push: &mut impl FnMut(String, DType, Result<f64>),
) {
    let imps: &[(MatMulImpl, &str)] = if dev.cublas().is_some() {
        &[(MatMulImpl::Tiled, "tiled"), (MatMulImpl::Cublas, "cuBLAS")]
    } else {
        &[(MatMulImpl::Tiled, "tiled")]
    };
    for &(m, n, k) in &MATMUL_SHAPES {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (va, vb) = (rng.vec(m * k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0));
            for &(imp, what) in imps {
                let r = (|| {
                    let (a, b) = (rounded(d, &va)?, rounded(d, &vb)?);
                    let want = matmul_ref(&a, &b, m, n, k, ta, tb);
                    let sa: &[usize] = if ta { &[k, m] } else { &[m, k] };
                    let sb: &[usize] = if tb { &[n, k] } else { &[k, n] };
                    let c =
                        kernels::matmul_using(dev, imp, &tensor(d, sa, &va)?, &tensor(d, sb, &vb)?, ta, tb)?;
                    compare(dev, &c, &want, &[m, n])
                })();
                push(format!("MatMul {what} {m}x{n}x{k} transpose_a={ta} transpose_b={tb} {d}"), d, r);
            }
        }
    }
}

fn apply_checks(dev: &CudaDevice, rng: &mut Rng, out: &mut Vec<Check>) {
    let d = DType::F32;
    let n = 1000;
    let (var, acc, v2, g) =
        (rng.vec(n, -1.0, 1.0), rng.vec(n, 0.0, 1.0), rng.vec(n, 0.0, 1.0), rng.vec(n, -1.0, 1.0));
    let s = |x: f32| Tensor::scalar(x);
    let r = (|| {
        let mut t = tensor(d, &[n], &var)?;
        kernels::apply(dev, "apply_gd", &mut [&mut t], &[s(0.1), tensor(d, &[n], &g)?], None)?;
        let want: Vec<f32> = var.iter().zip(&g).map(|(v, g)| v - 0.1 * g).collect();
        compare(dev, &t, &want, &[n])
    })();
    out.push(Check { name: "ApplyGradientDescent f32".into(), result: r, tolerance: 1e-5 });
    for nesterov in [false, true] {
        let r = (|| {
            let (mut tv, mut ta) = (tensor(d, &[n], &var)?, tensor(d, &[n], &acc)?);
            let args = [s(0.1), tensor(d, &[n], &g)?, s(0.9)];
            kernels::apply(dev, "apply_momentum", &mut [&mut tv, &mut ta], &args, Some(nesterov))?;
            let mut wv = Vec::new();
            let mut wa = Vec::new();
            for i in 0..n {
                let a = acc[i] * 0.9 + g[i];
                wa.push(a);
                wv.push(var[i] - if nesterov { g[i] * 0.1 + a * 0.9 * 0.1 } else { a * 0.1 });
            }
            Ok(compare(dev, &tv, &wv, &[n])?.max(compare(dev, &ta, &wa, &[n])?))
        })();
        out.push(Check {
            name: format!("ApplyMomentum nesterov={nesterov} f32"),
            result: r,
            tolerance: 1e-5,
        });
    }
    let r = (|| {
        let (mut tv, mut tm, mut tw) =
            (tensor(d, &[n], &var)?, tensor(d, &[n], &acc)?, tensor(d, &[n], &v2)?);
        let (b1p, b2p, lr, b1, b2, eps) = (0.9f32, 0.999f32, 0.01f32, 0.9f32, 0.999f32, 1e-7f32);
        let args = [s(b1p), s(b2p), s(lr), s(b1), s(b2), s(eps), tensor(d, &[n], &g)?];
        kernels::apply(dev, "apply_adam", &mut [&mut tv, &mut tm, &mut tw], &args, Some(false))?;
        let lr_t = lr * (1.0 - b2p).sqrt() / (1.0 - b1p);
        let mut want = Vec::new();
        for i in 0..n {
            let m = acc[i] + (g[i] - acc[i]) * (1.0 - b1);
            let v = v2[i] + (g[i] * g[i] - v2[i]) * (1.0 - b2);
            want.push(var[i] - m * lr_t / (v.sqrt() + eps));
        }
        compare(dev, &tv, &want, &[n])
    })();
    out.push(Check { name: "ApplyAdam f32".into(), result: r, tolerance: 1e-4 });
}
