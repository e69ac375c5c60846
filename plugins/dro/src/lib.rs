//! The DRO family of objectives for xlab (METHODS.md section 4).

pub mod group_dro;
pub mod reweight;

xlab_plugin_api::export_plugin! {
    id: "dro",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [],
    batch_transforms: [],
    objectives: [group_dro::GroupDro, reweight::Reweight],
    samplers: [],
}
