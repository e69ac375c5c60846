//! The C ABI between the xlab worker (host) and plugin libraries. Everything here is
//! `#[repr(C)]`; nothing Rust-specific (trait objects, `String`, `tch::Tensor`) crosses.
//!
//! - A plugin exports one symbol, [`ENTRY_SYMBOL`], of type [`EntryFn`], returning a pointer to
//!   a static [`PluginManifest`].
//! - Strings cross as borrowed [`RStr`] (UTF-8, not NUL-terminated). Anything a callee produces
//!   (messages, JSON state) is written into a caller-provided [`Sink`], so no allocation is ever
//!   freed by the other side's allocator.
//! - Tensors cross as libtorch handles (`at::Tensor*`, `*mut c_void` here). A handle passed *in*
//!   is borrowed: the callee takes its own reference (`Tensor::clone_from_ptr`). A handle passed
//!   *out* through an out-pointer is owned by the receiver (`Tensor::from_ptr`). Host and plugin
//!   share one libtorch in the process, so autograd and in-place updates work across the line.
//! - Every function returns a [`Status`] code; on failure a message is written to the error sink.
//!   Plugin functions catch panics and report them as [`Status::Panic`].
//! - Every type here is declared through `abi_struct!`, which also records its layout (size,
//!   alignment, each field's name, type and offset). [`LAYOUT_HASH`] digests all of them with
//!   the constants both sides must agree on; a plugin carries the hash it was built with in its
//!   manifest and the loader compares it, so a layout change that forgot to bump
//!   [`ABI_VERSION`] still refuses old plugins instead of reading the wrong bytes, and the test
//!   `layout_is_pinned_to_the_version` fails until the version is bumped.

use std::ffi::c_void;

/// Bumped on any incompatible change to the types in this module. v5: the manifest carries
/// [`LAYOUT_HASH`]. v6: [`Denoiser::eps_both`] and the `INVERTS` and `GUIDES` flags. v7: attention
/// guidance ([`ComponentKind::Attention`], [`ComponentDecl::attend`], [`AttendIo`]).
pub const ABI_VERSION: u32 = 7;

/// The layout of one `#[repr(C)]` type that crosses the boundary.
pub struct TypeLayout {
    pub name: &'static str,
    pub size: usize,
    pub align: usize,
    pub fields: &'static [FieldLayout],
}

/// One field of a [`TypeLayout`]: its name, its type as written, its offset.
pub struct FieldLayout {
    pub name: &'static str,
    pub ty: &'static str,
    pub offset: usize,
}

/// Declares a function-pointer type of the ABI and `$text`, its text for [`LAYOUT_HASH`].
macro_rules! abi_alias {
    ($(#[$meta:meta])* pub type $name:ident = $ty:ty; text: $text:ident) => {
        $(#[$meta])*
        pub type $name = $ty;
        const $text: (&str, &str) = (stringify!($name), stringify!($ty));
    };
}

/// Declares a `#[repr(C)]` struct of the ABI and its [`TypeLayout`] as `Self::LAYOUT`.
macro_rules! abi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty ),*
        }

        impl $name {
            /// This type's layout, part of [`LAYOUT_HASH`].
            pub const LAYOUT: TypeLayout = TypeLayout {
                name: stringify!($name),
                size: std::mem::size_of::<$name>(),
                align: std::mem::align_of::<$name>(),
                fields: &[$(FieldLayout {
                    name: stringify!($field),
                    ty: stringify!($ty),
                    offset: std::mem::offset_of!($name, $field),
                }),*],
            };
        }
    };
}

/// The exported entry point's name (NUL-terminated for `dlsym`).
pub const ENTRY_SYMBOL: &[u8] = b"xlab_plugin_manifest_v1\0";

/// The libtorch version the SDK builds plugins against (tch 0.24 ↔ torch 2.11.0).
pub const TORCH_VERSION: &str = "2.11.0";

abi_alias! {
    pub type EntryFn = unsafe extern "C" fn() -> *const PluginManifest;
    text: ENTRY_FN
}

