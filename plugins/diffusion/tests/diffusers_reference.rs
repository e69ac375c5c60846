//! The samplers against diffusers itself: `tests/reference/diffusers_reference.py` runs
//! diffusers' DDIM, DPM-Solver++(2M), Euler and Heun schedulers from the same noise with the
//! same deterministic model outputs and schedule; the plugins, through the real boundary, must
//! produce the same samples (to float32 precision: diffusers keeps the schedule in float32 and
//! DPM-Solver++ casts samples to float32) and the same number of model calls. Needs the
//! project's Python environment with diffusers (`make setup`), or `XLAB_PYTHON`.

use serde_json::json;
use std::path::PathBuf;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_host::testing::{built_plugin, instantiate, run_python_reference, to_vec};

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
    ];
    let request = json!({"noise": noise, "cases": cases});
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/diffusers_reference.py");
    let want = run_python_reference(&script, &request);
    let ac: Vec<f64> = want["alphas_cumprod"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let alphas = Tensor::from_slice(&ac);
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    for (case, w) in cases.iter().zip(want["cases"].as_array().unwrap()) {
        let mut s = instantiate(&plugin, case["id"].as_str().unwrap(), case["params"].clone());
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> { Ok(x * 0.3 + (x * 2.0).sin() * 0.1 + 1e-4 * t) };
        let (x, nfe) = s.sample(&Tensor::from_slice(&noise), &mut eps, &alphas, None, &mut || 0).unwrap();
        assert_eq!(nfe, w["nfe"].as_u64().unwrap(), "{case}: model calls");
        let expect: Vec<f64> = w["samples"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got = to_vec(&x);
        for (a, b) in got.iter().zip(&expect) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{case}: xlab {got:?} vs diffusers {expect:?}");
        }
    }
}
