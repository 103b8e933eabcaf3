//! Checks every CPU kernel against a plain reference implementation, through a real
//! `DirectSession` on the CPU runtime: random shapes (odd sizes included), several dtypes, and a
//! table of error cases.

use rill_device_cpu::cpu_runtime;
use rill_graph::ops::core_op;
use rill_graph::*;

// ---- harness ----

/// xorshift64*: reproducible test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    fn values(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// A tensor of `dtype` holding `v` (rounded to the dtype).
fn make(dtype: DType, shape: &[usize], v: &[f64]) -> Tensor {
    let s = Shape::new(shape).unwrap();
    dispatch_numeric!(dtype, T => Tensor::new(s, &v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>()).unwrap(),
        _ => Tensor::from_bools(s, &v.iter().map(|&x| x != 0.0).collect::<Vec<_>>()).unwrap())
}

fn ints(v: &[i64]) -> Tensor {
    Tensor::vector(&v.iter().map(|&x| x as i32).collect::<Vec<_>>())
}

fn ints64(v: &[i64]) -> Tensor {
    Tensor::vector(v)
}

fn scalar_i32(v: i32) -> Tensor {
    Tensor::scalar(v)
}

/// Runs one node of `op` whose inputs are placeholders of unknown shape fed with `inputs`, and
/// returns all its outputs. Unknown shapes leave every check to the kernel.
fn eval(op: &str, inputs: &[Tensor], attrs: Attrs) -> Result<Vec<Tensor>> {
    let g = Graph::new();
    let phs: Vec<Output> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| g.placeholder(&format!("in{i}"), t.dtype(), PartialShape::unknown()))
        .collect();
    let node = g.custom(core_op(op), "node", &phs, attrs);
    g.status()?;
    let fetches: Vec<Output> =
        (0..g.num_outputs(node.node)).map(|i| Output::new(node.node, i as u32)).collect();
    let feeds: Vec<(Output, Tensor)> = phs.into_iter().zip(inputs.iter().cloned()).collect();
    let sess = DirectSession::new(&g, &cpu_runtime(), SessionOptions::default())?;
    sess.run(&feeds, &fetches, &[], &RunOptions::default())
}

fn eval1(op: &str, inputs: &[Tensor], attrs: Attrs) -> Tensor {
    match eval(op, inputs, attrs) {
        Ok(mut v) => v.remove(0),
        Err(e) => panic!("{op} on {inputs:?}: {e}"),
    }
}

/// Relative tolerance of results in `dtype` computed from exactly representable inputs.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 2e-5,
        DType::F16 => 4e-3,
        DType::BF16 => 2e-2,
        _ => 0.0,
    }
}

fn assert_close(what: &str, got: &Tensor, shape: &[usize], want: &[f64], tol: f64) {
    assert_eq!(got.shape().dims(), shape, "{what}: shape");
    let g = got.to_f64_vec().unwrap();
    assert_eq!(g.len(), want.len(), "{what}: element count");
    for (i, (&a, &b)) in g.iter().zip(want).enumerate() {
        let ok = a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * b.abs().max(1.0);
        assert!(ok, "{what}: element {i}: got {a}, want {b} (tolerance {tol})");
    }
}

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut st = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * dims[i + 1];
    }
    st
}

fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for k in (0..dims.len()).rev() {
        idx[k] = i % dims[k];
        i /= dims[k];
    }
    idx
}

fn ravel(idx: &[usize], dims: &[usize]) -> usize {
    idx.iter().zip(strides(dims)).map(|(i, s)| i * s).sum()
}

/// Reference broadcasting: the output shape and, per output element, the source indices.
fn broadcast_ref(a: &[usize], b: &[usize]) -> (Vec<usize>, Vec<(usize, usize)>) {
    let n = a.len().max(b.len());
    let pad = |s: &[usize]| -> Vec<usize> { [vec![1; n - s.len()], s.to_vec()].concat() };
    let (pa, pb) = (pad(a), pad(b));
    let out: Vec<usize> = pa.iter().zip(&pb).map(|(&x, &y)| x.max(y)).collect();
    let total: usize = out.iter().product();
    let pairs = (0..total)
        .map(|i| {
            let idx = unravel(i, &out);
            let ia: Vec<usize> = idx.iter().zip(&pa).map(|(&j, &d)| if d == 1 { 0 } else { j }).collect();
            let ib: Vec<usize> = idx.iter().zip(&pb).map(|(&j, &d)| if d == 1 { 0 } else { j }).collect();
            (ravel(&ia, &pa), ravel(&ib, &pb))
        })
        .collect();
    (out, pairs)
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

// ---- element-wise ----

const BROADCAST_SHAPES: &[(&[usize], &[usize])] = &[
    (&[7, 13], &[7, 13]),
    (&[5, 1, 9], &[4, 9]),
    (&[], &[3, 17]),
    (&[33], &[]),
    (&[2, 3, 1, 5], &[3, 4, 1]),
    (&[6, 1], &[1, 11]),
];

#[test]
fn binary_ops_broadcast_like_numpy() {
    type F = fn(f64, f64) -> f64;
    let float_cases: &[(&str, F, (f64, f64), (f64, f64))] = &[
        ("Add", |a, b| a + b, (-3.0, 3.0), (-3.0, 3.0)),
        ("AddV2", |a, b| a + b, (-3.0, 3.0), (-3.0, 3.0)),
        ("Sub", |a, b| a - b, (-3.0, 3.0), (-3.0, 3.0)),
        ("Mul", |a, b| a * b, (-3.0, 3.0), (-3.0, 3.0)),
        ("Div", |a, b| a / b, (-3.0, 3.0), (0.5, 3.0)),
        ("RealDiv", |a, b| a / b, (-3.0, 3.0), (-3.0, -0.5)),
        ("Pow", f64::powf, (0.5, 2.0), (-2.0, 2.0)),
        ("Maximum", f64::max, (-3.0, 3.0), (-3.0, 3.0)),
        ("Minimum", f64::min, (-3.0, 3.0), (-3.0, 3.0)),
        ("SquaredDifference", |a, b| (a - b) * (a - b), (-3.0, 3.0), (-3.0, 3.0)),
    ];
    let mut rng = Rng(7);
    for &(op, f, ra, rb) in float_cases {
        for &(sa, sb) in BROADCAST_SHAPES {
            for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
                let a = make(dtype, sa, &rng.values(numel(sa), ra.0, ra.1));
                let b = make(dtype, sb, &rng.values(numel(sb), rb.0, rb.1));
                let (av, bv) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
                let (so, pairs) = broadcast_ref(sa, sb);
                let want: Vec<f64> = pairs.iter().map(|&(i, j)| f(av[i], bv[j])).collect();
                let got = eval1(op, &[a, b], attrs! {});
                assert_close(&format!("{op} {dtype} {sa:?} {sb:?}"), &got, &so, &want, tol(dtype));
            }
        }
    }
}

#[test]
fn integer_binary_ops_follow_tensorflow() {
    type F = fn(i64, i64) -> i64;
    let cases: &[(&str, F, (i64, i64))] = &[
        ("Add", |a, b| a + b, (-50, 50)),
        ("Sub", |a, b| a - b, (-50, 50)),
        ("Mul", |a, b| a * b, (-50, 50)),
        // Div on integers truncates toward zero (C++ semantics), not floor.
        ("Div", |a, b| a / b, (1, 7)),
        ("Pow", |a, b| a.pow(b as u32), (0, 4)),
        ("Maximum", |a, b| a.max(b), (-50, 50)),
        ("Minimum", |a, b| a.min(b), (-50, 50)),
        ("SquaredDifference", |a, b| (a - b) * (a - b), (-50, 50)),
    ];
    let mut rng = Rng(11);
    for &(op, f, (lo, hi)) in cases {
        for &(sa, sb) in BROADCAST_SHAPES {
            for dtype in [DType::I32, DType::I64] {
                let av: Vec<i64> = (0..numel(sa)).map(|_| rng.int(-9, 9)).collect();
                // Divisors of both signs, never zero.
                let bv: Vec<i64> = (0..numel(sb))
                    .map(|_| {
                        if op == "Div" {
                            rng.int(lo, hi) * if rng.next() & 1 == 0 { 1 } else { -1 }
                        } else {
                            rng.int(lo, hi)
                        }
                    })
                    .collect();
                let to_f = |v: &[i64]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                let (a, b) = (make(dtype, sa, &to_f(&av)), make(dtype, sb, &to_f(&bv)));
                let (so, pairs) = broadcast_ref(sa, sb);
                let want: Vec<f64> = pairs.iter().map(|&(i, j)| f(av[i], bv[j]) as f64).collect();
                let got = eval1(op, &[a, b], attrs! {});
                assert_close(&format!("{op} {dtype} {sa:?} {sb:?}"), &got, &so, &want, 0.0);
            }
        }
    }
    // uint8 wraps.
    let got =
        eval1("Add", &[make(DType::U8, &[3], &[250.0, 1.0, 7.0]), make(DType::U8, &[], &[10.0])], attrs! {});
    assert_eq!(got.to_f64_vec().unwrap(), vec![4.0, 11.0, 17.0]);
}

