//! Reverse-mode differentiation as a graph transformation (`tf.gradients`): a gradient function
//! per op in the explicit table `GRADIENTS`, applied from `ys` back to `xs`.

use rill_graph::half::{bf16, f16};
use rill_graph::{attrs, AttrsExt, DType, Error, Graph, NodeDef, NodeId, Output, Result, Tensor};
use std::collections::HashMap;

/// What a gradient function sees of the forward node it differentiates.
pub struct GradCtx<'a> {
    pub g: &'a Graph,
    pub id: NodeId,
    pub node: &'a NodeDef,
}

impl GradCtx<'_> {
    /// Forward input `i`.
    pub fn x(&self, i: usize) -> Output {
        self.node.inputs[i]
    }

    /// Forward output `i`.
    pub fn y(&self, i: usize) -> Output {
        Output::new(self.id, i as u32)
    }

    /// The dtype of forward output 0 (the dtype every gradient of an element-wise op has).
    pub fn dtype(&self) -> DType {
        self.g.dtype(self.y(0))
    }

    fn unimplemented(&self, why: &str) -> Error {
        Error::unimplemented(format!("gradient of node '{}' ({}): {why}", self.node.name, self.node.op))
    }
}

/// A gradient function: the gradients of the node's outputs (`None` where nothing flows back)
/// in, one gradient per forward input out (`None` for inputs that get none).
pub type GradFn = fn(&GradCtx<'_>, &[Option<Output>]) -> Result<Vec<Option<Output>>>;

/// The gradient functions by op name. Ops not listed cannot be differentiated through.
pub const GRADIENTS: &[(&str, GradFn)] = &[
    ("Identity", grad_identity),
    ("PlaceholderWithDefault", grad_identity),
    ("StopGradient", grad_none),
    ("ZerosLike", grad_none),
    ("OnesLike", grad_none),
    ("Shape", grad_none),
    ("Sign", grad_none),
    ("ArgMax", grad_none),
    ("Add", grad_add),
    ("AddV2", grad_add),
    ("Sub", grad_sub),
    ("Mul", grad_mul),
    ("Div", grad_div),
    ("RealDiv", grad_div),
    ("Pow", grad_pow),
    ("Maximum", grad_maximum),
    ("Minimum", grad_minimum),
    ("SquaredDifference", grad_squared_difference),
    ("Neg", grad_neg),
    ("Abs", grad_abs),
    ("Square", grad_square),
    ("Sqrt", grad_sqrt),
    ("Rsqrt", grad_rsqrt),
    ("Reciprocal", grad_reciprocal),
    ("Exp", grad_exp),
    ("Log", grad_log),
    ("Relu", grad_relu),
    ("Sigmoid", grad_sigmoid),
    ("Tanh", grad_tanh),
    ("MatMul", grad_matmul),
    ("BiasAdd", grad_bias_add),
    ("Sum", grad_sum),
    ("Mean", grad_mean),
    ("Max", grad_max_min),
    ("Min", grad_max_min),
    ("Reshape", grad_reshape),
    ("ExpandDims", grad_reshape_first),
    ("Squeeze", grad_reshape_first),
    ("Transpose", grad_transpose),
    ("ConcatV2", grad_concat),
    ("Slice", grad_slice),
    ("Gather", grad_gather),
    ("Tile", grad_tile),
    ("Fill", grad_fill),
    ("Cast", grad_cast),
    ("Softmax", grad_softmax),
    ("LogSoftmax", grad_log_softmax),
    ("SoftmaxCrossEntropyWithLogits", grad_xent),
    ("SparseSoftmaxCrossEntropyWithLogits", grad_sparse_xent),
    ("AddN", grad_add_n),
    ("Conv2D", grad_conv2d),
    ("MaxPool", grad_max_pool),
];

fn grad_fn(op: &str) -> Option<GradFn> {
    GRADIENTS.iter().find(|(name, _)| *name == op).map(|(_, f)| *f)
}

/// The symbolic gradients of `sum(ys)` (weighted by `grad_ys`, ones by default) with respect to
/// each of `xs`; `None` for an `x` that no `y` depends on. Built under a `gradients/` name scope,
/// each gradient op colocated with the forward op it differentiates.
pub fn gradients(
    g: &Graph,
    ys: &[Output],
    xs: &[Output],
    grad_ys: Option<&[Output]>,
) -> Result<Vec<Option<Output>>> {
    g.status()?;
    if let Some(gy) = grad_ys {
        if gy.len() != ys.len() {
            return Err(Error::invalid_argument(format!(
                "gradients: {} grad_ys given for {} ys",
                gy.len(),
                ys.len()
            )));
        }
    }
    let def = g.to_graph_def();
    let n = def.nodes.len();
    for o in ys.iter().chain(xs) {
        if o.node.0 as usize >= n || o.index as usize >= def.nodes[o.node.0 as usize].outputs.len() {
            return Err(Error::invalid_argument(format!("gradients: {o:?} is not an output of this graph")));
        }
    }
    let order = topological_order(&def.nodes)?;
    // Nodes that depend on some x, then among them those some y depends on: the nodes between.
    let mut reached = vec![false; n];
    for x in xs {
        reached[x.node.0 as usize] = true;
    }
    for &i in &order {
        if def.nodes[i].inputs.iter().any(|o| reached[o.node.0 as usize]) {
            reached[i] = true;
        }
    }
    let mut needed = vec![false; n];
    for y in ys {
        needed[y.node.0 as usize] = true;
    }
    let mut between = vec![false; n];
    for &i in order.iter().rev() {
        if needed[i] && reached[i] {
            between[i] = true;
            for o in &def.nodes[i].inputs {
                needed[o.node.0 as usize] = true;
            }
        }
    }
    let r = g.with_name_scope("gradients", |g| backprop(g, &def.nodes, &order, &between, ys, xs, grad_ys));
    g.status()?;
    r
}

fn backprop(
    g: &Graph,
    nodes: &[NodeDef],
    order: &[usize],
    between: &[bool],
    ys: &[Output],
    xs: &[Output],
    grad_ys: Option<&[Output]>,
) -> Result<Vec<Option<Output>>> {
    let mut pending: HashMap<Output, Vec<Output>> = HashMap::new();
    for (k, &y) in ys.iter().enumerate() {
        let seed = match grad_ys {
            Some(gy) => gy[k],
            None => g.colocate_with(y, |g| g.ones_like(y)),
        };
        pending.entry(y).or_default().push(seed);
    }
    let mut summed: HashMap<Output, Output> = HashMap::new();
    for &i in order.iter().rev() {
        if !between[i] {
            continue;
        }
        let node = &nodes[i];
        let id = NodeId(i as u32);
        let anchor = Output::new(id, 0);
        let out_grads: Vec<Option<Output>> = (0..node.outputs.len())
            .map(|k| {
                let o = Output::new(id, k as u32);
                let contribs = pending.remove(&o)?;
                let sum = g.colocate_with(anchor, |g| g.add_n(&contribs));
                summed.insert(o, sum);
                Some(sum)
            })
            .collect();
        if out_grads.iter().all(Option::is_none) || !node.inputs.iter().any(|o| between[o.node.0 as usize]) {
            continue;
        }
        let f = grad_fn(&node.op).ok_or_else(|| {
            Error::not_found(format!("no gradient defined for op {} (node '{}')", node.op, node.name))
        })?;
        let ctx = GradCtx { g, id, node };
        let in_grads = g.with_name_scope(&format!("{}_grad", node.name), |g| {
            g.colocate_with(anchor, |_| f(&ctx, &out_grads))
        })?;
        if in_grads.len() != node.inputs.len() {
            return Err(Error::internal(format!(
                "gradient of {} gave {} gradients for {} inputs",
                node.op,
                in_grads.len(),
                node.inputs.len()
            )));
        }
        for (inp, gi) in node.inputs.iter().zip(in_grads) {
            let Some(gi) = gi else { continue };
            // Integer tensors (indices, shapes) carry no gradient, as in TensorFlow.
            if between[inp.node.0 as usize] && g.dtype(*inp).is_float() {
                pending.entry(*inp).or_default().push(gi);
            }
        }
        g.status()?;
    }
    Ok(xs.iter().map(|x| summed.get(x).copied()).collect())
}

/// Node indices ordered so that every node comes after its data and control inputs.
fn topological_order(nodes: &[NodeDef]) -> Result<Vec<usize>> {
    let n = nodes.len();
    let mut indegree = vec![0usize; n];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in nodes.iter().enumerate() {
        for src in node.inputs.iter().map(|o| o.node).chain(node.control_inputs.iter().copied()) {
            indegree[i] += 1;
            consumers[src.0 as usize].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &c in &consumers[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(c);
            }
        }
    }
    if order.len() != n {
        return Err(Error::invalid_argument("gradients: the graph has a cycle"));
    }
    Ok(order)
}

// ---- helpers ----

/// A scalar constant of a float or integer dtype.
pub(crate) fn scalar_of(g: &Graph, v: f64, dtype: DType) -> Output {
    g.constant(scalar_tensor(v, dtype))
}

pub(crate) fn scalar_tensor(v: f64, dtype: DType) -> Tensor {
    match dtype {
        DType::F64 => Tensor::scalar(v),
        DType::F16 => Tensor::scalar(f16::from_f64(v)),
        DType::BF16 => Tensor::scalar(bf16::from_f64(v)),
        DType::I32 => Tensor::scalar(v as i32),
        DType::I64 => Tensor::scalar(v as i64),
        DType::U8 => Tensor::scalar(v as u8),
        _ => Tensor::scalar(v as f32),
    }
}

/// The fully known static shape of `o`, if any.
fn static_dims(g: &Graph, o: Output) -> Option<Vec<usize>> {
    g.shape(o).to_shape().map(|s| s.dims().to_vec())
}

fn to_i64(d: &[usize]) -> Vec<i64> {
    d.iter().map(|&x| x as i64).collect()
}

/// The shape of `o` as a 1-D int32 tensor: a constant when static, a `Shape` op otherwise.
fn shape_tensor(g: &Graph, o: Output) -> Output {
    match static_dims(g, o) {
        Some(d) => g.ints(&to_i64(&d)),
        None => g.shape_of(o),
    }
}

/// The integer vector held by a `Const` input, if it is one.
fn const_ints(g: &Graph, o: Output) -> Option<Vec<i64>> {
    let node = g.node(o.node);
    if node.op != "Const" {
        return None;
    }
    let t = node.attrs.tensor("value").ok()?;
    match t.dtype() {
        DType::I32 => t.to_vec::<i32>().ok().map(|v| v.into_iter().map(i64::from).collect()),
        DType::I64 => t.to_vec::<i64>().ok(),
        _ => None,
    }
}

/// Sums a gradient that was broadcast in the forward op back to the shape of input `x`.
fn unbroadcast(g: &Graph, grad: Output, x: Output) -> Output {
    match (static_dims(g, grad), static_dims(g, x)) {
        (Some(a), Some(b)) if a == b => grad,
        _ => g.sum_to_shape(grad, shape_tensor(g, x)),
    }
}

fn binary(ctx: &GradCtx<'_>, da: Option<Output>, db: Option<Output>) -> Vec<Option<Output>> {
    let g = ctx.g;
    vec![da.map(|d| unbroadcast(g, d, ctx.x(0))), db.map(|d| unbroadcast(g, d, ctx.x(1)))]
}

/// The gradient of output 0, which every single-output gradient function needs.
fn dy0(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Output> {
    grads.first().copied().flatten().ok_or_else(|| ctx.unimplemented("no gradient for output 0"))
}

fn cast_mask(g: &Graph, b: Output, dtype: DType) -> Output {
    g.cast(b, dtype)
}

// ---- gradient functions ----

fn grad_identity(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let mut v = vec![None; ctx.node.inputs.len()];
    if let Some(first) = v.first_mut() {
        *first = grads[0];
    }
    Ok(v)
}

fn grad_none(ctx: &GradCtx<'_>, _: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    Ok(vec![None; ctx.node.inputs.len()])
}

fn grad_add(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let dy = dy0(ctx, grads)?;
    Ok(binary(ctx, Some(dy), Some(dy)))
}

fn grad_sub(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let dy = dy0(ctx, grads)?;
    Ok(binary(ctx, Some(dy), Some(ctx.g.neg(dy))))
}

fn grad_mul(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    Ok(binary(ctx, Some(g.mul(dy, ctx.x(1))), Some(g.mul(ctx.x(0), dy))))
}

fn grad_div(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let (a, b) = (ctx.x(0), ctx.x(1));
    let da = g.div(dy, b);
    // d(a/b)/db = -a/b², written as -(a/b)/b so it stays finite where a/b is.
    let db = g.neg(g.mul(dy, g.div(g.div(a, b), b)));
    Ok(binary(ctx, Some(da), Some(db)))
}

fn grad_pow(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy, dt) = (ctx.g, dy0(ctx, grads)?, ctx.dtype());
    let (x, p, z) = (ctx.x(0), ctx.x(1), ctx.y(0));
    let one = scalar_of(g, 1.0, dt);
    let dx = g.mul(dy, g.mul(p, g.pow(x, g.sub(p, one))));
    // log(x) only where x > 0, as TensorFlow does; elsewhere the exponent gets no gradient.
    let pos = cast_mask(g, g.greater(x, scalar_of(g, 0.0, dt)), dt);
    let safe_x = g.add(g.mul(x, pos), g.sub(one, pos));
    let dp = g.mul(dy, g.mul(z, g.mul(g.log(safe_x), pos)));
    Ok(binary(ctx, Some(dx), Some(dp)))
}

fn select_grad(ctx: &GradCtx<'_>, grads: &[Option<Output>], cmp: &str) -> Result<Vec<Option<Output>>> {
    let (g, dy, dt) = (ctx.g, dy0(ctx, grads)?, ctx.dtype());
    let (a, b) = (ctx.x(0), ctx.x(1));
    let pick = match cmp {
        "GreaterEqual" => g.custom(rill_graph::ops::core_op("GreaterEqual"), "", &[a, b], attrs! {}),
        _ => g.custom(rill_graph::ops::core_op("LessEqual"), "", &[a, b], attrs! {}),
    };
    let mask = cast_mask(g, pick, dt);
    let da = g.mul(dy, mask);
    let db = g.mul(dy, g.sub(scalar_of(g, 1.0, dt), mask));
    Ok(binary(ctx, Some(da), Some(db)))
}

fn grad_maximum(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    select_grad(ctx, grads, "GreaterEqual")
}

fn grad_minimum(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    select_grad(ctx, grads, "LessEqual")
}

fn grad_squared_difference(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let two = scalar_of(g, 2.0, ctx.dtype());
    let d = g.mul(g.mul(two, dy), g.sub(ctx.x(0), ctx.x(1)));
    Ok(binary(ctx, Some(d), Some(g.neg(d))))
}

fn grad_neg(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    Ok(vec![Some(ctx.g.neg(dy0(ctx, grads)?))])
}

fn grad_abs(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let g = ctx.g;
    let sign = g.custom(rill_graph::ops::core_op("Sign"), "", &[ctx.x(0)], attrs! {});
    Ok(vec![Some(g.mul(dy0(ctx, grads)?, sign))])
}

fn grad_square(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let g = ctx.g;
    let two_x = g.mul(scalar_of(g, 2.0, ctx.dtype()), ctx.x(0));
    Ok(vec![Some(g.mul(dy0(ctx, grads)?, two_x))])
}

fn grad_sqrt(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let g = ctx.g;
    let op = rill_graph::ops::core_op("SqrtGrad");
    Ok(vec![Some(g.custom(op, "", &[ctx.y(0), dy0(ctx, grads)?], attrs! {}))])
}

fn grad_rsqrt(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    // d(x^-1/2) = -1/2 · y³
    let (g, y) = (ctx.g, ctx.y(0));
    let k = scalar_of(g, -0.5, ctx.dtype());
    Ok(vec![Some(g.mul(dy0(ctx, grads)?, g.mul(k, g.mul(y, g.square(y)))))])
}

fn grad_reciprocal(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, y) = (ctx.g, ctx.y(0));
    Ok(vec![Some(g.neg(g.mul(dy0(ctx, grads)?, g.square(y))))])
}

