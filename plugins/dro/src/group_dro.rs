//! `dro.group_dro`: Group DRO with the online exponentiated-gradient group weights
//! (Sagawa et al., ICLR 2020).
//!
//! Reference: kohpangwei/group_DRO `loss.py` (`LossComputer`). Per batch, with per-example
//! losses ℓ and G groups:
//! 1. L_g = Σ_{i∈g} ℓ_i / max(n_g, 1); absent groups get 0.
//! 2. EMA of group losses: prev = (1 − γ·[n_g>0])·init_g, ema ← prev·ema + (1−prev)·L_g,
//!    init_g ← init_g ∨ [n_g>0] (the first observation sets it; absent groups keep theirs).
//! 3. Robust (default): L̂ = L; if every adjustment C_g > 0, L̂ += C_g/√N_g **in place**, so L
//!    carries the adjustment too (the reference's aliasing, kept); if `normalize_loss`,
//!    L̂ ← L̂/ΣL̂ (a new tensor). q ← q ⊙ exp(η·L̂), q ← q/Σq (q₀ = 1/G). Loss = Σ_g L_g q_g
//!    with the updated q.
//! 4. `btl`: groups sorted by ema_g + C_g/√N_g, descending (the adjustment only ranks; L stays
//!    unadjusted); mask = cumsum(frac) ≤ α;
//!    w = mask·frac/α, the next group gets 1 − Σw; w ← frac·mvw + w(1 − mvw); loss = Σ w·L_sorted.
//!
//! xlab convention for multi-pass step rules (SAM): the state (q, EMA) updates on the first
//! pass of a step only; later passes of the same step use the updated q. The reference has no
//! multi-pass case. State: q, ema, init flags, all checkpointed.

