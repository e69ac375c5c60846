//! Selective mixup and its controls through the real plugin boundary: the resampling vectors of
//! docs/methods.md §2.4 hold exactly for the selected pairs.

use xlab_plugin_api::tch::{Device, Kind, Tensor};
use xlab_plugin_api::{RunInfo, Sampling};
use xlab_plugin_host::testing::{built_plugin, instantiate, SplitMix};
use xlab_plugin_host::{self as host, LoadedPlugin};

fn plugin() -> LoadedPlugin {
    host::load(&built_plugin("xlab_plugin_mixup")).unwrap()
}

fn info(labels: &[i64], domains: &[i64]) -> RunInfo {
    RunInfo {
        num_classes: 2,
        n_train: labels.len() as u64,
        train_labels: labels.to_vec(),
        train_domains: domains.to_vec(),
        ..Default::default()
    }
}

/// Column sums of a transform's targets: how much of each class the batch holds.
fn class_mass(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.sum_dim_intlist(0, false, Kind::Double)).unwrap()
}

#[test]
fn different_class_pairs_balance_the_classes() {
    // 3 examples of class 0 and 1 of class 1, "different class": every class-0 anchor gets the
    // class-1 example; anchors plus partners hold the two classes equally (4 and 4).
    let p = plugin();
    let y = Tensor::from_slice(&[0i64, 0, 0, 1]);
    let x = Tensor::arange(4, (Kind::Float, Device::Cpu)).unsqueeze(1);
    let idx = Tensor::arange(4, (Kind::Int64, Device::Cpu));
    let mut no_mix = instantiate(&p, "mixup.selective_no_mix", serde_json::json!({}));
    no_mix.setup(&info(&[0, 0, 0, 1], &[])).unwrap();
    let mut rng = SplitMix(3);
    for _ in 0..20 {
        let (xo, t) = no_mix.transform(&x, &y, None, None, &idx, 2, &mut || rng.next_u64()).unwrap();
        assert_eq!(xo.size(), vec![8, 1]);
        assert_eq!(class_mass(&t), vec![4.0, 4.0]);
        // The class-0 anchors' partner is example 3.
        let partners: Vec<f32> = Vec::try_from(xo.narrow(0, 4, 3).flatten(0, -1)).unwrap();
        assert_eq!(partners, vec![3.0, 3.0, 3.0]);
    }
    // Mixed: the same pairs, so the mixed targets also hold the classes equally.
    let mut sel = instantiate(&p, "mixup.selective", serde_json::json!({"alpha": 0.4}));
    sel.setup(&info(&[0, 0, 0, 1], &[])).unwrap();
    let (xm, t) = sel.transform(&x, &y, None, None, &idx, 2, &mut || rng.next_u64()).unwrap();
    let m = class_mass(&t);
    assert!((m[0] + m[1] - 4.0).abs() < 1e-6, "{m:?}");
    // Row 0 is λ·x₀ + (1−λ)·x₃ = 3(1−λ). Class 0 holds λ from each of the three class-0 rows
    // and 1−λ from the class-1 row's partner.
    let lam = 1.0 - (f64::try_from(xm.get(0).sum(Kind::Double)).unwrap() / 3.0);
    assert!((m[0] - (3.0 * lam + (1.0 - lam))).abs() < 1e-5, "{m:?} with λ = {lam}");
}

#[test]
fn cross_domain_pairs_balance_the_domains() {
    // Two domains of sizes (3, 1), "different domain": the same balance over domains.
    let p = plugin();
    let y = Tensor::from_slice(&[0i64, 1, 0, 1]);
    let d = Tensor::from_slice(&[0i64, 0, 0, 1]);
    let x = Tensor::arange(4, (Kind::Float, Device::Cpu)).unsqueeze(1);
    let idx = Tensor::arange(4, (Kind::Int64, Device::Cpu));
    let mut no_mix =
        instantiate(&p, "mixup.selective_no_mix", serde_json::json!({"class": "any", "domain": "different"}));
    no_mix.setup(&info(&[0, 1, 0, 1], &[0, 0, 0, 1])).unwrap();
    let mut rng = SplitMix(5);
    let (xo, _) = no_mix.transform(&x, &y, None, Some(&d), &idx, 2, &mut || rng.next_u64()).unwrap();
    let rows: Vec<f32> = Vec::try_from(xo.flatten(0, -1)).unwrap();
    let domain_of = |v: f32| if v == 3.0 { 1 } else { 0 };
    let ones = rows.iter().filter(|v| domain_of(**v) == 1).count();
    assert_eq!(ones, 4, "anchors and partners hold each domain 4 times: {rows:?}");
    // A domain criterion needs domains in the data.
    let mut bare = instantiate(&p, "mixup.selective", serde_json::json!({"class": "same", "domain": "different"}));
    assert!(bare.setup(&info(&[0, 1], &[])).unwrap_err().contains("needs data with domains"));
}

#[test]
fn an_example_without_admissible_partner_stays_unmixed() {
    let p = plugin();
    let mut sel = instantiate(&p, "mixup.selective", serde_json::json!({"class": "same", "alpha": 1.0}));
    sel.setup(&info(&[0, 1], &[])).unwrap();
    let y = Tensor::from_slice(&[0i64, 1]);
    let x = Tensor::from_slice(&[5.0f32, 7.0]).unsqueeze(1);
    let idx = Tensor::arange(2, (Kind::Int64, Device::Cpu));
    let mut rng = SplitMix(1);
    let (xo, t) = sel.transform(&x, &y, None, None, &idx, 2, &mut || rng.next_u64()).unwrap();
    assert!(xo.allclose(&x, 1e-6, 1e-6, false));
    assert!(t.allclose(&y.one_hot(2).to_kind(Kind::Float), 1e-6, 1e-6, false));
}

#[test]
fn resample_weights_balance_the_cells() {
    let p = plugin();
    let labels = [0i64, 0, 0, 1, 1, 0];
    let domains = [0i64, 1, 1, 1, 0, 0];
    for (by, want) in [
        ("class", vec![0.25, 0.25, 0.25, 0.5, 0.5, 0.25]),
        ("domain", vec![1.0 / 3.0; 6]),
        ("class_domain", vec![0.5, 0.5, 0.5, 1.0, 1.0, 0.5]),
    ] {
        let mut r = instantiate(&p, "mixup.resample", serde_json::json!({ "by": by }));
        r.setup(&info(&labels, &domains)).unwrap();
        let Sampling::Weighted(w) = r.sampling(0, 6).unwrap() else { panic!("weights") };
        for (a, b) in w.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{by}: {w:?}");
        }
    }
}