#[test]
fn large_binary_ops_split_over_the_pool() {
    // Over the parallel threshold, with a general broadcast and both fast paths.
    let mut rng = Rng(3);
    for (sa, sb) in [(vec![300, 257], vec![257]), (vec![300, 257], vec![300, 257]), (vec![77000], vec![])] {
        let a = make(DType::F32, &sa, &rng.values(numel(&sa), -1.0, 1.0));
        let b = make(DType::F32, &sb, &rng.values(numel(&sb), -1.0, 1.0));
        let (av, bv) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
        let (so, pairs) = broadcast_ref(&sa, &sb);
        let want: Vec<f64> = pairs.iter().map(|&(i, j)| av[i] * bv[j]).collect();
        assert_close("large Mul", &eval1("Mul", &[a, b], attrs! {}), &so, &want, tol(DType::F32));
    }
}

#[test]
fn unary_ops_match_reference() {
    type F = fn(f64) -> f64;
    let cases: &[(&str, F, (f64, f64), bool)] = &[
        ("Neg", |x| -x, (-3.0, 3.0), true),
        ("Abs", f64::abs, (-3.0, 3.0), true),
        ("Square", |x| x * x, (-3.0, 3.0), true),
        (
            "Sign",
            |x| {
                if x > 0.0 {
                    1.0
                } else if x < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            },
            (-3.0, 3.0),
            true,
        ),
        ("Relu", |x| x.max(0.0), (-3.0, 3.0), true),
        ("Sqrt", f64::sqrt, (0.0, 9.0), false),
        ("Rsqrt", |x| 1.0 / x.sqrt(), (0.1, 9.0), false),
        ("Reciprocal", |x| 1.0 / x, (0.1, 9.0), false),
        ("Exp", f64::exp, (-3.0, 3.0), false),
        ("Log", f64::ln, (0.1, 9.0), false),
        ("Sigmoid", |x| 1.0 / (1.0 + (-x).exp()), (-6.0, 6.0), false),
        ("Tanh", f64::tanh, (-3.0, 3.0), false),
    ];
    let mut rng = Rng(5);
    for &(op, f, (lo, hi), ints_too) in cases {
        for shape in [&[][..], &[1], &[17], &[3, 5, 7]] {
            let mut dtypes = vec![DType::F32, DType::F16, DType::BF16, DType::F64];
            if ints_too {
                dtypes.extend([DType::I32, DType::I64]);
            }
            for dtype in dtypes {
                let x = make(dtype, shape, &rng.values(numel(shape), lo, hi));
                let want: Vec<f64> = x.to_f64_vec().unwrap().into_iter().map(f).collect();
                let got = eval1(op, &[x], attrs! {});
                // f16/bf16 results are computed in f32, then rounded once more.
                assert_close(&format!("{op} {dtype} {shape:?}"), &got, shape, &want, tol(dtype) * 2.0);
            }
        }
    }
}

#[test]
fn activation_gradients_match_reference() {
    type F = fn(f64, f64) -> f64;
    let cases: &[(&str, F, (f64, f64))] = &[
        ("ReluGrad", |g, x| if x > 0.0 { g } else { 0.0 }, (-2.0, 2.0)),
        ("SigmoidGrad", |y, dy| dy * y * (1.0 - y), (0.0, 1.0)),
        ("TanhGrad", |y, dy| dy * (1.0 - y * y), (-1.0, 1.0)),
        ("SqrtGrad", |y, dy| dy * 0.5 / y, (0.5, 3.0)),
    ];
    let mut rng = Rng(9);
    for &(op, f, (lo, hi)) in cases {
        for dtype in [DType::F32, DType::BF16] {
            let shape = [4, 13];
            let (a, b) = if op == "ReluGrad" {
                (rng.values(52, -2.0, 2.0), rng.values(52, lo, hi))
            } else {
                (rng.values(52, lo, hi), rng.values(52, -2.0, 2.0))
            };
            let (a, b) = (make(dtype, &shape, &a), make(dtype, &shape, &b));
            let (av, bv) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
            let want: Vec<f64> = av.iter().zip(&bv).map(|(&x, &y)| f(x, y)).collect();
            assert_close(
                &format!("{op} {dtype}"),
                &eval1(op, &[a, b], attrs! {}),
                &shape,
                &want,
                tol(dtype) * 3.0,
            );
        }
    }
}

#[test]
fn comparisons_give_bools() {
    type F = fn(f64, f64) -> bool;
    let cases: &[(&str, F)] = &[
        ("Equal", |a, b| a == b),
        ("NotEqual", |a, b| a != b),
        ("Greater", |a, b| a > b),
        ("GreaterEqual", |a, b| a >= b),
        ("Less", |a, b| a < b),
        ("LessEqual", |a, b| a <= b),
    ];
    let mut rng = Rng(13);
    for &(op, f) in cases {
        for &(sa, sb) in BROADCAST_SHAPES {
            for dtype in [DType::F32, DType::I32, DType::F16, DType::U8] {
                // Small integers so that equal values occur.
                let av: Vec<f64> = (0..numel(sa)).map(|_| rng.int(0, 3) as f64).collect();
                let bv: Vec<f64> = (0..numel(sb)).map(|_| rng.int(0, 3) as f64).collect();
                let (so, pairs) = broadcast_ref(sa, sb);
                let want: Vec<f64> = pairs.iter().map(|&(i, j)| f(av[i], bv[j]) as u8 as f64).collect();
                let got = eval1(op, &[make(dtype, sa, &av), make(dtype, sb, &bv)], attrs! {});
                assert_eq!(got.dtype(), DType::Bool);
                assert_close(&format!("{op} {dtype}"), &got, &so, &want, 0.0);
            }
        }
    }
    let a = make(DType::Bool, &[4], &[1.0, 0.0, 1.0, 0.0]);
    let b = make(DType::Bool, &[4], &[1.0, 1.0, 0.0, 0.0]);
    assert_eq!(
        eval1("Equal", &[a.clone(), b.clone()], attrs! {}).bool_values().unwrap(),
        [true, false, false, true]
    );
    assert_eq!(eval1("NotEqual", &[a, b], attrs! {}).bool_values().unwrap(), [false, true, true, false]);
}

// ---- linear algebra ----

fn matmul_ref(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f64> {
    let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
    let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
        }
    }
    c
}

