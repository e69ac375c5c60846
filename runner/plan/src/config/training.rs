//! How a job trains: the optimizer (`optimizer:`), its learning-rate schedule (`schedule:`),
//! numeric precision and fp16 loss scaling, and augmentation; and their checks.

use super::defaults;
use serde::{Deserialize, Serialize};

/// The precision of the forward pass (`precision:`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

/// Dynamic loss scaling for fp16 training (`loss_scale:`), PyTorch's `GradScaler`: the loss is
/// multiplied by the scale before backward and the gradients divided by it after; a step whose
/// gradients are not all finite is skipped and the scale multiplied by `backoff_factor`, and
/// after `growth_interval` finite steps in a row it is multiplied by `growth_factor`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossScale {
    #[serde(default = "LossScale::default_init")]
    pub init: f64,
    #[serde(default = "LossScale::default_growth_factor")]
    pub growth_factor: f64,
    #[serde(default = "LossScale::default_backoff_factor")]
    pub backoff_factor: f64,
    #[serde(default = "LossScale::default_growth_interval")]
    pub growth_interval: u32,
}

impl LossScale {
    fn default_init() -> f64 {
        65536.0
    }
    fn default_growth_factor() -> f64 {
        2.0
    }
    fn default_backoff_factor() -> f64 {
        0.5
    }
    fn default_growth_interval() -> u32 {
        2000
    }
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            init: Self::default_init(),
            growth_factor: Self::default_growth_factor(),
            backoff_factor: Self::default_backoff_factor(),
            growth_interval: Self::default_growth_interval(),
        }
    }
}

impl Precision {
    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }
}

/// Training-image augmentation (the standard CIFAR recipe is `{crop: 4, flip: true}`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Pad each side with this many zero pixels, then crop the original size at a random place.
    #[serde(default)]
    pub crop: u32,
    /// Mirror left-right with probability 1/2.
    #[serde(default)]
    pub flip: bool,
}

/// A learning-rate schedule: the factor on `optimizer.lr` for the update at global step s
/// (0-based) of T = epochs × ⌈n_train / batch_size⌉ (epochs that resample their examples, as
/// JTT's, may take more steps; the cosine stays at its floor past T). `warmup_steps: w` multiplies it by (s + 1)/w for
/// s < w, and the main schedule starts after the warmup.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Schedule {
    /// 1.
    Constant(ConstantSchedule),
    /// γ^(number of milestones ≤ the current epoch, counted from 0): PyTorch's `MultiStepLR`
    /// stepped once per epoch.
    Step(StepSchedule),
    /// η_min/η + (1 − η_min/η)(1 + cos(π (s − w)/(T − w)))/2: PyTorch's `CosineAnnealingLR`
    /// with `T_max = T − w`, stepped once per optimizer step.
    Cosine(CosineSchedule),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConstantSchedule {
    #[serde(default)]
    pub warmup_steps: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StepSchedule {
    /// Epochs (counted from 0) at which the rate is multiplied by `gamma`.
    pub milestones: Vec<u32>,
    #[serde(default = "defaults::step_gamma")]
    pub gamma: f64,
    #[serde(default)]
    pub warmup_steps: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CosineSchedule {
    /// The rate at the last step (η_min).
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Constant(ConstantSchedule::default())
    }
}

impl Schedule {
    pub(crate) fn is_default(&self) -> bool {
        *self == Schedule::default()
    }

    fn warmup_steps(&self) -> u64 {
        match self {
            Schedule::Constant(c) => c.warmup_steps,
            Schedule::Step(c) => c.warmup_steps,
            Schedule::Cosine(c) => c.warmup_steps,
        }
    }

    /// The factor on the base rate `lr` for the update at global step `step` (0-based) in epoch
    /// `epoch` (0-based), with `total` steps in the run.
    pub fn factor(&self, lr: f64, step: u64, epoch: u64, total: u64) -> f64 {
        let w = self.warmup_steps();
        let warm = if step < w { (step + 1) as f64 / w as f64 } else { 1.0 };
        let main = match self {
            Schedule::Constant(_) => 1.0,
            Schedule::Step(c) => c.gamma.powi(c.milestones.iter().filter(|&&m| u64::from(m) <= epoch).count() as i32),
            Schedule::Cosine(c) => {
                let span = total.saturating_sub(w).max(1) as f64;
                let p = (step.saturating_sub(w) as f64 / span).min(1.0);
                let floor = c.min_lr / lr;
                floor + (1.0 - floor) * (1.0 + (std::f64::consts::PI * p).cos()) / 2.0
            }
        };
        warm * main
    }
}

/// The base optimizer.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum OptimizerConfig {
    Sgd(Sgd),
    Adam(Adam),
    #[serde(rename = "adamw")]
    AdamW(Adam),
}

