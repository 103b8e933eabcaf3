//! Convenience builders for the core ops, in TensorFlow's Python vocabulary (`g.matmul`,
//! `g.reduce_sum`, `g.variable`, `g.global_variables_initializer`, ...).

use crate::graph::{Reuse, VariableInfo, VariableOptions};
use crate::ops::core_op;
use crate::{AttrValue, Attrs, DType, Element, Error, Graph, NodeId, Output, PartialShape, Shape, Tensor};

/// Builds an `Attrs` map: `attrs! { "T" => DType::F32, "transpose_a" => true }`.
#[macro_export]
macro_rules! attrs {
    () => { $crate::Attrs::new() };
    ($($k:expr => $v:expr),+ $(,)?) => {{
        let mut a = $crate::Attrs::new();
        $( a.insert($k.to_string(), $crate::AttrValue::from($v)); )+
        a
    }};
}

impl Graph {
    fn core(&self, op: &str, inputs: &[Output], attrs: Attrs) -> Output {
        self.op(core_op(op), "", inputs, attrs)
    }

    fn core_named(&self, op: &str, name: &str, inputs: &[Output], attrs: Attrs) -> Output {
        self.op(core_op(op), name, inputs, attrs)
    }

    // ---- sources ----

    pub fn constant(&self, t: Tensor) -> Output {
        self.core("Const", &[], attrs! { "value" => t })
    }

    pub fn constant_named(&self, name: &str, t: Tensor) -> Output {
        self.core_named("Const", name, &[], attrs! { "value" => t })
    }

    pub fn scalar<T: Element>(&self, v: T) -> Output {
        self.constant(Tensor::scalar(v))
    }

    /// A constant int32 vector (axes, shapes, permutations).
    pub fn ints(&self, v: &[i64]) -> Output {
        let v32: Vec<i32> = v.iter().map(|&x| x as i32).collect();
        self.constant(Tensor::vector(&v32))
    }

    pub fn placeholder(&self, name: &str, dtype: DType, shape: impl Into<PartialShape>) -> Output {
        self.core_named("Placeholder", name, &[], attrs! { "dtype" => dtype, "shape" => shape.into() })
    }

    pub fn placeholder_with_default(
        &self,
        name: &str,
        default: Output,
        shape: impl Into<PartialShape>,
    ) -> Output {
        self.core_named("PlaceholderWithDefault", name, &[default], attrs! { "shape" => shape.into() })
    }

    pub fn zeros(&self, shape: impl Into<Shape>) -> Output {
        self.fill(shape.into(), Tensor::scalar(0f32))
    }

    pub fn ones(&self, shape: impl Into<Shape>) -> Output {
        self.fill(shape.into(), Tensor::scalar(1f32))
    }

    /// A tensor of `shape` filled with the scalar `value` (any dtype).
    pub fn fill(&self, shape: Shape, value: Tensor) -> Output {
        let dims: Vec<i64> = shape.dims().iter().map(|&d| d as i64).collect();
        let d = self.ints(&dims);
        let v = self.constant(value);
        self.core("Fill", &[d, v], attrs! {})
    }

    pub fn fill_dynamic(&self, dims: Output, value: Output) -> Output {
        self.core("Fill", &[dims, value], attrs! {})
    }

    fn random(&self, op: &str, shape: Shape, dtype: DType, seed: i64) -> Output {
        let dims: Vec<i64> = shape.dims().iter().map(|&d| d as i64).collect();
        let s = self.ints(&dims);
        self.core(op, &[s], attrs! { "dtype" => dtype, "seed" => seed, "seed2" => 0i64 })
    }

    /// Uniform values in `[min, max)`, f32.
    pub fn random_uniform(&self, shape: impl Into<Shape>, min: f32, max: f32, seed: i64) -> Output {
        let u = self.random("RandomUniform", shape.into(), DType::F32, seed);
        let scaled = self.mul(u, self.scalar(max - min));
        self.add(scaled, self.scalar(min))
    }

    /// Normal values with mean 0 and `stddev`, f32.
    pub fn random_normal(&self, shape: impl Into<Shape>, stddev: f32, seed: i64) -> Output {
        let n = self.random("RandomStandardNormal", shape.into(), DType::F32, seed);
        self.mul(n, self.scalar(stddev))
    }

