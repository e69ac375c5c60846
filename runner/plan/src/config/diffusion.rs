//! Diffusion: the noise schedule and prediction target of a diffusion training (`diffusion:`),
//! the EMA of its weights (`ema:`), and the denoiser a sampling job draws from (`denoiser:`).

use super::defaults;
use serde::{Deserialize, Serialize};

/// A denoiser ε̂(x_t, t) for sampling.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum DenoiserConfig {
    /// The exact ε-prediction for the data's training split (scaled to [-1, 1] per feature) as
    /// the whole data distribution: x̂₀ = Σᵢ softmax(−‖x − √ᾱ xᵢ‖²/(2(1−ᾱ)))ᵢ xᵢ and
    /// ε̂ = (x − √ᾱ x̂₀)/√(1−ᾱ). No training; samplers can be checked against it exactly.
    Exact(ExactDenoiser),
    /// The diffusion model the parent job (`needs:`) trained, with its noise schedule.
    Trained(Trained),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Trained {
    /// The parent's averaged or raw weights; the average when the parent trains with `ema:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightsChoice>,
    /// The weights the parent kept at the end of this epoch (1-based; its stage's
    /// `checkpoint.keep_weights` lists it) instead of its final ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
}

/// The exponential moving average of the weights (diffusers' `EMAModel`): after every
/// `every`-th optimizer step the average's update count k goes up by one and each parameter
/// moves as s ← s − (1 − d)(s − p), where d = 0 for k ≤ `update_after_step` + 1, else
/// d = min(`decay`, max(`min_decay`, w)) with w = (1 + j)/(10 + j), or with `warmup`
/// w = 1 − (1 + j/`inv_gamma`)^(−`power`), j = k − `update_after_step` − 1. Tensors that take
/// no gradient (batch-norm statistics) are copied.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ema {
    #[serde(default = "defaults::ema_decay")]
    pub decay: f64,
    #[serde(default)]
    pub min_decay: f64,
    #[serde(default)]
    pub update_after_step: u64,
    #[serde(default)]
    pub warmup: bool,
    #[serde(default = "defaults::one")]
    pub inv_gamma: f64,
    #[serde(default = "defaults::ema_power")]
    pub power: f64,
    /// Optimizer steps between updates of the average.
    #[serde(default = "defaults::one_step")]
    pub every: u64,
}

impl Ema {
    /// diffusers' `EMAModel.get_decay` for the average's k-th update.
    pub fn decay_at(&self, k: u64) -> f64 {
        let j = k.saturating_sub(self.update_after_step + 1);
        if j == 0 {
            return 0.0;
        }
        let j = j as f64;
        let w = if self.warmup { 1.0 - (1.0 + j / self.inv_gamma).powf(-self.power) } else { (1.0 + j) / (10.0 + j) };
        w.min(self.decay).max(self.min_decay)
    }

    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=1.0).contains(&self.decay) {
            return Err(("decay", format!("must be in [0, 1], got {}", self.decay)));
        }
        if !(0.0..=self.decay).contains(&self.min_decay) {
            return Err(("min_decay", format!("must be in [0, decay], got {}", self.min_decay)));
        }
        let positive = |x: f64| x > 0.0 && x.is_finite();
        if !(positive(self.inv_gamma) && positive(self.power)) {
            return Err(("inv_gamma", "and `power` must be finite numbers > 0".into()));
        }
        if self.every == 0 {
            return Err(("every", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Which of the parent's weights a sample job uses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WeightsChoice {
    /// The exponential moving average (`ema:` in the parent's training).
    Ema,
    /// The weights as the optimizer left them.
    Raw,
}

/// What a diffusion model is trained to predict.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise ε.
    #[default]
    Epsilon,
    /// v = √ᾱ ε − √(1−ᾱ) x₀.
    V,
}

/// Diffusion training (docs/methods.md §3.1): data scaled to [-1, 1], t ~ U{0..T−1}, ε ~ N(0, I),
/// x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε, and the mean squared error of the model's prediction.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Diffusion {
    #[serde(default)]
    pub schedule: BetaSchedule,
    #[serde(default = "defaults::timesteps")]
    pub timesteps: u32,
    #[serde(default = "defaults::beta_start")]
    pub beta_start: f64,
    #[serde(default = "defaults::beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub prediction: Prediction,
    /// Condition the model on the class label (an embedding of the label, plus a null label).
    #[serde(default)]
    pub conditional: bool,
    /// Classifier-free guidance training: the probability that a training example's label is
    /// replaced by the null label.
    #[serde(default)]
    pub p_uncond: f64,
}

