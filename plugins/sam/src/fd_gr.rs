//! `sam.fd_gr`: finite-difference gradient regularization (Karakida et al., ICML 2023;
//! paper-only, no reference code).
//!
//! Minimizes L + (γ/2)‖∇L‖², whose gradient g + γHg is estimated by a finite difference with
//! ascent step ε (or ε = ρ/‖g‖ with `normalized`):
//! - `direction: forward` (F-GR): G = (1 − γ/ε) g + (γ/ε) ∇L(w + εg);
//! - `direction: backward` (B-GR): G = g + (γ/ε)[g − ∇L(w − εg)].
//!
//! With ε = γ, F-GR is the unnormalised SAM gradient ∇L(w + γg). The second pass runs with
//! running statistics frozen; the saved weights are restored. Cost 2F+2B. Stateless.

use crate::common::{frozen_pass_at, global_norm, grads, set_grads, tensors};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, PluginError, Result, StepCtx, StepRule};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct FdGrParams {
    /// γ: weight of the gradient-norm penalty (γ/2)‖∇L‖²
    #[param(default = 0.1, min = 0.0)]
    pub gamma: f64,
    /// ascent step ε (ρ in ε = ρ/‖g‖ when normalized)
    #[param(default = 0.1, min = 1e-12)]
    pub epsilon: f64,
    /// `forward` (F-GR) or `backward` (B-GR)
    #[param(default = "forward", choices = ["forward", "backward"])]
    pub direction: String,
    /// use ε = epsilon/‖g‖
    #[param(default = false)]
    pub normalized: bool,
}

pub struct FdGr {
    p: FdGrParams,
}

impl Component for FdGr {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "sam.fd_gr";
    const SUMMARY: &'static str =
        "finite-difference gradient regularization: penalize ‖∇L‖² with a forward or backward difference";
    const REFERENCE: &'static str = "Karakida et al., Understanding Gradient Regularization in Deep Learning: Efficient Finite-Difference Computation and Implicit Bias, ICML 2023 (paper only)";
    const PASSES_PER_STEP: u32 = 2;
    type Params = FdGrParams;

    fn new(p: FdGrParams) -> Result<Self> {
        if !(p.epsilon > 0.0 && p.epsilon.is_finite() && p.gamma >= 0.0 && p.gamma.is_finite()) {
            return Err(PluginError("epsilon must be finite and > 0, gamma finite and ≥ 0".into()));
        }
        if p.direction != "forward" && p.direction != "backward" {
            return Err(PluginError(format!("direction is `forward` or `backward`, got `{}`", p.direction)));
        }
        Ok(FdGr { p })
    }
}

impl StepRule for FdGr {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        let mut params = host.params()?;
        let g = grads(&params);
        let eps =
            if self.p.normalized { self.p.epsilon / (global_norm(&tensors(&g))? + 1e-12) } else { self.p.epsilon };
        let forward = self.p.direction == "forward";
        let e: Vec<(usize, Tensor)> = g.iter().map(|(i, g)| (*i, g * eps)).collect();
        frozen_pass_at(host, &mut params, &e, if forward { 1.0 } else { -1.0 }, None)?;
        let k = self.p.gamma / eps;
        let g2 = grads(&params);
        let combined: Vec<(usize, Tensor)> = g
            .iter()
            .zip(&g2)
            .map(|((i, g), (_, h))| if forward { (*i, g * (1.0 - k) + h * k) } else { (*i, g + (g - h) * k) })
            .collect();
        set_grads(&params, &combined)?;
        host.log("fd_gr.epsilon", eps);
        host.optimizer_step()
    }
}