abi_struct! {
    /// A borrowed UTF-8 string.
    #[derive(Clone, Copy)]
    pub struct RStr {
        pub ptr: *const u8,
        pub len: usize,
    }
}

impl RStr {
    pub const fn from_static(s: &'static str) -> RStr {
        RStr { ptr: s.as_ptr(), len: s.len() }
    }

    pub fn borrowed(s: &str) -> RStr {
        RStr { ptr: s.as_ptr(), len: s.len() }
    }

    /// # Safety
    /// `ptr` must point to `len` readable bytes that live for `'a`.
    pub unsafe fn as_str<'a>(self) -> Result<&'a str, std::str::Utf8Error> {
        if self.len == 0 {
            return Ok("");
        }
        // SAFETY: guaranteed by the caller.
        std::str::from_utf8(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }
}

abi_struct! {
    /// Somewhere to write bytes: the writer calls `write` any number of times.
    pub struct Sink {
        pub ctx: *mut c_void,
        pub write: unsafe extern "C" fn(ctx: *mut c_void, ptr: *const u8, len: usize),
    }
}

/// Result codes.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    /// The component reported an error (message in the error sink).
    Error = 1,
    /// The component panicked (message in the error sink).
    Panic = 2,
    /// The component does not implement this call.
    Unsupported = 3,
}

/// What a component is.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    /// Owns the update of one optimizer step (SAM family).
    StepRule = 1,
    /// Rewrites a batch and its targets (mixup family).
    BatchTransform = 2,
    /// Turns per-example losses into the training loss (DRO family).
    Objective = 3,
    /// Draws samples from a denoiser (diffusion family).
    Sampler = 4,
    /// Combines a conditional and an unconditional prediction while sampling (classifier-free
    /// guidance and its variants).
    Guidance = 5,
    /// Changes the output of a denoiser's cross-attention layers while sampling, from the
    /// attention over the positive condition's tokens and over the negative one's (Normalized
    /// Attention Guidance).
    Attention = 6,
}

impl ComponentKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::StepRule,
            2 => Self::BatchTransform,
            3 => Self::Objective,
            4 => Self::Sampler,
            5 => Self::Guidance,
            6 => Self::Attention,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::StepRule => "step_rule",
            Self::BatchTransform => "batch_transform",
            Self::Objective => "objective",
            Self::Sampler => "sampler",
            Self::Guidance => "guidance",
            Self::Attention => "attention",
        }
    }
}

/// Capability flags of a component.
pub mod flags {
    /// Keeps state that must be checkpointed (`save_state`/`load_state` are meaningful).
    pub const STATEFUL: u64 = 1;
    /// Draws random numbers (from the host's seeded generator only).
    pub const RANDOM: u64 = 1 << 1;
    /// A batch transform of diffusion training: its inputs are the drawn noise ε `[B, ...]` (the
    /// labels as usual) and it returns the noise that forms x_t and the regression target, both
    /// shaped like ε.
    pub const NOISE: u64 = 1 << 2;
    /// A batch transform that queries the model through `BatchIo::host` ([`TransformHost`]): its
    /// input gradient (saliency-guided mixing), the validation split's features and predictions,
    /// the classifier head, training rows, feature mixing (SelMix).
    pub const MODEL: u64 = 1 << 3;
    /// A sampler that maps data to noise (DDIM inversion): its `noise` input holds data rows
    /// and it returns their latents. `task: invert` runs it; `task: sample` refuses it.
    pub const INVERTS: u64 = 1 << 4;
    /// A sampler that combines the conditional and unconditional predictions itself
    /// (`Denoiser::eps_both`), as classifier-free guidance as a predictor-corrector does: it
    /// needs a class-conditional model trained with label dropout and takes no guidance.
    pub const GUIDES: u64 = 1 << 5;
}

