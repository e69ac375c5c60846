//! `diffusion.ddim`: the DDIM sampler (Song et al., ICLR 2021).
//!
//! Reference: huggingface/diffusers `scheduling_ddim.py` (`DDIMScheduler.step`). With N
//! inference steps over T training steps, at each listed t:
//! 1. t' = t − T//N (always, whatever the spacing);
//! 2. ᾱ' = ᾱ[t'] if t' ≥ 0, else 1 (`set_alpha_to_one`) or ᾱ₀;
//! 3. x̂₀ = (x − √(1−ᾱ_t)·ε̂)/√ᾱ_t, clipped to ±`clip_sample_range` if `clip_sample`; ε̂ is
//!    recomputed from the clipped x̂₀ only with `use_clipped_model_output`;
//! 4. σ_t = η·√((1−ᾱ')/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ'));
//! 5. x' = √ᾱ'·x̂₀ + √(1−ᾱ'−σ_t²)·ε̂ + σ_t·z (z only when η > 0).
//!
//! NFE = N. Noise z comes from the host's seeded stream. Stateless. With `dualfast_c_max` > 0,
//! DualFast's correction of ε̂ (`crate::dualfast`) comes first.

use crate::common::{alphas_cumprod, check_steps, check_timesteps, normal_like, predict_x0};
use crate::dualfast::{CoefficientSchedule, Dualfast, Tau};
use crate::timesteps::round_half_even;
use crate::timesteps::{ddim_timesteps, Spacing};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, PluginError, Result, Sampler};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct DdimParams {
    /// number of inference steps N (one denoiser evaluation each)
    #[param(default = 50, min = 1.0)]
    pub steps: i64,
    /// η: 0 is deterministic DDIM, 1 is DDPM-like noise
    #[param(default = 0.0, min = 0.0)]
    pub eta: f64,
    /// clip the predicted x̂₀ to ±clip_sample_range
    #[param(default = true)]
    pub clip_sample: bool,
    /// the clipping range of x̂₀
    #[param(default = 1.0, min = 0.0)]
    pub clip_sample_range: f64,
    /// the last step targets ᾱ = 1 (else ᾱ₀)
    #[param(default = true)]
    pub set_alpha_to_one: bool,
    /// added to every leading timestep (Stable Diffusion uses 1)
    #[param(default = 0)]
    pub steps_offset: i64,
    /// how the N timesteps are picked: leading, trailing or linspace
    #[param(default = "leading", choices = ["leading", "trailing", "linspace"])]
    pub timestep_spacing: Spacing,
    /// recompute ε̂ from the clipped x̂₀
    #[param(default = false)]
    pub use_clipped_model_output: bool,
    /// DualFast's c_max: the largest weight of its zero-NFE correction of ε̂ (0: off, the plain
    /// sampler bit for bit; the paper sweeps 0.1 to 1, 0.5 suggested)
    #[param(default = 0.0, min = 0.0, added_later)]
    #[serde(default)]
    pub dualfast_c_max: f64,
    /// DualFast's weights over the run: linear_index (c_max·i/(N−1)) or linear_time (c_max(1 − t/T))
    #[param(default = "linear_index", choices = ["linear_index", "linear_time"], added_later)]
    #[serde(default)]
    pub dualfast_schedule: CoefficientSchedule,
    /// DualFast's borrowed prediction: first (the first step's ε) or prev (the previous step's)
    #[param(default = "first", choices = ["first", "prev"], added_later)]
    #[serde(default)]
    pub dualfast_tau: Tau,
}

pub struct Ddim {
    p: DdimParams,
}

/// One DDIM update from timestep `t` to `t'`, given ε̂ (diffusers' `step`); `z` is the noise
/// used when η > 0.
pub fn ddim_step(p: &DdimParams, x: &Tensor, eps: &Tensor, a_t: f64, a_prev: f64, z: Option<&Tensor>) -> Tensor {
    let x0 = predict_x0(x, eps, a_t, p.clip_sample.then_some(p.clip_sample_range));
    let eps =
        if p.use_clipped_model_output { (x - &x0 * a_t.sqrt()) / (1.0 - a_t).sqrt() } else { eps.shallow_clone() };
    let sigma = p.eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt();
    let dir = eps * (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
    let out = x0 * a_prev.sqrt() + dir;
    match z {
        Some(z) if p.eta > 0.0 => out + z * sigma,
        _ => out,
    }
}

impl Component for Ddim {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.ddim";
    const SUMMARY: &'static str = "DDIM: deterministic (η = 0) or stochastic sampling in N ≪ T steps";
    const REFERENCE: &'static str =
        "Song et al., Denoising Diffusion Implicit Models, ICLR 2021; huggingface/diffusers scheduling_ddim.py";
    const RANDOM: bool = true;
    type Params = DdimParams;

    fn new(p: DdimParams) -> Result<Self> {
        check_steps(p.steps)?;
        Ok(Ddim { p })
    }
}

impl Sampler for Ddim {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, rng: &mut HostRng<'_>) -> Result<Tensor> {
        let ac = alphas_cumprod(den)?;
        let t_total = ac.len();
        let n = self.p.steps as usize;
        if n > t_total {
            return Err(PluginError(format!("steps ({n}) exceeds the {t_total} training timesteps")));
        }
        let stride = (t_total / n) as i64;
        let final_alpha = if self.p.set_alpha_to_one { 1.0 } else { ac[0] };
        let ts = ddim_timesteps(self.p.timestep_spacing, t_total, n, self.p.steps_offset);
        check_timesteps(ts.iter().map(|&t| t as f64), t_total)?;
        let p = &self.p;
        let mut dualfast = Dualfast::new(p.dualfast_c_max, p.dualfast_schedule, p.dualfast_tau, n, t_total);
        let mut x = noise;
        for (i, t) in ts.into_iter().enumerate() {
            let eps = dualfast.correct(i, t as f64, den.eps(&x, t as f64)?);
            let prev = t - stride;
            let a_prev = if prev >= 0 { ac[prev as usize] } else { final_alpha };
            let z = (self.p.eta > 0.0).then(|| normal_like(rng, &x));
            x = ddim_step(&self.p, &x, &eps, ac[t as usize], a_prev, z.as_ref());
        }
        Ok(x)
    }
}

