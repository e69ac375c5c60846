//! The SAM family's docs/methods.md section 1 vectors, through the real plugin boundary: the built
//! .so, loaded by the host's loader, stepping an exact quadratic (or least-squares) host.

use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_host::testing::{built_plugin, instantiate, to_vec, QuadraticDriver, SplitMix};
use xlab_plugin_host::{self as host, LoadedPlugin, StepDriver};

fn plugin() -> LoadedPlugin {
    host::load(&built_plugin("xlab_plugin_sam")).unwrap()
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

/// w = (3, 4), A = diag(1, 2): g = (3, 8).
fn quadratic(name: &str) -> QuadraticDriver {
    QuadraticDriver::new(&[(name, &[3.0, 4.0], &[1.0, 2.0])], 0.1)
}

/// The perturbation of the second pass, from its gradient: with curvature a, g' = a⊙(w + e).
fn perturbation(d: &QuadraticDriver, pass: usize, k: usize, w: &[f64], a: &[f64]) -> Vec<f64> {
    d.grads_seen[pass][k].iter().zip(w).zip(a).map(|((g, w), a)| g / a - w).collect()
}

#[test]
fn asam_both_reference_forms() {
    let p = plugin();
    // davda54 (adaptive=True): e = (0.4061183654, 1.9253018803), g_SAM = (3.4061183654, 11.8506037606).
    let mut asam = instantiate(&p, "sam.asam", serde_json::json!({"rho": 0.5, "variant": "davda54"}));
    let mut d = quadratic("layer.weight");
    asam.step(&mut d, 0, 0).unwrap();
    assert!(close(&d.grads_seen[1][0], &[3.4061183654, 11.8506037606], 1e-9), "{:?}", d.grads_seen[1][0]);
    assert_eq!(d.frozen_passes, 1, "davda54 bypasses BN on the second pass");
    // SamsungLabs with η = 0.01 on a "weight" parameter.
    let mut asam = instantiate(&p, "sam.asam", serde_json::json!({"rho": 0.5, "eta": 0.01}));
    let mut d = quadratic("layer.weight");
    asam.step(&mut d, 0, 0).unwrap();
    let e = perturbation(&d, 1, 0, &[3.0, 4.0], &[1.0, 2.0]);
    assert!(close(&e, &[0.4077859491, 1.9299974879], 1e-9), "{e:?}");
    assert!(close(&d.grads_seen[1][0], &[3.4077859491, 11.8599949759], 1e-9));
    assert_eq!(d.frozen_passes, 0, "the official ASAM updates running statistics in both passes");
    // The descent subtracts e: the weights are back at w before SGD.
    assert!(close(&d.weights()[0], &[3.0 - 0.1 * 3.4077859491, 4.0 - 0.1 * 11.8599949759], 1e-12));
    // A parameter without "weight" in its name gets T = 1: plain SAM with the 1e-16 epsilon.
    let mut asam = instantiate(&p, "sam.asam", serde_json::json!({"rho": 0.5, "eta": 0.01}));
    let mut d = quadratic("layer.bias");
    asam.step(&mut d, 0, 0).unwrap();
    let e = perturbation(&d, 1, 0, &[3.0, 4.0], &[1.0, 2.0]);
    let n = (9.0f64 + 64.0).sqrt();
    assert!(close(&e, &[0.5 * 3.0 / n, 0.5 * 8.0 / n], 1e-12), "{e:?}");
}

#[test]
fn gam_matches_the_cifar10_resnet_vector() {
    let p = plugin();
    let mut gam = instantiate(&p, "sam.gam", serde_json::json!({}));
    let mut d = quadratic("w");
    gam.step(&mut d, 0, 0).unwrap();
    assert_eq!(d.passes, 4, "4F+4B");
    assert_eq!(d.frozen_passes, 3, "running statistics update in the first pass only");
    assert!(close(&d.grads_seen[1][0], &[3.0105337032, 8.0561797507], 1e-9), "g1 {:?}", d.grads_seen[1][0]);
    assert!(close(&d.grads_seen[2][0], &[3.0368577070, 8.3931488748], 1e-9), "g2 {:?}", d.grads_seen[2][0]);
    assert!(close(&d.grads_seen[3][0], &[3.0470648743, 8.4495692163], 1e-9), "g3 {:?}", d.grads_seen[3][0]);
    // G = (3.0387827803, 8.4119053586); SGD lr 0.1 gives w' = (2.6961217220, 3.1588094641).
    assert!(close(&d.weights()[0], &[2.6961217220, 3.1588094641], 1e-9), "{:?}", d.weights());
    let c = d.logged.iter().find(|(k, _)| k == "gam.cosine").unwrap().1;
    assert!((c - 0.9999823622).abs() < 1e-9, "{c}");
}

#[test]
fn fsam_perturbs_only_the_masked_entries() {
    let p = plugin();
    // Tensors a (g = (3, 4)) and b (g = (0, 1)), keep only the largest g² entry, ρ = 1:
    // ‖g‖ = √26, e_a = (0, 4/√26) = (0, 0.7844645), e_b = (0, 0).
    let mut fsam = instantiate(&p, "sam.fsam", serde_json::json!({"rho": 1.0, "keep_ratio": 0.34, "mask_iter": 1}));
    let mut d = QuadraticDriver::new(&[("a", &[3.0, 4.0], &[1.0, 1.0]), ("b", &[0.0, 1.0], &[1.0, 1.0])], 0.1);
    fsam.step(&mut d, 0, 0).unwrap();
    let e_a = perturbation(&d, 1, 0, &[3.0, 4.0], &[1.0, 1.0]);
    let e_b = perturbation(&d, 1, 1, &[0.0, 1.0], &[1.0, 1.0]);
    assert!(close(&e_a, &[0.0, 4.0 / 26f64.sqrt()], 1e-6), "{e_a:?}");
    assert!(close(&e_b, &[0.0, 0.0], 1e-12), "{e_b:?}");
    // A bias is outside the maskable set: perturbed unmasked.
    let mut fsam = instantiate(&p, "sam.fsam", serde_json::json!({"rho": 1.0, "keep_ratio": 0.5, "mask_iter": 1}));
    let mut d =
        QuadraticDriver::new(&[("a.weight", &[3.0, 4.0], &[1.0, 1.0]), ("a.bias", &[0.0, 1.0], &[1.0, 1.0])], 0.1);
    fsam.step(&mut d, 0, 0).unwrap();
    let e_bias = perturbation(&d, 1, 1, &[0.0, 1.0], &[1.0, 1.0]);
    assert!(close(&e_bias, &[0.0, 1.0 / 26f64.sqrt()], 1e-6), "{e_bias:?}");
    // The mask is state: it survives save/load and is kept between recomputations.
    let (json, tensors) = fsam.save_state().unwrap();
    assert_eq!(tensors.len(), 1, "one maskable tensor: {json}");
    assert_eq!(to_vec(&tensors[0].1), vec![0.0, 1.0]);
}

#[test]
fn sam_on_perturbs_normalization_parameters_only() {
    let p = plugin();
    // conv.weight (g = (3, 4)) and bn.weight (g = (0, 1)), SAM_ON, ρ = 0.5: only bn.weight
    // moves, by (0, 0.5).
    let mut on = instantiate(&p, "sam.sam_on", serde_json::json!({"rho": 0.5, "adaptive": false}));
    let mut d = QuadraticDriver::new(
        &[("conv.weight", &[3.0, 4.0], &[1.0, 1.0]), ("bn.weight", &[0.0, 1.0], &[1.0, 1.0])],
        0.1,
    );
    on.step(&mut d, 0, 0).unwrap();
    assert!(close(&perturbation(&d, 1, 0, &[3.0, 4.0], &[1.0, 1.0]), &[0.0, 0.0], 1e-12));
    assert!(close(&perturbation(&d, 1, 1, &[0.0, 1.0], &[1.0, 1.0]), &[0.0, 0.5], 1e-12));
    // Both still descend with the gradient at the perturbed point; no BN bypass.
    assert_eq!(d.frozen_passes, 0);
    assert!(close(&d.weights()[0], &[3.0 - 0.3, 4.0 - 0.4], 1e-12));
    assert!(close(&d.weights()[1], &[0.0, 1.0 - 0.1 * 1.5], 1e-12));
    // ASAM_ON: e = ρT²g/n with T = |w| + η.
    let mut on = instantiate(&p, "sam.sam_on", serde_json::json!({"rho": 0.5, "eta": 0.01}));
    let mut d = QuadraticDriver::new(&[("bn.weight", &[3.0, 4.0], &[1.0, 2.0])], 0.1);
    on.step(&mut d, 0, 0).unwrap();
    let e = perturbation(&d, 1, 0, &[3.0, 4.0], &[1.0, 2.0]);
    assert!(close(&e, &[0.4077859491, 1.9299974879], 1e-9), "{e:?}");
    // Outside the window the step is a plain base step (one pass).
    let mut late = instantiate(&p, "sam.sam_on", serde_json::json!({"start_epoch": 3}));
    let mut d = QuadraticDriver::new(&[("bn.weight", &[3.0, 4.0], &[1.0, 2.0])], 0.1);
    late.step(&mut d, 1, 0).unwrap();
    assert_eq!(d.passes, 1);
}

#[test]
fn amp_projects_each_tensor_onto_its_own_ball() {
    let p = plugin();
    // a (g = (3, 4)) and b (g = (0, 1)), ε = 0.5, inner_lr 1: dev_a = (0.3, 0.4), dev_b = (0, 0.5).
    let mut amp = instantiate(&p, "sam.amp", serde_json::json!({}));
    let mut d = QuadraticDriver::new(&[("a", &[3.0, 4.0], &[1.0, 1.0]), ("b", &[0.0, 1.0], &[1.0, 1.0])], 0.1);
    amp.step(&mut d, 0, 0).unwrap();
    assert!(close(&perturbation(&d, 1, 0, &[3.0, 4.0], &[1.0, 1.0]), &[0.3, 0.4], 1e-12));
    assert!(close(&perturbation(&d, 1, 1, &[0.0, 1.0], &[1.0, 1.0]), &[0.0, 0.5], 1e-12));
    assert!(close(&d.weights()[0], &[3.0 - 0.33, 4.0 - 0.44], 1e-12), "{:?}", d.weights());
    // The clip inside every pass: with clip 1 the first gradient (global norm √26) is scaled to
    // norm 1 before the ascent; with ε = 10 nothing is projected, so e_a = (3, 4)/√26.
    let mut amp = instantiate(&p, "sam.amp", serde_json::json!({"clip": 1.0, "epsilon": 10.0}));
    let mut d = QuadraticDriver::new(&[("a", &[3.0, 4.0], &[1.0, 1.0]), ("b", &[0.0, 1.0], &[1.0, 1.0])], 0.1);
    amp.step(&mut d, 0, 0).unwrap();
    let s = 1.0 / (26f64.sqrt() + 1e-6);
    assert!(close(&perturbation(&d, 1, 0, &[3.0, 4.0], &[1.0, 1.0]), &[3.0 * s, 4.0 * s], 1e-9));
}

#[test]
fn fd_gr_is_exact_on_a_quadratic() {
    let p = plugin();
    // G = g + γHg = (3.3, 9.6) for any ε; SGD lr 0.1 gives w' = (2.67, 3.04).
    for (direction, eps, normalized) in
        [("forward", 0.1, false), ("forward", 0.01, false), ("backward", 0.3, false), ("forward", 0.05, true)]
    {
        let params =
            serde_json::json!({"gamma": 0.1, "epsilon": eps, "direction": direction, "normalized": normalized});
        let mut fd = instantiate(&p, "sam.fd_gr", params);
        let mut d = quadratic("w");
        fd.step(&mut d, 0, 0).unwrap();
        assert!(close(&d.weights()[0], &[2.67, 3.04], 1e-9), "{direction} ε={eps}: {:?}", d.weights());
    }
    // With ε = γ, F-GR is the unnormalised SAM gradient ∇L(w + γg) = (3.3, 9.6) as well.
    let mut fd = instantiate(&p, "sam.fd_gr", serde_json::json!({"gamma": 0.1, "epsilon": 0.1}));
    let mut d = quadratic("w");
    fd.step(&mut d, 0, 0).unwrap();
    assert!(close(&d.grads_seen[1][0], &[3.3, 9.6], 1e-12), "{:?}", d.grads_seen[1][0]);
}

/// Least squares over rows: L = mean_i ½(x_i·w − y_i)², with passes on row ranges.
struct Rows {
    w: Tensor,
    x: Tensor,
    y: Tensor,
    lr: f64,
    passes: Vec<(usize, usize)>,
}

impl Rows {
    fn new(n: usize, seed: u64) -> Self {
        let mut r = SplitMix(seed);
        let mut u = || (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let x: Vec<f64> = (0..2 * n).map(|_| u()).collect();
        let y: Vec<f64> = (0..n).map(|_| u()).collect();
        Rows {
            w: Tensor::from_slice(&[0.7f64, -0.4]).set_requires_grad(true),
            x: Tensor::from_slice(&x).reshape([n as i64, 2]),
            y: Tensor::from_slice(&y),
            lr: 0.1,
            passes: vec![],
        }
    }

    /// ∇ of the mean loss over rows lo..hi at w.
    fn grad_at(&self, w: &[f64], lo: usize, hi: usize) -> Vec<f64> {
        let x = to_vec(&self.x);
        let y = to_vec(&self.y);
        let mut g = [0.0, 0.0];
        for i in lo..hi {
            let r = x[2 * i] * w[0] + x[2 * i + 1] * w[1] - y[i];
            g[0] += r * x[2 * i] / (hi - lo) as f64;
            g[1] += r * x[2 * i + 1] / (hi - lo) as f64;
        }
        g.to_vec()
    }
}

impl StepDriver for Rows {
    fn forward_backward(&mut self) -> Result<f64, String> {
        let n = self.batch_size();
        self.forward_backward_rows(0, n)
    }
    fn batch_size(&self) -> usize {
        self.y.size()[0] as usize
    }
    fn forward_backward_rows(&mut self, lo: usize, hi: usize) -> Result<f64, String> {
        self.passes.push((lo, hi));
        let mut g = self.w.grad();
        if g.defined() {
            let _ = g.zero_();
        }
        let x = self.x.narrow(0, lo as i64, (hi - lo) as i64);
        let y = self.y.narrow(0, lo as i64, (hi - lo) as i64);
        let r = x.matmul(&self.w) - y;
        let loss = (&r * &r).mean(Kind::Double) * 0.5;
        loss.backward();
        f64::try_from(&loss).map_err(|e| e.to_string())
    }
    fn n_params(&self) -> usize {
        1
    }
    fn param(&mut self, _: usize) -> (&mut Tensor, &str, u32) {
        (&mut self.w, "w", xlab_plugin_api::abi::tags::WEIGHT)
    }
    fn optimizer_step(&mut self) -> Result<(), String> {
        xlab_plugin_api::tch::no_grad(|| {
            let g = self.w.grad();
            let _ = self.w.f_sub_(&(g * self.lr)).map_err(|e| e.to_string())?;
            Ok(())
        })
    }
    fn freeze_norm_stats(&mut self, _: bool) {}
    fn next_u64(&mut self) -> u64 {
        0
    }
    fn log(&mut self, _: &str, _: f64) {}
}

#[test]
fn m_sharpness_perturbs_each_chunk_with_its_own_gradient() {
    let p = plugin();
    let rho = 0.3;
    // m = B is ordinary SAM, exactly (docs/methods.md §1.3).
    let mut whole = Rows::new(12, 1);
    instantiate(&p, "sam.sam", serde_json::json!({"rho": rho, "m": 12})).step(&mut whole, 0, 0).unwrap();
    let mut sam = Rows::new(12, 1);
    instantiate(&p, "sam.sam", serde_json::json!({"rho": rho})).step(&mut sam, 0, 0).unwrap();
    assert_eq!(to_vec(&whole.w), to_vec(&sam.w));
    assert_eq!(whole.passes, vec![(0, 12), (0, 12)]);
    // m = 5 over 12 rows: chunks 0..5, 5..10, 10..12, each perturbed by its own gradient; the
    // perturbed gradients are averaged by row count.
    let mut rows = Rows::new(12, 1);
    let w0 = to_vec(&rows.w);
    let mut expect = [0.0, 0.0];
    for (lo, hi) in [(0, 5), (5, 10), (10, 12)] {
        let g = rows.grad_at(&w0, lo, hi);
        let n = (g[0] * g[0] + g[1] * g[1]).sqrt();
        let we = [w0[0] + rho * g[0] / (n + 1e-12), w0[1] + rho * g[1] / (n + 1e-12)];
        let gp = rows.grad_at(&we, lo, hi);
        let share = (hi - lo) as f64 / 12.0;
        expect[0] += share * gp[0];
        expect[1] += share * gp[1];
    }
    instantiate(&p, "sam.sam", serde_json::json!({"rho": rho, "m": 5})).step(&mut rows, 0, 0).unwrap();
    assert_eq!(rows.passes, vec![(0, 5), (0, 5), (5, 10), (5, 10), (10, 12), (10, 12)]);
    let want = [w0[0] - 0.1 * expect[0], w0[1] - 0.1 * expect[1]];
    assert!(close(&to_vec(&rows.w), &want, 1e-12), "{:?} vs {want:?}", to_vec(&rows.w));
}

#[test]
fn saf_compares_with_the_logits_of_minus_epoch_epochs_ago() {
    let p = plugin();
    let params = serde_json::json!({"lambda": 0.5, "tau": 2.0, "minus_epoch": 1, "kl_start": 0, "kl_end": 10});
    let mut saf = instantiate(&p, "sam.saf", params.clone());
    let info = xlab_plugin_api::RunInfo { num_classes: 2, n_train: 4, ..Default::default() };
    saf.setup(&info).unwrap();
    let idx = Tensor::from_slice(&[2i64, 0]);
    let losses = Tensor::from_slice(&[0.3f32, 0.7]);
    let old = Tensor::from_slice(&[1.0f32, -1.0, 0.5, 0.0]).reshape([2, 2]);
    let now = Tensor::from_slice(&[0.2f32, 0.4, -0.3, 0.9]).reshape([2, 2]).set_requires_grad(true);
    // Epoch 0: the KL term is off (kl_start = 0 is strict); the logits are stored.
    saf.on_epoch(0).unwrap();
    let l0 = saf.objective_with_logits(&losses, &losses, None, &idx, Some(&old), true, &mut |_, _| {}).unwrap();
    assert!((f64::try_from(&l0).unwrap() - 0.5).abs() < 1e-7);
    // Epoch 1 reads what epoch 0 wrote for the same examples.
    saf.on_epoch(1).unwrap();
    let mut logged = vec![];
    let l1 = saf
        .objective_with_logits(&losses, &losses, None, &idx, Some(&now), true, &mut |k, v| {
            logged.push((k.to_string(), v))
        })
        .unwrap();
    let kl = |z: [f64; 2], r: [f64; 2]| {
        let sm = |v: [f64; 2]| {
            let e = [(v[0] / 2.0).exp(), (v[1] / 2.0).exp()];
            [e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1])]
        };
        let (pr, q) = (sm(r), sm(z));
        pr[0] * (pr[0].ln() - q[0].ln()) + pr[1] * (pr[1].ln() - q[1].ln())
    };
    let want = (0.3 + 0.5 * 4.0 * kl([0.2, 0.4], [1.0, -1.0]) + 0.7 + 0.5 * 4.0 * kl([-0.3, 0.9], [0.5, 0.0])) / 2.0;
    assert!((f64::try_from(&l1).unwrap() - want).abs() < 1e-6, "{l1} vs {want}");
    l1.backward();
    assert!(now.grad().defined(), "the KL term's gradient flows into the current logits");
    assert!(logged.iter().any(|(k, _)| k == "saf.kl"));
    // The buffer is state: a restored instance continues identically.
    let (state, tensors) = saf.save_state().unwrap();
    let mut restored = instantiate(&p, "sam.saf", params);
    restored.setup(&info).unwrap();
    restored.load_state(&state, &tensors).unwrap();
    saf.on_epoch(2).unwrap();
    restored.on_epoch(2).unwrap();
    let a = saf.objective_with_logits(&losses, &losses, None, &idx, Some(&old), true, &mut |_, _| {}).unwrap();
    let b = restored.objective_with_logits(&losses, &losses, None, &idx, Some(&old), true, &mut |_, _| {}).unwrap();
    assert_eq!(f64::try_from(&a).unwrap(), f64::try_from(&b).unwrap());
}

