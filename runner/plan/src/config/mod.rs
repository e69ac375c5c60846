//! The typed, validated config of one job.
//!
//! A job's config is the experiment's `defaults` deep-merged with its stage and its sweep point.
//! It is checked here against closed types with `deny_unknown_fields`, and the *resolved* form
//! (every default filled in) is what the job's identity hashes and what the worker receives. So
//! writing a default explicitly, or leaving it out, names the same job.
//!
//! One module per domain holds its types and their checks: `data`, `model`, `training`
//! (optimizer, schedule, precision) and `diffusion`; this one holds the job config that
//! gathers them, the task rules and the checks across domains.

mod data;
mod diffusion;
mod model;
mod training;

pub use data::*;
pub use diffusion::*;
pub use model::*;
pub use training::*;

use serde::{Deserialize, Serialize};

/// What a stage does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Train a model and evaluate it on the validation and test splits after every epoch.
    Train,
    /// Draw samples with a sampler component from a denoiser.
    Sample,
    /// Map held-out data rows to noise with an inverting sampler (`diffusion.ddim_inverse`)
    /// and, with `reconstruct:`, back to data: the latents' statistics and the round trip's
    /// error.
    Invert,
    /// Evaluate the final weights of the parent job(s) (`needs:`) on this stage's data; with
    /// several parents (`select: all`), their averaged predictive distribution (an ensemble).
    Evaluate,
    /// Nothing but what `noop:` says (sleep, then succeed or fail a chosen way): for measuring
    /// the scheduler and for exercising its failure handling.
    Noop,
}

impl Task {
    /// The name a file gives the task.
    pub fn name(self) -> &'static str {
        match self {
            Task::Train => "train",
            Task::Sample => "sample",
            Task::Invert => "invert",
            Task::Evaluate => "evaluate",
            Task::Noop => "noop",
        }
    }
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
    /// Stream this many metric rows (steps) before finishing, as fast as the coordinator takes
    /// them: a load for benchmarks of ingestion and of reading a store during a run.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub log_steps: u64,
    /// Values per streamed row (`m0`, `m1`, …).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub log_metrics: u64,
    /// At most this many rows a second (0: as fast as the coordinator takes them).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub log_rows_per_s: u64,
}

