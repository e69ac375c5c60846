//! xlab experiment files: YAML → validated [`Plan`] of jobs with stable identities.
//!
//! Parse ([`file`]) → resolve and validate ([`expand`]) → a [`Plan`]; only a plan can be
//! scheduled. This crate does no I/O beyond reading the file and never links libtorch.

pub mod config;
mod error;
pub mod expand;
pub mod file;
pub mod identity;
pub mod locate;
pub mod schema;
pub mod sweep;

pub use config::JobConfig;
pub use error::{did_you_mean, SpecError};
pub use expand::{Job, NoPlugins, Pick, Plan, PluginSource, Search, StagePlan};
pub use identity::{JobId, PluginRef};

use std::path::Path;

/// Reads, parses, resolves and validates an experiment file; plugin components are checked
/// against `plugins`.
pub fn load(path: &Path, plugins: &mut dyn PluginSource) -> Result<Plan, SpecError> {
    let source = file::read_text(path)?;
    load_str(path, &source, plugins)
}

/// Like [`load`], from text already in memory; `path` is used in messages and to find plugin
/// paths only.
pub fn load_str(path: &Path, source: &str, plugins: &mut dyn PluginSource) -> Result<Plan, SpecError> {
    let parsed =
        file::parse(path, source).map_err(|e| locate::indentation_hint(locate::fill(e, path, source), path, source))?;
    expand::expand(path, source.to_string(), parsed, plugins).map_err(|e| locate::fill(e, path, source))
}
