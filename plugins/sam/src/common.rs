//! What the SAM family's step rules share: gradient norms as the PyTorch references compute
//! them, saving and restoring weights, and writing a combined gradient back into `.grad`.

use xlab_plugin_api::tch::{self, Tensor};
use xlab_plugin_api::{Param, Result, StepCtx};

/// `‖stack(‖t_p‖)‖`: the global L2 norm over a list of tensors, as the references compute it.
pub fn global_norm(ts: &[Tensor]) -> Result<f64> {
    if ts.is_empty() {
        return Ok(0.0);
    }
    let norms: Vec<Tensor> = ts.iter().map(|g| g.norm()).collect();
    Ok(f64::try_from(Tensor::stack(&norms, 0).norm())?)
}

/// Indices and gradients of the parameters that have one (the references skip
/// `p.grad is None`); the gradients are copies, safe across later passes.
pub fn grads(params: &[Param]) -> Vec<(usize, Tensor)> {
    params
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let g = p.tensor.grad();
            g.defined().then(|| (i, g.copy()))
        })
        .collect()
}

/// Indices and gradients of the parameters that have one, as they are now (no copies): for
/// computing from at once, before the next pass.
pub fn current_grads(params: &[Param]) -> Vec<(usize, Tensor)> {
    params
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let g = p.tensor.grad();
            g.defined().then_some((i, g))
        })
        .collect()
}

/// Copies of the weights of the given parameters, to restore after a perturbation.
pub struct Saved(Vec<(usize, Tensor)>);

impl Saved {
    pub fn of(params: &[Param], which: impl Iterator<Item = usize>) -> Self {
        Saved(which.map(|i| (i, params[i].tensor.detach().copy())).collect())
    }

    /// Puts the saved weights back (the references' `p.data = old_p`).
    pub fn restore(&self, params: &mut [Param]) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (i, old) in &self.0 {
                params[*i].tensor.f_copy_(old)?;
            }
            Ok(())
        })
    }
}

/// `p ← p + sign·d_p` for each `(i, d)`, without recording gradients (no temporary for a sign
/// of ±1).
pub fn add_to_weights(params: &mut [Param], deltas: &[(usize, Tensor)], sign: f64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (i, d) in deltas {
            let p = &mut params[*i].tensor;
            let _ = if sign == 1.0 {
                p.f_add_(d)?
            } else if sign == -1.0 {
                p.f_sub_(d)?
            } else {
                p.f_add_(&(d * sign))?
            };
        }
        Ok(())
    })
}

/// Writes `g_i` into parameter i's `.grad` (which the last pass defined).
pub fn set_grads(params: &[Param], grads: &[(usize, Tensor)]) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (i, g) in grads {
            let mut slot = params[*i].tensor.grad();
            if !slot.defined() {
                return Err(xlab_plugin_api::PluginError(format!(
                    "parameter `{}` has no gradient to overwrite",
                    params[*i].name
                )));
            }
            slot.f_copy_(g)?;
        }
        Ok(())
    })
}

/// The perturbation `radius·d/(‖d‖ + eps)` of directions `dir`, or with `adaptive`
/// `radius·w²⊙d/(‖|w|⊙d‖ + eps)` (ASAM's elementwise scaling, as davda54/sam and GAM write it);
/// also returns the norm it divided by.
pub fn perturbation(
    params: &[Param],
    dir: &[(usize, Tensor)],
    radius: f64,
    eps: f64,
    adaptive: bool,
) -> Result<(Vec<(usize, Tensor)>, f64)> {
    if !adaptive {
        let n = global_norm(&tensors(dir))?;
        return Ok((dir.iter().map(|(i, d)| (*i, d * (radius / (n + eps)))).collect(), n));
    }
    let scaled: Vec<Tensor> = dir.iter().map(|(i, d)| params[*i].tensor.detach().abs() * d).collect();
    let n = global_norm(&scaled)?;
    let e = dir
        .iter()
        .map(|(i, d)| {
            let w = params[*i].tensor.detach();
            (*i, &w * &w * d * (radius / (n + eps)))
        })
        .collect();
    Ok((e, n))
}

/// One forward/backward pass (on `rows` of the batch, or all of it) at w + sign·e with
/// normalization statistics frozen (the BN bypass), after which the weights are put back
/// exactly: the perturbed-point gradient is left in `.grad`. For the pass each parameter points
/// at a new tensor w + sign·e; its own memory is left untouched and pointed at again afterwards
/// (the reference's `p.data = old_p`), so neither way copies the weights.
pub fn frozen_pass_at(
    host: &mut StepCtx<'_>,
    params: &mut [Param],
    e: &[(usize, Tensor)],
    sign: f64,
    rows: Option<(u64, u64)>,
) -> Result<f64> {
    let kept: Vec<(usize, Tensor)> = e.iter().map(|(i, _)| (*i, params[*i].tensor.detach())).collect();
    let moved = tch::no_grad(|| -> Result<Vec<Tensor>> {
        e.iter()
            .zip(&kept)
            .map(|((_, d), (_, w))| Ok(if sign == 1.0 { w.f_add(d)? } else { w.f_add(&(d * sign))? }))
            .collect()
    })?;
    for ((i, _), m) in kept.iter().zip(&moved) {
        params[*i].tensor.set_data(m);
    }
    host.freeze_norm_stats(true);
    let pass = match rows {
        Some((lo, hi)) => host.forward_backward_rows(lo, hi),
        None => host.forward_backward(),
    };
    host.freeze_norm_stats(false);
    for (i, w) in &kept {
        params[*i].tensor.set_data(w);
    }
    pass
}

/// The tensors of `(i, t)` pairs, in order.
pub fn tensors(v: &[(usize, Tensor)]) -> Vec<Tensor> {
    v.iter().map(|(_, t)| t.shallow_clone()).collect()
}
