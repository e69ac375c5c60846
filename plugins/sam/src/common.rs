//! What the SAM family's step rules share: gradient norms as the PyTorch references compute
//! them, saving and restoring weights, and writing a combined gradient back into `.grad`.

use xlab_plugin_api::tch::{self, Tensor};
use xlab_plugin_api::{Param, Result};

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

/// `p ← p + d_p` for each `(i, d)`, without recording gradients.
pub fn add_to_weights(params: &mut [Param], deltas: &[(usize, Tensor)], sign: f64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (i, d) in deltas {
            let _ = params[*i].tensor.f_add_(&(d * sign))?;
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

/// The tensors of `(i, t)` pairs, in order.
pub fn tensors(v: &[(usize, Tensor)]) -> Vec<Tensor> {
    v.iter().map(|(_, t)| t.shallow_clone()).collect()
}
