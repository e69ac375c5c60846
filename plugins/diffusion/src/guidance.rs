//! Classifier-free guidance (`diffusion.cfg`) and Adaptive Guidance
//! (`diffusion.adaptive_guidance`), docs/methods.md §3.7.
//!
//! The host runs the class-conditional model with the sample's label (ε_c) and with the null
//! label (ε_u), batched as one pass of 2B rows, and calls the guidance at every evaluation.
//! - `diffusion.cfg`: diffusers' convention ε̃ = ε_u + s(ε_c − ε_u) with s = `guidance_scale`
//!   (the paper's w is s − 1); `use_original_formulation` gives ε_c + s(ε_c − ε_u). With
//!   `guidance_rescale` φ > 0: ε̃ ← φ·ε̃·std(ε_c)/std(ε̃) + (1−φ)ε̃, std over each sample's
//!   elements (unbiased, torch's default). 2 network passes per evaluation.
//! - `diffusion.adaptive_guidance` (Castillo et al. 2023; paper only): as `cfg`, and at each
//!   evaluation γ = cos(vec(ε_c), vec(ε_u)) over the **whole batch** flattened (as the ComfyUI
//!   port does). Once γ > `threshold`, every later evaluation of the run uses ε_c alone (one
//!   pass). The host counts the unconditional passes saved (`sample.uncond_skipped`).

use serde::Deserialize;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, Guidance, PluginError, Result, RunInfo};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct CfgParams {
    /// s in ε_u + s(ε_c − ε_u); 1 is no guidance
    #[param(default = 7.5)]
    pub guidance_scale: f64,
    /// φ: blend toward the rescaled prediction (0 = off)
    #[param(default = 0.0, min = 0.0, max = 1.0)]
    pub guidance_rescale: f64,
    /// ε_c + s(ε_c − ε_u) instead
    #[param(default = false)]
    pub use_original_formulation: bool,
}

/// The guided prediction of one evaluation.
pub fn combine(p: &CfgParams, cond: &Tensor, uncond: &Tensor) -> Tensor {
    let base = if p.use_original_formulation { cond } else { uncond };
    let guided = base + (cond - uncond) * p.guidance_scale;
    if p.guidance_rescale <= 0.0 {
        return guided;
    }
    let b = cond.size()[0];
    let std = |t: &Tensor| t.reshape([b, -1]).std_dim([1i64].as_slice(), true, true);
    let shape: Vec<i64> = std::iter::once(b).chain(std::iter::repeat_n(1, cond.dim() - 1)).collect();
    let rescaled = &guided * (std(cond) / std(&guided)).reshape(shape.as_slice());
    rescaled * p.guidance_rescale + guided * (1.0 - p.guidance_rescale)
}

pub struct Cfg {
    p: CfgParams,
}

impl Component for Cfg {
    const KIND: ComponentKind = ComponentKind::Guidance;
    const ID: &'static str = "diffusion.cfg";
    const SUMMARY: &'static str = "classifier-free guidance: ε_u + s(ε_c − ε_u), optionally rescaled";
    const REFERENCE: &'static str = "Ho & Salimans, Classifier-Free Diffusion Guidance, 2022; diffusers guiders/classifier_free_guidance.py; Lin et al. 2024 (rescale)";
    type Params = CfgParams;

    fn new(p: CfgParams) -> Result<Self> {
        Ok(Cfg { p })
    }
}

impl Guidance for Cfg {
    fn guide(&mut self, cond: Tensor, uncond: Option<Tensor>) -> Result<(Tensor, bool)> {
        let uncond = uncond.ok_or_else(|| PluginError("classifier-free guidance needs ε_u at every step".into()))?;
        Ok((combine(&self.p, &cond, &uncond), true))
    }
}

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveParams {
    /// s in ε_u + s(ε_c − ε_u); 1 is no guidance
    #[param(default = 7.5)]
    pub guidance_scale: f64,
    /// φ: blend toward the rescaled prediction (0 = off)
    #[param(default = 0.0, min = 0.0, max = 1.0)]
    pub guidance_rescale: f64,
    /// ε_c + s(ε_c − ε_u) instead
    #[param(default = false)]
    pub use_original_formulation: bool,
    /// γ̄: switch guidance off once cos(ε_c, ε_u) > γ̄
    #[param(default = 0.99, min = -1.0, max = 1.0)]
    pub threshold: f64,
}

pub struct Adaptive {
    p: CfgParams,
    threshold: f64,
    /// Guidance switched off for the rest of this sampling run.
    off: bool,
}

/// cos(vec(a), vec(b)) over every element.
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_kind(Kind::Double).reshape([-1]), b.to_kind(Kind::Double).reshape([-1]));
    let dot = f64::try_from(a.dot(&b))?;
    let norms = f64::try_from(a.norm())? * f64::try_from(b.norm())?;
    Ok(if norms > 0.0 { dot / norms } else { 1.0 })
}

