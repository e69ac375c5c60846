//! DualFast (docs/methods.md §3.9) through the real plugin boundary: the spec's DDIM and
//! DPM-Solver++(2M) step vectors and its 5-step DDIM trajectory on the exact ε of 1-D Gaussian
//! data, and `dualfast_c_max: 0` reproducing the base samplers bit for bit.

use serde_json::json;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_diffusion::ddim::{ddim_step, DdimParams};
use xlab_plugin_diffusion::dpmpp_2m::dpmpp_update;
use xlab_plugin_diffusion::dualfast::{CoefficientSchedule, Dualfast, Tau};
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

fn one(v: f64) -> Tensor {
    Tensor::from_slice(&[v])
}

fn value(t: Tensor) -> f64 {
    f64::try_from(t).unwrap()
}

/// §3.9: ᾱ_t = 0.5, ᾱ' = 0.8, x = 1, ε_i = 0.6, ε_τ = 0.2, c = 0.5: ε̃ = 0.8, x̂₀ = 0.614214,
/// x' = 0.907140 (plain DDIM: x̂₀ = 0.814214, x' = 0.996583).
#[test]
fn the_ddim_step_vector() {
    // c = 0.5 at the second of two steps under linear_index with c_max = 0.5.
    let mut d = Dualfast::new(0.5, CoefficientSchedule::LinearIndex, Tau::First, 2, 1000);
    assert_eq!(value(d.correct(0, 999.0, one(0.2))), 0.2, "the first step is its own ε_τ");
    let eps = d.correct(1, 500.0, one(0.6));
    assert!((value(eps.shallow_clone()) - 0.8).abs() < 1e-12);
    let p = DdimParams {
        steps: 2,
        eta: 0.0,
        clip_sample: false,
        clip_sample_range: 1.0,
        set_alpha_to_one: true,
        steps_offset: 0,
        timestep_spacing: Spacing::Leading,
        use_clipped_model_output: false,
        dualfast_c_max: 0.5,
        dualfast_schedule: CoefficientSchedule::LinearIndex,
        dualfast_tau: Tau::First,
    };
    let x0 = (1.0 - 0.5f64.sqrt() * 0.8) / 0.5f64.sqrt();
    assert!((x0 - 0.614214).abs() < 1e-6, "{x0}");
    let got = value(ddim_step(&p, &one(1.0), &eps, 0.5, 0.8, None));
    assert!((got - 0.907140).abs() < 1e-5, "{got}");
    let plain = value(ddim_step(&p, &one(1.0), &one(0.6), 0.5, 0.8, None));
    assert!((plain - 0.996583).abs() < 1e-6, "{plain}");
}

/// §3.9 with the §3.4 setup: VE σ 2.0 → 1.0 → 0.5, m_{i−1} = 0.2, x = 1, ε_i = 0.9, ε_τ = 1.2,
/// c = 0.5: ε̃ = 0.75, m̃ = 0.664214, the 2M step gives 1.03330218 (plain 0.932679).
#[test]
fn the_dpm_solver_step_vector() {
    let mut d = Dualfast::new(0.5, CoefficientSchedule::LinearIndex, Tau::First, 2, 1000);
    let _ = d.correct(0, 999.0, one(1.2));
    let eps = value(d.correct(1, 500.0, one(0.9)));
    assert!((eps - 0.75).abs() < 1e-12);
    // σ = 1: α = s = 1/√2, m = (x − s·ε)/α.
    let m = |e: f64| (1.0 - e / 2f64.sqrt()) * 2f64.sqrt();
    assert!((m(eps) - 0.664214).abs() < 1e-6);
    let step = |e: f64| value(dpmpp_update(&one(1.0), &one(m(e)), 1.0, 0.5, Some((2.0, &one(0.2)))));
    assert!((step(eps) - 1.03330218).abs() < 1e-7, "{}", step(eps));
    assert!((step(0.9) - 0.932679).abs() < 1e-6, "{}", step(0.9));
}

/// §3.9's trajectory: linear schedule, leading spacing t = 800…0 (the last step to ᾱ' = 1), no
/// clipping, x_T = 1, the exact ε of 1-D data N(0.5, 0.1²),
/// ε*(x, t) = √(1−ᾱ)(x − 0.5√ᾱ)/(0.01ᾱ + 1 − ᾱ); c_max = 0.5, linear_index: tau first ends at
/// 0.531009, tau prev at 0.530513, plain DDIM at 0.522823. Through the plugin.
#[test]
fn the_five_step_ddim_trajectory() {
    let ac = linear_alphas_cumprod();
    let alphas = Tensor::from_slice(&ac);
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let run = |extra: serde_json::Value| -> (f64, u64) {
        let mut params = json!({"steps": 5, "clip_sample": false});
        params.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let mut s = instantiate(&plugin, "diffusion.ddim", params);
        let ac = ac.clone();
        let mut eps = move |x: &Tensor, t: f64| -> Result<Tensor, String> {
            let a = ac[t as usize];
            Ok((x - 0.5 * a.sqrt()) * ((1.0 - a).sqrt() / (0.01 * a + 1.0 - a)))
        };
        let (x, nfe) = s.sample(&one(1.0), &mut eps, &alphas, None, &mut || 0).unwrap();
        (to_vec(&x)[0], nfe)
    };
    for (extra, want) in [
        (json!({}), 0.522823),
        (json!({"dualfast_c_max": 0.5}), 0.531009),
        (json!({"dualfast_c_max": 0.5, "dualfast_tau": "prev"}), 0.530513),
    ] {
        let (got, nfe) = run(extra.clone());
        assert!((got - want).abs() < 2e-6, "{extra}: {got}, the spec says {want}");
        assert_eq!(nfe, 5, "no extra evaluations");
    }
    let (later, _) = run(json!({"dualfast_c_max": 0.5, "dualfast_schedule": "linear_time"}));
    assert!((later - 0.522823).abs() > 1e-4, "linear_time changes the result: {later}");
}

/// `dualfast_c_max: 0`, given or not, is the base sampler bit for bit, for DDIM, DPM-Solver++(2M)
/// and its SDE variant; above 0 the samples move.
#[test]
fn c_max_zero_is_the_base_sampler_bit_for_bit() {
    let ac = linear_alphas_cumprod();
    let alphas = Tensor::from_slice(&ac);
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let noise = Tensor::from_slice(&[1.3f64, -0.7, 0.2, 2.1, -1.6, 0.05]);
    let draw = |id: &str, params: serde_json::Value| -> Vec<f64> {
        let mut s = instantiate(&plugin, id, params);
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> { Ok(x * 0.3 + (x * 2.0).sin() * 0.1 + 1e-4 * t) };
        let mut rng = SplitMix(7);
        to_vec(&s.sample(&noise, &mut eps, &alphas, None, &mut || rng.next_u64()).unwrap().0)
    };
    for id in ["diffusion.ddim", "diffusion.dpmpp_2m", "diffusion.dpmpp_2m_sde"] {
        let base = draw(id, json!({"steps": 8}));
        let zero = draw(id, json!({"steps": 8, "dualfast_c_max": 0.0, "dualfast_tau": "prev"}));
        assert!(base.iter().zip(&zero).all(|(a, b)| a.to_bits() == b.to_bits()), "{id}: {base:?} vs {zero:?}");
        let on = draw(id, json!({"steps": 8, "dualfast_c_max": 0.5}));
        assert!(base.iter().zip(&on).any(|(a, b)| (a - b).abs() > 1e-6), "{id}: DualFast changed nothing");
    }
}
