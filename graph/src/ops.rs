//! The core ops of the graph crate (`OPS`): their dtype and shape inference.
//! Kernels live with the devices; the system ones (`_Send`, `_Arg`, variables...) in `kernels`.

use crate::op::{InferCtx, OpDef, TensorInfo};
use crate::{AttrsExt, DType, Error, PartialShape, Result};

fn ti(d: DType, s: PartialShape) -> TensorInfo {
    TensorInfo::new(d, s)
}

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid_argument(msg)
}

/// NumPy-style broadcasting of two partial shapes.
pub fn broadcast_shapes(a: &PartialShape, b: &PartialShape) -> Result<PartialShape> {
    let (Some(x), Some(y)) = (&a.dims, &b.dims) else {
        return Ok(PartialShape::unknown());
    };
    let n = x.len().max(y.len());
    let mut out = vec![None; n];
    for i in 0..n {
        let dx = if i < n - x.len() { Some(1) } else { x[i - (n - x.len())] };
        let dy = if i < n - y.len() { Some(1) } else { y[i - (n - y.len())] };
        out[i] = match (dx, dy) {
            (Some(1), d) | (d, Some(1)) => d,
            (Some(p), Some(q)) if p == q => Some(p),
            (Some(p), Some(q)) => {
                return Err(bad(format!("shapes {a} and {b} are not broadcastable ({p} vs {q})")))
            }
            (Some(p), None) | (None, Some(p)) => Some(p),
            (None, None) => None,
        };
    }
    Ok(PartialShape::from(out))
}

fn infer_binary(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let d = c.same_dtype(&[0, 1])?;
    if !d.is_numeric() {
        return Err(bad(format!("{} is not numeric", d)));
    }
    Ok(vec![ti(d, broadcast_shapes(c.shape(0), c.shape(1))?)])
}

fn infer_compare(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    c.same_dtype(&[0, 1])?;
    Ok(vec![ti(DType::Bool, broadcast_shapes(c.shape(0), c.shape(1))?)])
}

fn infer_unary_float(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    let d = c.expect_dtype(0, DType::FLOATS)?;
    Ok(vec![ti(d, c.shape(0).clone())])
}

fn infer_unary_numeric(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    let d = c.expect_dtype(0, DType::NUMBERS)?;
    Ok(vec![ti(d, c.shape(0).clone())])
}

/// Element-wise op over two same-shaped float inputs (the `*Grad` ops).
fn infer_same2_float(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let d = c.same_dtype(&[0, 1])?;
    if !d.is_float() {
        return Err(bad(format!("{d} is not a float type")));
    }
    Ok(vec![ti(d, c.shape(0).merge(c.shape(1))?)])
}

fn infer_identity(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    Ok(vec![ti(c.dtype(0), c.shape(0).clone())])
}

fn infer_none(_: &InferCtx) -> Result<Vec<TensorInfo>> {
    Ok(vec![])
}

fn infer_const(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    let t = c.attrs.tensor("value")?;
    Ok(vec![ti(t.dtype(), t.shape().to_partial())])
}

fn infer_placeholder(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    let d = c.attrs.dtype("dtype")?;
    let s = c.attrs.shape("shape").cloned().unwrap_or_default();
    Ok(vec![ti(d, s)])
}

fn infer_placeholder_with_default(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    let s = c.attrs.shape("shape").cloned().unwrap_or_default();
    Ok(vec![ti(c.dtype(0), s.merge(c.shape(0)).map_err(|e| e.context("default value"))?)])
}

fn infer_variable(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    let d = c.attrs.dtype("dtype")?;
    let s = c.attrs.shape("shape")?.clone();
    if matches!(d, DType::String | DType::Resource) {
        return Err(bad(format!("variables of dtype {d} are not supported")));
    }
    Ok(vec![TensorInfo { dtype: d, shape: s, is_ref: true }])
}

fn infer_assign(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    if !c.inputs[0].is_ref {
        return Err(bad("input 0 must be a variable (a reference)"));
    }
    let d = c.same_dtype(&[0, 1])?;
    let validate = c.attrs.bool_or("validate_shape", true);
    let s = if validate && c.op == "Assign" {
        c.shape(0).merge(c.shape(1)).map_err(|e| e.context("value does not fit the variable"))?
    } else if c.op == "Assign" {
        c.shape(1).clone()
    } else {
        c.shape(0).merge(c.shape(1)).map_err(|e| e.context("update does not fit the variable"))?
    };
    Ok(vec![ti(d, s)])
}

