//! Models for the digits and other small classification problems: a multi-layer perceptron
//! (each layer optionally on its own device), a small convolutional network, and their loss and
//! accuracy. Variables come from `get_variable` with `Reuse::Auto`, so building a model twice in
//! one variable scope (towers, an evaluation copy) shares its weights.

use rill_graph::{DType, Error, Graph, Output, Reuse};

/// What a dense layer applies to its affine output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Linear,
    Relu,
}

/// A seed for layer `layer` of a model seeded with `seed`, never 0 (0 asks for fresh randomness).
fn layer_seed(seed: i64, layer: usize) -> i64 {
    seed.wrapping_mul(1000).wrapping_add(layer as i64 + 1)
}

/// The static size of dimension `dim` of `x`, recording a build error when it is unknown.
fn static_dim(g: &Graph, x: Output, dim: usize, what: &str) -> usize {
    match g.shape(x).dim(dim) {
        Some(d) => d,
        None => {
            g.fail(Error::invalid_argument(format!(
                "{what}: dimension {dim} of '{}' must be known, shape is {}",
                g.node_name(x.node),
                g.shape(x)
            )));
            1
        }
    }
}

/// The value of variable `var` when this step reads it (TensorFlow's `<var>/read`). Ops fed the
/// variable's reference read it when they run, so a gradient op running after the step's own
/// update would see the new value; every use of a snapshot sees the value the forward pass used.
pub fn read(g: &Graph, var: Output) -> Output {
    let name = format!("{}/read", g.node_name(var.node).rsplit('/').next().unwrap_or("var"));
    g.identity_named(&name, var)
}

/// `activation(x · weights + biases)` under variable scope `name`: weights `[in, units]` from a
/// truncated normal with He scaling (`sqrt(2 / in)`, or `sqrt(1 / in)` for a linear layer),
/// biases zero.
pub fn dense(g: &Graph, x: Output, units: usize, activation: Activation, seed: i64, name: &str) -> Output {
    let fan_in = static_dim(g, x, 1, name);
    let gain = if activation == Activation::Relu { 2.0 } else { 1.0 };
    let stddev = (gain / fan_in as f32).sqrt();
    g.variable_scope(name, Reuse::Auto, |g| {
        let w = g.get_variable("weights", [fan_in, units], DType::F32, |g, s, _| {
            g.truncated_normal(s, stddev, seed)
        });
        let b = g.get_variable("biases", [units], DType::F32, |g, s, _| g.zeros(s));
        let (w, b) = (read(g, w), read(g, b));
        let y = g.bias_add(g.matmul(x, w), b);
        match activation {
            Activation::Linear => y,
            Activation::Relu => g.relu(y),
        }
    })
}

/// A multi-layer perceptron: ReLU layers of `hidden` units, then a linear layer of `classes`
/// logits; layers are `mlp/layer{i}` seeded from `seed`.
pub fn mlp(g: &Graph, x: Output, hidden: &[usize], classes: usize, seed: i64) -> Output {
    mlp_on_devices(g, x, hidden, classes, seed, &[])
}

/// `mlp` with layer `i` under the device scope `layer_devices[i]` (the last entry for the layers
/// beyond; no scope when empty): model parallelism, where the activations cross devices through
/// the Send/Recv pairs the partitioner adds. The same seeds give the same weights as `mlp`.
pub fn mlp_on_devices(
    g: &Graph,
    x: Output,
    hidden: &[usize],
    classes: usize,
    seed: i64,
    layer_devices: &[&str],
) -> Output {
    g.variable_scope("mlp", Reuse::Auto, |g| {
        let mut h = x;
        let layers = hidden.iter().map(|&u| (u, Activation::Relu)).chain([(classes, Activation::Linear)]);
        for (i, (units, act)) in layers.enumerate() {
            let build = |g: &Graph| dense(g, h, units, act, layer_seed(seed, i), &format!("layer{i}"));
            h = match layer_devices.get(i).or(layer_devices.last()) {
                Some(dev) => g.with_device(*dev, build),
                None => build(g),
            };
        }
        h
    })
}

/// Filters of the convolution in `small_cnn`.
pub const CNN_FILTERS: usize = 16;

/// A small convolutional network on NHWC images: 3 × 3 convolution of `CNN_FILTERS` filters
/// (SAME padding) → ReLU → 2 × 2 max pooling → a linear layer of `classes` logits.
pub fn small_cnn(g: &Graph, x_nhwc: Output, classes: usize, seed: i64) -> Output {
    let (h, w, c) = (
        static_dim(g, x_nhwc, 1, "small_cnn"),
        static_dim(g, x_nhwc, 2, "small_cnn"),
        static_dim(g, x_nhwc, 3, "small_cnn"),
    );
    g.variable_scope("cnn", Reuse::Auto, |g| {
        let conv = g.variable_scope("conv0", Reuse::Auto, |g| {
            let stddev = (2.0 / (9 * c) as f32).sqrt();
            let f = g.get_variable("filters", [3, 3, c, CNN_FILTERS], DType::F32, |g, s, _| {
                g.truncated_normal(s, stddev, layer_seed(seed, 0))
            });
            let b = g.get_variable("biases", [CNN_FILTERS], DType::F32, |g, s, _| g.zeros(s));
            let (f, b) = (read(g, f), read(g, b));
            g.relu(g.bias_add(g.conv2d(x_nhwc, f, [1, 1], "SAME"), b))
        });
        let pooled = g.max_pool(conv, [2, 2], [2, 2], "SAME");
        let flat = g.reshape(pooled, &[-1, (h.div_ceil(2) * w.div_ceil(2) * CNN_FILTERS) as i64]);
        dense(g, flat, classes, Activation::Linear, layer_seed(seed, 1), "layer1")
    })
}

/// `[n, side * side]` images as `[n, side, side, 1]` NHWC.
pub fn as_nhwc(g: &Graph, images: Output, side: usize) -> Output {
    g.reshape(images, &[-1, side as i64, side as i64, 1])
}

/// The fraction of rows whose largest logit is at their label (labels int32 or int64).
pub fn accuracy(g: &Graph, logits: Output, labels: Output) -> Output {
    g.with_name_scope("accuracy", |g| {
        let labels = if g.dtype(labels) == DType::I64 { labels } else { g.cast(labels, DType::I64) };
        let hit = g.equal(g.argmax(logits, 1), labels);
        g.reduce_mean(g.cast(hit, DType::F32), &[], false)
    })
}

/// The mean softmax cross-entropy of `logits` against integer class `labels`.
pub fn softmax_loss(g: &Graph, logits: Output, labels: Output) -> Output {
    g.with_name_scope("loss", |g| {
        let (per_example, _) = g.sparse_softmax_cross_entropy_with_logits(logits, labels);
        g.reduce_mean(per_example, &[], false)
    })
}

/// Whether this build can train `small_cnn` on the CPU: Conv2D and MaxPool kernels and their
/// gradients must all exist.
pub fn cnn_trainable_on_cpu() -> bool {
    let kernel = |op: &str| rill_device_cpu::KERNELS.iter().any(|k| k.op == op);
    let grad = |op: &str| crate::GRADIENTS.iter().any(|(name, _)| *name == op);
    ["Conv2D", "MaxPool"].iter().all(|&op| kernel(op) && grad(op))
        && ["Conv2DBackpropInput", "Conv2DBackpropFilter", "MaxPoolGrad"].iter().all(|&op| kernel(op))
}
