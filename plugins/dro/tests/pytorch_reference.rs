//! The DRO objectives against PyTorch: `tests/reference/dro_reference.py` implements the
//! reference `LossComputer` (kohpangwei/group_DRO) and the fast-dro best responses in torch; the
//! plugin, loaded through the real boundary, must give the same losses, gradients and group
//! weights for the same batches. Needs the project's Python environment (`make setup`), or a
//! Python with torch in `XLAB_PYTHON`.

use serde_json::{json, Value};
use std::path::PathBuf;
use xlab_plugin_api::tch::{Device, Kind, Tensor};
use xlab_plugin_api::RunInfo;
use xlab_plugin_host::testing::{built_plugin, instantiate, run_python_reference};
use xlab_plugin_host::{self as host, Instance};

fn reference(request: &Value) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/dro_reference.py");
    run_python_reference(&script, request)
}

/// A small deterministic stream for the test batches.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol, "{what}[{i}]: plugin {a} vs PyTorch {b}");
    }
}

/// Runs one objective call through the boundary; returns the loss, the gradient with respect to
/// the per-example losses and what the component logged.
fn call(inst: &mut Instance, losses: &[f64], groups: &[i64]) -> (f64, Vec<f64>, Vec<(String, f64)>) {
    let v = Tensor::from_slice(losses).set_requires_grad(true);
    let g = Tensor::from_slice(groups);
    let idx = Tensor::arange(losses.len() as i64, (Kind::Int64, Device::Cpu));
    let mut logged = vec![];
    let loss = inst.objective(&v, &v, Some(&g), &idx, true, &mut |k, x| logged.push((k.to_string(), x))).unwrap();
    loss.backward();
    (f64::try_from(&loss).unwrap(), Vec::<f64>::try_from(v.grad()).unwrap(), logged)
}

#[test]
fn group_dro_matches_the_reference_loss_computer_in_pytorch() {
    let counts = vec![40u64, 10, 10, 40];
    let mut rng = Lcg(7);
    let batches: Vec<Value> = (0..8)
        .map(|step| {
            // Step 3 leaves groups 2 and 3 out: absent groups count as zero loss.
            let groups: Vec<i64> =
                (0..24).map(|i| if step == 3 { i % 2 } else { (rng.next() * 4.0) as i64 % 4 }).collect();
            let losses: Vec<f64> = (0..24).map(|_| 0.05 + rng.next() * 3.0).collect();
            json!({"losses": losses, "groups": groups})
        })
        .collect();
    let base = json!({"step_size": 0.01, "gamma": 0.1, "adjustment": 0.0, "normalize_loss": false,
                      "btl": false, "alpha": 0.2, "min_var_weight": 0.0});
    let with = |patch: Value| {
        let mut c = base.clone();
        c.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        c
    };
    let configs = vec![
        base.clone(),
        with(json!({"step_size": 0.5})),
        with(json!({"step_size": 0.2, "adjustment": 2.0})),
        with(json!({"step_size": 0.2, "adjustment": 1.0, "normalize_loss": true})),
        with(json!({"btl": true, "alpha": 0.3, "gamma": 0.3})),
        with(json!({"btl": true, "alpha": 0.6, "min_var_weight": 0.2, "adjustment": 1.0})),
    ];
    let want = reference(&json!({"counts": counts, "group_dro": configs, "batches": batches, "robust": []}));
    let plugin = host::load(&built_plugin("xlab_plugin_dro")).unwrap();
    let info = RunInfo { num_classes: 2, n_train: 100, group_counts: counts.clone(), ..Default::default() };
    for (c, cfg) in configs.iter().enumerate() {
        let mut dro = instantiate(&plugin, "dro.group_dro", cfg.clone());
        dro.setup(&info).unwrap();
        for (s, b) in batches.iter().enumerate() {
            let groups: Vec<i64> = b["groups"].as_array().unwrap().iter().map(|g| g.as_i64().unwrap()).collect();
            let (loss, grad, logged) = call(&mut dro, &floats(&b["losses"]), &groups);
            let w = &want["group_dro"][c][s];
            let what = format!("config {cfg}, step {s}");
            assert_close(&format!("{what}: loss"), &[loss], &[w["loss"].as_f64().unwrap()], 1e-12);
            assert_close(&format!("{what}: gradient"), &grad, &floats(&w["grad"]), 1e-12);
            let mut q: Vec<(String, f64)> = logged.into_iter().filter(|(k, _)| k.starts_with("dro.q.")).collect();
            q.sort_by(|a, b| a.0.cmp(&b.0));
            let q: Vec<f64> = q.into_iter().map(|(_, v)| v).collect();
            assert_close(&format!("{what}: q"), &q, &floats(&w["q"]), 1e-12);
        }
    }
}

#[test]
fn cvar_and_chi2_best_responses_match_fast_dro_in_pytorch() {
    let mut rng = Lcg(11);
    let mut cases = vec![];
    let mut ours = vec![];
    for (geometry, id, size_key, sizes, regs) in [
        ("cvar", "dro.cvar", "alpha", vec![0.1, 0.37, 1.0], vec![0.0, 0.5]),
        ("chi-square", "dro.chi2", "rho", vec![0.5, 1.0, 3.0], vec![0.0, 0.3]),
    ] {
        for &size in &sizes {
            for &reg in &regs {
                let v: Vec<f64> = (0..32).map(|_| rng.next() * 2.5).collect();
                cases.push(
                    json!({"v": v, "geometry": geometry, "size": size, "reg": reg, "tol": 1e-4, "max_iter": 1000}),
                );
                ours.push((id, json!({size_key: size, "reg": reg}), v));
            }
        }
    }
    let want = reference(&json!({"counts": [], "group_dro": [], "batches": [], "robust": cases}));
    let plugin = host::load(&built_plugin("xlab_plugin_dro")).unwrap();
    for (i, (id, params, v)) in ours.iter().enumerate() {
        let mut inst = instantiate(&plugin, id, params.clone());
        inst.setup(&RunInfo { num_classes: 2, n_train: 32, ..Default::default() }).unwrap();
        let (loss, grad, _) = call(&mut inst, v, &vec![0; v.len()]);
        let w = &want["robust"][i];
        assert_close(&format!("{id} {params}: loss"), &[loss], &[w["loss"].as_f64().unwrap()], 1e-10);
        assert_close(&format!("{id} {params}: weights"), &grad, &floats(&w["grad"]), 1e-10);
    }
}
