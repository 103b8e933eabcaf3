//! Conv2D, its backprops, MaxPool and MaxPoolGrad against direct loops, through a real
//! `DirectSession` on the CPU runtime: fixed and random shapes, f32 and bf16 (f64 and f16 on a
//! few), and a table of error cases.

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
    fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    /// Multiples of 1/16 in [-2, 2]: exact in bf16, and frequent ties inside pooling windows.
    fn values(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| (self.next() % 65) as f64 / 16.0 - 2.0).collect()
    }
}

fn make(dtype: DType, dims: &[usize], v: &[f64]) -> Tensor {
    let s = Shape::new(dims).unwrap();
    dispatch_float!(dtype, T => Tensor::new(s, &v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>()).unwrap(),
        _ => unreachable!("float dtypes only"))
}

fn sizes(d: &[usize]) -> Tensor {
    Tensor::vector(&d.iter().map(|&x| x as i32).collect::<Vec<_>>())
}

/// Runs one node of `op` over placeholders of unknown shape fed with `inputs`: every check is
/// left to the kernel. Three intra-op threads, so blocks are split even on a small machine.
fn eval(op: &str, inputs: &[Tensor], attrs: Attrs) -> Result<Tensor> {
    let g = Graph::new();
    let phs: Vec<Output> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| g.placeholder(&format!("in{i}"), t.dtype(), PartialShape::unknown()))
        .collect();
    let node = g.custom(core_op(op), "node", &phs, attrs);
    g.status()?;
    let feeds: Vec<(Output, Tensor)> = phs.into_iter().zip(inputs.iter().cloned()).collect();
    let opts = SessionOptions { intra_op_parallelism_threads: 3, ..Default::default() };
    let sess = DirectSession::new(&g, &cpu_runtime(), opts)?;
    Ok(sess.run(&feeds, &[node], &[], &RunOptions::default())?.remove(0))
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 1e-2,
    }
}

fn assert_close(what: &str, got: &Tensor, dims: &[usize], want: &[f64], tol: f64) {
    assert_eq!(got.shape().dims(), dims, "{what}: shape");
    let g = got.to_f64_vec().unwrap();
    for (i, (&a, &b)) in g.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what}: element {i}: got {a}, want {b}");
    }
}

fn window_attrs(window: Option<[usize; 2]>, strides: [usize; 2], padding: &str) -> Attrs {
    let s = vec![1, strides[0] as i64, strides[1] as i64, 1];
    match window {
        Some([h, w]) => {
            attrs! { "ksize" => vec![1, h as i64, w as i64, 1], "strides" => s, "padding" => padding }
        }
        None => attrs! { "strides" => s, "padding" => padding, "data_format" => "NHWC" },
    }
}

// ---- references ----

/// One case: input `[n, h, w, c]`, window `[kh, kw]`, output depth `o` (convolutions only).
#[derive(Clone, Copy, Debug)]
struct Case {
    x: [usize; 4],
    k: [usize; 2],
    o: usize,
    s: [usize; 2],
    same: bool,
}

impl Case {
    fn padding(&self) -> &'static str {
        if self.same {
            "SAME"
        } else {
            "VALID"
        }
    }
    /// Output size and padding before, per spatial dimension (TensorFlow's rules, written out).
    fn out_and_pad(&self, d: usize) -> (usize, usize) {
        let (i, k, s) = (self.x[d + 1], self.k[d], self.s[d]);
        if self.same {
            let out = i.div_ceil(s);
            (out, ((out - 1) * s + k).saturating_sub(i) / 2)
        } else {
            ((i - k) / s + 1, 0)
        }
    }
    fn y(&self, depth: usize) -> [usize; 4] {
        [self.x[0], self.out_and_pad(0).0, self.out_and_pad(1).0, depth]
    }
    fn f(&self) -> [usize; 4] {
        [self.k[0], self.k[1], self.x[3], self.o]
    }
}