#[test]
fn matmul_matches_reference() {
    let mut rng = Rng(17);
    let sizes = [(1, 1, 1), (3, 5, 7), (17, 9, 33), (6, 16, 16), (13, 300, 5), (4, 0, 3)];
    let mut cases: Vec<((usize, usize, usize), DType)> = Vec::new();
    for s in sizes {
        for d in [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I32, DType::I64] {
            cases.push((s, d));
        }
    }
    cases.push(((130, 70, 90), DType::F32));
    for ((m, k, n), dtype) in cases {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (lo, hi) = if dtype.is_float() { (-1.0, 1.0) } else { (-5.0, 5.0) };
            let av: Vec<f64> = rng
                .values(m * k, lo, hi)
                .into_iter()
                .map(|x| if dtype.is_float() { x } else { x.round() })
                .collect();
            let bv: Vec<f64> = rng
                .values(k * n, lo, hi)
                .into_iter()
                .map(|x| if dtype.is_float() { x } else { x.round() })
                .collect();
            let a = make(dtype, &if ta { [k, m] } else { [m, k] }, &av);
            let b = make(dtype, &if tb { [n, k] } else { [k, n] }, &bv);
            let want = matmul_ref(&a.to_f64_vec().unwrap(), &b.to_f64_vec().unwrap(), m, k, n, ta, tb);
            let got = eval1("MatMul", &[a, b], attrs! { "transpose_a" => ta, "transpose_b" => tb });
            // Sums of k products: the tolerance grows with the depth.
            let t = tol(dtype) * (k as f64).sqrt().max(1.0) * 2.0;
            assert_close(&format!("MatMul {dtype} {m}x{k}x{n} ta={ta} tb={tb}"), &got, &[m, n], &want, t);
        }
    }
}

#[test]
fn matmul_f32_around_block_boundaries() {
    // Sizes on both sides of the micro-tile (6×16), depth-block (256) and A-block (144 rows)
    // edges, each dimension swept with the other two small, transpose flags rotating; then
    // products large enough for the pool and, the last, for packing B in column groups.
    const EDGES: [usize; 16] = [1, 5, 6, 7, 15, 16, 17, 63, 64, 65, 255, 256, 257, 383, 384, 385];
    let mut cases: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &s) in EDGES.iter().enumerate() {
        let (x, y) = (EDGES[(i * 5 + 3) % 16].min(17), EDGES[(i * 7 + 1) % 16].min(65));
        cases.extend([(s, x, y), (x, s, y), (y, x, s)]);
    }
    cases.extend([(145, 257, 33), (289, 513, 47), (385, 300, 130), (7, 385, 11_000)]);
    let mut rng = Rng(29);
    for (i, &(m, k, n)) in cases.iter().enumerate() {
        let (ta, tb) = (i % 2 == 1, i % 4 >= 2);
        let a = make(DType::F32, &if ta { [k, m] } else { [m, k] }, &rng.values(m * k, -1.0, 1.0));
        let b = make(DType::F32, &if tb { [n, k] } else { [k, n] }, &rng.values(k * n, -1.0, 1.0));
        let want = matmul_ref(&a.to_f64_vec().unwrap(), &b.to_f64_vec().unwrap(), m, k, n, ta, tb);
        let got = eval1("MatMul", &[a, b], attrs! { "transpose_a" => ta, "transpose_b" => tb });
        let t = tol(DType::F32) * (k as f64).sqrt().max(1.0) * 2.0;
        assert_close(&format!("MatMul f32 {m}x{k}x{n} ta={ta} tb={tb}"), &got, &[m, n], &want, t);
    }
}