abi_struct! {
    /// The static description of a plugin library.
    ///
    /// `abi_version` and `plugin_id` open the manifest in every version of the ABI, so a plugin
    /// built for another one can still be refused by name.
    pub struct PluginManifest {
        pub abi_version: u32,
        pub plugin_id: RStr,
        /// The [`LAYOUT_HASH`] of the SDK the plugin was built with.
        pub layout_hash: u64,
        pub plugin_version: RStr,
        pub torch_version: RStr,
        pub components: *const ComponentDecl,
        pub n_components: usize,
    }
}

// SAFETY: a manifest is immutable static data (pointers into the library's read-only memory).
unsafe impl Sync for PluginManifest {}
// SAFETY: as above.
unsafe impl Sync for ComponentDecl {}

abi_struct! {
    /// One component and its function table.
    pub struct ComponentDecl {
        pub kind: u32,
        /// `family.variant`, e.g. `sam.sam`.
        pub id: RStr,
        /// One-line description.
        pub summary: RStr,
        /// The paper and reference implementation it follows.
        pub reference: RStr,
        /// JSON array of parameters: `{name, type, default, doc, min?, max?, choices?}`.
        pub params_json: RStr,
        pub passes_per_step: u32,
        pub flags: u64,
        /// Creates an instance from its JSON parameters (every declared parameter present).
        pub create: unsafe extern "C" fn(params: RStr, out: *mut *mut c_void, err: *const Sink) -> Status,
        pub destroy: unsafe extern "C" fn(obj: *mut c_void),
        /// Called once before training with a JSON object describing the run (see `RunInfo`).
        pub setup: unsafe extern "C" fn(obj: *mut c_void, info: RStr, err: *const Sink) -> Status,
        /// Called at the start of every epoch (0-based).
        pub on_epoch: unsafe extern "C" fn(obj: *mut c_void, epoch: u64, err: *const Sink) -> Status,
        /// Writes the component's state: JSON into `json`, tensors through `tensors`.
        pub save_state: unsafe extern "C" fn(obj: *mut c_void, out: *const StateOut, err: *const Sink) -> Status,
        pub load_state: unsafe extern "C" fn(obj: *mut c_void, state: *const StateIn, err: *const Sink) -> Status,
        pub step: Option<unsafe extern "C" fn(obj: *mut c_void, host: *const StepHost, err: *const Sink) -> Status>,
        pub transform:
            Option<unsafe extern "C" fn(obj: *mut c_void, io: *mut BatchIo, rng: *const Rng, err: *const Sink) -> Status>,
        pub objective: Option<
            unsafe extern "C" fn(
                obj: *mut c_void,
                io: *mut ObjectiveIo,
                host: *const ObjectiveHost,
                err: *const Sink,
            ) -> Status,
        >,
        pub sample: Option<
            unsafe extern "C" fn(
                obj: *mut c_void,
                io: *mut SampleIo,
                host: *const Denoiser,
                rng: *const Rng,
                err: *const Sink,
            ) -> Status,
        >,
        /// Guidance only: combines one evaluation's conditional and unconditional predictions.
        pub guide: Option<unsafe extern "C" fn(obj: *mut c_void, io: *mut GuideIo, err: *const Sink) -> Status>,
        /// Attention guidance only: one cross-attention layer's output from the two attentions.
        pub attend: Option<unsafe extern "C" fn(obj: *mut c_void, io: *mut AttendIo, err: *const Sink) -> Status>,
        /// Objectives only: called at the start of every epoch to choose which training examples
        /// the epoch visits. The component writes `n` numbers into `out` (one per training example,
        /// by index) and sets `*mode` to one of [`sampling`]'s values; leaving it at
        /// [`sampling::UNIFORM`] keeps the host's uniform shuffle.
        pub epoch_sampling: Option<
            unsafe extern "C" fn(
                obj: *mut c_void,
                epoch: u64,
                out: *mut f64,
                n: usize,
                mode: *mut u32,
                err: *const Sink,
            ) -> Status,
        >,
    }
}