fn grad_exp(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    Ok(vec![Some(ctx.g.mul(dy0(ctx, grads)?, ctx.y(0)))])
}

fn grad_log(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    Ok(vec![Some(ctx.g.div(dy0(ctx, grads)?, ctx.x(0)))])
}

fn activation_grad(ctx: &GradCtx<'_>, grads: &[Option<Output>], op: &str) -> Result<Vec<Option<Output>>> {
    let dy = dy0(ctx, grads)?;
    let inputs = if op == "ReluGrad" { [dy, ctx.y(0)] } else { [ctx.y(0), dy] };
    Ok(vec![Some(ctx.g.custom(rill_graph::ops::core_op(op), "", &inputs, attrs! {}))])
}

fn grad_relu(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    activation_grad(ctx, grads, "ReluGrad")
}

fn grad_sigmoid(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    activation_grad(ctx, grads, "SigmoidGrad")
}

fn grad_tanh(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    activation_grad(ctx, grads, "TanhGrad")
}

fn grad_matmul(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let (a, b) = (ctx.x(0), ctx.x(1));
    let ta = ctx.node.attrs.bool_or("transpose_a", false);
    let tb = ctx.node.attrs.bool_or("transpose_b", false);
    let (da, db) = match (ta, tb) {
        (false, false) => (g.matmul_t(dy, b, false, true), g.matmul_t(a, dy, true, false)),
        (false, true) => (g.matmul_t(dy, b, false, false), g.matmul_t(dy, a, true, false)),
        (true, false) => (g.matmul_t(b, dy, false, true), g.matmul_t(a, dy, false, false)),
        (true, true) => (g.matmul_t(b, dy, true, true), g.matmul_t(dy, a, true, true)),
    };
    Ok(vec![Some(da), Some(db)])
}

