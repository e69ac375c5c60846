//! `dro.reweight`: group-balanced reweighted sampling.
//!
//! Reference: kohpangwei/group_DRO `data/dro_dataset.py` with `--reweight_groups`: each epoch
//! draws N examples with replacement, example i with weight N/N_{g(i)}, so every group is drawn
//! equally often in expectation; the loss is the plain mean. The baseline Group DRO is compared
//! with (Sagawa et al. use it together with the robust loss in their README commands).
//! Stateless.

use serde::Deserialize;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, PluginError, Result, RunInfo, Sampling,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct ReweightParams {}

pub struct Reweight {
    weights: Vec<f64>,
}

impl Component for Reweight {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "dro.reweight";
    const SUMMARY: &'static str =
        "group-balanced sampling: draw examples with weight N/N_g, so each group is seen equally often";
    const REFERENCE: &'static str =
        "Sagawa et al., ICLR 2020; kohpangwei/group_DRO data/dro_dataset.py (--reweight_groups)";
    type Params = ReweightParams;

    fn new(_: ReweightParams) -> Result<Self> {
        Ok(Reweight { weights: vec![] })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        if info.train_groups.is_empty() || info.group_counts.is_empty() {
            return Err(PluginError(
                "dro.reweight needs data with group labels (e.g. `data: {name: spurious}`)".into(),
            ));
        }
        let n = info.train_groups.len() as f64;
        self.weights = info
            .train_groups
            .iter()
            .map(|&g| {
                let count = info.group_counts.get(g as usize).copied().unwrap_or(0);
                if count == 0 {
                    0.0
                } else {
                    n / count as f64
                }
            })
            .collect();
        Ok(())
    }
}

impl Objective for Reweight {
    fn loss(&mut self, input: ObjectiveInput, _ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        Ok(input.losses.mean(Kind::Float))
    }

    fn sampling(&mut self, _epoch: u64) -> Result<Sampling> {
        Ok(Sampling::Weighted(self.weights.clone()))
    }
}
