//! `mixup.timm`: timm's `Mixup`, switching between mixup and CutMix, with label smoothing.
//!
//! Reference: huggingface/pytorch-image-models `timm/data/mixup.py` (`Mixup`, `mixup_target`,
//! `cutmix_bbox_and_lam`, `rand_bbox`).
//! - The partner of example i is B−1−i (the flipped batch), not a random permutation.
//! - `mode: batch`: with probability `prob` the batch is mixed; if both alphas are > 0, CutMix
//!   with probability `switch_prob`, else mixup; λ from the chosen alpha. mixup:
//!   x ← λx + (1−λ)flip(x). CutMix: one box for the batch (sides ⌊H√(1−λ)⌋ × ⌊W√(1−λ)⌋,
//!   centre uniform over the image, clipped), x[:, :, yl:yh, xl:xh] ← flip(x)[...], and with
//!   `correct_lam` λ = 1 − box area / (H·W).
//! - `mode: elem`: a λ and a choice per example, each mixed with an unmodified copy of its
//!   partner; `mode: pair`: i and B−1−i mixed with each other with the same λ. Per-example λ
//!   are float32, as in the reference.
//! - Targets: off = s/C, on = 1 − s + off; ỹ = λ·smooth(y) + (1−λ)·smooth(flip(y)).
//!
//! Deviation: timm refuses an odd batch; here the middle example of an odd batch is its own
//! partner (unchanged). Randomness only from the host's stream; stateless.

use crate::cutmix::image_shape;
use serde::Deserialize;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Batch, BatchTransform, Component, ComponentKind, HostRng, PluginError, Result, RunInfo, Transformed,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct TimmParams {
    /// mixup λ ~ Beta(α, α); 0 turns mixup off
    #[param(default = 1.0)]
    pub mixup_alpha: f64,
    /// CutMix λ ~ Beta(α, α); 0 turns CutMix off
    #[param(default = 0.0)]
    pub cutmix_alpha: f64,
    /// probability of mixing a batch (or example)
    #[param(default = 1.0, min = 0.0, max = 1.0)]
    pub prob: f64,
    /// with both alphas > 0: probability of CutMix rather than mixup
    #[param(default = 0.5, min = 0.0, max = 1.0)]
    pub switch_prob: f64,
    /// `batch`, `pair` or `elem`: how often λ is drawn
    #[param(default = "batch", choices = ["batch", "pair", "elem"])]
    pub mode: String,
    /// CutMix: λ from the clipped box's area
    #[param(default = true)]
    pub correct_lam: bool,
    /// label smoothing s, applied before mixing
    #[param(default = 0.1, min = 0.0, max = 1.0)]
    pub label_smoothing: f64,
}

pub struct Timm {
    p: TimmParams,
    image: Option<[i64; 3]>,
}

/// timm's `mixup_target`: λ·smooth(y) + (1−λ)·smooth(flip(y)); `lam` is a scalar `[1]` or per
/// example `[B, 1]`.
pub fn mixup_target(y: &Tensor, num_classes: i64, lam: &Tensor, smoothing: f64, kind: Kind) -> Tensor {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let smooth = |t: &Tensor| t.one_hot(num_classes).to_kind(kind) * (on - off) + off;
    let y1 = smooth(y);
    let y2 = smooth(&y.flip([0]));
    &y1 * lam + y2 * (lam.ones_like() - lam)
}

/// timm's `rand_bbox` + `cutmix_bbox_and_lam` for a given centre: ((yl, yh, xl, xh), λ).
pub fn cutmix_box(h: i64, w: i64, lam: f64, cy: i64, cx: i64, correct: bool) -> ((i64, i64, i64, i64), f64) {
    let ratio = (1.0 - lam).sqrt();
    let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let yl = (cy - cut_h / 2).clamp(0, h);
    let yh = (cy + cut_h / 2).clamp(0, h);
    let xl = (cx - cut_w / 2).clamp(0, w);
    let xh = (cx + cut_w / 2).clamp(0, w);
    let lam = if correct { 1.0 - ((yh - yl) * (xh - xl)) as f64 / (h * w) as f64 } else { lam };
    ((yl, yh, xl, xh), lam)
}

impl Timm {
    /// λ and whether to use CutMix, drawn as `_params_per_batch` does.
    fn draw(&self, rng: &mut HostRng<'_>) -> (f64, bool) {
        let (ma, ca) = (self.p.mixup_alpha, self.p.cutmix_alpha);
        if rng.uniform() >= self.p.prob {
            return (1.0, false);
        }
        if ma > 0.0 && ca > 0.0 {
            let cut = rng.uniform() < self.p.switch_prob;
            let a = if cut { ca } else { ma };
            (rng.beta(a, a), cut)
        } else if ma > 0.0 {
            (rng.beta(ma, ma), false)
        } else if ca > 0.0 {
            (rng.beta(ca, ca), true)
        } else {
            (1.0, false)
        }
    }

    fn centre(&self, rng: &mut HostRng<'_>, h: i64, w: i64) -> (i64, i64) {
        let cy = rng.below(h as u64) as i64;
        let cx = rng.below(w as u64) as i64;
        (cy, cx)
    }
}

impl Component for Timm {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "mixup.timm";
    const SUMMARY: &'static str =
        "timm's Mixup: mixup or CutMix per batch, pair or example, with the flipped batch and label smoothing";
    const REFERENCE: &'static str = "huggingface/pytorch-image-models timm/data/mixup.py (Mixup)";
    const RANDOM: bool = true;
    type Params = TimmParams;

