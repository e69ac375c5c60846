//! `diffusion.dpmpp_2m`: DPM-Solver++(2M) (Lu et al., 2022), multistep, data prediction; and
//! `diffusion.dpmpp_2m_sde`, its SDE variant (diffusers' `algorithm_type="sde-dpmsolver++"`).
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
//! - `use_karras_sigmas`: Karras σ's (ρ = 7) from the last training σ down to the first; the
//!   model is called at each σ's rounded timestep, the solver steps between the Karras σ's.
//!
//! - SDE variant: x' = (s_{i+1}/s_i)e^{−h}·x + α_{i+1}(1 − e^{−2h})·(D₀ + ½D₁) +
//!   s_{i+1}√(1 − e^{−2h})·z with z fresh from the host's stream at every step (D₁ only in a
//!   second-order step).
//!
//! - `dualfast_c_max` > 0: DualFast's correction of ε̂ (`crate::dualfast`) before m is formed.
//!
//! NFE = N. `dpmpp_2m` is deterministic; the history of model outputs lives within one call.
//! Stateless.

use crate::common::{alphas_cumprod, check_steps, check_timesteps, normal_like};
use crate::dualfast::{CoefficientSchedule, Dualfast, Tau};
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
    /// Karras et al.'s σ spacing (ρ = 7) over the whole training range; the model is called at
    /// each σ's rounded timestep
    #[param(default = false, added_later)]
    #[serde(default)]
    pub use_karras_sigmas: bool,
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

/// The timesteps (integers, as floats) and the VE σ's of one run, plus the final σ = 0: σ(t)
/// at each listed timestep, or with `use_karras_sigmas` the Karras σ's between the first and
/// last training σ and their rounded timesteps (diffusers rounds them for every schedule but
/// the cosine one; here always). Shared by DPM-Solver++ and UniPC.
pub fn dpm_schedule(
    ac: &[f64],
    n: usize,
    spacing: Spacing,
    offset: i64,
    use_karras: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let t_total = ac.len();
    if n >= t_total {
        return Err(PluginError(format!("steps ({n}) must be below the {t_total} training timesteps")));
    }
    let all = crate::karras::train_sigmas(ac);
    let (ts, mut sigmas) = if use_karras {
        crate::karras::karras_schedule(ac, all[0], all[t_total - 1], n, true)
    } else {
        let ts = dpm_timesteps(spacing, t_total, n, offset);
        check_timesteps(ts.iter().map(|&t| t as f64), t_total)?;
        (ts.iter().map(|&t| t as f64).collect(), ts.iter().map(|&t| all[t as usize]).collect())
    };
    sigmas.push(0.0);
    Ok((ts, sigmas))
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

/// One update of the SDE variant (`sde-dpmsolver++`, midpoint) from `cur` to `next` with fresh
/// noise `z`: x' = (s_{i+1}/s_i)e^{−h}·x + α_{i+1}(1 − e^{−2h})·(D₀ + ½D₁) + s_{i+1}√(1 − e^{−2h})·z
/// (D₁ only in the second-order step). At σ = 0 this is x' = m_i.
pub fn dpmpp_sde_update(
    x: &Tensor,
    m: &Tensor,
    cur: f64,
    next: f64,
    prev: Option<(f64, &Tensor)>,
    z: &Tensor,
) -> Tensor {
    let (_, s_i, l_i) = vp(cur);
    let (a_n, s_n, l_n) = vp(next);
    let h = l_n - l_i;
    let (emh, em2h) = if h.is_infinite() { (0.0, 0.0) } else { ((-h).exp(), (-2.0 * h).exp()) };
    // Out of place: `m` is the history's own tensor.
    let d = match prev {
        Some((sigma_prev, m_prev)) => {
            let (_, _, l_p) = vp(sigma_prev);
            let r0 = (l_i - l_p) / h;
            m + (m - m_prev) / r0 * 0.5
        }
        None => m.shallow_clone(),
    };
    x * (s_n / s_i * emh) + d * (a_n * (1.0 - em2h)) + z * (s_n * (1.0 - em2h).sqrt())
}

/// The multistep loop of both variants: `update` takes (x, m_i, σ_i, σ_{i+1}, the previous σ
/// and output when this step is second order).
fn multistep(
    p: &DpmppParams,
    noise: Tensor,
    den: &mut DenoiserCtx<'_>,
    mut update: impl FnMut(&Tensor, &Tensor, f64, f64, Option<(f64, &Tensor)>) -> Tensor,
) -> Result<Tensor> {
    let ac = alphas_cumprod(den)?;
    let (ts, sigmas) = dpm_schedule(&ac, p.steps as usize, p.timestep_spacing, p.steps_offset, p.use_karras_sigmas)?;
    let mut dualfast = Dualfast::new(p.dualfast_c_max, p.dualfast_schedule, p.dualfast_tau, ts.len(), ac.len());
    let mut x = noise;
    let mut prev: Option<(f64, Tensor)> = None;
    for (i, &t) in ts.iter().enumerate() {
        let (alpha, s, _) = vp(sigmas[i]);
        // DualFast's correction (when on): the data prediction and the history take ε̃.
        let eps = dualfast.correct(i, t, den.eps(&x, t)?);
        let m = (&x - eps * s) / alpha;
        let last = i + 1 == ts.len();
        // The first step has no history; the final one is first order (lower_order_final,
        // and final_sigmas_type "zero" forces it).
        let second = prev.as_ref().filter(|_| !(last && (p.lower_order_final || sigmas[i + 1] == 0.0)));
        x = update(&x, &m, sigmas[i], sigmas[i + 1], second.map(|(s, m)| (*s, m)));
        prev = Some((sigmas[i], m));
    }
    Ok(x)
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
        multistep(&self.p, noise, den, dpmpp_update)
    }
}