#[test]
fn matmul_chains_run_fused_and_match_the_plain_ops() {
    // MatMul → BiasAdd, → BiasAdd → Relu and → ReluGrad, over every product path: serial, few
    // rows split by columns and by rows, many rows sharing a packed B, B of one sliver, and an
    // empty depth; with intra-op threads for the parallel ones.
    let shapes = [(3, 5, 7), (128, 300, 256), (200, 64, 100), (700, 90, 70), (130, 200, 10), (4, 0, 6)];
    let opts = SessionOptions { intra_op_parallelism_threads: 3, ..Default::default() };
    let traced = RunOptions { trace_level: TraceLevel::FullTrace, ..Default::default() };
    let mut rng = Rng(41);
    for &(m, k, n) in &shapes {
        for (ta, tb, after) in [
            (false, false, "Relu"),
            (true, false, "BiasAdd"),
            (false, true, "ReluGrad"),
            (true, true, "Relu"),
        ] {
            let g = Graph::new();
            let a = g.placeholder("a", DType::F32, if ta { [k, m] } else { [m, k] });
            let b = g.placeholder("b", DType::F32, if tb { [n, k] } else { [k, n] });
            let extra_shape = if after == "ReluGrad" { vec![m, n] } else { vec![n] };
            let extra = g.placeholder("extra", DType::F32, PartialShape::from(&extra_shape[..]));
            let product = g.matmul_t(a, b, ta, tb);
            let y = match after {
                "Relu" => g.relu(g.bias_add(product, extra)),
                "BiasAdd" => g.bias_add(product, extra),
                _ => g.custom(core_op("ReluGrad"), "relu_grad", &[product, extra], Attrs::new()),
            };
            // Features around zero, some exactly zero, for ReluGrad.
            let ev: Vec<f64> = rng.values(extra_shape.iter().product(), -1.0, 1.0);
            let ev: Vec<f64> =
                ev.iter().enumerate().map(|(i, &x)| if i % 7 == 0 { 0.0 } else { x }).collect();
            let feeds = [
                (a, make(DType::F32, &if ta { [k, m] } else { [m, k] }, &rng.values(m * k, -1.0, 1.0))),
                (b, make(DType::F32, &if tb { [n, k] } else { [k, n] }, &rng.values(k * n, -1.0, 1.0))),
                (extra, make(DType::F32, &extra_shape, &ev)),
            ];
            let (af, bf) = (feeds[0].1.to_f64_vec().unwrap(), feeds[1].1.to_f64_vec().unwrap());
            let ef = feeds[2].1.to_f64_vec().unwrap();
            let mut want = matmul_ref(&af, &bf, m, k, n, ta, tb);
            for (i, v) in want.iter_mut().enumerate() {
                *v = match after {
                    "Relu" => (*v + ef[i % n]).max(0.0),
                    "BiasAdd" => *v + ef[i % n],
                    _ if ef[i] > 0.0 => *v,
                    _ => 0.0,
                };
            }
            let what = format!("MatMul -> {after} {m}x{k}x{n} ta={ta} tb={tb}");
            let t = tol(DType::F32) * (k as f64).sqrt().max(1.0) * 2.0;
            let sess = DirectSession::new(&g, &cpu_runtime(), opts.clone()).unwrap();
            let mut md = RunMetadata::default();
            let got = sess.run_with_metadata(&feeds, &[y], &[], &traced, Some(&mut md)).unwrap();
            let ran: Vec<&str> = md.step_stats.nodes.iter().map(|s| s.op.as_str()).collect();
            let unfused = ["MatMul", "BiasAdd", "Relu", "ReluGrad"];
            assert!(
                ran.contains(&"_FusedMatMul") && !ran.iter().any(|op| unfused.contains(op)),
                "{what}: ran {ran:?}"
            );
            assert_close(&what, &got[0], &[m, n], &want, t);
            // Fetching the product too keeps the chain apart, with the same result.
            let mut md = RunMetadata::default();
            let both = sess.run_with_metadata(&feeds, &[y, product], &[], &traced, Some(&mut md)).unwrap();
            assert!(
                md.step_stats.nodes.iter().all(|s| s.op != "_FusedMatMul"),
                "{what}: fused though fetched"
            );
            assert_close(&format!("{what}, unfused"), &both[0], &[m, n], &want, t);
        }
    }
    // The fused kernel checks what the graph could not: f32 only, one bias per column.
    let fused = |a: Tensor, bias: Tensor| {
        eval("_FusedMatMul", &[a.clone(), a, bias], attrs! { "fused_ops" => vec!["BiasAdd".to_string()] })
    };
    let square = make(DType::F32, &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let err = fused(square.clone(), make(DType::F32, &[3], &[0.0; 3])).unwrap_err();
    assert!(err.code == Code::InvalidArgument && err.msg.contains("biases"), "{err}");
    let err = fused(make(DType::F64, &[2, 2], &[0.0; 4]), make(DType::F64, &[2], &[0.0; 2])).unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    let ok = fused(square.clone(), make(DType::F32, &[2], &[1.0, -1.0])).unwrap();
    assert_close("_FusedMatMul 2x2", &ok[0], &[2, 2], &[8.0, 9.0, 16.0, 21.0], 0.0);
    let relu_grad = |features: Tensor| {
        let ops = vec!["ReluGrad".to_string()];
        eval("_FusedMatMul", &[square.clone(), square.clone(), features], attrs! { "fused_ops" => ops })
    };
    let err = relu_grad(make(DType::F32, &[2], &[1.0; 2])).unwrap_err();
    assert!(err.code == Code::InvalidArgument && err.msg.contains("features"), "{err}");
    let ok = relu_grad(make(DType::F32, &[2, 2], &[1.0, 0.0, -1.0, f64::NAN])).unwrap();
    assert_close("_FusedMatMul ReluGrad 2x2", &ok[0], &[2, 2], &[7.0, 0.0, 0.0, 0.0], 0.0);
}

// ---- reductions ----

fn reduce_ref(x: &[f64], dims: &[usize], axes: &[usize], op: &str, int: bool) -> (Vec<usize>, Vec<f64>) {
    let kept: Vec<usize> = (0..dims.len()).filter(|a| !axes.contains(a)).collect();
    let out_dims: Vec<usize> = kept.iter().map(|&a| dims[a]).collect();
    let mut groups: Vec<Vec<f64>> = vec![Vec::new(); numel(&out_dims)];
    for (i, &v) in x.iter().enumerate() {
        let idx = unravel(i, dims);
        let o: Vec<usize> = kept.iter().map(|&a| idx[a]).collect();
        groups[ravel(&o, &out_dims)].push(v);
    }
    let vals = groups
        .iter()
        .map(|g| match op {
            "Sum" => g.iter().sum(),
            // An integer mean over no elements is 0 rather than a division by zero.
            "Mean" if int && g.is_empty() => 0.0,
            // Integer Max and Min over no elements give the type's extremes (int32 here).
            "Max" if int && g.is_empty() => i32::MIN as f64,
            "Min" if int && g.is_empty() => i32::MAX as f64,
            "Mean" if int => (g.iter().sum::<f64>() / g.len() as f64).trunc(),
            "Mean" => g.iter().sum::<f64>() / g.len() as f64,
            "Max" => g.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            "Min" => g.iter().cloned().fold(f64::INFINITY, f64::min),
            _ => g.iter().product(),
        })
        .collect();
    (out_dims, vals)
}

#[test]
fn reductions_match_reference() {
    let cases: &[(&[usize], &[i64])] = &[
        (&[2, 3, 4], &[1]),
        (&[2, 3, 4], &[0, 2]),
        (&[2, 3, 4], &[-1]),
        (&[2, 3, 4], &[0]),
        (&[2, 3, 4], &[0, 1, 2]),
        (&[5, 1, 7, 3], &[1, 3]),
        (&[3, 4, 5, 6], &[1, 3]),
        (&[9, 17], &[]),
        (&[301], &[0]),
        (&[0, 4], &[0]),
    ];
    let mut rng = Rng(19);
    for op in ["Sum", "Mean", "Max", "Min", "Prod"] {
        for &(dims, axes) in cases {
            for dtype in [DType::F32, DType::BF16, DType::I32, DType::F64] {
                if op == "Prod" && dims.iter().product::<usize>() > 100 {
                    continue;
                }
                let int = !dtype.is_float();
                let (lo, hi) = if op == "Prod" { (0.5, 1.5) } else { (-4.0, 4.0) };
                let v: Vec<f64> = rng
                    .values(numel(dims), lo, hi)
                    .into_iter()
                    .map(|x| if int { x.round() } else { x })
                    .collect();
                let x = make(dtype, dims, &v);
                let norm: Vec<usize> = axes
                    .iter()
                    .map(|&a| if a < 0 { (a + dims.len() as i64) as usize } else { a as usize })
                    .collect();
                let (od, want) = reduce_ref(&x.to_f64_vec().unwrap(), dims, &norm, op, int);
                let t = tol(dtype) * (numel(dims) as f64).sqrt().max(1.0) * 2.0;
                for keep in [false, true] {
                    let got = eval1(op, &[x.clone(), ints(axes)], attrs! { "keep_dims" => keep });
                    let shape: Vec<usize> = if keep {
                        dims.iter().enumerate().map(|(i, &d)| if norm.contains(&i) { 1 } else { d }).collect()
                    } else {
                        od.clone()
                    };
                    assert_close(&format!("{op} {dtype} {dims:?} axes {axes:?}"), &got, &shape, &want, t);
                }
            }
        }
    }
    // int64 axes work too, and a large row reduction goes through the pool.
    let v = rng.values(200 * 300, -1.0, 1.0);
    let x = make(DType::F32, &[200, 300], &v);
    let (od, want) = reduce_ref(&x.to_f64_vec().unwrap(), &[200, 300], &[1], "Sum", false);
    assert_close("large Sum", &eval1("Sum", &[x.clone(), ints64(&[1])], attrs! {}), &od, &want, 1e-4);
    let (od, want) = reduce_ref(&x.to_f64_vec().unwrap(), &[200, 300], &[0], "Max", false);
    assert_close("large Max", &eval1("Max", &[x, ints64(&[0])], attrs! {}), &od, &want, 0.0);
}

#[test]
fn argmax_picks_the_first_maximum() {
    let mut rng = Rng(23);
    for (dims, axis) in [(vec![4, 7], 1i64), (vec![4, 7], 0), (vec![3, 5, 2], -2), (vec![9], 0)] {
        for dtype in [DType::F32, DType::I32, DType::F16] {
            let v: Vec<f64> = (0..numel(&dims)).map(|_| rng.int(0, 5) as f64).collect();
            let a = if axis < 0 { (axis + dims.len() as i64) as usize } else { axis as usize };
            let out_dims: Vec<usize> =
                dims.iter().enumerate().filter(|(i, _)| *i != a).map(|(_, &d)| d).collect();
            let want: Vec<f64> = (0..numel(&out_dims))
                .map(|o| {
                    let oi = unravel(o, &out_dims);
                    let at = |j: usize| {
                        let mut idx = oi.clone();
                        idx.insert(a, j);
                        v[ravel(&idx, &dims)]
                    };
                    let mut best = 0;
                    for j in 1..dims[a] {
                        if at(j) > at(best) {
                            best = j;
                        }
                    }
                    best as f64
                })
                .collect();
            for out_type in [DType::I64, DType::I32] {
                let got = eval1(
                    "ArgMax",
                    &[make(dtype, &dims, &v), scalar_i32(axis as i32)],
                    attrs! { "output_type" => out_type },
                );
                assert_eq!(got.dtype(), out_type);
                assert_close(&format!("ArgMax {dtype} {dims:?} {axis}"), &got, &out_dims, &want, 0.0);
            }
        }
    }
}

// ---- shapes and data movement ----

#[test]
fn reshape_expand_squeeze_and_shape() {
    let x = make(DType::F32, &[2, 3, 4], &(0..24).map(|i| i as f64).collect::<Vec<_>>());
    let cases: &[(&[i64], &[usize])] =
        &[(&[4, -1], &[4, 6]), (&[24], &[24]), (&[-1], &[24]), (&[2, 2, 2, 3], &[2, 2, 2, 3])];
    for &(target, want) in cases {
        let got = eval1("Reshape", &[x.clone(), ints(target)], attrs! {});
        assert_eq!(got.shape().dims(), want);
        assert_eq!(got.to_f64_vec().unwrap(), x.to_f64_vec().unwrap());
    }
    for (axis, want) in
        [(0, vec![1, 2, 3, 4]), (3, vec![2, 3, 4, 1]), (-1, vec![2, 3, 4, 1]), (-2, vec![2, 3, 1, 4])]
    {
        assert_eq!(eval1("ExpandDims", &[x.clone(), scalar_i32(axis)], attrs! {}).shape().dims(), want);
    }
    let y = make(DType::I64, &[1, 3, 1, 2], &[1.0; 6]);
    let squeezes: &[(Vec<i64>, &[usize])] =
        &[(vec![], &[3, 2]), (vec![0], &[3, 1, 2]), (vec![-2], &[1, 3, 2])];
    for (axes, want) in squeezes {
        assert_eq!(
            eval1("Squeeze", std::slice::from_ref(&y), attrs! { "squeeze_dims" => axes.clone() })
                .shape()
                .dims(),
            *want
        );
    }
    let s = eval1("Shape", std::slice::from_ref(&y), attrs! { "out_type" => DType::I32 });
    assert_eq!(s.to_vec::<i32>().unwrap(), vec![1, 3, 1, 2]);
    let s = eval1("Shape", &[y], attrs! { "out_type" => DType::I64 });
    assert_eq!(s.to_vec::<i64>().unwrap(), vec![1, 3, 1, 2]);
}

#[test]
fn transpose_matches_reference() {
    let mut rng = Rng(29);
    let cases: &[(&[usize], &[i64])] = &[
        (&[3, 5], &[1, 0]),
        (&[2, 3, 4], &[2, 0, 1]),
        (&[2, 3, 4], &[0, 2, 1]),
        (&[2, 3, 4], &[0, 1, 2]),
        (&[3, 1, 5, 2], &[3, 2, 1, 0]),
        (&[40, 33, 31], &[1, 2, 0]),
    ];
    for &(dims, perm) in cases {
        for dtype in [DType::F32, DType::F16, DType::I64, DType::U8, DType::Bool] {
            let v: Vec<f64> =
                (0..numel(dims)).map(|_| rng.int(0, 1) as f64 * rng.int(1, 100) as f64).collect();
            let v: Vec<f64> =
                if dtype == DType::Bool { v.iter().map(|&x| (x != 0.0) as u8 as f64).collect() } else { v };
            let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p as usize]).collect();
            let want: Vec<f64> = (0..v.len())
                .map(|o| {
                    let oi = unravel(o, &out_dims);
                    let mut ii = vec![0; dims.len()];
                    for (k, &p) in perm.iter().enumerate() {
                        ii[p as usize] = oi[k];
                    }
                    v[ravel(&ii, dims)]
                })
                .collect();
            let got = eval1("Transpose", &[make(dtype, dims, &v), ints(perm)], attrs! {});
            assert_close(&format!("Transpose {dtype} {dims:?} {perm:?}"), &got, &out_dims, &want, 0.0);
        }
    }
}