    fn new(p: TimmParams) -> Result<Self> {
        if !["batch", "pair", "elem"].contains(&p.mode.as_str()) {
            return Err(PluginError(format!("mode is `batch`, `pair` or `elem`, got `{}`", p.mode)));
        }
        if !(p.mixup_alpha.is_finite() && p.cutmix_alpha.is_finite()) {
            return Err(PluginError("the alphas must be finite".into()));
        }
        Ok(Timm { p, image: None })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        self.image = info.image;
        if self.p.cutmix_alpha > 0.0 {
            image_shape(Self::ID, info.image)?;
        }
        Ok(())
    }
}

impl BatchTransform for Timm {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let b = batch.x.size()[0];
        let kind = batch.x.kind();
        let imgs = |x: &Tensor| -> Result<Tensor> {
            let [c, h, w] = image_shape(Self::ID, self.image)?;
            Ok(x.reshape([-1, c, h, w]))
        };
        let hw = || self.image.map(|[_, h, w]| (h, w)).unwrap_or((1, 1));
        let (x, lam) = if self.p.mode == "batch" {
            let (lam, cut) = self.draw(rng);
            if lam == 1.0 {
                (batch.x.shallow_clone(), Tensor::from_slice(&[1.0f64]).to_kind(kind))
            } else if cut {
                let (h, w) = hw();
                let (cy, cx) = self.centre(rng, h, w);
                let ((yl, yh, xl, xh), lam) = cutmix_box(h, w, lam, cy, cx, self.p.correct_lam);
                let im = imgs(&batch.x)?;
                let out = im.copy();
                if yh > yl && xh > xl {
                    let patch = im.flip([0]).narrow(2, yl, yh - yl).narrow(3, xl, xh - xl);
                    out.narrow(2, yl, yh - yl).narrow(3, xl, xh - xl).copy_(&patch);
                }
                (out.reshape(batch.x.size()), Tensor::from_slice(&[lam]).to_kind(kind))
            } else {
                (&batch.x * lam + batch.x.flip([0]) * (1.0 - lam), Tensor::from_slice(&[lam]).to_kind(kind))
            }
        } else {
            let pair = self.p.mode == "pair";
            let n = if pair { b / 2 } else { b };
            let draws: Vec<(f64, bool)> = (0..n)
                .map(|_| {
                    let (lam, cut) = self.draw(rng);
                    ((lam as f32) as f64, cut)
                })
                .collect();
            let orig = batch.x.copy();
            let out = batch.x.copy();
            // λ per example: the drawn one (1 where not mixed), CutMix's corrected to its box;
            // in pair mode the partner B−1−i takes example i's.
            let mut lams = vec![1.0f64; b as usize];
            for (i, &(lam, _)) in draws.iter().enumerate() {
                lams[i] = lam;
                if pair {
                    lams[(b - 1) as usize - i] = lam;
                }
            }
            for (i, &(lam, cut)) in draws.iter().enumerate() {
                let i = i as i64;
                let j = b - 1 - i;
                if lam == 1.0 {
                    continue;
                }
                if cut {
                    let (h, w) = hw();
                    let (cy, cx) = self.centre(rng, h, w);
                    let ((yl, yh, xl, xh), l) = cutmix_box(h, w, lam, cy, cx, self.p.correct_lam);
                    let (oi, oo) = (imgs(&out)?, imgs(&orig)?);
                    if yh > yl && xh > xl {
                        let region = |t: &Tensor, k: i64| t.get(k).narrow(1, yl, yh - yl).narrow(2, xl, xh - xl);
                        region(&oi, i).copy_(&region(&oo, j));
                        if pair {
                            region(&oi, j).copy_(&region(&oo, i));
                        }
                    }
                    lams[i as usize] = (l as f32) as f64;
                } else {
                    out.get(i).copy_(&(orig.get(i) * lam + orig.get(j) * (1.0 - lam)));
                    if pair {
                        out.get(j).copy_(&(orig.get(j) * lam + orig.get(i) * (1.0 - lam)));
                    }
                }
                if pair {
                    lams[j as usize] = lams[i as usize];
                }
            }
            (out, Tensor::from_slice(&lams).to_kind(kind).unsqueeze(1))
        };
        let target =
            mixup_target(&batch.y, batch.num_classes, &lam.to_device(x.device()), self.p.label_smoothing, kind);
        Ok(Transformed { x, target })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_vector_of_methods_md() {
        // C = 10, s = 0.1, λ = 0.7, y = 3 with partner 5: ỹ₃ = 0.64, ỹ₅ = 0.28, 0.01 elsewhere.
        let y = Tensor::from_slice(&[3i64, 5]);
        let t = mixup_target(&y, 10, &Tensor::from_slice(&[0.7f64]), 0.1, Kind::Double);
        let row: Vec<f64> = Vec::try_from(t.get(0)).unwrap();
        for (c, v) in row.iter().enumerate() {
            let want = match c {
                3 => 0.64,
                5 => 0.28,
                _ => 0.01,
            };
            assert!((v - want).abs() < 1e-12, "class {c}: {v}");
        }
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn box_is_clipped_and_lambda_corrected() {
        let ((yl, yh, xl, xh), lam) = cutmix_box(4, 4, 0.75, 0, 2, true);
        assert_eq!((yl, yh, xl, xh), (0, 1, 1, 3));
        assert_eq!(lam, 0.875);
        assert_eq!(cutmix_box(4, 4, 0.75, 0, 2, false).1, 0.75);
    }
}
