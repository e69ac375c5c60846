//! `sam.asam`: Adaptive SAM (Kwon et al., ICML 2021), in both reference forms.
//!
//! `variant: official` (default), SamsungLabs/ASAM `asam.py`: T_w = |w| + η for parameters
//! whose name contains "weight", 1 for the others; g̃ = T_w ⊙ g, n = ‖g̃‖ + 1e-16 (the epsilon
//! after the norm), e = ρ·T_w ⊙ g̃ / n; the second pass runs with running statistics updated
//! (no bypass); the descent subtracts e (`p ← p − e`), then the base optimizer steps.
//!
//! `variant: davda54`, davda54/sam with `adaptive=True`: no η, every parameter adaptive:
//! n = ‖|w| ⊙ g‖, e = ρ·w² ⊙ g / (n + 1e-12), the BN bypass on the second pass, and the saved
//! weights restored.
//!
//! Cost 2F+2B. Stateless.

use crate::common::{add_to_weights, frozen_pass_at, global_norm, grads, perturbation};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, PluginError, Result, StepCtx, StepRule};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct AsamParams {
    /// neighbourhood radius ρ (official 0.5; davda54 recommends 2.0)
    #[param(default = 0.5, min = 0.0)]
    pub rho: f64,
    /// official form: T_w = |w| + η (unused by davda54)
    #[param(default = 0.01, min = 0.0)]
    pub eta: f64,
    /// `official` (SamsungLabs/ASAM) or `davda54` (davda54/sam adaptive=True)
    #[param(default = "official", choices = ["official", "davda54"])]
    pub variant: String,
}

pub struct Asam {
    p: AsamParams,
}

impl Component for Asam {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "sam.asam";
    const SUMMARY: &'static str = "Adaptive SAM: a scale-invariant neighbourhood, ρ scaled by each weight's magnitude";
    const REFERENCE: &'static str = "Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks, ICML 2021; SamsungLabs/ASAM asam.py, davda54/sam";
    const PASSES_PER_STEP: u32 = 2;
    type Params = AsamParams;

    fn new(p: AsamParams) -> Result<Self> {
        if !(p.rho >= 0.0 && p.rho.is_finite()) {
            return Err(PluginError(format!("rho must be a finite number ≥ 0, got {}", p.rho)));
        }
        if p.variant != "official" && p.variant != "davda54" {
            return Err(PluginError(format!("variant is `official` or `davda54`, got `{}`", p.variant)));
        }
        Ok(Asam { p })
    }
}

impl StepRule for Asam {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        let mut params = host.params()?;
        let g = grads(&params);
        let rho = self.p.rho;
        if self.p.variant == "davda54" {
            let (e, _) = perturbation(&params, &g, rho, 1e-12, true)?;
            frozen_pass_at(host, &mut params, &e, 1.0, None)?;
            return host.optimizer_step();
        }
        // Official: T_w only for "weight" parameters.
        let t: Vec<Option<Tensor>> = g
            .iter()
            .map(|(i, _)| {
                let p = &params[*i];
                p.name.contains("weight").then(|| p.tensor.detach().abs() + self.p.eta)
            })
            .collect();
        let scaled: Vec<Tensor> =
            g.iter().zip(&t).map(|((_, g), t)| t.as_ref().map_or_else(|| g.shallow_clone(), |t| t * g)).collect();
        let n = global_norm(&scaled)? + 1e-16;
        let e: Vec<(usize, Tensor)> = g
            .iter()
            .zip(&t)
            .zip(&scaled)
            .map(|(((i, _), t), gs)| {
                let e = match t {
                    Some(t) => t * gs,
                    None => gs.shallow_clone(),
                };
                (*i, e * (rho / n))
            })
            .collect();
        add_to_weights(&mut params, &e, 1.0)?;
        let second = host.forward_backward();
        add_to_weights(&mut params, &e, -1.0)?;
        second?;
        host.optimizer_step()
    }
}
