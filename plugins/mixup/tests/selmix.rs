//! SelMix against its reference (`tests/reference/selmix_reference.py`, the reference's formulas
//! in numpy and its loop in PyTorch): the sampling distribution and gains for every metric, and a
//! few training steps of an MLP through the real plugin boundary, this test playing the host
//! (validation pass, classifier head, training rows, feature mixing).

use serde_json::{json, Value};
use std::path::PathBuf;
use xlab_plugin_api::tch::{Device, Kind, Reduction, Tensor};
use xlab_plugin_api::RunInfo;
use xlab_plugin_host::testing::{built_plugin, instantiate, run_python_reference, to_vec, SplitMix};
use xlab_plugin_host::{self as host, TransformModel};
use xlab_plugin_mixup::selmix::{sampling_distribution, Estimate, SelMixParams};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/selmix_reference.py")
}

fn uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut gen = SplitMix(seed);
    move || (gen.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn params(metric: &str, temperature: f64, lambda_min: f64) -> SelMixParams {
    SelMixParams { metric: metric.into(), temperature, lambda_min, mix_min: 0.6, every: 2, beta: 1.0, val_lr: 1.0 }
}

fn close(got: &[f64], want: &Value, what: &str) {
    let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got.len(), want.len(), "{what}");
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-9 * b.abs().max(1e-6), "{what}: {got:?} vs reference {want:?}");
    }
}

#[test]
fn gains_and_pair_distribution_match_the_reference_for_every_metric() {
    const K: usize = 4;
    const D: usize = 5;
    let mut u = uniform(3);
    let mut cases = Vec::new();
    for (metric, t, lmin) in
        [("mean_recall", 0.1, 0.6), ("min_recall", 1.0, 0.8), ("g_mean", 1.0, 0.6), ("h_mean", 0.5, 0.6)]
    {
        // A validation confusion matrix with a weak class and an empty cell (clipped to 1e-7).
        let mut cm: Vec<f64> =
            (0..K * K).map(|ij| if ij % K == ij / K { 8.0 + 4.0 * u() } else { 2.0 * u() }).collect();
        cm[K + 1] = 1.0;
        cm[2 * K + 3] = 0.0;
        let total: f64 = cm.iter().sum();
        cm.iter_mut().for_each(|v| *v /= total);
        let protos: Vec<Vec<f64>> = (0..K).map(|_| (0..D).map(|_| u() * 2.0).collect()).collect();
        let w: Vec<Vec<f64>> = (0..D).map(|_| (0..K).map(|_| u() - 0.5).collect()).collect();
        let b: Vec<f64> = (0..K).map(|_| (u() - 0.5) * 0.1).collect();
        let lambdas = vec![0.1, 0.2, 0.3, 0.4];
        cases.push((metric, t, lmin, cm, protos, w, b, lambdas));
    }
    let request = json!({"mode": "gains", "cases": cases.iter().map(|(m, t, l, cm, z, w, b, lam)| json!({
        "cm": cm.chunks(K).collect::<Vec<_>>(), "prototypes": z, "w": w, "b": b, "lambdas": lam,
        "params": {"metric": m, "temperature": t, "lambda_min": l, "beta": 1.0, "val_lr": 1.0},
    })).collect::<Vec<_>>()});
    let want: Vec<Value> = serde_json::from_value(run_python_reference(&script(), &request)).unwrap();
    for ((metric, t, lmin, cm, protos, w, b, lambdas), want) in cases.into_iter().zip(&want) {
        let est = Estimate { cm, prototypes: protos };
        let mut lam = lambdas;
        let mut head = |feats: &[Vec<f64>]| {
            Ok(feats
                .iter()
                .map(|f| (0..K).map(|k| b[k] + (0..D).map(|d| f[d] * w[d][k]).sum::<f64>()).collect())
                .collect())
        };
        let (p, g) = sampling_distribution(&params(metric, t, lmin), &est, &mut lam, &mut head).unwrap();
        close(&g, &want["G"], &format!("{metric}: G"));
        close(&p, &want["P"], &format!("{metric}: P"));
        close(&lam, &want["lambdas"], &format!("{metric}: multipliers"));
        assert!(g.iter().any(|v| *v > 0.0) && g.iter().any(|v| *v < 0.0), "{metric}: gains of both signs");
    }
}

/// The host: an MLP whose features are ReLU(x·W₁ + b₁) and whose head is f·W₂ + b₂.
struct Mlp {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    x: Tensor,
    xv: Tensor,
    yv: Tensor,
    mix: Option<(Tensor, Tensor, Tensor)>,
}

impl Mlp {
    fn features(&self, x: &Tensor) -> Tensor {
        (x.matmul(&self.w1) + &self.b1).relu()
    }
    fn logits(&self, f: &Tensor) -> Tensor {
        f.matmul(&self.w2) + &self.b2
    }
}

