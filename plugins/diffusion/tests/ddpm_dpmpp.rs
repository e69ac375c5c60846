//! `diffusion.ddpm` and `diffusion.dpmpp_2m`: docs/methods.md §3.2 and 3.4 vectors, and the
//! single-point oracle (which must return x₀* exactly) through the real boundary.

use xlab_plugin_api::tch::{Device, Kind, Tensor};
use xlab_plugin_diffusion::ddpm::posterior_variance;
use xlab_plugin_diffusion::dpmpp_2m::{dpm_timesteps, vp};
use xlab_plugin_diffusion::timesteps::Spacing;
use xlab_plugin_host::testing::{built_plugin, instantiate, to_vec, SplitMix};

fn linear_alphas_cumprod() -> Vec<f64> {
    let mut acc = 1.0;
    (0..1000)
        .map(|i| {
            acc *= 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0);
            acc
        })
        .collect()
}

#[test]
fn ddpm_variances_of_methods_md() {
    // t = 1 with N = T (t' = 0), linear schedule: σ²_small = 5.4531877e-5, β₁ = 1.1991992e-4.
    let ac = linear_alphas_cumprod();
    let small = posterior_variance(ac[1], ac[0]);
    assert!((small - 5.4531877e-5).abs() < 1e-12, "{small}");
    let beta1 = 1.0 - ac[1] / ac[0];
    assert!((beta1 - 1.1991992e-4).abs() < 1e-12, "{beta1}");
}

#[test]
fn dpm_sigmas_of_methods_md() {
    let ac = linear_alphas_cumprod();
    let sigma = |t: usize| ((1.0 - ac[t]) / ac[t]).sqrt();
    for (t, want) in [(999, 157.40728), (899, 60.27141), (500, 3.44297), (100, 0.34226)] {
        assert!((sigma(t) - want).abs() < 1e-4 * want, "σ({t}) = {}", sigma(t));
    }
    assert_eq!(dpm_timesteps(Spacing::Linspace, 1000, 10, 0)[5], 500, "499.5 rounds to 500");
    let (a, s, l) = vp(0.0);
    assert_eq!((a, s), (1.0, 0.0));
    assert!(l.is_infinite());
}

/// The oracle ε̂ of one data point x₀* = 0.5: both samplers land on it, with N evaluations.
#[test]
fn single_point_oracle_returns_the_point_through_the_boundary() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let ac = linear_alphas_cumprod();
    let alphas = Tensor::from_slice(&ac);
    let cases = [
        ("diffusion.ddpm", serde_json::json!({"steps": 1000})),
        ("diffusion.ddpm", serde_json::json!({"steps": 10, "timestep_spacing": "linspace"})),
        ("diffusion.ddpm", serde_json::json!({"steps": 25, "variance_type": "fixed_large"})),
        ("diffusion.dpmpp_2m", serde_json::json!({"steps": 10})),
        ("diffusion.dpmpp_2m", serde_json::json!({"steps": 1})),
        ("diffusion.dpmpp_2m", serde_json::json!({"steps": 20, "timestep_spacing": "leading"})),
        ("diffusion.dpmpp_2m", serde_json::json!({"steps": 7, "timestep_spacing": "trailing"})),
    ];
    for (id, params) in cases {
        let steps = params["steps"].as_u64().unwrap();
        let mut s = instantiate(&plugin, id, params.clone());
        let noise = Tensor::from_slice(&[2.0f64, -1.0, 0.3, 1.7]).reshape([4, 1]);
        let acv = ac.clone();
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> {
            let a = acv[t as usize];
            Ok((x - a.sqrt() * 0.5) / (1.0 - a).sqrt())
        };
        let mut rng = SplitMix(4);
        let (out, nfe) = s.sample(&noise, &mut eps, &alphas, None, &mut || rng.next_u64()).unwrap();
        assert_eq!(nfe, steps, "{id} {params}");
        for v in to_vec(&out) {
            assert!((v - 0.5).abs() < 1e-9, "{id} {params}: {v}");
        }
    }
}

/// DDPM draws its noise from the host's stream; DPM-Solver++ is deterministic.
#[test]
fn ddpm_is_reproducible_and_dpmpp_deterministic() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let ac = linear_alphas_cumprod();
    let run = |id: &str, seed: u64| {
        let mut s = instantiate(&plugin, id, serde_json::json!({"steps": 20}));
        let noise = Tensor::ones([3, 2], (Kind::Double, Device::Cpu));
        let acv = ac.clone();
        // Two data points {−0.5, 0.5}: the exact ε̂ keeps ancestral samples random.
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> {
            let a = acv[t as usize];
            let w: Vec<Tensor> =
                [-0.5f64, 0.5].iter().map(|p| (-(x - a.sqrt() * p).square() / (2.0 * (1.0 - a))).exp()).collect();
            let x0 = (&w[0] * -0.5 + &w[1] * 0.5) / (&w[0] + &w[1]);
            Ok((x - x0 * a.sqrt()) / (1.0 - a).sqrt())
        };
        let mut rng = SplitMix(seed);
        to_vec(&s.sample(&noise, &mut eps, &Tensor::from_slice(&ac), None, &mut || rng.next_u64()).unwrap().0)
    };
    assert_eq!(run("diffusion.ddpm", 1), run("diffusion.ddpm", 1));
    assert_ne!(run("diffusion.ddpm", 1), run("diffusion.ddpm", 2));
    assert_eq!(run("diffusion.dpmpp_2m", 1), run("diffusion.dpmpp_2m", 2));
}

/// Euler and Heun with the oracle ε̂ at fractional timesteps (σ interpolated linearly in t,
/// ᾱ = 1/(1+σ²), as the samplers assume): both return x₀* exactly, with N and 2N − 1
/// evaluations.
#[test]
fn euler_and_heun_return_the_point_from_the_oracle() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let ac = linear_alphas_cumprod();
    let sig: Vec<f64> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
    for (id, params, nfe) in [
        ("diffusion.euler", serde_json::json!({"steps": 7}), 7),
        ("diffusion.euler", serde_json::json!({"steps": 7, "timestep_spacing": "leading"}), 7),
        ("diffusion.heun", serde_json::json!({"steps": 10}), 19),
        ("diffusion.heun", serde_json::json!({"steps": 4, "timestep_spacing": "trailing"}), 7),
    ] {
        let mut s = instantiate(&plugin, id, params.clone());
        let noise = Tensor::from_slice(&[2.0f64, -1.0, 0.3, 1.7]).reshape([4, 1]);
        let sigv = sig.clone();
        let mut fractional = 0;
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> {
            if t.fract() != 0.0 {
                fractional += 1;
            }
            let lo = t.floor() as usize;
            let sigma =
                if lo + 1 < sigv.len() { sigv[lo] + (sigv[lo + 1] - sigv[lo]) * (t - lo as f64) } else { sigv[lo] };
            let a = 1.0 / (1.0 + sigma * sigma);
            Ok((x - a.sqrt() * 0.5) / (1.0 - a).sqrt())
        };
        let (out, got) = s.sample(&noise, &mut eps, &Tensor::from_slice(&ac), None, &mut || 0).unwrap();
        assert_eq!(got, nfe, "{id} {params}");
        for v in to_vec(&out) {
            assert!((v - 0.5).abs() < 1e-9, "{id} {params}: {v}");
        }
        if id == "diffusion.euler" && params.get("timestep_spacing").is_none() {
            assert!(fractional > 0, "linspace timesteps are fractional");
        }
    }
}