/// How an epoch's examples are chosen (`ComponentDecl::epoch_sampling`).
pub mod sampling {
    /// Every example once, in the host's seeded shuffle.
    pub const UNIFORM: u32 = 0;
    /// `n` draws with replacement, example i with probability `out[i] / Σ out`.
    pub const WEIGHTED: u32 = 1;
    /// Example i appears exactly `out[i]` times (a non-negative integer); the multiset is
    /// shuffled with the host's seeded shuffle.
    pub const REPEAT: u32 = 2;
}

abi_struct! {
    /// Where a component writes its state.
    pub struct StateOut {
        pub json: Sink,
        pub ctx: *mut c_void,
        /// Hands over a named tensor; the handle stays owned by the caller of `tensor` (borrowed).
        pub tensor: unsafe extern "C" fn(ctx: *mut c_void, name: RStr, t: *mut c_void),
    }
}

abi_struct! {
    /// A component's saved state, for `load_state`.
    pub struct StateIn {
        pub json: RStr,
        pub n_tensors: usize,
        pub names: *const RStr,
        /// Borrowed handles.
        pub tensors: *const *mut c_void,
    }
}

abi_struct! {
    /// The host's seeded random stream.
    pub struct Rng {
        pub ctx: *mut c_void,
        pub next_u64: unsafe extern "C" fn(ctx: *mut c_void) -> u64,
    }
}

abi_struct! {
    /// One trainable parameter, borrowed.
    pub struct ParamRef {
        pub tensor: *mut c_void,
        /// PyTorch-style name, e.g. `layers.0.weight`.
        pub name: RStr,
        /// Bit set of [`tags`].
        pub tags: u32,
    }
}

/// Parameter roles, for methods that treat them differently.
pub mod tags {
    pub const WEIGHT: u32 = 1;
    pub const BIAS: u32 = 1 << 1;
    /// A normalization layer's affine parameter (BatchNorm, LayerNorm, GroupNorm).
    pub const NORM: u32 = 1 << 2;
    pub const EMBEDDING: u32 = 1 << 3;
}

abi_struct! {
    /// What the host reports about one forward/backward pass.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PassOut {
        /// The training loss of the pass.
        pub loss: f64,
    }
}

abi_struct! {
    /// The callbacks a step rule drives the model with.
    pub struct StepHost {
        pub ctx: *mut c_void,
        /// Zeroes the gradients, runs forward and loss on the current batch at the current weights,
        /// then backward, leaving the gradient in every parameter's `.grad`. The first pass of a
        /// step is the one whose loss and accuracy the host reports.
        pub forward_backward: unsafe extern "C" fn(ctx: *mut c_void, out: *mut PassOut, err: *const Sink) -> Status,
        pub n_params: unsafe extern "C" fn(ctx: *mut c_void) -> usize,
        pub param: unsafe extern "C" fn(ctx: *mut c_void, i: usize, out: *mut ParamRef) -> Status,
        /// Applies the base optimizer (SGD, AdamW, ...) using the gradients now in `.grad`.
        pub optimizer_step: unsafe extern "C" fn(ctx: *mut c_void, err: *const Sink) -> Status,
        /// While frozen, normalization layers normalize with batch statistics but do not update
        /// their running statistics (the "BN bypass" of extra passes).
        pub freeze_norm_stats: unsafe extern "C" fn(ctx: *mut c_void, frozen: bool),
        pub rng: Rng,
        pub log_metric: unsafe extern "C" fn(ctx: *mut c_void, name: RStr, value: f64),
        /// Rows in the current batch.
        pub batch_size: u64,
        /// As `forward_backward`, on rows `lo..hi` of the batch only (the loss is their mean).
        /// Each row's first pass in a step is the one the host reports.
        pub forward_backward_rows:
            unsafe extern "C" fn(ctx: *mut c_void, lo: u64, hi: u64, out: *mut PassOut, err: *const Sink) -> Status,
        /// 0-based epoch and global step.
        pub epoch: u64,
        pub step: u64,
    }
}