fn infer_is_initialized(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    if !c.inputs[0].is_ref {
        return Err(bad("input 0 must be a variable (a reference)"));
    }
    Ok(vec![ti(DType::Bool, PartialShape::scalar())])
}

fn infer_matmul(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let d = c.same_dtype(&[0, 1])?;
    if !matches!(d, DType::F32 | DType::F64 | DType::F16 | DType::BF16 | DType::I32 | DType::I64) {
        return Err(bad(format!("MatMul does not support {d}")));
    }
    let (m, n) = product_dims(c)?;
    Ok(vec![ti(d, PartialShape::from(vec![m, n]))])
}

/// Rows and columns of the product of matrix inputs 0 and 1 under `transpose_a`/`transpose_b`,
/// their inner dimensions checked where known.
fn product_dims(c: &InferCtx) -> Result<(Option<usize>, Option<usize>)> {
    c.expect_rank(0, 2)?;
    c.expect_rank(1, 2)?;
    let ta = c.attrs.bool_or("transpose_a", false);
    let tb = c.attrs.bool_or("transpose_b", false);
    let (a, b) = (c.shape(0), c.shape(1));
    let (m, ka) = if ta { (a.dim(1), a.dim(0)) } else { (a.dim(0), a.dim(1)) };
    let (kb, n) = if tb { (b.dim(1), b.dim(0)) } else { (b.dim(0), b.dim(1)) };
    if let (Some(x), Some(y)) = (ka, kb) {
        if x != y {
            return Err(bad(format!(
                "inner dimensions differ: {a}{} times {b}{}",
                if ta { "ᵀ" } else { "" },
                if tb { "ᵀ" } else { "" }
            )));
        }
    }
    Ok((m, n))
}

/// `fuse::FUSED_MATMUL`: MatMul of inputs 0 and 1 in f32, then the `fused_ops` with input 2: a
/// bias per column (`BiasAdd`, optionally then `Relu`) or ReluGrad's features (`ReluGrad`).
fn infer_fused_matmul(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(3)?;
    if c.same_dtype(&[0, 1, 2])? != DType::F32 {
        return Err(bad("_FusedMatMul is f32 only"));
    }
    let (m, n) = product_dims(c)?;
    let extra = c.shape(2);
    let ops = c.attrs.strs("fused_ops")?;
    match ops {
        [b] | [b, _] if b == "BiasAdd" && ops.get(1).is_none_or(|r| r == "Relu") => {
            c.expect_rank(2, 1)?;
            if let (Some(x), Some(y)) = (n, extra.dim(0)) {
                if x != y {
                    return Err(bad(format!("{y} biases for {x} columns")));
                }
            }
        }
        [r] if r == "ReluGrad" => {
            c.expect_rank(2, 2)?;
            let out = PartialShape::from(vec![m, n]);
            if !out.compatible(extra) {
                return Err(bad(format!("ReluGrad features of shape {extra} for a product of shape {out}")));
            }
        }
        other => return Err(bad(format!("_FusedMatMul cannot fuse {other:?}"))),
    }
    Ok(vec![ti(DType::F32, PartialShape::from(vec![m, n]))])
}

fn infer_bias_add(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let d = c.same_dtype(&[0, 1])?;
    c.expect_rank(1, 1)?;
    let v = c.shape(0);
    if let Some(r) = v.rank() {
        if r < 1 {
            return Err(bad("value must have rank at least 1"));
        }
        if let (Some(x), Some(y)) = (v.dim(r - 1), c.shape(1).dim(0)) {
            if x != y {
                return Err(bad(format!("bias of size {y} does not match last dimension {x} of {v}")));
            }
        }
    }
    Ok(vec![ti(d, v.clone())])
}

fn infer_bias_add_grad(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    let s = c.shape(0);
    let out = match s.rank() {
        Some(r) if r >= 1 => PartialShape::from(vec![s.dim(r - 1)]),
        Some(_) => return Err(bad("out_backprop must have rank at least 1")),
        None => PartialShape::unknown_rank(1),
    };
    Ok(vec![ti(c.dtype(0), out)])
}