impl OptimizerConfig {
    /// The base learning rate (the schedule's factor multiplies it).
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Sgd(o) => o.lr,
            OptimizerConfig::Adam(o) | OptimizerConfig::AdamW(o) => o.lr,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sgd {
    #[serde(default = "defaults::sgd_lr")]
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub nesterov: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Adam {
    #[serde(default = "defaults::adam_lr")]
    pub lr: f64,
    #[serde(default = "defaults::beta1")]
    pub beta1: f64,
    #[serde(default = "defaults::beta2")]
    pub beta2: f64,
    #[serde(default = "defaults::eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

impl OptimizerConfig {
    /// The checks of the optimizer's settings.
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        let err = |p: &str, m: String| Err((p.to_string(), m));
        let (lr, wd) = match self {
            OptimizerConfig::Sgd(o) => {
                if !(0.0..1.0).contains(&o.momentum) {
                    return err("optimizer.momentum", format!("must be in [0, 1), got {}", o.momentum));
                }
                if o.nesterov && o.momentum == 0.0 {
                    return err("optimizer.nesterov", "needs a momentum > 0".into());
                }
                (o.lr, o.weight_decay)
            }
            OptimizerConfig::Adam(o) | OptimizerConfig::AdamW(o) => {
                for (k, b) in [("beta1", o.beta1), ("beta2", o.beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return err(&format!("optimizer.{k}"), format!("must be in [0, 1), got {b}"));
                    }
                }
                if o.eps.is_nan() || o.eps <= 0.0 {
                    return err("optimizer.eps", format!("must be > 0, got {}", o.eps));
                }
                (o.lr, o.weight_decay)
            }
        };
        if !(lr > 0.0 && lr.is_finite()) {
            return err("optimizer.lr", format!("must be a finite number > 0, got {lr}"));
        }
        if !(wd >= 0.0 && wd.is_finite()) {
            return err("optimizer.weight_decay", format!("must be a finite number ≥ 0, got {wd}"));
        }
        Ok(())
    }
}

impl Schedule {
    /// The checks of the schedule's settings; `lr` is the optimizer's (a cosine schedule's
    /// floor must lie below it).
    pub(crate) fn check(&self, lr: f64) -> Result<(), (String, String)> {
        let err = |p: &str, m: String| Err((p.to_string(), m));
        match self {
            Schedule::Constant(_) => {}
            Schedule::Step(c) => {
                if !(c.gamma > 0.0 && c.gamma.is_finite()) {
                    return err("schedule.gamma", format!("must be a finite number > 0, got {}", c.gamma));
                }
                if c.milestones.windows(2).any(|w| w[0] >= w[1]) {
                    return err("schedule.milestones", "must be increasing epochs".into());
                }
            }
            Schedule::Cosine(c) => {
                if !(c.min_lr >= 0.0 && c.min_lr <= lr) {
                    return err("schedule.min_lr", format!("must be in [0, optimizer.lr = {lr}], got {}", c.min_lr));
                }
            }
        }
        Ok(())
    }
}

impl LossScale {
    /// The checks of the loss scaler's settings.
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        let err = |p: &str, m: String| Err((p.to_string(), m));
        if !(self.init > 0.0 && self.init.is_finite()) {
            return err("loss_scale.init", format!("must be a finite number > 0, got {}", self.init));
        }
        if !(self.growth_factor > 1.0 && self.growth_factor.is_finite()) {
            return err("loss_scale.growth_factor", format!("must be > 1, got {}", self.growth_factor));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return err("loss_scale.backoff_factor", format!("must be in (0, 1), got {}", self.backoff_factor));
        }
        if self.growth_interval == 0 {
            return err("loss_scale.growth_interval", "must be at least 1".into());
        }
        Ok(())
    }
}