impl TransformModel for Mlp {
    fn input_grad(&mut self, _: f64, _: bool, _: bool) -> Result<Tensor, String> {
        Err("SelMix asks for no input gradient".into())
    }
    fn validation(&mut self) -> Result<(Tensor, Tensor, Tensor), String> {
        xlab_plugin_api::tch::no_grad(|| {
            let f = self.features(&self.xv);
            let pred = self.logits(&f).argmax(-1, false);
            Ok((f, pred, self.yv.shallow_clone()))
        })
    }
    fn head(&mut self, features: &Tensor) -> Result<Tensor, String> {
        Ok(xlab_plugin_api::tch::no_grad(|| self.logits(&features.to_kind(Kind::Double))))
    }
    fn rows(&mut self, index: &Tensor) -> Result<Tensor, String> {
        Ok(self.x.index_select(0, index))
    }
    fn feature_mix(&mut self, partner: &Tensor, mu: &Tensor, index: &Tensor) -> Result<(), String> {
        self.mix = Some((partner.shallow_clone(), mu.to_kind(Kind::Double), index.shallow_clone()));
        Ok(())
    }
}

#[test]
fn trains_like_the_reference_loop() {
    const K: i64 = 3;
    const D: usize = 6;
    const H: usize = 8;
    const N: usize = 30;
    let (steps, batch, lr, seed) = (5, 8, 0.3, 19u64);
    let mut u = uniform(23);
    // Three classes, the last one rare and close to the first, so the classes differ in recall.
    let y: Vec<i64> = (0..N).map(|n| if n % 10 == 9 { 2 } else { (n % 2) as i64 }).collect();
    let centre = |k: i64, d: usize| match k {
        0 => {
            if d < 3 {
                1.0
            } else {
                0.0
            }
        }
        1 => {
            if d >= 3 {
                1.0
            } else {
                0.0
            }
        }
        _ => {
            if d < 3 {
                0.8
            } else {
                0.3
            }
        }
    };
    let mut sample = |labels: &[i64]| -> Vec<f64> {
        labels.iter().flat_map(|&k| (0..D).map(|d| centre(k, d) + (u() - 0.5) * 0.6).collect::<Vec<_>>()).collect()
    };
    let x = sample(&y);
    let yv: Vec<i64> = (0..12).map(|n| n % K).collect();
    let xv = sample(&yv);
    let w1: Vec<f64> = (0..D * H).map(|_| u() - 0.5).collect();
    let w2: Vec<f64> = (0..H * K as usize).map(|_| u() - 0.5).collect();
    let p = json!({"metric": "min_recall", "temperature": 0.5, "lambda_min": 0.8, "mix_min": 0.6, "every": 2,
                   "beta": 1.0, "val_lr": 1.0});
    let request = json!({"mode": "train", "x": x.chunks(D).collect::<Vec<_>>(), "y": y, "x_val": xv.chunks(D).collect::<Vec<_>>(),
                         "y_val": yv, "classes": K, "w1": w1.chunks(H).collect::<Vec<_>>(), "w2": w2.chunks(K as usize).collect::<Vec<_>>(),
                         "steps": steps, "batch": batch, "lr": lr, "seed": seed, "params": p});
    let want = run_python_reference(&script(), &request);

    let plugin = host::load(&built_plugin("xlab_plugin_mixup")).unwrap();
    let mut t = instantiate(&plugin, "mixup.selmix", p.clone());
    t.setup(&RunInfo { num_classes: K, n_train: N as u64, train_labels: y.clone(), ..Default::default() }).unwrap();
    let cpu = (Kind::Double, Device::Cpu);
    let mut m = Mlp {
        w1: Tensor::from_slice(&w1).reshape([D as i64, H as i64]).set_requires_grad(true),
        b1: Tensor::zeros([H as i64], cpu).set_requires_grad(true),
        w2: Tensor::from_slice(&w2).reshape([H as i64, K]).set_requires_grad(true),
        b2: Tensor::zeros([K], cpu).set_requires_grad(true),
        x: Tensor::from_slice(&x).reshape([N as i64, D as i64]),
        xv: Tensor::from_slice(&xv).reshape([12, D as i64]),
        yv: Tensor::from_slice(&yv),
        mix: None,
    };
    // The host's own batch only sets the batch size (SelMix draws its rows).
    let (xb, yb) = (Tensor::zeros([batch, D as i64], cpu), Tensor::zeros([batch], (Kind::Int64, Device::Cpu)));
    let mut rng = SplitMix(seed);
    for _ in 0..steps {
        let (xo, target) = t
            .transform_with(&xb, &yb, None, None, &yb, K, &mut || rng.next_u64(), Some(&mut m))
            .unwrap_or_else(|e| panic!("{e}"));
        let (partner, mu, _) = m.mix.take().expect("SelMix mixes features");
        let mu = mu.unsqueeze(1);
        let f = m.features(&xo) * &mu + m.features(&partner) * (mu.ones_like() - &mu);
        let logits = m.logits(&f);
        let loss = logits.cross_entropy_loss::<Tensor>(&target.argmax(-1, false), None, Reduction::Mean, -100, 0.0);
        let g = Tensor::run_backward(&[&loss], &[&m.w1, &m.b1, &m.w2, &m.b2], false, false);
        xlab_plugin_api::tch::no_grad(|| {
            for (p, g) in [&mut m.w1, &mut m.b1, &mut m.w2, &mut m.b2].into_iter().zip(&g) {
                *p -= g * lr;
            }
        });
    }
    for (got, key) in [(to_vec(&m.w1), "w1"), (to_vec(&m.b1), "b1"), (to_vec(&m.w2), "w2"), (to_vec(&m.b2), "b2")] {
        close(&got, &want[key], key);
    }
    let saved = t.save_state().unwrap().0;
    let lam: Vec<f64> = saved["lambdas"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    close(&lam, &want["lambdas"], "multipliers");
}
