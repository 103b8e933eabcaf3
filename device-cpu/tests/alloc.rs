//! The CPU device's caching allocator: which requests reuse a buffer, the byte cap, buffers
//! dropped on other threads, and kernels writing correct results into recycled bytes.

use rill_device_cpu::alloc::{PoolStats, POOL_MAX_BYTES, POOL_MIN_BYTES};
use rill_device_cpu::{cpu_runtime, BufferPool};
use rill_graph::*;

const MIB: usize = 1 << 20;

fn f32s(bytes: usize) -> Shape {
    Shape::vector(bytes / 4)
}

fn addr(t: &Tensor) -> usize {
    t.as_bytes().unwrap().as_ptr() as usize
}

#[test]
fn a_dropped_buffer_serves_a_request_of_about_its_size() {
    // (first request, second request, reused)
    let cases = [
        (4 * MIB, 4 * MIB, true),
        (4 * MIB, 4 * MIB - 64 * 1024, true),
        (4 * MIB, 2 * MIB, false),
        (4 * MIB, 5 * MIB, false),
        (POOL_MIN_BYTES / 2, POOL_MIN_BYTES / 2, false),
    ];
    for (first, second, reused) in cases {
        let pool = BufferPool::new(POOL_MAX_BYTES);
        let t = pool.allocate(DType::F32, f32s(first)).unwrap();
        let at = addr(&t);
        drop(t);
        let u = pool.allocate(DType::F32, f32s(second)).unwrap();
        // A miss may still land at the same address (the system allocator reuses freed memory).
        if reused {
            assert_eq!(addr(&u), at, "{first} then {second} bytes");
        }
        assert_eq!(u.as_bytes().unwrap().len(), second / 4 * 4);
        assert_eq!(pool.stats().hits, u64::from(reused), "{first} then {second} bytes");
    }
}

#[test]
fn the_pool_keeps_at_most_its_cap() {
    // (cap, buffers of 3 MiB dropped, buffers kept)
    for (cap, dropped, kept) in [(10 * MIB, 4, 3), (2 * MIB, 2, 0), (POOL_MAX_BYTES, 5, 5)] {
        let pool = BufferPool::new(cap);
        let ts: Vec<Tensor> =
            (0..dropped).map(|_| pool.allocate(DType::F32, f32s(3 * MIB)).unwrap()).collect();
        drop(ts);
        let s = pool.stats();
        assert!(s.cached_bytes <= cap, "cap {cap}: {s:?}");
        assert_eq!(s.cached_buffers, kept, "cap {cap}: {s:?}");
    }
}

#[test]
fn buffers_dropped_on_another_thread_come_back() {
    let pool = BufferPool::new(POOL_MAX_BYTES);
    let ts: Vec<Tensor> =
        (0..3).map(|_| pool.allocate(DType::I64, Shape::matrix(512, 512)).unwrap()).collect();
    let mut addrs: Vec<usize> = ts.iter().map(addr).collect();
    std::thread::spawn(move || drop(ts)).join().unwrap();
    assert_eq!(pool.stats().cached_buffers, 3);
    let again: Vec<Tensor> =
        (0..3).map(|_| pool.allocate(DType::F64, Shape::matrix(256, 1024)).unwrap()).collect();
    let mut got: Vec<usize> = again.iter().map(addr).collect();
    addrs.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, addrs);
    assert_eq!(pool.stats(), PoolStats { hits: 3, misses: 3, cached_bytes: 0, cached_buffers: 0 });
}

/// Runs `fetch` with `feeds` and returns its value as f64s.
fn run(s: &DirectSession, feeds: &[(Output, Tensor)], fetch: Output) -> Vec<f64> {
    s.run(feeds, &[fetch], &[], &RunOptions::default()).unwrap()[0].to_f64_vec().unwrap()
}

#[test]
fn kernels_overwrite_recycled_buffers_of_other_dtypes_and_shapes() {
    // Each step's 2 MiB output goes back to the pool and is handed to the next step's kernel,
    // full of the previous values (NaN first), under another dtype and shape.
    let g = Graph::new();
    let x = g.placeholder("x", DType::F32, PartialShape::unknown());
    let a = g.placeholder("a", DType::F32, PartialShape::unknown());
    let b = g.placeholder("b", DType::F32, PartialShape::unknown());
    let p = g.placeholder("p", DType::F64, PartialShape::unknown());
    let q = g.placeholder("q", DType::I32, PartialShape::unknown());
    let neg = g.neg(x);
    let mm = g.matmul(a, b);
    let add = g.add(p, p);
    let square = g.square(q);
    let s = DirectSession::new(&g, &cpu_runtime(), SessionOptions::default()).unwrap();
    let nan = Tensor::new(Shape::vector(MIB / 2), &vec![f32::NAN; MIB / 2]).unwrap();
    assert!(run(&s, &[(x, nan)], neg).iter().all(|v| v.is_nan()));

    // MatMul with depth 0 must write zeros; then a real product.
    let empty_a = Tensor::new(Shape::matrix(512, 0), &[0f32; 0]).unwrap();
    let empty_b = Tensor::new(Shape::matrix(0, 1024), &[0f32; 0]).unwrap();
    assert!(run(&s, &[(a, empty_a), (b, empty_b)], mm).iter().all(|&v| v == 0.0));
    let (m, k, n) = (512, 3, 1024);
    let av: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
    let bv: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
    let got = run(
        &s,
        &[
            (a, Tensor::new(Shape::matrix(m, k), &av).unwrap()),
            (b, Tensor::new(Shape::matrix(k, n), &bv).unwrap()),
        ],
        mm,
    );
    for (i, row) in got.chunks_exact(n).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let want: f32 = (0..k).map(|p| av[i * k + p] * bv[p * n + j]).sum();
            assert_eq!(v, f64::from(want), "MatMul [{i}, {j}]");
        }
    }

    let pv: Vec<f64> = (0..MIB / 8).map(|i| i as f64).collect();
    let got = run(&s, &[(p, Tensor::new(Shape::matrix(256, 512), &pv).unwrap())], add);
    assert!(got.iter().zip(&pv).all(|(&g, &w)| g == 2.0 * w), "f64 Add");
    let qv: Vec<i32> = (0..MIB as i32 / 4).map(|i| i % 1000 - 500).collect();
    let got = run(&s, &[(q, Tensor::new(Shape::matrix(1024, 256), &qv).unwrap())], square);
    assert!(got.iter().zip(&qv).all(|(&g, &w)| g == f64::from(w * w)), "i32 Square");
}