abi_struct! {
    /// A batch to rewrite. Inputs are borrowed; outputs are owned by the host once written.
    pub struct BatchIo {
        pub x: *mut c_void,
        /// Integer class labels, shape `[B]`.
        pub y: *mut c_void,
        /// Group ids `[B]`, or null when the data has none.
        pub group: *mut c_void,
        /// Domain ids `[B]`, or null.
        pub domain: *mut c_void,
        /// Example indices into the training set `[B]`.
        pub index: *mut c_void,
        pub num_classes: i64,
        /// The new inputs `[B', ...]`: B' = B, or k·B for a transform that returns each example
        /// k times in blocks (row r stands for example r mod B: RegMixup's `[x; x̃]`).
        pub x_out: *mut c_void,
        /// Soft targets `[B', num_classes]` (rows sum to 1); the host's loss is the soft-target
        /// cross-entropy, and its accuracy the target mass on the predicted class.
        pub target_out: *mut c_void,
        /// What the transform may ask of the model, borrowed for the call; null when the host runs
        /// no model here (the conformance kit's plain batches, diffusion noise).
        pub host: *const TransformHost,
    }
}

abi_alias! {
    /// A host callback from one borrowed tensor to one owned tensor written to `out`.
    pub type TensorToTensor =
        unsafe extern "C" fn(ctx: *mut c_void, input: *mut c_void, out: *mut *mut c_void, err: *const Sink) -> Status;
    text: TENSOR_TO_TENSOR
}

abi_struct! {
    /// The model, as a batch transform may query it before it rewrites the batch.
    pub struct TransformHost {
        pub ctx: *mut c_void,
        /// Runs the model at the step's weights on the batch's inputs `x` with its labels `y` and
        /// writes an owned handle to ∂L/∂x, shaped like `x`, where
        /// L = `weight` · mean over the batch of the cross-entropy of f(x) with y.
        /// `train`: the model in training mode (normalization layers use and update batch
        /// statistics), else in evaluation mode. `keep`: the parameter gradient of L is added to the
        /// gradient of every pass of this step (a clean-loss term of the update); otherwise it is
        /// discarded.
        pub input_grad: unsafe extern "C" fn(
            ctx: *mut c_void,
            weight: f64,
            train: bool,
            keep: bool,
            out: *mut *mut c_void,
            err: *const Sink,
        ) -> Status,
        /// The validation split through the model in evaluation mode: writes owned handles to the
        /// penultimate features `[N, d]` (the classifier head's input), the predicted classes `[N]`
        /// and the labels `[N]` (int64). An error when the data has no validation split or the
        /// model no separate head.
        pub validation: unsafe extern "C" fn(
            ctx: *mut c_void,
            features: *mut *mut c_void,
            pred: *mut *mut c_void,
            labels: *mut *mut c_void,
            err: *const Sink,
        ) -> Status,
        /// The classifier head on features `[M, d]` (borrowed), in evaluation mode and without
        /// gradient: writes an owned handle to the logits `[M, C]`.
        pub head: TensorToTensor,
        /// The training examples with indices `index` `[M]` (int64, borrowed): writes an owned
        /// handle to their inputs `[M, ...]` as the model takes them (without augmentation).
        pub rows: TensorToTensor,
        /// Declares that the batch the transform returns mixes in feature space: row r's logits are
        /// head(μ_r·f(x_r) + (1−μ_r)·f(partner_r)), both feature passes with BatchNorm frozen at its
        /// running statistics; `index` `[B']` names the training examples of the returned rows,
        /// whose labels and groups the host's statistics then follow. All borrowed.
        pub feature_mix: unsafe extern "C" fn(
            ctx: *mut c_void,
            partner: *mut c_void,
            mu: *mut c_void,
            index: *mut c_void,
            err: *const Sink,
        ) -> Status,
    }
}

abi_struct! {
    /// Per-example losses to turn into the training loss.
    pub struct ObjectiveIo {
        /// Per-example losses `[B]`, with gradient.
        pub losses: *mut c_void,
        /// Per-example correctness `[B]` (1.0 or 0.0; expected correctness under soft targets).
        pub correct: *mut c_void,
        pub group: *mut c_void,
        pub index: *mut c_void,
        /// The model's logits `[B, C]` for the batch, with gradient (null if the host has none).
        pub logits: *mut c_void,
        /// The training loss, a scalar with gradient (owned by the host once written).
        pub loss_out: *mut c_void,
    }
}