fn grad_bias_add(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let db = g.custom(rill_graph::ops::core_op("BiasAddGrad"), "", &[dy], attrs! {});
    Ok(vec![Some(dy), Some(db)])
}

/// The reduced axes (normalised) and the input's rank of a reduction node.
fn reduced_axes(ctx: &GradCtx<'_>) -> Result<(Vec<bool>, usize)> {
    let rank =
        ctx.g.shape(ctx.x(0)).rank().ok_or_else(|| ctx.unimplemented("the input's rank is unknown"))?;
    let axes = const_ints(ctx.g, ctx.x(1)).ok_or_else(|| ctx.unimplemented("the axes are not a constant"))?;
    let mut reduced = vec![false; rank];
    for a in axes {
        let a = rill_graph::ops::normalize_axis(a, rank)?;
        if rank > 0 {
            reduced[a] = true;
        }
    }
    Ok((reduced, rank))
}

/// `t` (a reduction's output or its gradient) reshaped to the input's rank with size-1 reduced
/// dimensions, so that it broadcasts against the input.
fn keep_dims(ctx: &GradCtx<'_>, t: Output, reduced: &[bool]) -> Output {
    let g = ctx.g;
    let x = ctx.x(0);
    match static_dims(g, x) {
        Some(d) => {
            let kept: Vec<i64> = d.iter().zip(reduced).map(|(&n, &r)| if r { 1 } else { n as i64 }).collect();
            g.reshape(t, &kept)
        }
        None => {
            let keep: Vec<i64> = reduced.iter().map(|&r| i64::from(!r)).collect();
            let drop: Vec<i64> = reduced.iter().map(|&r| i64::from(r)).collect();
            let kept = g.add(g.mul(g.shape_of(x), g.ints(&keep)), g.ints(&drop));
            g.reshape_dynamic(t, kept)
        }
    }
}

