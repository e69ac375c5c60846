//! `sam.sam_on`: SAM on normalization parameters only (Mueller et al., NeurIPS 2023).
//!
//! Reference: mueller-mp/SAM-ON `sam_on.py` (`SAM_ON`, `ASAM_ON`). Only normalization-layer
//! parameters are perturbed (those the host tags as such, or, for parity with the reference's
//! `only_norm`, whose name contains "norm" or "bn"); the norm is taken over them alone. Every
//! parameter still receives its gradient at the perturbed point for the base optimizer.
//! - `adaptive: false` (SAM_ON): e = ρ g_S/(‖g_S‖ + 1e-16).
//! - `adaptive: true` (ASAM_ON, the reference's default minimizer): T = |w| + η elementwise for
//!   "weight" parameters (all with `normalize_bias`), or T = ‖w‖(1 + η) with `layerwise`;
//!   n = ‖T⊙g‖ + 1e-16 over the perturbed set, e = ρ T² g / n.
//! - `norm: infinity`: e = ρ·T⊙sign(g), unnormalised (T = 1 without `adaptive`).
//!
//! No BN bypass: running statistics update in both passes. The saved weights are restored.
//! Outside `start_epoch ≤ epoch < end_epoch` (end 0: no end) the step is a plain base step.
//! Cost 2F+2B. Stateless.

use crate::common::{add_to_weights, global_norm, grads, Saved};
use serde::Deserialize;
use xlab_plugin_api::abi::tags;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, Param, PluginError, Result, StepCtx, StepRule};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct SamOnParams {
    /// neighbourhood radius ρ
    #[param(default = 0.5, min = 0.0)]
    pub rho: f64,
    /// ASAM_ON (the reference's default) rather than SAM_ON
    #[param(default = true)]
    pub adaptive: bool,
    /// adaptive: T = |w| + η
    #[param(default = 0.0, min = 0.0)]
    pub eta: f64,
    /// adaptive: scale biases too, not only weights
    #[param(default = false)]
    pub normalize_bias: bool,
    /// adaptive: T = ‖w‖(1 + η) per tensor instead of elementwise
    #[param(default = false)]
    pub layerwise: bool,
    /// `l2` (normalised) or `infinity` (ρ·T⊙sign(g))
    #[param(default = "l2", choices = ["l2", "infinity"])]
    pub norm: String,
    /// first epoch (0-based) with the perturbation
    #[param(default = 0)]
    pub start_epoch: u64,
    /// epoch from which plain steps resume (0: never)
    #[param(default = 0)]
    pub end_epoch: u64,
}

pub struct SamOn {
    p: SamOnParams,
}

/// The parameters SAM-ON perturbs: normalization layers' affine parameters.
pub fn is_norm(p: &Param) -> bool {
    p.has_tag(tags::NORM) || p.name.contains("norm") || p.name.contains("bn")
}

impl SamOn {
    /// T for one parameter (None: T = 1).
    fn t(&self, p: &Param) -> Result<Option<Tensor>> {
        if !self.p.adaptive || !(p.name.contains("weight") || self.p.normalize_bias) {
            return Ok(None);
        }
        let w = p.tensor.detach();
        Ok(Some(if self.p.layerwise {
            let n = f64::try_from(w.norm().to_kind(Kind::Double))?;
            w.ones_like() * (n * (1.0 + self.p.eta))
        } else {
            w.abs() + self.p.eta
        }))
    }
}

impl Component for SamOn {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "sam.sam_on";
    const SUMMARY: &'static str = "SAM-ON: sharpness-aware perturbation of the normalization parameters only";
    const REFERENCE: &'static str = "Mueller et al., Normalization Layers Are All That Sharpness-Aware Minimization Needs, NeurIPS 2023; mueller-mp/SAM-ON sam_on.py";
    const PASSES_PER_STEP: u32 = 2;
    type Params = SamOnParams;

    fn new(p: SamOnParams) -> Result<Self> {
        if !(p.rho >= 0.0 && p.rho.is_finite()) {
            return Err(PluginError(format!("rho must be a finite number ≥ 0, got {}", p.rho)));
        }
        if p.norm != "l2" && p.norm != "infinity" {
            return Err(PluginError(format!("norm is `l2` or `infinity`, got `{}`", p.norm)));
        }
        Ok(SamOn { p })
    }
}

impl StepRule for SamOn {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        let epoch = host.epoch();
        if epoch < self.p.start_epoch || (self.p.end_epoch > 0 && epoch >= self.p.end_epoch) {
            return host.optimizer_step();
        }
        let mut params = host.params()?;
        let g: Vec<(usize, Tensor)> = grads(&params).into_iter().filter(|(i, _)| is_norm(&params[*i])).collect();
        if g.is_empty() {
            return Err(PluginError(
                "sam.sam_on found no normalization parameters to perturb; use a model with normalization layers".into(),
            ));
        }
        let ts: Vec<Option<Tensor>> = g.iter().map(|(i, _)| self.t(&params[*i])).collect::<Result<_>>()?;
        let e: Vec<(usize, Tensor)> = if self.p.norm == "infinity" {
            g.iter()
                .zip(&ts)
                .map(|((i, g), t)| {
                    let s = g.sign() * self.p.rho;
                    (*i, t.as_ref().map_or_else(|| s.shallow_clone(), |t| t * &s))
                })
                .collect()
        } else {
            let scaled: Vec<Tensor> =
                g.iter().zip(&ts).map(|((_, g), t)| t.as_ref().map_or_else(|| g.shallow_clone(), |t| t * g)).collect();
            let n = global_norm(&scaled)? + 1e-16;
            g.iter()
                .zip(&ts)
                .map(|((i, g), t)| {
                    let e = match t {
                        Some(t) => t * t * g,
                        None => g.shallow_clone(),
                    };
                    (*i, e * (self.p.rho / n))
                })
                .collect()
        };
        let saved = Saved::of(&params, g.iter().map(|(i, _)| *i));
        add_to_weights(&mut params, &e, 1.0)?;
        let second = host.forward_backward();
        saved.restore(&mut params)?;
        second?;
        host.optimizer_step()
    }
}
