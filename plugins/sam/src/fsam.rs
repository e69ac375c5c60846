//! `sam.fsam`: Fisher-mask SAM (Zhong et al., Findings of EMNLP 2022).
//!
//! Reference: WHU-ZQH/FSAM4PLM `fairseq-FSAM/optim/samsgd.py` (`SAM_Mask`, `set_fisher_mask`).
//! - Maskable parameters: all except biases, embeddings and normalization parameters (names
//!   containing "bias" or "embed", or tagged so by the host).
//! - Every `mask_iter` steps (when the global step is a multiple of it), the mask is recomputed
//!   from the empirical Fisher F = g² of the step's first-pass gradient: over all maskable
//!   entries, the top ⌊N·keep_ratio⌋ by value are kept (1), the rest masked (0).
//! - e_p = ρ g_p/(‖g‖ + 1e-7) ⊙ mask_p, with ‖g‖ over **all** parameters, unmasked; parameters
//!   outside the maskable set are perturbed unmasked.
//! - Second pass with running statistics frozen, then p ← p − e and the base optimizer step.
//!
//! Cost 2F+2B plus a top-k over N entries every `mask_iter` steps. State: the mask.

use crate::common::{add_to_weights, global_norm, grads, tensors};
use serde::Deserialize;
use std::collections::BTreeMap;
use xlab_plugin_api::abi::tags;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, Param, PluginError, Result, State, StepCtx, StepRule};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct FsamParams {
    /// neighbourhood radius ρ
    #[param(default = 0.05, min = 0.0)]
    pub rho: f64,
    /// fraction of maskable entries perturbed (0.1: 90% sparse)
    #[param(default = 0.1, min = 0.0, max = 1.0)]
    pub keep_ratio: f64,
    /// recompute the mask every this many steps
    #[param(default = 100, min = 1.0)]
    pub mask_iter: u64,
}

pub struct Fsam {
    p: FsamParams,
    /// Per maskable parameter name, its 0/1 mask.
    mask: BTreeMap<String, Tensor>,
}

/// Whether the Fisher mask applies to a parameter.
pub fn maskable(p: &Param) -> bool {
    !(p.name.contains("bias")
        || p.name.contains("embed")
        || p.has_tag(tags::NORM)
        || p.has_tag(tags::BIAS)
        || p.has_tag(tags::EMBEDDING))
}

impl Fsam {
    fn recompute_mask(&mut self, params: &[Param], g: &[(usize, Tensor)]) -> Result<()> {
        let entries: Vec<(&Param, &Tensor)> =
            g.iter().filter(|(i, _)| maskable(&params[*i])).map(|(i, g)| (&params[*i], g)).collect();
        self.mask.clear();
        if entries.is_empty() {
            return Ok(());
        }
        let fisher = Tensor::cat(&entries.iter().map(|(_, g)| (*g * *g).flatten(0, -1)).collect::<Vec<_>>(), 0);
        let n = fisher.size()[0];
        let keep = (n as f64 * self.p.keep_ratio) as i64;
        let mut flat = fisher.zeros_like();
        if keep > 0 {
            let (_, idx) = fisher.topk(keep, 0, true, true);
            let _ = flat.f_index_fill_(0, &idx, 1.0)?;
        }
        let mut offset = 0;
        for (p, g) in entries {
            let len = g.numel() as i64;
            self.mask.insert(p.name.clone(), flat.narrow(0, offset, len).reshape(g.size()).copy());
            offset += len;
        }
        Ok(())
    }
}

impl Component for Fsam {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "sam.fsam";
    const SUMMARY: &'static str = "Fisher-mask SAM: perturb only the weights with the largest empirical Fisher";
    const REFERENCE: &'static str = "Zhong et al., Improving Sharpness-Aware Minimization with Fisher Mask for Better Generalization on Language Models, Findings of EMNLP 2022; WHU-ZQH/FSAM4PLM";
    const PASSES_PER_STEP: u32 = 2;
    const STATEFUL: bool = true;
    type Params = FsamParams;

    fn new(p: FsamParams) -> Result<Self> {
        if !(p.rho >= 0.0 && p.rho.is_finite()) {
            return Err(PluginError(format!("rho must be a finite number ≥ 0, got {}", p.rho)));
        }
        if !(0.0..=1.0).contains(&p.keep_ratio) || p.mask_iter == 0 {
            return Err(PluginError("keep_ratio must be in [0, 1] and mask_iter ≥ 1".into()));
        }
        Ok(Fsam { p, mask: BTreeMap::new() })
    }

    fn save_state(&self) -> Result<State> {
        Ok(State {
            json: serde_json::json!({"masked": self.mask.keys().collect::<Vec<_>>()}),
            tensors: self.mask.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect(),
        })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        self.mask = state.tensors;
        Ok(())
    }
}

impl StepRule for Fsam {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        let mut params = host.params()?;
        let g = grads(&params);
        if host.step().is_multiple_of(self.p.mask_iter) || self.mask.is_empty() {
            self.recompute_mask(&params, &g)?;
        }
        let scale = self.p.rho / (global_norm(&tensors(&g))? + 1e-7);
        let mut kept = 0.0;
        let e: Vec<(usize, Tensor)> = g
            .iter()
            .map(|(i, g)| {
                let e = g * scale;
                match self.mask.get(&params[*i].name) {
                    Some(m) if maskable(&params[*i]) => {
                        kept += f64::try_from(m.sum(Kind::Double)).unwrap_or(0.0);
                        (*i, e * m)
                    }
                    _ => (*i, e),
                }
            })
            .collect();
        add_to_weights(&mut params, &e, 1.0)?;
        host.freeze_norm_stats(true);
        let second = host.forward_backward();
        host.freeze_norm_stats(false);
        add_to_weights(&mut params, &e, -1.0)?;
        second?;
        host.log("fsam.kept", kept);
        host.optimizer_step()
    }
}