/// The gradient of a sum: the output gradient broadcast back over the reduced dimensions.
fn sum_back(ctx: &GradCtx<'_>, dy: Output) -> Result<Output> {
    let g = ctx.g;
    let (reduced, _) = reduced_axes(ctx)?;
    let dk = keep_dims(ctx, dy, &reduced);
    Ok(match static_dims(g, ctx.x(0)) {
        Some(d) => {
            let m: Vec<i64> = d.iter().zip(&reduced).map(|(&n, &r)| if r { n as i64 } else { 1 }).collect();
            if m.iter().all(|&k| k == 1) {
                dk
            } else {
                g.tile(dk, &m)
            }
        }
        None => g.mul(dk, g.ones_like(ctx.x(0))),
    })
}

fn grad_sum(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    Ok(vec![Some(sum_back(ctx, dy0(ctx, grads)?)?), None])
}

fn grad_mean(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dt) = (ctx.g, ctx.dtype());
    let sum = sum_back(ctx, dy0(ctx, grads)?)?;
    let count = match (g.shape(ctx.x(0)).num_elements(), g.shape(ctx.y(0)).num_elements()) {
        (Some(a), Some(b)) => scalar_of(g, (a / b.max(1)) as f64, dt),
        _ => {
            let prod = |o: Output| {
                let p = g.custom(
                    rill_graph::ops::core_op("Prod"),
                    "",
                    &[g.shape_of(o), g.ints(&[0])],
                    attrs! { "keep_dims" => false },
                );
                g.cast(p, dt)
            };
            g.div(prod(ctx.x(0)), g.maximum(prod(ctx.y(0)), scalar_of(g, 1.0, dt)))
        }
    };
    Ok(vec![Some(g.div(sum, count)), None])
}