abi_struct! {
    /// What an objective may ask of the host.
    pub struct ObjectiveHost {
        pub ctx: *mut c_void,
        pub log_metric: unsafe extern "C" fn(ctx: *mut c_void, name: RStr, value: f64),
        /// Whether this is the first pass of the step (objectives update their state only then).
        pub first_pass: bool,
        /// Number of the model's variables (parameters and buffers such as running statistics), in
        /// a fixed order; 0 when the host has no model.
        pub n_model_state: unsafe extern "C" fn(ctx: *mut c_void) -> usize,
        /// Variable `i`: a borrowed handle and its name (valid during the objective call).
        pub model_state: unsafe extern "C" fn(ctx: *mut c_void, i: usize, out: *mut ParamRef) -> Status,
        /// Logits for this pass's inputs from the model with the `n` given tensors (one per
        /// variable, in order) in place of its variables, in evaluation mode and without gradient
        /// (an EMA teacher, say). Writes an owned handle.
        pub forward_with: unsafe extern "C" fn(
            ctx: *mut c_void,
            tensors: *const *mut c_void,
            n: usize,
            out: *mut *mut c_void,
            err: *const Sink,
        ) -> Status,
    }
}

abi_struct! {
    /// A denoiser a sampler queries: ε̂ = model(x, t).
    pub struct Denoiser {
        pub ctx: *mut c_void,
        /// Writes an owned handle to ε̂ for inputs `x` at (possibly fractional) training timestep `t`.
        pub eps: unsafe extern "C" fn(
            ctx: *mut c_void,
            x: *mut c_void,
            t: f64,
            out: *mut *mut c_void,
            err: *const Sink,
        ) -> Status,
        /// Writes owned handles to ε̂ with the sample's condition and with the null label, from
        /// one pass of 2B rows (two evaluations); an error when the model takes no condition.
        pub eps_both: unsafe extern "C" fn(
            ctx: *mut c_void,
            x: *mut c_void,
            t: f64,
            out_cond: *mut *mut c_void,
            out_uncond: *mut *mut c_void,
            err: *const Sink,
        ) -> Status,
        /// ᾱ_t for t = 0..T−1, float64 `[T]`, borrowed.
        pub alphas_cumprod: *mut c_void,
        /// The training examples the denoiser stands for, `[N, ...]` in the samples' space,
        /// borrowed; null when the host has none to give. Samplers that need no training (the
        /// closed-form family) read it.
        pub data: *mut c_void,
    }
}

abi_struct! {
    /// One guided evaluation: the host ran the model with the condition (and, when the previous
    /// call asked for it, without); the guidance writes the prediction the sampler sees.
    pub struct GuideIo {
        /// ε̂ with the condition, borrowed.
        pub eps_cond: *mut c_void,
        /// ε̂ without it (the null label), borrowed; null when the previous call said it is not needed.
        pub eps_uncond: *mut c_void,
        /// The guided prediction (owned by the host once written).
        pub eps_out: *mut c_void,
        /// Whether the next evaluation needs the unconditional prediction. The host starts each
        /// sampling run asking for it and sets this to true before every call.
        pub need_uncond_next: bool,
    }
}

abi_struct! {
    /// One cross-attention layer of one evaluation: the same queries attended over the positive
    /// condition's keys and values and over the negative one's, per head, the heads concatenated
    /// (before the output projection). The component writes the layer's attention output.
    pub struct AttendIo {
        /// Z⁺ `[B, N, C]` (N query tokens, C features), borrowed.
        pub z_pos: *mut c_void,
        /// Z⁻ `[B, N, C]`, borrowed.
        pub z_neg: *mut c_void,
        /// The evaluation's (possibly fractional) training timestep.
        pub t: f64,
        /// The last training timestep, T − 1.
        pub t_max: f64,
        /// The output `[B, N, C]` (owned by the host once written); left null, the output is Z⁺.
        pub z_out: *mut c_void,
    }
}

