//! `mixup.cutmix`: CutMix (Yun et al., ICCV 2019).
//!
//! Reference: clovaai/CutMix-PyTorch `train.py` (`rand_bbox`). With probability `prob` per
//! batch: λ ~ Beta(β, β), π a uniform permutation; a box with sides ⌊W·√(1−λ)⌋ × ⌊H·√(1−λ)⌋
//! centred at (cx, cy) ~ U{0..W−1} × U{0..H−1}, clipped to the image
//! (x1 = clip(cx − ⌊cut_w/2⌋, 0, W), x2 = clip(cx + ⌊cut_w/2⌋, 0, W), likewise y), is pasted
//! from the partner image: x[:, :, x1:x2, y1:y2] ← x[π, :, x1:x2, y1:y2]. λ is then corrected
//! to the pasted area, λ = 1 − (x2−x1)(y2−y1)/(W·H), and the targets are
//! λ·onehot(y) + (1−λ)·onehot(y[π]) (the reference's two-term loss as one soft-target loss).
//! The reference calls `size[2]` W: in NCHW that is the height axis, kept here.
//! Otherwise the batch is unchanged. Randomness only from the host's stream; stateless.

use serde::Deserialize;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Batch, BatchTransform, Component, ComponentKind, HostRng, PluginError, Result, RunInfo, Transformed,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct CutmixParams {
    /// λ ~ Beta(β, β); β ≤ 0 turns CutMix off
    #[param(default = 1.0, min = 0.0)]
    pub beta: f64,
    /// probability that a batch is cut and mixed
    #[param(default = 0.5, min = 0.0, max = 1.0)]
    pub prob: f64,
}

pub struct Cutmix {
    p: CutmixParams,
    image: Option<[i64; 3]>,
}

/// The reference's `rand_bbox` for a given λ and centre: (x1, y1, x2, y2) over axes of sizes
/// (w, h) = (size[2], size[3]).
pub fn rand_bbox(w: i64, h: i64, lam: f64, cx: i64, cy: i64) -> (i64, i64, i64, i64) {
    let cut_rat = (1.0 - lam).sqrt();
    let cut_w = (w as f64 * cut_rat) as i64;
    let cut_h = (h as f64 * cut_rat) as i64;
    let x1 = (cx - cut_w / 2).clamp(0, w);
    let y1 = (cy - cut_h / 2).clamp(0, h);
    let x2 = (cx + cut_w / 2).clamp(0, w);
    let y2 = (cy + cut_h / 2).clamp(0, h);
    (x1, y1, x2, y2)
}

/// Pastes the box from the partner images `x[perm]` into NCHW images `x`; returns the new
/// images (the input is not modified).
pub fn paste(x: &Tensor, partner: &Tensor, (x1, y1, x2, y2): (i64, i64, i64, i64)) -> Tensor {
    let out = x.copy();
    if x2 > x1 && y2 > y1 {
        let patch = partner.narrow(2, x1, x2 - x1).narrow(3, y1, y2 - y1);
        out.narrow(2, x1, x2 - x1).narrow(3, y1, y2 - y1).copy_(&patch);
    }
    out
}

/// λ·onehot(y) + (1−λ)·onehot(y[perm]).
pub fn mixed_targets(y: &Tensor, perm: &Tensor, lam: f64, num_classes: i64, kind: Kind) -> Tensor {
    let onehot = y.one_hot(num_classes).to_kind(kind);
    &onehot * lam + onehot.index_select(0, perm) * (1.0 - lam)
}

/// The (c, h, w) of image inputs, or a clear error.
pub fn image_shape(id: &str, image: Option<[i64; 3]>) -> Result<[i64; 3]> {
    image
        .ok_or_else(|| PluginError(format!("{id} mixes regions of images; use image data (`data: {{name: digits}}`, IDX or CIFAR files, or npz/csv with `image: [C, H, W]`)")))
}

impl Component for Cutmix {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "mixup.cutmix";
    const SUMMARY: &'static str = "CutMix: paste a random box from another image, labels mixed by the box's area";
    const REFERENCE: &'static str = "Yun et al., CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features, ICCV 2019; clovaai/CutMix-PyTorch train.py";
    const RANDOM: bool = true;
    type Params = CutmixParams;

    fn new(p: CutmixParams) -> Result<Self> {
        if !p.beta.is_finite() || !(0.0..=1.0).contains(&p.prob) {
            return Err(PluginError("beta must be finite and prob in [0, 1]".into()));
        }
        Ok(Cutmix { p, image: None })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        self.image = Some(image_shape(Self::ID, info.image)?);
        Ok(())
    }
}

impl BatchTransform for Cutmix {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let [c, h, w] = image_shape(Self::ID, self.image)?;
        let b = batch.x.size()[0];
        let r = rng.uniform();
        if !(self.p.beta > 0.0 && r < self.p.prob) {
            let target = batch.y.one_hot(batch.num_classes).to_kind(batch.x.kind());
            return Ok(Transformed { x: batch.x, target });
        }
        let lam = rng.beta(self.p.beta, self.p.beta);
        let perm = Tensor::from_slice(&rng.permutation(b as usize)).to_device(batch.x.device());
        // The reference's W is size[2] (height in NCHW) and H is size[3].
        let (big_w, big_h) = (h, w);
        let cx = rng.below(big_w as u64) as i64;
        let cy = rng.below(big_h as u64) as i64;
        let bbox = rand_bbox(big_w, big_h, lam, cx, cy);
        let imgs = batch.x.reshape([b, c, h, w]);
        let x = paste(&imgs, &imgs.index_select(0, &perm), bbox).reshape(batch.x.size());
        let (x1, y1, x2, y2) = bbox;
        let lam = 1.0 - ((x2 - x1) * (y2 - y1)) as f64 / (big_w * big_h) as f64;
        let target = mixed_targets(&batch.y, &perm, lam, batch.num_classes, batch.x.kind());
        Ok(Transformed { x, target })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_vectors_of_methods_md() {
        // 4×4, λ = 0.75: a 2×2 cut. Centre (1, 2): [0:2]×[1:3], λ stays 0.75.
        assert_eq!(rand_bbox(4, 4, 0.75, 1, 2), (0, 1, 2, 3));
        // Centre (0, 2): [0:1]×[1:3], area 2, corrected λ = 0.875.
        let (x1, y1, x2, y2) = rand_bbox(4, 4, 0.75, 0, 2);
        assert_eq!((x1, y1, x2, y2), (0, 1, 1, 3));
        assert_eq!(1.0 - ((x2 - x1) * (y2 - y1)) as f64 / 16.0, 0.875);
    }

    #[test]
    fn paste_copies_the_partners_patch() {
        let x = Tensor::arange(32, (Kind::Float, xlab_plugin_api::tch::Device::Cpu)).reshape([2, 1, 4, 4]);
        let partner = x.flip([0]);
        let out = paste(&x, &partner, (0, 1, 2, 3));
        let got: Vec<f32> = Vec::try_from(out.get(0).flatten(0, -1)).unwrap();
        let mut want: Vec<f32> = (0..16).map(|v| v as f32).collect();
        for (r, col) in [(0, 1), (0, 2), (1, 1), (1, 2)] {
            want[r * 4 + col] = (16 + r * 4 + col) as f32;
        }
        assert_eq!(got, want);
        assert!(x
            .get(0)
            .equal(&Tensor::arange(16, (Kind::Float, xlab_plugin_api::tch::Device::Cpu)).reshape([1, 4, 4])));
    }
}