#[test]
fn concat_slice_gather_tile() {
    let seq = |dims: &[usize]| -> Vec<f64> { (0..numel(dims)).map(|i| i as f64).collect() };
    // ConcatV2 along each axis.
    for (axis, want_dims) in [(0i32, vec![5, 3]), (1, vec![2, 7])] {
        let (sa, sb): (Vec<usize>, Vec<usize>) =
            if axis == 0 { (vec![2, 3], vec![3, 3]) } else { (vec![2, 3], vec![2, 4]) };
        let (av, bv) = (seq(&sa), seq(&sb).iter().map(|x| x + 100.0).collect::<Vec<_>>());
        let want: Vec<f64> = (0..numel(&want_dims))
            .map(|o| {
                let idx = unravel(o, &want_dims);
                let a = axis as usize;
                if idx[a] < sa[a] {
                    av[ravel(&idx, &sa)]
                } else {
                    let mut j = idx.clone();
                    j[a] -= sa[a];
                    bv[ravel(&j, &sb)]
                }
            })
            .collect();
        for dtype in [DType::F32, DType::BF16, DType::I32] {
            let got = eval1(
                "ConcatV2",
                &[make(dtype, &sa, &av), make(dtype, &sb, &bv), scalar_i32(axis - 2)],
                attrs! {},
            );
            assert_close(&format!("ConcatV2 {dtype} axis {axis}"), &got, &want_dims, &want, 0.0);
        }
    }
    // Slice with size -1.
    let dims = [4usize, 5, 6];
    let x = seq(&dims);
    let slices: &[(&[i64], &[i64])] = &[
        (&[1, 0, 2], &[2, -1, 3]),
        (&[0, 0, 0], &[4, 5, 6]),
        (&[3, 4, 5], &[1, 1, 1]),
        (&[2, 1, 0], &[0, 2, -1]),
    ];
    for &(begin, size) in slices {
        let out_dims: Vec<usize> = (0..3)
            .map(|i| if size[i] == -1 { dims[i] - begin[i] as usize } else { size[i] as usize })
            .collect();
        let want: Vec<f64> = (0..numel(&out_dims))
            .map(|o| {
                let idx: Vec<usize> =
                    unravel(o, &out_dims).iter().zip(begin).map(|(&i, &b)| i + b as usize).collect();
                x[ravel(&idx, &dims)]
            })
            .collect();
        for dtype in [DType::F64, DType::F16] {
            let got = eval1("Slice", &[make(dtype, &dims, &x), ints(begin), ints64(size)], attrs! {});
            assert_close(&format!("Slice {begin:?} {size:?}"), &got, &out_dims, &want, 0.0);
        }
    }
    // Gather rows with 2-D indices of both index types.
    let params = make(DType::F32, &[5, 3], &seq(&[5, 3]));
    let idx = [4i64, 0, 2, 2, 1, 4];
    let want: Vec<f64> = idx.iter().flat_map(|&i| (0..3).map(move |j| (i * 3 + j) as f64)).collect();
    let i32s = Tensor::new([2, 3], &idx.iter().map(|&i| i as i32).collect::<Vec<_>>()).unwrap();
    let i64s = Tensor::new([2, 3], &idx).unwrap();
    for indices in [i32s, i64s] {
        assert_close(
            "Gather",
            &eval1("Gather", &[params.clone(), indices], attrs! {}),
            &[2, 3, 3],
            &want,
            0.0,
        );
    }
    // Tile.
    let tiles: &[(&[usize], &[i64])] =
        &[(&[2, 3], &[2, 1]), (&[2, 3], &[3, 2]), (&[3], &[4]), (&[2, 1, 2], &[1, 3, 0])];
    for &(dims, mult) in tiles {
        let v = seq(dims);
        let out_dims: Vec<usize> = dims.iter().zip(mult).map(|(&d, &m)| d * m as usize).collect();
        let want: Vec<f64> = (0..numel(&out_dims))
            .map(|o| {
                let idx: Vec<usize> = unravel(o, &out_dims).iter().zip(dims).map(|(&i, &d)| i % d).collect();
                v[ravel(&idx, dims)]
            })
            .collect();
        let got = eval1("Tile", &[make(DType::I32, dims, &v), ints(mult)], attrs! {});
        assert_close(&format!("Tile {dims:?} {mult:?}"), &got, &out_dims, &want, 0.0);
    }
}

#[test]
fn fill_zeros_like_ones_like() {
    for dtype in
        [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I32, DType::I64, DType::U8, DType::Bool]
    {
        let v = make(dtype, &[], &[1.0]);
        let got = eval1("Fill", &[ints(&[2, 3, 1]), v], attrs! {});
        assert_close(&format!("Fill {dtype}"), &got, &[2, 3, 1], &[1.0; 6], 0.0);
        let x = make(dtype, &[3, 5], &[1.0; 15]);
        assert_close(
            &format!("ZerosLike {dtype}"),
            &eval1("ZerosLike", std::slice::from_ref(&x), attrs! {}),
            &[3, 5],
            &[0.0; 15],
            0.0,
        );
        assert_close(
            &format!("OnesLike {dtype}"),
            &eval1("OnesLike", &[x], attrs! {}),
            &[3, 5],
            &[1.0; 15],
            0.0,
        );
    }
    let got = eval1("Fill", &[ints64(&[2, 2]), make(DType::F32, &[], &[-2.5])], attrs! {});
    assert_close("Fill int64 dims", &got, &[2, 2], &[-2.5; 4], 0.0);
}

