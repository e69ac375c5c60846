//! The DRO family of objectives for xlab (METHODS.md section 4).

pub mod group_dro;

xlab_plugin_api::export_plugin! {
    id: "dro",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [],
    batch_transforms: [],
    objectives: [group_dro::GroupDro],
    samplers: [],
}