/// Resolves negative axes against a rank and checks the range.
pub fn normalize_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(bad(format!("axis {axis} out of range for rank {rank}")));
    }
    Ok(a as usize)
}

fn infer_reduce(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let d = c.expect_dtype(0, DType::NUMBERS)?;
    c.expect_dtype(1, DType::INDICES)?;
    let keep = c.attrs.bool_or("keep_dims", false);
    let s = c.shape(0);
    let (Some(rank), Some(axes)) = (s.rank(), c.const_ints(1)) else {
        return Ok(vec![ti(d, PartialShape::unknown())]);
    };
    let mut reduced = vec![false; rank];
    for a in axes {
        reduced[normalize_axis(a, rank)?] = true;
    }
    let mut out = Vec::new();
    for (i, r) in reduced.iter().enumerate() {
        if *r {
            if keep {
                out.push(Some(1));
            }
        } else {
            out.push(s.dim(i));
        }
    }
    Ok(vec![ti(d, PartialShape::from(out))])
}

/// The output shape of a Reshape to `target` (with at most one -1) from `input`.
pub fn reshape_shape(input: &PartialShape, target: &[i64]) -> Result<PartialShape> {
    let mut unknown = None;
    let mut known = 1usize;
    for (i, &d) in target.iter().enumerate() {
        if d == -1 {
            if unknown.is_some() {
                return Err(bad("only one dimension of a reshape target may be -1"));
            }
            unknown = Some(i);
        } else if d < 0 {
            return Err(bad(format!("bad reshape dimension {d}")));
        } else {
            known = known.saturating_mul(d as usize);
        }
    }
    let mut out: Vec<Option<usize>> = target.iter().map(|&d| (d >= 0).then_some(d as usize)).collect();
    if let Some(n) = input.num_elements() {
        match unknown {
            Some(i) => {
                if known == 0 || n % known != 0 {
                    return Err(bad(format!("cannot reshape {input} ({n} elements) to {target:?}")));
                }
                out[i] = Some(n / known);
            }
            None if known != n => {
                return Err(bad(format!("cannot reshape {input} ({n} elements) to {target:?}")))
            }
            None => {}
        }
    }
    Ok(PartialShape::from(out))
}

fn infer_reshape(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    c.expect_dtype(1, DType::INDICES)?;
    let s = match c.const_ints(1) {
        Some(t) => reshape_shape(c.shape(0), &t)?,
        None => match c.shape(1).dim(0) {
            Some(r) => PartialShape::unknown_rank(r),
            None => PartialShape::unknown(),
        },
    };
    Ok(vec![ti(c.dtype(0), s)])
}

fn infer_transpose(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    c.expect_dtype(1, DType::INDICES)?;
    let s = c.shape(0);
    let Some(perm) = c.const_ints(1) else {
        return Ok(vec![ti(c.dtype(0), s.rank().map(PartialShape::unknown_rank).unwrap_or_default())]);
    };
    if let Some(r) = s.rank() {
        if perm.len() != r {
            return Err(bad(format!("permutation {perm:?} does not fit rank {r}")));
        }
    }
    let mut seen = vec![false; perm.len()];
    for &p in &perm {
        if p < 0 || p as usize >= perm.len() || seen[p as usize] {
            return Err(bad(format!("{perm:?} is not a permutation")));
        }
        seen[p as usize] = true;
    }
    let out: Vec<Option<usize>> = perm.iter().map(|&p| s.dim(p as usize)).collect();
    Ok(vec![ti(c.dtype(0), PartialShape::from(out))])
}

fn infer_expand_dims(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let s = c.shape(0);
    let (Some(r), Some(ax)) = (s.rank(), c.const_ints(1)) else {
        return Ok(vec![ti(c.dtype(0), PartialShape::unknown())]);
    };
    let ax = *ax.first().ok_or_else(|| bad("axis is empty"))?;
    let a = normalize_axis(ax, r + 1)?;
    let mut out = s.dims.clone().unwrap_or_default();
    out.insert(a, Some(1));
    Ok(vec![ti(c.dtype(0), PartialShape::from(out))])
}