impl Component for Adaptive {
    const KIND: ComponentKind = ComponentKind::Guidance;
    const ID: &'static str = "diffusion.adaptive_guidance";
    const SUMMARY: &'static str = "classifier-free guidance until cos(ε_c, ε_u) exceeds a threshold, then ε_c alone";
    const REFERENCE: &'static str = "Castillo et al., Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models, arXiv 2312.12487";
    const STATEFUL: bool = false;
    type Params = AdaptiveParams;

    fn new(p: AdaptiveParams) -> Result<Self> {
        let cfg = CfgParams {
            guidance_scale: p.guidance_scale,
            guidance_rescale: p.guidance_rescale,
            use_original_formulation: p.use_original_formulation,
        };
        Ok(Adaptive { p: cfg, threshold: p.threshold, off: false })
    }

    /// A new sampling run starts guided.
    fn setup(&mut self, _info: &RunInfo) -> Result<()> {
        self.off = false;
        Ok(())
    }
}

impl Guidance for Adaptive {
    fn guide(&mut self, cond: Tensor, uncond: Option<Tensor>) -> Result<(Tensor, bool)> {
        match uncond {
            Some(u) if !self.off => {
                let out = combine(&self.p, &cond, &u);
                self.off = cosine(&cond, &u)? > self.threshold;
                Ok((out, !self.off))
            }
            _ => {
                self.off = true;
                Ok((cond, false))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).reshape([1, -1])
    }

    #[test]
    fn the_three_conventions() {
        let (c, u) = (t(&[1.0, 2.0]), t(&[0.5, 1.0]));
        let p = CfgParams { guidance_scale: 3.0, guidance_rescale: 0.0, use_original_formulation: false };
        assert_eq!(Vec::<f64>::try_from(combine(&p, &c, &u).reshape([-1])).unwrap(), vec![2.0, 4.0]);
        let p = CfgParams { use_original_formulation: true, ..p };
        assert_eq!(Vec::<f64>::try_from(combine(&p, &c, &u).reshape([-1])).unwrap(), vec![2.5, 5.0]);
        // Scale 1 is the conditional prediction.
        let p = CfgParams { guidance_scale: 1.0, guidance_rescale: 0.0, use_original_formulation: false };
        assert_eq!(Vec::<f64>::try_from(combine(&p, &c, &u).reshape([-1])).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn full_rescale_matches_the_conditional_std() {
        let (c, u) = (t(&[1.0, -1.0, 2.0, 0.0]), t(&[0.0, 0.5, 0.5, 1.0]));
        let p = CfgParams { guidance_scale: 5.0, guidance_rescale: 1.0, use_original_formulation: false };
        let out = combine(&p, &c, &u);
        let std = |x: &Tensor| f64::try_from(x.std(true)).unwrap();
        assert!((std(&out) - std(&c)).abs() < 1e-12);
        // Half-way: the mean of the rescaled and plain predictions.
        let plain = combine(&CfgParams { guidance_rescale: 0.0, ..p }, &c, &u);
        let half = combine(&CfgParams { guidance_rescale: 0.5, ..p }, &c, &u);
        assert!(half.allclose(&((&out + &plain) / 2.0), 1e-12, 1e-12, false));
    }

    /// docs/methods.md §3.7: ε_c = (1, 0), ε_u = (1, 0.1): cos = 0.9950372; with γ̄ = 0.99 guidance
    /// is off from the next step on.
    #[test]
    fn adaptive_guidance_methods_vector() {
        let (c, u) = (t(&[1.0, 0.0]), t(&[1.0, 0.1]));
        assert!((cosine(&c, &u).unwrap() - 0.9950372).abs() < 1e-7);
        let mut g = Adaptive::new(AdaptiveParams {
            guidance_scale: 2.0,
            guidance_rescale: 0.0,
            use_original_formulation: false,
            threshold: 0.99,
        })
        .unwrap();
        let (out, next) = g.guide(c.shallow_clone(), Some(u.shallow_clone())).unwrap();
        assert!(!next, "switched off after this step");
        assert_eq!(Vec::<f64>::try_from(out.reshape([-1])).unwrap(), vec![1.0, -0.1]);
        let (out, next) = g.guide(c.shallow_clone(), None).unwrap();
        assert!(!next);
        assert_eq!(Vec::<f64>::try_from(out.reshape([-1])).unwrap(), vec![1.0, 0.0]);
        // A new run starts guided again; below the threshold guidance stays on.
        g.setup(
            &serde_json::from_value(
                serde_json::json!({"num_classes": 2, "n_train": 1, "epochs": 0, "steps_per_epoch": 0, "seed": 0}),
            )
            .unwrap(),
        )
        .unwrap();
        let (_, next) = g.guide(c, Some(t(&[0.0, 1.0]))).unwrap();
        assert!(next);
    }
}
