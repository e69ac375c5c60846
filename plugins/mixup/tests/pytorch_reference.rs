//! Every mixup-family transform against PyTorch: `tests/reference/mixup_reference.py` writes
//! each as its reference does and trains a linear model on 1×4×4 images for a few SGD steps,
//! drawing λ, permutations, boxes and partners from the same splitmix64 stream with the same
//! sampling algorithms as xlab's host generator. The plugin, loaded through the real boundary,
//! drives the same training here and must end at the same weights. Needs the project's Python
//! environment (`make setup`), or a Python with torch in `XLAB_PYTHON`.

use serde_json::{json, Value};
use std::path::PathBuf;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::RunInfo;
use xlab_plugin_host as host;
use xlab_plugin_host::testing::{built_plugin, instantiate, run_python_reference, to_vec, SplitMix};

#[test]
fn every_transform_trains_like_its_pytorch_reference() {
    const B: usize = 6;
    const C: i64 = 3;
    let (steps, lr, seed) = (4, 0.5, 77u64);
    let mut gen = SplitMix(9);
    let mut u = move || (gen.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let x: Vec<f64> = (0..B * 16).map(|_| u()).collect();
    let w: Vec<f64> = (0..16 * C as usize).map(|_| u() - 0.5).collect();
    let y: Vec<i64> = vec![0, 1, 2, 0, 0, 1];
    let domain: Vec<i64> = vec![0, 1, 1, 0, 1, 0];
    let cases = vec![
        json!({"id": "mixup.mixup", "params": {"alpha": 1.0}}),
        json!({"id": "mixup.cutmix", "params": {"beta": 1.0, "prob": 1.0}}),
        json!({"id": "mixup.cutmix", "params": {"beta": 0.5, "prob": 0.5}}),
        json!({"id": "mixup.timm", "params": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
               "mode": "batch", "correct_lam": true, "label_smoothing": 0.1}}),
        json!({"id": "mixup.timm", "params": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.8, "switch_prob": 0.5,
               "mode": "elem", "correct_lam": true, "label_smoothing": 0.1}}),
        json!({"id": "mixup.timm", "params": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
               "mode": "pair", "correct_lam": true, "label_smoothing": 0.0}}),
        json!({"id": "mixup.regmixup", "params": {"alpha": 10.0}}),
        json!({"id": "mixup.selective", "params": {"alpha": 1.0, "class": "different", "domain": "any"}}),
        json!({"id": "mixup.selective", "params": {"alpha": 0.5, "class": "same", "domain": "different"}}),
    ];
    let request = json!({"x": x, "y": y, "domain": domain, "classes": C, "w": w, "steps": steps, "lr": lr,
                         "seed": seed, "cases": cases});
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/mixup_reference.py");
    let want: Vec<Value> = serde_json::from_value(run_python_reference(&script, &request)).unwrap();

    let plugin = host::load(&built_plugin("xlab_plugin_mixup")).unwrap();
    let info = RunInfo {
        num_classes: C,
        n_train: B as u64,
        train_labels: y.clone(),
        train_domains: domain.clone(),
        image: Some([1, 4, 4]),
        ..Default::default()
    };
    let xs = Tensor::from_slice(&x).reshape([B as i64, 16]);
    let ys = Tensor::from_slice(&y);
    let ds = Tensor::from_slice(&domain);
    let idx = Tensor::arange(B as i64, (Kind::Int64, xlab_plugin_api::tch::Device::Cpu));
    for (case, want) in cases.iter().zip(&want) {
        let mut t = instantiate(&plugin, case["id"].as_str().unwrap(), case["params"].clone());
        t.setup(&info).unwrap();
        let mut rng = SplitMix(seed);
        let mut wt = Tensor::from_slice(&w).reshape([16, C]).set_requires_grad(true);
        let mut bt = Tensor::zeros([C], (Kind::Double, xlab_plugin_api::tch::Device::Cpu)).set_requires_grad(true);
        for _ in 0..steps {
            let (xo, target) = t
                .transform(&xs, &ys, None, Some(&ds), &idx, C, &mut || rng.next_u64())
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            let logits = xo.matmul(&wt) + &bt;
            let loss = (-(target * logits.log_softmax(-1, Kind::Double)).sum_dim_intlist(1, false, Kind::Double))
                .mean(Kind::Double);
            let g = Tensor::run_backward(&[&loss], &[&wt, &bt], false, false);
            xlab_plugin_api::tch::no_grad(|| {
                wt -= &g[0] * lr;
                bt -= &g[1] * lr;
            });
        }
        for (got, key) in [(to_vec(&wt), "w"), (to_vec(&bt), "b")] {
            let expect: Vec<f64> = want[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            for (a, b) in got.iter().zip(&expect) {
                assert!((a - b).abs() < 1e-10, "{case}: {key}: plugin {got:?} vs PyTorch {expect:?}");
            }
        }
    }
}