fn grad_max_min(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy, dt) = (ctx.g, dy0(ctx, grads)?, ctx.dtype());
    let (reduced, _) = reduced_axes(ctx)?;
    let x = ctx.x(0);
    let y = keep_dims(ctx, ctx.y(0), &reduced);
    // Ties share the gradient equally, as in TensorFlow.
    let hits = cast_mask(g, g.equal(x, y), dt);
    let axes: Vec<i64> = reduced.iter().enumerate().filter(|(_, &r)| r).map(|(i, _)| i as i64).collect();
    let count = if axes.is_empty() { g.ones_like(hits) } else { g.reduce_sum(hits, &axes, true) };
    let dk = keep_dims(ctx, dy, &reduced);
    Ok(vec![Some(g.mul(g.div(hits, count), dk)), None])
}

fn reshape_to_input(ctx: &GradCtx<'_>, dy: Output) -> Output {
    let g = ctx.g;
    match static_dims(g, ctx.x(0)) {
        Some(d) => g.reshape(dy, &to_i64(&d)),
        None => g.reshape_dynamic(dy, g.shape_of(ctx.x(0))),
    }
}

fn grad_reshape(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    Ok(vec![Some(reshape_to_input(ctx, dy0(ctx, grads)?)), None])
}

fn grad_reshape_first(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let mut v = vec![None; ctx.node.inputs.len()];
    v[0] = Some(reshape_to_input(ctx, dy0(ctx, grads)?));
    Ok(v)
}

