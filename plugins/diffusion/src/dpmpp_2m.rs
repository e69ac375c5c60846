//! `diffusion.dpmpp_2m`: DPM-Solver++(2M) (Lu et al., 2022), multistep, data prediction.
//!
//! Reference: huggingface/diffusers `scheduling_dpmsolver_multistep.py` with its defaults
//! (`algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
//! `lower_order_final=True`, `final_sigmas_type="zero"`, `timestep_spacing="linspace"`).
//! - Timesteps: `linspace`: round(linspace(0, T−1, N+1)) reversed without the final 0;
//!   `leading`: arange(N+1)·⌊T/(N+1)⌋ reversed without the last, plus the offset; `trailing`:
//!   round(arange(T, 0, −T/N)) − 1.
//! - σ(t) = √((1−ᾱ_t)/ᾱ_t) at each timestep, then 0; α = 1/√(σ²+1), s = σα, λ = log α − log s.
//! - Model output m = (x − s·ε̂)/α (x₀ prediction at the current σ).
//! - First order (the first step, and the final step to σ = 0):
//!   x' = (s_{i+1}/s_i)·x − α_{i+1}(e^{−h} − 1)·m_i with h = λ_{i+1} − λ_i (x' = m_i at σ = 0).
//! - Second order (midpoint): r₀ = h₀/h, D₀ = m_i, D₁ = (m_i − m_{i−1})/r₀,
//!   x' = (s_{i+1}/s_i)·x − α_{i+1}(e^{−h} − 1)·D₀ − ½·α_{i+1}(e^{−h} − 1)·D₁.
//!
//! NFE = N. Deterministic; the history of model outputs lives within one call. Stateless.

use crate::common::{alphas_cumprod, check_steps, check_timesteps};
use crate::timesteps::{round_half_even, Spacing};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, PluginError, Result, Sampler};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct DpmppParams {
    /// number of inference steps N (one evaluation each)
    #[param(default = 20, min = 1.0)]
    pub steps: i64,
    /// linspace, leading or trailing timesteps
    #[param(default = "linspace", choices = ["leading", "trailing", "linspace"])]
    pub timestep_spacing: Spacing,
    /// added to every leading timestep
    #[param(default = 0)]
    pub steps_offset: i64,
    /// first order on the final step (to σ = 0)
    #[param(default = true)]
    pub lower_order_final: bool,
}

pub struct Dpmpp2m {
    p: DpmppParams,
}

/// DPM-Solver's timesteps for `n` steps out of `t`, descending.
pub fn dpm_timesteps(spacing: Spacing, t: usize, n: usize, offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => {
            let last = (t - 1) as f64;
            (1..=n).rev().map(|i| round_half_even(last * i as f64 / n as f64) as i64).collect()
        }
        Spacing::Leading => {
            let r = (t / (n + 1)) as i64;
            (1..=n as i64).rev().map(|i| i * r + offset).collect()
        }
        Spacing::Trailing => crate::timesteps::ddim_timesteps(Spacing::Trailing, t, n, 0),
    }
}

/// (α, s, λ) for a VE sigma; σ = 0 gives α = 1, s = 0, λ = +∞.
pub fn vp(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * alpha;
    (alpha, s, alpha.ln() - s.ln())
}

/// One update from sigma `cur` to `next`: first order, or second order with the previous
/// sigma and model output. `m` is the current model output (x₀ prediction).
pub fn dpmpp_update(x: &Tensor, m: &Tensor, cur: f64, next: f64, prev: Option<(f64, &Tensor)>) -> Tensor {
    let (_, s_i, l_i) = vp(cur);
    let (a_n, s_n, l_n) = vp(next);
    let h = l_n - l_i;
    // e^{−h}: 0 when λ_{i+1} = +∞ (σ_{i+1} = 0).
    let emh = if h.is_infinite() { 0.0 } else { (-h).exp() };
    let ratio = s_n / s_i;
    let first = x * ratio - m * (a_n * (emh - 1.0));
    match prev {
        None => first,
        Some((sigma_prev, m_prev)) => {
            let (_, _, l_p) = vp(sigma_prev);
            let r0 = (l_i - l_p) / h;
            let d1 = (m - m_prev) / r0;
            first - d1 * (0.5 * a_n * (emh - 1.0))
        }
    }
}

