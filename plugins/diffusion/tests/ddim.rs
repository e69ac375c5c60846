//! `diffusion.ddim`: docs/methods.md §3.3 vectors, and exact sampling through the real boundary.

use xlab_plugin_api::tch::{Device, Kind, Tensor};
use xlab_plugin_diffusion::ddim::{ddim_step, DdimParams};
use xlab_plugin_diffusion::timesteps::Spacing;
use xlab_plugin_host::testing::{built_plugin, conformance, instantiate, to_vec, SplitMix};

fn linear_alphas_cumprod() -> Vec<f64> {
    let mut acc = 1.0;
    (0..1000)
        .map(|i| {
            acc *= 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0);
            acc
        })
        .collect()
}

fn params() -> DdimParams {
    DdimParams {
        steps: 10,
        eta: 0.0,
        clip_sample: true,
        clip_sample_range: 1.0,
        set_alpha_to_one: true,
        steps_offset: 0,
        timestep_spacing: Spacing::Leading,
        use_clipped_model_output: false,
        dualfast_c_max: 0.0,
        dualfast_schedule: Default::default(),
        dualfast_tau: Default::default(),
    }
}

#[test]
fn passes_the_conformance_kit() {
    conformance(&built_plugin("xlab_plugin_diffusion"));
}

/// Linear schedule, N = 10, t = 999 → 899, x = 1, ε̂ = 0.5, η = 0: x̂₀ = 78.706817 is clipped to
/// 1 and x' = √ᾱ₈₉₉ + 0.5·√(1−ᾱ₈₉₉) = 0.5165205251.
#[test]
fn one_step_matches_the_methods_vector() {
    let ac = linear_alphas_cumprod();
    let x = Tensor::from_slice(&[1.0f64]);
    let eps = Tensor::from_slice(&[0.5f64]);
    let unclipped = (1.0 - 0.5 * (1.0 - ac[999]).sqrt()) / ac[999].sqrt();
    assert!((unclipped - 78.706817).abs() < 1e-4, "{unclipped}");
    let out = f64::try_from(ddim_step(&params(), &x, &eps, ac[999], ac[899], None)).unwrap();
    assert!((out - 0.5165205251).abs() < 1e-9, "{out}");
}

fn alphas_tensor() -> Tensor {
    Tensor::from_slice(&linear_alphas_cumprod())
}

/// With the oracle ε̂ of a single data point x₀* = 0.5, DDIM returns x₀* (up to float rounding)
/// from any noise, with one evaluation per step, for every spacing.
#[test]
fn single_point_oracle_returns_the_point_through_the_boundary() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let ac = linear_alphas_cumprod();
    for spacing in ["leading", "trailing", "linspace"] {
        for steps in [1, 10, 50] {
            let mut ddim = instantiate(
                &plugin,
                "diffusion.ddim",
                serde_json::json!({"steps": steps, "timestep_spacing": spacing}),
            );
            let noise = Tensor::from_slice(&[2.0f64, -1.0, 0.3, 1.7]).reshape([4, 1]);
            let acv = ac.clone();
            let mut calls = vec![];
            let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> {
                calls.push(t);
                let a = acv[t as usize];
                Ok((x - a.sqrt() * 0.5) / (1.0 - a).sqrt())
            };
            let (out, nfe) = ddim.sample(&noise, &mut eps, &alphas_tensor(), None, &mut || 0).unwrap();
            assert_eq!(nfe, steps as u64);
            assert_eq!(calls.len(), steps);
            for v in to_vec(&out) {
                assert!((v - 0.5).abs() < 1e-9, "{spacing} N={steps}: {v}");
            }
        }
    }
}

/// η > 0 draws noise from the host's stream: same seed, same samples; other seed, others.
#[test]
fn stochastic_ddim_is_reproducible_from_the_host_seed() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let ac = linear_alphas_cumprod();
    let run = |seed: u64| {
        let mut ddim =
            instantiate(&plugin, "diffusion.ddim", serde_json::json!({"steps": 20, "eta": 1.0, "clip_sample": false}));
        let noise = Tensor::ones([3, 2], (Kind::Double, Device::Cpu));
        let acv = ac.clone();
        // A two-point data set {−0.5, 0.5}: its exact ε̂ keeps samples stochastic.
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> {
            let a = acv[t as usize];
            let pts = [-0.5f64, 0.5];
            let w: Vec<Tensor> = pts.iter().map(|p| (-(x - a.sqrt() * p).square() / (2.0 * (1.0 - a))).exp()).collect();
            let x0 = (&w[0] * pts[0] + &w[1] * pts[1]) / (&w[0] + &w[1]);
            Ok((x - x0 * a.sqrt()) / (1.0 - a).sqrt())
        };
        let mut rng = SplitMix(seed);
        to_vec(&ddim.sample(&noise, &mut eps, &alphas_tensor(), None, &mut || rng.next_u64()).unwrap().0)
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}