fn infer_squeeze(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    let s = c.shape(0);
    let axes = c.attrs.ints("squeeze_dims").map(|v| v.to_vec()).unwrap_or_default();
    let Some(dims) = &s.dims else {
        return Ok(vec![ti(c.dtype(0), PartialShape::unknown())]);
    };
    let r = dims.len();
    let mut drop = vec![false; r];
    if axes.is_empty() {
        for (i, d) in dims.iter().enumerate() {
            match d {
                Some(1) => drop[i] = true,
                None => return Ok(vec![ti(c.dtype(0), PartialShape::unknown())]),
                _ => {}
            }
        }
    } else {
        for a in axes {
            let a = normalize_axis(a, r)?;
            if let Some(d) = dims[a] {
                if d != 1 {
                    return Err(bad(format!("cannot squeeze dimension {a} of size {d}")));
                }
            }
            drop[a] = true;
        }
    }
    let out: Vec<Option<usize>> = dims.iter().zip(&drop).filter(|(_, &d)| !d).map(|(x, _)| *x).collect();
    Ok(vec![ti(c.dtype(0), PartialShape::from(out))])
}

fn infer_concat(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    let n = c.num_inputs();
    if n < 2 {
        return Err(bad("ConcatV2 needs at least one value and an axis"));
    }
    c.expect_dtype(n - 1, DType::INDICES)?;
    let idx: Vec<usize> = (0..n - 1).collect();
    let d = c.same_dtype(&idx)?;
    let Some(axis) = c.const_ints(n - 1).and_then(|v| v.first().copied()) else {
        return Ok(vec![ti(d, PartialShape::unknown())]);
    };
    let mut rank = None;
    for i in &idx {
        if let Some(r) = c.shape(*i).rank() {
            if rank.is_some_and(|x| x != r) {
                return Err(bad("concatenated values have different ranks"));
            }
            rank = Some(r);
        }
    }
    let Some(rank) = rank else {
        return Ok(vec![ti(d, PartialShape::unknown())]);
    };
    let a = normalize_axis(axis, rank)?;
    let mut out = vec![None; rank];
    let mut total = Some(0usize);
    for (k, o) in out.iter_mut().enumerate() {
        if k == a {
            continue;
        }
        let mut m = PartialShape::from(vec![None]);
        for i in &idx {
            m = m
                .merge(&PartialShape::from(vec![c.shape(*i).dim(k)]))
                .map_err(|_| bad(format!("concatenated values differ in dimension {k}")))?;
        }
        *o = m.dim(0);
    }
    for i in &idx {
        total = match (total, c.shape(*i).dim(a)) {
            (Some(t), Some(x)) => Some(t + x),
            _ => None,
        };
    }
    out[a] = total;
    Ok(vec![ti(d, PartialShape::from(out))])
}

fn infer_slice(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(3)?;
    let s = c.shape(0);
    let (Some(begin), Some(size)) = (c.const_ints(1), c.const_ints(2)) else {
        return Ok(vec![ti(c.dtype(0), s.rank().map(PartialShape::unknown_rank).unwrap_or_default())]);
    };
    if begin.len() != size.len() || s.rank().is_some_and(|r| r != begin.len()) {
        return Err(bad(format!("begin {begin:?} and size {size:?} do not fit shape {s}")));
    }
    let mut out = Vec::new();
    for (i, (&b, &z)) in begin.iter().zip(&size).enumerate() {
        let d = s.dim(i);
        if b < 0 || z < -1 {
            return Err(bad(format!("bad slice begin {b} size {z}")));
        }
        if let Some(d) = d {
            let end = if z == -1 { d as i64 } else { b + z };
            if end > d as i64 || b > d as i64 {
                return Err(bad(format!("slice {b}+{z} out of range for dimension {i} of size {d}")));
            }
        }
        out.push(if z == -1 { d.map(|d| d - b as usize) } else { Some(z as usize) });
    }
    Ok(vec![ti(c.dtype(0), PartialShape::from(out))])
}