fn is_zero_u64(x: &u64) -> bool {
    *x == 0
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
    /// `invert`: a sampler that maps the latents back to data (e.g. `{use: diffusion.ddim,
    /// steps: 50, clip_sample: false}`), to measure how well the inversion round-trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconstruct: Option<ComponentUse>,
    /// `sample`, with a trained denoiser whose model is class-conditional: how the conditional
    /// and unconditional predictions combine (e.g. `{use: diffusion.cfg, guidance_scale: 3}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<ComponentUse>,
    /// `sample`, with a trained UNet with `cross_attention`: a guidance inside its cross-attention
    /// layers that steers away from the `negative` class (e.g. `{use: diffusion.nag, scale: 5}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<ComponentUse>,
    /// `sample`, with a class-conditional model: the class each sample asks for: `cycle` (sample
    /// i asks for class i mod K, the default), `none` (the null label: unconditional samples), a
    /// class, or a list of classes cycled through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<SampleLabels>,
    /// `sample`, with a class-conditional model: the negative condition, a class. It stands in
    /// for the null label in guidance's unconditional prediction (a negative prompt), and is
    /// what an `attention` guidance steers away from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative: Option<u32>,
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
    /// `train` (classifiers and diffusion models), `evaluate`, and `sample`/`invert` with a trained
    /// denoiser: run the network's forward pass under libtorch's autocast in `bf16` or `fp16`
    /// (CPU or CUDA): matrix products and convolutions in the half type, reductions and the loss
    /// in fp32. Weights, gradients and optimizer state stay in fp32. `fp16` training scales the
    /// loss dynamically (`loss_scale`). Part of the identity.
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

pub(crate) fn is_false(b: &bool) -> bool {
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
    ("reconstruct", "sampler"),
    ("attention", "attention"),
];

impl JobConfig {
    /// The components the job uses, by slot name.
    pub fn components(&self) -> Vec<(&'static str, &ComponentUse)> {
        let slots = [
            &self.step_rule,
            &self.batch_transform,
            &self.objective,
            &self.sampler,
            &self.guidance,
            &self.reconstruct,
            &self.attention,
        ];
        COMPONENT_SLOTS.iter().zip(slots).filter_map(|((slot, _), c)| c.as_ref().map(|c| (*slot, c))).collect()
    }

    pub fn components_mut(&mut self) -> Vec<(&'static str, &mut ComponentUse)> {
        let slots = [
            &mut self.step_rule,
            &mut self.batch_transform,
            &mut self.objective,
            &mut self.sampler,
            &mut self.guidance,
            &mut self.reconstruct,
            &mut self.attention,
        ];
        COMPONENT_SLOTS.iter().zip(slots).filter_map(|((slot, _), c)| c.as_mut().map(|c| (*slot, c))).collect()
    }
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
            DataConfig::ImageFolder(d) => out.push(("data.path", &mut d.path)),
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
        if self.task != Task::Train && self.loss_scale.is_some() {
            return err("loss_scale", "scales the loss of fp16 training; it belongs to `task: train`".into());
        }

        if self.task != Task::Invert && self.reconstruct.is_some() {
            return err("reconstruct", "maps inverted latents back to data; it belongs to `task: invert`".into());
        }
        if self.task != Task::Sample {
            for (k, set) in [
                ("attention", self.attention.is_some()),
                ("labels", self.labels.is_some()),
                ("negative", self.negative.is_some()),
            ] {
                if set {
                    let why = if self.task == Task::Invert {
                        "belongs to `task: sample`; an inversion queries a conditional model with each row's own label"
                    } else {
                        "belongs to `task: sample`"
                    };
                    return err(k, why.into());
                }
            }
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
        self.data.check()?;
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
                // A TorchScript module is a denoiser under `diffusion:`, a classifier without.
                let script = matches!(self.model, Some(ModelConfig::Torchscript(_)));
                match (&self.diffusion, diffusion_model) {
                    (Some(_), false) if !script => {
                        return err(
                            "model",
                            "must be a diffusion model (`time_mlp`, `unet`, or a `torchscript` denoiser) when the job \
                             has `diffusion:`"
                                .into(),
                        )
                    }
                    (None, true) => {
                        return err("diffusion", "is required by a diffusion model (`time_mlp`, `unet`)".into())
                    }
                    _ => {}
                }
                if let Some(d) = &self.diffusion {
                    d.check()?;
                    if let Some(ModelConfig::Unet(Unet { cross_attention: Some(_), .. })) = &self.model {
                        if !d.conditional {
                            return err(
                                "model.cross_attention",
                                "attends over the class's tokens, and this model is unconditional; add \
                                 `diffusion: {conditional: true, p_uncond: 0.1}` or drop `cross_attention`"
                                    .into(),
                            );
                        }
                    }
                    for (k, set) in [
                        ("step_rule", self.step_rule.is_some()),
                        ("objective", self.objective.is_some()),
                        ("augment", self.augment.is_some()),
                        ("label_smoothing", self.label_smoothing != 0.0),
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
                    ls.check()?;
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
                let lr = self.optimizer.as_ref().map_or(f64::INFINITY, OptimizerConfig::lr);
                self.schedule.check(lr)?;
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
            Task::Sample | Task::Invert => {
                if !self.precision.is_fp32() && !matches!(self.denoiser, Some(DenoiserConfig::Trained(_))) {
                    return err(
                        "precision",
                        "runs a trained denoiser's network under autocast; the exact denoiser computes in float64"
                            .into(),
                    );
                }
                for (k, set) in self.sample_fields() {
                    // An inversion takes every held-out row unless `samples` caps them.
                    let optional = k == "samples" && self.task == Task::Invert;
                    if !set && !optional {
                        return err(k, format!("is required by `task: {}`", self.task.name()));
                    }
                }
                if self.task == Task::Invert && self.guidance.is_some() {
                    return err(
                        "guidance",
                        "belongs to `task: sample`; an inversion queries a conditional model with each row's own label"
                            .into(),
                    );
                }
                if self.samples == Some(0) {
                    return err("samples", "must be at least 1".into());
                }
                if let (Some(a), None) = (&self.attention, self.negative) {
                    return err(
                        "attention",
                        format!(
                            "names `{}`, which steers away from a negative condition, and this job names none; add \
                             `negative: CLASS`",
                            a.id
                        ),
                    );
                }
                if self.sample_batch == Some(0) {
                    return err("sample_batch", "must be at least 1".into());
                }
                match &self.denoiser {
                    Some(DenoiserConfig::Exact(d)) => {
                        if let Err((k, m)) = d.check() {
                            return err(&format!("denoiser.{k}"), m);
                        }
                        for (k, set) in [
                            ("guidance", self.guidance.is_some()),
                            ("attention", self.attention.is_some()),
                            ("labels", self.labels.is_some()),
                            ("negative", self.negative.is_some()),
                        ] {
                            if set {
                                return err(
                                    k,
                                    "needs a class-conditional model (`denoiser: {name: trained}`); the exact denoiser has no condition"
                                        .into(),
                                );
                            }
                        }
                    }
                    Some(DenoiserConfig::Trained(_)) => {}
                    None => unreachable!("checked above"),
                }
                return Ok(());
            }
        }
        if let Some(model) = &self.model {
            model.check(&self.data)?;
        }
        match &self.optimizer {
            Some(optimizer) => optimizer.check(),
            None => Ok(()),
        }
    }
}

mod defaults {
    pub fn three() -> usize {
        3
    }

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

    pub fn cross_attention_tokens() -> usize {
        4
    }

    pub fn cross_attention_heads() -> usize {
        1
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
