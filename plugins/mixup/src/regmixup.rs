//! `mixup.regmixup`: RegMixup (Pinto et al., NeurIPS 2022), the reference form.
//!
//! Reference: FrancescoPinto/RegMixup `models/regmixup.py`. λ ~ Beta(α, α), π a uniform
//! permutation, x̃ = λx + (1−λ)x[π]; one forward pass on the concatenation [x; x̃] (2B rows,
//! so normalization layers see both halves) with soft targets [onehot(y); λ·onehot(y) +
//! (1−λ)·onehot(y[π])]. The host's mean over the 2B rows is the reference loss
//! ½[CE(clean) + mixup CE]; the paper's CE + η·mixup CE with η = 1 is twice that (the same
//! direction, a doubled step size for SGD). Randomness only from the host's stream; stateless.

use crate::mixup::mix;
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Batch, BatchTransform, Component, ComponentKind, HostRng, PluginError, Result, Transformed};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct RegMixupParams {
    /// λ ~ Beta(α, α) (reference: 20 on CIFAR-10, 10 on CIFAR-100)
    #[param(default = 20.0, min = 1e-09)]
    pub alpha: f64,
}

pub struct RegMixup {
    alpha: f64,
}

/// The reference's batch: `[x; x̃]` and `[onehot(y); mixed targets]`.
pub fn regmix(x: &Tensor, y: &Tensor, lam: f64, perm: &[i64], num_classes: i64) -> (Tensor, Tensor) {
    let (x_mix, t_mix) = mix(x, y, lam, perm, num_classes);
    let clean = y.one_hot(num_classes).to_kind(x.kind());
    (Tensor::cat(&[x.shallow_clone(), x_mix], 0), Tensor::cat(&[clean, t_mix], 0))
}

impl Component for RegMixup {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "mixup.regmixup";
    const SUMMARY: &'static str = "RegMixup: train on the clean batch and its mixup together, mixup as a regularizer";
    const REFERENCE: &'static str = "Pinto et al., Using Mixup as a Regularizer Can Surprisingly Improve Accuracy and Out-of-Distribution Robustness, NeurIPS 2022; FrancescoPinto/RegMixup";
    const RANDOM: bool = true;
    type Params = RegMixupParams;

    fn new(p: RegMixupParams) -> Result<Self> {
        if !(p.alpha > 0.0 && p.alpha.is_finite()) {
            return Err(PluginError(format!("alpha must be a finite number > 0, got {}", p.alpha)));
        }
        Ok(RegMixup { alpha: p.alpha })
    }
}

impl BatchTransform for RegMixup {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let lam = rng.beta(self.alpha, self.alpha);
        let perm = rng.permutation(batch.x.size()[0] as usize);
        let (x, target) = regmix(&batch.x, &batch.y, lam, &perm, batch.num_classes);
        Ok(Transformed { x, target })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlab_plugin_api::tch::{Device, Kind};

    #[test]
    fn reference_loss_vector_of_methods_md() {
        // Clean logits = x = I₂, y = (0, 1), λ = 0.7, π = (1, 0): clean CE 0.3132616875, mixup CE
        // 0.6330152524, reference loss 0.4731384700.
        let x = Tensor::eye(2, (Kind::Double, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1]);
        let (xs, t) = regmix(&x, &y, 0.7, &[1, 0], 2);
        assert_eq!(xs.size(), vec![4, 2]);
        // The identity model: logits = inputs.
        let loss = -(&t * xs.log_softmax(-1, Kind::Double)).sum_dim_intlist(1, false, Kind::Double);
        let loss = f64::try_from(loss.mean(Kind::Double)).unwrap();
        assert!((loss - 0.4731384700).abs() < 1e-9, "{loss}");
    }
}
