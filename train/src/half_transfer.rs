//! Half-precision transfer between tasks: parameters read through a cast to f16/bf16 on their
//! ps device and back to f32 where they are used, and gradients cast down on the worker and back
//! up colocated with their variable, so every tensor crossing a task boundary travels with half
//! the bytes. The variables and their updates stay f32.
//!
//! A parameter read with `read_half` already sends its gradient at half precision: the gradient
//! of the reader's up-cast is a down-cast on the worker, the gradient of the ps-side down-cast an
//! up-cast colocated with the variable. `HalfTransfer` leaves such gradients as they are and casts
//! only those computed from direct reads.

use crate::optimizer::{GradsAndVars, Optimizer};
use rill_graph::{DType, Error, Graph, Output, Result, VariableInfo};

fn check_wire(wire: DType) -> Result<()> {
    match wire {
        DType::F16 | DType::BF16 => Ok(()),
        d => Err(Error::invalid_argument(format!("half-precision transfer needs f16 or bf16, not {d}"))),
    }
}

/// `var` as read through `wire` (f16 or bf16): cast down colocated with `var`, cast back to the
/// variable's dtype under the enclosing device scope (the worker's). Non-float variables are
/// returned as they are.
pub fn read_half(g: &Graph, var: Output, wire: DType) -> Result<Output> {
    check_wire(wire)?;
    let dt = g.dtype(var);
    if dt != DType::F32 {
        return Ok(var);
    }
    let down = g.colocate_with(var, |g| g.cast(var, wire));
    let up = g.cast(down, dt);
    g.status()?;
    Ok(up)
}

/// Whether `grad` already arrives at its variable as an up-cast of a `wire` tensor (the gradient
/// of a `read_half`).
fn already_half(g: &Graph, grad: Output, wire: DType) -> bool {
    let node = g.node(grad.node);
    node.op == "Cast" && node.inputs.first().is_some_and(|&i| g.dtype(i) == wire)
}

/// Each f32 gradient cast to `wire` where it is computed and back to f32 colocated with its
/// variable, so the edge between the two carries half the bytes.
pub fn half_gradients(
    g: &Graph,
    grads_and_vars: &[(Option<Output>, VariableInfo)],
    wire: DType,
) -> Result<GradsAndVars> {
    check_wire(wire)?;
    let out = grads_and_vars
        .iter()
        .map(|(grad, var)| {
            let grad = grad.map(|gr| {
                if g.dtype(gr) != DType::F32 || already_half(g, gr, wire) {
                    return gr;
                }
                let down = g.colocate_with(gr, |g| g.cast(gr, wire));
                g.colocate_with(var.var, |g| g.cast(down, DType::F32))
            });
            (grad, var.clone())
        })
        .collect();
    g.status()?;
    Ok(out)
}

/// Wraps an optimizer so that its gradients travel to the variables at half precision
/// (`half_gradients`); everything else is the wrapped optimizer's, `apply_gradients` included
/// (so a `SyncReplicasOptimizer` keeps its accumulators and tokens).
#[derive(Clone, Copy, Debug)]
pub struct HalfTransfer<O: Optimizer> {
    pub opt: O,
    /// The wire dtype: `DType::F16` or `DType::BF16`.
    pub wire: DType,
}

impl<O: Optimizer> HalfTransfer<O> {
    pub fn new(opt: O, wire: DType) -> Self {
        HalfTransfer { opt, wire }
    }
}

impl<O: Optimizer> Optimizer for HalfTransfer<O> {
    fn name(&self) -> &str {
        self.opt.name()
    }

    fn build_updates(&self, g: &Graph, gv: &[(Output, VariableInfo)], scope: &str) -> Result<Vec<Output>> {
        self.opt.build_updates(g, gv, scope)
    }

    fn compute_gradients(&self, g: &Graph, loss: Output, var_list: &[VariableInfo]) -> Result<GradsAndVars> {
        let gv = self.opt.compute_gradients(g, loss, var_list)?;
        half_gradients(g, &gv, self.wire)
    }

    fn apply_gradients(
        &self,
        g: &Graph,
        grads_and_vars: &[(Option<Output>, VariableInfo)],
        global_step: Option<Output>,
        name: &str,
    ) -> Result<Output> {
        self.opt.apply_gradients(g, grads_and_vars, global_step, name)
    }
}
