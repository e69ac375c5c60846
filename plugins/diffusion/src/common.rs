//! What the samplers share: the denoiser's ᾱ schedule, the checks on steps and timesteps, the
//! x̂₀ prediction from ε̂ and its clipping parameters, and Gaussian noise from the host's stream.

use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::{param, DenoiserCtx, HostRng, ParamSpec, ParamType, PluginError, Result};

/// ᾱ_t of every training timestep, as the denoiser defines them.
pub fn alphas_cumprod(den: &mut DenoiserCtx<'_>) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(den.alphas_cumprod().to_kind(Kind::Double))?)
}

/// A sampler takes at least one step.
pub fn check_steps(steps: i64) -> Result<()> {
    if steps < 1 {
        return Err(PluginError(format!("steps must be at least 1, got {steps}")));
    }
    Ok(())
}

/// Every timestep lies in 0..=T−1 (a large `steps_offset` can push the first one past it).
pub fn check_timesteps(ts: impl IntoIterator<Item = f64>, t_total: usize) -> Result<()> {
    match ts.into_iter().find(|&t| t < 0.0 || t > (t_total - 1) as f64) {
        Some(bad) => Err(PluginError(format!("timestep {bad} is outside 0..{t_total}; check steps_offset"))),
        None => Ok(()),
    }
}

/// `clip_sample` and `clip_sample_range`, as the DDIM and DDPM schedulers declare them.
pub fn clip_params() -> [ParamSpec; 2] {
    let mut range = param("clip_sample_range", ParamType::Float, 1.0, "the clipping range of x̂₀");
    range.min = Some(0.0);
    [param("clip_sample", ParamType::Bool, true, "clip the predicted x̂₀ to ±clip_sample_range"), range]
}

/// x̂₀ = (x − √(1−ᾱ_t)·ε̂)/√ᾱ_t, clamped to ±`clip` when given.
pub fn predict_x0(x: &Tensor, eps: &Tensor, a_t: f64, clip: Option<f64>) -> Tensor {
    let x0 = (x - eps * (1.0 - a_t).sqrt()) / a_t.sqrt();
    match clip {
        Some(r) => x0.clamp(-r, r),
        None => x0,
    }
}

/// Standard normal noise shaped like `x`, from the host's seeded stream.
pub fn normal_like(rng: &mut HostRng<'_>, x: &Tensor) -> Tensor {
    let v: Vec<f64> = (0..x.numel()).map(|_| rng.normal()).collect();
    Tensor::from_slice(&v).reshape(x.size()).to_kind(x.kind()).to_device(x.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_timesteps_are_checked_with_the_same_words_for_every_sampler() {
        assert!(check_steps(1).is_ok());
        assert_eq!(check_steps(0).unwrap_err().0, "steps must be at least 1, got 0");
        assert!(check_timesteps([999.0, 500.5, 0.0], 1000).is_ok());
        assert_eq!(
            check_timesteps([1000.0, 0.0], 1000).unwrap_err().0,
            "timestep 1000 is outside 0..1000; check steps_offset"
        );
        assert!(check_timesteps([-1.0], 1000).is_err());
    }
}
