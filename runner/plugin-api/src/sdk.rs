//! The safe side of the boundary that plugin authors write against: implement [`Component`] and
//! one of [`StepRule`], [`BatchTransform`], [`Objective`] or [`Sampler`], then list the types in
//! [`export_plugin!`](crate::export_plugin). No `unsafe` is needed in a plugin.

use crate::abi::{self, ComponentKind, RStr, Sink, Status};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::c_void;
use tch::Tensor;
pub use xlab_proto::plugins::{ParamSpec, ParamType};

/// An error a component reports; it fails the job with this message.
#[derive(Debug, Clone)]
pub struct PluginError(pub String);

impl<E: std::fmt::Display> From<E> for PluginError {
    fn from(e: E) -> Self {
        PluginError(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, PluginError>;

/// Declares a parameter: `param("rho", ParamType::Float, 0.05, "radius")`.
/// The schema of a parameter struct, written by `#[derive(Params)]` from its fields, their doc
/// comments and `#[param(default = ..., min = ..., max = ..., choices = [...])]` attributes.
pub trait ParamList {
    fn param_specs() -> Vec<ParamSpec>;
}

pub fn param(name: &str, ty: ParamType, default: impl Into<serde_json::Value>, doc: &str) -> ParamSpec {
    ParamSpec {
        name: name.into(),
        ty,
        default: default.into(),
        doc: doc.into(),
        min: None,
        max: None,
        choices: vec![],
        added_later: false,
    }
}

/// What the host tells every component before training starts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    pub num_classes: i64,
    pub n_train: u64,
    /// Training-set size of each group, when the data has groups.
    #[serde(default)]
    pub group_counts: Vec<u64>,
    /// Labels of the training examples, by example index.
    #[serde(default)]
    pub train_labels: Vec<i64>,
    /// Group ids of the training examples, by example index (empty without groups).
    #[serde(default)]
    pub train_groups: Vec<i64>,
    /// Domain ids of the training examples, by example index (empty without domains).
    #[serde(default)]
    pub train_domains: Vec<i64>,
    pub epochs: u64,
    /// Optimizer steps in an epoch that visits every example once.
    pub steps_per_epoch: u64,
    pub seed: u64,
    /// The finished jobs this job depends on (`needs:`), with their run folders; e.g.
    /// [`xlab_proto::artifacts::read_train_errors`] reads what a training parent left there.
    #[serde(default)]
    pub parents: Vec<xlab_proto::ParentRef>,
    /// For image data: (channels, height, width) of each input row, which arrives flattened.
    #[serde(default)]
    pub image: Option<[i64; 3]>,
}

/// A component's checkpointable state: JSON plus named tensors.
#[derive(Debug, Default)]
pub struct State {
    pub json: serde_json::Value,
    pub tensors: BTreeMap<String, Tensor>,
}

/// What every component has: an id, a parameter schema, and (if stateful) state.
pub trait Component: Sized + 'static {
    const KIND: ComponentKind;
    /// Stable id, `family.variant`.
    const ID: &'static str;
    const SUMMARY: &'static str;
    /// Paper and reference implementation.
    const REFERENCE: &'static str;
    const PASSES_PER_STEP: u32 = 1;
    /// Set when the component keeps state that must survive a resume.
    const STATEFUL: bool = false;
    /// Set when the component draws random numbers (always from the host's seeded stream).
    const RANDOM: bool = false;
    /// Set by a batch transform of diffusion training (see `abi::flags::NOISE`).
    const NOISE_TRANSFORM: bool = false;
    /// Set by a batch transform that queries the model (`Batch::model`; see
    /// `abi::flags::MODEL`).
    const QUERIES_MODEL: bool = false;
    /// Set by a sampler that maps data to noise (see `abi::flags::INVERTS`).
    const INVERTS: bool = false;
    /// Set by a sampler that combines conditional and unconditional predictions itself
    /// (`DenoiserCtx::eps_both`; see `abi::flags::GUIDES`).
    const GUIDES: bool = false;
    /// The parameters, deserialized from the checked JSON the host passes; their schema comes
    /// from the same struct's `#[derive(Params)]`.
    type Params: DeserializeOwned + ParamList;

    /// The declared parameters: names, types, defaults, ranges, choices and docs.
    fn params() -> Vec<ParamSpec> {
        <Self::Params as ParamList>::param_specs()
    }
    fn new(params: Self::Params) -> Result<Self>;
    fn setup(&mut self, _info: &RunInfo) -> Result<()> {
        Ok(())
    }
    fn on_epoch(&mut self, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// Stateless components keep the default: an empty state.
    fn save_state(&self) -> Result<State> {
        Ok(State::default())
    }
    fn load_state(&mut self, _state: State) -> Result<()> {
        Ok(())
    }
}

/// The host's seeded random stream, with the draws methods need.
pub struct HostRng<'a> {
    rng: &'a abi::Rng,
}

impl HostRng<'_> {
    pub fn next_u64(&mut self) -> u64 {
        // SAFETY: the host guarantees the callback and its context are valid during the call.
        unsafe { (self.rng.next_u64)(self.rng.ctx) }
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in 0..n (n > 0), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// A uniformly random permutation of 0..n (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut p: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Gamma(shape, 1) by Marsaglia and Tsang (with the shape < 1 boost).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = self.uniform();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = self.uniform();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Beta(a, b) as X/(X+Y) with X ~ Gamma(a), Y ~ Gamma(b).
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        x / (x + y)
    }
}