#[test]
fn cast_follows_static_cast() {
    let cases: &[(DType, &[f64], DType, &[f64])] = &[
        (DType::F32, &[1.7, -1.7, 0.0, 300.4], DType::I32, &[1.0, -1.0, 0.0, 300.0]),
        (DType::F32, &[1.7, -1.7, 0.0, 0.5], DType::Bool, &[1.0, 1.0, 0.0, 1.0]),
        (DType::Bool, &[1.0, 0.0, 1.0, 0.0], DType::F32, &[1.0, 0.0, 1.0, 0.0]),
        (
            DType::I64,
            &[9007199254740993.0, -3.0, 0.0, 1.0],
            DType::I64,
            &[9007199254740993.0, -3.0, 0.0, 1.0],
        ),
        (DType::I32, &[-3.0, 255.0, 256.0, 7.0], DType::U8, &[253.0, 255.0, 0.0, 7.0]),
        (DType::U8, &[0.0, 200.0, 255.0, 1.0], DType::F16, &[0.0, 200.0, 255.0, 1.0]),
        (DType::F64, &[0.1, 1e10, -2.0, 65504.0], DType::F32, &[0.1f32 as f64, 1e10, -2.0, 65504.0]),
        (DType::F32, &[1.0, 0.333251953125, 2049.0, -0.5], DType::F16, &[1.0, 0.333251953125, 2048.0, -0.5]),
        (DType::BF16, &[1.0, 3.0, -0.5, 256.0], DType::I64, &[1.0, 3.0, 0.0, 256.0]),
        (DType::I32, &[0.0, -5.0, 7.0, 1.0], DType::Bool, &[0.0, 1.0, 1.0, 1.0]),
        (DType::F16, &[1.5, -2.25, 4.0, 0.0], DType::BF16, &[1.5, -2.25, 4.0, 0.0]),
    ];
    for &(from, v, to, want) in cases {
        let got = eval1("Cast", &[make(from, &[4], v)], attrs! { "SrcT" => from, "DstT" => to });
        assert_eq!(got.dtype(), to);
        assert_close(&format!("Cast {from} -> {to}"), &got, &[4], want, 0.0);
    }
    // int64 values beyond 2^53 keep every bit through int64 -> int64 casts and map exactly to f64's
    // nearest value in int64 -> f64 casts.
    let big = Tensor::vector(&[i64::MAX, i64::MIN + 1, 123]);
    let got = eval1("Cast", &[big], attrs! { "SrcT" => DType::I64, "DstT" => DType::I32 });
    assert_eq!(got.to_vec::<i32>().unwrap(), vec![-1, 1, 123]);
}

// ---- neural-network ops ----

#[test]
fn bias_add_and_its_gradient() {
    let mut rng = Rng(31);
    for (dims, nchw) in [
        (vec![4, 7], false),
        (vec![2, 3, 5], false),
        (vec![2, 3, 5], true),
        (vec![2, 4, 3, 3], true),
        (vec![9], false),
    ] {
        let c_axis = if nchw { 1 } else { dims.len() - 1 };
        let c = dims[c_axis];
        let format = if nchw { "NCHW" } else { "NHWC" };
        for dtype in [DType::F32, DType::BF16, DType::I32] {
            let round = |v: Vec<f64>| -> Vec<f64> {
                if dtype.is_float() {
                    v
                } else {
                    v.iter().map(|x| x.round()).collect()
                }
            };
            let x = make(dtype, &dims, &round(rng.values(numel(&dims), -3.0, 3.0)));
            let b = make(dtype, &[c], &round(rng.values(c, -3.0, 3.0)));
            let (xv, bv) = (x.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
            let want: Vec<f64> = (0..xv.len()).map(|i| xv[i] + bv[unravel(i, &dims)[c_axis]]).collect();
            let got = eval1("BiasAdd", &[x.clone(), b], attrs! { "data_format" => format });
            assert_close(&format!("BiasAdd {dtype} {dims:?} {format}"), &got, &dims, &want, tol(dtype));
            let mut sums = vec![0.0; c];
            for (i, v) in xv.iter().enumerate() {
                sums[unravel(i, &dims)[c_axis]] += v;
            }
            let got = eval1("BiasAddGrad", &[x], attrs! { "data_format" => format });
            assert_close(
                &format!("BiasAddGrad {dtype} {dims:?} {format}"),
                &got,
                &[c],
                &sums,
                tol(dtype) * 4.0,
            );
        }
    }
}

fn softmax_ref(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = row.iter().map(|x| (x - m).exp()).sum();
    row.iter().map(|x| (x - m).exp() / s).collect()
}

#[test]
fn softmax_and_log_softmax() {
    let mut rng = Rng(37);
    for dims in [vec![1], vec![3, 10], vec![2, 3, 17], vec![5, 1]] {
        let c = *dims.last().unwrap();
        for dtype in [DType::F32, DType::F16, DType::F64] {
            // Large logits check the max subtraction.
            let x = make(dtype, &dims, &rng.values(numel(&dims), -50.0, 50.0));
            let xv = x.to_f64_vec().unwrap();
            let sm: Vec<f64> = xv.chunks(c).flat_map(softmax_ref).collect();
            let lsm: Vec<f64> = xv
                .chunks(c)
                .flat_map(|r| {
                    let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = r.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    r.iter().map(move |x| x - m - lse).collect::<Vec<_>>()
                })
                .collect();
            assert_close(
                &format!("Softmax {dtype} {dims:?}"),
                &eval1("Softmax", std::slice::from_ref(&x), attrs! {}),
                &dims,
                &sm,
                tol(dtype) * 2.0,
            );
            assert_close(
                &format!("LogSoftmax {dtype} {dims:?}"),
                &eval1("LogSoftmax", &[x], attrs! {}),
                &dims,
                &lsm,
                tol(dtype) * 4.0,
            );
        }
    }
}

#[test]
fn softmax_cross_entropy_losses() {
    let mut rng = Rng(41);
    for (b, c) in [(1, 1), (4, 10), (7, 3), (3, 33)] {
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            let logits = make(dtype, &[b, c], &rng.values(b * c, -5.0, 5.0));
            let lv = logits.to_f64_vec().unwrap();
            // Dense labels: a distribution per row.
            let raw = rng.values(b * c, 0.0, 1.0);
            let yv: Vec<f64> = raw
                .chunks(c)
                .flat_map(|r| {
                    let s: f64 = r.iter().sum();
                    r.iter().map(move |x| x / s).collect::<Vec<_>>()
                })
                .collect();
            let labels = make(dtype, &[b, c], &yv);
            let yv = labels.to_f64_vec().unwrap();
            let mut loss = vec![0.0; b];
            let mut back = vec![0.0; b * c];
            for i in 0..b {
                let sm = softmax_ref(&lv[i * c..(i + 1) * c]);
                for j in 0..c {
                    loss[i] -= yv[i * c + j] * sm[j].ln();
                    back[i * c + j] = sm[j] - yv[i * c + j];
                }
            }
            let out = eval("SoftmaxCrossEntropyWithLogits", &[logits.clone(), labels], attrs! {}).unwrap();
            let t = tol(dtype) * 8.0;
            assert_close(&format!("xent loss {dtype} {b}x{c}"), &out[0], &[b], &loss, t);
            assert_close(&format!("xent backprop {dtype} {b}x{c}"), &out[1], &[b, c], &back, t);
            // Sparse labels of both index types.
            let ys: Vec<i64> = (0..b).map(|_| rng.int(0, c as i64 - 1)).collect();
            let mut loss = vec![0.0; b];
            let mut back = vec![0.0; b * c];
            for i in 0..b {
                let sm = softmax_ref(&lv[i * c..(i + 1) * c]);
                loss[i] = -sm[ys[i] as usize].ln();
                for j in 0..c {
                    back[i * c + j] = sm[j] - (j as i64 == ys[i]) as u8 as f64;
                }
            }
            for labels in [ints(&ys), ints64(&ys)] {
                let out = eval("SparseSoftmaxCrossEntropyWithLogits", &[logits.clone(), labels], attrs! {})
                    .unwrap();
                assert_close(&format!("sparse xent loss {dtype}"), &out[0], &[b], &loss, t);
                assert_close(&format!("sparse xent backprop {dtype}"), &out[1], &[b, c], &back, t);
            }
        }
    }
}

// ---- gradient helpers and AddN ----

