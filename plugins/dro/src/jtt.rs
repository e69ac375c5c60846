//! `dro.jtt`: the second stage of Just Train Twice (Liu et al., ICML 2021).
//!
//! Reference: anniesch/jtt `process_training.py` (error set) and `run_expt.py` (upsampling).
//! Stage 1 is a plain ERM `train` job; every xlab training job records, per epoch, the
//! examples its training pass misclassified (train mode, each minibatch predicted before its
//! own update), which is exactly the reference's error set. This component runs in the
//! dependent stage (`needs: {stage: ..., select: each}`): it reads the parent's error set E of
//! epoch `parent_epoch`, and every epoch visits `train ∪ (E × λ_up)`, i.e. each error example
//! 1 + λ_up times and every other example once, shuffled. The loss is the plain mean. With
//! `up_weight: -1`, λ_up = ⌊(N − |E|)/|E|⌋ − 1 (the reference's automatic setting).
//! State: the error set and λ_up (checkpointed).

use serde::{Deserialize, Serialize};
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    artifacts, Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, PluginError, Result, RunInfo,
    Sampling, State,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct JttParams {
    /// λ_up: extra copies of each error example per epoch (-1: ⌊(N−|E|)/|E|⌋ − 1)
    #[param(default = -1, min = -1.0)]
    pub up_weight: i64,
    /// the parent's epoch (1-based) whose training-pass errors form E; 0: its last epoch
    #[param(default = 0, min = 0.0)]
    pub parent_epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct JttState {
    errors: Vec<u64>,
    up_weight: u64,
    n_train: u64,
}

pub struct Jtt {
    p: JttParams,
    state: Option<JttState>,
}

/// λ_up: the given one, or the reference's automatic ⌊(N − |E|)/|E|⌋ − 1 for `-1`.
pub fn upsampling(up_weight: i64, n: u64, errors: u64) -> u64 {
    if up_weight >= 0 {
        return up_weight as u64;
    }
    if errors == 0 {
        return 0;
    }
    ((n - errors) / errors).saturating_sub(1)
}

/// How often each of `n` examples appears in a stage-2 epoch.
pub fn counts(n: u64, errors: &[u64], up_weight: u64) -> Vec<u32> {
    let mut c = vec![1u32; n as usize];
    for &i in errors {
        c[i as usize] = 1 + up_weight as u32;
    }
    c
}

impl Component for Jtt {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "dro.jtt";
    const SUMMARY: &'static str =
        "Just Train Twice, stage 2: upsample the examples the parent ERM job misclassified while training";
    const REFERENCE: &'static str =
        "Liu et al., Just Train Twice: Improving Group Robustness without Training Group Information, ICML 2021; anniesch/jtt";
    const STATEFUL: bool = true;
    type Params = JttParams;

    fn new(p: JttParams) -> Result<Self> {
        Ok(Jtt { p, state: None })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        let [parent] = info.parents.as_slice() else {
            return Err(PluginError(format!(
                "dro.jtt needs exactly one parent job, the ERM run whose errors it upsamples (got {}); \
                 add `needs: {{stage: <erm stage>, select: each}}` to this stage",
                info.parents.len()
            )));
        };
        let epochs = parent.config.get("epochs").and_then(|e| e.as_u64()).unwrap_or(0);
        let epoch = if self.p.parent_epoch == 0 { epochs } else { self.p.parent_epoch };
        if epoch == 0 || epoch > epochs {
            return Err(PluginError(format!(
                "dro.jtt: parent_epoch {} is outside the parent's {epochs} epochs",
                self.p.parent_epoch
            )));
        }
        let t = artifacts::read_train_errors(&parent.run_dir, epoch)
            .map_err(|e| PluginError(format!("dro.jtt: parent {}: {e}", parent.job_id)))?;
        if t.n_train != info.n_train {
            return Err(PluginError(format!(
                "dro.jtt: the parent trained on {} examples, this job on {}; both stages need the same training data",
                t.n_train, info.n_train
            )));
        }
        let up = upsampling(self.p.up_weight, t.n_train, t.errors.len() as u64);
        if up > u64::from(u32::MAX / 2) {
            return Err(PluginError(format!("dro.jtt: up_weight {up} is too large")));
        }
        self.state = Some(JttState { errors: t.errors, up_weight: up, n_train: t.n_train });
        Ok(())
    }

    fn save_state(&self) -> Result<State> {
        Ok(State { json: serde_json::to_value(&self.state)?, tensors: Default::default() })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        let saved: Option<JttState> = serde_json::from_value(state.json)?;
        if let (Some(s), Some(now)) = (&saved, &self.state) {
            if s.n_train != now.n_train {
                return Err(PluginError(format!(
                    "dro.jtt: the checkpoint's error set covers {} examples, the data has {}",
                    s.n_train, now.n_train
                )));
            }
        }
        if saved.is_some() {
            self.state = saved;
        }
        Ok(())
    }
}

impl Objective for Jtt {
    fn loss(&mut self, input: ObjectiveInput, ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        if input.first_pass {
            if let Some(s) = &self.state {
                ctx.log("jtt.errors", s.errors.len() as f64);
                ctx.log("jtt.up_weight", s.up_weight as f64);
            }
        }
        Ok(input.losses.mean(Kind::Float))
    }

    fn sampling(&mut self, _epoch: u64) -> Result<Sampling> {
        let s = self.state.as_ref().ok_or_else(|| PluginError("dro.jtt: sampling before setup".into()))?;
        Ok(Sampling::Repeat(counts(s.n_train, &s.errors, s.up_weight)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jtt_vector_of_methods_md() {
        // N=10, E={2,7}, λ_up=3: 16 items, 2 and 7 four times each.
        let c = counts(10, &[2, 7], 3);
        assert_eq!(c.iter().sum::<u32>(), 16);
        assert_eq!((c[2], c[7]), (4, 4));
        assert!(c.iter().enumerate().all(|(i, k)| i == 2 || i == 7 || *k == 1));
    }

    #[test]
    fn automatic_up_weight_follows_the_reference() {
        assert_eq!(upsampling(-1, 10, 2), 3); // ⌊8/2⌋ − 1
        assert_eq!(upsampling(-1, 100, 7), 12); // ⌊93/7⌋ − 1
        assert_eq!(upsampling(5, 100, 7), 5);
        assert_eq!(upsampling(-1, 100, 0), 0);
    }
}
