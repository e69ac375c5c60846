//! The samplers against diffusers itself: `tests/reference/diffusers_reference.py` runs
//! diffusers' DDIM, DPM-Solver++(2M) and its SDE variant, Euler, Euler ancestral, Heun and
//! UniPC schedulers (Karras σ's too) and DDIM inversion from the same noise with the same
//! deterministic model outputs and schedule; the plugins, through the real boundary, must
//! produce the same samples (to float32 precision: diffusers keeps the schedule in float32 and
//! DPM-Solver++ casts samples to float32) and the same number of model calls. The stochastic
//! ones get, on the diffusers side, the very normals the host's stream gives the plugin. Needs
//! the project's Python environment with diffusers (`make setup`), or `XLAB_PYTHON`.

use serde_json::json;
use std::path::PathBuf;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_host::testing::{built_plugin, instantiate, run_python_reference, to_vec, SplitMix};

/// The seed of the host stream every case starts from.
const SEED: u64 = 2024;

/// The standard normals a plugin draws from a host stream seeded with `seed`: Box–Muller on two
/// 53-bit uniforms, u₁ = 1 − U, as `HostRng::normal` does.
fn host_normals(seed: u64, count: usize) -> Vec<f64> {
    let mut rng = SplitMix(seed);
    let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (0..count)
        .map(|_| {
            let u1 = 1.0 - uniform();
            let u2 = uniform();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

fn assert_close(got: &[f64], expect: &[f64], what: &str) {
    for (a, b) in got.iter().zip(expect) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{what}: xlab {got:?} vs diffusers {expect:?}");
    }
}

#[test]
fn samplers_match_the_diffusers_schedulers() {
    let noise = vec![1.3f64, -0.7, 0.2, 2.1, -1.6, 0.05];
    let cases = vec![
        json!({"id": "diffusion.ddim", "steps": 10, "params": {"steps": 10, "clip_sample": false}}),
        json!({"id": "diffusion.ddim", "steps": 25, "params": {"steps": 25, "clip_sample": false, "timestep_spacing": "trailing"},
               "diffusers": {"timestep_spacing": "trailing"}}),
        json!({"id": "diffusion.dpmpp_2m", "steps": 10, "params": {"steps": 10}}),
        json!({"id": "diffusion.dpmpp_2m", "steps": 20, "params": {"steps": 20}}),
        json!({"id": "diffusion.euler", "steps": 12, "params": {"steps": 12}}),
        json!({"id": "diffusion.heun", "steps": 8, "params": {"steps": 8}}),
        // Karras σ's: fractional timesteps from log σ (Euler, Heun), rounded (DPM-Solver++, UniPC).
        json!({"id": "diffusion.euler", "steps": 10, "params": {"steps": 10, "use_karras_sigmas": true},
               "diffusers": {"use_karras_sigmas": true}}),
        json!({"id": "diffusion.heun", "steps": 6, "params": {"steps": 6, "use_karras_sigmas": true},
               "diffusers": {"use_karras_sigmas": true}}),
        json!({"id": "diffusion.dpmpp_2m", "steps": 12, "params": {"steps": 12, "use_karras_sigmas": true},
               "diffusers": {"use_karras_sigmas": true}}),
        // The stochastic samplers, with the host stream's normals on both sides.
        json!({"id": "diffusion.euler_ancestral", "steps": 10, "params": {"steps": 10}}),
        json!({"id": "diffusion.euler_ancestral", "steps": 8, "params": {"steps": 8, "timestep_spacing": "trailing"},
               "diffusers": {"timestep_spacing": "trailing"}}),
        json!({"id": "diffusion.dpmpp_2m_sde", "steps": 10, "params": {"steps": 10}}),
        json!({"id": "diffusion.dpmpp_2m_sde", "steps": 15, "params": {"steps": 15, "use_karras_sigmas": true},
               "diffusers": {"use_karras_sigmas": true}}),
        // UniPC: bh2 at orders 1, 2 and 3, Karras σ's, leading spacing. (diffusers 0.35.2's bh1
        // returns NaN on the step to σ = 0, where B(h) = hh = −∞ multiplies an empty correction.)
        json!({"id": "diffusion.unipc", "steps": 10, "params": {"steps": 10}}),
        json!({"id": "diffusion.unipc", "steps": 7, "params": {"steps": 7, "solver_order": 3},
               "diffusers": {"solver_order": 3}}),
        json!({"id": "diffusion.unipc", "steps": 12, "params": {"steps": 12, "use_karras_sigmas": true},
               "diffusers": {"use_karras_sigmas": true}}),
        json!({"id": "diffusion.unipc", "steps": 5, "params": {"steps": 5, "timestep_spacing": "leading", "solver_order": 1},
               "diffusers": {"timestep_spacing": "leading", "solver_order": 1}}),
    ];
    let stream = host_normals(SEED, 1000);
    let request = json!({"noise": noise, "cases": cases, "stream": stream});
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/diffusers_reference.py");
    let want = run_python_reference(&script, &request);
    let ac: Vec<f64> = want["alphas_cumprod"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let alphas = Tensor::from_slice(&ac);
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    for (case, w) in cases.iter().zip(want["cases"].as_array().unwrap()) {
        let mut s = instantiate(&plugin, case["id"].as_str().unwrap(), case["params"].clone());
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> { Ok(x * 0.3 + (x * 2.0).sin() * 0.1 + 1e-4 * t) };
        let mut rng = SplitMix(SEED);
        let (x, nfe) = s.sample(&Tensor::from_slice(&noise), &mut eps, &alphas, None, &mut || rng.next_u64()).unwrap();
        assert_eq!(nfe, w["nfe"].as_u64().unwrap(), "{case}: model calls");
        assert_close(&to_vec(&x), &floats(&w["samples"]), &case.to_string());
    }
}

/// DDIM inversion maps data to the latents diffusers' `DDIMInverseScheduler` reaches, and DDIM
/// maps them back to the data as closely as diffusers' own round trip does.
#[test]
fn ddim_inversion_matches_diffusers_and_round_trips_as_closely() {
    let data = vec![0.8f64, -0.35, 0.1, 0.95, -0.6, 0.02];
    let cases = vec![
        json!({"id": "diffusion.ddim_inverse", "steps": 50, "params": {"steps": 50}}),
        json!({"id": "diffusion.ddim_inverse", "steps": 20, "params": {"steps": 20, "timestep_spacing": "trailing"},
               "diffusers": {"timestep_spacing": "trailing"}}),
    ];
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/diffusers_reference.py");
    let want = run_python_reference(&script, &json!({"noise": data, "cases": cases}));
    let alphas = Tensor::from_slice(&floats(&want["alphas_cumprod"]));
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    assert!(plugin.info.components.iter().any(|c| c.id == "diffusion.ddim_inverse" && c.inverts));
    for (case, w) in cases.iter().zip(want["cases"].as_array().unwrap()) {
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> { Ok(x * 0.3 + (x * 2.0).sin() * 0.1 + 1e-4 * t) };
        let mut inv = instantiate(&plugin, "diffusion.ddim_inverse", case["params"].clone());
        let (latents, nfe) = inv.sample(&Tensor::from_slice(&data), &mut eps, &alphas, None, &mut || 0).unwrap();
        assert_eq!(nfe, case["steps"].as_u64().unwrap());
        assert_close(&to_vec(&latents), &floats(&w["samples"]), &format!("{case}: latents"));
        let mut forward = case["params"].clone();
        forward["clip_sample"] = json!(false);
        let mut ddim = instantiate(&plugin, "diffusion.ddim", forward);
        let (back, _) = ddim.sample(&latents, &mut eps, &alphas, None, &mut || 0).unwrap();
        let theirs = floats(&w["reconstruction"]);
        assert_close(&to_vec(&back), &theirs, &format!("{case}: reconstruction"));
        let err = |r: &[f64]| r.iter().zip(&data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let (ours, reference) = (err(&to_vec(&back)), err(&theirs));
        assert!(ours <= reference * 1.01 + 1e-6, "{case}: round-trip error {ours} vs diffusers' {reference}");
    }
}

/// With the exact ε̂ of Gaussian data N(0.3, 0.2²), ε*(x, t) = √(1−ᾱ)(x − 0.3√ᾱ)/(0.04ᾱ + 1 − ᾱ),
/// inversion then DDIM returns the data, closer as the steps grow (the inversion evaluates ε̂
/// one level off, an error that vanishes with the step), and the latents are where the
/// probability-flow ODE takes the data: x_T ≈ (x − 0.3)/0.2, standard normal for data drawn
/// from that Gaussian.
#[test]
fn ddim_inversion_round_trips_a_gaussian_with_its_exact_denoiser() {
    let ac: Vec<f64> = {
        let mut a = 1.0;
        (0..1000)
            .map(|i| {
                a *= 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0);
                a
            })
            .collect()
    };
    let alphas = Tensor::from_slice(&ac);
    let ac_at = ac.clone();
    let mut eps = move |x: &Tensor, t: f64| -> Result<Tensor, String> {
        let a = ac_at[t as usize];
        Ok((x - 0.3 * a.sqrt()) * ((1.0 - a).sqrt() / (0.04 * a + 1.0 - a)))
    };
    let data = vec![0.3f64, 0.5, 0.1, -0.05, 0.62, 0.27];
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let mut errors = Vec::new();
    for steps in [10, 50, 250] {
        let params = json!({"steps": steps, "timestep_spacing": "trailing"});
        let mut inv = instantiate(&plugin, "diffusion.ddim_inverse", params.clone());
        let (latents, _) = inv.sample(&Tensor::from_slice(&data), &mut eps, &alphas, None, &mut || 0).unwrap();
        if steps == 250 {
            // The probability-flow ODE of a Gaussian: x_T = √ᾱ_T·0.3 + √(0.04ᾱ_T + 1 − ᾱ_T)·(x − 0.3)/0.2.
            let a = ac[999];
            for (zi, xi) in to_vec(&latents).iter().zip(&data) {
                let exact = a.sqrt() * 0.3 + (0.04 * a + 1.0 - a).sqrt() * (xi - 0.3) / 0.2;
                assert!((zi - exact).abs() < 0.05, "{steps} steps: latent {zi} for {xi}, exact {exact}");
            }
        }
        let mut forward = params;
        forward["clip_sample"] = json!(false);
        let mut ddim = instantiate(&plugin, "diffusion.ddim", forward);
        let (back, _) = ddim.sample(&latents, &mut eps, &alphas, None, &mut || 0).unwrap();
        errors.push(to_vec(&back).iter().zip(&data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max));
    }
    // First order in the step: 5× the steps, about a fifth of the error (measured 0.259, 0.075, 0.016).
    assert!(errors[0] > 3.0 * errors[1] && errors[1] > 3.0 * errors[2], "round-trip errors by steps: {errors:?}");
    assert!(errors[2] < 0.03, "round-trip errors by steps: {errors:?}");
}
