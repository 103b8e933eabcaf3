//! Optimizers as in `tf.train`: `GradientDescent`, `Momentum`, `Adam` and `RMSProp` emit `Apply*`
//! ops colocated with their variables, with slot variables named `<var>/<Optimizer>`; plus the
//! global step and `exponential_decay`.

use crate::gradients::{gradients, scalar_of};
use rill_graph::ops::core_op;
use rill_graph::{attrs, DType, Error, Graph, Output, Result, VariableInfo, VariableOptions};

/// A learning rate: a constant, or a scalar tensor (a schedule such as `exponential_decay`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LearningRate {
    Value(f64),
    Tensor(Output),
}

impl From<f64> for LearningRate {
    fn from(v: f64) -> LearningRate {
        LearningRate::Value(v)
    }
}

impl From<f32> for LearningRate {
    fn from(v: f32) -> LearningRate {
        LearningRate::Value(f64::from(v))
    }
}

impl From<Output> for LearningRate {
    fn from(o: Output) -> LearningRate {
        LearningRate::Tensor(o)
    }
}

impl LearningRate {
    /// The rate as a scalar of `dtype` (the variable's), cast when it is a tensor of another type.
    fn to_output(self, g: &Graph, dtype: DType) -> Output {
        match self {
            LearningRate::Value(v) => scalar_of(g, v, dtype),
            LearningRate::Tensor(o) if g.dtype(o) == dtype => o,
            LearningRate::Tensor(o) => g.cast(o, dtype),
        }
    }
}

impl LearningRate {
    /// This rate times `factor` (a float scalar tensor): a tensor rate of `factor`'s dtype.
    pub fn scaled(self, g: &Graph, factor: Output) -> LearningRate {
        let dt = g.dtype(factor);
        LearningRate::Tensor(g.mul(self.to_output(g, dt), factor))
    }
}

/// An optimizer whose learning rate a wrapper can replace (`AsyncReplicasOptimizer` scales it
/// per step by the staleness of the gradients).
pub trait WithLearningRate: Optimizer + Sized {
    fn learning_rate(&self) -> LearningRate;
    /// A copy with `lr` as its learning rate, every other setting kept.
    fn with_learning_rate(&self, lr: LearningRate) -> Self;
}

macro_rules! with_learning_rate {
    ($t:ty, $field:ident) => {
        impl WithLearningRate for $t {
            fn learning_rate(&self) -> LearningRate {
                self.$field
            }
            fn with_learning_rate(&self, lr: LearningRate) -> Self {
                let mut o = *self;
                o.$field = lr;
                o
            }
        }
    };
}

with_learning_rate!(GradientDescent, learning_rate);
with_learning_rate!(Momentum, lr);
with_learning_rate!(Adam, lr);
with_learning_rate!(RMSProp, lr);

/// Gradients and the variables they belong to.
pub type GradsAndVars = Vec<(Option<Output>, VariableInfo)>;

/// An optimizer: computes gradients and builds the ops that apply them.
pub trait Optimizer {
    /// TensorFlow's name of the optimizer: the suffix of its slot names and its default op name.
    fn name(&self) -> &str;

    /// Builds the update of each variable (`grads_and_vars` all have a gradient), with op names
    /// under `scope/`; returns the ops that must run for the step to be complete.
    fn build_updates(
        &self,
        g: &Graph,
        grads_and_vars: &[(Output, VariableInfo)],
        scope: &str,
    ) -> Result<Vec<Output>>;

    /// The gradients of `loss` with respect to each variable of `var_list` (`None` when the loss
    /// does not depend on it).
    fn compute_gradients(&self, g: &Graph, loss: Output, var_list: &[VariableInfo]) -> Result<GradsAndVars> {
        let xs: Vec<Output> = var_list.iter().map(|v| v.var).collect();
        let grads = gradients(g, &[loss], &xs, None)?;
        Ok(grads.into_iter().zip(var_list.iter().cloned()).collect())
    }

    /// An op named `name` that, once run, has applied every gradient and then incremented
    /// `global_step` (when given) by one.
    fn apply_gradients(
        &self,
        g: &Graph,
        grads_and_vars: &[(Option<Output>, VariableInfo)],
        global_step: Option<Output>,
        name: &str,
    ) -> Result<Output> {
        // The one lives with the step, so the increment needs no edge from another task.
        let step = global_step.map(|s| (s, g.colocate_with(s, |g| scalar_of(g, 1.0, g.dtype(s)))));
        apply_with_step(self, g, grads_and_vars, step, name)
    }

