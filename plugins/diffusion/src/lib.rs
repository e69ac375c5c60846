//! The diffusion family for xlab (docs/methods.md section 3): samplers, guidance, attention
//! guidance (NAG), closed-form sampling and DDPM-IP training.

pub mod closed_form;
pub mod common;
pub mod ddim;
pub mod ddpm;
pub mod ddpm_ip;
pub mod dpmpp_2m;
pub mod dualfast;
pub mod euler;
pub mod euler_ancestral;
pub mod guidance;
pub mod heun;
pub mod karras;
pub mod nag;
pub mod pcg;
pub mod timesteps;
pub mod unipc;

xlab_plugin_api::export_plugin! {
    id: "diffusion",
    version: env!("CARGO_PKG_VERSION"),
    step_rules: [],
    batch_transforms: [ddpm_ip::DdpmIp],
    objectives: [],
    samplers: [
        ddim::Ddim,
        ddim::DdimInverse,
        ddpm::Ddpm,
        dpmpp_2m::Dpmpp2m,
        dpmpp_2m::Dpmpp2mSde,
        euler::Euler,
        euler_ancestral::EulerAncestral,
        heun::Heun,
        pcg::Pcg,
        unipc::Unipc,
        closed_form::ClosedForm
    ],
    guidances: [guidance::Cfg, guidance::Adaptive],
    attentions: [nag::Nag],
}