abi_struct! {
    /// A sampling request: initial noise in, samples and evaluation count out.
    pub struct SampleIo {
        /// Standard normal noise of the sample shape, borrowed.
        pub noise: *mut c_void,
        /// The samples (owned by the host once written).
        pub x_out: *mut c_void,
        /// Number of denoiser evaluations used.
        pub nfe: u64,
    }
}

/// Function-pointer types named in the ABI, as written (their text enters [`LAYOUT_HASH`]).
const ALIASES: &[(&str, &str)] = &[ENTRY_FN, TENSOR_TO_TENSOR];

/// Every struct that crosses the boundary.
pub const LAYOUTS: &[TypeLayout] = &[
    RStr::LAYOUT,
    Sink::LAYOUT,
    PluginManifest::LAYOUT,
    ComponentDecl::LAYOUT,
    StateOut::LAYOUT,
    StateIn::LAYOUT,
    Rng::LAYOUT,
    ParamRef::LAYOUT,
    PassOut::LAYOUT,
    StepHost::LAYOUT,
    BatchIo::LAYOUT,
    TransformHost::LAYOUT,
    ObjectiveIo::LAYOUT,
    ObjectiveHost::LAYOUT,
    Denoiser::LAYOUT,
    GuideIo::LAYOUT,
    AttendIo::LAYOUT,
    SampleIo::LAYOUT,
];

/// The values both sides must read alike: status codes, component kinds, flags, sampling
/// modes, parameter tags, and the size of the enums that cross as integers.
const CONSTANTS: &[(&str, u64)] = &[
    ("Status", std::mem::size_of::<Status>() as u64),
    ("Status::Ok", Status::Ok as u64),
    ("Status::Error", Status::Error as u64),
    ("Status::Panic", Status::Panic as u64),
    ("Status::Unsupported", Status::Unsupported as u64),
    ("ComponentKind::StepRule", ComponentKind::StepRule as u64),
    ("ComponentKind::BatchTransform", ComponentKind::BatchTransform as u64),
    ("ComponentKind::Objective", ComponentKind::Objective as u64),
    ("ComponentKind::Sampler", ComponentKind::Sampler as u64),
    ("ComponentKind::Guidance", ComponentKind::Guidance as u64),
    ("ComponentKind::Attention", ComponentKind::Attention as u64),
    ("flags::STATEFUL", flags::STATEFUL),
    ("flags::RANDOM", flags::RANDOM),
    ("flags::NOISE", flags::NOISE),
    ("flags::MODEL", flags::MODEL),
    ("flags::INVERTS", flags::INVERTS),
    ("flags::GUIDES", flags::GUIDES),
    ("sampling::UNIFORM", sampling::UNIFORM as u64),
    ("sampling::WEIGHTED", sampling::WEIGHTED as u64),
    ("sampling::REPEAT", sampling::REPEAT as u64),
    ("tags::WEIGHT", tags::WEIGHT as u64),
    ("tags::BIAS", tags::BIAS as u64),
    ("tags::NORM", tags::NORM as u64),
    ("tags::EMBEDDING", tags::EMBEDDING as u64),
];

/// The digest of every layout in [`LAYOUTS`], the function-pointer aliases and [`CONSTANTS`]:
/// a plugin whose manifest carries another value was built against a different ABI.
pub const LAYOUT_HASH: u64 = layout_hash(LAYOUTS, ALIASES, CONSTANTS);

