//! Optimizers and their kernels: each update over a few steps against TensorFlow's formulas
//! computed by hand here, slot variables, the global step, and kernel argument checks.

use rill_graph::*;
use rill_train::*;

const W0: [f64; 3] = [1.0, -2.0, 0.5];
const GRADS: [[f64; 3]; 3] = [[0.1, -0.2, 0.3], [0.4, 0.0, -0.5], [-0.3, 0.2, 0.1]];

fn session(g: &Graph, rt: &Runtime) -> DirectSession {
    DirectSession::new(g, rt, SessionOptions::default()).unwrap()
}

fn run(
    sess: &DirectSession,
    feeds: &[(Output, Tensor)],
    fetches: &[Output],
    targets: &[Output],
) -> Vec<Tensor> {
    sess.run(feeds, fetches, targets, &RunOptions::default()).unwrap()
}

/// Reference state of one element across steps: the variable and two slots.
#[derive(Clone, Copy)]
struct Ref {
    w: f64,
    s0: f64,
    s1: f64,
}

type Reference = fn(&mut Ref, f64, usize);

fn sgd_ref(r: &mut Ref, g: f64, _: usize) {
    r.w -= 0.1 * g;
}

fn momentum_ref(r: &mut Ref, g: f64, _: usize) {
    r.s0 = r.s0 * 0.9 + g;
    r.w -= 0.1 * r.s0;
}

fn nesterov_ref(r: &mut Ref, g: f64, _: usize) {
    r.s0 = r.s0 * 0.9 + g;
    r.w -= g * 0.1 + r.s0 * 0.9 * 0.1;
}

fn adam_ref(r: &mut Ref, g: f64, step: usize) {
    let (b1, b2, eps, lr) = (0.9f64, 0.999f64, 1e-8, 0.1);
    let (b1p, b2p) = (b1.powi(step as i32 + 1), b2.powi(step as i32 + 1));
    let alpha = lr * (1.0 - b2p).sqrt() / (1.0 - b1p);
    r.s0 += (g - r.s0) * (1.0 - b1);
    r.s1 += (g * g - r.s1) * (1.0 - b2);
    r.w -= r.s0 * alpha / (r.s1.sqrt() + eps);
}

fn rmsprop_ref(r: &mut Ref, g: f64, step: usize) {
    if step == 0 {
        r.s0 = 1.0;
    }
    let (lr, rho, mom, eps) = (0.1, 0.9, 0.5, 1e-10);
    r.s0 += (g * g - r.s0) * (1.0 - rho);
    r.s1 = r.s1 * mom + lr * g / (r.s0 + eps).sqrt();
    r.w -= r.s1;
}

/// Applies `GRADS` through `opt` to an f64 variable and compares with `reference` after each
/// step; checks the slot names and that the global step counted every step.
fn check(name: &str, opt: &dyn Optimizer, reference: Reference, slots: &[&str]) {
    let rt = standard_runtime();
    let g = Graph::new();
    let w = g.variable("w", g.constant(Tensor::vector(&W0)));
    let grad = g.placeholder("grad", DType::F64, PartialShape::known(&[3]));
    let step = create_global_step(&g).unwrap();
    let wi = g.variable_of(w).unwrap();
    let train = opt.apply_gradients(&g, &[(Some(grad), wi)], Some(step), "train").unwrap();
    for s in slots {
        let v = g.variable_info(s).unwrap_or_else(|| panic!("{name}: no slot {s}"));
        assert!(!v.trainable && v.global, "{name}: slot {s} is global and not trainable");
        assert_eq!(g.node(v.var.node).colocation_names(), vec!["w"], "{name}: slot {s} lives with w");
    }
    let init = g.global_variables_initializer();
    let (read_w, read_step) = (g.identity(w), g.identity(step));
    let sess = session(&g, &rt);
    run(&sess, &[], &[], &[init]);
    let mut refs: Vec<Ref> = W0.iter().map(|&w| Ref { w, s0: 0.0, s1: 0.0 }).collect();
    for (k, gr) in GRADS.iter().enumerate() {
        run(&sess, &[(grad, Tensor::vector(gr))], &[], &[train]);
        for (r, &x) in refs.iter_mut().zip(gr) {
            reference(r, x, k);
        }
        let got = run(&sess, &[], &[read_w], &[]);
        let got = got[0].to_vec::<f64>().unwrap();
        for (i, (a, r)) in got.iter().zip(&refs).enumerate() {
            assert!(
                (a - r.w).abs() <= 1e-12 * r.w.abs().max(1.0),
                "{name}: step {k} w[{i}] = {a}, want {}",
                r.w
            );
        }
    }
    let s = run(&sess, &[], &[read_step], &[]);
    assert_eq!(s[0].scalar_value::<i64>().unwrap(), GRADS.len() as i64, "{name}: global step");
}

