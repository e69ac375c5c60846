//! `diffusion.pcg`: classifier-free guidance as a predictor-corrector (Bradley & Nakkiran,
//! arXiv 2408.09000, TMLR 2025; docs/methods.md §3.10). The authors give no code; this follows
//! the stated theorem: CFG-DDPM at scale γ equals, in the SDE limit, a DDIM predictor on
//! p(x | c) plus Langevin corrector steps on the powered distribution
//! p_t(x | c)^γ' p_t(x)^(1−γ') with γ' = 2γ − 1.
//!
//! Per step t → t' = t − T//N (ᾱ' = 1 when t' < 0), over DDIM's timesteps:
//! - predictor, with the condition only: ε_c = ε_θ(x, t, c), x̂₀ = (x − √(1−ᾱ_t)ε_c)/√ᾱ_t,
//!   x ← √ᾱ'·x̂₀ + √(1−ᾱ')·ε_c;
//! - corrector, K times (not after the final step): η = ρ·½(1 − ᾱ_t/ᾱ');
//!   ε_γ' = γ'·ε_θ(x, t', c) + (1 − γ')·ε_θ(x, t', ∅) (one pass of 2B rows);
//!   x ← x − η·ε_γ'/√(1−ᾱ') + √(2η)·z, z fresh from the host's stream.
//!
//! NFE: 1 + 2K per step, 1 on the last. It combines the conditional and unconditional
//! predictions itself, so it needs a class-conditional model trained with label dropout and
//! takes no `guidance:`. Stateless.

use crate::common::{alphas_cumprod, check_steps, check_timesteps, normal_like, predict_x0};
use crate::timesteps::{ddim_timesteps, Spacing};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, Params, PluginError, Result, Sampler};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct PcgParams {
    /// number of predictor steps N
    #[param(default = 50, min = 1.0)]
    pub steps: i64,
    /// γ': the power of the corrector's target (2γ − 1 reproduces CFG-DDPM at scale γ; 3 for γ = 2)
    #[param(default = 3.0)]
    pub gamma: f64,
    /// K: Langevin corrector steps after each predictor step
    #[param(default = 1, min = 0.0)]
    pub langevin_steps: i64,
    /// ρ: the Langevin step size, as a multiple of ½(1 − ᾱ_t/ᾱ')
    #[param(default = 1.0, min = 0.0)]
    pub langevin_scale: f64,
    /// clip the predictor's x̂₀ to ±clip_sample_range
    #[param(default = false)]
    pub clip_sample: bool,
    /// the clipping range of x̂₀
    #[param(default = 1.0, min = 0.0)]
    pub clip_sample_range: f64,
    /// added to every leading timestep
    #[param(default = 0)]
    pub steps_offset: i64,
    /// how the N timesteps are picked: leading, trailing or linspace
    #[param(default = "leading", choices = ["leading", "trailing", "linspace"])]
    pub timestep_spacing: Spacing,
}

/// One Langevin corrector step at level ᾱ' with step η, given the two predictions there.
pub fn corrector_step(
    x: &Tensor,
    cond: &Tensor,
    uncond: &Tensor,
    gamma: f64,
    eta: f64,
    a_next: f64,
    z: &Tensor,
) -> Tensor {
    let eps = cond * gamma + uncond * (1.0 - gamma);
    x - eps * (eta / (1.0 - a_next).sqrt()) + z * (2.0 * eta).sqrt()
}

pub struct Pcg {
    p: PcgParams,
}

impl Component for Pcg {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.pcg";
    const SUMMARY: &'static str =
        "CFG as a predictor-corrector: a DDIM step on the conditional model, then Langevin steps on the γ'-powered distribution";
    const REFERENCE: &'static str =
        "Bradley & Nakkiran, Classifier-Free Guidance is a Predictor-Corrector, arXiv 2408.09000, TMLR 2025";
    const RANDOM: bool = true;
    const GUIDES: bool = true;
    type Params = PcgParams;

    fn new(p: PcgParams) -> Result<Self> {
        check_steps(p.steps)?;
        Ok(Pcg { p })
    }
}

impl Sampler for Pcg {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, rng: &mut HostRng<'_>) -> Result<Tensor> {
        let p = &self.p;
        let ac = alphas_cumprod(den)?;
        let t_total = ac.len();
        let n = p.steps as usize;
        if n > t_total {
            return Err(PluginError(format!("steps ({n}) exceeds the {t_total} training timesteps")));
        }
        let stride = (t_total / n) as i64;
        let ts = ddim_timesteps(p.timestep_spacing, t_total, n, p.steps_offset);
        check_timesteps(ts.iter().map(|&t| t as f64), t_total)?;
        let clip = p.clip_sample.then_some(p.clip_sample_range);
        let mut x = noise;
        for t in ts {
            let a_t = ac[t as usize];
            let next = t - stride;
            let a_next = if next >= 0 { ac[next as usize] } else { 1.0 };
            // Predictor: DDIM (η = 0) on the conditional prediction.
            let eps = den.eps(&x, t as f64)?;
            let x0 = predict_x0(&x, &eps, a_t, clip);
            x = x0 * a_next.sqrt() + eps * (1.0 - a_next).sqrt();
            if next < 0 {
                break;
            }
            let eta = p.langevin_scale * 0.5 * (1.0 - a_t / a_next);
            for _ in 0..p.langevin_steps {
                let (cond, uncond) = den.eps_both(&x, next as f64)?;
                let z = normal_like(rng, &x);
                x = corrector_step(&x, &cond, &uncond, p.gamma, eta, a_next, &z);
            }
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/methods.md §3.10: ᾱ_t = 0.5, ᾱ' = 0.8, x = 1, ε_c = 0.6: the predictor gives
    /// 0.996583; the corrector with ε_θ(x', t', c) = 0.3, ε_θ(x', t', ∅) = 0.1, γ' = 3, z = −0.5:
    /// η = 0.1875, ε_γ' = 0.7, x'' = 0.396913.
    #[test]
    fn the_methods_vector() {
        let t = |v: f64| Tensor::from_slice(&[v]);
        let x0 = predict_x0(&t(1.0), &t(0.6), 0.5, None);
        let x = f64::try_from(x0 * 0.8f64.sqrt() + t(0.6) * 0.2f64.sqrt()).unwrap();
        assert!((x - 0.996583).abs() < 1e-6, "{x}");
        let eta: f64 = 0.5 * (1.0 - 0.5 / 0.8);
        assert!((eta - 0.1875).abs() < 1e-15);
        let out = f64::try_from(corrector_step(&t(x), &t(0.3), &t(0.1), 3.0, eta, 0.8, &t(-0.5))).unwrap();
        assert!((out - 0.396913).abs() < 1e-6, "{out}");
    }
}