/// L = w⁴/4 in one dimension: ∇L = w³, a curvature that changes with w.
struct Quartic {
    w: Tensor,
}

impl StepDriver for Quartic {
    fn forward_backward(&mut self) -> Result<f64, String> {
        let mut g = self.w.grad();
        if g.defined() {
            let _ = g.zero_();
        }
        let loss = self.w.pow_tensor_scalar(4).sum(Kind::Double) / 4.0;
        loss.backward();
        f64::try_from(&loss).map_err(|e| e.to_string())
    }
    fn n_params(&self) -> usize {
        1
    }
    fn param(&mut self, _: usize) -> (&mut Tensor, &str, u32) {
        (&mut self.w, "w", xlab_plugin_api::abi::tags::WEIGHT)
    }
    fn optimizer_step(&mut self) -> Result<(), String> {
        // SGD with lr 1: w' = w − G, so G = w − w'.
        xlab_plugin_api::tch::no_grad(|| {
            let g = self.w.grad();
            let _ = self.w.f_sub_(&g).map_err(|e| e.to_string())?;
            Ok(())
        })
    }
    fn freeze_norm_stats(&mut self, _: bool) {}
    fn next_u64(&mut self) -> u64 {
        0
    }
    fn log(&mut self, _: &str, _: f64) {}
}

#[test]
fn fd_gr_quartic_vectors_of_methods_md() {
    // L = w⁴/4 at w = 1 with γ = ε = 0.1: F-GR 1.331 (= 1.1³), B-GR 1.271 (exact: 1.3).
    let p = plugin();
    for (direction, want) in [("forward", 1.331), ("backward", 1.271)] {
        let params = serde_json::json!({"gamma": 0.1, "epsilon": 0.1, "direction": direction});
        let mut fd = instantiate(&p, "sam.fd_gr", params);
        let mut d = Quartic { w: Tensor::from_slice(&[1.0f64]).set_requires_grad(true) };
        fd.step(&mut d, 0, 0).unwrap();
        let g = 1.0 - to_vec(&d.w)[0];
        assert!((g - want).abs() < 1e-12, "{direction}: G = {g}");
    }
}