/// A trainable parameter as a step rule sees it: a reference to the host's tensor.
pub struct Param {
    pub tensor: Tensor,
    pub name: String,
    pub tags: u32,
}

impl Param {
    pub fn has_tag(&self, tag: u32) -> bool {
        self.tags & tag != 0
    }
}

/// The host as a step rule drives it.
pub struct StepCtx<'a> {
    host: &'a abi::StepHost,
}

fn call_with_err(f: impl FnOnce(*const Sink) -> Status) -> Result<()> {
    let mut msg = Vec::<u8>::new();
    let sink = vec_sink(&mut msg);
    match f(&sink) {
        Status::Ok => Ok(()),
        s => Err(PluginError(format!("host call failed ({s:?}): {}", String::from_utf8_lossy(&msg)))),
    }
}

impl StepCtx<'_> {
    /// Zero grads, forward, loss, backward at the current weights; returns the loss.
    pub fn forward_backward(&mut self) -> Result<f64> {
        let mut out = abi::PassOut::default();
        // SAFETY: host callbacks are valid for the duration of the step call.
        call_with_err(|err| unsafe { (self.host.forward_backward)(self.host.ctx, &mut out, err) })?;
        Ok(out.loss)
    }

    /// As [`Self::forward_backward`] on rows `lo..hi` of the batch (their mean loss).
    pub fn forward_backward_rows(&mut self, lo: u64, hi: u64) -> Result<f64> {
        let mut out = abi::PassOut::default();
        // SAFETY: host callbacks are valid for the duration of the step call.
        call_with_err(|err| unsafe { (self.host.forward_backward_rows)(self.host.ctx, lo, hi, &mut out, err) })?;
        Ok(out.loss)
    }

    /// Rows in the current batch.
    pub fn batch_size(&self) -> u64 {
        self.host.batch_size
    }

    /// The trainable parameters (new references to the host's tensors).
    pub fn params(&mut self) -> Result<Vec<Param>> {
        // SAFETY: as above.
        let n = unsafe { (self.host.n_params)(self.host.ctx) };
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut p = abi::ParamRef { tensor: std::ptr::null_mut(), name: RStr::from_static(""), tags: 0 };
            // SAFETY: as above; the handle is borrowed, so we take our own reference.
            let st = unsafe { (self.host.param)(self.host.ctx, i, &mut p) };
            if st != Status::Ok || p.tensor.is_null() {
                return Err(PluginError(format!("host has no parameter {i}")));
            }
            // SAFETY: a valid borrowed handle; clone_from_ptr makes an owned shallow copy.
            let tensor = unsafe { Tensor::clone_from_ptr(p.tensor.cast()) };
            // SAFETY: the host's name string lives as long as the parameter.
            let name = unsafe { p.name.as_str() }.map_err(PluginError::from)?.to_string();
            out.push(Param { tensor, name, tags: p.tags });
        }
        Ok(out)
    }

    /// The base optimizer's step with the gradients now in `.grad`.
    pub fn optimizer_step(&mut self) -> Result<()> {
        // SAFETY: as above.
        call_with_err(|err| unsafe { (self.host.optimizer_step)(self.host.ctx, err) })
    }

    /// Freeze (or unfreeze) the running statistics of normalization layers for extra passes.
    pub fn freeze_norm_stats(&mut self, frozen: bool) {
        // SAFETY: as above.
        unsafe { (self.host.freeze_norm_stats)(self.host.ctx, frozen) }
    }

    pub fn rng(&mut self) -> HostRng<'_> {
        HostRng { rng: &self.host.rng }
    }

    pub fn log(&mut self, name: &str, value: f64) {
        // SAFETY: as above.
        unsafe { (self.host.log_metric)(self.host.ctx, RStr::borrowed(name), value) }
    }

    pub fn epoch(&self) -> u64 {
        self.host.epoch
    }

    pub fn step(&self) -> u64 {
        self.host.step
    }
}

/// Owns the update of one optimizer step.
pub trait StepRule: Component {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()>;
}

/// A batch handed to a transform.
pub struct Batch<'a> {
    pub x: Tensor,
    pub y: Tensor,
    pub group: Option<Tensor>,
    pub domain: Option<Tensor>,
    pub index: Tensor,
    pub num_classes: i64,
    /// The model, for a transform that declares `QUERIES_MODEL`; `None` where the host runs none.
    pub model: Option<ModelHost<'a>>,
}

