//! `mixup.mixup`: mixup (Zhang et al., ICLR 2018).
//!
//! Reference: facebookresearch/mixup-cifar10 `train.py` (`mixup_data`, `mixup_criterion`).
//! Per batch: λ ~ Beta(α, α) (λ = 1 when α ≤ 0), π a uniform permutation of the batch,
//! x̃ = λx + (1−λ)x[π]. The reference's loss λ·CE(f(x̃), y) + (1−λ)·CE(f(x̃), y[π]) equals the
//! soft-target cross-entropy with targets λ·onehot(y) + (1−λ)·onehot(y[π]), which is what this
//! transform returns (the host's soft-target loss); its logged accuracy, the target mass on the
//! predicted class, is the reference's λ·acc(y) + (1−λ)·acc(y[π]). Deviation: the two forms
//! agree exactly in real arithmetic and to float rounding in f32.
//!
//! Randomness comes only from the host's seeded stream; stateless.

use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Batch, BatchTransform, Component, ComponentKind, HostRng, PluginError, Result, Transformed};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct MixupParams {
    /// λ ~ Beta(α, α); α ≤ 0 turns mixing off (λ = 1)
    #[param(default = 1.0)]
    pub alpha: f64,
}

pub struct Mixup {
    alpha: f64,
}

/// Mixes a batch with a given λ and permutation: returns x̃ and the soft targets.
pub fn mix(x: &Tensor, y: &Tensor, lam: f64, perm: &[i64], num_classes: i64) -> (Tensor, Tensor) {
    let p = Tensor::from_slice(perm).to_device(x.device());
    let x_mix = x * lam + x.index_select(0, &p) * (1.0 - lam);
    let onehot = y.one_hot(num_classes).to_kind(x.kind());
    let target = &onehot * lam + onehot.index_select(0, &p) * (1.0 - lam);
    (x_mix, target)
}

impl Component for Mixup {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "mixup.mixup";
    const SUMMARY: &'static str = "mixup: train on convex combinations of pairs of examples and of their labels";
    const REFERENCE: &'static str =
        "Zhang et al., mixup: Beyond Empirical Risk Minimization, ICLR 2018; facebookresearch/mixup-cifar10 train.py";
    const RANDOM: bool = true;
    type Params = MixupParams;

    fn new(p: MixupParams) -> Result<Self> {
        if !p.alpha.is_finite() {
            return Err(PluginError(format!("alpha must be finite, got {}", p.alpha)));
        }
        Ok(Mixup { alpha: p.alpha })
    }
}

impl BatchTransform for Mixup {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let lam = if self.alpha > 0.0 { rng.beta(self.alpha, self.alpha) } else { 1.0 };
        let perm = rng.permutation(batch.x.size()[0] as usize);
        let (x, target) = mix(&batch.x, &batch.y, lam, &perm, batch.num_classes);
        Ok(Transformed { x, target })
    }
}
