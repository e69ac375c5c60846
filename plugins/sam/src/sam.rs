//! `sam.sam`: Sharpness-Aware Minimization (Foret et al., ICLR 2021).
//!
//! Reference: davda54/sam `sam.py` (`first_step`, `second_step`) with the BN bypass of its
//! example. One step:
//! 1. g = ∇L(w) (normalization statistics update in this pass; its loss is the one reported);
//! 2. e = ρ·g / (‖g‖ + 1e-12), ‖g‖ the global norm `‖stack(‖g_p‖)‖` over parameters with a
//!    gradient; w ← w + e (the unperturbed weights are saved);
//! 3. g_SAM = ∇L(w + e) with normalization statistics frozen;
//! 4. w ← saved w (restored, not subtracted: the reference's rounding); base optimizer step
//!    with g_SAM.
//!
//! Cost 2F+2B. Stateless: the saved weights live only within a step.

use serde::Deserialize;
use xlab_plugin_api::tch::{self, Tensor};
use xlab_plugin_api::{param, Component, ComponentKind, ParamType, PluginError, Result, StepCtx, StepRule};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamParams {
    pub rho: f64,
}

pub struct Sam {
    rho: f64,
}

/// The global gradient norm over parameters that have a gradient, as the reference computes it.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
    Ok(f64::try_from(Tensor::stack(&norms, 0).norm())?)
}

/// Gradients of the parameters that have one (the reference skips `p.grad is None`).
pub fn defined_grads(params: &[xlab_plugin_api::Param]) -> Vec<(usize, Tensor)> {
    params
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let g = p.tensor.grad();
            g.defined().then_some((i, g))
        })
        .collect()
}

impl Component for Sam {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "sam.sam";
    const SUMMARY: &'static str = "Sharpness-Aware Minimization: descend with the gradient at the worst nearby point";
    const REFERENCE: &'static str = "Foret et al., Sharpness-Aware Minimization for Efficiently Improving Generalization, ICLR 2021; davda54/sam sam.py";
    const PASSES_PER_STEP: u32 = 2;
    type Params = SamParams;

    fn params() -> Vec<xlab_plugin_api::ParamSpec> {
        let mut rho = param(
            "rho",
            ParamType::Float,
            0.05,
            "neighbourhood radius ρ (paper grid 0.01–0.5; CIFAR usually 0.05–0.1)",
        );
        rho.min = Some(0.0);
        vec![rho]
    }

    fn new(p: SamParams) -> Result<Self> {
        if !(p.rho >= 0.0 && p.rho.is_finite()) {
            return Err(PluginError(format!("rho must be a finite number ≥ 0, got {}", p.rho)));
        }
        Ok(Sam { rho: p.rho })
    }
}

impl StepRule for Sam {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        let mut params = host.params()?;
        let grads = defined_grads(&params);
        let norm = grad_norm(&grads.iter().map(|(_, g)| g.shallow_clone()).collect::<Vec<_>>())?;
        let scale = self.rho / (norm + 1e-12);
        let mut saved = Vec::with_capacity(grads.len());
        tch::no_grad(|| -> Result<()> {
            for (i, g) in &grads {
                let p = &mut params[*i].tensor;
                saved.push((*i, p.copy()));
                let _ = p.f_add_(&(g * scale))?;
            }
            Ok(())
        })?;
        host.freeze_norm_stats(true);
        let second = host.forward_backward();
        host.freeze_norm_stats(false);
        tch::no_grad(|| -> Result<()> {
            for (i, old) in &saved {
                params[*i].tensor.f_copy_(old)?;
            }
            Ok(())
        })?;
        second?;
        host.log("sam.grad_norm", norm);
        host.optimizer_step()
    }
}