/// The model as a batch transform may query it (see [`abi::TransformHost`]).
pub struct ModelHost<'a> {
    host: &'a abi::TransformHost,
}

impl ModelHost<'_> {
    /// ∂L/∂x for the batch's inputs, L = `weight` · mean cross-entropy of the model's logits
    /// with the batch's labels, at the step's weights. `train`: training mode (normalization
    /// layers use and update batch statistics). `keep`: the parameter gradient of L joins every
    /// pass of this step's update; otherwise it is discarded.
    pub fn input_grad(&self, weight: f64, train: bool, keep: bool) -> Result<Tensor> {
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the host is valid during the transform call; it writes an owned handle.
        call_with_err(|err| unsafe { (self.host.input_grad)(self.host.ctx, weight, train, keep, &mut out, err) })?;
        owned(out, "input gradient")
    }

    /// The validation split through the model in evaluation mode: penultimate features
    /// `[N, d]`, predicted classes `[N]` and labels `[N]`.
    pub fn validation(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let mut outs: [*mut c_void; 3] = [std::ptr::null_mut(); 3];
        let [f, p, l] = &mut outs;
        // SAFETY: the host is valid during the transform call; it writes owned handles.
        call_with_err(|err| unsafe { (self.host.validation)(self.host.ctx, f, p, l, err) })?;
        let [f, p, l] = outs.map(|o| {
            // SAFETY: owned handles from the host (null only on failure, checked above).
            (!o.is_null()).then(|| unsafe { Tensor::from_ptr(o.cast()) })
        });
        match (f, p, l) {
            (Some(f), Some(p), Some(l)) => Ok((f, p, l)),
            _ => Err(PluginError("the host returned an incomplete validation pass".into())),
        }
    }

    /// The classifier head's logits for `features` `[M, d]`, in evaluation mode.
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        self.tensor_to_tensor(self.host.head, features, "logits")
    }

    /// The inputs of the training examples `index` `[M]`, as the model takes them.
    pub fn rows(&self, index: &Tensor) -> Result<Tensor> {
        self.tensor_to_tensor(self.host.rows, index, "rows")
    }

    /// A host callback that takes one borrowed tensor and writes one owned tensor.
    fn tensor_to_tensor(&self, f: abi::TensorToTensor, input: &Tensor, what: &str) -> Result<Tensor> {
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the handle is borrowed for the call; the host writes an owned handle.
        call_with_err(|err| unsafe { f(self.host.ctx, input.as_ptr() as *mut c_void, &mut out, err) })?;
        owned(out, what)
    }

    /// Makes the returned batch mix in feature space: row r's logits become
    /// head(μ_r·f(x_r) + (1−μ_r)·f(partner_r)); `index` names the training examples of the
    /// returned rows.
    pub fn feature_mix(&self, partner: &Tensor, mu: &Tensor, index: &Tensor) -> Result<()> {
        let h = |t: &Tensor| t.as_ptr() as *mut c_void;
        // SAFETY: the handles are borrowed for the call.
        call_with_err(|err| unsafe { (self.host.feature_mix)(self.host.ctx, h(partner), h(mu), h(index), err) })
    }
}

/// An owned handle the host wrote, or an error naming what was missing.
fn owned(p: *mut c_void, what: &str) -> Result<Tensor> {
    if p.is_null() {
        return Err(PluginError(format!("the host returned no {what}")));
    }
    // SAFETY: an owned handle from the host.
    Ok(unsafe { Tensor::from_ptr(p.cast()) })
}

/// A rewritten batch: inputs and soft targets `[B', C]`, with B' = B or k·B (k blocks of the
/// batch's examples, in order).
pub struct Transformed {
    pub x: Tensor,
    pub target: Tensor,
}

pub trait BatchTransform: Component {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed>;
}

/// Inputs of an objective.
pub struct ObjectiveInput {
    /// Per-example losses with gradient.
    pub losses: Tensor,
    pub correct: Tensor,
    pub group: Option<Tensor>,
    pub index: Tensor,
    /// The model's logits `[B, C]`, with gradient, when the host provides them (xlab's worker
    /// always does).
    pub logits: Option<Tensor>,
    /// True on the first pass of a step; state updates happen only then.
    pub first_pass: bool,
}

pub struct ObjectiveCtx<'a> {
    host: &'a abi::ObjectiveHost,
}