    /// `compute_gradients` over the trainable variables, then `apply_gradients`.
    fn minimize(&self, g: &Graph, loss: Output, global_step: Option<Output>) -> Result<Output> {
        let vars = g.trainable_variables();
        let gv = self.compute_gradients(g, loss, &vars)?;
        self.apply_gradients(g, &gv, global_step, self.name())
    }
}

/// `Optimizer::apply_gradients` with the global step advanced by `step.1` (a scalar of its
/// dtype) instead of one: the updates of `opt`, each waiting for every gradient, then
/// `AssignAdd(step.0, step.1)` once they are done; the op named `name` waits for all of them
/// with one control edge per device (`group_by_device`).
pub fn apply_with_step<O: Optimizer + ?Sized>(
    opt: &O,
    g: &Graph,
    grads_and_vars: &[(Option<Output>, VariableInfo)],
    step: Option<(Output, Output)>,
    name: &str,
) -> Result<Output> {
    g.status()?;
    let present: Vec<(Output, VariableInfo)> =
        grads_and_vars.iter().filter_map(|(gr, v)| gr.map(|gr| (gr, v.clone()))).collect();
    if present.is_empty() {
        let names: Vec<&str> = grads_and_vars.iter().map(|(_, v)| v.name.as_str()).collect();
        return Err(Error::invalid_argument(format!("No gradients provided for any variable: {names:?}")));
    }
    // No variable changes before every gradient of the step is computed: gradient ops read
    // the weights (MatMul's needs the other operand), and they must see the same weights as
    // the forward pass did, not ones another update of this step already changed.
    let grads: Vec<Output> = present.iter().map(|(gr, _)| *gr).collect();
    let ready = g.group(&format!("{name}/gradients_ready"), &grads);
    let mut deps = g.with_control_dependencies(&[ready], |g| opt.build_updates(g, &present, name))?;
    if let Some((gs, amount)) = step {
        let inc = g.with_control_dependencies(&deps, |g| {
            g.colocate_with(gs, |g| {
                g.custom(
                    core_op("AssignAdd"),
                    &format!("{name}/increment_global_step"),
                    &[gs, amount],
                    attrs! {},
                )
            })
        });
        // The increment already waits for every update.
        deps = vec![inc];
    }
    let op = group_by_device(g, name, &deps);
    g.status()?;
    Ok(op)
}

/// A no-op named `name` that runs after every op of `deps`, with one control edge per device
/// they are on: the ops on each device are first grouped there (TensorFlow's `group` does the
/// same), so a worker's train op waits for a ps task's updates through one cross-task edge,
/// not one per variable.
pub fn group_by_device(g: &Graph, name: &str, deps: &[Output]) -> Output {
    let mut buckets: Vec<(String, Vec<Output>)> = Vec::new();
    for &d in deps {
        let dev = g.node(d.node).device;
        match buckets.iter_mut().find(|(k, _)| *k == dev) {
            Some((_, b)) => b.push(d),
            None => buckets.push((dev, vec![d])),
        }
    }
    let mut inner = Vec::with_capacity(buckets.len());
    for (i, (dev, ops)) in buckets.into_iter().enumerate() {
        if ops.len() == 1 || dev.is_empty() {
            // One op, or ops the placer has yet to place: nothing to merge.
            inner.extend(ops);
        } else {
            inner.push(g.with_device(dev.as_str(), |g| g.group(&format!("{name}/on_device_{i}"), &ops)));
        }
    }
    g.group(name, &inner)
}

/// A slot of `var`: a non-trainable global variable named `<var>/<opt>` (uniquified), colocated
/// with `var`, initialised to `value` everywhere.
pub fn create_slot(g: &Graph, var: &VariableInfo, opt: &str, value: f64) -> Result<Output> {
    let base = format!("{}/{}", var.name, opt);
    let mut name = base.clone();
    let mut k = 0;
    while g.variable_info(&name).is_some() || g.find(&name).is_some() {
        k += 1;
        name = format!("{base}_{k}");
    }
    let opts = VariableOptions { trainable: false, global: true, validate_shape: true };
    // Slots are state, not part of the step that creates them: no control dependencies.
    let slot = g.without_control_dependencies(|g| {
        g.colocate_with(var.var, |g| {
            let init = match var.shape.to_shape() {
                Some(s) => g.fill(s, crate::gradients::scalar_tensor(value, var.dtype)),
                // Unknown shapes take the shape of the variable's initial value.
                None if value == 0.0 => g.zeros_like(var.initial_value),
                None => g.mul(g.ones_like(var.initial_value), scalar_of(g, value, var.dtype)),
            };
            g.variable_with(&name, init, opts)
        })
    });
    g.status()?;
    Ok(slot)
}