/// Calls `tap(x_index, f_index, y_index)` for every product of a convolution: the direct
/// 7-deep loop every convolution reference is built on.
fn for_each_tap(c: &Case, mut tap: impl FnMut(usize, usize, usize)) {
    let ([n, h, w, ci], [kh, kw], co) = (c.x, c.k, c.o);
    let ((oh, pt), (ow, pl)) = (c.out_and_pad(0), c.out_and_pad(1));
    for b in 0..n {
        for y in 0..oh {
            for x in 0..ow {
                for o in 0..co {
                    for i in 0..kh {
                        for j in 0..kw {
                            for ch in 0..ci {
                                let (r, q) = (
                                    (y * c.s[0] + i) as isize - pt as isize,
                                    (x * c.s[1] + j) as isize - pl as isize,
                                );
                                if r < 0 || q < 0 || r >= h as isize || q >= w as isize {
                                    continue;
                                }
                                let xi = ((b * h + r as usize) * w + q as usize) * ci + ch;
                                let fi = ((i * kw + j) * ci + ch) * co + o;
                                let yi = ((b * oh + y) * ow + x) * co + o;
                                tap(xi, fi, yi);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn len(d: &[usize]) -> usize {
    d.iter().product()
}

/// For each pooling output, the input index of the first maximum of its window.
fn pool_argmax(c: &Case, x: &[f64]) -> Vec<usize> {
    let ([n, h, w, ch], [kh, kw]) = (c.x, c.k);
    let ((oh, pt), (ow, pl)) = (c.out_and_pad(0), c.out_and_pad(1));
    let mut out = Vec::new();
    for b in 0..n {
        for y in 0..oh {
            for xo in 0..ow {
                for k in 0..ch {
                    let mut best: Option<usize> = None;
                    for i in 0..kh {
                        for j in 0..kw {
                            let (r, q) = (
                                (y * c.s[0] + i) as isize - pt as isize,
                                (xo * c.s[1] + j) as isize - pl as isize,
                            );
                            if r < 0 || q < 0 || r >= h as isize || q >= w as isize {
                                continue;
                            }
                            let at = ((b * h + r as usize) * w + q as usize) * ch + k;
                            if best.is_none_or(|m| x[at] > x[m]) {
                                best = Some(at);
                            }
                        }
                    }
                    out.push(best.expect("every window holds an input"));
                }
            }
        }
    }
    out
}

// ---- checks ----

/// Runs all five ops on case `c` in `dtype` and compares each with the references.
fn check(c: &Case, dtype: DType, rng: &mut Rng) {
    let what = |op: &str| format!("{op} {c:?} {dtype}");
    let conv = window_attrs(None, c.s, c.padding());
    let (xd, fd, yd) = (c.x, c.f(), c.y(c.o));
    let (x, f, dy) = (rng.values(len(&xd)), rng.values(len(&fd)), rng.values(len(&yd)));
    let (xt, ft, dyt) = (make(dtype, &xd, &x), make(dtype, &fd, &f), make(dtype, &yd, &dy));

    let (mut y, mut dx, mut df) = (vec![0.0; len(&yd)], vec![0.0; len(&xd)], vec![0.0; len(&fd)]);
    for_each_tap(c, |xi, fi, yi| {
        y[yi] += x[xi] * f[fi];
        dx[xi] += f[fi] * dy[yi];
        df[fi] += x[xi] * dy[yi];
    });
    let run = |op: &str, inputs: &[Tensor], a: &Attrs| {
        eval(op, inputs, a.clone()).unwrap_or_else(|e| panic!("{}: {e}", what(op)))
    };
    let got = run("Conv2D", &[xt.clone(), ft.clone()], &conv);
    assert_close(&what("Conv2D"), &got, &yd, &y, tol(dtype));
    let got = run("Conv2DBackpropInput", &[sizes(&xd), ft, dyt.clone()], &conv);
    assert_close(&what("Conv2DBackpropInput"), &got, &xd, &dx, tol(dtype));
    let got = run("Conv2DBackpropFilter", &[xt.clone(), sizes(&fd), dyt], &conv);
    assert_close(&what("Conv2DBackpropFilter"), &got, &fd, &df, tol(dtype));

    let pool = window_attrs(Some(c.k), c.s, c.padding());
    let pd = c.y(c.x[3]);
    let arg = pool_argmax(c, &x);
    let want: Vec<f64> = arg.iter().map(|&i| x[i]).collect();
    let pooled = run("MaxPool", std::slice::from_ref(&xt), &pool);
    assert_close(&what("MaxPool"), &pooled, &pd, &want, 0.0);
    let grad = rng.values(len(&pd));
    let mut dxp = vec![0.0; len(&xd)];
    for (&i, &g) in arg.iter().zip(&grad) {
        dxp[i] += g;
    }
    let got = run("MaxPoolGrad", &[xt, pooled, make(dtype, &pd, &grad)], &pool);
    assert_close(&what("MaxPoolGrad"), &got, &xd, &dxp, tol(dtype));
}

const fn case(x: [usize; 4], k: [usize; 2], o: usize, s: [usize; 2], same: bool) -> Case {
    Case { x, k, o, s, same }
}

#[test]
fn fixed_shapes_match_direct_loops() {
    let cases = [
        // 1×1 windows, a plain per-pixel product
        case([1, 4, 4, 3], [1, 1], 2, [1, 1], false),
        // the gradient-table shape: SAME pads one on each side
        case([1, 5, 5, 2], [3, 3], 3, [1, 1], true),
        // SAME with stride 2 on an odd size: the extra pad goes after
        case([2, 7, 5, 3], [3, 3], 4, [2, 2], true),
        // even window under SAME: the smaller half of the padding on top/left
        case([1, 6, 6, 1], [2, 4], 3, [1, 1], true),
        // window as large as the input, VALID
        case([2, 5, 4, 2], [5, 4], 3, [1, 1], false),
        // stride larger than the window skips inputs
        case([1, 9, 8, 2], [2, 2], 3, [3, 3], false),
        // one output column, SAME
        case([3, 4, 1, 5], [3, 1], 2, [1, 1], true),
        // im2col blocks and row blocks split over threads (patch 400, 40 columns)
        case([1, 40, 40, 16], [5, 5], 9, [1, 1], true),
        case([2, 23, 31, 13], [4, 3], 17, [2, 1], true),
        // pooling windows that tile the input (2×2, stride 2), even and odd sizes, and over
        // several row blocks
        case([2, 8, 6, 3], [2, 2], 2, [2, 2], true),
        case([1, 7, 5, 2], [2, 2], 2, [2, 2], true),
        case([2, 40, 40, 16], [2, 2], 3, [2, 2], true),
        // depths from 8 up: convolutions that read patches in place (the input gradient too at
        // stride 1), with output depths around the 16-wide tile and a last tile of positions
        // that is partly empty
        case([2, 9, 7, 8], [3, 3], 20, [1, 1], true),
        case([1, 8, 10, 11], [4, 2], 8, [1, 1], false),
        case([1, 6, 7, 8], [2, 4], 12, [1, 1], true),
        case([2, 11, 9, 9], [3, 3], 10, [2, 2], true),
        case([1, 5, 5, 8], [1, 1], 33, [1, 1], true),
        case([3, 14, 14, 32], [5, 5], 16, [1, 1], true),
        // input depth in whole 16-channel tiles: the filter gradient reads pixels in place too
        case([2, 9, 8, 16], [3, 2], 7, [1, 2], false),
        case([1, 7, 6, 16], [4, 4], 13, [2, 1], true),
        // no output channels: empty outputs, a zero filter gradient
        case([1, 4, 4, 16], [3, 3], 0, [1, 1], true),
    ];
    let mut rng = Rng(0x5eed);
    for c in &cases {
        check(c, DType::F32, &mut rng);
        check(c, DType::BF16, &mut rng);
    }
    for dtype in [DType::F64, DType::F16] {
        check(&cases[2], dtype, &mut rng);
    }
}

#[test]
fn random_shapes_match_direct_loops() {
    let mut rng = Rng(0xc0ffee);
    for _ in 0..24 {
        let same = rng.int(0, 1) == 1;
        let k = [rng.int(1, 5), rng.int(1, 5)];
        let (h, w) = (rng.int(k[0], 11), rng.int(k[1], 11));
        let c = case(
            [rng.int(1, 3), h, w, rng.int(1, 12)],
            k,
            rng.int(1, 12),
            [rng.int(1, 3), rng.int(1, 3)],
            same,
        );
        let dtype = if rng.int(0, 3) == 0 { DType::BF16 } else { DType::F32 };
        check(&c, dtype, &mut rng);
    }
}

#[test]
fn errors_are_invalid_argument_and_name_the_node() {
    let f32s = |d: &[usize]| make(DType::F32, d, &vec![0.5; len(d)]);
    let conv = |s: [usize; 2], p: &str| window_attrs(None, s, p);
    let pool = |k: [usize; 2], p: &str| window_attrs(Some(k), [1, 1], p);
    let bad_strides = attrs! { "strides" => vec![1i64, 0, 1, 1], "padding" => "SAME" };
    let batch_stride = attrs! { "strides" => vec![2i64, 1, 1, 1], "padding" => "SAME" };
    let cases: Vec<(&str, Vec<Tensor>, Attrs, &str)> = vec![
        (
            "Conv2D",
            vec![f32s(&[1, 5, 5, 3]), f32s(&[3, 3, 2, 4])],
            conv([1, 1], "SAME"),
            "same depth: 3 vs 2",
        ),
        ("Conv2D", vec![f32s(&[5, 5, 3]), f32s(&[3, 3, 3, 4])], conv([1, 1], "SAME"), "4-dimensional"),
        (
            "Conv2D",
            vec![f32s(&[1, 5, 5, 3]), f32s(&[3, 3, 3, 4])],
            bad_strides,
            "strides must be [1, h, w, 1]",
        ),
        (
            "Conv2D",
            vec![f32s(&[1, 5, 5, 3]), f32s(&[3, 3, 3, 4])],
            batch_stride,
            "strides must be [1, h, w, 1]",
        ),
        (
            "Conv2D",
            vec![f32s(&[1, 2, 4, 1]), f32s(&[3, 3, 1, 1])],
            conv([1, 1], "VALID"),
            "larger than the input",
        ),
        ("Conv2D", vec![f32s(&[1, 5, 5, 1]), f32s(&[3, 3, 1, 1])], conv([1, 1], "FULL"), "SAME or VALID"),
        (
            "Conv2DBackpropInput",
            vec![sizes(&[1, 5, 5, 2]), f32s(&[3, 3, 2, 4]), f32s(&[1, 5, 5, 3])],
            conv([1, 1], "SAME"),
            "out_backprop has shape",
        ),
        (
            "Conv2DBackpropInput",
            vec![sizes(&[1, 5, 5]), f32s(&[3, 3, 2, 4]), f32s(&[1, 5, 5, 4])],
            conv([1, 1], "SAME"),
            "input_sizes must be 4",
        ),
        (
            "Conv2DBackpropFilter",
            vec![f32s(&[1, 5, 5, 2]), sizes(&[3, 3, 3, 4]), f32s(&[1, 5, 5, 4])],
            conv([1, 1], "SAME"),
            "same depth: 2 vs 3",
        ),
        (
            "Conv2DBackpropFilter",
            vec![f32s(&[1, 5, 5, 2]), sizes(&[3, 3, 2, 4]), f32s(&[1, 2, 2, 4])],
            conv([2, 2], "SAME"),
            "out_backprop has shape",
        ),
        ("MaxPool", vec![f32s(&[1, 2, 2, 1])], pool([3, 3], "VALID"), "larger than the input"),
        ("MaxPool", vec![f32s(&[2, 2, 1])], pool([1, 1], "VALID"), "4-dimensional"),
        (
            "MaxPool",
            vec![f32s(&[1, 4, 4, 1])],
            attrs! { "ksize" => vec![1i64, 2, 2, 2], "strides" => vec![1i64, 1, 1, 1], "padding" => "SAME" },
            "ksize must be [1, h, w, 1]",
        ),
        (
            "MaxPoolGrad",
            vec![f32s(&[1, 4, 4, 1]), f32s(&[1, 4, 4, 1]), f32s(&[1, 3, 3, 1])],
            pool([2, 2], "SAME"),
            "grad has shape",
        ),
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
fn max_pool_keeps_infinities_and_routes_ties_to_the_first() {
    // Two 2×2 windows, one channel: one all -inf, one with three tied maxima (the first wins).
    let inf = f64::NEG_INFINITY;
    let x = [inf, inf, 1.0, 1.0, inf, inf, 1.0, 0.0];
    let xt = make(DType::F32, &[1, 2, 4, 1], &x);
    let attrs = window_attrs(Some([2, 2]), [2, 2], "SAME");
    let y = eval("MaxPool", std::slice::from_ref(&xt), attrs.clone()).unwrap();
    assert_eq!(y.to_f64_vec().unwrap(), vec![f64::NEG_INFINITY, 1.0]);
    let dy = make(DType::F32, &[1, 1, 2, 1], &[5.0, 7.0]);
    let dx = eval("MaxPoolGrad", &[xt, y, dy], attrs).unwrap();
    // The -inf window routes to its first element; the tie to the first 1.0.
    assert_eq!(dx.to_f64_vec().unwrap(), vec![5.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}