    /// Normal values with mean 0 and `stddev`, redrawn beyond two standard deviations, f32.
    pub fn truncated_normal(&self, shape: impl Into<Shape>, stddev: f32, seed: i64) -> Output {
        let n = self.random("TruncatedNormal", shape.into(), DType::F32, seed);
        self.mul(n, self.scalar(stddev))
    }

    /// A raw random op (`RandomUniform`, `RandomStandardNormal`, `TruncatedNormal`) of any float dtype.
    pub fn random_op(&self, op: &str, shape: impl Into<Shape>, dtype: DType, seed: i64) -> Output {
        self.random(op, shape.into(), dtype, seed)
    }

    // ---- structure ----

    pub fn identity(&self, x: Output) -> Output {
        self.core("Identity", &[x], attrs! {})
    }

    pub fn identity_named(&self, name: &str, x: Output) -> Output {
        self.core_named("Identity", name, &[x], attrs! {})
    }

    pub fn stop_gradient(&self, x: Output) -> Output {
        self.core("StopGradient", &[x], attrs! {})
    }

    pub fn no_op(&self, name: &str) -> Output {
        self.core_named("NoOp", name, &[], attrs! {})
    }

    /// A `NoOp` that runs after all of `deps` (TF's `tf.group`).
    pub fn group(&self, name: &str, deps: &[Output]) -> Output {
        self.with_control_dependencies(deps, |g| g.no_op(name))
    }

    // ---- variables ----

    /// A variable initialised from `initial_value` (TF's `tf.Variable`); returns its reference.
    pub fn variable(&self, name: &str, initial_value: Output) -> Output {
        self.variable_with(name, initial_value, VariableOptions::default())
    }

    /// A variable with options (trainable, global collection, shape validation).
    pub fn variable_with(&self, name: &str, initial_value: Output, opts: VariableOptions) -> Output {
        let info = self.info(initial_value);
        let Some(info) = info else {
            self.fail(Error::invalid_argument(format!("variable '{name}': initial value failed to build")));
            return self.core_named("NoOp", name, &[], attrs! {});
        };
        let shape = if opts.validate_shape { info.shape.clone() } else { PartialShape::unknown() };
        let var = self.core_named(
            "VariableV2",
            name,
            &[],
            attrs! { "dtype" => info.dtype, "shape" => shape.clone() },
        );
        let var_name = self.node_name(var.node);
        let init = self.without_control_dependencies(|g| {
            g.colocate_with(var, |g| {
                g.core_named(
                    "Assign",
                    &format!("{var_name}/Assign"),
                    &[var, initial_value],
                    attrs! { "validate_shape" => opts.validate_shape },
                )
            })
        });
        let r = self.register_variable(VariableInfo {
            name: var_name,
            var,
            initializer: init.node,
            initial_value,
            trainable: opts.trainable,
            global: opts.global,
            dtype: info.dtype,
            shape,
        });
        if let Err(e) = r {
            self.fail(e);
        }
        var
    }

    /// Gets or creates a variable by its name in the current variable scope. A variable created
    /// here is initialised by `initializer(shape)`; reuse follows the scope (`Reuse`).
    pub fn get_variable(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        dtype: DType,
        initializer: impl FnOnce(&Graph, Shape, DType) -> Output,
    ) -> Output {
        let shape = shape.into();
        let (prefix, reuse) = self.var_scope_state();
        let full = format!("{prefix}{name}");
        match (self.variable_info(&full), reuse) {
            (Some(v), Reuse::Yes | Reuse::Auto) => {
                if v.dtype != dtype || !v.shape.is_compatible_with(&shape) {
                    self.fail(Error::invalid_argument(format!(
                        "variable '{full}' exists with {} {}, asked for {dtype} {shape}",
                        v.dtype, v.shape
                    )));
                }
                v.var
            }
            (Some(_), Reuse::No) => {
                self.fail(Error::invalid_argument(format!(
                    "variable '{full}' already exists; reuse it with Reuse::Yes or Reuse::Auto"
                )));
                self.variable_info(&full).map(|v| v.var).unwrap_or(Output::new(NodeId(0), 0))
            }
            (None, Reuse::Yes) => {
                self.fail(Error::invalid_argument(format!(
                    "variable '{full}' does not exist; create it with Reuse::No or Reuse::Auto"
                )));
                self.no_op(&format!("{full}/missing"))
            }
            (None, _) => {
                // The variable's own name is exact: variable scopes, not name scopes, decide it.
                let init = self
                    .with_exact_name_scope(&format!("{full}/Initializer/"), |g| initializer(g, shape, dtype));
                self.with_exact_name_scope("", |g| g.variable(&full, init))
            }
        }
    }

