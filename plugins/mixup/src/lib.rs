//! The mixup family of batch transforms for xlab (docs/methods.md section 2).

pub mod comixup;
pub mod cutmix;
pub mod graphcut;
pub mod mixup;
pub mod regmixup;
pub mod resample;
pub mod selective;
pub mod selmix;
pub mod timm;

xlab_plugin_api::export_plugin! {
    id: "mixup",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [],
    batch_transforms: [
        mixup::Mixup,
        cutmix::Cutmix,
        timm::Timm,
        regmixup::RegMixup,
        selective::Selective,
        selective::SelectiveNoMix,
        comixup::CoMixup,
        selmix::SelMix,
    ],
    objectives: [resample::Resample],
    samplers: [],
}