fn grad_transpose(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let perm =
        const_ints(ctx.g, ctx.x(1)).ok_or_else(|| ctx.unimplemented("the permutation is not a constant"))?;
    let mut inv = vec![0i64; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    Ok(vec![Some(ctx.g.transpose(dy0(ctx, grads)?, &inv)), None])
}

fn grad_concat(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let n = ctx.node.inputs.len() - 1;
    let axis = const_ints(g, ctx.x(n))
        .and_then(|v| v.first().copied())
        .ok_or_else(|| ctx.unimplemented("the axis is not a constant"))?;
    let rank = g.shape(ctx.x(0)).rank().ok_or_else(|| ctx.unimplemented("the rank is unknown"))?;
    let axis = rill_graph::ops::normalize_axis(axis, rank)?;
    let mut out = Vec::with_capacity(n + 1);
    let mut offset = 0i64;
    for i in 0..n {
        let size = g
            .shape(ctx.x(i))
            .dim(axis)
            .ok_or_else(|| ctx.unimplemented("a value's size along the axis is unknown"))?
            as i64;
        let mut begin = vec![0i64; rank];
        let mut sizes = vec![-1i64; rank];
        begin[axis] = offset;
        sizes[axis] = size;
        out.push(Some(g.slice(dy, &begin, &sizes)));
        offset += size;
    }
    out.push(None);
    Ok(out)
}

/// Zeros of `dims` in `dtype`.
fn zeros_of(g: &Graph, dims: &[usize], dtype: DType) -> Result<Output> {
    Ok(g.fill(rill_graph::Shape::new(dims)?, scalar_tensor(0.0, dtype)))
}

fn grad_slice(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy, dt) = (ctx.g, dy0(ctx, grads)?, ctx.dtype());
    let (Some(xd), Some(begin), Some(yd)) =
        (static_dims(g, ctx.x(0)), const_ints(g, ctx.x(1)), static_dims(g, ctx.y(0)))
    else {
        return Err(ctx.unimplemented("needs static shapes and a constant begin"));
    };
    // Pads the gradient back to the input's shape with zeros, one dimension at a time.
    let mut cur = dy;
    let mut shape = yd.clone();
    for k in 0..xd.len() {
        let before = begin[k] as usize;
        let after = xd[k] - before - yd[k];
        if before == 0 && after == 0 {
            continue;
        }
        let mut parts = Vec::new();
        if before > 0 {
            let mut s = shape.clone();
            s[k] = before;
            parts.push(zeros_of(g, &s, dt)?);
        }
        parts.push(cur);
        if after > 0 {
            let mut s = shape.clone();
            s[k] = after;
            parts.push(zeros_of(g, &s, dt)?);
        }
        cur = g.concat(&parts, k as i64);
        shape[k] = xd[k];
    }
    Ok(vec![Some(cur), None, None])
}