    /// Runs `f` with exactly `scope` as the name-scope prefix (ignoring the enclosing scopes).
    pub fn with_exact_name_scope<R>(&self, scope: &str, f: impl FnOnce(&Graph) -> R) -> R {
        let prev = self.set_name_scope(scope);
        let r = f(self);
        self.set_name_scope(&prev);
        r
    }

    pub fn assign(&self, var: Output, value: Output) -> Output {
        self.colocate_with(var, |g| g.core("Assign", &[var, value], attrs! { "validate_shape" => true }))
    }

    pub fn assign_add(&self, var: Output, value: Output) -> Output {
        self.colocate_with(var, |g| g.core("AssignAdd", &[var, value], attrs! {}))
    }

    pub fn assign_sub(&self, var: Output, value: Output) -> Output {
        self.colocate_with(var, |g| g.core("AssignSub", &[var, value], attrs! {}))
    }

    pub fn is_variable_initialized(&self, var: Output) -> Output {
        self.colocate_with(var, |g| g.core("IsVariableInitialized", &[var], attrs! {}))
    }

    /// One op that runs the initialisers of the given variables.
    pub fn variables_initializer(&self, vars: &[VariableInfo], name: &str) -> Output {
        let deps: Vec<Output> = vars.iter().map(|v| Output::new(v.initializer, 0)).collect();
        self.group(name, &deps)
    }

    /// One op that initialises every global variable (TF's `global_variables_initializer`).
    pub fn global_variables_initializer(&self) -> Output {
        self.variables_initializer(&self.global_variables(), "init")
    }

    // ---- math ----

    pub fn add(&self, a: Output, b: Output) -> Output {
        self.core("Add", &[a, b], attrs! {})
    }
    pub fn sub(&self, a: Output, b: Output) -> Output {
        self.core("Sub", &[a, b], attrs! {})
    }
    pub fn mul(&self, a: Output, b: Output) -> Output {
        self.core("Mul", &[a, b], attrs! {})
    }
    pub fn div(&self, a: Output, b: Output) -> Output {
        self.core("Div", &[a, b], attrs! {})
    }
    pub fn pow(&self, a: Output, b: Output) -> Output {
        self.core("Pow", &[a, b], attrs! {})
    }
    pub fn maximum(&self, a: Output, b: Output) -> Output {
        self.core("Maximum", &[a, b], attrs! {})
    }
    pub fn minimum(&self, a: Output, b: Output) -> Output {
        self.core("Minimum", &[a, b], attrs! {})
    }
    pub fn squared_difference(&self, a: Output, b: Output) -> Output {
        self.core("SquaredDifference", &[a, b], attrs! {})
    }
    pub fn equal(&self, a: Output, b: Output) -> Output {
        self.core("Equal", &[a, b], attrs! {})
    }
    pub fn greater(&self, a: Output, b: Output) -> Output {
        self.core("Greater", &[a, b], attrs! {})
    }
    pub fn less(&self, a: Output, b: Output) -> Output {
        self.core("Less", &[a, b], attrs! {})
    }
    pub fn neg(&self, x: Output) -> Output {
        self.core("Neg", &[x], attrs! {})
    }
    pub fn abs(&self, x: Output) -> Output {
        self.core("Abs", &[x], attrs! {})
    }
    pub fn square(&self, x: Output) -> Output {
        self.core("Square", &[x], attrs! {})
    }
    pub fn sqrt(&self, x: Output) -> Output {
        self.core("Sqrt", &[x], attrs! {})
    }
    pub fn rsqrt(&self, x: Output) -> Output {
        self.core("Rsqrt", &[x], attrs! {})
    }
    pub fn reciprocal(&self, x: Output) -> Output {
        self.core("Reciprocal", &[x], attrs! {})
    }
    pub fn exp(&self, x: Output) -> Output {
        self.core("Exp", &[x], attrs! {})
    }
    pub fn log(&self, x: Output) -> Output {
        self.core("Log", &[x], attrs! {})
    }
    pub fn relu(&self, x: Output) -> Output {
        self.core("Relu", &[x], attrs! {})
    }
    pub fn sigmoid(&self, x: Output) -> Output {
        self.core("Sigmoid", &[x], attrs! {})
    }
    pub fn tanh(&self, x: Output) -> Output {
        self.core("Tanh", &[x], attrs! {})
    }