fn infer_gather(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    c.expect_dtype(1, DType::INDICES)?;
    let (p, i) = (c.shape(0), c.shape(1));
    let out = match (&p.dims, &i.dims) {
        (Some(pd), Some(id)) if !pd.is_empty() => {
            let mut v = id.clone();
            v.extend_from_slice(&pd[1..]);
            PartialShape::from(v)
        }
        (Some(pd), _) if pd.is_empty() => return Err(bad("params must have rank at least 1")),
        _ => PartialShape::unknown(),
    };
    Ok(vec![ti(c.dtype(0), out)])
}

fn infer_cast(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    let d = c.attrs.dtype("DstT")?;
    let ok = |d: DType| d.is_numeric() || d == DType::Bool;
    if !ok(d) || !ok(c.dtype(0)) {
        return Err(bad(format!("cannot cast {} to {d}", c.dtype(0))));
    }
    Ok(vec![ti(d, c.shape(0).clone())])
}

fn infer_softmax(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    let d = c.expect_dtype(0, DType::FLOATS)?;
    if c.shape(0).rank() == Some(0) {
        return Err(bad("logits must have rank at least 1"));
    }
    Ok(vec![ti(d, c.shape(0).clone())])
}

fn infer_xent(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let d = c.same_dtype(&[0, 1])?;
    if !d.is_float() {
        return Err(bad(format!("{d} is not a float type")));
    }
    c.expect_rank(0, 2)?;
    let s = c.shape(0).merge(c.shape(1)).map_err(|e| e.context("logits and labels"))?;
    let s = if s.rank().is_none() { PartialShape::unknown_rank(2) } else { s };
    Ok(vec![ti(d, PartialShape::from(vec![s.dim(0)])), ti(d, s)])
}

fn infer_sparse_xent(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let d = c.expect_dtype(0, DType::FLOATS)?;
    c.expect_dtype(1, DType::INDICES)?;
    c.expect_rank(0, 2)?;
    c.expect_rank(1, 1)?;
    let b = PartialShape::from(vec![c.shape(0).dim(0)])
        .merge(&PartialShape::from(vec![c.shape(1).dim(0)]))
        .map_err(|e| e.context("logits and labels batch sizes"))?;
    let s = PartialShape::from(vec![b.dim(0), c.shape(0).dim(1)]);
    Ok(vec![ti(d, b), ti(d, s)])
}

fn infer_argmax(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    c.expect_dtype(0, DType::NUMBERS)?;
    let out_t = c.attrs.dtype("output_type").unwrap_or(DType::I64);
    let s = c.shape(0);
    let (Some(r), Some(ax)) = (s.rank(), c.const_ints(1)) else {
        return Ok(vec![ti(out_t, PartialShape::unknown())]);
    };
    let a = normalize_axis(*ax.first().ok_or_else(|| bad("empty axis"))?, r)?;
    let mut d = s.dims.clone().unwrap_or_default();
    d.remove(a);
    Ok(vec![ti(out_t, PartialShape::from(d))])
}

fn shape_from_const(c: &InferCtx, i: usize) -> PartialShape {
    match c.const_ints(i) {
        Some(v) => PartialShape::from(v.iter().map(|&x| (x >= 0).then_some(x as usize)).collect::<Vec<_>>()),
        None => match c.shape(i).dim(0) {
            Some(r) => PartialShape::unknown_rank(r),
            None => PartialShape::unknown(),
        },
    }
}

fn infer_fill(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    c.expect_dtype(0, DType::INDICES)?;
    c.expect_rank(0, 1)?;
    c.expect_rank(1, 0)?;
    Ok(vec![ti(c.dtype(1), shape_from_const(c, 0))])
}

fn infer_shape(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    let t = c.attrs.dtype("out_type").unwrap_or(DType::I32);
    Ok(vec![ti(t, PartialShape::from(vec![c.shape(0).rank()]))])
}

fn infer_random(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    c.expect_dtype(0, DType::INDICES)?;
    let d = c.attrs.dtype("dtype")?;
    if !d.is_float() {
        return Err(bad(format!("random values of {d} are not supported")));
    }
    Ok(vec![ti(d, shape_from_const(c, 0))])
}