fn grad_gather(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy, dt) = (ctx.g, dy0(ctx, grads)?, ctx.dtype());
    let (params, indices) = (ctx.x(0), ctx.x(1));
    let pd = static_dims(g, params).ok_or_else(|| ctx.unimplemented("the params' shape is not static"))?;
    let rows = pd[0];
    let width: usize = pd[1..].iter().product();
    // A dense scatter-add: one_hot(indices)ᵀ · dy, with the one-hot built by comparing each
    // index against 0..rows.
    let idt = g.dtype(indices);
    let range = match idt {
        DType::I64 => g.constant(Tensor::vector(&(0..rows as i64).collect::<Vec<_>>())),
        _ => g.constant(Tensor::vector(&(0..rows as i32).collect::<Vec<_>>())),
    };
    let flat = g.reshape(indices, &[-1, 1]);
    let one_hot = g.cast(g.equal(flat, range), dt);
    let dy2 = g.reshape(dy, &[-1, width as i64]);
    let dense = g.matmul_t(one_hot, dy2, true, false);
    Ok(vec![Some(g.reshape(dense, &to_i64(&pd))), None])
}

fn grad_tile(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let (Some(xd), Some(m)) = (static_dims(g, ctx.x(0)), const_ints(g, ctx.x(1))) else {
        return Err(ctx.unimplemented("needs a static input shape and constant multiples"));
    };
    if 2 * xd.len() > rill_graph::MAX_RANK {
        return Err(ctx.unimplemented("the input's rank is too large"));
    }
    // [m0·d0, m1·d1, ..] → [m0, d0, m1, d1, ..], summed over the m axes.
    let split: Vec<i64> = xd.iter().zip(&m).flat_map(|(&d, &k)| [k, d as i64]).collect();
    let axes: Vec<i64> = (0..xd.len() as i64).map(|i| 2 * i).collect();
    let r = g.reshape(dy, &split);
    Ok(vec![Some(if axes.is_empty() { r } else { g.reduce_sum(r, &axes, false) }), None])
}

