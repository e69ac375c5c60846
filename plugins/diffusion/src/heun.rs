//! `diffusion.heun`: Heun's second-order method on the EDM probability-flow ODE (Karras et al.,
//! NeurIPS 2022).
//!
//! Reference: huggingface/diffusers `scheduling_heun_discrete.py`. The same σ schedule as
//! `diffusion.euler`. Between σ_i and σ_{i+1} > 0: an Euler step to x_e with d = (x − x̂₀)/σ_i,
//! then the model at x_e (input scaled by σ_{i+1}) gives d₂ = (x_e − x̂₀′)/σ_{i+1}, and
//! x' = x + ½(d + d₂)(σ_{i+1} − σ_i). The last interval, to σ = 0, is a plain Euler step.
//! NFE = 2N − 1. (The reference's default β_start/β_end belong to its training schedule; here
//! the denoiser supplies ᾱ.) Deterministic; stateless. `use_karras_sigmas` as for Euler.

use crate::common::{alphas_cumprod, check_steps};
use crate::euler::{eps_at, euler_step, schedule, KarrasParams};
use crate::timesteps::Spacing;
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, Params, Result, Sampler};

/// Euler's parameters with Heun's default step count (each step costs two evaluations).
#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct HeunParams {
    /// number of steps N
    #[param(default = 25, min = 1.0)]
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

pub struct Heun {
    p: KarrasParams,
}

/// Heun's correction: x + ½(d + d₂)·(σ_next − σ), with d = ε̂ at (x, σ) and d₂ from ε̂₂ at
/// (x_e, σ_next).
pub fn heun_step(x: &Tensor, eps: &Tensor, x_euler: &Tensor, eps2: &Tensor, sigma: f64, sigma_next: f64) -> Tensor {
    let d = (x - (x - eps * sigma)) / sigma;
    let x0_2 = x_euler - eps2 * sigma_next;
    let d2 = (x_euler - x0_2) / sigma_next;
    x + (d + d2) * (0.5 * (sigma_next - sigma))
}

impl Component for Heun {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.heun";
    const SUMMARY: &'static str = "Heun: second-order steps of the probability-flow ODE in σ (2N − 1 evaluations)";
    const REFERENCE: &'static str = "Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, NeurIPS 2022; huggingface/diffusers scheduling_heun_discrete.py";
    type Params = HeunParams;

    fn new(p: HeunParams) -> Result<Self> {
        check_steps(p.steps)?;
        let HeunParams { steps, timestep_spacing, steps_offset, use_karras_sigmas } = p;
        Ok(Heun { p: KarrasParams { steps, timestep_spacing, steps_offset, use_karras_sigmas } })
    }
}

impl Sampler for Heun {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, _rng: &mut HostRng<'_>) -> Result<Tensor> {
        let ac = alphas_cumprod(den)?;
        let (ts, sigmas, init) = schedule(&self.p, &ac)?;
        let mut x = noise * init;
        for (i, &t) in ts.iter().enumerate() {
            let (s, s_next) = (sigmas[i], sigmas[i + 1]);
            let eps = eps_at(den, &x, s, t)?;
            let x_euler = euler_step(&x, &eps, s, s_next);
            if s_next == 0.0 {
                x = x_euler;
                continue;
            }
            // The second evaluation happens at the next timestep, with the next σ.
            let eps2 = eps_at(den, &x_euler, s_next, ts[i + 1])?;
            x = heun_step(&x, &eps, &x_euler, &eps2, s, s_next);
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heun_vector_of_methods_md() {
        // σ = 1 → 0.5, x = 1, ε̂ = 0.3, ε̂₂ = 0.2 at the Euler point: 0.875.
        let x = Tensor::from_slice(&[1.0f64]);
        let eps = Tensor::from_slice(&[0.3f64]);
        let xe = euler_step(&x, &eps, 1.0, 0.5);
        let out = heun_step(&x, &eps, &xe, &Tensor::from_slice(&[0.2f64]), 1.0, 0.5);
        assert!((f64::try_from(out).unwrap() - 0.875).abs() < 1e-12);
    }
}