impl ObjectiveCtx<'_> {
    pub fn log(&mut self, name: &str, value: f64) {
        // SAFETY: the host's callback is valid during the call.
        unsafe { (self.host.log_metric)(self.host.ctx, RStr::borrowed(name), value) }
    }

    /// The model's variables (parameters and buffers), named, in the host's fixed order;
    /// empty when the host has no model. The tensors are the host's own (shallow references).
    pub fn model_state(&mut self) -> Result<Vec<(String, Tensor)>> {
        // SAFETY: host callbacks are valid during the objective call.
        let n = unsafe { (self.host.n_model_state)(self.host.ctx) };
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut p = abi::ParamRef { tensor: std::ptr::null_mut(), name: RStr::from_static(""), tags: 0 };
            // SAFETY: as above; the handle is borrowed, so we take our own reference.
            let st = unsafe { (self.host.model_state)(self.host.ctx, i, &mut p) };
            if st != Status::Ok || p.tensor.is_null() {
                return Err(PluginError(format!("host has no model variable {i}")));
            }
            let tensor = unsafe { Tensor::clone_from_ptr(p.tensor.cast()) };
            // SAFETY: the name lives as long as the call.
            let name = unsafe { p.name.as_str() }.map_err(PluginError::from)?.to_string();
            out.push((name, tensor));
        }
        Ok(out)
    }

    /// Logits for this pass's inputs from the model with `vars` (one per variable of
    /// [`Self::model_state`], in order) in its place: evaluation mode, no gradient.
    pub fn forward_with(&mut self, vars: &[Tensor]) -> Result<Tensor> {
        let handles: Vec<*mut c_void> = vars.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the handles are borrowed for the call; the host writes an owned handle.
        call_with_err(|err| unsafe {
            (self.host.forward_with)(self.host.ctx, handles.as_ptr(), handles.len(), &mut out, err)
        })?;
        owned(out, "logits")
    }
}

pub trait Objective: Component {
    fn loss(&mut self, input: ObjectiveInput, ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor>;

    /// Which training examples `epoch` visits. The default keeps the host's uniform shuffle.
    fn sampling(&mut self, _epoch: u64) -> Result<Sampling> {
        Ok(Sampling::Uniform)
    }
}

/// How an epoch's training examples are chosen (one entry per training example, by index).
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Every example once, shuffled.
    Uniform,
    /// As many draws as examples, with replacement, in proportion to the weights.
    Weighted(Vec<f64>),
    /// Example i exactly `counts[i]` times, the whole multiset shuffled (upsampling,
    /// subsampling).
    Repeat(Vec<u32>),
}

impl Sampling {
    /// The epoch's size: how many examples it visits.
    pub fn len(&self, n: usize) -> usize {
        match self {
            Sampling::Uniform | Sampling::Weighted(_) => n,
            Sampling::Repeat(c) => c.iter().map(|&k| k as usize).sum(),
        }
    }

    /// Checks the entries against the training-set size `n`.
    pub fn check(&self, n: usize) -> std::result::Result<(), String> {
        match self {
            Sampling::Uniform => Ok(()),
            Sampling::Weighted(w) if w.len() != n => {
                Err(format!("{} sampling weights for {n} training examples", w.len()))
            }
            Sampling::Weighted(w) => {
                if w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
                    Err("sampling weights must be finite, ≥ 0 and not all 0".into())
                } else {
                    Ok(())
                }
            }
            Sampling::Repeat(c) if c.len() != n => Err(format!("{} repeat counts for {n} training examples", c.len())),
            Sampling::Repeat(c) if c.iter().all(|&k| k == 0) => {
                Err("repeat counts are all 0: the epoch is empty".into())
            }
            Sampling::Repeat(_) => Ok(()),
        }
    }
}

/// The denoiser as a sampler sees it.
pub struct DenoiserCtx<'a> {
    host: &'a abi::Denoiser,
    nfe: u64,
}

impl DenoiserCtx<'_> {
    /// The training examples the denoiser stands for, when the host gives them.
    pub fn data(&self) -> Option<Tensor> {
        opt_tensor(self.host.data)
    }

    /// ε̂(x, t); counts one evaluation.
    pub fn eps(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        let mut x = x.shallow_clone();
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the host's callback is valid during the call; `x` outlives it.
        call_with_err(|err| unsafe { (self.host.eps)(self.host.ctx, x.as_mut_ptr().cast(), t, &mut out, err) })?;
        if out.is_null() {
            return Err(PluginError("the denoiser returned no tensor".into()));
        }
        self.nfe += 1;
        // SAFETY: an owned handle handed over by the host.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    /// ε̂ with the sample's condition and with the null label at (x, t), from one batched
    /// pass; counts two evaluations. An error when the model takes no condition.
    pub fn eps_both(&mut self, x: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
        let mut x = x.shallow_clone();
        let (mut cond, mut uncond): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: the host's callback is valid during the call; `x` outlives it.
        call_with_err(|err| unsafe {
            (self.host.eps_both)(self.host.ctx, x.as_mut_ptr().cast(), t, &mut cond, &mut uncond, err)
        })?;
        if cond.is_null() || uncond.is_null() {
            return Err(PluginError("the denoiser returned no tensor".into()));
        }
        self.nfe += 2;
        // SAFETY: owned handles handed over by the host.
        Ok(unsafe { (Tensor::from_ptr(cond.cast()), Tensor::from_ptr(uncond.cast())) })
    }

    /// ᾱ_t for t = 0..T−1 (float64).
    pub fn alphas_cumprod(&self) -> Tensor {
        // SAFETY: a borrowed handle valid during the call; we take our own reference.
        unsafe { Tensor::clone_from_ptr(self.host.alphas_cumprod.cast()) }
    }

    /// Counts evaluations of a score the sampler computes itself (from `data`), which go into
    /// the reported NFE like the denoiser's.
    pub fn count_evaluations(&mut self, n: u64) {
        self.nfe += n;
    }

    pub fn nfe(&self) -> u64 {
        self.nfe
    }
}

