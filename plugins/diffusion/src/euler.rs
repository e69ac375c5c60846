//! `diffusion.euler`: Euler steps of the EDM probability-flow ODE dx/dσ = (x − D(x; σ))/σ in VE
//! space, on a VP-trained ε-model (Karras et al., NeurIPS 2022).
//!
//! Reference: huggingface/diffusers `scheduling_euler_discrete.py` (`s_churn = 0`). Timesteps
//! per `karras::timesteps` (linspace by default, fractional), σ interpolated linearly in t,
//! then 0. x starts at `init_noise_sigma`·z. At each step: the model sees x/√(σ²+1) at the
//! (fractional) timestep; x̂₀ = x − σ·ε̂, d = (x − x̂₀)/σ, x' = x + d·(σ_next − σ). With a
//! constant x₀ predictor this is exact. NFE = N. Deterministic; stateless.
//! `use_karras_sigmas` respaces the σ's as Karras et al. do (ρ = 7) between the schedule's
//! end σ's and finds each σ's fractional timestep by interpolating log σ.

use crate::common::{alphas_cumprod, check_steps, check_timesteps};
use crate::karras;
use crate::timesteps::Spacing;
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, PluginError, Result, Sampler};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct KarrasParams {
    /// number of steps N
    #[param(default = 50, min = 1.0)]
    pub steps: i64,
    /// linspace (fractional), leading or trailing
    #[param(default = "linspace", choices = ["leading", "trailing", "linspace"])]
    pub timestep_spacing: Spacing,
    /// added to every leading timestep
    #[param(default = 0)]
    pub steps_offset: i64,
    /// Karras et al.'s σ spacing (ρ = 7) between the schedule's end σ's, timesteps from log σ
    #[param(default = false, added_later)]
    #[serde(default)]
    pub use_karras_sigmas: bool,
}

/// The schedule of one sampling run: timesteps and sigmas (one more, the final 0), and the
/// initial noise scale.
pub fn schedule(p: &KarrasParams, ac: &[f64]) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let t_total = ac.len();
    let n = p.steps as usize;
    if n < 1 || n > t_total {
        return Err(PluginError(format!("steps must be in 1..={t_total}, got {n}")));
    }
    let ts = karras::timesteps(p.timestep_spacing, t_total, n, p.steps_offset);
    check_timesteps(ts.iter().copied(), t_total)?;
    let all = karras::train_sigmas(ac);
    let mut sigmas: Vec<f64> = ts.iter().map(|&t| karras::interp(&all, t)).collect();
    let ts = if p.use_karras_sigmas {
        // Between the end σ's of the interpolated schedule; the model sees fractional t.
        let (karras_ts, karras) = karras::karras_schedule(ac, sigmas[n - 1], sigmas[0], n, false);
        sigmas = karras;
        karras_ts
    } else {
        ts
    };
    let init = karras::init_noise_sigma(p.timestep_spacing, &sigmas);
    sigmas.push(0.0);
    Ok((ts, sigmas, init))
}

/// One Euler step from σ to σ_next given ε̂: x + ε̂·(σ_next − σ) (d = (x − x̂₀)/σ = ε̂).
pub fn euler_step(x: &Tensor, eps: &Tensor, sigma: f64, sigma_next: f64) -> Tensor {
    let x0 = x - eps * sigma;
    let d = (x - x0) / sigma;
    x + d * (sigma_next - sigma)
}

/// ε̂ at σ: the model on x/√(σ²+1) at timestep t.
pub fn eps_at(den: &mut DenoiserCtx<'_>, x: &Tensor, sigma: f64, t: f64) -> Result<Tensor> {
    den.eps(&(x / (sigma * sigma + 1.0).sqrt()), t)
}

pub struct Euler {
    p: KarrasParams,
}

impl Component for Euler {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.euler";
    const SUMMARY: &'static str = "Euler: first-order steps of the probability-flow ODE in σ";
    const REFERENCE: &'static str = "Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, NeurIPS 2022; huggingface/diffusers scheduling_euler_discrete.py";
    type Params = KarrasParams;

    fn new(p: KarrasParams) -> Result<Self> {
        check_steps(p.steps)?;
        Ok(Euler { p })
    }
}

impl Sampler for Euler {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, _rng: &mut HostRng<'_>) -> Result<Tensor> {
        let ac = alphas_cumprod(den)?;
        let (ts, sigmas, init) = schedule(&self.p, &ac)?;
        let mut x = noise * init;
        for (i, &t) in ts.iter().enumerate() {
            let eps = eps_at(den, &x, sigmas[i], t)?;
            x = euler_step(&x, &eps, sigmas[i], sigmas[i + 1]);
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euler_vector_of_methods_md() {
        // σ = 1 → 0.5, x = 1, ε̂ = 0.3: 0.85.
        let x = Tensor::from_slice(&[1.0f64]);
        let out = euler_step(&x, &Tensor::from_slice(&[0.3f64]), 1.0, 0.5);
        assert!((f64::try_from(out).unwrap() - 0.85).abs() < 1e-12);
    }
}
