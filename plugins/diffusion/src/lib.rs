//! Diffusion samplers for xlab (METHODS.md section 3).

pub mod common;
pub mod ddim;
pub mod ddpm;
pub mod dpmpp_2m;
pub mod euler;
pub mod heun;
pub mod karras;
pub mod timesteps;

xlab_plugin_api::export_plugin! {
    id: "diffusion",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [],
    batch_transforms: [],
    objectives: [],
    samplers: [ddim::Ddim, ddpm::Ddpm, dpmpp_2m::Dpmpp2m, euler::Euler, heun::Heun],
}
