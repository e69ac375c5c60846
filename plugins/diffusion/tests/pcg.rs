//! `diffusion.pcg` (docs/methods.md §3.10) against the spec's Gaussian check, through the real
//! plugin boundary and exactly: with the exact oracles of a Gaussian, every sampler here is a
//! linear map of the initial noise and of the noise it draws, x_final = a·x_T + Σ_k b_k z_k, so
//! Var(x_final) = a² + Σ_k b_k² for x_T, z_k ~ N(0, 1). `a` comes from one run with x_T = 1 and
//! every draw 0; the b_k from one run of a batch with x_T = 0 whose row k gets z = 1 (to 1e-16)
//! at its k-th draw and 0 elsewhere: a host stream made to give exactly those normals.

use serde_json::json;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_host::testing::{built_plugin, instantiate, to_vec};
use xlab_plugin_host::Instance;

fn linear_alphas_cumprod() -> Vec<f64> {
    let mut acc = 1.0;
    (0..1000)
        .map(|i| {
            acc *= 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0);
            acc
        })
        .collect()
}

/// The 64-bit words that make `HostRng::normal` (Box–Muller, u₁ = 1 − U₁, u₂ = U₂) give `z` =
/// √(−2 ln u₁) at draw `j` when `one(j)`, and 0 otherwise (u₁ = 1); cos(2πu₂) = 1 always. Also
/// the exact value of that z.
fn stream(one: impl Fn(usize) -> bool) -> (impl FnMut() -> u64, f64) {
    let word = (((1.0 - (-0.5f64).exp()) * (1u64 << 53) as f64) as u64) << 11;
    let z = (-2.0 * (1.0 - (word >> 11) as f64 / (1u64 << 53) as f64).ln()).sqrt();
    let mut calls = 0usize;
    let next = move || {
        let (draw, first) = (calls / 2, calls.is_multiple_of(2));
        calls += 1;
        if first && one(draw) {
            word
        } else {
            0
        }
    };
    (next, z)
}

/// The variance of `id`'s samples with the Gaussian oracles: ε_c(x, t) = √(1−ᾱ_t)·x and
/// ε_u(x, t) = √(1−ᾱ_t)·x/(1+ᾱ_t); `guided` samplers see CFG at γ = 2, ε_u + 2(ε_c − ε_u), the
/// self-guiding PCG sees ε_c and asks for both. `draws` bounds the noise draws of one sample.
fn variance(id: &str, params: serde_json::Value, guided: bool, draws: usize) -> f64 {
    let ac = linear_alphas_cumprod();
    let alphas = Tensor::from_slice(&ac);
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let run = |noise: &Tensor, next: &mut dyn FnMut() -> u64| -> Vec<f64> {
        let mut s: Instance = instantiate(&plugin, id, params.clone());
        let parts = |x: &Tensor, t: f64| {
            let a = ac[t as usize];
            let c = x * (1.0 - a).sqrt();
            let u = &c / (1.0 + a);
            (c, u)
        };
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> {
            let (c, u) = parts(x, t);
            Ok(if guided { &u + (c - &u) * 2.0 } else { c })
        };
        let mut both = |x: &Tensor, t: f64| -> Result<(Tensor, Tensor), String> { Ok(parts(x, t)) };
        let (out, _) = s.sample_with(noise, &mut eps, Some(&mut both), &alphas, None, next).unwrap();
        to_vec(&out)
    };
    let (mut zeros, _) = stream(|_| false);
    let a = run(&Tensor::from_slice(&[1.0f64]), &mut zeros)[0];
    let b = draws.max(1);
    // Draw j of a batch of b rows is row j % b of draw j / b: row k gets z at its k-th draw.
    let (mut one_hot, z) = stream(move |j| j / b == j % b);
    let noise_part: f64 = run(
        &Tensor::zeros([b as i64], (xlab_plugin_api::tch::Kind::Double, xlab_plugin_api::tch::Device::Cpu)),
        &mut one_hot,
    )
    .iter()
    .map(|v| (v / z).powi(2))
    .sum();
    a * a + noise_part
}

/// docs/methods.md §3.10's table: final variances for N = 10 / 50 / 1000 (leading spacing, no
/// clipping, x_T ~ N(0, 1), γ = 2, PCG γ' = 3, K = 1): CFG-DDIM 0.312653 / 0.456368 / 0.497677;
/// CFG-DDPM 0.274521 / 0.479769 / 0.576549; PCG 0.560386 / 0.576053 / 0.582898; PCG with K = 5
/// at N = 1000: 0.513325. Each within 1e-6.
#[test]
fn the_gaussian_variance_table() {
    let check = |what: &str, got: f64, want: f64| {
        assert!((got - want).abs() < 1e-6, "{what}: variance {got:.7}, the spec says {want}");
    };
    for (n, ddim, ddpm, pcg) in
        [(10, 0.312653, 0.274521, 0.560386), (50, 0.456368, 0.479769, 0.576053), (1000, 0.497677, 0.576549, 0.582898)]
    {
        let plain = json!({"steps": n, "clip_sample": false});
        check(&format!("CFG-DDIM N={n}"), variance("diffusion.ddim", plain.clone(), true, 0), ddim);
        check(&format!("CFG-DDPM N={n}"), variance("diffusion.ddpm", plain.clone(), true, n), ddpm);
        check(&format!("PCG N={n}"), variance("diffusion.pcg", json!({"steps": n}), false, n), pcg);
    }
    let k5 = variance("diffusion.pcg", json!({"steps": 1000, "langevin_steps": 5}), false, 5 * 1000);
    check("PCG K=5 N=1000", k5, 0.513325);
}

/// One evaluation for the predictor and two (one batched pass) for each corrector step: 1 + 2K
/// per step, 1 on the last; the plugin asks for both predictions only in the corrector.
#[test]
fn evaluations_are_one_plus_two_k_per_step() {
    let ac = linear_alphas_cumprod();
    let alphas = Tensor::from_slice(&ac);
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    for (steps, k) in [(10u64, 1u64), (7, 3), (5, 0)] {
        let mut s = instantiate(&plugin, "diffusion.pcg", json!({"steps": steps, "langevin_steps": k}));
        let (mut singles, mut pairs) = (0u64, 0u64);
        let mut eps = |x: &Tensor, _t: f64| -> Result<Tensor, String> {
            singles += 1;
            Ok(x * 0.1)
        };
        let mut both = |x: &Tensor, _t: f64| -> Result<(Tensor, Tensor), String> {
            pairs += 1;
            Ok((x * 0.1, x * 0.05))
        };
        let (_, nfe) =
            s.sample_with(&Tensor::from_slice(&[0.4f64]), &mut eps, Some(&mut both), &alphas, None, &mut || 0).unwrap();
        assert_eq!((singles, pairs), (steps, k * (steps - 1)), "{steps} steps, K = {k}");
        assert_eq!(nfe, steps + 2 * k * (steps - 1));
    }
    // Without a conditional model the corrector cannot run.
    let mut s = instantiate(&plugin, "diffusion.pcg", json!({"steps": 4}));
    let mut eps = |x: &Tensor, _t: f64| -> Result<Tensor, String> { Ok(x * 0.1) };
    let err = s.sample(&Tensor::from_slice(&[0.4f64]), &mut eps, &alphas, None, &mut || 0).unwrap_err();
    assert!(err.contains("class-conditional"), "{err}");
}
