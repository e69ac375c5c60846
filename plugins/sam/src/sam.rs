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
//! m-sharpness (docs/methods.md §1.3, google-research/sam without `sync_perturbations`): with `m`
//! set below the batch size, the batch is split into chunks of m rows; each chunk gets its own
//! perturbation from its own gradient and its own perturbed gradient, and the base optimizer
//! steps once with their row-weighted mean (the plain mean for equal chunks). `m: 0` (or
//! m ≥ batch) is ordinary SAM.
//!
//! Cost 2F+2B (in 2·⌈B/m⌉ smaller passes with m). Stateless: the saved weights live only
//! within a step.

use crate::common::{current_grads, frozen_pass_at, grads, perturbation, set_grads};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, Param, PluginError, Result, StepCtx, StepRule};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct SamParams {
    /// neighbourhood radius ρ (paper grid 0.01–0.5; CIFAR usually 0.05–0.1)
    #[param(default = 0.05, min = 0.0)]
    pub rho: f64,
    /// m-sharpness: rows per perturbation (0: the whole batch)
    #[param(default = 0, min = 0.0)]
    pub m: u64,
}

pub struct Sam {
    rho: f64,
    m: u64,
}

/// SAM's perturbation of the current gradients, e = ρ·g/(‖g‖ + 1e-12), and ‖g‖.
fn ascent(params: &[Param], rho: f64) -> Result<(Vec<(usize, Tensor)>, f64)> {
    perturbation(params, &current_grads(params), rho, 1e-12, false)
}

impl Component for Sam {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "sam.sam";
    const SUMMARY: &'static str = "Sharpness-Aware Minimization: descend with the gradient at the worst nearby point";
    const REFERENCE: &'static str = "Foret et al., Sharpness-Aware Minimization for Efficiently Improving Generalization, ICLR 2021; davda54/sam sam.py";
    const PASSES_PER_STEP: u32 = 2;
    type Params = SamParams;

    fn new(p: SamParams) -> Result<Self> {
        if !(p.rho >= 0.0 && p.rho.is_finite()) {
            return Err(PluginError(format!("rho must be a finite number ≥ 0, got {}", p.rho)));
        }
        Ok(Sam { rho: p.rho, m: p.m })
    }
}

impl StepRule for Sam {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        let batch = host.batch_size();
        if self.m > 0 && self.m < batch {
            return self.m_sharpness(host, batch);
        }
        host.forward_backward()?;
        let mut params = host.params()?;
        let (e, norm) = ascent(&params, self.rho)?;
        frozen_pass_at(host, &mut params, &e, 1.0, None)?;
        host.log("sam.grad_norm", norm);
        host.optimizer_step()
    }
}

impl Sam {
    fn m_sharpness(&self, host: &mut StepCtx<'_>, batch: u64) -> Result<()> {
        let mut params = host.params()?;
        let mut sum: Vec<(usize, Tensor)> = Vec::new();
        let mut norms = 0.0;
        let chunks = batch.div_ceil(self.m);
        for k in 0..chunks {
            let (lo, hi) = (k * self.m, ((k + 1) * self.m).min(batch));
            host.forward_backward_rows(lo, hi)?;
            let (e, norm) = ascent(&params, self.rho)?;
            norms += norm;
            frozen_pass_at(host, &mut params, &e, 1.0, Some((lo, hi)))?;
            let w = (hi - lo) as f64 / batch as f64;
            let g = grads(&params);
            if sum.is_empty() {
                sum = g.into_iter().map(|(i, g)| (i, g * w)).collect();
            } else {
                for ((_, s), (_, g)) in sum.iter_mut().zip(g) {
                    *s += g * w;
                }
            }
        }
        set_grads(&params, &sum)?;
        host.log("sam.grad_norm", norms / chunks as f64);
        host.optimizer_step()
    }
}
