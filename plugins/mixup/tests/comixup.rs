//! Co-Mixup against its reference: the graph cuts against gco (gco-wrapper, which the reference
//! calls), and whole training steps against `tests/reference/comixup_reference.py`, the
//! reference's algorithm in PyTorch with the same random draws. The plugin is loaded through
//! the real boundary, and this test plays the host: a linear model whose input gradient the
//! transform asks for. Needs the project's Python environment (`make setup`: torch and
//! gco-wrapper), or a Python with both in `XLAB_PYTHON`.

use serde_json::{json, Value};
use std::path::PathBuf;
use xlab_plugin_api::tch::{Device, Kind, Reduction, Tensor};
use xlab_plugin_api::RunInfo;
use xlab_plugin_host as host;
use xlab_plugin_host::testing::{built_plugin, instantiate, run_python_reference, to_vec, SplitMix};
use xlab_plugin_mixup::graphcut::{smooth_int, unary_int, weight_int, Grid};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/comixup_reference.py")
}

fn uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut gen = SplitMix(seed);
    move || (gen.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[test]
fn swap_moves_label_every_grid_as_gco_does() {
    let mut u = uniform(5);
    let mut cases = Vec::new();
    // (height, width, labels, beta, half-cost pairs): Co-Mixup's shapes, from 2 to 7 labels.
    for (h, w, labels, beta, quarter) in [
        (4usize, 4usize, 2usize, 0.02, false),
        (4, 4, 3, 0.02, false),
        (4, 4, 5, 0.02, true),
        (3, 5, 7, 0.08, true),
        (8, 8, 6, 0.005, false),
        (2, 2, 4, 0.5, true),
    ] {
        let unary: Vec<Vec<Vec<f64>>> =
            (0..h).map(|_| (0..w).map(|_| (0..labels).map(|_| (u() - 0.5) * 0.2).collect()).collect()).collect();
        let mut pairwise = vec![vec![1.0f32; labels]; labels];
        for (a, row) in pairwise.iter_mut().enumerate() {
            row[a] = 0.0;
        }
        if quarter {
            // The last label is a half-half label of labels 0 and 1.
            for j in [0, 1] {
                pairwise[labels - 1][j] = 0.25;
                pairwise[j][labels - 1] = 0.25;
            }
        }
        cases.push((h, w, labels, beta, unary, pairwise));
    }
    // Every labeling costs the same: ties.
    cases.push((3, 3, 3, 0.0, vec![vec![vec![0.0; 3]; 3]; 3], vec![vec![0.0f32; 3]; 3]));
    let request = json!({"mode": "cuts", "cases": cases.iter().map(|(_, _, _, beta, unary, pairwise)| {
        json!({"unary": unary, "pairwise": pairwise, "beta": beta})
    }).collect::<Vec<_>>()});
    let want: Vec<Vec<usize>> = serde_json::from_value(run_python_reference(&script(), &request)).unwrap();
    for ((h, w, labels, beta, unary, pairwise), want) in cases.iter().zip(&want) {
        let grid = Grid {
            height: *h,
            width: *w,
            labels: *labels,
            data: unary.iter().flatten().flatten().map(|&c| unary_int(c)).collect(),
            smooth: pairwise.iter().flatten().map(|&v| smooth_int(v)).collect(),
            weight: weight_int(*beta),
        };
        assert_eq!(&grid.swap(), want, "{h}×{w} grid, {labels} labels");
    }
    assert!(want.iter().any(|l| l.iter().collect::<std::collections::BTreeSet<_>>().len() > 2));
}

#[test]
fn trains_like_the_reference_algorithm() {
    const B: usize = 7;
    const C: i64 = 3;
    const CH: i64 = 2;
    const SIDE: i64 = 16;
    let d = (CH * SIDE * SIDE) as usize;
    let (steps, lr, seed) = (3, 0.5, 31u64);
    let mut u = uniform(11);
    let x: Vec<f64> = (0..B * d).map(|_| u()).collect();
    // Class k's weights are large in its own quadrant of the image, so the examples of
    // different classes are salient in different places and mixing them pays.
    let w: Vec<f64> = (0..d)
        .flat_map(|px| {
            let (r, c) = ((px as i64 % (SIDE * SIDE)) / SIDE, px as i64 % SIDE);
            let quadrant = 2 * (r / (SIDE / 2)) + c / (SIDE / 2);
            (0..C).map(move |k| if quadrant == k { 1.0 } else { 0.05 }).collect::<Vec<_>>()
        })
        .zip(std::iter::repeat_with(&mut u))
        .map(|(scale, r)| scale * (r - 0.5))
        .collect();
    let y: Vec<i64> = vec![0, 1, 2, 0, 1, 2, 1];
    let base = json!({"block_num": 4, "part": 4, "beta": 0.32, "gamma": 1.0, "thres": 0.83, "thres_type": "hard",
                      "eta": 0.05, "alpha": 2.0, "omega": 0.001, "set_resolve": true, "niter": 4, "clean_lam": 1.0});
    let with = |changes: Value| {
        let mut p = base.clone();
        for (k, v) in changes.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    };
    let cases = vec![
        base.clone(),
        with(json!({"block_num": -1, "thres_type": "soft", "clean_lam": 0.0, "omega": 0.5, "niter": 3,
                    "gamma": 2.0, "set_resolve": false})),
        with(json!({"part": 7, "beta": 1.0, "thres": 0.5, "eta": 0.2, "alpha": 0.5, "block_num": 8})),
    ];
    let request = json!({"mode": "train", "x": x, "y": y, "classes": C, "channels": CH, "side": SIDE, "w": w,
                         "steps": steps, "lr": lr, "seed": seed, "cases": cases});
    let want: Vec<Value> = serde_json::from_value(run_python_reference(&script(), &request)).unwrap();

    let plugin = host::load(&built_plugin("xlab_plugin_mixup")).unwrap();
    let info = RunInfo {
        num_classes: C,
        n_train: B as u64,
        train_labels: y.clone(),
        image: Some([CH, SIDE, SIDE]),
        ..Default::default()
    };
    let xs = Tensor::from_slice(&x).reshape([B as i64, d as i64]);
    let ys = Tensor::from_slice(&y);
    let idx = Tensor::arange(B as i64, (Kind::Int64, Device::Cpu));
    let mut mixed_outputs = 0;
    for (case, want) in cases.iter().zip(&want) {
        let mut t = instantiate(&plugin, "mixup.comixup", case.clone());
        t.setup(&info).unwrap();
        let mut rng = SplitMix(seed);
        let mut wt = Tensor::from_slice(&w).reshape([d as i64, C]).set_requires_grad(true);
        let mut bt = Tensor::zeros([C], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let mut first = None;
        for _ in 0..steps {
            // The host: the clean loss's input gradient, and its parameter gradient when kept.
            let mut kept = None;
            let mut grad = |weight: f64, _train: bool, keep: bool| {
                let xv = xs.detach().set_requires_grad(true);
                let logits = xv.matmul(&wt) + &bt;
                let loss = logits.cross_entropy_loss::<Tensor>(&ys, None, Reduction::Mean, -100, 0.0) * weight;
                let g = Tensor::run_backward(&[&loss], &[&xv, &wt, &bt], false, false);
                if keep {
                    kept = Some((g[1].shallow_clone(), g[2].shallow_clone()));
                }
                Ok(g[0].shallow_clone())
            };
            let (xo, target) = t
                .transform_with(&xs, &ys, None, None, &idx, C, &mut || rng.next_u64(), Some(&mut grad))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            if first.is_none() {
                first = Some((to_vec(&xo), to_vec(&target)));
            }
            let logits = xo.matmul(&wt) + &bt;
            let loss = (-(target * logits.log_softmax(-1, Kind::Double)).sum_dim_intlist(1, false, Kind::Double))
                .mean(Kind::Double);
            let mut g = Tensor::run_backward(&[&loss], &[&wt, &bt], false, false);
            if let Some((gw, gb)) = kept {
                g[0] += gw;
                g[1] += gb;
            }
            xlab_plugin_api::tch::no_grad(|| {
                wt -= &g[0] * lr;
                bt -= &g[1] * lr;
            });
        }
        let (x_first, t_first) = first.unwrap();
        mixed_outputs += t_first.chunks(C as usize).filter(|row| row.iter().all(|v| *v < 1.0 - 1e-9)).count();
        for (got, key) in [(x_first, "x_first"), (t_first, "t_first"), (to_vec(&wt), "w"), (to_vec(&bt), "b")] {
            let expect: Vec<f64> = want[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(got.len(), expect.len(), "{case}: {key}");
            let worst = got.iter().zip(&expect).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-10, "{case}: {key} differs from the reference by {worst}");
        }
    }
    // The batches really were mixed: several outputs draw on more than one class.
    assert!(mixed_outputs >= 3, "only {mixed_outputs} outputs mixed classes");
}

/// Each mistake is refused at setup or at the first batch with a message that says what to do.
#[test]
fn mistakes_are_refused_with_what_to_do() {
    let plugin = host::load(&built_plugin("xlab_plugin_mixup")).unwrap();
    let setup = |image: Option<[i64; 3]>, params: Value| {
        let mut t = instantiate(&plugin, "mixup.comixup", params);
        t.setup(&RunInfo { num_classes: 3, n_train: 4, image, ..Default::default() }).err().unwrap_or_default()
    };
    let cases = [
        (None, json!({}), "use image data"),
        (Some([1, 12, 16]), json!({}), "square images"),
        (Some([1, 8, 8]), json!({"block_num": 9}), "exceeds the image side 8"),
        (Some([1, 8, 8]), json!({"block_num": -1}), "may draw 16 blocks"),
        (Some([1, 6, 6]), json!({"block_num": 2}), "set omega: 0"),
    ];
    for (image, params, want) in cases {
        let got = setup(image, params.clone());
        assert!(got.contains(want), "{params} on {image:?}: {got:?}");
    }
    for (params, want) in [
        (json!({"block_num": 0}), "block_num is a positive count or −1"),
        (json!({"thres_type": "medium"}), "`hard` or `soft`"),
        (json!({"alpha": 0.0}), "alpha > 0"),
    ] {
        // The defaults with one value changed, past the schema's own range checks.
        let spec = plugin.info.components.iter().find(|c| c.id == "mixup.comixup").unwrap();
        let mut full: serde_json::Map<String, Value> =
            spec.params.iter().map(|p| (p.name.clone(), p.default.clone())).collect();
        full.extend(params.as_object().unwrap().clone());
        let err = plugin.instantiate("mixup.comixup", &Value::Object(full)).err().unwrap_or_default();
        assert!(err.contains(want), "{params}: {err}");
    }
    // A host that runs no model here (the batch alone) gets a clear refusal, not a wrong mix.
    let mut t = instantiate(&plugin, "mixup.comixup", json!({"omega": 0.0}));
    t.setup(&RunInfo { num_classes: 3, n_train: 4, image: Some([1, 4, 4]), ..Default::default() }).unwrap();
    let x = Tensor::zeros([4, 16], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 0]);
    let mut rng = SplitMix(1);
    let err = t.transform(&x, &y, None, None, &y, 3, &mut || rng.next_u64()).unwrap_err();
    assert!(err.contains("needs the model's input gradient"), "{err}");
}
