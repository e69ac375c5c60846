//! The DRO family of objectives for xlab (docs/methods.md section 4).

pub mod chi2;
pub mod cvar;
pub mod group_dro;
pub mod jtt;
pub mod reweight;
pub mod robust;
pub mod subsample;

xlab_plugin_api::export_plugin! {
    id: "dro",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [],
    batch_transforms: [],
    objectives: [
        group_dro::GroupDro,
        reweight::Reweight,
        subsample::Subsample,
        cvar::Cvar,
        chi2::Chi2,
        jtt::Jtt,
    ],
    samplers: [],
}
