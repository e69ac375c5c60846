//! The σ schedule of diffusers' Euler and Heun schedulers (docs/methods.md §3.5): fractional
//! timesteps, σ interpolated linearly in t, a final σ = 0, and the initial noise scale.

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

    #[test]
    fn interpolation_is_linear_in_t() {
        let s = [0.0, 1.0, 3.0];
        assert_eq!(interp(&s, 1.5), 2.0);
        assert_eq!(interp(&s, 2.0), 3.0);
        assert_eq!(init_noise_sigma(Spacing::Linspace, &s), 3.0);
        assert_eq!(init_noise_sigma(Spacing::Leading, &s), 10f64.sqrt());
    }
}