fn infer_add_n(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    if c.num_inputs() == 0 {
        return Err(bad("AddN needs at least one input"));
    }
    let idx: Vec<usize> = (0..c.num_inputs()).collect();
    let d = c.same_dtype(&idx)?;
    let mut s = PartialShape::unknown();
    for i in idx {
        s = s.merge(c.shape(i)).map_err(|e| e.context("AddN inputs"))?;
    }
    Ok(vec![ti(d, s)])
}

fn infer_broadcast_args(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let d = c.same_dtype(&[0, 1])?;
    Ok(vec![ti(d, PartialShape::unknown_rank(1)), ti(d, PartialShape::unknown_rank(1))])
}

fn infer_tile(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    let s = c.shape(0);
    let out = match (&s.dims, c.const_ints(1)) {
        (Some(d), Some(m)) if d.len() == m.len() => PartialShape::from(
            d.iter().zip(&m).map(|(x, &k)| x.map(|x| x * k.max(0) as usize)).collect::<Vec<_>>(),
        ),
        (Some(d), Some(m)) => {
            return Err(bad(format!("multiples {m:?} do not fit rank {}", d.len())));
        }
        (Some(d), None) => PartialShape::unknown_rank(d.len()),
        _ => PartialShape::unknown(),
    };
    Ok(vec![ti(c.dtype(0), out)])
}

fn infer_sum_to_shape(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    Ok(vec![ti(c.dtype(0), shape_from_const(c, 1))])
}

fn infer_recv(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    let d = c.attrs.dtype("tensor_type")?;
    let s = c.attrs.shape("shape").cloned().unwrap_or_default();
    Ok(vec![ti(d, s)])
}

fn infer_arg(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    let d = c.attrs.dtype("T")?;
    let s = c.attrs.shape("shape").cloned().unwrap_or_default();
    Ok(vec![ti(d, s)])
}

/// `Apply*` optimizer ops in TensorFlow's argument order: reference inputs first (variable, then
/// slots), then scalars and the gradient (last, except ApplyMomentum's
/// `(var, accum, lr, grad, momentum)`); the output is the variable's new value.
fn infer_apply(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    let refs = match c.op {
        "ApplyGradientDescent" => 1,
        "ApplyMomentum" => 2,
        "ApplyAdam" | "ApplyRMSProp" => 3,
        _ => 1,
    };
    let want = match c.op {
        "ApplyGradientDescent" => 3,
        "ApplyMomentum" => 5,
        "ApplyAdam" => 10,
        "ApplyRMSProp" => 8,
        _ => c.num_inputs(),
    };
    c.expect_inputs(want)?;
    let d = c.expect_dtype(0, DType::FLOATS)?;
    let idx: Vec<usize> = (0..want).collect();
    c.same_dtype(&idx)?;
    for i in 0..refs {
        if !c.inputs[i].is_ref {
            return Err(bad(format!("input {i} must be a variable (a reference)")));
        }
        c.shape(0).merge(c.shape(i)).map_err(|e| e.context("slot shape"))?;
    }
    let g = if c.op == "ApplyMomentum" { 3 } else { want - 1 };
    c.shape(0).merge(c.shape(g)).map_err(|e| e.context("gradient does not fit the variable"))?;
    Ok(vec![ti(d, c.shape(0).clone())])
}

/// Output size of a windowed op along one dimension (TensorFlow's SAME / VALID rules).
pub fn window_output_size(input: usize, window: usize, stride: usize, padding: &str) -> Result<usize> {
    if stride == 0 || window == 0 {
        return Err(bad("window and stride must be positive"));
    }
    match padding {
        "VALID" => {
            if input < window {
                return Err(bad(format!(
                    "window {window} is larger than the input {input} with VALID padding"
                )));
            }
            Ok((input - window) / stride + 1)
        }
        "SAME" => Ok(input.div_ceil(stride)),
        p => Err(bad(format!("padding must be SAME or VALID, not '{p}'"))),
    }
}

/// `(stride_h, stride_w)` from an NHWC `strides` attr `[1, sh, sw, 1]`.
pub fn nhwc_pair(c: &crate::Attrs, name: &str) -> Result<(usize, usize)> {
    let v = c.ints(name)?;
    if v.len() != 4 || v[0] != 1 || v[3] != 1 || v[1] < 1 || v[2] < 1 {
        return Err(bad(format!("{name} must be [1, h, w, 1] with positive h, w; got {v:?}")));
    }
    Ok((v[1] as usize, v[2] as usize))
}

