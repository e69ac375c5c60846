//! The typed, validated config of one job.
//!
//! A job's config is the experiment's `defaults` deep-merged with its stage and its sweep point.
//! It is checked here against closed types with `deny_unknown_fields`, and the *resolved* form
//! (every default filled in) is what the job's identity hashes and what the worker receives. So
//! writing a default explicitly, or leaving it out, names the same job.

use serde::{Deserialize, Serialize};

/// What a stage does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Train a model and evaluate it on the validation and test splits after every epoch.
    Train,
    /// Draw samples with a sampler component from a denoiser.
    Sample,
    /// Evaluate the final weights of the parent job(s) (`needs:`) on this stage's data; with
    /// several parents (`select: all`), their averaged predictive distribution (an ensemble).
    Evaluate,
    /// Nothing but what `noop:` says (sleep, then succeed or fail a chosen way): for measuring
    /// the scheduler and for exercising its failure handling.
    Noop,
}

/// What a `task: noop` job does.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Noop {
    /// Seconds to sleep first.
    #[serde(default)]
    pub sleep_s: f64,
    /// `none` (succeed), `crash` (abort the process), `out_of_memory` (allocate more than the
    /// device has), `diverge` (report a NaN loss) or `error` (fail with an error).
    #[serde(default)]
    pub fail: NoopFailure,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NoopFailure {
    #[default]
    None,
    Crash,
    OutOfMemory,
    Diverge,
    Error,
}

/// The resolved config of one job.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub task: Task,
    pub data: DataConfig,
    /// Required by `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
    /// Required by `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerConfig>,
    /// Passes over the training split.
    #[serde(default = "defaults::epochs")]
    pub epochs: u32,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    /// A plugin step rule that owns the update (e.g. `{use: sam.sam, rho: 0.05}`); plain
    /// forward, backward and optimizer step when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_rule: Option<ComponentUse>,
    /// A plugin batch transform (e.g. `{use: mixup.mixup, alpha: 1.0}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_transform: Option<ComponentUse>,
    /// A plugin objective over per-example losses (e.g. `{use: dro.group_dro}`); the mean
    /// loss when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<ComponentUse>,
    /// `sample`: the sampler component (e.g. `{use: diffusion.ddim, steps: 50}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<ComponentUse>,
    /// `sample`, with a trained denoiser whose model is class-conditional: how the conditional
    /// and unconditional predictions combine (e.g. `{use: diffusion.cfg, guidance_scale: 3}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<ComponentUse>,
    /// `train`: train a diffusion model (`time_mlp` or `unet`) to predict the noise instead of a
    /// classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffusion: Option<Diffusion>,
    /// `sample`: the denoiser the sampler queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoiser: Option<DenoiserConfig>,
    /// `sample`: how many samples to draw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u32>,
    /// `sample`: how many samples go through the sampler at once (default 1024). Memory grows
    /// with it; stochastic samplers draw their noise per batch, so it is part of the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_batch: Option<u32>,
    /// `evaluate`: sharpness of each parent's training loss at its final weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharpness: Option<Sharpness>,
    /// `noop`: what the job does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noop: Option<Noop>,
    /// `train`: the learning-rate schedule, a factor on the optimizer's `lr` at every step.
    #[serde(default, skip_serializing_if = "Schedule::is_default")]
    pub schedule: Schedule,
    /// `train`: clip the gradient's global L2 norm to this before each optimizer step (as
    /// `torch.nn.utils.clip_grad_norm_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// `train`: the training loss's targets are (1 − ε)·target + ε/classes (soft targets too).
    /// Validation and test losses stay the plain NLL.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub label_smoothing: f64,
    /// `train`: start from these weights (a safetensors file with PyTorch `state_dict` names,
    /// e.g. `layers.0.weight`) instead of a random initialization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<FileRef>,
    /// `train`: visit the training examples in a new random order every epoch (`true`), or in
    /// file order (`false`, for step-by-step comparisons with another implementation).
    #[serde(default = "defaults::yes", skip_serializing_if = "is_true")]
    pub shuffle: bool,
    /// `train`, image data: random crops after zero padding and horizontal flips of the training
    /// images, drawn per example from the job's seed and the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<Augment>,
    /// Results that depend only on the config and seed: one CPU thread whatever the slot
    /// (a thread count changes how sums are split), and on CUDA no cuDNN autotuning (cuDNN off)
    /// and cuBLAS's deterministic workspace. Slower; part of the identity.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deterministic: bool,
    /// `train` and `evaluate` of classifiers: run the forward pass and the loss under libtorch's
    /// autocast in `bf16` or `fp16` (CPU or CUDA): matrix products and convolutions in the half
    /// type, reductions and the loss in fp32. Weights, gradients and optimizer state stay in
    /// fp32. `fp16` training scales the loss dynamically (`loss_scale`). Part of the identity.
    #[serde(default, skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
    /// `train`: keep an exponential moving average of the weights, as diffusers' `EMAModel`
    /// updates it, written beside the weights as `weights_ema.safetensors` and kept in
    /// checkpoints. Sample jobs of a diffusion model trained with it use the average by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<Ema>,
    /// `precision: fp16` training: the dynamic loss scale, as PyTorch's `GradScaler` keeps it
    /// (its defaults). Part of the identity when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
}

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

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A file a job reads. Written as a path (relative to the experiment file); the plan records
/// the absolute path and the file's SHA-256, so a job's identity changes with the file's
/// content. Writing `{path, sha256}` pins the content: a different file is an error.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileRef {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl schemars::JsonSchema for FileRef {
    fn schema_name() -> String {
        "FileRef".into()
    }

    fn json_schema(gen: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        #[derive(schemars::JsonSchema)]
        #[allow(dead_code)]
        #[serde(deny_unknown_fields)]
        struct Pinned {
            path: String,
            sha256: Option<String>,
        }
        let mut s = schemars::schema::SchemaObject::default();
        s.subschemas().any_of = Some(vec![gen.subschema_for::<String>(), gen.subschema_for::<Pinned>()]);
        s.metadata().description = Some("A file path relative to the experiment file, or `{path, sha256}`.".into());
        s.into()
    }
}

