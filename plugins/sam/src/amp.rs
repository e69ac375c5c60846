//! `sam.amp`: Adversarial Model Perturbation (Zheng et al., CVPR 2021).
//!
//! Reference: hiyouga/AMP-Regularizer `amp.py`. Every pass is the reference's closure:
//! forward, backward, then `clip_grad_norm_(params, clip)` (global norm, clip 50). Then, for
//! `inner_iter` iterations, for each tensor p: d = dev_p + inner_lr·g_p (dev_p = 0 at first);
//! if ε/(‖d‖+1e-12) < 1, d is scaled by it (a projection onto the ε-ball **per tensor**);
//! p ← p − dev_p + d, dev_p ← d; then the closure runs again at the perturbed point. Finally
//! p ← p − dev_p and the base optimizer steps with the last gradient. No BN bypass.
//! Cost (1 + inner_iter)·(F+B). Stateless.

use crate::common::grads;
use serde::Deserialize;
use xlab_plugin_api::tch::{self, Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, Param, PluginError, Result, StepCtx, StepRule};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct AmpParams {
    /// radius ε of each tensor's perturbation ball
    #[param(default = 0.5, min = 0.0)]
    pub epsilon: f64,
    /// ascent step size
    #[param(default = 1.0, min = 0.0)]
    pub inner_lr: f64,
    /// ascent iterations per step
    #[param(default = 1, min = 1.0)]
    pub inner_iter: u32,
    /// global gradient-norm clip inside every pass
    #[param(default = 50.0, min = 0.0)]
    pub clip: f64,
}

pub struct Amp {
    p: AmpParams,
}

/// torch's `clip_grad_norm_(params, max_norm)`: scales every gradient by
/// min(1, max_norm/(total_norm + 1e-6)); returns the total norm.
pub fn clip_grad_norm(params: &[Param], max_norm: f64) -> Result<f64> {
    let gs: Vec<Tensor> = params.iter().map(|p| p.tensor.grad()).filter(|g| g.defined()).collect();
    if gs.is_empty() {
        return Ok(0.0);
    }
    let norms: Vec<Tensor> = gs.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm();
    let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
    tch::no_grad(|| -> Result<()> {
        for mut g in gs {
            let _ = g.f_mul_(&coef)?;
        }
        Ok(())
    })?;
    Ok(f64::try_from(total.to_kind(Kind::Double))?)
}

impl Component for Amp {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "sam.amp";
    const SUMMARY: &'static str =
        "Adversarial Model Perturbation: gradient ascent on the weights within a per-tensor ε-ball";
    const REFERENCE: &'static str = "Zheng et al., Regularizing Neural Networks via Adversarial Model Perturbation, CVPR 2021; hiyouga/AMP-Regularizer amp.py";
    const PASSES_PER_STEP: u32 = 2;
    type Params = AmpParams;

    fn new(p: AmpParams) -> Result<Self> {
        if !(p.epsilon >= 0.0 && p.epsilon.is_finite()) || p.inner_iter == 0 {
            return Err(PluginError("epsilon must be finite and ≥ 0, inner_iter ≥ 1".into()));
        }
        Ok(Amp { p })
    }
}

impl StepRule for Amp {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        let mut params = host.params()?;
        clip_grad_norm(&params, self.p.clip)?;
        let mut dev: Vec<(usize, Tensor)> = Vec::new();
        let mut result = Ok(());
        for it in 0..self.p.inner_iter {
            let g = grads(&params);
            tch::no_grad(|| -> Result<()> {
                for (k, (i, g)) in g.iter().enumerate() {
                    let prev = if it == 0 { g.zeros_like() } else { dev[k].1.shallow_clone() };
                    let mut d = &prev + g * self.p.inner_lr;
                    let c = self.p.epsilon / (f64::try_from(d.norm().to_kind(Kind::Double))? + 1e-12);
                    if c < 1.0 {
                        d *= c;
                    }
                    let _ = params[*i].tensor.f_sub_(&prev)?.f_add_(&d)?;
                    if it == 0 {
                        dev.push((*i, d));
                    } else {
                        dev[k].1 = d;
                    }
                }
                Ok(())
            })?;
            result = host.forward_backward().and_then(|_| clip_grad_norm(&params, self.p.clip).map(|_| ()));
            if result.is_err() {
                break;
            }
        }
        tch::no_grad(|| -> Result<()> {
            for (i, d) in &dev {
                let _ = params[*i].tensor.f_sub_(d)?;
            }
            Ok(())
        })?;
        result?;
        host.optimizer_step()
    }
}
