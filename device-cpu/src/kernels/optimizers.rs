//! The `Apply*` optimizer ops: in-place updates of a variable and its slots (TensorFlow's
//! ApplyGradientDescent, ApplyMomentum, ApplyAdam and ApplyRMSProp), returning the new value.

use super::{parallel_items, unsupported, Arith, Float, FloatNum, CHUNK_MIN_ELEMENTS};
use rill_graph::device::chunk_len;
use rill_graph::{
    dispatch_float, AttrsExt, Error, IntraOpPool, Kernel, KernelInit, OpKernel, OpKernelContext, Result,
    Tensor, Variable,
};
use std::sync::Arc;

/// Variables of at least this many elements are updated in chunks over the intra-op pool. An
/// update follows the step's large products, so the pool's helpers are still awake, and a
/// 784×256 layer's weights take ~25 µs on one thread, the step's last serial stretch.
const PARALLEL_UPDATE_MIN: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Opt {
    GradientDescent,
    Momentum,
    Adam,
    RmsProp,
}

impl Opt {
    /// Reference inputs: the variable, then its slots.
    fn refs(self) -> usize {
        match self {
            Opt::GradientDescent => 1,
            Opt::Momentum => 2,
            Opt::Adam | Opt::RmsProp => 3,
        }
    }

    /// Index of the gradient input: last, except ApplyMomentum's `(var, accum, lr, grad, momentum)`.
    fn grad_index(self) -> usize {
        match self {
            Opt::Momentum => 3,
            _ => self.refs() + self.scalars(),
        }
    }

    /// Scalar inputs (all inputs that are neither references nor the gradient), in input order.
    fn scalars(self) -> usize {
        match self {
            Opt::GradientDescent => 1,
            Opt::Momentum => 2,
            Opt::Adam => 6,
            Opt::RmsProp => 4,
        }
    }
}

struct ApplyK {
    opt: Opt,
    nesterov: bool,
}

pub fn create_apply(init: &KernelInit<'_>) -> Result<Kernel> {
    let opt = match init.node.op.as_str() {
        "ApplyGradientDescent" => Opt::GradientDescent,
        "ApplyMomentum" => Opt::Momentum,
        "ApplyAdam" => Opt::Adam,
        "ApplyRMSProp" => Opt::RmsProp,
        other => return Err(Error::internal(format!("no optimizer kernel for {other}"))),
    };
    Ok(Kernel::sized(ApplyK { opt, nesterov: init.attrs().bool_or("use_nesterov", false) }, init))
}

/// Runs `f` on the values of `vars` under their locks, taken in input order; returns the first
/// variable's new value.
fn update_all(vars: &[Arc<Variable>], f: impl FnOnce(&mut [&mut Tensor]) -> Result<()>) -> Result<Tensor> {
    let mut out = None;
    match vars {
        [v] => return v.update(|a| f(&mut [a])),
        [v, s1] => {
            s1.update(|b| {
                out = Some(v.update(|a| f(&mut [a, b]))?);
                Ok(())
            })?;
        }
        [v, s1, s2] => {
            s2.update(|c| {
                s1.update(|b| {
                    out = Some(v.update(|a| f(&mut [a, b, c]))?);
                    Ok(())
                })?;
                Ok(())
            })?;
        }
        _ => return Err(Error::internal(format!("{} references to update", vars.len()))),
    }
    out.ok_or_else(|| Error::internal("the variable was not updated"))
}