    pub fn matmul(&self, a: Output, b: Output) -> Output {
        self.matmul_t(a, b, false, false)
    }

    /// MatMul with transpose flags.
    pub fn matmul_t(&self, a: Output, b: Output, transpose_a: bool, transpose_b: bool) -> Output {
        self.core("MatMul", &[a, b], attrs! { "transpose_a" => transpose_a, "transpose_b" => transpose_b })
    }

    /// 2-D convolution, NHWC input and `[kh, kw, in, out]` filter; `padding` is "SAME" or "VALID".
    pub fn conv2d(&self, input: Output, filter: Output, strides: [i64; 2], padding: &str) -> Output {
        self.core(
            "Conv2D",
            &[input, filter],
            attrs! { "strides" => vec![1, strides[0], strides[1], 1], "padding" => padding, "data_format" => "NHWC" },
        )
    }

    /// Max pooling over `ksize` windows, NHWC.
    pub fn max_pool(&self, input: Output, ksize: [i64; 2], strides: [i64; 2], padding: &str) -> Output {
        self.core(
            "MaxPool",
            &[input],
            attrs! {
                "ksize" => vec![1, ksize[0], ksize[1], 1],
                "strides" => vec![1, strides[0], strides[1], 1],
                "padding" => padding,
                "data_format" => "NHWC"
            },
        )
    }

    pub fn bias_add(&self, x: Output, bias: Output) -> Output {
        self.core("BiasAdd", &[x, bias], attrs! {})
    }

    fn reduce(&self, op: &str, x: Output, axes: &[i64], keep_dims: bool) -> Output {
        let axes = if axes.is_empty() {
            // No axes: reduce over all dimensions, as TF's Python wrappers do.
            let r = self.shape(x).rank().unwrap_or(0) as i64;
            (0..r).collect::<Vec<_>>()
        } else {
            axes.to_vec()
        };
        let a = self.ints(&axes);
        self.core(op, &[x, a], attrs! { "keep_dims" => keep_dims })
    }

    /// Sum over `axes` (all axes when empty).
    pub fn reduce_sum(&self, x: Output, axes: &[i64], keep_dims: bool) -> Output {
        self.reduce("Sum", x, axes, keep_dims)
    }
    pub fn reduce_mean(&self, x: Output, axes: &[i64], keep_dims: bool) -> Output {
        self.reduce("Mean", x, axes, keep_dims)
    }
    pub fn reduce_max(&self, x: Output, axes: &[i64], keep_dims: bool) -> Output {
        self.reduce("Max", x, axes, keep_dims)
    }
    pub fn reduce_min(&self, x: Output, axes: &[i64], keep_dims: bool) -> Output {
        self.reduce("Min", x, axes, keep_dims)
    }

    pub fn reshape(&self, x: Output, shape: &[i64]) -> Output {
        let s = self.ints(shape);
        self.core("Reshape", &[x, s], attrs! {})
    }

    pub fn reshape_dynamic(&self, x: Output, shape: Output) -> Output {
        self.core("Reshape", &[x, shape], attrs! {})
    }

    pub fn transpose(&self, x: Output, perm: &[i64]) -> Output {
        let p = self.ints(perm);
        self.core("Transpose", &[x, p], attrs! {})
    }

    pub fn expand_dims(&self, x: Output, axis: i64) -> Output {
        let a = self.constant(Tensor::scalar(axis as i32));
        self.core("ExpandDims", &[x, a], attrs! {})
    }