fn grad_fill(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let total = if g.shape(dy).rank() == Some(0) { dy } else { g.reduce_sum(dy, &[], false) };
    Ok(vec![None, Some(total)])
}

fn grad_cast(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let src = ctx.g.dtype(ctx.x(0));
    if !src.is_float() || !ctx.dtype().is_float() {
        return Ok(vec![None]);
    }
    Ok(vec![Some(ctx.g.cast(dy0(ctx, grads)?, src))])
}

fn grad_softmax(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy, y) = (ctx.g, dy0(ctx, grads)?, ctx.y(0));
    let s = g.reduce_sum(g.mul(dy, y), &[-1], true);
    Ok(vec![Some(g.mul(g.sub(dy, s), y))])
}

fn grad_log_softmax(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy, y) = (ctx.g, dy0(ctx, grads)?, ctx.y(0));
    let s = g.reduce_sum(dy, &[-1], true);
    Ok(vec![Some(g.sub(dy, g.mul(g.exp(y), s)))])
}

fn grad_xent(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let g = ctx.g;
    if grads.get(1).copied().flatten().is_some() {
        return Err(ctx.unimplemented("differentiating through the backprop output"));
    }
    let dloss = g.expand_dims(dy0(ctx, grads)?, -1);
    let dlogits = g.mul(dloss, ctx.y(1));
    let dlabels = g.mul(dloss, g.neg(g.log_softmax(ctx.x(0))));
    Ok(vec![Some(dlogits), Some(dlabels)])
}

fn grad_sparse_xent(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let g = ctx.g;
    if grads.get(1).copied().flatten().is_some() {
        return Err(ctx.unimplemented("differentiating through the backprop output"));
    }
    let dloss = g.expand_dims(dy0(ctx, grads)?, -1);
    Ok(vec![Some(g.mul(dloss, ctx.y(1))), None])
}

fn grad_add_n(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let dy = dy0(ctx, grads)?;
    Ok(vec![Some(dy); ctx.node.inputs.len()])
}

/// The forward node's own attrs (strides, padding, data format...), which its gradient ops take
/// as they are; internal attrs such as colocation stay behind.
fn forward_attrs(ctx: &GradCtx<'_>) -> rill_graph::Attrs {
    ctx.node.attrs.iter().filter(|(k, _)| !k.starts_with('_')).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn grad_conv2d(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let (x, f) = (ctx.x(0), ctx.x(1));
    let op = rill_graph::ops::core_op;
    let dx = g.custom(op("Conv2DBackpropInput"), "", &[shape_tensor(g, x), f, dy], forward_attrs(ctx));
    let df = g.custom(op("Conv2DBackpropFilter"), "", &[x, shape_tensor(g, f), dy], forward_attrs(ctx));
    Ok(vec![Some(dx), Some(df)])
}

fn grad_max_pool(ctx: &GradCtx<'_>, grads: &[Option<Output>]) -> Result<Vec<Option<Output>>> {
    let (g, dy) = (ctx.g, dy0(ctx, grads)?);
    let inputs = [ctx.x(0), ctx.y(0), dy];
    Ok(vec![Some(g.custom(rill_graph::ops::core_op("MaxPoolGrad"), "", &inputs, forward_attrs(ctx)))])
}