impl Component for Dpmpp2m {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.dpmpp_2m";
    const SUMMARY: &'static str = "DPM-Solver++(2M): a second-order multistep solver of the probability-flow ODE";
    const REFERENCE: &'static str = "Lu et al., DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models, 2022; huggingface/diffusers scheduling_dpmsolver_multistep.py";
    type Params = DpmppParams;

    fn new(p: DpmppParams) -> Result<Self> {
        check_steps(p.steps)?;
        Ok(Dpmpp2m { p })
    }
}

impl Sampler for Dpmpp2m {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, _rng: &mut HostRng<'_>) -> Result<Tensor> {
        let ac = alphas_cumprod(den)?;
        let t_total = ac.len();
        let n = self.p.steps as usize;
        if n >= t_total {
            return Err(PluginError(format!("steps ({n}) must be below the {t_total} training timesteps")));
        }
        let ts = dpm_timesteps(self.p.timestep_spacing, t_total, n, self.p.steps_offset);
        check_timesteps(ts.iter().map(|&t| t as f64), t_total)?;
        let mut sigmas: Vec<f64> = ts.iter().map(|&t| ((1.0 - ac[t as usize]) / ac[t as usize]).sqrt()).collect();
        sigmas.push(0.0);
        let mut x = noise;
        let mut prev: Option<(f64, Tensor)> = None;
        for (i, &t) in ts.iter().enumerate() {
            let (alpha, s, _) = vp(sigmas[i]);
            let eps = den.eps(&x, t as f64)?;
            let m = (&x - eps * s) / alpha;
            let last = i + 1 == ts.len();
            // The first step has no history; the final one is first order (lower_order_final,
            // and final_sigmas_type "zero" forces it).
            let second = prev.as_ref().filter(|_| !(last && (self.p.lower_order_final || sigmas[i + 1] == 0.0)));
            x = dpmpp_update(&x, &m, sigmas[i], sigmas[i + 1], second.map(|(s, m)| (*s, m)));
            prev = Some((sigmas[i], m));
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_of_methods_md() {
        assert_eq!(
            dpm_timesteps(Spacing::Linspace, 1000, 10, 0),
            vec![999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
        );
        assert_eq!(dpm_timesteps(Spacing::Leading, 1000, 10, 0)[0], 900);
        assert_eq!(dpm_timesteps(Spacing::Leading, 1000, 10, 0).last(), Some(&90));
    }

    #[test]
    fn update_vector_of_methods_md() {
        // VE sigmas prev 2.0, cur 1.0, next 0.5; m_{i−1} = 0.2, m_i = 0.3, x = 1: h = ln 2,
        // r₀ = 1; 2M gives 0.7889802905, first order 0.7666196107.
        let x = Tensor::from_slice(&[1.0f64]);
        let m = Tensor::from_slice(&[0.3f64]);
        let m_prev = Tensor::from_slice(&[0.2f64]);
        let first = f64::try_from(dpmpp_update(&x, &m, 1.0, 0.5, None)).unwrap();
        let second = f64::try_from(dpmpp_update(&x, &m, 1.0, 0.5, Some((2.0, &m_prev)))).unwrap();
        assert!((first - 0.7666196107).abs() < 1e-9, "{first}");
        assert!((second - 0.7889802905).abs() < 1e-9, "{second}");
        // To σ = 0 the first-order step returns the x₀ prediction.
        assert_eq!(f64::try_from(dpmpp_update(&x, &m, 1.0, 0.0, None)).unwrap(), 0.3);
    }
}