/// FNV-1a over the layouts. Type text is digested without whitespace, so compilers that
/// print a type with other spacing agree.
pub const fn layout_hash(layouts: &[TypeLayout], aliases: &[(&str, &str)], constants: &[(&str, u64)]) -> u64 {
    const fn text(mut h: u64, s: &str) -> u64 {
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if !b[i].is_ascii_whitespace() {
                h = (h ^ b[i] as u64).wrapping_mul(0x0100_0000_01b3);
            }
            i += 1;
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        (h ^ 0xff).wrapping_mul(0x0100_0000_01b3)
    }
    const fn num(mut h: u64, v: u64) -> u64 {
        let b = v.to_le_bytes();
        let mut i = 0;
        while i < 8 {
            h = (h ^ b[i] as u64).wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        h
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut t = 0;
    while t < layouts.len() {
        let l = &layouts[t];
        h = num(num(text(h, l.name), l.size as u64), l.align as u64);
        let mut f = 0;
        while f < l.fields.len() {
            let fl = &l.fields[f];
            h = num(text(text(h, fl.name), fl.ty), fl.offset as u64);
            f += 1;
        }
        t += 1;
    }
    let mut a = 0;
    while a < aliases.len() {
        h = text(text(h, aliases[a].0), aliases[a].1);
        a += 1;
    }
    let mut c = 0;
    while c < constants.len() {
        h = num(text(h, constants[c].0), constants[c].1);
        c += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout hash of each ABI version since hashes were introduced. A change to any type
    /// in this module changes [`LAYOUT_HASH`]; this test then fails until `ABI_VERSION` is
    /// bumped and the new pair is added here (never edit an old pair).
    const PINNED: &[(u32, u64)] = &[(5, 0x7251_3275_2a1f_cd1c), (6, 0x2ca4_997d_96cc_32e4), (7, 0x396c_115f_e8f4_69bd)];

    #[test]
    fn layout_is_pinned_to_the_version() {
        let pinned = PINNED.iter().find(|(v, _)| *v == ABI_VERSION).map(|(_, h)| *h);
        assert_eq!(
            pinned,
            Some(LAYOUT_HASH),
            "the plugin ABI's layout hash is {LAYOUT_HASH:#018x}, but ABI v{ABI_VERSION} was pinned at {pinned:#x?}: a \
             type in abi.rs changed. Bump ABI_VERSION and add ({}, {LAYOUT_HASH:#018x}) to PINNED",
            ABI_VERSION + 1
        );
        let mut hashes: Vec<u64> = PINNED.iter().map(|(_, h)| *h).collect();
        hashes.dedup();
        assert_eq!(hashes.len(), PINNED.len(), "two ABI versions share a layout hash");
    }

    abi_struct! {
        pub struct Before {
            pub a: u32,
            pub b: *mut c_void,
        }
    }

    abi_struct! {
        pub struct Moved {
            pub b: *mut c_void,
            pub a: u32,
        }
    }

    abi_struct! {
        pub struct Widened {
            pub a: u64,
            pub b: *mut c_void,
        }
    }

    abi_struct! {
        pub struct Grown {
            pub a: u32,
            pub b: *mut c_void,
            pub c: u8,
        }
    }

    #[test]
    fn any_change_of_a_layout_changes_the_hash() {
        let rename = |mut l: TypeLayout| {
            l.name = "Before";
            l
        };
        let base = layout_hash(&[Before::LAYOUT], &[], &[]);
        for changed in [rename(Moved::LAYOUT), rename(Widened::LAYOUT), rename(Grown::LAYOUT)] {
            assert_ne!(layout_hash(&[changed], &[], &[]), base);
        }
        assert_ne!(layout_hash(&[Before::LAYOUT], &[], &[("flags::X", 1)]), base);
        assert_ne!(
            layout_hash(&[Before::LAYOUT], &[], &[("flags::X", 1)]),
            layout_hash(&[Before::LAYOUT], &[], &[("flags::X", 2)])
        );
        // Spacing in a type's text is not a change.
        let spaced = TypeLayout {
            fields: &[
                FieldLayout { name: "a", ty: "u32", offset: 0 },
                FieldLayout { name: "b", ty: "* mut  c_void", offset: 8 },
            ],
            ..Before::LAYOUT
        };
        assert_eq!(layout_hash(&[spaced], &[], &[]), base);
        assert_eq!(Before::LAYOUT.fields[1].offset, 8);
    }
}