/// A non-trainable scalar variable colocated with `anchor` (Adam's `beta1_power`, ...).
fn scalar_variable(g: &Graph, anchor: &VariableInfo, name: &str, value: f64) -> Output {
    let opts = VariableOptions { trainable: false, global: true, validate_shape: true };
    g.without_control_dependencies(|g| {
        g.colocate_with(anchor.var, |g| g.variable_with(name, scalar_of(g, value, anchor.dtype), opts))
    })
}

fn apply_op(
    g: &Graph,
    op: &str,
    scope: &str,
    var: &VariableInfo,
    inputs: &[Output],
    nesterov: Option<bool>,
) -> Output {
    let name = format!("{scope}/update_{}/{op}", var.name);
    let a = match nesterov {
        Some(n) => attrs! { "use_nesterov" => n, "use_locking" => true },
        None => attrs! { "use_locking" => true },
    };
    g.colocate_with(var.var, |g| g.custom(core_op(op), &name, inputs, a))
}

/// Plain gradient descent: `var -= lr * grad`.
#[derive(Clone, Copy, Debug)]
pub struct GradientDescent {
    pub learning_rate: LearningRate,
}

impl GradientDescent {
    pub fn new(learning_rate: impl Into<LearningRate>) -> GradientDescent {
        GradientDescent { learning_rate: learning_rate.into() }
    }
}

impl Optimizer for GradientDescent {
    fn name(&self) -> &str {
        "GradientDescent"
    }

    fn build_updates(&self, g: &Graph, gv: &[(Output, VariableInfo)], scope: &str) -> Result<Vec<Output>> {
        Ok(gv
            .iter()
            .map(|(grad, var)| {
                let lr = g.colocate_with(var.var, |g| self.learning_rate.to_output(g, var.dtype));
                apply_op(g, "ApplyGradientDescent", scope, var, &[var.var, lr, *grad], None)
            })
            .collect())
    }
}

/// Momentum: `accum = momentum * accum + grad; var -= lr * accum` (Nesterov's variant optional).
#[derive(Clone, Copy, Debug)]
pub struct Momentum {
    pub lr: LearningRate,
    pub momentum: f64,
    pub use_nesterov: bool,
}

impl Momentum {
    pub fn new(lr: impl Into<LearningRate>, momentum: f64) -> Momentum {
        Momentum { lr: lr.into(), momentum, use_nesterov: false }
    }
}

impl Optimizer for Momentum {
    fn name(&self) -> &str {
        "Momentum"
    }

    fn build_updates(&self, g: &Graph, gv: &[(Output, VariableInfo)], scope: &str) -> Result<Vec<Output>> {
        let mut ops = Vec::with_capacity(gv.len());
        for (grad, var) in gv {
            let accum = create_slot(g, var, self.name(), 0.0)?;
            let (lr, m) = g.colocate_with(var.var, |g| {
                (self.lr.to_output(g, var.dtype), scalar_of(g, self.momentum, var.dtype))
            });
            let inputs = [var.var, accum, lr, *grad, m];
            ops.push(apply_op(g, "ApplyMomentum", scope, var, &inputs, Some(self.use_nesterov)));
        }
        Ok(ops)
    }
}

/// Adam (Kingma & Ba), with TensorFlow's defaults.
#[derive(Clone, Copy, Debug)]
pub struct Adam {
    pub lr: LearningRate,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
}

impl Default for Adam {
    fn default() -> Adam {
        Adam { lr: LearningRate::Value(0.001), beta1: 0.9, beta2: 0.999, epsilon: 1e-8 }
    }
}

impl Adam {
    pub fn new(lr: impl Into<LearningRate>) -> Adam {
        Adam { lr: lr.into(), ..Adam::default() }
    }
}

impl Optimizer for Adam {
    fn name(&self) -> &str {
        "Adam"
    }

