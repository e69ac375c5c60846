//! `dro.cvar`, `dro.chi2`, `dro.jtt` and `dro.subsample` through the real plugin boundary:
//! the docs/methods.md §4.2 and 4.3 vectors, the dual forms and their learned η across save/load,
//! and JTT reading its parent's error set from a run folder.

use serde_json::json;
use xlab_plugin_api::artifacts::{train_errors_path, TrainErrors};
use xlab_plugin_api::tch::{Device, Kind, Tensor};
use xlab_plugin_api::{ParentRef, RunInfo, Sampling};
use xlab_plugin_host::testing::{built_plugin, instantiate};
use xlab_plugin_host::{self as host, Instance, LoadedPlugin};

fn plugin() -> LoadedPlugin {
    host::load(&built_plugin("xlab_plugin_dro")).unwrap()
}

fn info(n: u64) -> RunInfo {
    RunInfo { num_classes: 2, n_train: n, epochs: 1, steps_per_epoch: 1, ..Default::default() }
}

/// Loss and d loss / d v for v = (1, 2, 3, 4, 5); logs go to `logged`.
fn on_vector(inst: &mut Instance, first: bool, logged: &mut Vec<(String, f64)>) -> (f64, Vec<f64>) {
    let v = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0]).set_requires_grad(true);
    let idx = Tensor::arange(5, (Kind::Int64, Device::Cpu));
    let loss = inst.objective(&v, &v, None, &idx, first, &mut |k, x| logged.push((k.to_string(), x))).unwrap();
    loss.backward();
    (f64::try_from(&loss).unwrap(), Vec::<f64>::try_from(v.grad()).unwrap())
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn cvar_vector_through_the_boundary() {
    let p = plugin();
    let mut cvar = instantiate(&p, "dro.cvar", json!({"alpha": 0.5}));
    cvar.setup(&info(5)).unwrap();
    let (loss, grad) = on_vector(&mut cvar, true, &mut vec![]);
    assert!((loss - 4.2).abs() < 1e-12, "{loss}");
    // The gradient with respect to v is p: the weights carry no gradient.
    assert!(close(&grad, &[0.0, 0.0, 0.2, 0.4, 0.4], 1e-12), "{grad:?}");
}

#[test]
fn chi2_vector_through_the_boundary_and_its_dual_at_the_optimum() {
    let p = plugin();
    let mut chi2 = instantiate(&p, "dro.chi2", json!({"rho": 0.5, "tol": 1e-13}));
    chi2.setup(&info(5)).unwrap();
    let (loss, grad) = on_vector(&mut chi2, true, &mut vec![]);
    assert!((loss - 4.3651483717).abs() < 1e-9, "{loss}");
    assert!(close(&grad, &[0.0, 0.0, 0.1507591475, 0.3333333333, 0.5159075192], 1e-9), "{grad:?}");
    // The dual at η* = 2.1742581416 has the same value.
    let mut dual = instantiate(&p, "dro.chi2", json!({"rho": 0.5, "dual": true, "eta_init": 2.1742581416}));
    dual.setup(&info(5)).unwrap();
    let (value, _) = on_vector(&mut dual, true, &mut vec![]);
    assert!((value - 4.3651483717).abs() < 1e-9, "{value}");
}

#[test]
fn dual_eta_descends_and_survives_save_and_load() {
    let p = plugin();
    for (id, params) in [
        ("dro.cvar", json!({"alpha": 0.5, "dual": true, "eta_lr": 0.5})),
        ("dro.chi2", json!({"rho": 0.5, "dual": true, "eta_lr": 0.5})),
    ] {
        let mut a = instantiate(&p, id, params.clone());
        a.setup(&info(5)).unwrap();
        let mut logged = vec![];
        let mut values = vec![];
        for step in 0..40 {
            values.push(on_vector(&mut a, true, &mut logged).0);
            if step == 19 {
                // Checkpoint after the backward pass of step 19 (its update still pending) and
                // continue in a fresh instance: both must agree from here on.
                let (json_state, tensors) = a.save_state().unwrap();
                let mut b = instantiate(&p, id, params.clone());
                b.setup(&info(5)).unwrap();
                b.load_state(&json_state, &tensors).unwrap();
                let mut la = vec![];
                let mut lb = vec![];
                let va = on_vector(&mut a, true, &mut la).0;
                let vb = on_vector(&mut b, true, &mut lb).0;
                assert_eq!(va.to_bits(), vb.to_bits(), "{id}: a restored η continues differently");
                assert_eq!(la, lb);
            }
        }
        let etas: Vec<f64> = logged.iter().filter(|(k, _)| k == "dro.eta").map(|(_, v)| *v).collect();
        assert_eq!(etas[0], 0.0, "{id}: η starts at eta_init");
        assert_ne!(etas[1], 0.0, "{id}: η moves after the first backward pass");
        // SGD on the dual: the objective falls towards the robust loss.
        let target = if id == "dro.cvar" { 4.2 } else { 4.3651483717 };
        assert!(values[0] > values[values.len() - 1], "{id}: {values:?}");
        assert!((values[values.len() - 1] - target).abs() < 0.1, "{id}: {values:?}");
        // A second pass of the same step (SAM's) leaves η where it is.
        let mut l2 = vec![];
        on_vector(&mut a, false, &mut l2);
        assert!(l2.is_empty());
    }
}

