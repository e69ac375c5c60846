//! `dro.subsample`: group-balanced subsampling, the "throw away data" baseline (Idrissi et al.,
//! CLeaR 2022, SUBG; Sagawa et al., ICML 2020 "An investigation of why overparameterization
//! exacerbates spurious correlations").
//!
//! Every group (or class, with `by: class`) is cut down to the size of the smallest one by a
//! random subset drawn once per job from the job's seed; every epoch visits that fixed subset,
//! shuffled, and the loss is the plain mean. Empty groups are ignored. The subset is a function
//! of (seed, data), so it needs no checkpointed state.

use serde::Deserialize;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, PluginError, Result, RunInfo, Sampling,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct SubsampleParams {
    /// balance the groups (`group`) or the classes (`class`)
    #[param(default = "group", choices = ["group", "class"])]
    pub by: String,
}

pub struct Subsample {
    by: String,
    keep: Vec<u32>,
}

/// SplitMix64: the subset's random stream, seeded by the job's seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next();
            if v < zone {
                return v % n;
            }
        }
    }
}

/// Keeps (1) or drops (0) each example so that every non-empty class of `labels` keeps as many
/// examples as the smallest one; which ones is a uniformly random subset drawn from `seed`.
pub fn balanced_subset(labels: &[i64], seed: u64) -> Vec<u32> {
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1) as usize;
    let mut members: Vec<Vec<usize>> = vec![vec![]; classes];
    for (i, &g) in labels.iter().enumerate() {
        members[g as usize].push(i);
    }
    let smallest = members.iter().map(Vec::len).filter(|n| *n > 0).min().unwrap_or(0);
    let mut rng = SplitMix(seed ^ 0x5u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut keep = vec![0u32; labels.len()];
    for m in &mut members {
        // A partial Fisher–Yates shuffle: the first `smallest` entries are a uniform subset.
        for i in 0..smallest.min(m.len()) {
            let j = i + rng.below((m.len() - i) as u64) as usize;
            m.swap(i, j);
            keep[m[i]] = 1;
        }
    }
    keep
}

impl Component for Subsample {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "dro.subsample";
    const SUMMARY: &'static str =
        "group-balanced subsampling: train on a fixed random subset with every group cut to the smallest one's size";
    const REFERENCE: &'static str =
        "Idrissi et al., Simple data balancing achieves competitive worst-group-accuracy, CLeaR 2022 (SUBG)";
    type Params = SubsampleParams;

    fn new(p: SubsampleParams) -> Result<Self> {
        if p.by != "group" && p.by != "class" {
            return Err(PluginError(format!("dro.subsample: `by` is `group` or `class`, got `{}`", p.by)));
        }
        Ok(Subsample { by: p.by, keep: vec![] })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        let labels = if self.by == "group" { &info.train_groups } else { &info.train_labels };
        if labels.is_empty() {
            return Err(PluginError(format!(
                "dro.subsample by {} needs data with {} labels (e.g. `data: {{name: spurious}}`)",
                self.by, self.by
            )));
        }
        if labels.iter().any(|&g| g < 0) {
            return Err(PluginError("dro.subsample: negative labels".into()));
        }
        self.keep = balanced_subset(labels, info.seed);
        Ok(())
    }
}

impl Objective for Subsample {
    fn loss(&mut self, input: ObjectiveInput, _ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        Ok(input.losses.mean(Kind::Float))
    }

    fn sampling(&mut self, _epoch: u64) -> Result<Sampling> {
        Ok(Sampling::Repeat(self.keep.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_keeps_the_smallest_groups_size() {
        let groups = vec![0, 0, 0, 0, 0, 1, 1, 2, 2, 2];
        let keep = balanced_subset(&groups, 3);
        for g in 0..3 {
            let kept = groups.iter().zip(&keep).filter(|(k, x)| **k == g && **x == 1).count();
            assert_eq!(kept, 2, "group {g}");
        }
        assert_eq!(keep, balanced_subset(&groups, 3));
        let differs = (0..20).any(|s| balanced_subset(&groups, s) != keep);
        assert!(differs, "the subset depends on the seed");
    }
}
