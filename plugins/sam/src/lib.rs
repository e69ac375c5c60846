//! The SAM family of step rules for xlab (METHODS.md section 1).

pub mod sam;

xlab_plugin_api::export_plugin! {
    id: "sam",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [sam::Sam],
    batch_transforms: [],
    objectives: [],
    samplers: [],
}