/// The spacings DDIM inversion offers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InverseSpacing {
    Leading,
    Trailing,
}

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct DdimInverseParams {
    /// number of inversion steps N (one denoiser evaluation each)
    #[param(default = 50, min = 1.0)]
    pub steps: i64,
    /// clip the predicted x̂₀ to ±clip_sample_range (off: inversion follows the ODE exactly)
    #[param(default = false)]
    pub clip_sample: bool,
    /// the clipping range of x̂₀
    #[param(default = 1.0, min = 0.0)]
    pub clip_sample_range: f64,
    /// the first step starts from ᾱ = 1 (else ᾱ₀)
    #[param(default = true)]
    pub set_alpha_to_one: bool,
    /// added to every leading timestep
    #[param(default = 0)]
    pub steps_offset: i64,
    /// how the N timesteps are picked: leading or trailing
    #[param(default = "leading", choices = ["leading", "trailing"])]
    pub timestep_spacing: InverseSpacing,
}

/// `diffusion.ddim_inverse`: DDIM inversion, data to noise (diffusers' `DDIMInverseScheduler`).
///
/// Timesteps ascend: `leading` [0, r, …, (N−1)r] + offset with r = T//N; `trailing`
/// round(arange(T, 0, −T/N))[::−1] − 1. At each listed t the sample sits at level
/// c = min(t − T//N, T − 1) (ᾱ_c = 1, or ᾱ₀ without `set_alpha_to_one`, when c < 0); the model is
/// evaluated at t, as the reference does; x̂₀ = (x − √(1−ᾱ_c)·ε̂)/√ᾱ_c (clipped if asked) and
/// x' = √ᾱ_t·x̂₀ + √(1−ᾱ_t)·ε̂. Run by `task: invert`, which maps the latents back with a
/// sampler of its own. NFE = N. Deterministic; stateless.
pub struct DdimInverse {
    p: DdimInverseParams,
}

/// The ascending timesteps of DDIM inversion.
pub fn inverse_timesteps(spacing: InverseSpacing, t: usize, n: usize, offset: i64) -> Vec<i64> {
    match spacing {
        InverseSpacing::Leading => {
            let r = (t / n) as i64;
            (0..n as i64).map(|i| i * r + offset).collect()
        }
        InverseSpacing::Trailing => {
            let step = t as f64 / n as f64;
            let mut out: Vec<i64> = (0..)
                .map(|i| t as f64 - i as f64 * step)
                .take_while(|&v| v > 0.0)
                .map(|v| round_half_even(v) as i64 - 1)
                .collect();
            out.reverse();
            out
        }
    }
}

impl Component for DdimInverse {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.ddim_inverse";
    const SUMMARY: &'static str = "DDIM inversion: deterministic steps from data to noise (for `task: invert`)";
    const REFERENCE: &'static str = "Song et al., Denoising Diffusion Implicit Models, ICLR 2021; Mokady et al., Null-text Inversion, CVPR 2023; huggingface/diffusers scheduling_ddim_inverse.py";
    const INVERTS: bool = true;
    type Params = DdimInverseParams;

    fn new(p: DdimInverseParams) -> Result<Self> {
        check_steps(p.steps)?;
        Ok(DdimInverse { p })
    }
}

impl Sampler for DdimInverse {
    fn sample(&mut self, data: Tensor, den: &mut DenoiserCtx<'_>, _rng: &mut HostRng<'_>) -> Result<Tensor> {
        let ac = alphas_cumprod(den)?;
        let t_total = ac.len();
        let n = self.p.steps as usize;
        if n > t_total {
            return Err(PluginError(format!("steps ({n}) exceeds the {t_total} training timesteps")));
        }
        let stride = (t_total / n) as i64;
        let initial = if self.p.set_alpha_to_one { 1.0 } else { ac[0] };
        let ts = inverse_timesteps(self.p.timestep_spacing, t_total, n, self.p.steps_offset);
        check_timesteps(ts.iter().map(|&t| t as f64), t_total)?;
        let clip = self.p.clip_sample.then_some(self.p.clip_sample_range);
        let mut x = data;
        for t in ts {
            let eps = den.eps(&x, t as f64)?;
            let cur = (t - stride).min(t_total as i64 - 1);
            let a_cur = if cur >= 0 { ac[cur as usize] } else { initial };
            let a_t = ac[t as usize];
            let x0 = predict_x0(&x, &eps, a_cur, clip);
            x = x0 * a_t.sqrt() + eps * (1.0 - a_t).sqrt();
        }
        Ok(x)
    }
}

#[cfg(test)]
mod inverse_tests {
    use super::*;

    #[test]
    fn inverse_timesteps_ascend() {
        assert_eq!(inverse_timesteps(InverseSpacing::Leading, 1000, 4, 0), vec![0, 250, 500, 750]);
        assert_eq!(inverse_timesteps(InverseSpacing::Leading, 1000, 4, 1), vec![1, 251, 501, 751]);
        assert_eq!(inverse_timesteps(InverseSpacing::Trailing, 1000, 4, 0), vec![249, 499, 749, 999]);
    }
}
