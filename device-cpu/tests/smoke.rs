//! Smoke test of a local session with system kernels only.
use rill_device_cpu::cpu_runtime;
use rill_graph::*;

#[test]
fn variable_assign_and_fetch() {
    let g = Graph::new();
    let init = g.constant(Tensor::vector(&[1f32, 2.0, 3.0]));
    let v = g.variable("v", init);
    let id = g.identity(v);
    let rt = cpu_runtime();
    let sess = DirectSession::new(&g, &rt, SessionOptions::default()).unwrap();
    let e = sess.run(&[], &[id], &[], &RunOptions::default()).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");
    assert!(e.msg.contains("uninitialized value v"), "{e}");
    let initop = g.global_variables_initializer();
    sess.extend(&g).unwrap();
    sess.run(&[], &[], &[initop], &RunOptions::default()).unwrap();
    let out = sess.run(&[], &[id], &[], &RunOptions::default()).unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
    let x = g.placeholder("x", DType::F32, [Some(3)]);
    let upd = g.assign_add(v, x);
    sess.extend(&g).unwrap();
    let out =
        sess.run(&[(x, Tensor::vector(&[1f32, 1.0, 1.0]))], &[upd], &[], &RunOptions::default()).unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![2.0, 3.0, 4.0]);
}
