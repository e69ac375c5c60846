//! `dro.group_dro`: docs/methods.md §4.1 vectors through the real boundary, state across save/load,
//! and a line-by-line port of the reference `LossComputer.compute_robust_loss` for a few steps.

use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::{RunInfo, Sampling};
use xlab_plugin_host::testing::{built_plugin, conformance, instantiate};

fn info(counts: Vec<u64>) -> RunInfo {
    RunInfo {
        num_classes: 2,
        n_train: counts.iter().sum(),
        group_counts: counts,
        epochs: 1,
        steps_per_epoch: 1,
        ..Default::default()
    }
}

fn q_of(logged: &[(String, f64)]) -> Vec<f64> {
    let mut q: Vec<(String, f64)> = logged.iter().filter(|(k, _)| k.starts_with("dro.q.")).cloned().collect();
    q.sort_by(|a, b| a.0.cmp(&b.0));
    q.into_iter().map(|(_, v)| v).collect()
}

#[test]
fn passes_the_conformance_kit() {
    conformance(&built_plugin("xlab_plugin_dro"));
}

/// G = 2, q = (½, ½), η = 0.01, group losses (1, 2), no adjustment:
/// q = (0.4975000208, 0.5024999792), loss 1.5024999792.
#[test]
fn matches_the_methods_vector_through_the_boundary() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_dro")).unwrap();
    let mut dro = instantiate(&plugin, "dro.group_dro", serde_json::json!({}));
    dro.setup(&info(vec![10, 10])).unwrap();
    // Group 0 losses average 1, group 1 losses average 2.
    let losses = Tensor::from_slice(&[0.5f64, 1.5, 2.0, 1.0, 3.0]).set_requires_grad(true);
    let group = Tensor::from_slice(&[0i64, 0, 1, 1, 1]);
    let idx = Tensor::arange(5, (Kind::Int64, xlab_plugin_api::tch::Device::Cpu));
    let mut logged = vec![];
    let loss =
        dro.objective(&losses, &losses, Some(&group), &idx, true, &mut |k, v| logged.push((k.to_string(), v))).unwrap();
    let q = q_of(&logged);
    assert!((q[0] - 0.4975000208).abs() < 1e-10 && (q[1] - 0.5024999792).abs() < 1e-10, "{q:?}");
    assert!((f64::try_from(&loss).unwrap() - 1.5024999792).abs() < 1e-10);
    // The gradient flows to the examples: q_g / n_g each.
    loss.backward();
    let g: Vec<f64> = Vec::try_from(losses.grad()).unwrap();
    assert!((g[0] - 0.4975000208 / 2.0).abs() < 1e-10 && (g[4] - 0.5024999792 / 3.0).abs() < 1e-10, "{g:?}");
    // A second pass of the same step (e.g. SAM's) does not move q again.
    let mut logged2 = vec![];
    let loss2 = dro
        .objective(&losses, &losses, Some(&group), &idx, false, &mut |k, v| logged2.push((k.to_string(), v)))
        .unwrap();
    assert!((f64::try_from(&loss2).unwrap() - 1.5024999792).abs() < 1e-10);
    assert!(logged2.is_empty());
}

#[test]
fn absent_groups_count_as_zero_loss_and_setup_needs_groups() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_dro")).unwrap();
    let mut dro = instantiate(&plugin, "dro.group_dro", serde_json::json!({"step_size": 1.0}));
    let err = dro.setup(&info(vec![])).unwrap_err();
    assert!(err.contains("needs data with group labels"), "{err}");
    dro.setup(&info(vec![5, 5, 5])).unwrap();
    let losses = Tensor::from_slice(&[2.0f64, 2.0]);
    let group = Tensor::from_slice(&[1i64, 1]);
    let idx = Tensor::from_slice(&[0i64, 1]);
    let mut logged = vec![];
    let _ =
        dro.objective(&losses, &losses, Some(&group), &idx, true, &mut |k, v| logged.push((k.to_string(), v))).unwrap();
    // q ∝ (1, e², 1)/3
    let e2 = (2.0f64).exp();
    let q = q_of(&logged);
    let expect = [1.0 / (2.0 + e2), e2 / (2.0 + e2), 1.0 / (2.0 + e2)];
    for (a, b) in q.iter().zip(expect) {
        assert!((a - b).abs() < 1e-12, "{q:?}");
    }
}