impl Diffusion {
    /// The noise schedule, as the exact denoiser spells it.
    pub fn noise(&self) -> ExactDenoiser {
        ExactDenoiser {
            schedule: self.schedule,
            timesteps: self.timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
        }
    }
}

impl ExactDenoiser {
    /// Checks the schedule's numbers; the message names the key.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.timesteps < 2 {
            return Err(("timesteps", "must be at least 2".into()));
        }
        if !(0.0 < self.beta_start && self.beta_start < self.beta_end && self.beta_end < 1.0) {
            return Err((
                "beta_start",
                format!("needs 0 < beta_start < beta_end < 1, got {} and {}", self.beta_start, self.beta_end),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExactDenoiser {
    #[serde(default)]
    pub schedule: BetaSchedule,
    #[serde(default = "defaults::timesteps")]
    pub timesteps: u32,
    #[serde(default = "defaults::beta_start")]
    pub beta_start: f64,
    #[serde(default = "defaults::beta_end")]
    pub beta_end: f64,
}

/// The noise schedule (docs/methods.md §3.1).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β = linspace(β_start, β_end, T).
    #[default]
    Linear,
    /// β = linspace(√β_start, √β_end, T)².
    ScaledLinear,
    /// Nichol & Dhariwal's cosine schedule, β capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

impl Diffusion {
    /// The checks of a diffusion training's settings: its noise schedule, and label dropout
    /// only on a class-conditional model.
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        let err = |p: &str, m: String| Err((p.to_string(), m));
        if let Err((k, m)) = self.noise().check() {
            return err(&format!("diffusion.{k}"), m);
        }
        if !(0.0..1.0).contains(&self.p_uncond) {
            return err("diffusion.p_uncond", format!("must be in [0, 1), got {}", self.p_uncond));
        }
        if self.p_uncond > 0.0 && !self.conditional {
            return err("diffusion.p_uncond", "drops labels, so it needs `conditional: true`".into());
        }
        Ok(())
    }
}

/// The condition each sample asks a class-conditional model for (`labels:` of a sample job).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum SampleLabels {
    /// `cycle`: sample i asks for class i mod K (the default); `none`: the null label, so the
    /// samples are the model's unconditional ones.
    Named(LabelsName),
    /// One class for every sample.
    One(u32),
    /// Sample i asks for class `list[i mod len]`.
    List(Vec<u32>),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LabelsName {
    Cycle,
    None,
}

impl SampleLabels {
    /// The classes named, for checks against the class count.
    pub fn classes(&self) -> &[u32] {
        match self {
            SampleLabels::Named(_) => &[],
            SampleLabels::One(c) => std::slice::from_ref(c),
            SampleLabels::List(l) => l,
        }
    }
}

impl<'de> Deserialize<'de> for SampleLabels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "`cycle`, `none`, a class number or a list of class numbers";
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SampleLabels;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SampleLabels, E> {
                match v {
                    "cycle" => Ok(SampleLabels::Named(LabelsName::Cycle)),
                    "none" => Ok(SampleLabels::Named(LabelsName::None)),
                    other => Err(E::custom(format!("`{other}`: expected {EXPECTED}"))),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SampleLabels, E> {
                u32::try_from(v).map(SampleLabels::One).map_err(|_| E::custom(format!("class {v} is out of range")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SampleLabels, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("class {v}: classes are numbered from 0")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SampleLabels, A::Error> {
                let mut out = Vec::new();
                while let Some(c) = seq.next_element::<u32>()? {
                    out.push(c);
                }
                if out.is_empty() {
                    return Err(serde::de::Error::custom("an empty list of classes; name at least one"));
                }
                Ok(SampleLabels::List(out))
            }
        }
        d.deserialize_any(V)
    }
}
