//! What the VP samplers share: the x̂₀ prediction from ε̂, and Gaussian noise from the host's
//! stream.

use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::HostRng;

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
