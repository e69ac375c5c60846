//! A template xlab plugin with one component, `focal.focal`: the focal loss as an objective.
//!
//! Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017):
//! `FL = (1 − p_t)^γ · CE`, where `p_t = exp(−CE)` is the probability of the true class, so it
//! can be computed from the per-example cross-entropies the host hands an objective. γ = 0 is
//! plain cross-entropy. Stateless.

use serde::Deserialize;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::{Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, Params, PluginError, Result};

/// The parameters, each declared once: its doc comment is what `xlab plugins describe` shows,
/// `#[param(...)]` its default and range. Unknown parameters in an experiment file are refused.
#[derive(Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct FocalParams {
    /// focusing parameter γ; 0 is cross-entropy
    #[param(default = 2.0, min = 0.0)]
    pub gamma: f64,
}

pub struct Focal {
    gamma: f64,
}

impl Component for Focal {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "focal.focal";
    const SUMMARY: &'static str = "focal loss: down-weights well-classified examples by (1 - p_t)^gamma";
    const REFERENCE: &'static str = "Lin et al., Focal Loss for Dense Object Detection, ICCV 2017";
    type Params = FocalParams;

    fn new(p: FocalParams) -> Result<Self> {
        if p.gamma < 0.0 || !p.gamma.is_finite() {
            return Err(PluginError(format!("gamma must be a finite number ≥ 0, got {}", p.gamma)));
        }
        Ok(Focal { gamma: p.gamma })
    }
}

impl Objective for Focal {
    fn loss(&mut self, input: ObjectiveInput, ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        let ce = &input.losses;
        let p_t = (-ce).exp();
        let weight = (-p_t + 1.0).pow_tensor_scalar(self.gamma);
        let loss = (weight * ce).mean(Kind::Float);
        if input.first_pass {
            ctx.log("focal.mean_ce", f64::try_from(ce.mean(Kind::Double))?);
        }
        Ok(loss)
    }
}

xlab_plugin_api::export_plugin! {
    id: "focal",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [],
    batch_transforms: [],
    objectives: [Focal],
    samplers: [],
}