pub trait Sampler: Component {
    /// Turns standard normal noise into samples.
    fn sample(&mut self, noise: Tensor, denoiser: &mut DenoiserCtx<'_>, rng: &mut HostRng<'_>) -> Result<Tensor>;
}

/// A guidance rule (classifier-free guidance and its variants). The host calls `setup` before
/// each sampling run, then `guide` at every evaluation of the sampler.
pub trait Guidance: Component {
    /// The prediction the sampler sees, from the conditional one and (when the previous call
    /// asked for it; always at the first call) the unconditional one; and whether the next
    /// evaluation needs the unconditional prediction.
    fn guide(&mut self, eps_cond: Tensor, eps_uncond: Option<Tensor>) -> Result<(Tensor, bool)>;
}

/// An attention guidance (Normalized Attention Guidance): inside every cross-attention layer of
/// the denoiser, the output from the attention over the positive condition's tokens (Z⁺) and over
/// the negative one's (Z⁻), for the rows the sample asks for. The host calls `setup` before each
/// sampling run.
pub trait AttentionGuidance: Component {
    /// The layer's attention output `[B, N, C]` at training timestep `t` (of `0..=t_max`), or
    /// `None` to keep Z⁺ (outside the guidance's time window, say).
    fn attend(&mut self, z_pos: Tensor, z_neg: Tensor, t: f64, t_max: f64) -> Result<Option<Tensor>>;
}

// ---------------------------------------------------------------------------------------------
// Glue: generic extern "C" functions that wrap the safe traits. Used by `export_plugin!`.

/// A sink that appends to a `Vec<u8>`.
pub fn vec_sink(v: &mut Vec<u8>) -> Sink {
    unsafe extern "C" fn write(ctx: *mut c_void, ptr: *const u8, len: usize) {
        if len == 0 {
            return;
        }
        // SAFETY: ctx is the &mut Vec<u8> given below; ptr/len are a valid byte range.
        unsafe { (*(ctx as *mut Vec<u8>)).extend_from_slice(std::slice::from_raw_parts(ptr, len)) }
    }
    Sink { ctx: (v as *mut Vec<u8>).cast(), write }
}

fn write_sink(sink: *const Sink, bytes: &[u8]) {
    if sink.is_null() {
        return;
    }
    // SAFETY: the caller passes a valid sink for the duration of the call.
    unsafe { ((*sink).write)((*sink).ctx, bytes.as_ptr(), bytes.len()) }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

/// Runs `f`, turning errors and panics into a status and a message.
fn guard(err: *const Sink, f: impl FnOnce() -> Result<()>) -> Status {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => Status::Ok,
        Ok(Err(PluginError(m))) => {
            write_sink(err, m.as_bytes());
            Status::Error
        }
        Err(p) => {
            write_sink(err, format!("panicked: {}", panic_message(p.as_ref())).as_bytes());
            Status::Panic
        }
    }
}

/// # Safety
/// `obj` must come from `create::<T>`.
unsafe fn obj<'a, T>(obj: *mut c_void) -> &'a mut T {
    // SAFETY: guaranteed by the caller.
    unsafe { &mut *(obj as *mut T) }
}

fn opt_tensor(p: *mut c_void) -> Option<Tensor> {
    // SAFETY: non-null handles passed in are valid and borrowed.
    (!p.is_null()).then(|| unsafe { Tensor::clone_from_ptr(p.cast()) })
}

fn give(t: Tensor) -> *mut c_void {
    // Hand over ownership of a fresh handle; the receiver frees it with `Tensor::from_ptr`.
    let mut t = t.shallow_clone();
    let p = t.as_mut_ptr();
    std::mem::forget(t);
    p.cast()
}

pub mod glue {
    //! Not for plugin authors: the generic C entry points behind `export_plugin!`.
    //!
    //! # Safety
    //! Every `unsafe extern "C"` function here is called only by the host, through a plugin's
    //! manifest, with the pointers the ABI in [`crate::abi`] specifies: `o` from this component's
    //! own `create`, and every other pointer valid for the duration of the call.
    #![allow(clippy::missing_safety_doc)]
    use super::*;

