//! Normalized Attention Guidance (`diffusion.nag`), docs/methods.md §3.11.
//!
//! Inside every cross-attention layer of the denoiser, per query token, on the heads'
//! concatenated output before the output projection: Z⁺ attends over the positive condition's
//! tokens and Z⁻ over the negative one's, with the same queries. For s > 1,
//! Z̃ = s·Z⁺ − (s − 1)·Z⁻; with n⁺ = max(‖Z⁺‖, 1e-6), ñ = max(‖Z̃‖, 1e-6) (L1 over the features by
//! default, L2 as the first Flux release) and r = ñ/n⁺, Ẑ = Z̃·min(r, τ)/r, and the output is
//! α·Ẑ + (1 − α)·Z⁺. The guidance acts while t ≥ (1 − end)·(T − 1); elsewhere (and for s ≤ 1)
//! the output is Z⁺.
//!
//! The host calls it with the rows that ask for the condition only: with classifier-free
//! guidance the unconditional rows keep their plain attention (one forward pass, no image
//! stream of the negative's own).

use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{AttentionGuidance, Component, ComponentKind, Result};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct NagParams {
    /// s: extrapolation away from the negative condition's attention; 1 or less is off
    #[param(default = 5.0)]
    pub scale: f64,
    /// τ: cap on the ratio of the guided output's norm to Z⁺'s, per token
    #[param(default = 2.5, min = 0.0)]
    pub tau: f64,
    /// α: blend of the normalized guided output with Z⁺ (the SDXL pipeline uses 0.5)
    #[param(default = 0.25, min = 0.0, max = 1.0)]
    pub alpha: f64,
    /// the time window: guidance on while t ≥ (1 − end)·(T − 1); 1 is every step
    #[param(default = 1.0, min = 0.0, max = 1.0)]
    pub end: f64,
    /// the norm of the per-token ratio: l1 (the paper and later code) or l2 (the first Flux release)
    #[param(default = "l1", choices = ["l1", "l2"])]
    pub norm: String,
}

/// The guided attention output of Z⁺ and Z⁻ `[..., C]` (docs/methods.md §3.11), computed in the
/// inputs' type.
pub fn combine(p: &NagParams, pos: &Tensor, neg: &Tensor) -> Tensor {
    if p.scale <= 1.0 {
        return pos.shallow_clone();
    }
    let guided = pos * p.scale - neg * (p.scale - 1.0);
    let norm = |z: &Tensor| {
        let order = if p.norm == "l2" { 2.0 } else { 1.0 };
        z.norm_scalaropt_dim(order, [-1i64].as_slice(), true).clamp_min(1e-6)
    };
    let ratio = norm(&guided) / norm(pos);
    // In the reference's order: Z̃·min(r, τ), then / r.
    let normalized = guided * ratio.clamp_max(p.tau) / ratio;
    normalized * p.alpha + pos * (1.0 - p.alpha)
}

pub struct Nag {
    p: NagParams,
}

impl Component for Nag {
    const KIND: ComponentKind = ComponentKind::Attention;
    const ID: &'static str = "diffusion.nag";
    const SUMMARY: &'static str =
        "Normalized Attention Guidance: extrapolate each cross-attention output away from a negative condition's, normalized and blended";
    const REFERENCE: &'static str = "Chen et al., Normalized Attention Guidance, arXiv 2505.21179 (NeurIPS 2025); ChenDarYen/Normalized-Attention-Guidance, NAGAttnProcessor2_0";
    type Params = NagParams;

    fn new(p: NagParams) -> Result<Self> {
        Ok(Nag { p })
    }
}

impl AttentionGuidance for Nag {
    fn attend(&mut self, pos: Tensor, neg: Tensor, t: f64, t_max: f64) -> Result<Option<Tensor>> {
        if self.p.scale <= 1.0 || t < (1.0 - self.p.end) * t_max {
            return Ok(None);
        }
        if pos.size() != neg.size() {
            return Err(xlab_plugin_api::PluginError(format!(
                "the positive attention output is {:?} and the negative one {:?}; they must match",
                pos.size(),
                neg.size()
            )));
        }
        Ok(Some(combine(&self.p, &pos, &neg)))
    }
}