    /// Removes dimensions of size 1 (`axes`, or all of them when empty).
    pub fn squeeze(&self, x: Output, axes: &[i64]) -> Output {
        self.core("Squeeze", &[x], attrs! { "squeeze_dims" => axes.to_vec() })
    }

    pub fn concat(&self, values: &[Output], axis: i64) -> Output {
        let mut inputs = values.to_vec();
        inputs.push(self.constant(Tensor::scalar(axis as i32)));
        self.core("ConcatV2", &inputs, attrs! {})
    }

    /// `size[i] == -1` takes the rest of dimension `i`.
    pub fn slice(&self, x: Output, begin: &[i64], size: &[i64]) -> Output {
        let b = self.ints(begin);
        let s = self.ints(size);
        self.core("Slice", &[x, b, s], attrs! {})
    }

    pub fn slice_dynamic(&self, x: Output, begin: Output, size: Output) -> Output {
        self.core("Slice", &[x, begin, size], attrs! {})
    }

    /// Rows of `params` (along axis 0) picked by `indices`.
    pub fn gather(&self, params: Output, indices: Output) -> Output {
        self.core("Gather", &[params, indices], attrs! {})
    }

    pub fn tile(&self, x: Output, multiples: &[i64]) -> Output {
        let m = self.ints(multiples);
        self.core("Tile", &[x, m], attrs! {})
    }

    pub fn cast(&self, x: Output, dtype: DType) -> Output {
        let src = self.dtype(x);
        self.core("Cast", &[x], attrs! { "SrcT" => src, "DstT" => dtype })
    }

    pub fn softmax(&self, logits: Output) -> Output {
        self.core("Softmax", &[logits], attrs! {})
    }

    pub fn log_softmax(&self, logits: Output) -> Output {
        self.core("LogSoftmax", &[logits], attrs! {})
    }

    /// Per-example loss and its gradient with respect to the logits.
    pub fn softmax_cross_entropy_with_logits(&self, logits: Output, labels: Output) -> (Output, Output) {
        let o = self.core("SoftmaxCrossEntropyWithLogits", &[logits, labels], attrs! {});
        (o, Output::new(o.node, 1))
    }

    /// Per-example loss for integer class labels, and its gradient with respect to the logits.
    pub fn sparse_softmax_cross_entropy_with_logits(
        &self,
        logits: Output,
        labels: Output,
    ) -> (Output, Output) {
        let o = self.core("SparseSoftmaxCrossEntropyWithLogits", &[logits, labels], attrs! {});
        (o, Output::new(o.node, 1))
    }

    pub fn argmax(&self, x: Output, axis: i64) -> Output {
        let a = self.constant(Tensor::scalar(axis as i32));
        self.core("ArgMax", &[x, a], attrs! { "output_type" => DType::I64 })
    }

    pub fn zeros_like(&self, x: Output) -> Output {
        self.core("ZerosLike", &[x], attrs! {})
    }

    pub fn ones_like(&self, x: Output) -> Output {
        self.core("OnesLike", &[x], attrs! {})
    }

    pub fn shape_of(&self, x: Output) -> Output {
        self.core("Shape", &[x], attrs! { "out_type" => DType::I32 })
    }

    pub fn add_n(&self, xs: &[Output]) -> Output {
        if xs.len() == 1 {
            return xs[0];
        }
        self.core("AddN", xs, attrs! {})
    }

    /// Sums a (broadcast) tensor down to `shape` (a 1-D int tensor): the reverse of broadcasting.
    pub fn sum_to_shape(&self, x: Output, shape: Output) -> Output {
        self.core("SumToShape", &[x, shape], attrs! {})
    }

    /// An op of any registered kind, by its definition (for ops from other crates' tables).
    pub fn custom(&self, op: &'static crate::OpDef, name: &str, inputs: &[Output], attrs: Attrs) -> Output {
        self.op(op, name, inputs, attrs)
    }

    /// Sets an attribute on a node after creation (used by builders of other crates).
    pub fn set_attr(&self, node: NodeId, key: &str, value: AttrValue) {
        self.with_node_mut(node, |n| {
            n.attrs.insert(key.to_string(), value);
        });
    }
}