/// `diffusion.dpmpp_2m_sde`: DPM-Solver++(2M) SDE, the stochastic variant.
pub struct Dpmpp2mSde {
    p: DpmppParams,
}

impl Component for Dpmpp2mSde {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.dpmpp_2m_sde";
    const SUMMARY: &'static str =
        "DPM-Solver++(2M) SDE: the second-order multistep solver of the reverse SDE (fresh noise every step)";
    const REFERENCE: &'static str = "Lu et al., DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models, 2022; huggingface/diffusers scheduling_dpmsolver_multistep.py (algorithm_type=\"sde-dpmsolver++\")";
    const RANDOM: bool = true;
    type Params = DpmppParams;

    fn new(p: DpmppParams) -> Result<Self> {
        check_steps(p.steps)?;
        Ok(Dpmpp2mSde { p })
    }
}

impl Sampler for Dpmpp2mSde {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, rng: &mut HostRng<'_>) -> Result<Tensor> {
        // Noise is drawn at every step, the last (to σ = 0, where it has no weight) included.
        multistep(&self.p, noise, den, |x, m, cur, next, prev| {
            let z = normal_like(rng, x);
            dpmpp_sde_update(x, m, cur, next, prev, &z)
        })
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

    /// The SDE variant by hand: σ 1 → 0.5, x = 1, m = 0.3, z = −0.4. α' = 1/√1.25, s' = 0.5α',
    /// s = 1/√2, e^{−h} = (s'/α')/(s/α) = 0.5; x' = (s'/s)·0.5·x + α'(1 − 0.25)·m + s'√0.75·z.
    #[test]
    fn sde_update_by_hand() {
        let x = Tensor::from_slice(&[1.0f64]);
        let m = Tensor::from_slice(&[0.3f64]);
        let z = Tensor::from_slice(&[-0.4f64]);
        let (a_n, s_n, s_i) = (1.0 / 1.25f64.sqrt(), 0.5 / 1.25f64.sqrt(), 0.5f64.sqrt());
        let want = s_n / s_i * 0.5 + a_n * 0.75 * 0.3 + s_n * 0.75f64.sqrt() * -0.4;
        let got = f64::try_from(dpmpp_sde_update(&x, &m, 1.0, 0.5, None, &z)).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // Second order adds ½α'(1 − e^{−2h})·D₁ with D₁ = (m − m_prev)/r₀ (r₀ = 1 here).
        let m_prev = Tensor::from_slice(&[0.2f64]);
        let got2 = f64::try_from(dpmpp_sde_update(&x, &m, 1.0, 0.5, Some((2.0, &m_prev)), &z)).unwrap();
        assert!((got2 - got - 0.5 * a_n * 0.75 * 0.1).abs() < 1e-12);
        // To σ = 0: the x₀ prediction, whatever the noise.
        assert_eq!(f64::try_from(dpmpp_sde_update(&x, &m, 1.0, 0.0, None, &z)).unwrap(), 0.3);
    }
}
