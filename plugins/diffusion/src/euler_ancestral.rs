//! `diffusion.euler_ancestral`: Euler steps with ancestral noise (Karras et al., NeurIPS 2022;
//! k-diffusion's `sample_euler_ancestral`).
//!
//! Reference: huggingface/diffusers `scheduling_euler_ancestral_discrete.py`. The σ schedule
//! of `diffusion.euler` (linspace by default, fractional timesteps, σ interpolated in t, then
//! 0) and its initial noise scale. From σ to σ_next: σ_up = √(σ_next²(σ² − σ_next²)/σ²),
//! σ_down = √(σ_next² − σ_up²); with x̂₀ = x − σ·ε̂ and d = (x − x̂₀)/σ,
//! x' = x + d·(σ_down − σ) + σ_up·z, z fresh from the host's stream at every step (the last,
//! to σ = 0, draws it with weight 0, as the reference does). NFE = N. Stateless.

use crate::common::{alphas_cumprod, check_steps, normal_like};
use crate::euler::{eps_at, schedule, KarrasParams};
use crate::timesteps::Spacing;
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, Params, Result, Sampler};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct EulerAncestralParams {
    /// number of steps N
    #[param(default = 50, min = 1.0)]
    pub steps: i64,
    /// linspace (fractional), leading or trailing
    #[param(default = "linspace", choices = ["leading", "trailing", "linspace"])]
    pub timestep_spacing: Spacing,
    /// added to every leading timestep
    #[param(default = 0)]
    pub steps_offset: i64,
}

/// One ancestral step from σ to σ_next given ε̂ and the step's noise z.
pub fn ancestral_step(x: &Tensor, eps: &Tensor, sigma: f64, sigma_next: f64, z: &Tensor) -> Tensor {
    let up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma)).sqrt();
    let down = (sigma_next * sigma_next - up * up).max(0.0).sqrt();
    let x0 = x - eps * sigma;
    let d = (x - x0) / sigma;
    x + d * (down - sigma) + z * up
}

pub struct EulerAncestral {
    p: KarrasParams,
}

impl Component for EulerAncestral {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.euler_ancestral";
    const SUMMARY: &'static str = "Euler ancestral: Euler steps in σ that re-inject fresh noise at every step";
    const REFERENCE: &'static str = "Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, NeurIPS 2022; huggingface/diffusers scheduling_euler_ancestral_discrete.py";
    const RANDOM: bool = true;
    type Params = EulerAncestralParams;

    fn new(p: EulerAncestralParams) -> Result<Self> {
        check_steps(p.steps)?;
        let EulerAncestralParams { steps, timestep_spacing, steps_offset } = p;
        Ok(EulerAncestral { p: KarrasParams { steps, timestep_spacing, steps_offset, use_karras_sigmas: false } })
    }
}

impl Sampler for EulerAncestral {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, rng: &mut HostRng<'_>) -> Result<Tensor> {
        let ac = alphas_cumprod(den)?;
        let (ts, sigmas, init) = schedule(&self.p, &ac)?;
        let mut x = noise * init;
        for (i, &t) in ts.iter().enumerate() {
            let eps = eps_at(den, &x, sigmas[i], t)?;
            let z = normal_like(rng, &x);
            x = ancestral_step(&x, &eps, sigmas[i], sigmas[i + 1], &z);
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// σ = 1 → 0.5, x = 1, ε̂ = 0.3, z = 2: σ_up = √(0.25·0.75) = 0.4330127, σ_down = 0.25,
    /// x' = 1 + 0.3·(0.25 − 1) + 2σ_up = 1.6410254.
    #[test]
    fn ancestral_step_by_hand() {
        let t = |v: f64| Tensor::from_slice(&[v]);
        let got = f64::try_from(ancestral_step(&t(1.0), &t(0.3), 1.0, 0.5, &t(2.0))).unwrap();
        assert!((got - (1.0 - 0.225 + 2.0 * 0.1875f64.sqrt())).abs() < 1e-12, "{got}");
        // To σ = 0 there is no noise: the x₀ prediction.
        assert!((f64::try_from(ancestral_step(&t(1.0), &t(0.3), 1.0, 0.0, &t(2.0))).unwrap() - 0.7).abs() < 1e-12);
    }
}