#[test]
fn dual_and_reg_together_are_refused() {
    let p = plugin();
    let params =
        json!({"rho": 0.5, "reg": 0.1, "dual": true, "eta_init": 0.0, "eta_lr": 0.01, "tol": 1e-4, "max_iter": 1000});
    let Err(err) = p.instantiate("dro.chi2", &params) else { panic!("dual with reg was accepted") };
    assert!(err.contains("dual form has no regularised variant"), "{err}");
}

fn parent_with_errors(dir: &std::path::Path, n: u64, epochs: u64, errors: &[(u64, Vec<u64>)]) -> ParentRef {
    for (epoch, e) in errors {
        let path = train_errors_path(dir, *epoch);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let t = TrainErrors { epoch: *epoch, n_train: n, errors: e.clone() };
        std::fs::write(path, serde_json::to_vec(&t).unwrap()).unwrap();
    }
    ParentRef { job_id: "feedfacefeedface".into(), run_dir: dir.to_path_buf(), config: json!({"epochs": epochs}) }
}

#[test]
fn jtt_upsamples_the_parents_error_set() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = parent_with_errors(tmp.path(), 10, 3, &[(1, vec![0, 1, 2, 7]), (3, vec![2, 7])]);
    let p = plugin();
    // docs/methods.md §4.3: N=10, E={2,7} (the parent's last epoch), λ_up=3 → 16 items.
    let mut jtt = instantiate(&p, "dro.jtt", json!({"up_weight": 3}));
    jtt.setup(&RunInfo { parents: vec![parent.clone()], ..info(10) }).unwrap();
    let Sampling::Repeat(c) = jtt.sampling(0, 10).unwrap() else { panic!("repeat counts") };
    assert_eq!(c.iter().sum::<u32>(), 16);
    assert_eq!(c, vec![1, 1, 4, 1, 1, 1, 1, 4, 1, 1]);
    // An earlier epoch, and the automatic λ_up = ⌊(10−4)/4⌋ − 1 = 0.
    let mut early = instantiate(&p, "dro.jtt", json!({"parent_epoch": 1}));
    early.setup(&RunInfo { parents: vec![parent.clone()], ..info(10) }).unwrap();
    assert_eq!(early.sampling(0, 10).unwrap(), Sampling::Repeat(vec![1; 10]));
    // The error set is state: a restored instance keeps it even if the file is gone.
    let (state, tensors) = jtt.save_state().unwrap();
    let mut restored = instantiate(&p, "dro.jtt", json!({"up_weight": 3}));
    restored.setup(&RunInfo { parents: vec![parent.clone()], ..info(10) }).unwrap();
    restored.load_state(&state, &tensors).unwrap();
    assert_eq!(restored.sampling(1, 10).unwrap(), Sampling::Repeat(c));
    // Mistakes are explained.
    let mut orphan = instantiate(&p, "dro.jtt", json!({}));
    assert!(orphan.setup(&info(10)).unwrap_err().contains("needs exactly one parent"));
    let mut missing = instantiate(&p, "dro.jtt", json!({"parent_epoch": 2}));
    let err = missing.setup(&RunInfo { parents: vec![parent.clone()], ..info(10) }).unwrap_err();
    assert!(err.contains("cannot read") && err.contains("epoch-00002.json"), "{err}");
    let mut late = instantiate(&p, "dro.jtt", json!({"parent_epoch": 4}));
    assert!(late.setup(&RunInfo { parents: vec![parent.clone()], ..info(10) }).unwrap_err().contains("outside"));
    let mut other_data = instantiate(&p, "dro.jtt", json!({}));
    let err = other_data.setup(&RunInfo { parents: vec![parent], ..info(12) }).unwrap_err();
    assert!(err.contains("same training data"), "{err}");
}

#[test]
fn subsample_keeps_a_group_balanced_subset() {
    let p = plugin();
    let groups: Vec<i64> = (0..100)
        .map(|i| {
            if i < 70 {
                0
            } else if i < 90 {
                1
            } else {
                2
            }
        })
        .collect();
    let run = RunInfo { train_groups: groups.clone(), group_counts: vec![70, 20, 10], seed: 4, ..info(100) };
    let mut sub = instantiate(&p, "dro.subsample", json!({}));
    sub.setup(&run).unwrap();
    let Sampling::Repeat(keep) = sub.sampling(0, 100).unwrap() else { panic!("repeat counts") };
    for g in 0..3 {
        let kept: u32 = groups.iter().zip(&keep).filter(|(k, _)| **k == g).map(|(_, c)| c).sum();
        assert_eq!(kept, 10, "group {g}");
    }
    // The subset is fixed for the job: the same every epoch.
    assert_eq!(sub.sampling(5, 100).unwrap(), Sampling::Repeat(keep));
    let mut bare = instantiate(&p, "dro.subsample", json!({}));
    assert!(bare.setup(&info(100)).unwrap_err().contains("needs data with group labels"));
}
