//! `mixup.mixup`: the docs/methods.md vector, and the transform through the real plugin boundary.

use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_host::testing::{built_plugin, conformance, instantiate, to_vec, SplitMix};
use xlab_plugin_mixup::mixup::mix;

fn soft_ce(logits: &Tensor, target: &Tensor) -> f64 {
    let l = -(target * logits.log_softmax(-1, Kind::Double)).sum_dim_intlist(1, false, Kind::Double).mean(Kind::Double);
    f64::try_from(l).unwrap()
}

#[test]
fn passes_the_conformance_kit() {
    conformance(&built_plugin("xlab_plugin_mixup"));
}

/// docs/methods.md §2.1: x = I₂, y = (0, 1), π = (1, 0), λ = 0.7, identity model:
/// x̃ = [[0.7, 0.3], [0.3, 0.7]], CE_a = 0.5130152524, CE_b = 0.9130152524, loss 0.6330152524.
#[test]
fn matches_the_methods_vector() {
    let x = Tensor::eye(2, (Kind::Double, xlab_plugin_api::tch::Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1]);
    let (xm, t) = mix(&x, &y, 0.7, &[1, 0], 2);
    let got = to_vec(&xm);
    for (g, w) in got.iter().zip([0.7, 0.3, 0.3, 0.7]) {
        assert!((g - w).abs() < 1e-12, "{got:?}");
    }
    assert!((soft_ce(&xm, &t) - 0.6330152524).abs() < 1e-9);
    // The reference's two-term form gives the same number.
    let ce = |yy: &[i64]| soft_ce(&xm, &Tensor::from_slice(yy).one_hot(2).to_kind(Kind::Double));
    assert!((0.7 * ce(&[0, 1]) + 0.3 * ce(&[1, 0]) - 0.6330152524).abs() < 1e-9);
    assert!((ce(&[0, 1]) - 0.5130152524).abs() < 1e-9 && (ce(&[1, 0]) - 0.9130152524).abs() < 1e-9);
}

/// Through the boundary, with one-hot rows as inputs the output reveals λ and π; the targets
/// must be the same mix of the labels, and α ≤ 0 must leave the batch alone.
#[test]
fn mixes_inputs_and_labels_alike_through_the_boundary() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_mixup")).unwrap();
    let mut m = instantiate(&plugin, "mixup.mixup", serde_json::json!({"alpha": 0.4}));
    let b = 8i64;
    let x = Tensor::eye(b, (Kind::Float, xlab_plugin_api::tch::Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
    let idx = Tensor::arange(b, (Kind::Int64, xlab_plugin_api::tch::Device::Cpu));
    let mut rng = SplitMix(3);
    let mut lambdas = vec![];
    for _ in 0..20 {
        let (xm, t) = m.transform(&x, &y, None, None, &idx, 3, &mut || rng.next_u64()).unwrap();
        let rows: Vec<Vec<f64>> = (0..b).map(|i| to_vec(&xm.get(i))).collect();
        lambdas.push(rows[0][0]);
        let ys = to_vec(&y);
        for (i, row) in rows.iter().enumerate() {
            // Partner of i: the other non-zero column (or i itself when π(i) = i).
            let partner =
                row.iter().enumerate().filter(|(j, v)| *j != i && **v > 1e-7).map(|(j, _)| j).next().unwrap_or(i);
            let own = row[i];
            let expect_t: Vec<f64> = (0..3)
                .map(|c| own * f64::from(ys[i] as i32 == c) + (1.0 - own) * f64::from(ys[partner] as i32 == c))
                .collect();
            let got_t = to_vec(&t.get(i as i64));
            for (a, e) in got_t.iter().zip(&expect_t) {
                assert!((a - e).abs() < 1e-6, "row {i}: {got_t:?} vs {expect_t:?}");
            }
        }
    }
    assert!(lambdas.iter().any(|l| (l - lambdas[0]).abs() > 1e-3), "λ is drawn afresh per batch: {lambdas:?}");
    let mut off = instantiate(&plugin, "mixup.mixup", serde_json::json!({"alpha": 0.0}));
    let (xm, t) = off.transform(&x, &y, None, None, &idx, 3, &mut || rng.next_u64()).unwrap();
    assert!(xm.equal(&x));
    assert!(t.equal(&y.one_hot(3).to_kind(Kind::Float)));
}

/// λ ~ Beta(α, α) has mean ½ and variance 1/(4(2α+1)).
#[test]
fn lambda_follows_beta_alpha_alpha() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_mixup")).unwrap();
    let mut m = instantiate(&plugin, "mixup.mixup", serde_json::json!({"alpha": 2.0}));
    let x = Tensor::eye(2, (Kind::Double, xlab_plugin_api::tch::Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1]);
    let idx = Tensor::from_slice(&[0i64, 1]);
    let mut rng = SplitMix(9);
    let n = 4000;
    let mut draws = Vec::with_capacity(n);
    for _ in 0..n {
        let (xm, _) = m.transform(&x, &y, None, None, &idx, 2, &mut || rng.next_u64()).unwrap();
        let v = to_vec(&xm);
        // Row 0 is (λ, 1−λ) when π swaps, or (1, 0) when it does not: λ is v[0] either way only
        // in the first case.
        if v[1] > 1e-12 {
            draws.push(v[0]);
        }
    }
    let k = draws.len() as f64;
    let mean = draws.iter().sum::<f64>() / k;
    let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (k - 1.0);
    assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    assert!((var - 1.0 / 20.0).abs() < 0.008, "var {var}");
}
