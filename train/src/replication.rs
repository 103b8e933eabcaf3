//! In-graph replication: one model copy ("tower") per device in one graph, sharing one set of
//! variables. Synchronous training averages the towers' gradients and applies them once per step;
//! asynchronous training gives each tower its own train op, run from its own client thread.

use crate::optimizer::GradsAndVars;
use rill_graph::{Error, Graph, Output, Result};

/// Builds one tower per device: `build_tower(g, i)` runs under the device scope `devices[i]`
/// and the name scope `tower_{i}`, and returns what the caller needs from the tower (its loss,
/// logits, ...). Towers share variables: the builder must get them with `get_variable` under
/// `Reuse::Auto` scopes (as `crate::models` does), so the first tower creates them, on its
/// device, and the others reuse them. A tower after the first that creates a variable is an
/// error naming it.
pub fn in_graph_towers<T>(
    g: &Graph,
    devices: &[&str],
    build_tower: impl Fn(&Graph, usize) -> T,
) -> Result<Vec<T>> {
    if devices.is_empty() {
        return Err(Error::invalid_argument("in_graph_towers needs at least one device"));
    }
    let mut towers = Vec::with_capacity(devices.len());
    for (i, dev) in devices.iter().enumerate() {
        let before = g.variables().len();
        towers.push(g.with_device(*dev, |g| g.with_name_scope(&format!("tower_{i}"), |g| build_tower(g, i))));
        g.status()?;
        let vars = g.variables();
        if i > 0 && vars.len() > before {
            let names: Vec<&str> = vars[before..].iter().map(|v| v.name.as_str()).collect();
            return Err(Error::invalid_argument(format!(
                "tower {i} on {dev} created variables {names:?}: towers share the variables of \
                 tower 0; get them with get_variable under Reuse::Auto"
            )));
        }
    }
    Ok(towers)
}

/// The gradients of every tower averaged per variable: the mean (`AddN` scaled by `1/n`) of the
/// towers that have a gradient for it, colocated with the variable, so one `apply_gradients`
/// makes a synchronous step. Every tower must list the same variables in the same order.
pub fn average_gradients(g: &Graph, tower_grads: &[GradsAndVars]) -> Result<GradsAndVars> {
    let Some(first) = tower_grads.first() else {
        return Err(Error::invalid_argument("average_gradients needs at least one tower"));
    };
    for (t, gv) in tower_grads.iter().enumerate().skip(1) {
        let same = gv.len() == first.len() && gv.iter().zip(first).all(|(a, b)| a.1.var == b.1.var);
        if !same {
            return Err(Error::invalid_argument(format!(
                "average_gradients: tower {t} has other variables than tower 0"
            )));
        }
    }
    let averaged = g.with_name_scope("average_gradients", |g| {
        first
            .iter()
            .enumerate()
            .map(|(k, (_, var))| {
                let grads: Vec<Output> = tower_grads.iter().filter_map(|gv| gv[k].0).collect();
                let mean = match grads.len() {
                    0 => None,
                    1 => Some(grads[0]),
                    n => Some(g.colocate_with(var.var, |g| {
                        let scale = crate::gradients::scalar_of(g, 1.0 / n as f64, var.dtype);
                        g.mul(g.add_n(&grads), scale)
                    })),
                };
                (mean, var.clone())
            })
            .collect()
    });
    g.status()?;
    Ok(averaged)
}

/// The mean of the towers' losses, for reporting a synchronous step's loss.
pub fn mean_loss(g: &Graph, losses: &[Output]) -> Output {
    let scale = g.scalar(1.0f32 / losses.len().max(1) as f32);
    g.with_name_scope("mean_loss", |g| g.mul(g.add_n(losses), scale))
}
