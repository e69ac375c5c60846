//! The SAM family of step rules for xlab (docs/methods.md section 1).

pub mod amp;
pub mod asam;
pub mod common;
pub mod fd_gr;
pub mod fsam;
pub mod gam;
pub mod mesa;
pub mod saf;
pub mod sam;
pub mod sam_on;

xlab_plugin_api::export_plugin! {
    id: "sam",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [sam::Sam, asam::Asam, gam::Gam, fsam::Fsam, sam_on::SamOn, amp::Amp, fd_gr::FdGr],
    batch_transforms: [],
    objectives: [saf::Saf, mesa::Mesa],
    samplers: [],
}
