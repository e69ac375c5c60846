//! `diffusion.ddpm`: the DDPM ancestral sampler (Ho et al., NeurIPS 2020).
//!
//! Reference: huggingface/diffusers `scheduling_ddpm.py` (`DDPMScheduler.step`). At each listed
//! t, with t' the next listed timestep (−1 after the last):
//! 1. ᾱ' = ᾱ[t'] (1 when t' < 0), α_t = ᾱ_t/ᾱ', β_t = 1 − α_t (the respaced β);
//! 2. x̂₀ = (x − √(1−ᾱ_t)·ε̂)/√ᾱ_t, clipped to ±`clip_sample_range` if `clip_sample`;
//! 3. μ = [√ᾱ'·β_t/(1−ᾱ_t)]·x̂₀ + [√α_t·(1−ᾱ')/(1−ᾱ_t)]·x;
//! 4. for t > 0, x' = μ + σ·z with σ² = max((1−ᾱ')/(1−ᾱ_t)·β_t, 1e-20) (`fixed_small`, also
//!    as exp(½ log σ²) for `fixed_small_log`) or σ² = β_t (`fixed_large`); at t = 0, x' = μ.
//!
//! NFE = N. Noise z from the host's seeded stream. Stateless.

use crate::common::{alphas_cumprod, check_steps, check_timesteps, normal_like, predict_x0};
use crate::timesteps::{ddim_timesteps, Spacing};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, PluginError, Result, Sampler};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct DdpmParams {
    /// number of inference steps N (one evaluation each)
    #[param(default = 1000, min = 1.0)]
    pub steps: i64,
    /// σ² of each step: fixed_small (posterior), fixed_small_log or fixed_large (β)
    #[param(default = "fixed_small", choices = ["fixed_small", "fixed_small_log", "fixed_large"])]
    pub variance_type: String,
    /// clip the predicted x̂₀ to ±clip_sample_range
    #[param(default = true)]
    pub clip_sample: bool,
    /// the clipping range of x̂₀
    #[param(default = 1.0, min = 0.0)]
    pub clip_sample_range: f64,
    /// added to every leading timestep
    #[param(default = 0)]
    pub steps_offset: i64,
    /// leading, trailing or linspace timesteps
    #[param(default = "leading", choices = ["leading", "trailing", "linspace"])]
    pub timestep_spacing: Spacing,
}

pub struct Ddpm {
    p: DdpmParams,
}

/// σ² of the step from ᾱ_t to ᾱ' (before the choice of variance type): the posterior variance.
pub fn posterior_variance(a_t: f64, a_prev: f64) -> f64 {
    let beta_t = 1.0 - a_t / a_prev;
    ((1.0 - a_prev) / (1.0 - a_t) * beta_t).max(1e-20)
}

/// One DDPM update from t (ᾱ_t) to t' (ᾱ'); `z` is added with the chosen σ when given (t > 0).
pub fn ddpm_step(p: &DdpmParams, x: &Tensor, eps: &Tensor, a_t: f64, a_prev: f64, z: Option<&Tensor>) -> Tensor {
    let alpha_t = a_t / a_prev;
    let beta_t = 1.0 - alpha_t;
    let x0 = predict_x0(x, eps, a_t, p.clip_sample.then_some(p.clip_sample_range));
    let c0 = a_prev.sqrt() * beta_t / (1.0 - a_t);
    let ct = alpha_t.sqrt() * (1.0 - a_prev) / (1.0 - a_t);
    let mu = x0 * c0 + x * ct;
    match z {
        Some(z) => {
            let sigma = match p.variance_type.as_str() {
                "fixed_large" => beta_t.sqrt(),
                "fixed_small_log" => (0.5 * posterior_variance(a_t, a_prev).ln()).exp(),
                _ => posterior_variance(a_t, a_prev).sqrt(),
            };
            mu + z * sigma
        }
        None => mu,
    }
}

impl Component for Ddpm {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.ddpm";
    const SUMMARY: &'static str = "DDPM: ancestral sampling, a fresh noise draw at every step";
    const REFERENCE: &'static str =
        "Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020; huggingface/diffusers scheduling_ddpm.py";
    const RANDOM: bool = true;
    type Params = DdpmParams;

    fn new(p: DdpmParams) -> Result<Self> {
        check_steps(p.steps)?;
        if !["fixed_small", "fixed_small_log", "fixed_large"].contains(&p.variance_type.as_str()) {
            return Err(PluginError(format!(
                "variance_type is fixed_small, fixed_small_log or fixed_large, got `{}` (learned_range needs a model \
                 that predicts its variance)",
                p.variance_type
            )));
        }
        Ok(Ddpm { p })
    }
}

impl Sampler for Ddpm {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, rng: &mut HostRng<'_>) -> Result<Tensor> {
        let ac = alphas_cumprod(den)?;
        let t_total = ac.len();
        let n = self.p.steps as usize;
        if n > t_total {
            return Err(PluginError(format!("steps ({n}) exceeds the {t_total} training timesteps")));
        }
        let ts = ddim_timesteps(self.p.timestep_spacing, t_total, n, self.p.steps_offset);
        check_timesteps(ts.iter().map(|&t| t as f64), t_total)?;
        let mut x = noise;
        for (k, &t) in ts.iter().enumerate() {
            let eps = den.eps(&x, t as f64)?;
            let prev = ts.get(k + 1).copied().unwrap_or(-1);
            let a_prev = if prev >= 0 { ac[prev as usize] } else { 1.0 };
            let z = (t > 0).then(|| normal_like(rng, &x));
            x = ddpm_step(&self.p, &x, &eps, ac[t as usize], a_prev, z.as_ref());
        }
        Ok(x)
    }
}