    pub unsafe extern "C" fn create<T: Component>(params: RStr, out: *mut *mut c_void, err: *const Sink) -> Status {
        guard(err, || {
            // SAFETY: the host passes a valid string.
            let text = unsafe { params.as_str() }?;
            let p: T::Params =
                serde_json::from_str(text).map_err(|e| PluginError(format!("{}: parameters: {e}", T::ID)))?;
            let boxed = Box::new(T::new(p)?);
            // SAFETY: out is a valid out-pointer.
            unsafe { *out = Box::into_raw(boxed).cast() };
            Ok(())
        })
    }

    pub unsafe extern "C" fn destroy<T: Component>(o: *mut c_void) {
        if !o.is_null() {
            let _ = std::panic::catch_unwind(|| {
                // SAFETY: created by create::<T> and destroyed once.
                drop(unsafe { Box::from_raw(o as *mut T) })
            });
        }
    }

    pub unsafe extern "C" fn setup<T: Component>(o: *mut c_void, info: RStr, err: *const Sink) -> Status {
        guard(err, || {
            // SAFETY: valid string from the host.
            let info: RunInfo = serde_json::from_str(unsafe { info.as_str() }?)?;
            // SAFETY: o comes from create::<T>.
            unsafe { obj::<T>(o) }.setup(&info)
        })
    }

    pub unsafe extern "C" fn on_epoch<T: Component>(o: *mut c_void, epoch: u64, err: *const Sink) -> Status {
        // SAFETY: o comes from create::<T>.
        guard(err, || unsafe { obj::<T>(o) }.on_epoch(epoch))
    }

    pub unsafe extern "C" fn save_state<T: Component>(
        o: *mut c_void,
        out: *const abi::StateOut,
        err: *const Sink,
    ) -> Status {
        guard(err, || {
            // SAFETY: o comes from create::<T>; out is valid during the call.
            let state = unsafe { obj::<T>(o) }.save_state()?;
            let out = unsafe { &*out };
            write_sink(&out.json, serde_json::to_string(&state.json)?.as_bytes());
            for (name, mut t) in state.tensors {
                // SAFETY: the callback borrows the handle for the duration of the call.
                unsafe { (out.tensor)(out.ctx, RStr::borrowed(&name), t.as_mut_ptr().cast()) };
            }
            Ok(())
        })
    }

    pub unsafe extern "C" fn load_state<T: Component>(
        o: *mut c_void,
        st: *const abi::StateIn,
        err: *const Sink,
    ) -> Status {
        guard(err, || {
            // SAFETY: st is valid during the call; its arrays hold n_tensors entries.
            let st = unsafe { &*st };
            let text = unsafe { st.json.as_str() }?;
            let json = if text.is_empty() { serde_json::Value::Null } else { serde_json::from_str(text)? };
            let mut tensors = BTreeMap::new();
            for i in 0..st.n_tensors {
                // SAFETY: as above.
                let name = unsafe { (*st.names.add(i)).as_str() }?.to_string();
                let t = unsafe { Tensor::clone_from_ptr((*st.tensors.add(i)).cast()) };
                tensors.insert(name, t);
            }
            // SAFETY: o comes from create::<T>.
            unsafe { obj::<T>(o) }.load_state(State { json, tensors })
        })
    }

    pub unsafe extern "C" fn step<T: StepRule>(o: *mut c_void, host: *const abi::StepHost, err: *const Sink) -> Status {
        guard(err, || {
            // SAFETY: host is valid during the call; o comes from create::<T>.
            let mut ctx = StepCtx { host: unsafe { &*host } };
            unsafe { obj::<T>(o) }.step(&mut ctx)
        })
    }

    pub unsafe extern "C" fn transform<T: BatchTransform>(
        o: *mut c_void,
        io: *mut abi::BatchIo,
        rng: *const abi::Rng,
        err: *const Sink,
    ) -> Status {
        guard(err, || {
            // SAFETY: io and rng are valid during the call; input handles are borrowed.
            let io = unsafe { &mut *io };
            let batch = Batch {
                x: opt_tensor(io.x).ok_or_else(|| PluginError("no inputs".into()))?,
                y: opt_tensor(io.y).ok_or_else(|| PluginError("no labels".into()))?,
                group: opt_tensor(io.group),
                domain: opt_tensor(io.domain),
                index: opt_tensor(io.index).ok_or_else(|| PluginError("no indices".into()))?,
                num_classes: io.num_classes,
                // SAFETY: a non-null host is valid during the call.
                model: (!io.host.is_null()).then(|| ModelHost { host: unsafe { &*io.host } }),
            };
            let mut rng = HostRng { rng: unsafe { &*rng } };
            let out = unsafe { obj::<T>(o) }.transform(batch, &mut rng)?;
            io.x_out = give(out.x);
            io.target_out = give(out.target);
            Ok(())
        })
    }

