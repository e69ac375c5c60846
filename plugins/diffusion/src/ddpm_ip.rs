//! `diffusion.ddpm_ip`: DDPM-IP input perturbation (Ning et al., ICML 2023).
//!
//! Reference: forever208/DDPM-IP `guided_diffusion/gaussian_diffusion.py::training_losses`.
//! The network's input is formed with perturbed noise, x̃_t = √ᾱ_t x₀ + √(1−ᾱ_t)(ε + γξ) with
//! ξ ~ N(0, I) independent of ε, while **the regression target stays ε**. Sampling is unchanged.
//!
//! In a diffusion training job the host hands a batch transform the drawn noise ε as the batch's
//! inputs; this transform returns ε + γξ as the noise that forms x̃_t and ε as the target. ξ comes
//! from the host's seeded stream. Stateless.

use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Batch, BatchTransform, Component, ComponentKind, HostRng, PluginError, Result, Transformed};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct DdpmIpParams {
    /// γ: the perturbation's scale (0.15 for CIFAR-10)
    #[param(default = 0.1, min = 0.0)]
    pub gamma: f64,
}

pub struct DdpmIp {
    gamma: f64,
}

/// The noise that forms x̃_t: ε + γξ.
pub fn perturb(eps: &Tensor, xi: &Tensor, gamma: f64) -> Tensor {
    eps + xi * gamma
}

impl Component for DdpmIp {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "diffusion.ddpm_ip";
    const SUMMARY: &'static str = "DDPM-IP: train on inputs formed with ε + γξ, regress ε";
    const REFERENCE: &'static str =
        "Ning et al., Input Perturbation Reduces Exposure Bias in Diffusion Models, ICML 2023; forever208/DDPM-IP";
    const RANDOM: bool = true;
    const NOISE_TRANSFORM: bool = true;
    type Params = DdpmIpParams;

    fn new(p: DdpmIpParams) -> Result<Self> {
        if !(p.gamma >= 0.0 && p.gamma.is_finite()) {
            return Err(PluginError(format!("gamma must be a finite number ≥ 0, got {}", p.gamma)));
        }
        Ok(DdpmIp { gamma: p.gamma })
    }
}

impl BatchTransform for DdpmIp {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let eps = batch.x;
        let xi = crate::common::normal_like(rng, &eps);
        Ok(Transformed { x: perturb(&eps, &xi, self.gamma), target: eps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/methods.md §3.6: x₀ = 0.5, ᾱ = 0.64, ε = 1, ξ = −2, γ = 0.1 gives x̃ = 0.88, target 1.
    #[test]
    fn methods_vector() {
        let eps = Tensor::from_slice(&[1.0f64]);
        let noise = perturb(&eps, &Tensor::from_slice(&[-2.0f64]), 0.1);
        let x_t = 0.64f64.sqrt() * 0.5 + (1.0f64 - 0.64).sqrt() * noise.double_value(&[0]);
        assert!((x_t - 0.88).abs() < 1e-12, "{x_t}");
    }
}