use serde::{Deserialize, Serialize};
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, PluginError, Result, RunInfo, State,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct GroupDroParams {
    /// η of the exponentiated-gradient update of q
    #[param(default = 0.01, min = 0.0)]
    pub step_size: f64,
    /// EMA factor of the per-group losses
    #[param(default = 0.1, min = 0.0, max = 1.0)]
    pub gamma: f64,
    /// generalization adjustment C (adds C/√N_g)
    #[param(default = 0.0, min = 0.0)]
    pub adjustment: f64,
    /// divide the adjusted group losses by their sum before updating q
    #[param(default = false)]
    pub normalize_loss: bool,
    /// use the top-α-fraction (btl) weighting instead of q
    #[param(default = false)]
    pub btl: bool,
    /// fraction of the training set the btl weighting covers
    #[param(default = 0.2, min = 0.0, max = 1.0)]
    pub alpha: f64,
    /// btl: weight of the group fractions mixed in
    #[param(default = 0.0, min = 0.0, max = 1.0)]
    pub min_var_weight: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct DroState {
    q: Vec<f64>,
    ema: Vec<f64>,
    init: Vec<bool>,
}

pub struct GroupDro {
    p: GroupDroParams,
    counts: Vec<f64>,
    state: DroState,
}

impl GroupDro {
    /// Creates the loss computer for `counts` training examples per group (tests use this).
    pub fn with_counts(p: GroupDroParams, counts: Vec<u64>) -> Self {
        let g = counts.len();
        GroupDro {
            p,
            counts: counts.into_iter().map(|c| c as f64).collect(),
            state: DroState { q: vec![1.0 / g as f64; g], ema: vec![0.0; g], init: vec![false; g] },
        }
    }

    pub fn q(&self) -> &[f64] {
        &self.state.q
    }

    fn adjustments(&self) -> Vec<f64> {
        self.counts.iter().map(|n| self.p.adjustment / n.max(1.0).sqrt()).collect()
    }

    /// The training loss from per-example losses and group ids; updates state when `update`.
    pub fn compute(&mut self, losses: &Tensor, group: &Tensor, update: bool) -> Result<Tensor> {
        let g = self.counts.len() as i64;
        let kind = losses.kind();
        let map = group.one_hot(g).to_kind(kind).transpose(0, 1); // [G, B]
        let n = map.sum_dim_intlist(1, false, kind);
        let group_loss = map.matmul(losses) / n.clamp_min(1.0); // [G]
        let present: Vec<bool> = Vec::<f64>::try_from(&n)?.into_iter().map(|c| c > 0.0).collect();
        let l_now: Vec<f64> = Vec::<f64>::try_from(group_loss.detach().to_kind(Kind::Double))?;
        let adj = self.adjustments();
        let adj_active = self.p.adjustment > 0.0;
        if update {
            let s = &mut self.state;
            for k in 0..g as usize {
                let prev = (1.0 - self.p.gamma * f64::from(u8::from(present[k]))) * f64::from(u8::from(s.init[k]));
                s.ema[k] = prev * s.ema[k] + (1.0 - prev) * l_now[k];
                s.init[k] |= present[k];
            }
        }
        if self.p.btl {
            // btl uses the adjustment only to rank the groups; the loss is unadjusted.
            return self.btl_loss(&group_loss, &adj);
        }
        // The reference's in-place add: L itself carries the adjustment when it is active.
        let adj_t = Tensor::from_slice(&adj).to_kind(kind).to_device(losses.device());
        let group_loss = if adj_active { group_loss + adj_t } else { group_loss };
        if update {
            let mut adjusted: Vec<f64> = Vec::<f64>::try_from(group_loss.detach().to_kind(Kind::Double))?;
            if self.p.normalize_loss {
                let sum: f64 = adjusted.iter().sum();
                adjusted.iter_mut().for_each(|v| *v /= sum);
            }
            let q = &mut self.state.q;
            for (qk, lk) in q.iter_mut().zip(&adjusted) {
                *qk *= (self.p.step_size * lk).exp();
            }
            let total: f64 = q.iter().sum();
            q.iter_mut().for_each(|v| *v /= total);
        }
        let q = Tensor::from_slice(&self.state.q).to_kind(kind).to_device(losses.device());
        Ok((group_loss * q).sum(kind))
    }

    fn btl_loss(&self, group_loss: &Tensor, adj: &[f64]) -> Result<Tensor> {
        let total: f64 = self.counts.iter().sum();
        let frac: Vec<f64> = self.counts.iter().map(|c| c / total).collect();
        let mut order: Vec<usize> = (0..frac.len()).collect();
        let key: Vec<f64> = self.state.ema.iter().zip(adj).map(|(e, a)| e + a).collect();
        order.sort_by(|&a, &b| key[b].total_cmp(&key[a]));
        let mut w = vec![0.0; frac.len()];
        let mut cum = 0.0;
        let mut filled = 0;
        for (pos, &k) in order.iter().enumerate() {
            cum += frac[k];
            if cum <= self.p.alpha {
                w[pos] = frac[k] / self.p.alpha;
                filled = pos + 1;
            } else {
                break;
            }
        }
        if filled < w.len() {
            w[filled] = 1.0 - w.iter().sum::<f64>();
        }
        let mvw = self.p.min_var_weight;
        let sorted_frac: Vec<f64> = order.iter().map(|&k| frac[k]).collect();
        let w: Vec<f64> = w.iter().zip(&sorted_frac).map(|(wi, fi)| fi * mvw + wi * (1.0 - mvw)).collect();
        let idx =
            Tensor::from_slice(&order.iter().map(|&k| k as i64).collect::<Vec<_>>()).to_device(group_loss.device());
        let sorted = group_loss.index_select(0, &idx);
        let wt = Tensor::from_slice(&w).to_kind(group_loss.kind()).to_device(group_loss.device());
        Ok((sorted * wt).sum(group_loss.kind()))
    }
}

pub fn defaults() -> GroupDroParams {
    GroupDroParams {
        step_size: 0.01,
        gamma: 0.1,
        adjustment: 0.0,
        normalize_loss: false,
        btl: false,
        alpha: 0.2,
        min_var_weight: 0.0,
    }
}

impl Component for GroupDro {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "dro.group_dro";
    const SUMMARY: &'static str =
        "Group DRO: minimize the worst group's loss with online exponentiated-gradient group weights";
    const REFERENCE: &'static str =
        "Sagawa et al., Distributionally Robust Neural Networks for Group Shifts, ICLR 2020; kohpangwei/group_DRO loss.py";
    const STATEFUL: bool = true;
    type Params = GroupDroParams;

    fn new(p: GroupDroParams) -> Result<Self> {
        if p.btl && p.alpha <= 0.0 {
            return Err(PluginError("btl needs alpha > 0".into()));
        }
        Ok(GroupDro { p, counts: vec![], state: DroState { q: vec![], ema: vec![], init: vec![] } })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        if info.group_counts.is_empty() {
            return Err(PluginError(
                "dro.group_dro needs data with group labels (e.g. `data: {name: spurious}`)".into(),
            ));
        }
        let p = std::mem::replace(&mut self.p, defaults());
        *self = GroupDro::with_counts(p, info.group_counts.clone());
        Ok(())
    }

    fn save_state(&self) -> Result<State> {
        Ok(State { json: serde_json::to_value(&self.state)?, tensors: Default::default() })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        let s: DroState = serde_json::from_value(state.json)?;
        if s.q.len() != self.counts.len() {
            return Err(PluginError(format!(
                "saved state has {} groups, the data has {}",
                s.q.len(),
                self.counts.len()
            )));
        }
        self.state = s;
        Ok(())
    }
}

impl Objective for GroupDro {
    fn loss(&mut self, input: ObjectiveInput, ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        let group =
            input.group.as_ref().ok_or_else(|| PluginError("dro.group_dro needs group ids in every batch".into()))?;
        let loss = self.compute(&input.losses, group, input.first_pass)?;
        if input.first_pass {
            for (k, q) in self.state.q.iter().enumerate() {
                ctx.log(&format!("dro.q.{k}"), *q);
            }
            for (k, e) in self.state.ema.iter().enumerate() {
                ctx.log(&format!("dro.ema_loss.{k}"), *e);
            }
        }
        Ok(loss)
    }
}