    fn build_updates(&self, g: &Graph, gv: &[(Output, VariableInfo)], scope: &str) -> Result<Vec<Output>> {
        // The powers live with the first variable by name, as in TensorFlow.
        let first = gv.iter().map(|(_, v)| v).min_by(|a, b| a.name.cmp(&b.name)).expect("gv is not empty");
        let b1p = scalar_variable(g, first, "beta1_power", self.beta1);
        let b2p = scalar_variable(g, first, "beta2_power", self.beta2);
        let mut applies = Vec::with_capacity(gv.len());
        for (grad, var) in gv {
            let m = create_slot(g, var, self.name(), 0.0)?;
            let v = create_slot(g, var, self.name(), 0.0)?;
            let scalars = g.colocate_with(var.var, |g| {
                let pow = |p: Output| if g.dtype(p) == var.dtype { p } else { g.cast(p, var.dtype) };
                [
                    pow(b1p),
                    pow(b2p),
                    self.lr.to_output(g, var.dtype),
                    scalar_of(g, self.beta1, var.dtype),
                    scalar_of(g, self.beta2, var.dtype),
                    scalar_of(g, self.epsilon, var.dtype),
                ]
            });
            let mut inputs = vec![var.var, m, v];
            inputs.extend_from_slice(&scalars);
            inputs.push(*grad);
            applies.push(apply_op(g, "ApplyAdam", scope, var, &inputs, Some(false)));
        }
        // The powers advance once every variable has been updated with the current ones.
        let finish = g.with_control_dependencies(&applies, |g| {
            let dt = first.dtype;
            [(b1p, self.beta1, "beta1_power"), (b2p, self.beta2, "beta2_power")].map(|(p, beta, n)| {
                g.colocate_with(first.var, |g| {
                    let next = g.mul(p, scalar_of(g, beta, dt));
                    g.custom(
                        core_op("Assign"),
                        &format!("{scope}/update_{n}"),
                        &[p, next],
                        attrs! { "validate_shape" => true },
                    )
                })
            })
        });
        applies.extend_from_slice(&finish);
        Ok(applies)
    }
}

/// RMSProp, as `tf.train.RMSPropOptimizer` (mean square initialised to ones).
#[derive(Clone, Copy, Debug)]
pub struct RMSProp {
    pub lr: LearningRate,
    pub decay: f64,
    pub momentum: f64,
    pub epsilon: f64,
}

impl RMSProp {
    /// TensorFlow's defaults: decay 0.9, momentum 0, epsilon 1e-10.
    pub fn new(lr: impl Into<LearningRate>) -> RMSProp {
        RMSProp { lr: lr.into(), decay: 0.9, momentum: 0.0, epsilon: 1e-10 }
    }
}

impl Optimizer for RMSProp {
    fn name(&self) -> &str {
        "RMSProp"
    }

    fn build_updates(&self, g: &Graph, gv: &[(Output, VariableInfo)], scope: &str) -> Result<Vec<Output>> {
        let mut ops = Vec::with_capacity(gv.len());
        for (grad, var) in gv {
            let ms = create_slot(g, var, self.name(), 1.0)?;
            let mom = create_slot(g, var, self.name(), 0.0)?;
            let scalars = g.colocate_with(var.var, |g| {
                [
                    self.lr.to_output(g, var.dtype),
                    scalar_of(g, self.decay, var.dtype),
                    scalar_of(g, self.momentum, var.dtype),
                    scalar_of(g, self.epsilon, var.dtype),
                ]
            });
            let mut inputs = vec![var.var, ms, mom];
            inputs.extend_from_slice(&scalars);
            inputs.push(*grad);
            ops.push(apply_op(g, "ApplyRMSProp", scope, var, &inputs, None));
        }
        Ok(ops)
    }
}

/// The graph's global step: an int64 scalar non-trainable variable named `global_step`,
/// initialised to 0. Placement is left to the placer.
pub fn create_global_step(g: &Graph) -> Result<Output> {
    if g.variable_info("global_step").is_some() {
        return Err(Error::already_exists("\"global_step\" already exists"));
    }
    let opts = VariableOptions { trainable: false, global: true, validate_shape: true };
    let step = g.variable_with("global_step", g.scalar(0i64), opts);
    g.status()?;
    Ok(step)
}

/// The variable created by `create_global_step`, if any.
pub fn global_step(g: &Graph) -> Option<Output> {
    g.variable_info("global_step").map(|v| v.var)
}

/// `learning_rate · decay_rate^(global_step / decay_steps)`, as a float32 scalar; with
/// `staircase` the exponent is the integer quotient, so the rate drops in steps.
pub fn exponential_decay(
    g: &Graph,
    learning_rate: f64,
    global_step: Output,
    decay_steps: i64,
    decay_rate: f64,
    staircase: bool,
) -> Output {
    g.with_name_scope("ExponentialDecay", |g| {
        let sdt = g.dtype(global_step);
        let p = if staircase {
            g.cast(g.div(global_step, scalar_of(g, decay_steps as f64, sdt)), DType::F32)
        } else {
            g.div(g.cast(global_step, DType::F32), g.scalar(decay_steps as f32))
        };
        g.mul(g.scalar(learning_rate as f32), g.pow(g.scalar(decay_rate as f32), p))
    })
}