#[test]
fn updates_match_tensorflow() {
    check("GradientDescent", &GradientDescent::new(0.1), sgd_ref, &[]);
    check("Momentum", &Momentum::new(0.1, 0.9), momentum_ref, &["w/Momentum"]);
    let nesterov = Momentum { use_nesterov: true, ..Momentum::new(0.1, 0.9) };
    check("Momentum Nesterov", &nesterov, nesterov_ref, &["w/Momentum"]);
    check("Adam", &Adam::new(0.1), adam_ref, &["w/Adam", "w/Adam_1", "beta1_power", "beta2_power"]);
    let rms = RMSProp { momentum: 0.5, ..RMSProp::new(0.1) };
    check("RMSProp", &rms, rmsprop_ref, &["w/RMSProp", "w/RMSProp_1"]);
}

/// `ApplyGradientDescent` on an f32 variable fed a gradient of `grad_shape`.
fn apply_sgd_f32(rt: &Runtime, grad_shape: &[usize]) -> Result<Vec<f32>> {
    let g = Graph::new();
    let opts = VariableOptions { validate_shape: false, ..Default::default() };
    let w = g.variable_with("w", g.constant(Tensor::vector(&[1f32, 2.0])), opts);
    let grad = g.placeholder("grad", DType::F32, PartialShape::unknown());
    let lr = g.placeholder("lr", DType::F32, PartialShape::unknown());
    let op = ops::core_op("ApplyGradientDescent");
    let apply = g.custom(op, "apply", &[w, lr, grad], attrs! {});
    let init = g.global_variables_initializer();
    let sess = session(&g, rt);
    run(&sess, &[], &[], &[init]);
    let n: usize = grad_shape.iter().product();
    let gv = Tensor::new(Shape::new(grad_shape)?, &vec![1f32; n])?;
    let out = sess.run(&[(grad, gv), (lr, Tensor::scalar(0.5f32))], &[apply], &[], &RunOptions::default())?;
    out[0].to_vec::<f32>()
}

#[test]
fn kernel_checks_shapes() {
    let rt = standard_runtime();
    assert_eq!(apply_sgd_f32(&rt, &[2]).unwrap(), vec![0.5, 1.5]);
    for (bad, shown) in [(&[3usize][..], "[3]"), (&[2, 1], "[2,1]")] {
        let e = apply_sgd_f32(&rt, bad).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{e}");
        assert!(
            e.msg.contains("node 'apply'") && e.msg.contains("w of float32") && e.msg.contains(shown),
            "{e}"
        );
    }
}

#[test]
fn minimize_and_decay() {
    // minimize(x²) from 3 with lr 0.25 halves x each step.
    let g = Graph::new();
    let x = g.variable("x", g.scalar(3f32));
    let step = create_global_step(&g).unwrap();
    assert_eq!(create_global_step(&g).unwrap_err().code, Code::AlreadyExists);
    let lr = exponential_decay(&g, 0.25, step, 2, 0.5, true);
    let train = GradientDescent::new(lr).minimize(&g, g.square(x), Some(step)).unwrap();
    let init = g.global_variables_initializer();
    let read_x = g.identity(x);
    let sess = session(&g, &standard_runtime());
    run(&sess, &[], &[], &[init]);
    let mut want = 3f32;
    for k in 0..4 {
        let rate = 0.25 * 0.5f32.powi(k / 2);
        let got = run(&sess, &[], &[lr], &[])[0].scalar_value::<f32>().unwrap();
        assert_eq!(got, rate, "staircase rate at step {k}");
        run(&sess, &[], &[], &[train]);
        want -= rate * 2.0 * want;
        let got = run(&sess, &[], &[read_x], &[])[0].scalar_value::<f32>().unwrap();
        assert!((got - want).abs() < 1e-6, "step {k}: x = {got}, want {want}");
    }
}

#[test]
fn kernel_refuses_a_variable_as_its_own_slot() {
    let g = Graph::new();
    let w = g.variable("w", g.scalar(1f32));
    let (lr, grad, m) = (g.scalar(0.1f32), g.scalar(1f32), g.scalar(0.9f32));
    let apply = g.custom(ops::core_op("ApplyMomentum"), "apply", &[w, w, lr, grad, m], attrs! {});
    let init = g.global_variables_initializer();
    let sess = session(&g, &standard_runtime());
    run(&sess, &[], &[], &[init]);
    let e = sess.run(&[], &[apply], &[], &RunOptions::default()).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert!(e.msg.contains("variable w is passed as both"), "{e}");
}

#[test]
fn updates_wait_for_every_gradient_of_the_step() {
    // loss = w2 · (w1 · x): dL/dw1 = w2 · x needs w2 as it was before this step's update.
    for _ in 0..20 {
        let g = Graph::new();
        let w1 = g.variable("w1", g.scalar(2f32));
        let w2 = g.variable("w2", g.scalar(3f32));
        let loss = g.mul(w2, g.mul(w1, g.scalar(1f32)));
        let train = GradientDescent::new(1.0).minimize(&g, loss, None).unwrap();
        let init = g.global_variables_initializer();
        let (r1, r2) = (g.identity(w1), g.identity(w2));
        let sess = session(&g, &standard_runtime());
        run(&sess, &[], &[], &[init]);
        run(&sess, &[], &[], &[train]);
        let got: Vec<f32> =
            run(&sess, &[], &[r1, r2], &[]).iter().map(|t| t.scalar_value::<f32>().unwrap()).collect();
        assert_eq!(got, vec![2.0 - 3.0, 3.0 - 2.0]);
    }
}
