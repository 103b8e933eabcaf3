//! Each gradient function against central differences: one row per op, random inputs, the
//! scalar `sum(f(x) * w)` for a random `w` so every element of the Jacobian is exercised.

use rill_graph::*;
use rill_train::{gradients, standard_runtime};

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + (hi - lo) * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// Input range: anywhere, or positive (for logs, roots, divisors and powers).
const ANY: (f64, f64) = (-2.0, 2.0);
const POS: (f64, f64) = (0.5, 2.0);

type Build = fn(&Graph, &[Output]) -> Output;

fn tensor_of(dtype: DType, dims: &[usize], v: &[f64]) -> Tensor {
    let shape = Shape::new(dims).unwrap();
    match dtype {
        DType::F32 => Tensor::new(shape, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()).unwrap(),
        _ => Tensor::new(shape, v).unwrap(),
    }
}

/// Checks the gradients of `build` with respect to each input (dims, range) against central
/// differences, in `dtype` (f64: tight; f32: loose).
fn check(name: &str, dtype: DType, inputs: &[(&[usize], (f64, f64))], build: Build) {
    let g = Graph::new();
    let seed =
        name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut rng = Rng(seed | 1);
    let xs: Vec<Output> = inputs
        .iter()
        .enumerate()
        .map(|(i, (d, _))| g.placeholder(&format!("x{i}"), dtype, PartialShape::known(d)))
        .collect();
    let y = build(&g, &xs);
    let y = if g.dtype(y) == DType::F64 { y } else { g.cast(y, DType::F64) };
    let ydims =
        g.shape(y).to_shape().unwrap_or_else(|| panic!("{name}: output shape {} not static", g.shape(y)));
    let n: usize = ydims.num_elements();
    let w: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let wt = g.constant(tensor_of(DType::F64, ydims.dims(), &w));
    let loss = g.reduce_sum(g.mul(y, wt), &[], false);
    let grads = gradients(&g, &[loss], &xs, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    let grads: Vec<Output> = grads
        .iter()
        .enumerate()
        .map(|(i, gr)| gr.unwrap_or_else(|| panic!("{name}: no gradient for x{i}")))
        .collect();
    let sess = DirectSession::new(&g, &standard_runtime(), SessionOptions::default()).unwrap();
    let values: Vec<Vec<f64>> = inputs
        .iter()
        .map(|(d, (lo, hi))| (0..d.iter().product::<usize>()).map(|_| rng.uniform(*lo, *hi)).collect())
        .collect();
    let run = |vals: &[Vec<f64>], fetch: &[Output]| -> Vec<Tensor> {
        let feeds: Vec<(Output, Tensor)> =
            xs.iter().zip(inputs).zip(vals).map(|((x, (d, _)), v)| (*x, tensor_of(dtype, d, v))).collect();
        sess.run(&feeds, fetch, &[], &RunOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let analytic: Vec<Vec<f64>> = run(&values, &grads).iter().map(|t| t.to_f64_vec().unwrap()).collect();
    let (eps, tol) = if dtype == DType::F64 { (1e-6, 1e-6) } else { (1e-2, 2e-2) };
    let rounded = |v: f64| if dtype == DType::F32 { v as f32 as f64 } else { v };
    for (i, x) in values.iter().enumerate() {
        assert_eq!(analytic[i].len(), x.len(), "{name}: gradient {i} has the wrong size");
        for j in 0..x.len() {
            let mut plus = values.clone();
            let mut minus = values.clone();
            plus[i][j] = rounded(x[j] + eps);
            minus[i][j] = rounded(x[j] - eps);
            let lp = run(&plus, &[loss])[0].scalar_value::<f64>().unwrap();
            let lm = run(&minus, &[loss])[0].scalar_value::<f64>().unwrap();
            let numeric = (lp - lm) / (plus[i][j] - minus[i][j]);
            let a = analytic[i][j];
            assert!(
                (a - numeric).abs() <= tol * numeric.abs().max(1.0),
                "{name}: d/dx{i}[{j}] analytic {a} numeric {numeric}"
            );
        }
    }
}

const F64: DType = DType::F64;

#[test]
fn elementwise() {
    check("Identity", F64, &[(&[2, 3], ANY)], |g, x| g.identity(x[0]));
    check("Add broadcast", F64, &[(&[2, 3], ANY), (&[3], ANY)], |g, x| g.add(x[0], x[1]));
    check("AddV2 column", F64, &[(&[2, 3], ANY), (&[2, 1], ANY)], |g, x| {
        g.custom(ops::core_op("AddV2"), "", &[x[0], x[1]], attrs! {})
    });
    check("Sub scalar", F64, &[(&[2, 3], ANY), (&[], ANY)], |g, x| g.sub(x[0], x[1]));
    check("Mul broadcast", F64, &[(&[2, 3], ANY), (&[1, 3], ANY)], |g, x| g.mul(x[0], x[1]));
    check("Div broadcast", F64, &[(&[2, 3], ANY), (&[3], POS)], |g, x| g.div(x[0], x[1]));
    check("RealDiv", F64, &[(&[3], ANY), (&[3], POS)], |g, x| {
        g.custom(ops::core_op("RealDiv"), "", &[x[0], x[1]], attrs! {})
    });
    check("Pow", F64, &[(&[2, 3], POS), (&[2, 3], ANY)], |g, x| g.pow(x[0], x[1]));
    check("Maximum", F64, &[(&[2, 3], ANY), (&[2, 3], ANY)], |g, x| g.maximum(x[0], x[1]));
    check("Minimum broadcast", F64, &[(&[2, 3], ANY), (&[3], ANY)], |g, x| g.minimum(x[0], x[1]));
    check("SquaredDifference", F64, &[(&[2, 3], ANY), (&[3], ANY)], |g, x| g.squared_difference(x[0], x[1]));
    check("Neg", F64, &[(&[4], ANY)], |g, x| g.neg(x[0]));
    check("Abs", F64, &[(&[4], ANY)], |g, x| g.abs(x[0]));
    check("Square", F64, &[(&[4], ANY)], |g, x| g.square(x[0]));
    check("Sqrt", F64, &[(&[4], POS)], |g, x| g.sqrt(x[0]));
    check("Rsqrt", F64, &[(&[4], POS)], |g, x| g.rsqrt(x[0]));
    check("Reciprocal", F64, &[(&[4], POS)], |g, x| g.reciprocal(x[0]));
    check("Exp", F64, &[(&[4], ANY)], |g, x| g.exp(x[0]));
    check("Log", F64, &[(&[4], POS)], |g, x| g.log(x[0]));
    check("Relu", F64, &[(&[2, 4], ANY)], |g, x| g.relu(x[0]));
    check("Sigmoid", F64, &[(&[2, 4], ANY)], |g, x| g.sigmoid(x[0]));
    check("Tanh", F64, &[(&[2, 4], ANY)], |g, x| g.tanh(x[0]));
    check("AddN", F64, &[(&[2, 2], ANY), (&[2, 2], ANY), (&[2, 2], ANY)], |g, x| g.add_n(x));
    check("Cast f32 to f64", DType::F32, &[(&[3], ANY)], |g, x| g.cast(x[0], DType::F64));
    check("one input used twice", F64, &[(&[3], ANY)], |g, x| g.add(g.mul(x[0], x[0]), g.exp(x[0])));
    check("f32 chain", DType::F32, &[(&[2, 3], ANY), (&[3, 2], ANY)], |g, x| g.tanh(g.matmul(x[0], x[1])));
}

#[test]
fn matmul_and_nn() {
    check("MatMul", F64, &[(&[2, 3], ANY), (&[3, 4], ANY)], |g, x| g.matmul_t(x[0], x[1], false, false));
    check("MatMul bᵀ", F64, &[(&[2, 3], ANY), (&[4, 3], ANY)], |g, x| g.matmul_t(x[0], x[1], false, true));
    check("MatMul aᵀ", F64, &[(&[3, 2], ANY), (&[3, 4], ANY)], |g, x| g.matmul_t(x[0], x[1], true, false));
    check("MatMul aᵀbᵀ", F64, &[(&[3, 2], ANY), (&[4, 3], ANY)], |g, x| {
        g.matmul_t(x[0], x[1], true, true)
    });
    check("BiasAdd", F64, &[(&[2, 3], ANY), (&[3], ANY)], |g, x| g.bias_add(x[0], x[1]));
    check("Softmax", F64, &[(&[2, 4], ANY)], |g, x| g.softmax(x[0]));
    check("LogSoftmax", F64, &[(&[2, 4], ANY)], |g, x| g.log_softmax(x[0]));
    check("SoftmaxCrossEntropyWithLogits", F64, &[(&[2, 4], ANY), (&[2, 4], POS)], |g, x| {
        // TensorFlow's gradient assumes each row of labels is a distribution.
        let labels = g.div(x[1], g.reduce_sum(x[1], &[-1], true));
        g.softmax_cross_entropy_with_logits(x[0], labels).0
    });
    check("SparseSoftmaxCrossEntropyWithLogits", F64, &[(&[3, 4], ANY)], |g, x| {
        let labels = g.constant(Tensor::vector(&[1i32, 3, 0]));
        g.sparse_softmax_cross_entropy_with_logits(x[0], labels).0
    });
}

#[test]
fn conv_and_pool() {
    let f = [3, 3, 2, 3];
    check("Conv2D SAME", F64, &[(&[1, 5, 5, 2], ANY), (&f, ANY)], |g, x| {
        g.conv2d(x[0], x[1], [1, 1], "SAME")
    });
    check("Conv2D VALID", F64, &[(&[1, 5, 5, 2], ANY), (&f, ANY)], |g, x| {
        g.conv2d(x[0], x[1], [1, 1], "VALID")
    });
    check("Conv2D SAME stride 2", F64, &[(&[2, 5, 4, 2], ANY), (&f, ANY)], |g, x| {
        g.conv2d(x[0], x[1], [2, 2], "SAME")
    });
    check("Conv2D VALID stride 2", F64, &[(&[1, 6, 5, 2], ANY), (&f, ANY)], |g, x| {
        g.conv2d(x[0], x[1], [2, 2], "VALID")
    });
    // Random inputs have no ties, so the maximum of each window is differentiable.
    check("MaxPool SAME", F64, &[(&[1, 5, 5, 2], ANY)], |g, x| g.max_pool(x[0], [3, 3], [1, 1], "SAME"));
    check("MaxPool VALID stride 2", F64, &[(&[2, 5, 5, 2], ANY)], |g, x| {
        g.max_pool(x[0], [2, 2], [2, 2], "VALID")
    });
    check("MaxPool SAME stride 2", F64, &[(&[1, 5, 6, 3], ANY)], |g, x| {
        g.max_pool(x[0], [3, 2], [2, 2], "SAME")
    });
    check("conv, relu, pool", F64, &[(&[1, 5, 5, 2], ANY), (&f, ANY)], |g, x| {
        g.max_pool(g.relu(g.conv2d(x[0], x[1], [1, 1], "SAME")), [2, 2], [2, 2], "SAME")
    });
}

#[test]
fn reductions_and_shapes() {
    check("Sum axis 0", F64, &[(&[2, 3], ANY)], |g, x| g.reduce_sum(x[0], &[0], false));
    check("Sum all", F64, &[(&[2, 3], ANY)], |g, x| g.reduce_sum(x[0], &[], false));
    check("Sum keep_dims", F64, &[(&[2, 3, 2], ANY)], |g, x| g.reduce_sum(x[0], &[0, 2], true));
    check("Mean axis -1", F64, &[(&[2, 3], ANY)], |g, x| g.reduce_mean(x[0], &[-1], false));
    check("Mean all", F64, &[(&[2, 3], ANY)], |g, x| g.reduce_mean(x[0], &[], false));
    check("Max axis 1", F64, &[(&[3, 4], ANY)], |g, x| g.reduce_max(x[0], &[1], false));
    check("Min all", F64, &[(&[3, 2], ANY)], |g, x| g.reduce_min(x[0], &[], false));
    check("Reshape", F64, &[(&[2, 3], ANY)], |g, x| g.reshape(x[0], &[3, -1]));
    check("Transpose", F64, &[(&[2, 3, 4], ANY)], |g, x| g.transpose(x[0], &[2, 0, 1]));
    check("ExpandDims", F64, &[(&[2, 3], ANY)], |g, x| g.expand_dims(x[0], 1));
    check("Squeeze", F64, &[(&[2, 1, 3], ANY)], |g, x| g.squeeze(x[0], &[1]));
    check("ConcatV2", F64, &[(&[2, 3], ANY), (&[2, 1], ANY)], |g, x| g.concat(&[x[0], x[1]], 1));
    check("Slice", F64, &[(&[3, 4], ANY)], |g, x| g.slice(x[0], &[1, 1], &[2, 2]));
    check("Gather", F64, &[(&[4, 2], ANY)], |g, x| {
        let idx = g.constant(Tensor::vector(&[2i32, 0, 2]));
        g.gather(x[0], idx)
    });
    check("Tile", F64, &[(&[2, 3], ANY)], |g, x| g.tile(x[0], &[2, 1]));
    check("Fill", F64, &[(&[], ANY)], |g, x| g.fill_dynamic(g.ints(&[2, 3]), x[0]));
}

/// Runs `fetches` of a fresh session over `g`.
fn eval(g: &Graph, fetches: &[Output]) -> Vec<Vec<f64>> {
    let sess = DirectSession::new(g, &standard_runtime(), SessionOptions::default()).unwrap();
    let init = g.global_variables_initializer();
    sess.extend(g).unwrap();
    sess.run(&[], &[], &[init], &RunOptions::default()).unwrap();
    let out = sess.run(&[], fetches, &[], &RunOptions::default()).unwrap();
    out.iter().map(|t| t.to_f64_vec().unwrap()).collect()
}

#[test]
fn structure() {
    let g = Graph::new();
    let w = g.variable("w", g.constant(Tensor::vector(&[1f32, 2.0])));
    let u = g.variable("u", g.constant(Tensor::vector(&[3f32, 4.0])));
    let y = g.reduce_sum(g.add(g.mul(w, w), g.stop_gradient(g.mul(w, u))), &[], false);
    let seed = g.scalar(2f32);
    let grads = gradients(&g, &[y], &[w, u], Some(&[seed])).unwrap();
    assert!(grads[1].is_none(), "a stop_gradient path gives u no gradient");
    let dw = grads[0].expect("w has a gradient");
    assert_eq!(eval(&g, &[dw]), vec![vec![4.0, 8.0]], "2 · 2w through the variable");
    let name = g.node_name(dw.node);
    assert!(name.starts_with("gradients/"), "gradient ops live under gradients/: {name}");
    assert_eq!(g.node(dw.node).colocation_names(), vec!["w"], "the sum of w's gradients lives with w");

    let unrelated = g.placeholder("z", DType::F32, PartialShape::scalar());
    let r = gradients(&g, &[y], &[unrelated], None).unwrap();
    assert!(r[0].is_none(), "y does not depend on z");
    let t = g.custom(ops::core_op("Prod"), "", &[w, g.ints(&[0])], attrs! { "keep_dims" => false });
    let e = gradients(&g, &[t], &[w], None).unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e}");
    assert!(e.msg.contains("Prod"), "{e}");
}