impl ApplyK {
    fn run<T: FloatNum>(
        &self,
        pool: &dyn IntraOpPool,
        vars: &[Arc<Variable>],
        scalars: &[Tensor],
        grad: &Tensor,
    ) -> Result<Tensor> {
        let s: Vec<T::A> = scalars
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.num_elements() != 1 {
                    return Err(Error::invalid_argument(format!(
                        "scalar input {} must be a scalar, has shape {}",
                        vars.len() + i,
                        t.shape()
                    )));
                }
                Ok(t.as_slice::<T>()?[0].load())
            })
            .collect::<Result<_>>()?;
        let g = grad.as_slice::<T>()?;
        // Elements per chunk; the chunks of every operand line up.
        let per = if g.len() >= PARALLEL_UPDATE_MIN {
            chunk_len(pool, g.len(), CHUNK_MIN_ELEMENTS)
        } else {
            g.len().max(1)
        };
        let (opt, nesterov) = (self.opt, self.nesterov);
        update_all(vars, |ts| {
            for (i, t) in ts.iter().enumerate() {
                if t.shape() != grad.shape() || t.dtype() != grad.dtype() {
                    return Err(Error::invalid_argument(format!(
                        "{} of {} {} does not match the gradient's {} {}",
                        vars[i].name,
                        t.dtype(),
                        t.shape(),
                        grad.dtype(),
                        grad.shape()
                    )));
                }
            }
            let one = T::A::ONE;
            let nrefs = ts.len();
            match (opt, ts) {
                (Opt::GradientDescent, [var]) => {
                    let alpha = s[0];
                    let parts = var.as_mut_slice::<T>()?.chunks_mut(per).zip(g.chunks(per)).collect();
                    parallel_items(pool, parts, |_, (w, g)| {
                        for (w, &d) in w.iter_mut().zip(g) {
                            *w = T::store(w.load().sub(alpha.mul(d.load())));
                        }
                    });
                }
                (Opt::Momentum, [var, accum]) => {
                    let (lr, momentum) = (s[0], s[1]);
                    let (w, a) = (var.as_mut_slice::<T>()?, accum.as_mut_slice::<T>()?);
                    let parts = w.chunks_mut(per).zip(a.chunks_mut(per)).zip(g.chunks(per)).collect();
                    parallel_items(pool, parts, |_, ((w, a), g)| {
                        for ((w, a), &d) in w.iter_mut().zip(a.iter_mut()).zip(g) {
                            let d = d.load();
                            let acc = a.load().mul(momentum).add(d);
                            *a = T::store(acc);
                            let step =
                                if nesterov { d.mul(lr).add(acc.mul(momentum).mul(lr)) } else { acc.mul(lr) };
                            *w = T::store(w.load().sub(step));
                        }
                    });
                }
                (Opt::Adam, [var, m, v]) => {
                    let [beta1_power, beta2_power, lr, beta1, beta2, eps] = s[..] else {
                        return Err(Error::internal("Adam takes six scalars"));
                    };
                    let lr_t = lr.mul(one.sub(beta2_power).sqrt()).div(one.sub(beta1_power));
                    let (w, m, v) =
                        (var.as_mut_slice::<T>()?, m.as_mut_slice::<T>()?, v.as_mut_slice::<T>()?);
                    let parts =
                        w.chunks_mut(per).zip(m.chunks_mut(per)).zip(v.chunks_mut(per)).zip(g.chunks(per));
                    parallel_items(pool, parts.collect(), |_, (((w, m), v), g)| {
                        for (((w, m), v), &d) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                            let d = d.load();
                            let mn = m.load().add(d.sub(m.load()).mul(one.sub(beta1)));
                            let vn = v.load().add(d.mul(d).sub(v.load()).mul(one.sub(beta2)));
                            *m = T::store(mn);
                            *v = T::store(vn);
                            let num = if nesterov { d.mul(one.sub(beta1)).add(beta1.mul(mn)) } else { mn };
                            *w = T::store(w.load().sub(num.mul(lr_t).div(vn.sqrt().add(eps))));
                        }
                    });
                }
                (Opt::RmsProp, [var, ms, mom]) => {
                    let [lr, rho, momentum, eps] = s[..] else {
                        return Err(Error::internal("RMSProp takes four scalars"));
                    };
                    let (w, ms, mom) =
                        (var.as_mut_slice::<T>()?, ms.as_mut_slice::<T>()?, mom.as_mut_slice::<T>()?);
                    let parts =
                        w.chunks_mut(per).zip(ms.chunks_mut(per)).zip(mom.chunks_mut(per)).zip(g.chunks(per));
                    parallel_items(pool, parts.collect(), |_, (((w, ms), mom), g)| {
                        for (((w, ms), mom), &d) in w.iter_mut().zip(ms.iter_mut()).zip(mom.iter_mut()).zip(g)
                        {
                            let d = d.load();
                            let msn = ms.load().add(d.mul(d).sub(ms.load()).mul(one.sub(rho)));
                            let momn = mom.load().mul(momentum).add(lr.mul(d).div(msn.add(eps).sqrt()));
                            *ms = T::store(msn);
                            *mom = T::store(momn);
                            *w = T::store(w.load().sub(momn));
                        }
                    });
                }
                _ => return Err(Error::internal(format!("{opt:?} got {nrefs} references"))),
            }
            Ok(())
        })
    }
}

impl OpKernel for ApplyK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let (nr, ns) = (self.opt.refs(), self.opt.scalars());
        if ctx.num_inputs() != nr + ns + 1 {
            return Err(Error::invalid_argument(format!(
                "expects {} inputs, got {}",
                nr + ns + 1,
                ctx.num_inputs()
            )));
        }
        let vars: Vec<Arc<Variable>> = (0..nr).map(|i| ctx.input_ref(i).cloned()).collect::<Result<_>>()?;
        // One variable passed as two references would deadlock on its own lock.
        for i in 0..nr {
            for j in 0..i {
                if Arc::ptr_eq(&vars[i], &vars[j]) {
                    return Err(Error::invalid_argument(format!(
                        "variable {} is passed as both input {j} and input {i}",
                        vars[i].name
                    )));
                }
            }
        }
        let gi = self.opt.grad_index();
        let scalars: Vec<Tensor> =
            (nr..=nr + ns).filter(|&i| i != gi).map(|i| ctx.input(i).cloned()).collect::<Result<_>>()?;
        let grad = ctx.input(gi)?.clone();
        let d = vars[0].dtype;
        if let Some(t) = scalars.iter().chain([&grad]).find(|t| t.dtype() != d) {
            return Err(Error::invalid_argument(format!("input of dtype {} for a {d} variable", t.dtype())));
        }
        let out = dispatch_float!(d, T => self.run::<T>(ctx.intra_op(), &vars, &scalars, &grad)?,
            _ => return Err(unsupported(&ctx.node.op, d)));
        ctx.set_output(0, out);
        Ok(())
    }
}