/// The reference `compute_robust_loss`, ported operation for operation (float64), including the
/// in-place adjustment and the EMA, run side by side with the plugin for several batches.
#[test]
fn matches_a_port_of_the_reference_loss_computer() {
    struct Reference {
        q: Vec<f64>,
        adj: Vec<f64>,
        eta: f64,
        normalize: bool,
    }
    impl Reference {
        fn step(&mut self, losses: &[f64], groups: &[usize]) -> f64 {
            let g = self.q.len();
            let mut sums = vec![0.0; g];
            let mut counts = vec![0.0; g];
            for (l, &k) in losses.iter().zip(groups) {
                sums[k] += l;
                counts[k] += 1.0;
            }
            let mut group_loss: Vec<f64> =
                sums.iter().zip(&counts).map(|(s, c): (&f64, &f64)| s / c.max(1.0)).collect();
            if self.adj.iter().all(|a| *a > 0.0) {
                for (l, a) in group_loss.iter_mut().zip(&self.adj) {
                    *l += a; // in place: group_loss itself changes
                }
            }
            let mut adjusted = group_loss.clone();
            if self.normalize {
                let s: f64 = adjusted.iter().sum();
                adjusted.iter_mut().for_each(|v| *v /= s);
            }
            for (q, l) in self.q.iter_mut().zip(&adjusted) {
                *q *= (self.eta * l).exp();
            }
            let s: f64 = self.q.iter().sum();
            self.q.iter_mut().for_each(|v| *v /= s);
            group_loss.iter().zip(&self.q).map(|(l, q)| l * q).sum()
        }
    }
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_dro")).unwrap();
    for (c, normalize) in [(0.0, false), (2.0, false), (1.0, true)] {
        let counts = vec![40u64, 10, 10, 40];
        let mut dro = instantiate(
            &plugin,
            "dro.group_dro",
            serde_json::json!({"step_size": 0.1, "adjustment": c, "normalize_loss": normalize}),
        );
        dro.setup(&info(counts.clone())).unwrap();
        let mut reference = Reference {
            q: vec![0.25; 4],
            adj: counts.iter().map(|n| c / (*n as f64).sqrt()).collect(),
            eta: 0.1,
            normalize,
        };
        let mut state = 12345u64;
        for step in 0..6 {
            let mut next = || {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64
            };
            let groups: Vec<usize> =
                (0..16).map(|i| if step == 3 { i % 2 } else { (next() * 4.0) as usize % 4 }).collect();
            let losses: Vec<f64> = (0..16).map(|_| next() * 3.0).collect();
            let expect = reference.step(&losses, &groups);
            let lt = Tensor::from_slice(&losses);
            let gt = Tensor::from_slice(&groups.iter().map(|&g| g as i64).collect::<Vec<_>>());
            let idx = Tensor::arange(16, (Kind::Int64, xlab_plugin_api::tch::Device::Cpu));
            let got = dro.objective(&lt, &lt, Some(&gt), &idx, true, &mut |_, _| {}).unwrap();
            let got = f64::try_from(got).unwrap();
            assert!((got - expect).abs() < 1e-12, "C={c} normalize={normalize} step {step}: {got} vs {expect}");
        }
        // State survives a save/load into a fresh instance.
        let (json, tensors) = dro.save_state().unwrap();
        let mut restored = instantiate(
            &plugin,
            "dro.group_dro",
            serde_json::json!({"step_size": 0.1, "adjustment": c, "normalize_loss": normalize}),
        );
        restored.setup(&info(counts)).unwrap();
        restored.load_state(&json, &tensors).unwrap();
        let q: Vec<f64> = serde_json::from_value(json["q"].clone()).unwrap();
        for (a, b) in q.iter().zip(&reference.q) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}

/// `dro.reweight` through the boundary: weight N/N_g for every example, the plain mean loss.
#[test]
fn reweight_gives_every_group_equal_total_weight() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_dro")).unwrap();
    let mut rw = instantiate(&plugin, "dro.reweight", serde_json::json!({}));
    let groups = vec![0i64, 0, 0, 1, 2, 2];
    let run = RunInfo { group_counts: vec![3, 1, 2], train_groups: groups.clone(), n_train: 6, ..Default::default() };
    rw.setup(&run).unwrap();
    let Sampling::Weighted(w) = rw.sampling(0, 6).unwrap() else { panic!("weights are set") };
    assert_eq!(w, vec![2.0, 2.0, 2.0, 6.0, 3.0, 3.0]);
    let per_group: Vec<f64> =
        (0..3).map(|g| groups.iter().zip(&w).filter(|(k, _)| **k == g).map(|(_, x)| x).sum()).collect();
    assert_eq!(per_group, vec![6.0, 6.0, 6.0]);
    let losses = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    let idx = Tensor::from_slice(&[0i64, 1, 2]);
    let loss = rw.objective(&losses, &losses, None, &idx, true, &mut |_, _| {}).unwrap();
    assert_eq!(f64::try_from(loss).unwrap(), 2.0);
    let mut bare = instantiate(&plugin, "dro.reweight", serde_json::json!({}));
    assert!(bare.setup(&RunInfo::default()).unwrap_err().contains("needs data with group labels"));
}
