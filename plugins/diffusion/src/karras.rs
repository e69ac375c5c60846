//! The σ schedule of diffusers' Euler and Heun schedulers (docs/methods.md §3.5): fractional
//! timesteps, σ interpolated linearly in t, a final σ = 0, and the initial noise scale; and
//! Karras et al.'s σ spacing (`use_karras_sigmas`) with the timestep recovered from σ by
//! interpolating log σ, as diffusers' `_convert_to_karras` and `_sigma_to_t` do.

use crate::timesteps::Spacing;

/// σ(t) = √((1−ᾱ_t)/ᾱ_t) at the integer training timesteps.
pub fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// The timesteps (floats, descending) for `n` steps out of `t`, as `set_timesteps` picks them.
pub fn timesteps(spacing: Spacing, t: usize, n: usize, offset: i64) -> Vec<f64> {
    match spacing {
        // linspace(0, T−1, N) reversed, not rounded.
        Spacing::Linspace => {
            let last = (t - 1) as f64;
            (0..n).rev().map(|i| if n == 1 { 0.0 } else { last * i as f64 / (n - 1) as f64 }).collect()
        }
        Spacing::Leading => {
            let r = (t / n) as f64;
            (0..n).rev().map(|i| (i as f64 * r).round() + offset as f64).collect()
        }
        Spacing::Trailing => {
            let step = t as f64 / n as f64;
            let mut out = Vec::new();
            let mut i = 0;
            loop {
                let v = t as f64 - i as f64 * step;
                if v <= 0.0 {
                    break;
                }
                out.push(crate::timesteps::round_half_even(v) - 1.0);
                i += 1;
            }
            out
        }
    }
}

/// np.interp of the training sigmas at a fractional timestep.
pub fn interp(sigmas: &[f64], t: f64) -> f64 {
    let last = sigmas.len() - 1;
    if t <= 0.0 {
        return sigmas[0];
    }
    if t >= last as f64 {
        return sigmas[last];
    }
    let lo = t.floor() as usize;
    sigmas[lo] + (sigmas[lo + 1] - sigmas[lo]) * (t - lo as f64)
}

/// The scale of the initial noise: σ_max for linspace and trailing spacing, √(σ_max²+1) for
/// leading (`init_noise_sigma`).
pub fn init_noise_sigma(spacing: Spacing, sigmas: &[f64]) -> f64 {
    let max = sigmas.iter().copied().fold(0.0, f64::max);
    match spacing {
        Spacing::Leading => (max * max + 1.0).sqrt(),
        _ => max,
    }
}

/// Karras et al.'s spacing: σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7,
/// descending from σ_max to σ_min.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..n)
        .map(|i| {
            let ramp = if n == 1 { 0.0 } else { i as f64 / (n - 1) as f64 };
            (hi + ramp * (lo - hi)).powf(rho)
        })
        .collect()
}

/// The (fractional) timestep of σ: log σ interpolated between the neighbouring training
/// timesteps, clamped to 0..=T−1 (diffusers' `_sigma_to_t`). `log_sigmas` ascend with t.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    // The last index whose log σ is at most ls (0 when there is none), at most T−2.
    let low = log_sigmas.iter().rposition(|&l| ls - l >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The Karras σ's between `sigma_min` and `sigma_max` and their timesteps, rounded when the
/// solver calls the model at integer timesteps (DPM-Solver, UniPC) or fractional (Euler, Heun).
pub fn karras_schedule(ac: &[f64], sigma_min: f64, sigma_max: f64, n: usize, round: bool) -> (Vec<f64>, Vec<f64>) {
    let log_sigmas: Vec<f64> = train_sigmas(ac).iter().map(|s| s.ln()).collect();
    let sigmas = karras_sigmas(sigma_min, sigma_max, n);
    let ts = sigmas
        .iter()
        .map(|&s| {
            let t = sigma_to_t(s, &log_sigmas);
            if round {
                crate::timesteps::round_half_even(t)
            } else {
                t
            }
        })
        .collect();
    (ts, sigmas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_timesteps_are_not_rounded() {
        let ts = timesteps(Spacing::Linspace, 1000, 4, 0);
        assert_eq!(ts, vec![999.0, 666.0, 333.0, 0.0]);
        let ts = timesteps(Spacing::Linspace, 1000, 7, 0);
        assert!((ts[1] - 832.5).abs() < 1e-12, "{ts:?}");
        assert_eq!(timesteps(Spacing::Trailing, 1000, 10, 0)[0], 999.0);
        assert_eq!(timesteps(Spacing::Leading, 1000, 10, 1)[0], 901.0);
    }

    /// docs/methods.md §3.5: σ_min = 0.002, σ_max = 80, N = 5.
    #[test]
    fn karras_sigmas_of_methods_md() {
        let s = karras_sigmas(0.002, 80.0, 5);
        for (got, want) in s.iter().zip([80.0, 17.5278320, 2.5152190, 0.1697528, 0.002]) {
            assert!((got - want).abs() < 1e-6 * want.max(1.0), "{s:?}");
        }
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let ac: Vec<f64> = (0..10).map(|i| 1.0 - 0.09 * i as f64 - 0.01).collect();
        let ls: Vec<f64> = train_sigmas(&ac).iter().map(|s| s.ln()).collect();
        for t in [0usize, 3, 9] {
            assert!((sigma_to_t(ls[t].exp(), &ls) - t as f64).abs() < 1e-9);
        }
        // Half-way in log σ is half-way in t; beyond the ends it clamps.
        assert!((sigma_to_t(((ls[4] + ls[5]) / 2.0).exp(), &ls) - 4.5).abs() < 1e-9);
        assert_eq!(sigma_to_t(1e-6, &ls), 0.0);
        assert_eq!(sigma_to_t(1e6, &ls), 9.0);
    }

    #[test]
    fn interpolation_is_linear_in_t() {
        let s = [0.0, 1.0, 3.0];
        assert_eq!(interp(&s, 1.5), 2.0);
        assert_eq!(interp(&s, 2.0), 3.0);
        assert_eq!(init_noise_sigma(Spacing::Linspace, &s), 3.0);
        assert_eq!(init_noise_sigma(Spacing::Leading, &s), 10f64.sqrt());
    }
}