    pub unsafe extern "C" fn objective<T: Objective>(
        o: *mut c_void,
        io: *mut abi::ObjectiveIo,
        host: *const abi::ObjectiveHost,
        err: *const Sink,
    ) -> Status {
        guard(err, || {
            // SAFETY: io and host are valid during the call; input handles are borrowed.
            let io = unsafe { &mut *io };
            let host = unsafe { &*host };
            let input = ObjectiveInput {
                losses: opt_tensor(io.losses).ok_or_else(|| PluginError("no losses".into()))?,
                correct: opt_tensor(io.correct).ok_or_else(|| PluginError("no correctness".into()))?,
                group: opt_tensor(io.group),
                index: opt_tensor(io.index).ok_or_else(|| PluginError("no indices".into()))?,
                logits: opt_tensor(io.logits),
                first_pass: host.first_pass,
            };
            let mut ctx = ObjectiveCtx { host };
            let loss = unsafe { obj::<T>(o) }.loss(input, &mut ctx)?;
            io.loss_out = give(loss);
            Ok(())
        })
    }

    pub unsafe extern "C" fn epoch_sampling<T: Objective>(
        o: *mut c_void,
        epoch: u64,
        out: *mut f64,
        n: usize,
        mode: *mut u32,
        err: *const Sink,
    ) -> Status {
        guard(err, || {
            // SAFETY: o comes from create::<T>; out holds n f64s and mode is valid (host-owned).
            let s = unsafe { obj::<T>(o) }.sampling(epoch)?;
            unsafe { *mode = abi::sampling::UNIFORM };
            s.check(n).map_err(|m| PluginError(format!("{}: {m}", T::ID)))?;
            let out = unsafe { std::slice::from_raw_parts_mut(out, n) };
            let m = match s {
                Sampling::Uniform => abi::sampling::UNIFORM,
                Sampling::Weighted(w) => {
                    out.copy_from_slice(&w);
                    abi::sampling::WEIGHTED
                }
                Sampling::Repeat(c) => {
                    out.iter_mut().zip(&c).for_each(|(o, k)| *o = f64::from(*k));
                    abi::sampling::REPEAT
                }
            };
            unsafe { *mode = m };
            Ok(())
        })
    }

    pub unsafe extern "C" fn sample<T: Sampler>(
        o: *mut c_void,
        io: *mut abi::SampleIo,
        den: *const abi::Denoiser,
        rng: *const abi::Rng,
        err: *const Sink,
    ) -> Status {
        guard(err, || {
            // SAFETY: all pointers are valid during the call; the noise handle is borrowed.
            let io = unsafe { &mut *io };
            let noise = opt_tensor(io.noise).ok_or_else(|| PluginError("no noise".into()))?;
            let mut d = DenoiserCtx { host: unsafe { &*den }, nfe: 0 };
            let mut rng = HostRng { rng: unsafe { &*rng } };
            let x = unsafe { obj::<T>(o) }.sample(noise, &mut d, &mut rng)?;
            io.nfe = d.nfe;
            io.x_out = give(x);
            Ok(())
        })
    }

    pub unsafe extern "C" fn guide<T: Guidance>(o: *mut c_void, io: *mut abi::GuideIo, err: *const Sink) -> Status {
        guard(err, || {
            // SAFETY: io is valid during the call; its input handles are borrowed.
            let io = unsafe { &mut *io };
            let cond = opt_tensor(io.eps_cond).ok_or_else(|| PluginError("no conditional prediction".into()))?;
            let uncond = opt_tensor(io.eps_uncond);
            let (eps, next) = unsafe { obj::<T>(o) }.guide(cond, uncond)?;
            io.need_uncond_next = next;
            io.eps_out = give(eps);
            Ok(())
        })
    }

    pub unsafe extern "C" fn attend<T: AttentionGuidance>(
        o: *mut c_void,
        io: *mut abi::AttendIo,
        err: *const Sink,
    ) -> Status {
        guard(err, || {
            // SAFETY: io is valid during the call; its input handles are borrowed.
            let io = unsafe { &mut *io };
            let pos = opt_tensor(io.z_pos).ok_or_else(|| PluginError("no positive attention output".into()))?;
            let neg = opt_tensor(io.z_neg).ok_or_else(|| PluginError("no negative attention output".into()))?;
            if let Some(z) = unsafe { obj::<T>(o) }.attend(pos, neg, io.t, io.t_max)? {
                io.z_out = give(z);
            }
            Ok(())
        })
    }

    /// Owned strings behind a component's declaration (the manifest points into them).
    pub struct DeclStrings {
        pub params_json: String,
    }