fn check_nhwc(c: &InferCtx) -> Result<()> {
    let f = c.attrs.str_or("data_format", "NHWC");
    if f != "NHWC" {
        return Err(bad(format!("data_format {f} is not supported; use NHWC")));
    }
    Ok(())
}

fn windowed(
    input: &PartialShape,
    kh: Option<usize>,
    kw: Option<usize>,
    c: &InferCtx,
    out_c: Option<usize>,
) -> Result<PartialShape> {
    let (sh, sw) = nhwc_pair(c.attrs, "strides")?;
    let pad = c.attrs.str("padding")?;
    let d = |x: Option<usize>, k: Option<usize>, s: usize| -> Result<Option<usize>> {
        match (x, k) {
            (Some(x), Some(k)) => window_output_size(x, k, s, pad).map(Some),
            _ => Ok(None),
        }
    };
    Ok(PartialShape::from(vec![input.dim(0), d(input.dim(1), kh, sh)?, d(input.dim(2), kw, sw)?, out_c]))
}

fn infer_conv2d(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(2)?;
    check_nhwc(c)?;
    let d = c.same_dtype(&[0, 1])?;
    if !d.is_float() {
        return Err(bad(format!("{d} is not a float type")));
    }
    c.expect_rank(0, 4)?;
    c.expect_rank(1, 4)?;
    let (x, f) = (c.shape(0), c.shape(1));
    if let (Some(a), Some(b)) = (x.dim(3), f.dim(2)) {
        if a != b {
            return Err(bad(format!("input depth {a} does not match filter depth {b}")));
        }
    }
    Ok(vec![ti(d, windowed(x, f.dim(0), f.dim(1), c, f.dim(3))?)])
}

fn infer_conv2d_backprop_input(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(3)?;
    check_nhwc(c)?;
    c.expect_dtype(0, DType::INDICES)?;
    let d = c.same_dtype(&[1, 2])?;
    Ok(vec![ti(d, shape_from_const(c, 0))])
}

fn infer_conv2d_backprop_filter(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(3)?;
    check_nhwc(c)?;
    c.expect_dtype(1, DType::INDICES)?;
    let d = c.same_dtype(&[0, 2])?;
    Ok(vec![ti(d, shape_from_const(c, 1))])
}

fn infer_max_pool(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    check_nhwc(c)?;
    let d = c.expect_dtype(0, DType::FLOATS)?;
    c.expect_rank(0, 4)?;
    let (kh, kw) = nhwc_pair(c.attrs, "ksize")?;
    let x = c.shape(0);
    Ok(vec![ti(d, windowed(x, Some(kh), Some(kw), c, x.dim(3))?)])
}

fn infer_max_pool_grad(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(3)?;
    check_nhwc(c)?;
    let d = c.same_dtype(&[0, 1, 2])?;
    nhwc_pair(c.attrs, "ksize")?;
    nhwc_pair(c.attrs, "strides")?;
    Ok(vec![ti(d, c.shape(0).clone())])
}

macro_rules! op {
    ($name:literal, $infer:expr) => {
        OpDef { name: $name, infer: $infer, ref_inputs: &[], stateful: false }
    };
    ($name:literal, $infer:expr, refs: $refs:expr, stateful) => {
        OpDef { name: $name, infer: $infer, ref_inputs: $refs, stateful: true }
    };
    ($name:literal, $infer:expr, stateful) => {
        OpDef { name: $name, infer: $infer, ref_inputs: &[], stateful: true }
    };
}

