//! `sam.saf`: Sharpness-Aware training for Free (Du et al., NeurIPS 2022), an objective.
//!
//! Reference: AngusDujw/SAF `SAF_train.py`. For example i at epoch e (0-based):
//! L = ℓ_i + λ·τ²·KL(softmax(ẑ_i/τ) ‖ softmax(z_i/τ)), averaged over the batch, where ℓ_i is the
//! host's per-example loss, z_i the current logits and ẑ_i the logits stored for the same
//! example at epoch e − Ẽ. The KL is Σ_c p (log p − log q) with log q = log(softmax(z/τ)) as
//! the reference writes it; the gradient flows through z only.
//! - A ring buffer `[N, Ẽ+1, C]` (float32): every step first writes the current logits
//!   (detached) into slot e mod (Ẽ+1), then reads slot (e − Ẽ) mod (Ẽ+1); slots not yet
//!   written are zeros, i.e. uniform targets.
//! - The KL term is on for kl_start < e < kl_end (strict).
//! - With multi-pass step rules, only a step's first pass writes the buffer.
//!
//! Cost 1F+1B plus a gather/scatter of B×C floats. State: the buffer (checkpointed).

use serde::Deserialize;
use xlab_plugin_api::tch::{self, Device, Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, PluginError, Result, RunInfo, State,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct SafParams {
    /// λ: weight of the KL term (the reference's `reinforce`)
    #[param(default = 0.16, min = 0.0)]
    pub lambda: f64,
    /// temperature τ of both softmaxes
    #[param(default = 5.0, min = 1e-09)]
    pub tau: f64,
    /// Ẽ: compare with the logits of Ẽ epochs ago
    #[param(default = 3, min = 1.0)]
    pub minus_epoch: u64,
    /// the KL term is on for epochs e > kl_start (0-based)
    #[param(default = 5, min = 0.0)]
    pub kl_start: u64,
    /// … and e < kl_end
    #[param(default = 300, min = 0.0)]
    pub kl_end: u64,
}

pub struct Saf {
    p: SafParams,
    buffer: Option<Tensor>,
    epoch: u64,
}

/// The buffer slots an epoch writes and reads: (e mod (Ẽ+1), (e − Ẽ) mod (Ẽ+1)).
pub fn slots(epoch: u64, minus_epoch: u64) -> (i64, i64) {
    let k = minus_epoch as i64 + 1;
    let e = epoch as i64;
    (e.rem_euclid(k), (e - minus_epoch as i64).rem_euclid(k))
}

/// Per-example KL(softmax(ẑ/τ) ‖ softmax(z/τ)) = Σ_c p (log p − log q), as the reference
/// computes it (log of softmax, not log_softmax).
pub fn kl(z: &Tensor, z_ref: &Tensor, tau: f64) -> Tensor {
    let p = (z_ref / tau).softmax(-1, z.kind());
    let log_q = (z / tau).softmax(-1, z.kind()).log();
    (&p * (p.log() - log_q)).sum_dim_intlist(1, false, z.kind())
}

impl Component for Saf {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "sam.saf";
    const SUMMARY: &'static str =
        "SAF: sharpness-aware training for free, a KL to the model's own logits from Ẽ epochs ago";
    const REFERENCE: &'static str =
        "Du et al., Sharpness-Aware Training for Free, NeurIPS 2022; AngusDujw/SAF SAF_train.py";
    const STATEFUL: bool = true;
    type Params = SafParams;

    fn new(p: SafParams) -> Result<Self> {
        if !(p.tau > 0.0 && p.tau.is_finite() && p.lambda >= 0.0 && p.lambda.is_finite()) || p.minus_epoch == 0 {
            return Err(PluginError("tau must be > 0, lambda ≥ 0 and minus_epoch ≥ 1".into()));
        }
        Ok(Saf { p, buffer: None, epoch: 0 })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        if info.num_classes < 1 || info.n_train == 0 {
            return Err(PluginError("sam.saf needs a classification task with training examples".into()));
        }
        let slots = self.p.minus_epoch as i64 + 1;
        self.buffer = Some(Tensor::zeros([info.n_train as i64, slots, info.num_classes], (Kind::Float, Device::Cpu)));
        Ok(())
    }

    fn on_epoch(&mut self, epoch: u64) -> Result<()> {
        self.epoch = epoch;
        Ok(())
    }

    fn save_state(&self) -> Result<State> {
        let mut s = State { json: serde_json::json!({"epoch": self.epoch}), tensors: Default::default() };
        if let Some(b) = &self.buffer {
            s.tensors.insert("logits".into(), b.shallow_clone());
        }
        Ok(s)
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        if let Some(e) = state.json.get("epoch").and_then(|e| e.as_u64()) {
            self.epoch = e;
        }
        if let Some(b) = state.tensors.get("logits") {
            let want = self.buffer.as_ref().map(|t| t.size());
            if want.is_some_and(|w| w != b.size()) {
                return Err(PluginError(format!("sam.saf: saved logit buffer has shape {:?}", b.size())));
            }
            self.buffer = Some(b.to_kind(Kind::Float).to_device(Device::Cpu).copy());
        }
        Ok(())
    }
}

impl Objective for Saf {
    fn loss(&mut self, input: ObjectiveInput, ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        let z = input.logits.as_ref().ok_or_else(|| PluginError("sam.saf needs the batch's logits".into()))?;
        let buffer = self.buffer.as_mut().ok_or_else(|| PluginError("sam.saf: loss before setup".into()))?;
        let (write, read) = slots(self.epoch, self.p.minus_epoch);
        let idx = input.index.to_device(Device::Cpu);
        if input.first_pass {
            tch::no_grad(|| -> Result<()> {
                let rows = z.detach().to_kind(Kind::Float).to_device(Device::Cpu);
                let mut slot = buffer.select(1, write);
                let _ = slot.f_index_copy_(0, &idx, &rows)?;
                Ok(())
            })?;
        }
        let e = self.epoch;
        if !(self.p.kl_start < e && e < self.p.kl_end) || self.p.lambda == 0.0 {
            return Ok(input.losses.mean(input.losses.kind()));
        }
        let z_ref = buffer.select(1, read).index_select(0, &idx).to_device(z.device()).to_kind(z.kind());
        let term = kl(z, &z_ref, self.p.tau);
        if input.first_pass {
            ctx.log("saf.kl", f64::try_from(term.mean(Kind::Double).detach())?);
        }
        let scale = self.p.lambda * self.p.tau * self.p.tau;
        Ok((&input.losses + term.to_kind(input.losses.kind()) * scale).mean(input.losses.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_vector_of_methods_md() {
        // z = (1, 0), ẑ = (0, 0), τ = 5: KL = 0.0049916888, KL·τ² = 0.1247922205.
        let z = Tensor::from_slice(&[1.0f64, 0.0]).reshape([1, 2]);
        let r = Tensor::from_slice(&[0.0f64, 0.0]).reshape([1, 2]);
        let k = f64::try_from(kl(&z, &r, 5.0).sum(Kind::Double)).unwrap();
        assert!((k - 0.0049916888).abs() < 1e-10, "{k}");
        assert!((k * 25.0 - 0.1247922205).abs() < 1e-9);
    }

    #[test]
    fn ring_buffer_slots_of_methods_md() {
        assert_eq!(slots(6, 3), (2, 3));
        assert_eq!(slots(7, 3), (3, 0));
        assert_eq!(slots(8, 3), (0, 1));
        assert_eq!(slots(1, 3), (1, 2), "early epochs read slots not yet written");
    }
}