    fn decl_base<T: Component>(strings: &'static DeclStrings) -> abi::ComponentDecl {
        let mut flags = 0;
        if T::STATEFUL {
            flags |= abi::flags::STATEFUL;
        }
        if T::RANDOM {
            flags |= abi::flags::RANDOM;
        }
        if T::QUERIES_MODEL {
            flags |= abi::flags::MODEL;
        }
        if T::NOISE_TRANSFORM {
            flags |= abi::flags::NOISE;
        }
        if T::INVERTS {
            flags |= abi::flags::INVERTS;
        }
        if T::GUIDES {
            flags |= abi::flags::GUIDES;
        }
        abi::ComponentDecl {
            kind: T::KIND as u32,
            id: RStr::from_static(T::ID),
            summary: RStr::from_static(T::SUMMARY),
            reference: RStr::from_static(T::REFERENCE),
            params_json: RStr::from_static(strings.params_json.as_str()),
            passes_per_step: T::PASSES_PER_STEP,
            flags,
            create: create::<T>,
            destroy: destroy::<T>,
            setup: setup::<T>,
            on_epoch: on_epoch::<T>,
            save_state: save_state::<T>,
            load_state: load_state::<T>,
            step: None,
            transform: None,
            objective: None,
            sample: None,
            guide: None,
            attend: None,
            epoch_sampling: None,
        }
    }

    fn strings<T: Component>() -> &'static DeclStrings {
        let params_json = serde_json::to_string(&T::params()).expect("parameter specs serialize");
        Box::leak(Box::new(DeclStrings { params_json }))
    }

    pub fn step_rule<T: StepRule>() -> abi::ComponentDecl {
        abi::ComponentDecl { step: Some(step::<T>), ..decl_base::<T>(strings::<T>()) }
    }

    pub fn batch_transform<T: BatchTransform>() -> abi::ComponentDecl {
        abi::ComponentDecl { transform: Some(transform::<T>), ..decl_base::<T>(strings::<T>()) }
    }

    pub fn objective_decl<T: Objective>() -> abi::ComponentDecl {
        abi::ComponentDecl {
            objective: Some(objective::<T>),
            epoch_sampling: Some(epoch_sampling::<T>),
            ..decl_base::<T>(strings::<T>())
        }
    }

    pub fn sampler<T: Sampler>() -> abi::ComponentDecl {
        abi::ComponentDecl { sample: Some(sample::<T>), ..decl_base::<T>(strings::<T>()) }
    }

    pub fn guidance<T: Guidance>() -> abi::ComponentDecl {
        abi::ComponentDecl { guide: Some(guide::<T>), ..decl_base::<T>(strings::<T>()) }
    }

    pub fn attention<T: AttentionGuidance>() -> abi::ComponentDecl {
        abi::ComponentDecl { attend: Some(attend::<T>), ..decl_base::<T>(strings::<T>()) }
    }

    /// Builds the static manifest once; the entry point returns a pointer to it.
    pub fn manifest(
        id: &'static str,
        version: &'static str,
        decls: Vec<abi::ComponentDecl>,
    ) -> &'static abi::PluginManifest {
        let decls: &'static [abi::ComponentDecl] = Box::leak(decls.into_boxed_slice());
        Box::leak(Box::new(abi::PluginManifest {
            abi_version: abi::ABI_VERSION,
            plugin_id: RStr::from_static(id),
            layout_hash: abi::LAYOUT_HASH,
            plugin_version: RStr::from_static(version),
            torch_version: RStr::from_static(abi::TORCH_VERSION),
            components: decls.as_ptr(),
            n_components: decls.len(),
        }))
    }
}

/// Exports a plugin: its id, version and components.
///
/// ```ignore
/// xlab_plugin_api::export_plugin! {
///     id: "sam",
///     version: env!("CARGO_PKG_VERSION"),
///     step_rules: [Sam],
///     batch_transforms: [],
///     objectives: [],
///     samplers: [],
///     guidances: [], // optional
///     attentions: [], // optional
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (
        id: $id:expr,
        version: $version:expr,
        step_rules: [$($s:ty),* $(,)?],
        batch_transforms: [$($b:ty),* $(,)?],
        objectives: [$($o:ty),* $(,)?],
        samplers: [$($x:ty),* $(,)?]
        $(, guidances: [$($g:ty),* $(,)?])?
        $(, attentions: [$($a:ty),* $(,)?])? $(,)?
    ) => {
        /// The plugin's entry point, read by the xlab worker.
        #[no_mangle]
        pub extern "C" fn xlab_plugin_manifest_v1() -> *const $crate::abi::PluginManifest {
            static MANIFEST: ::std::sync::OnceLock<usize> = ::std::sync::OnceLock::new();
            let addr = *MANIFEST.get_or_init(|| {
                ::std::panic::catch_unwind(|| {
                    let decls = vec![
                        $($crate::sdk::glue::step_rule::<$s>(),)*
                        $($crate::sdk::glue::batch_transform::<$b>(),)*
                        $($crate::sdk::glue::objective_decl::<$o>(),)*
                        $($crate::sdk::glue::sampler::<$x>(),)*
                        $($($crate::sdk::glue::guidance::<$g>(),)*)?
                        $($($crate::sdk::glue::attention::<$a>(),)*)?
                    ];
                    $crate::sdk::glue::manifest($id, $version, decls) as *const _ as usize
                })
                .unwrap_or(0)
            });
            addr as *const $crate::abi::PluginManifest
        }
    };
}
