//! `mixup.resample`: class- and/or domain-balanced resampling, the second control of selective
//! mixup (Teney et al., ICML 2024): each epoch draws as many examples as the training set
//! holds, with replacement, example i with weight 1/N_{k(i)} where k is its class, its domain
//! or its (class, domain) cell, so every cell is drawn equally often in expectation. The loss
//! is the plain mean. An objective (it only chooses the epoch's examples); stateless.

use serde::Deserialize;
use std::collections::HashMap;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, PluginError, Result, RunInfo, Sampling,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct ResampleParams {
    /// balance `class`, `domain` or `class_domain` cells
    #[param(default = "class", choices = ["class", "domain", "class_domain"])]
    pub by: String,
}

pub struct Resample {
    by: String,
    weights: Vec<f64>,
}

/// Weight 1/N_k per example for cell ids `keys` (one per example).
pub fn balanced_weights(keys: &[(i64, i64)]) -> Vec<f64> {
    let mut counts: HashMap<(i64, i64), f64> = HashMap::new();
    for k in keys {
        *counts.entry(*k).or_default() += 1.0;
    }
    keys.iter().map(|k| 1.0 / counts[k]).collect()
}

impl Component for Resample {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "mixup.resample";
    const SUMMARY: &'static str = "class- or domain-balanced resampling: selective mixup's control without pairs";
    const REFERENCE: &'static str = "Teney et al., Selective Mixup Helps with Distribution Shifts, But Not (Only) because of Mixup, ICML 2024 (paper only)";
    type Params = ResampleParams;

    fn new(p: ResampleParams) -> Result<Self> {
        if !["class", "domain", "class_domain"].contains(&p.by.as_str()) {
            return Err(PluginError(format!(
                "mixup.resample: `by` is `class`, `domain` or `class_domain`, got `{}`",
                p.by
            )));
        }
        Ok(Resample { by: p.by, weights: vec![] })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        if self.by != "class" && info.train_domains.is_empty() {
            return Err(PluginError(format!(
                "mixup.resample by {} needs data with domains (e.g. `data: {{name: spurious}}`)",
                self.by
            )));
        }
        let keys: Vec<(i64, i64)> = (0..info.train_labels.len())
            .map(|i| match self.by.as_str() {
                "class" => (info.train_labels[i], 0),
                "domain" => (0, info.train_domains[i]),
                _ => (info.train_labels[i], info.train_domains[i]),
            })
            .collect();
        if keys.is_empty() {
            return Err(PluginError("mixup.resample needs the training labels".into()));
        }
        self.weights = balanced_weights(&keys);
        Ok(())
    }
}

impl Objective for Resample {
    fn loss(&mut self, input: ObjectiveInput, _ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        Ok(input.losses.mean(Kind::Float))
    }

    fn sampling(&mut self, _epoch: u64) -> Result<Sampling> {
        Ok(Sampling::Weighted(self.weights.clone()))
    }
}
