//! `diffusion.closed_form`: smoothed closed-form diffusion sampling (σ-CFDM; Scarvelis, Borde and
//! Solomon, TMLR 2023), docs/methods.md §3.8. No training: the score is computed from the training set
//! the host's denoiser stands for.
//!
//! - Interpolant z_t = t·x + (1−t)·ε, t ∈ [0, 1], t = 0 noise and t = 1 data.
//! - Smoothed score with M draws ξ_m ~ N(0, I), redrawn for each generated sample (drawn once
//!   per sample at the start of its trajectory): w_{m,i} = softmax_i(−‖z + σξ_m − t x_i‖²/(2(1−t)²)),
//!   s_σ(t, z) = ((1/M) Σ_m Σ_i w_{m,i} t x_i − z)/(1−t)² (z, not z + σξ, is subtracted).
//! - Euler on v = (z + (1−t)s)/t with h = 1/S at t_n = n·h for n = 1..S−1: the t = 0 step is
//!   skipped. NFE (score evaluations) = S − 1.
//! - The initial z is the host's standard normal noise (the paper's N(0, I); the reference demo
//!   uses std(X) per feature instead).
//!
//! Cost O(N·D·M) per sample and step. The denoiser's ε̂ is not used.

use crate::common::normal_like;
use serde::Deserialize;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, PluginError, Result, Sampler};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct ClosedFormParams {
    /// σ: the smoothing scale (0 memorizes the training set)
    #[param(default = 0.4, min = 0.0)]
    pub sigma: f64,
    /// M: smoothing draws per sample
    #[param(default = 2, min = 1.0)]
    pub draws: i64,
    /// S: Euler steps (S − 1 score evaluations)
    #[param(default = 100, min = 2.0)]
    pub steps: i64,
}

pub struct ClosedForm {
    p: ClosedFormParams,
}

/// The smoothed score at time t for samples `z` `[B, D]`, training points `x` `[N, D]` and
/// smoothing draws `xi` `[B, M, D]` (all float64).
pub fn smoothed_score(z: &Tensor, x: &Tensor, xi: &Tensor, sigma: f64, t: f64) -> Tensor {
    let var = (1.0 - t) * (1.0 - t);
    // [B, M, 1, D] − [1, 1, N, D] → squared distances [B, M, N].
    let shifted = (z.unsqueeze(1) + xi * sigma).unsqueeze(2);
    let d2 = (shifted - (x * t).unsqueeze(0).unsqueeze(0)).square().sum_dim_intlist(-1, false, Kind::Double);
    let w = (-d2 / (2.0 * var)).softmax(-1, Kind::Double);
    // Σ_i w_{m,i} t x_i averaged over m: [B, D].
    let mean = w.matmul(&(x * t)).mean_dim(1, false, Kind::Double);
    (mean - z) / var
}

impl Component for ClosedForm {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.closed_form";
    const SUMMARY: &'static str = "smoothed closed-form diffusion: Euler on the σ-smoothed score of the training set";
    const REFERENCE: &'static str = "Scarvelis, Borde & Solomon, Closed-form Diffusion Models, TMLR 2023";
    const RANDOM: bool = true;
    type Params = ClosedFormParams;

    fn new(p: ClosedFormParams) -> Result<Self> {
        if p.steps < 2 || p.draws < 1 || !(p.sigma >= 0.0 && p.sigma.is_finite()) {
            return Err(PluginError(format!(
                "needs steps ≥ 2, draws ≥ 1 and a finite sigma ≥ 0; got {}, {}, {}",
                p.steps, p.draws, p.sigma
            )));
        }
        Ok(ClosedForm { p })
    }
}

impl Sampler for ClosedForm {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, rng: &mut HostRng<'_>) -> Result<Tensor> {
        let data = den
            .data()
            .ok_or_else(|| PluginError("the closed-form sampler needs the denoiser's training set".into()))?;
        let x = data.to_kind(Kind::Double).reshape([data.size()[0], -1]);
        let (b, shape) = (noise.size()[0], noise.size());
        let mut z = noise.to_kind(Kind::Double).reshape([b, -1]);
        if x.size()[1] != z.size()[1] {
            return Err(PluginError(format!(
                "training points have {} features, the noise {}",
                x.size()[1],
                z.size()[1]
            )));
        }
        let xi = normal_like(rng, &Tensor::zeros([b, self.p.draws, z.size()[1]], (Kind::Double, z.device())));
        let h = 1.0 / self.p.steps as f64;
        for n in 1..self.p.steps {
            let t = n as f64 * h;
            let s = smoothed_score(&z, &x, &xi, self.p.sigma, t);
            den.count_evaluations(1);
            let v = (&z + s * (1.0 - t)) / t;
            z += v * h;
        }
        Ok(z.reshape(shape.as_slice()).to_kind(noise.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/methods.md §3.8: one training point x₁ = 2 and z₀ = −1 with S = 10 ends at exactly 2.
    #[test]
    fn single_point_chain_ends_at_the_point() {
        let x = Tensor::from_slice(&[2.0f64]).reshape([1, 1]);
        let mut z = Tensor::from_slice(&[-1.0f64]).reshape([1, 1]);
        let xi = Tensor::from_slice(&[0.3f64, -0.7]).reshape([1, 2, 1]);
        for n in 1..10 {
            let t = n as f64 / 10.0;
            let v = (&z + smoothed_score(&z, &x, &xi, 0.4, t) * (1.0 - t)) / t;
            // v = (x₁ − z)/(1 − t) for a single point, whatever ξ.
            let want = (2.0 - z.double_value(&[0, 0])) / (1.0 - t);
            assert!((v.double_value(&[0, 0]) - want).abs() < 1e-12);
            z += v * 0.1;
        }
        assert!((z.double_value(&[0, 0]) - 2.0).abs() < 1e-12, "{}", z.double_value(&[0, 0]));
    }

    #[test]
    fn smoothing_averages_the_weights_of_each_draw() {
        // Two points, one draw that moves z onto the second: the weight goes there.
        let x = Tensor::from_slice(&[-1.0f64, 1.0]).reshape([2, 1]);
        let z = Tensor::from_slice(&[0.0f64]).reshape([1, 1]);
        let t = 0.5;
        let score = |xi: &[f64], sigma: f64| {
            let xi = Tensor::from_slice(xi).reshape([1, xi.len() as i64, 1]);
            smoothed_score(&z, &x, &xi, sigma, t).double_value(&[0, 0])
        };
        // Unsmoothed at z = 0: symmetric, the score is 0.
        assert!(score(&[0.0], 0.0).abs() < 1e-12);
        // σξ = +1: z + σξ is nearer t·x₂ = 0.5, so the score points up; −1 mirrors it.
        let up = score(&[1.0], 1.0);
        assert!(up > 0.0);
        assert!((score(&[-1.0], 1.0) + up).abs() < 1e-12);
        // Two draws ±1 average to the symmetric 0.
        assert!(score(&[1.0, -1.0], 1.0).abs() < 1e-12);
    }
}
