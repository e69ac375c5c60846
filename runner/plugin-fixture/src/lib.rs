//! A plugin for testing the host, not for users. Its library is named
//! `libxlab_fixture_plugin.so`, so folder discovery never picks it up; tests name the file.
//!
//! `XLAB_FIXTURE_MANIFEST` chooses what the entry point returns: unset, a valid plugin `fixture`
//! with two step rules that fail on purpose; `abi`, a manifest of ABI version 999; `torch`, one
//! built against libtorch 1.0.0; `panic`, a panic while building the manifest (the entry point
//! then returns null, as the SDK's does). The valid plugin also has `fixture.clean_loss`, a batch
//! transform that asks for the model's input gradient and keeps the clean loss's gradient, so a
//! test can check the host's side of that request against a PyTorch loop, and
//! `fixture.feature_mix`, which makes the host mix features (SelMix's path) in a way a PyTorch
//! loop can follow. `fixture.odd_metrics` logs a NaN and an infinite metric every step;
//! `fixture.crashes` raises a signal and `fixture.hangs` sleeps for good at a chosen step, for
//! the scheduler's fault classification.

use serde::Deserialize;
use std::sync::OnceLock;
use xlab_plugin_api::abi::{PluginManifest, RStr, ABI_VERSION, LAYOUT_HASH, TORCH_VERSION};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Batch, BatchTransform, Component, ComponentKind, HostRng, PluginError, Result, StepCtx, StepRule, Transformed,
};

#[derive(Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// Panics inside its step.
pub struct Panics;

impl Component for Panics {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "fixture.panics";
    const SUMMARY: &'static str = "panics in its first step (host test)";
    const REFERENCE: &'static str = "none: a test fixture";
    type Params = NoParams;
    fn new(_: NoParams) -> Result<Self> {
        Ok(Panics)
    }
}

impl StepRule for Panics {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        panic!("fixture.panics was asked to step");
    }
}

/// Returns an error from its step.
pub struct Fails;

impl Component for Fails {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "fixture.fails";
    const SUMMARY: &'static str = "reports an error in its first step (host test)";
    const REFERENCE: &'static str = "none: a test fixture";
    type Params = NoParams;
    fn new(_: NoParams) -> Result<Self> {
        Ok(Fails)
    }
}

impl StepRule for Fails {
    fn step(&mut self, _host: &mut StepCtx<'_>) -> Result<()> {
        Err(PluginError("fixture.fails refuses to step".into()))
    }
}

/// A plain step that logs `nan` = NaN and `inf` = +∞ every step (so every epoch's mean of them,
/// and the job's summary, holds them too).
pub struct OddMetrics;

impl Component for OddMetrics {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "fixture.odd_metrics";
    const SUMMARY: &'static str = "a plain step that logs a NaN and an infinite metric (host test)";
    const REFERENCE: &'static str = "none: a test fixture";
    type Params = NoParams;
    fn new(_: NoParams) -> Result<Self> {
        Ok(OddMetrics)
    }
}

impl StepRule for OddMetrics {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        host.log("nan", f64::NAN);
        host.log("inf", f64::INFINITY);
        host.optimizer_step()
    }
}

#[derive(Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct AtStepParams {
    /// the global step (0-based) to crash at
    #[param(default = 3)]
    at_step: u64,
    /// the signal to raise
    #[param(default = libc::SIGSEGV)]
    signal: i64,
}

/// A plain step that raises `signal` (default SIGSEGV) at global step `at_step`, on every attempt.
pub struct Crashes {
    at_step: u64,
    signal: i32,
}

impl Component for Crashes {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "fixture.crashes";
    const SUMMARY: &'static str = "raises a signal at a chosen step (host test)";
    const REFERENCE: &'static str = "none: a test fixture";
    type Params = AtStepParams;
    fn new(p: AtStepParams) -> Result<Self> {
        Ok(Crashes { at_step: p.at_step, signal: p.signal as i32 })
    }
}

impl StepRule for Crashes {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        if host.step() == self.at_step {
            // SAFETY: raising a signal in this process is what the fixture is for. The default
            // action first: Rust's own SIGSEGV handler (stack overflow detection) would return
            // from a raised, not faulting, SIGSEGV.
            unsafe {
                libc::signal(self.signal, libc::SIG_DFL);
                libc::raise(self.signal);
            }
        }
        host.forward_backward()?;
        host.optimizer_step()
    }
}

#[derive(Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct HangParams {
    /// the global step (0-based) to hang at
    #[param(default = 3)]
    at_step: u64,
}

/// A plain step that never returns from global step `at_step`.
pub struct Hangs {
    at_step: u64,
}

impl Component for Hangs {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "fixture.hangs";
    const SUMMARY: &'static str = "sleeps for good at a chosen step (host test)";
    const REFERENCE: &'static str = "none: a test fixture";
    type Params = HangParams;
    fn new(p: HangParams) -> Result<Self> {
        Ok(Hangs { at_step: p.at_step })
    }
}

impl StepRule for Hangs {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        while host.step() == self.at_step {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        host.forward_backward()?;
        host.optimizer_step()
    }
}

#[derive(Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct CleanLossParams {
    /// weight of the clean loss
    #[param(default = 0.5)]
    weight: f64,
}

