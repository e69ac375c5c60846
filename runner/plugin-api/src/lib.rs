//! The xlab plugin boundary.
//!
//! - [`abi`]: the versioned C ABI (`#[repr(C)]` manifest, function tables, tensor handles).
//! - [`sdk`]: the safe traits a plugin author implements, and [`export_plugin!`].
//!
//! This is all a plugin author needs and all a plugin library links; loading libraries and
//! calling them is the host's side, in `xlab-plugin-host`. Only these two crates contain
//! `unsafe` on the plugin path; a plugin written with the SDK has none.

pub mod abi;
pub mod sdk;

pub use abi::ComponentKind;
pub use sdk::{
    param, AttentionGuidance, Batch, BatchTransform, Component, DenoiserCtx, Guidance, HostRng, ModelHost, Objective,
    ObjectiveCtx, ObjectiveInput, Param, ParamList, ParamSpec, ParamType, PluginError, Result, RunInfo, Sampler,
    Sampling, State, StepCtx, StepRule, Transformed,
};
pub use tch;
/// `#[derive(Params)]`: a component's parameter schema from its parameter struct.
pub use xlab_params_derive::Params;

/// What the code `#[derive(Params)]` writes refers to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use serde_json;
}
pub use xlab_proto::{artifacts, ParentRef};