#[test]
fn add_n_sums_its_inputs() {
    let mut rng = Rng(43);
    for n in [1, 2, 5] {
        for dtype in [DType::F32, DType::F16, DType::I64] {
            let xs: Vec<Tensor> = (0..n)
                .map(|_| {
                    make(
                        dtype,
                        &[3, 7],
                        &rng.values(21, -3.0, 3.0).iter().map(|x| x.round()).collect::<Vec<_>>(),
                    )
                })
                .collect();
            let mut want = vec![0.0; 21];
            for x in &xs {
                for (w, v) in want.iter_mut().zip(x.to_f64_vec().unwrap()) {
                    *w += v;
                }
            }
            assert_close(&format!("AddN {n} {dtype}"), &eval1("AddN", &xs, attrs! {}), &[3, 7], &want, 0.0);
        }
    }
}

#[test]
fn broadcast_gradient_args_table() {
    let cases: &[(&[i64], &[i64], &[i64], &[i64])] = &[
        (&[2, 3], &[2, 3], &[], &[]),
        (&[2, 3], &[3], &[], &[0]),
        (&[2, 3], &[], &[], &[0, 1]),
        (&[1], &[1], &[0], &[0]),
        (&[5, 1, 9], &[4, 9], &[1], &[0]),
        (&[2, 1, 3], &[1, 1, 3], &[1], &[0, 1]),
        (&[], &[], &[], &[]),
    ];
    for &(s0, s1, r0, r1) in cases {
        for wide in [false, true] {
            let (a, b) = if wide { (ints64(s0), ints64(s1)) } else { (ints(s0), ints(s1)) };
            let out = eval("BroadcastGradientArgs", &[a, b], attrs! {}).unwrap();
            assert_eq!(out[0].dtype(), if wide { DType::I64 } else { DType::I32 });
            let got0: Vec<i64> = out[0].to_f64_vec().unwrap().iter().map(|&x| x as i64).collect();
            let got1: Vec<i64> = out[1].to_f64_vec().unwrap().iter().map(|&x| x as i64).collect();
            assert_eq!((got0.as_slice(), got1.as_slice()), (r0, r1), "BroadcastGradientArgs({s0:?}, {s1:?})");
        }
    }
}

#[test]
fn sum_to_shape_undoes_broadcasting() {
    let mut rng = Rng(47);
    let cases: &[(&[usize], &[usize])] = &[
        (&[4, 5], &[5]),
        (&[4, 5], &[4, 1]),
        (&[2, 3, 4], &[]),
        (&[2, 3, 4], &[1, 3, 1]),
        (&[3, 4], &[3, 4]),
        (&[2, 1, 5], &[1, 5]),
    ];
    for &(from, to) in cases {
        for dtype in [DType::F32, DType::BF16, DType::I32] {
            let v: Vec<f64> = rng.values(numel(from), -3.0, 3.0).iter().map(|x| x.round()).collect();
            let mut want = vec![0.0; numel(to)];
            let pad: Vec<usize> = [vec![1; from.len() - to.len()], to.to_vec()].concat();
            for (i, x) in v.iter().enumerate() {
                let idx: Vec<usize> =
                    unravel(i, from).iter().zip(&pad).map(|(&j, &d)| if d == 1 { 0 } else { j }).collect();
                want[ravel(&idx, &pad)] += x;
            }
            let shape: Vec<i64> = to.iter().map(|&d| d as i64).collect();
            let got = eval1("SumToShape", &[make(dtype, from, &v), ints(&shape)], attrs! {});
            assert_close(
                &format!("SumToShape {from:?} -> {to:?} {dtype}"),
                &got,
                to,
                &want,
                tol(dtype) * 4.0,
            );
        }
    }
}

// ---- optimizers ----

/// One step of each optimizer in f64: (new var, new slots) from (var, slots, scalars, grad).
fn apply_ref(op: &str, nesterov: bool, w: f64, slots: &mut [f64], s: &[f64], g: f64) -> f64 {
    match op {
        "ApplyGradientDescent" => w - s[0] * g,
        "ApplyMomentum" => {
            slots[0] = slots[0] * s[1] + g;
            if nesterov {
                w - (g * s[0] + slots[0] * s[1] * s[0])
            } else {
                w - s[0] * slots[0]
            }
        }
        "ApplyAdam" => {
            let (b1p, b2p, lr, b1, b2, eps) = (s[0], s[1], s[2], s[3], s[4], s[5]);
            let lr_t = lr * (1.0 - b2p).sqrt() / (1.0 - b1p);
            slots[0] += (g - slots[0]) * (1.0 - b1);
            slots[1] += (g * g - slots[1]) * (1.0 - b2);
            let num = if nesterov { g * (1.0 - b1) + b1 * slots[0] } else { slots[0] };
            w - num * lr_t / (slots[1].sqrt() + eps)
        }
        _ => {
            let (lr, rho, momentum, eps) = (s[0], s[1], s[2], s[3]);
            slots[0] += (g * g - slots[0]) * (1.0 - rho);
            slots[1] = slots[1] * momentum + lr * g / (slots[0] + eps).sqrt();
            w - slots[1]
        }
    }
}

#[test]
fn optimizers_update_variables_in_place() {
    let cases: &[(&str, usize, &[f64], bool)] = &[
        ("ApplyGradientDescent", 0, &[0.1], false),
        ("ApplyMomentum", 1, &[0.1, 0.9], false),
        ("ApplyMomentum", 1, &[0.1, 0.9], true),
        ("ApplyAdam", 2, &[0.9, 0.999, 0.01, 0.9, 0.999, 1e-8], false),
        ("ApplyAdam", 2, &[0.9, 0.999, 0.01, 0.9, 0.999, 1e-8], true),
        ("ApplyRMSProp", 2, &[0.01, 0.9, 0.5, 1e-6], false),
    ];
    let mut rng = Rng(53);
    // 70 001 elements update in chunks over the intra-op pool; 11 on the calling thread.
    let opts = SessionOptions { intra_op_parallelism_threads: 3, ..Default::default() };
    for &(op, nslots, scalars, nesterov) in cases {
        for (dtype, n) in [(DType::F32, 11), (DType::F64, 11), (DType::F32, 70_001)] {
            let w0 = rng.values(n, -1.0, 1.0);
            let slot0: Vec<Vec<f64>> = (0..nslots).map(|_| rng.values(n, 0.0, 1.0)).collect();
            let g = Graph::new();
            let w = g.variable("w", g.constant(make(dtype, &[n], &w0)));
            let slots: Vec<Output> = slot0
                .iter()
                .enumerate()
                .map(|(i, v)| g.variable(&format!("s{i}"), g.constant(make(dtype, &[n], v))))
                .collect();
            let grad = g.placeholder("grad", dtype, [Some(n)]);
            let mut inputs = vec![w];
            inputs.extend(&slots);
            inputs.extend(scalars.iter().map(|&x| g.constant(make(dtype, &[], &[x]))));
            inputs.push(grad);
            if op == "ApplyMomentum" {
                // TensorFlow's order: (var, accum, lr, grad, momentum).
                inputs.swap(3, 4);
            }
            let apply = g.custom(core_op(op), "apply", &inputs, attrs! { "use_nesterov" => nesterov });
            let init = g.global_variables_initializer();
            let sess = DirectSession::new(&g, &cpu_runtime(), opts.clone()).unwrap();
            sess.run(&[], &[], &[init], &RunOptions::default()).unwrap();
            let (mut wv, mut sv) = (w0.clone(), slot0.clone());
            for _ in 0..2 {
                let gv = rng.values(n, -1.0, 1.0);
                let gt = make(dtype, &[n], &gv);
                let gq = gt.to_f64_vec().unwrap();
                let out = sess.run(&[(grad, gt)], &[apply], &[], &RunOptions::default()).unwrap();
                for i in 0..n {
                    let mut st: Vec<f64> = sv.iter().map(|s| s[i]).collect();
                    wv[i] = apply_ref(op, nesterov, wv[i], &mut st, scalars, gq[i]);
                    for (s, v) in sv.iter_mut().zip(st) {
                        s[i] = v;
                    }
                }
                let what = format!("{op} nesterov={nesterov} {dtype}");
                assert_close(&what, &out[0], &[n], &wv, 1e-5);
                let fetched = sess.run(&[], &[w], &[], &RunOptions::default()).unwrap();
                assert_close(&format!("{what}: variable"), &fetched[0], &[n], &wv, 1e-5);
            }
        }
    }
}

// ---- random ----