impl<'de> Deserialize<'de> for FileRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        struct Full {
            path: String,
            #[serde(default)]
            sha256: Option<String>,
        }
        #[derive(Deserialize, schemars::JsonSchema)]
        #[serde(untagged, expecting = "a file path, or `{path, sha256}`")]
        enum Either {
            Path(String),
            Full(Full),
        }
        Ok(match Either::deserialize(d)? {
            Either::Path(path) => FileRef { path, sha256: None },
            Either::Full(f) => FileRef { path: f.path, sha256: f.sha256 },
        })
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
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
    fn is_default(&self) -> bool {
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

/// Sharpness diagnostics of a trained model, on the first `samples` training examples with the
/// model in evaluation mode (normalization layers use their running statistics):
/// - `sharpness.hessian_top`: the top eigenvalue of the Hessian of the mean training loss, by
///   `power_iterations` steps of power iteration on exact Hessian-vector products;
/// - `sharpness.m_sharpness`: over chunks of `m` examples, the mean of
///   L_k(w + ρ g_k/‖g_k‖) − L_k(w), the loss increase at the first-order worst point within
///   radius ρ (Foret et al.'s estimate of m-sharpness).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sharpness {
    #[serde(default = "defaults::sharpness_samples")]
    pub samples: usize,
    #[serde(default = "defaults::power_iterations")]
    pub power_iterations: u32,
    #[serde(default = "defaults::sharpness_rho")]
    pub rho: f64,
    #[serde(default = "defaults::sharpness_m")]
    pub m: usize,
    /// Seed of the power iteration's starting vector.
    #[serde(default)]
    pub seed: u64,
}

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

    fn check(&self) -> Result<(), (&'static str, String)> {
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
/// A plugin component and its parameters: `{use: family.variant, param: value, ...}`. After
/// resolution every declared parameter is present, defaults filled in.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
pub struct ComponentUse {
    #[serde(rename = "use")]
    pub id: String,
    #[serde(flatten)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// The component slots of a job config, with the kind each expects.
pub const COMPONENT_SLOTS: &[(&str, &str)] = &[
    ("step_rule", "step_rule"),
    ("batch_transform", "batch_transform"),
    ("objective", "objective"),
    ("sampler", "sampler"),
    ("guidance", "guidance"),
];

impl JobConfig {
    /// The components the job uses, by slot name.
    pub fn components(&self) -> Vec<(&'static str, &ComponentUse)> {
        let slots = [&self.step_rule, &self.batch_transform, &self.objective, &self.sampler, &self.guidance];
        COMPONENT_SLOTS.iter().zip(slots).filter_map(|((slot, _), c)| c.as_ref().map(|c| (*slot, c))).collect()
    }

    pub fn components_mut(&mut self) -> Vec<(&'static str, &mut ComponentUse)> {
        let slots = [
            &mut self.step_rule,
            &mut self.batch_transform,
            &mut self.objective,
            &mut self.sampler,
            &mut self.guidance,
        ];
        COMPONENT_SLOTS.iter().zip(slots).filter_map(|((slot, _), c)| c.as_mut().map(|c| (*slot, c))).collect()
    }
}

/// A dataset. Generators are deterministic in their own `seed`, independent of the job's seed,
/// so that every seed of a sweep sees the same data.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum DataConfig {
    /// Two interleaved half circles in 2-D with Gaussian noise; 2 classes.
    TwoMoons(TwoMoons),
    /// Binary labels with a spurious attribute that agrees with the label with probability
    /// `correlation` in the training split and `eval_correlation` in validation and test;
    /// group = 2·label + attribute. The standard test bed for DRO and selective mixup.
    Spurious(Spurious),
    /// Isotropic Gaussian blobs, one per class, centres drawn uniformly in [-10, 10]^dim (as
    /// scikit-learn's `make_blobs`).
    Blobs(Blobs),
    /// The UCI handwritten digits as scikit-learn ships them (1797 images of 8×8 pixels,
    /// 10 classes), read offline from the installed package; shuffled by `seed` and split
    /// into test, validation and the remaining training examples.
    Digits(Digits),
    /// Arrays from a NumPy `.npz` file: `x` (rows × features, or rows × …, flattened), `y`
    /// (integer labels 0..classes), and optional `group` and `domain` (integer ids per row).
    /// Rows are used in file order: the last `n_test` are the test split, the `n_val` before
    /// them the validation split, the rest the training split.
    Npz(Npz),
    /// A CSV file with a header row: the `label` column holds the class (integers 0, 1, …, or
    /// names, numbered in sorted order), the optional `group` and `domain` columns integer ids,
    /// and every other column a numeric feature. Rows are split in file order as for `npz`.
    Csv(Csv),
    /// CIFAR-10 in its binary form: `path` is the `cifar-10-batches-bin` folder
    /// (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`). The last `n_val` training
    /// images are the validation split. Pixels are scaled to [0, 1] and, with `normalize`
    /// (default), standardized per channel with the training split's mean and std.
    Cifar10(Cifar),
    /// CIFAR-100 in its binary form (`train.bin`, `test.bin` in `path`), fine labels.
    Cifar100(Cifar),
    /// MNIST-style IDX files (Fashion-MNIST too), gzipped or not: `path` is a folder with
    /// `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
    /// `t10k-labels-idx1-ubyte` (each optionally `.gz`).
    Idx(Cifar),
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Npz {
    pub path: FileRef,
    #[serde(default)]
    pub n_val: usize,
    pub n_test: usize,
    /// The (channels, height, width) of each row of `x`, for image models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[usize; 3]>,
    /// Scale each feature to mean 0 and standard deviation 1 with the training split's
    /// statistics (as scikit-learn's `StandardScaler`), applied to every split.
    #[serde(default, skip_serializing_if = "is_false")]
    pub standardize: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Csv {
    pub path: FileRef,
    /// The name of the label column.
    #[serde(default = "defaults::label_column")]
    pub label: String,
    /// The name of a column of group ids (for group metrics and DRO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The name of a column of domain ids (for selective mixup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default)]
    pub n_val: usize,
    pub n_test: usize,
    /// The (channels, height, width) of each row's features, for image models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[usize; 3]>,
    /// Scale each feature to mean 0 and standard deviation 1 with the training split's
    /// statistics, applied to every split.
    #[serde(default, skip_serializing_if = "is_false")]
    pub standardize: bool,
}

/// An image dataset read from a folder of standard files.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cifar {
    pub path: FileRef,
    #[serde(default)]
    pub n_val: usize,
    #[serde(default = "defaults::yes")]
    pub normalize: bool,
}

impl DataConfig {
    /// `Some(shape)` for image data, with the (channels, height, width) when the config fixes it
    /// (`None` inside for folders whose files tell); `None` for vectors.
    pub fn image_shape(&self) -> Option<Option<[usize; 3]>> {
        match self {
            DataConfig::Digits(_) => Some(Some([1, 8, 8])),
            DataConfig::Cifar10(_) | DataConfig::Cifar100(_) => Some(Some([3, 32, 32])),
            DataConfig::Idx(_) => Some(None),
            DataConfig::Npz(n) => n.image.map(Some),
            DataConfig::Csv(c) => c.image.map(Some),
            _ => None,
        }
    }

    /// The number of features of each row, where the config alone tells it (generators, the
    /// built-in image sets, files with an `image` shape).
    pub fn row_width(&self) -> Option<usize> {
        match self {
            DataConfig::TwoMoons(_) => Some(2),
            DataConfig::Spurious(d) => Some(2 + d.noise_dims),
            DataConfig::Blobs(d) => Some(d.dim),
            _ => self.image_shape().flatten().map(|[c, h, w]| c * h * w),
        }
    }

    /// Whether rows are images (for `cnn`, `resnet18`, `wrn` and augmentation).
    pub fn is_image(&self) -> bool {
        match self {
            DataConfig::Digits(_) | DataConfig::Cifar10(_) | DataConfig::Cifar100(_) | DataConfig::Idx(_) => true,
            DataConfig::Npz(n) => n.image.is_some(),
            DataConfig::Csv(c) => c.image.is_some(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Digits {
    #[serde(default = "defaults::digits_val")]
    pub n_val: usize,
    #[serde(default = "defaults::digits_test")]
    pub n_test: usize,
    #[serde(default)]
    pub seed: u64,
}

/// Images in the digits set.
pub const DIGITS_TOTAL: usize = 1797;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TwoMoons {
    #[serde(default = "defaults::n_train")]
    pub n_train: usize,
    #[serde(default = "defaults::n_val")]
    pub n_val: usize,
    #[serde(default = "defaults::n_test")]
    pub n_test: usize,
    /// Standard deviation of the Gaussian noise added to each point.
    #[serde(default = "defaults::noise")]
    pub noise: f64,
    #[serde(default)]
    pub seed: u64,
}

/// Features: `[y' + core_noise·z₀, a' + spurious_noise·z₁, z₂, …]` with y' = 2y−1 and a' = 2a−1:
/// the core feature predicts the label reliably only with all its noise averaged out, while the
/// nearly noiseless spurious feature predicts it on the majority groups only.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spurious {
    #[serde(default = "defaults::n_train")]
    pub n_train: usize,
    #[serde(default = "defaults::n_val")]
    pub n_val: usize,
    #[serde(default = "defaults::n_test")]
    pub n_test: usize,
    /// P(attribute = label) in the training split; 0.9 makes the minority groups 10%.
    #[serde(default = "defaults::correlation")]
    pub correlation: f64,
    /// P(attribute = label) in validation and test; 0.5 makes every group equally common.
    #[serde(default = "defaults::eval_correlation")]
    pub eval_correlation: f64,
    #[serde(default = "defaults::core_noise")]
    pub core_noise: f64,
    #[serde(default = "defaults::spurious_noise")]
    pub spurious_noise: f64,
    /// Extra pure-noise features.
    #[serde(default)]
    pub noise_dims: usize,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Blobs {
    #[serde(default = "defaults::n_train")]
    pub n_train: usize,
    #[serde(default = "defaults::n_val")]
    pub n_val: usize,
    #[serde(default = "defaults::n_test")]
    pub n_test: usize,
    #[serde(default = "defaults::classes")]
    pub classes: usize,
    #[serde(default = "defaults::dim")]
    pub dim: usize,
    /// Standard deviation of each blob.
    #[serde(default = "defaults::spread")]
    pub spread: f64,
    #[serde(default)]
    pub seed: u64,
}

/// A model architecture.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum ModelConfig {
    /// A multilayer perceptron: linear layers of the given widths with an activation between.
    Mlp(Mlp),
    /// A small convolutional network for images: per entry of `channels`, a 3×3 convolution
    /// (padding 1), normalization, ReLU and 2×2 max-pooling; then a linear classifier.
    Cnn(Cnn),
    /// ResNet-18 with the CIFAR stem (3×3 first convolution, no max-pooling), global average
    /// pooling and a linear classifier; `norm: batch` (default) or `group`/`layer`.
    Resnet18(ResNet),
    /// WideResNet-depth-width (pre-activation blocks, e.g. WRN-16-4), `norm: batch` (default) or
    /// `group`.
    Wrn(Wrn),
    /// A TorchScript module exported from PyTorch (`torch.jit.script(model).save(path)`): your own
    /// architecture, trained or evaluated as it is. It gets each batch's inputs (images as
    /// `[B, C, H, W]`, other rows as `[B, D]`) and returns logits `[B, classes]`. Its parameters
    /// keep their PyTorch names in checkpoints and in `weights.safetensors`.
    Torchscript(TorchScript),
    /// A diffusion model for vectors: the input and a sinusoidal embedding of t (and a label
    /// embedding when conditional) through an MLP with SiLU; predicts ε (or v).
    TimeMlp(TimeMlp),
    /// A small UNet for images: per entry of `channels` a residual block (GroupNorm, SiLU, 3×3
    /// convolutions, the time and label embedding added), downsampling between levels, the
    /// mirror path up with skip connections; predicts ε (or v).
    Unet(Unet),
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TorchScript {
    pub path: FileRef,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimeMlp {
    #[serde(default = "defaults::time_mlp_hidden")]
    pub hidden: Vec<usize>,
    /// Width of the time (and label) embedding.
    #[serde(default = "defaults::time_dim")]
    pub time_dim: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Unet {
    /// Channels of each resolution level; the image is halved between levels.
    #[serde(default = "defaults::unet_channels")]
    pub channels: Vec<usize>,
    #[serde(default = "defaults::time_dim")]
    pub time_dim: usize,
}

impl ModelConfig {
    /// Whether this is a diffusion model (trained with `diffusion:`).
    pub fn is_diffusion(&self) -> bool {
        matches!(self, ModelConfig::TimeMlp(_) | ModelConfig::Unet(_))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResNet {
    #[serde(default = "defaults::cnn_norm")]
    pub norm: Norm,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Wrn {
    /// 6n + 4 layers (16, 22, 28, …).
    #[serde(default = "defaults::wrn_depth")]
    pub depth: usize,
    /// The widening factor k.
    #[serde(default = "defaults::wrn_width")]
    pub width: usize,
    #[serde(default = "defaults::cnn_norm")]
    pub norm: Norm,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cnn {
    #[serde(default = "defaults::channels")]
    pub channels: Vec<usize>,
    #[serde(default = "defaults::cnn_norm")]
    pub norm: Norm,
}

/// A normalization layer after each hidden linear layer or convolution.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    #[default]
    None,
    /// BatchNorm (momentum 0.1, eps 1e-5): batch statistics in training, running ones in
    /// evaluation.
    Batch,
    /// LayerNorm over the features (eps 1e-5); on images, over each channel map.
    Layer,
    /// GroupNorm (eps 1e-5) with the largest group count ≤ 32 that divides the channels.
    Group,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mlp {
    #[serde(default = "defaults::hidden")]
    pub hidden: Vec<usize>,
    #[serde(default)]
    pub activation: Activation,
    #[serde(default, skip_serializing_if = "is_no_norm")]
    pub norm: Norm,
}

fn is_no_norm(n: &Norm) -> bool {
    *n == Norm::None
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Relu,
    Tanh,
    Gelu,
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

impl JobConfig {
    /// The keys only `task: sample` uses, and whether each is set.
    fn sample_fields(&self) -> [(&'static str, bool); 3] {
        [
            ("sampler", self.sampler.is_some()),
            ("denoiser", self.denoiser.is_some()),
            ("samples", self.samples.is_some()),
        ]
    }

    /// The training options only `task: train` uses, and whether each is set.
    fn train_fields(&self) -> [(&'static str, bool); 7] {
        [
            ("augment", self.augment.is_some()),
            ("ema", self.ema.is_some()),
            ("schedule", !self.schedule.is_default()),
            ("clip_grad_norm", self.clip_grad_norm.is_some()),
            ("label_smoothing", self.label_smoothing != 0.0),
            ("init", self.init.is_some()),
            ("shuffle", !self.shuffle),
        ]
    }

    /// The files this job reads, with their config paths.
    pub fn files_mut(&mut self) -> Vec<(&'static str, &mut FileRef)> {
        let mut out = Vec::new();
        match &mut self.data {
            DataConfig::Npz(d) => out.push(("data.path", &mut d.path)),
            DataConfig::Csv(d) => out.push(("data.path", &mut d.path)),
            DataConfig::Cifar10(d) | DataConfig::Cifar100(d) | DataConfig::Idx(d) => {
                out.push(("data.path", &mut d.path))
            }
            _ => {}
        }
        if let Some(f) = &mut self.init {
            out.push(("init", f));
        }
        if let Some(ModelConfig::Torchscript(t)) = &mut self.model {
            out.push(("model.path", &mut t.path));
        }
        out
    }

    /// Checks the ranges that the types alone cannot express. Returns `(path, message)`.
    pub fn check(&self) -> Result<(), (String, String)> {
        let err = |p: &str, m: String| Err((p.to_string(), m));
        if self.task != Task::Noop && self.noop.is_some() {
            return err("noop", "belongs to `task: noop`".into());
        }
        if self.task != Task::Train {
            if let Some((k, _)) = self.train_fields().into_iter().find(|(_, set)| *set) {
                return err(k, "is a training option; it belongs to `task: train`".into());
            }
        }
        if self.epochs == 0 {
            return err("epochs", "must be at least 1".into());
        }
        if let Some(Err((k, m))) = self.ema.as_ref().map(Ema::check) {
            return err(&format!("ema.{k}"), m);
        }
        if self.batch_size == 0 {
            return err("batch_size", "must be at least 1".into());
        }
        let (n_train, n_test) = match &self.data {
            DataConfig::TwoMoons(d) => {
                if !(d.noise >= 0.0 && d.noise.is_finite()) {
                    return err("data.noise", format!("must be a finite number ≥ 0, got {}", d.noise));
                }
                (d.n_train, d.n_test)
            }
            DataConfig::Spurious(d) => {
                for (k, v) in [("correlation", d.correlation), ("eval_correlation", d.eval_correlation)] {
                    if !(0.0..=1.0).contains(&v) {
                        return err(&format!("data.{k}"), format!("is a probability, in [0, 1]; got {v}"));
                    }
                }
                for (k, v) in [("core_noise", d.core_noise), ("spurious_noise", d.spurious_noise)] {
                    if !(v >= 0.0 && v.is_finite()) {
                        return err(&format!("data.{k}"), format!("must be a finite number ≥ 0, got {v}"));
                    }
                }
                (d.n_train, d.n_test)
            }
            DataConfig::Blobs(d) => {
                if d.classes < 2 {
                    return err("data.classes", format!("must be at least 2, got {}", d.classes));
                }
                if d.dim == 0 {
                    return err("data.dim", "must be at least 1".into());
                }
                if !(d.spread > 0.0 && d.spread.is_finite()) {
                    return err("data.spread", format!("must be a finite number > 0, got {}", d.spread));
                }
                (d.n_train, d.n_test)
            }
            DataConfig::Digits(d) => {
                if d.n_val + d.n_test >= DIGITS_TOTAL {
                    return err(
                        "data.n_test",
                        format!(
                            "is too large: n_val + n_test = {} leaves no training images of the {DIGITS_TOTAL}",
                            d.n_val + d.n_test
                        ),
                    );
                }
                (DIGITS_TOTAL - d.n_val - d.n_test, d.n_test)
            }
            // The file's row count is checked by the worker, which reads it.
            DataConfig::Npz(d) => (1, d.n_test),
            DataConfig::Csv(d) => (1, d.n_test),
            // Split sizes come from the files.
            DataConfig::Cifar10(_) | DataConfig::Cifar100(_) | DataConfig::Idx(_) => (1, 1),
        };
        if n_train == 0 {
            return err("data.n_train", "must be at least 1".into());
        }
        if n_test == 0 {
            return err("data.n_test", "must be at least 1".into());
        }
        match self.task {
            Task::Train => {
                for (k, missing) in [("model", self.model.is_none()), ("optimizer", self.optimizer.is_none())] {
                    if missing {
                        return err(k, "is required by `task: train`".into());
                    }
                }
                let sample_batch = ("sample_batch", self.sample_batch.is_some());
                for (k, set) in self.sample_fields().into_iter().chain([sample_batch]) {
                    if set {
                        return err(k, "belongs to `task: sample`, not `task: train`".into());
                    }
                }
                if self.sharpness.is_some() {
                    return err("sharpness", "belongs to `task: evaluate` (of a trained parent)".into());
                }
                if self.guidance.is_some() {
                    return err("guidance", "belongs to `task: sample`".into());
                }
                let diffusion_model = self.model.as_ref().is_some_and(ModelConfig::is_diffusion);
                match (&self.diffusion, diffusion_model) {
                    (Some(_), false) => {
                        return err(
                            "model",
                            "must be a diffusion model (`time_mlp` or `unet`) when the job has `diffusion:`".into(),
                        )
                    }
                    (None, true) => {
                        return err("diffusion", "is required by a diffusion model (`time_mlp`, `unet`)".into())
                    }
                    _ => {}
                }
                if let Some(d) = &self.diffusion {
                    if let Err((k, m)) = d.noise().check() {
                        return err(&format!("diffusion.{k}"), m);
                    }
                    if !(0.0..1.0).contains(&d.p_uncond) {
                        return err("diffusion.p_uncond", format!("must be in [0, 1), got {}", d.p_uncond));
                    }
                    if d.p_uncond > 0.0 && !d.conditional {
                        return err("diffusion.p_uncond", "drops labels, so it needs `conditional: true`".into());
                    }
                    for (k, set) in [
                        ("step_rule", self.step_rule.is_some()),
                        ("objective", self.objective.is_some()),
                        ("augment", self.augment.is_some()),
                        ("label_smoothing", self.label_smoothing != 0.0),
                        ("precision", !self.precision.is_fp32()),
                    ] {
                        if set {
                            return err(k, "is not available to diffusion training".into());
                        }
                    }
                }
                if let Some(ls) = &self.loss_scale {
                    if self.precision != Precision::Fp16 {
                        return err(
                            "loss_scale",
                            "scales the loss of fp16 training; it needs `precision: fp16`".into(),
                        );
                    }
                    if !(ls.init > 0.0 && ls.init.is_finite()) {
                        return err("loss_scale.init", format!("must be a finite number > 0, got {}", ls.init));
                    }
                    if !(ls.growth_factor > 1.0 && ls.growth_factor.is_finite()) {
                        return err("loss_scale.growth_factor", format!("must be > 1, got {}", ls.growth_factor));
                    }
                    if !(ls.backoff_factor > 0.0 && ls.backoff_factor < 1.0) {
                        return err(
                            "loss_scale.backoff_factor",
                            format!("must be in (0, 1), got {}", ls.backoff_factor),
                        );
                    }
                    if ls.growth_interval == 0 {
                        return err("loss_scale.growth_interval", "must be at least 1".into());
                    }
                }
                if self.augment.is_some() && !self.data.is_image() {
                    return err("augment", "crops and flips images; this data is not images".into());
                }
                if let Some(c) = self.clip_grad_norm {
                    if !(c > 0.0 && c.is_finite()) {
                        return err("clip_grad_norm", format!("must be a finite number > 0, got {c}"));
                    }
                }
                if !(0.0..1.0).contains(&self.label_smoothing) {
                    return err("label_smoothing", format!("must be in [0, 1), got {}", self.label_smoothing));
                }
                match &self.schedule {
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
                        let lr = self.optimizer.as_ref().map_or(f64::INFINITY, OptimizerConfig::lr);
                        if !(c.min_lr >= 0.0 && c.min_lr <= lr) {
                            return err(
                                "schedule.min_lr",
                                format!("must be in [0, optimizer.lr = {lr}], got {}", c.min_lr),
                            );
                        }
                    }
                }
            }
            Task::Noop => {
                let sleep = self.noop.as_ref().map_or(0.0, |n| n.sleep_s);
                if !(sleep >= 0.0 && sleep.is_finite()) {
                    return err("noop.sleep_s", format!("must be a finite number ≥ 0, got {sleep}"));
                }
                return Ok(());
            }
            Task::Evaluate => {
                if let Some(sh) = &self.sharpness {
                    if sh.samples == 0 || sh.m == 0 || sh.power_iterations == 0 {
                        return err("sharpness", "samples, m and power_iterations must be at least 1".into());
                    }
                    if !(sh.rho > 0.0 && sh.rho.is_finite()) {
                        return err("sharpness.rho", format!("must be a finite number > 0, got {}", sh.rho));
                    }
                }
                return Ok(());
            }
            Task::Sample => {
                if !self.precision.is_fp32() {
                    return err(
                        "precision",
                        "applies to training and evaluating classifiers; sampling runs in fp32".into(),
                    );
                }
                for (k, set) in self.sample_fields() {
                    if !set {
                        return err(k, "is required by `task: sample`".into());
                    }
                }
                if self.samples == Some(0) {
                    return err("samples", "must be at least 1".into());
                }
                if self.sample_batch == Some(0) {
                    return err("sample_batch", "must be at least 1".into());
                }
                match &self.denoiser {
                    Some(DenoiserConfig::Exact(d)) => {
                        if let Err((k, m)) = d.check() {
                            return err(&format!("denoiser.{k}"), m);
                        }
                        if self.guidance.is_some() {
                            return err(
                                "guidance",
                                "needs a class-conditional model (`denoiser: {name: trained}`); the exact denoiser has no condition"
                                    .into(),
                            );
                        }
                    }
                    Some(DenoiserConfig::Trained(_)) => {}
                    None => unreachable!("checked above"),
                }
                return Ok(());
            }
        }
        match &self.model {
            Some(ModelConfig::Mlp(m)) => {
                if let Some(i) = m.hidden.iter().position(|&w| w == 0) {
                    return err(&format!("model.hidden[{i}]"), "a layer needs at least 1 unit".into());
                }
                if m.norm != Norm::None && m.hidden.is_empty() {
                    return err("model.norm", "normalizes hidden layers, and this MLP has none".into());
                }
            }
            Some(ModelConfig::Resnet18(_) | ModelConfig::Wrn(_)) if !self.data.is_image() => {
                return err(
                    "model",
                    "is an image model, which needs image data (digits, cifar10, cifar100, idx, or npz or csv with `image`)"
                        .into(),
                );
            }
            Some(ModelConfig::Wrn(w)) => {
                if w.depth < 10 || (w.depth - 4) % 6 != 0 {
                    return err("model.depth", format!("must be 6n + 4 (10, 16, 22, 28, …), got {}", w.depth));
                }
                if w.width == 0 {
                    return err("model.width", "must be at least 1".into());
                }
            }
            Some(ModelConfig::Resnet18(_)) => {}
            Some(ModelConfig::TimeMlp(m))
                if m.hidden.is_empty() || m.hidden.contains(&0) || m.time_dim < 2 || m.time_dim % 2 != 0 =>
            {
                return err(
                    "model",
                    "`time_mlp` needs at least one hidden layer, none of width 0, and an even time_dim ≥ 2".into(),
                );
            }
            Some(ModelConfig::TimeMlp(_)) => {}
            Some(ModelConfig::Torchscript(_)) => {}
            Some(ModelConfig::Unet(u)) => {
                let Some(image) = self.data.image_shape() else {
                    return err(
                        "model",
                        "is `unet`, which needs image data (digits, cifar10, cifar100, idx, or npz or csv with `image`)"
                            .into(),
                    );
                };
                let levels = u.channels.len();
                let step = 1usize << levels.saturating_sub(1);
                if levels == 0 || u.channels.contains(&0) || levels > 4 {
                    return err("model.channels", "lists 1 to 4 level widths, none 0".into());
                }
                if let Some([_, h, w]) = image {
                    if h % step != 0 || w % step != 0 {
                        return err(
                            "model.channels",
                            format!(
                                "{levels} levels halve the image {} times; {h}×{w} is not divisible by {step}",
                                levels - 1
                            ),
                        );
                    }
                }
                if u.time_dim < 2 || u.time_dim % 2 != 0 {
                    return err("model.time_dim", "must be even and at least 2".into());
                }
            }
            Some(ModelConfig::Cnn(c)) => {
                if !self.data.is_image() {
                    return err(
                        "model",
                        "is `cnn`, which needs image data (digits, cifar10, cifar100, idx, or npz or csv with `image`)"
                            .into(),
                    );
                }
                if c.channels.is_empty() || c.channels.len() > 3 {
                    return err(
                        "model.channels",
                        "lists 1 to 3 convolution widths (8×8 images halve each time)".into(),
                    );
                }
                if let Some(i) = c.channels.iter().position(|&w| w == 0) {
                    return err(&format!("model.channels[{i}]"), "a convolution needs at least 1 channel".into());
                }
            }
            None => {}
        }
        let Some(optimizer) = &self.optimizer else { return Ok(()) };
        let (lr, wd) = match optimizer {
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

mod defaults {
    pub fn yes() -> bool {
        true
    }

    pub fn time_mlp_hidden() -> Vec<usize> {
        vec![128, 128, 128]
    }

    pub fn time_dim() -> usize {
        32
    }

    pub fn unet_channels() -> Vec<usize> {
        vec![32, 64]
    }

    pub fn label_column() -> String {
        "label".into()
    }

    pub fn step_gamma() -> f64 {
        0.1
    }

    pub fn ema_decay() -> f64 {
        0.9999
    }
    pub fn one() -> f64 {
        1.0
    }
    pub fn ema_power() -> f64 {
        2.0 / 3.0
    }
    pub fn one_step() -> u64 {
        1
    }
    pub fn sharpness_samples() -> usize {
        512
    }
    pub fn power_iterations() -> u32 {
        20
    }
    pub fn sharpness_rho() -> f64 {
        0.05
    }
    pub fn sharpness_m() -> usize {
        128
    }
    pub fn digits_val() -> usize {
        300
    }
    pub fn digits_test() -> usize {
        497
    }
    pub fn wrn_depth() -> usize {
        16
    }
    pub fn wrn_width() -> usize {
        4
    }
    pub fn channels() -> Vec<usize> {
        vec![16, 32]
    }
    pub fn cnn_norm() -> super::Norm {
        super::Norm::Batch
    }
    pub fn epochs() -> u32 {
        10
    }
    pub fn batch_size() -> u32 {
        64
    }
    pub fn n_train() -> usize {
        1000
    }
    pub fn n_val() -> usize {
        200
    }
    pub fn n_test() -> usize {
        500
    }
    pub fn noise() -> f64 {
        0.1
    }
    pub fn classes() -> usize {
        3
    }
    pub fn dim() -> usize {
        2
    }
    pub fn correlation() -> f64 {
        0.9
    }
    pub fn eval_correlation() -> f64 {
        0.5
    }
    pub fn core_noise() -> f64 {
        1.0
    }
    pub fn spurious_noise() -> f64 {
        0.1
    }
    pub fn spread() -> f64 {
        1.0
    }
    pub fn timesteps() -> u32 {
        1000
    }
    pub fn beta_start() -> f64 {
        1e-4
    }
    pub fn beta_end() -> f64 {
        0.02
    }
    pub fn hidden() -> Vec<usize> {
        vec![64, 64]
    }
    pub fn sgd_lr() -> f64 {
        0.1
    }
    pub fn adam_lr() -> f64 {
        1e-3
    }
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.999
    }
    pub fn eps() -> f64 {
        1e-8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors(s: &Schedule, lr: f64, per_epoch: u64, epochs: u64) -> Vec<f64> {
        let total = per_epoch * epochs;
        (0..total).map(|step| s.factor(lr, step, step / per_epoch, total)).collect()
    }

    #[test]
    fn warmup_is_linear_then_the_main_schedule() {
        let s = Schedule::Constant(ConstantSchedule { warmup_steps: 4 });
        assert_eq!(factors(&s, 0.1, 3, 2), [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn step_multiplies_at_each_milestone_epoch() {
        let s = Schedule::Step(StepSchedule { milestones: vec![1, 3], gamma: 0.5, warmup_steps: 0 });
        assert_eq!(factors(&s, 0.1, 2, 4), [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]);
    }

    #[test]
    fn cosine_runs_from_one_to_the_floor_after_warmup() {
        let s = Schedule::Cosine(CosineSchedule { min_lr: 0.01, warmup_steps: 2 });
        let f = factors(&s, 0.1, 5, 2);
        assert_eq!(&f[..3], [0.5, 1.0, 1.0], "warmup, then the cosine starts at 1");
        // Step s ≥ 2 is at progress (s − 2)/8: the midpoint s = 6 is halfway between 1 and 0.1.
        assert!((f[6] - 0.55).abs() < 1e-12, "{f:?}");
        assert!(f.windows(2).skip(2).all(|w| w[1] < w[0]));
        assert!((s.factor(0.1, 10, 2, 10) - 0.1).abs() < 1e-12, "past T it stays at the floor");
    }
}