/// The ops defined by the graph crate.
pub const OPS: &[OpDef] = &[
    op!("Const", infer_const),
    op!("Placeholder", infer_placeholder),
    op!("PlaceholderWithDefault", infer_placeholder_with_default),
    op!("Identity", infer_identity),
    op!("StopGradient", infer_identity),
    op!("NoOp", infer_none),
    op!("VariableV2", infer_variable, stateful),
    op!("Assign", infer_assign, refs: &[0], stateful),
    op!("AssignAdd", infer_assign, refs: &[0], stateful),
    op!("AssignSub", infer_assign, refs: &[0], stateful),
    op!("IsVariableInitialized", infer_is_initialized, refs: &[0], stateful),
    op!("Add", infer_binary),
    op!("AddV2", infer_binary),
    op!("Sub", infer_binary),
    op!("Mul", infer_binary),
    op!("Div", infer_binary),
    op!("RealDiv", infer_binary),
    op!("Pow", infer_binary),
    op!("Maximum", infer_binary),
    op!("Minimum", infer_binary),
    op!("SquaredDifference", infer_binary),
    op!("Equal", infer_compare),
    op!("NotEqual", infer_compare),
    op!("Greater", infer_compare),
    op!("GreaterEqual", infer_compare),
    op!("Less", infer_compare),
    op!("LessEqual", infer_compare),
    op!("Neg", infer_unary_numeric),
    op!("Abs", infer_unary_numeric),
    op!("Square", infer_unary_numeric),
    op!("Sign", infer_unary_numeric),
    op!("Sqrt", infer_unary_float),
    op!("Rsqrt", infer_unary_float),
    op!("Reciprocal", infer_unary_float),
    op!("Exp", infer_unary_float),
    op!("Log", infer_unary_float),
    op!("Relu", infer_unary_numeric),
    op!("Sigmoid", infer_unary_float),
    op!("Tanh", infer_unary_float),
    op!("ReluGrad", infer_same2_float),
    op!("SigmoidGrad", infer_same2_float),
    op!("TanhGrad", infer_same2_float),
    op!("SqrtGrad", infer_same2_float),
    op!("MatMul", infer_matmul),
    op!("_FusedMatMul", infer_fused_matmul),
    op!("BiasAdd", infer_bias_add),
    op!("BiasAddGrad", infer_bias_add_grad),
    op!("Sum", infer_reduce),
    op!("Mean", infer_reduce),
    op!("Max", infer_reduce),
    op!("Min", infer_reduce),
    op!("Prod", infer_reduce),
    op!("Reshape", infer_reshape),
    op!("Transpose", infer_transpose),
    op!("ExpandDims", infer_expand_dims),
    op!("Squeeze", infer_squeeze),
    op!("ConcatV2", infer_concat),
    op!("Slice", infer_slice),
    op!("Gather", infer_gather),
    op!("Tile", infer_tile),
    op!("Cast", infer_cast),
    op!("Softmax", infer_softmax),
    op!("LogSoftmax", infer_softmax),
    op!("SoftmaxCrossEntropyWithLogits", infer_xent),
    op!("SparseSoftmaxCrossEntropyWithLogits", infer_sparse_xent),
    op!("ArgMax", infer_argmax),
    op!("Fill", infer_fill),
    op!("ZerosLike", infer_identity),
    op!("OnesLike", infer_identity),
    op!("Shape", infer_shape),
    op!("RandomUniform", infer_random, stateful),
    op!("RandomStandardNormal", infer_random, stateful),
    op!("TruncatedNormal", infer_random, stateful),
    op!("AddN", infer_add_n),
    op!("BroadcastGradientArgs", infer_broadcast_args),
    op!("SumToShape", infer_sum_to_shape),
    op!("Conv2D", infer_conv2d),
    op!("Conv2DBackpropInput", infer_conv2d_backprop_input),
    op!("Conv2DBackpropFilter", infer_conv2d_backprop_filter),
    op!("MaxPool", infer_max_pool),
    op!("MaxPoolGrad", infer_max_pool_grad),
    op!("ApplyGradientDescent", infer_apply, refs: &[0], stateful),
    op!("ApplyMomentum", infer_apply, refs: &[0, 1], stateful),
    op!("ApplyAdam", infer_apply, refs: &[0, 1, 2], stateful),
    op!("ApplyRMSProp", infer_apply, refs: &[0, 1, 2], stateful),
    op!("_Send", infer_none, stateful),
    op!("_Recv", infer_recv, stateful),
    op!("_Arg", infer_arg),
    op!("_Retval", infer_none),
];

/// The core op definition named `name`; panics on a name this crate does not define (a bug in
/// the builder, never user input).
pub fn core_op(name: &str) -> &'static OpDef {
    OPS.iter().find(|o| o.name == name).unwrap_or_else(|| panic!("core op {name} is defined"))
}