/// Leaves the batch as it is (one-hot targets) and asks the host for the input gradient of
/// `weight` · CE on the clean batch, in training mode, keeping its parameter gradient: the step
/// then trains on CE + weight · CE.
pub struct CleanLoss {
    weight: f64,
}

impl Component for CleanLoss {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "fixture.clean_loss";
    const SUMMARY: &'static str = "keeps the batch and adds weight · CE of the clean batch to the update (host test)";
    const REFERENCE: &'static str = "none: a test fixture";
    const QUERIES_MODEL: bool = true;
    type Params = CleanLossParams;
    fn new(p: CleanLossParams) -> Result<Self> {
        Ok(CleanLoss { weight: p.weight })
    }
}

impl BatchTransform for CleanLoss {
    fn transform(&mut self, batch: Batch, _rng: &mut HostRng<'_>) -> Result<Transformed> {
        let model = batch.model.as_ref().ok_or_else(|| PluginError("no model to ask".into()))?;
        let g = model.input_grad(self.weight, true, true)?;
        if g.size() != batch.x.size() {
            return Err(PluginError(format!("input gradient of shape {:?} for inputs {:?}", g.size(), batch.x.size())));
        }
        let target = batch.y.one_hot(batch.num_classes).to_kind(batch.x.kind());
        Ok(Transformed { x: batch.x, target })
    }
}

#[derive(Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct FeatureMixParams {
    /// the weight of the example's own features
    #[param(default = 0.7)]
    mu: f64,
}

/// Mixes each example's features with its mirror's in the batch (row r with row B−1−r) at a
/// fixed μ, through the host's feature mixing, so a test can check that path against a
/// PyTorch loop.
pub struct FeatureMix {
    mu: f64,
}

impl Component for FeatureMix {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "fixture.feature_mix";
    const SUMMARY: &'static str = "mixes each example's features with its mirror's at a fixed μ (host test)";
    const REFERENCE: &'static str = "none: a test fixture";
    const QUERIES_MODEL: bool = true;
    type Params = FeatureMixParams;
    fn new(p: FeatureMixParams) -> Result<Self> {
        Ok(FeatureMix { mu: p.mu })
    }
}

impl BatchTransform for FeatureMix {
    fn transform(&mut self, batch: Batch, _rng: &mut HostRng<'_>) -> Result<Transformed> {
        let model = batch.model.as_ref().ok_or_else(|| PluginError("no model to ask".into()))?;
        let mu = batch.y.ones_like().to_kind(batch.x.kind()) * self.mu;
        model.feature_mix(&batch.x.flip([0]), &mu, &batch.index)?;
        let target = batch.y.one_hot(batch.num_classes).to_kind(batch.x.kind());
        Ok(Transformed { x: batch.x, target })
    }
}

fn wrong(abi_version: u32, layout_hash: u64, torch: &'static str) -> &'static PluginManifest {
    Box::leak(Box::new(PluginManifest {
        abi_version,
        plugin_id: RStr::from_static("fixture"),
        layout_hash,
        plugin_version: RStr::from_static("0.0.0"),
        torch_version: RStr::from_static(torch),
        components: std::ptr::null(),
        n_components: 0,
    }))
}

/// The layout hash this fixture reports in its "layout" mode: any value but this xlab's, as a
/// plugin built against an older xlab-plugin-api of the same ABI version would carry.
const OLDER_LAYOUT: u64 = 0x5eed_0000_0000_0004;

/// The entry point, as `export_plugin!` writes it, with the manifest chosen by the environment.
#[no_mangle]
pub extern "C" fn xlab_plugin_manifest_v1() -> *const PluginManifest {
    static MANIFEST: OnceLock<usize> = OnceLock::new();
    let addr = *MANIFEST.get_or_init(|| {
        std::panic::catch_unwind(|| {
            let m: &'static PluginManifest = match std::env::var("XLAB_FIXTURE_MANIFEST").as_deref() {
                Ok("abi") => wrong(ABI_VERSION + 998, LAYOUT_HASH, TORCH_VERSION),
                // Built against an xlab-plugin-api whose types differ from this one's although
                // its version number is the same (a layout change that forgot the bump).
                Ok("layout") => wrong(ABI_VERSION, OLDER_LAYOUT, TORCH_VERSION),
                Ok("torch") => wrong(ABI_VERSION, LAYOUT_HASH, "1.0.0"),
                Ok("panic") => panic!("the manifest could not be built"),
                _ => xlab_plugin_api::sdk::glue::manifest(
                    "fixture",
                    "0.0.0",
                    vec![
                        xlab_plugin_api::sdk::glue::step_rule::<Panics>(),
                        xlab_plugin_api::sdk::glue::step_rule::<Fails>(),
                        xlab_plugin_api::sdk::glue::step_rule::<OddMetrics>(),
                        xlab_plugin_api::sdk::glue::step_rule::<Crashes>(),
                        xlab_plugin_api::sdk::glue::step_rule::<Hangs>(),
                        xlab_plugin_api::sdk::glue::batch_transform::<CleanLoss>(),
                        xlab_plugin_api::sdk::glue::batch_transform::<FeatureMix>(),
                    ],
                ),
            };
            m as *const PluginManifest as usize
        })
        .unwrap_or(0)
    });
    addr as *const PluginManifest
}