fn random_run(op: &str, dtype: DType, seed: i64, n: usize, runs: usize) -> Vec<Vec<f64>> {
    let g = Graph::new();
    let r = g.random_op(op, [n], dtype, seed);
    let sess = DirectSession::new(&g, &cpu_runtime(), SessionOptions::default()).unwrap();
    (0..runs)
        .map(|_| sess.run(&[], &[r], &[], &RunOptions::default()).unwrap()[0].to_f64_vec().unwrap())
        .collect()
}

#[test]
fn random_ops_are_seeded_and_advance() {
    for op in ["RandomUniform", "RandomStandardNormal", "TruncatedNormal"] {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let a = random_run(op, dtype, 42, 4000, 2);
            let b = random_run(op, dtype, 42, 4000, 1);
            let c = random_run(op, dtype, 43, 4000, 1);
            assert_eq!(a[0], b[0], "{op} {dtype}: same seed, same first run");
            assert_ne!(a[0], a[1], "{op} {dtype}: each run draws new values");
            assert_ne!(a[0], c[0], "{op} {dtype}: another seed, other values");
            let v = &a[0];
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64;
            let (lo, hi, want_mean, want_var) = match op {
                "RandomUniform" => (0.0, 1.0, 0.5, 1.0 / 12.0),
                "RandomStandardNormal" => (f64::NEG_INFINITY, f64::INFINITY, 0.0, 1.0),
                // Variance of a standard normal truncated to [-2, 2].
                _ => (-2.0, 2.0, 0.0, 0.774),
            };
            assert!(v.iter().all(|&x| x >= lo && (x < hi || (hi == 2.0 && x <= 2.0))), "{op} {dtype}: range");
            assert!((mean - want_mean).abs() < 0.06, "{op} {dtype}: mean {mean}");
            assert!((var - want_var).abs() < 0.1 * want_var.max(0.1), "{op} {dtype}: variance {var}");
        }
    }
}

// ---- errors ----

#[test]
fn kernel_errors_are_invalid_argument() {
    let f = |v: &[f64], d: &[usize]| make(DType::F32, d, v);
    let m23 = f(&[0.0; 6], &[2, 3]);
    let cases: Vec<(&str, Vec<Tensor>, Attrs, &str)> = vec![
        ("Add", vec![m23.clone(), f(&[0.0; 4], &[4])], attrs! {}, "Incompatible shapes"),
        ("Less", vec![m23.clone(), f(&[0.0; 2], &[2])], attrs! {}, "Incompatible shapes"),
        (
            "Div",
            vec![make(DType::I32, &[2], &[1.0, 2.0]), make(DType::I32, &[2], &[1.0, 0.0])],
            attrs! {},
            "division by zero",
        ),
        (
            "Pow",
            vec![make(DType::I64, &[1], &[2.0]), make(DType::I64, &[1], &[-1.0])],
            attrs! {},
            "negative integer powers",
        ),
        ("MatMul", vec![m23.clone(), f(&[0.0; 20], &[4, 5])], attrs! {}, "size-incompatible"),
        ("MatMul", vec![f(&[0.0; 6], &[6]), m23.clone()], attrs! {}, "must be matrices"),
        ("Gather", vec![f(&[0.0; 8], &[4, 2]), ints(&[1, 7])], attrs! {}, "indices[1] = 7 is not in [0, 4)"),
        ("Gather", vec![f(&[0.0; 8], &[4, 2]), ints64(&[-1])], attrs! {}, "indices[0] = -1"),
        ("Gather", vec![f(&[1.0], &[]), ints(&[0])], attrs! {}, "at least 1 dimensional"),
        ("Reshape", vec![m23.clone(), ints(&[4])], attrs! {}, "6 values"),
        ("Reshape", vec![m23.clone(), ints(&[-1, -1])], attrs! {}, "only one input size may be -1"),
        ("Reshape", vec![m23.clone(), ints(&[4, -1])], attrs! {}, "multiple of 4"),
        ("Transpose", vec![m23.clone(), ints(&[0, 0])], attrs! {}, "not a valid permutation"),
        ("Transpose", vec![m23.clone(), ints(&[0])], attrs! {}, "vector of size 2"),
        ("Slice", vec![m23.clone(), ints(&[1, 0]), ints(&[2, 1])], attrs! {}, "Expected begin[0]"),
        ("Slice", vec![m23.clone(), ints(&[0]), ints(&[1])], attrs! {}, "size 2"),
        ("Squeeze", vec![m23.clone()], attrs! { "squeeze_dims" => vec![1i64] }, "Can not squeeze dim[1]"),
        ("ExpandDims", vec![m23.clone(), scalar_i32(4)], attrs! {}, "out of range"),
        (
            "ConcatV2",
            vec![m23.clone(), f(&[0.0; 4], &[2, 2]), scalar_i32(0)],
            attrs! {},
            "Dimensions of inputs should match",
        ),
        ("ConcatV2", vec![m23.clone(), m23.clone(), scalar_i32(2)], attrs! {}, "out of range"),
        ("Sum", vec![m23.clone(), ints(&[2])], attrs! {}, "axis 2 is out of range"),
        ("Mean", vec![m23.clone(), ints(&[-3])], attrs! {}, "out of range"),
        ("ArgMax", vec![m23.clone(), scalar_i32(2)], attrs! {}, "out of range"),
        ("Tile", vec![m23.clone(), ints(&[2])], attrs! {}, "length 2"),
        ("Tile", vec![m23.clone(), ints(&[2, -1])], attrs! {}, "non-negative"),
        ("Fill", vec![ints(&[2, -3]), f(&[1.0], &[])], attrs! {}, "negative dimension"),
        ("SoftmaxCrossEntropyWithLogits", vec![m23.clone(), f(&[0.0; 4], &[2, 2])], attrs! {}, "same size"),
        (
            "SparseSoftmaxCrossEntropyWithLogits",
            vec![m23.clone(), ints(&[0, 3])],
            attrs! {},
            "label value of 3",
        ),
        (
            "SparseSoftmaxCrossEntropyWithLogits",
            vec![m23.clone(), ints64(&[-1, 0])],
            attrs! {},
            "label value of -1",
        ),
        ("SparseSoftmaxCrossEntropyWithLogits", vec![m23.clone(), ints(&[0])], attrs! {}, "batch size"),
        ("Softmax", vec![f(&[1.0], &[])], attrs! {}, ">= 1 dimension"),
        ("BiasAdd", vec![m23.clone(), f(&[0.0; 2], &[2])], attrs! {}, "as many biases"),
        ("BiasAddGrad", vec![f(&[1.0], &[])], attrs! {}, "at least 1D"),
        ("ReluGrad", vec![m23.clone(), f(&[0.0; 3], &[3])], attrs! {}, "one dtype and shape"),
        ("AddN", vec![m23.clone(), f(&[0.0; 3], &[3])], attrs! {}, "one dtype and shape"),
        ("BroadcastGradientArgs", vec![ints(&[2, 3]), ints(&[4])], attrs! {}, "Incompatible shapes"),
        ("SumToShape", vec![m23.clone(), ints(&[2])], attrs! {}, "cannot sum"),
        ("SumToShape", vec![f(&[0.0; 3], &[3]), ints(&[2, 3])], attrs! {}, "cannot sum"),
    ];
    for (op, inputs, attrs, msg) in cases {
        match eval(op, &inputs, attrs) {
            Ok(v) => panic!("{op} on {inputs:?}: expected an error containing {msg:?}, got {v:?}"),
            Err(e) => {
                assert_eq!(e.code, Code::InvalidArgument, "{op}: {e}");
                assert!(e.msg.contains(msg), "{op}: {e} should contain {msg:?}");
                assert!(e.msg.contains("node"), "{op}: {e} should name the node");
            }
        }
    }
}

#[test]
fn every_op_has_a_cpu_kernel() {
    let rt = cpu_runtime();
    let missing: Vec<&str> =
        ops::OPS.iter().map(|o| o.name).filter(|&n| !rt.kernels.has_op(n, "CPU")).collect();
    assert!(missing.is_empty(), "ops without a CPU kernel: {missing:?}");
}
