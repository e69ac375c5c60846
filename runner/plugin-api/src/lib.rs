//! The xlab plugin boundary.
//!
//! - [`abi`]: the versioned C ABI (`#[repr(C)]` manifest, function tables, tensor handles).
//! - [`sdk`]: the safe traits a plugin author implements, and [`export_plugin!`].
//! - [`host`]: loading and checking plugin libraries and calling their components (the worker).
//!
//! Only this crate contains `unsafe` on the plugin path; a plugin written with the SDK has none.

pub mod abi;
pub mod host;
pub mod sdk;
pub mod testing;

pub use abi::ComponentKind;
pub use sdk::{
    param, Batch, BatchTransform, Component, DenoiserCtx, Guidance, HostRng, ModelHost, Objective, ObjectiveCtx,
    ObjectiveInput, Param, ParamSpec, ParamType, PluginError, Result, RunInfo, Sampler, Sampling, State, StepCtx,
    StepRule, Transformed,
};
pub use tch;
pub use xlab_proto::{artifacts, ParentRef};
