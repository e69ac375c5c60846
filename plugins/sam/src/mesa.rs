//! `sam.mesa`: Memory-Efficient Sharpness-Aware training (Du et al., NeurIPS 2022), an
//! objective.
//!
//! Reference: AngusDujw/SAF `MESA_train.py` (timm's `ModelEmaV2`). The reference logits ẑ come
//! from an exponential moving average of the model: θ_ema ← d·θ_ema + (1−d)·θ over the whole
//! state (parameters and BatchNorm buffers) after every optimizer step, θ_ema starting from the
//! initial model. ẑ is the EMA model's output on the same (augmented) input in evaluation mode
//! (BatchNorm with the EMA's running statistics), without gradient. The loss is
//! L = ℓ_i + λ·τ²·KL(softmax(ẑ_i/τ) ‖ softmax(z_i/τ)), averaged, for kl_start < e < kl_end; the
//! KL is as SAF's.
//!
//! The EMA update after step k is applied when step k+1's first pass asks for the loss, before
//! the teacher's forward pass, which is the same sequence. With multi-pass step rules only the
//! first pass updates the EMA. Cost 2F+1B. State: the EMA (checkpointed).

use crate::saf::kl;
use serde::Deserialize;
use xlab_plugin_api::tch::{self, Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, PluginError, Result, State};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct MesaParams {
    /// EMA decay d of the teacher
    #[param(default = 0.9998, min = 0.0, max = 1.0)]
    pub decay: f64,
    /// λ: weight of the KL term
    #[param(default = 0.3, min = 0.0)]
    pub lambda: f64,
    /// temperature τ of both softmaxes
    #[param(default = 5.0, min = 1e-09)]
    pub tau: f64,
    /// the KL term is on for epochs e > kl_start (0-based)
    #[param(default = 5, min = 0.0)]
    pub kl_start: u64,
    /// … and e < kl_end
    #[param(default = 360, min = 0.0)]
    pub kl_end: u64,
}

pub struct Mesa {
    p: MesaParams,
    /// The EMA of every model variable, by name, in the host's order.
    ema: Vec<(String, Tensor)>,
    epoch: u64,
}

impl Component for Mesa {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "sam.mesa";
    const SUMMARY: &'static str = "MESA: a KL to an exponential-moving-average teacher of the model";
    const REFERENCE: &'static str =
        "Du et al., Sharpness-Aware Training for Free, NeurIPS 2022; AngusDujw/SAF MESA_train.py";
    const STATEFUL: bool = true;
    type Params = MesaParams;

    fn new(p: MesaParams) -> Result<Self> {
        let valid = (0.0..=1.0).contains(&p.decay) && p.tau > 0.0 && p.tau.is_finite() && p.lambda >= 0.0;
        if !valid {
            return Err(PluginError("decay must be in [0, 1], tau > 0 and lambda ≥ 0".into()));
        }
        Ok(Mesa { p, ema: vec![], epoch: 0 })
    }

    fn on_epoch(&mut self, epoch: u64) -> Result<()> {
        self.epoch = epoch;
        Ok(())
    }

    fn save_state(&self) -> Result<State> {
        let names: Vec<&str> = self.ema.iter().map(|(n, _)| n.as_str()).collect();
        Ok(State {
            json: serde_json::json!({"epoch": self.epoch, "variables": names}),
            tensors: self.ema.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
        })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        if let Some(e) = state.json.get("epoch").and_then(|e| e.as_u64()) {
            self.epoch = e;
        }
        let names: Vec<String> = match state.json.get("variables") {
            Some(v) => serde_json::from_value(v.clone())?,
            None => vec![],
        };
        let mut tensors = state.tensors;
        self.ema = names
            .into_iter()
            .map(|n| {
                let t = tensors.remove(&n).ok_or_else(|| PluginError(format!("sam.mesa: no saved EMA of `{n}`")))?;
                Ok((n, t.copy()))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}

impl Objective for Mesa {
    fn loss(&mut self, input: ObjectiveInput, ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        let z = input.logits.as_ref().ok_or_else(|| PluginError("sam.mesa needs the batch's logits".into()))?;
        if input.first_pass {
            let model = ctx.model_state()?;
            if model.is_empty() {
                return Err(PluginError("sam.mesa needs a host that shares its model's state".into()));
            }
            tch::no_grad(|| -> Result<()> {
                if self.ema.is_empty() {
                    self.ema = model.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
                    return Ok(());
                }
                if self.ema.len() != model.len() || self.ema.iter().zip(&model).any(|(a, b)| a.0 != b.0) {
                    return Err(PluginError("sam.mesa: the model's variables changed".into()));
                }
                let d = self.p.decay;
                for ((_, e), (_, m)) in self.ema.iter_mut().zip(&model) {
                    // timm ModelEmaV2: ema = ema·d + (1 − d)·model.
                    let next = &*e * d + m.detach() * (1.0 - d);
                    e.f_copy_(&next)?;
                }
                Ok(())
            })?;
        }
        let e = self.epoch;
        if !(self.p.kl_start < e && e < self.p.kl_end) || self.p.lambda == 0.0 || self.ema.is_empty() {
            return Ok(input.losses.mean(input.losses.kind()));
        }
        let teacher: Vec<Tensor> = self.ema.iter().map(|(_, t)| t.shallow_clone()).collect();
        let z_ref = ctx.forward_with(&teacher)?.to_kind(z.kind());
        let term = kl(z, &z_ref, self.p.tau);
        if input.first_pass {
            ctx.log("mesa.kl", f64::try_from(term.mean(Kind::Double).detach())?);
        }
        let scale = self.p.lambda * self.p.tau * self.p.tau;
        Ok((&input.losses + term.to_kind(input.losses.kind()) * scale).mean(input.losses.kind()))
    }
}
