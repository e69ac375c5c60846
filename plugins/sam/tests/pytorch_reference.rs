//! Every SAM-family step rule against PyTorch: `tests/reference/sam_reference.py` writes each
//! variant as its reference optimizer does and trains a tiny network (2 → 4 tanh, scaled by a
//! normalization weight, → 3) for a few SGD-with-momentum steps; the plugin, loaded through the
//! real boundary, drives the same network here in tch and must end at the same weights. Needs
//! the project's Python environment (`make setup`), or a Python with torch in `XLAB_PYTHON`.

use serde_json::{json, Value};
use std::path::PathBuf;
use xlab_plugin_api::abi::tags;
use xlab_plugin_api::tch::{self, Kind, Tensor};
use xlab_plugin_host::testing::{built_plugin, instantiate, run_python_reference, to_vec, SplitMix};
use xlab_plugin_host::{self as host, StepDriver};

const NAMES: [(&str, &[i64], u32); 5] = [
    ("fc1.weight", &[4, 2], tags::WEIGHT),
    ("fc1.bias", &[4], tags::BIAS),
    ("norm.weight", &[4], tags::NORM),
    ("fc2.weight", &[3, 4], tags::WEIGHT),
    ("fc2.bias", &[3], tags::BIAS),
];

/// The tiny network with torch's SGD (momentum 0.9, no dampening) as the base optimizer; with
/// an objective component, the loss goes through it (per-example losses and logits in).
struct Tiny {
    params: Vec<Tensor>,
    momentum: Vec<Option<Tensor>>,
    x: Tensor,
    y: Tensor,
    lr: f64,
    objective: Option<xlab_plugin_host::Instance>,
}

fn forward(p: &[Tensor], x: &Tensor) -> Tensor {
    let h = (x.matmul(&p[0].tr()) + &p[1]).tanh() * &p[2];
    h.matmul(&p[3].tr()) + &p[4]
}

/// What an objective sees of the tiny network: its variables, and a forward pass with others.
struct TinyHost<'a> {
    params: &'a [Tensor],
    x: &'a Tensor,
}

impl xlab_plugin_host::ObjectiveDriver for TinyHost<'_> {
    fn log(&mut self, _: &str, _: f64) {}
    fn model_state(&mut self) -> Vec<(String, Tensor)> {
        NAMES.iter().zip(self.params).map(|((n, _, _), t)| (n.to_string(), t.shallow_clone())).collect()
    }
    fn forward_with(&mut self, vars: &[Tensor]) -> Result<Tensor, String> {
        Ok(tch::no_grad(|| forward(vars, self.x)))
    }
}

impl StepDriver for Tiny {
    fn forward_backward(&mut self) -> Result<f64, String> {
        let n = self.batch_size();
        self.forward_backward_rows(0, n)
    }
    fn batch_size(&self) -> usize {
        self.y.size()[0] as usize
    }
    fn forward_backward_rows(&mut self, lo: usize, hi: usize) -> Result<f64, String> {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let x = self.x.narrow(0, lo as i64, (hi - lo) as i64);
        let y = self.y.narrow(0, lo as i64, (hi - lo) as i64);
        let logits = forward(&self.params, &x);
        let loss = match &mut self.objective {
            None => logits.log_softmax(-1, Kind::Double).nll_loss(&y),
            Some(obj) => {
                let per = logits.log_softmax(-1, Kind::Double).gather(1, &y.unsqueeze(1), false).squeeze_dim(1).neg();
                let idx = Tensor::arange_start(lo as i64, hi as i64, (Kind::Int64, tch::Device::Cpu));
                let mut host = TinyHost { params: &self.params, x: &x };
                obj.objective_full(&per, &per, None, &idx, Some(&logits), true, &mut host)?
            }
        };
        loss.backward();
        f64::try_from(&loss).map_err(|e| e.to_string())
    }
    fn n_params(&self) -> usize {
        self.params.len()
    }
    fn param(&mut self, i: usize) -> (&mut Tensor, &str, u32) {
        (&mut self.params[i], NAMES[i].0, NAMES[i].2)
    }
    fn optimizer_step(&mut self) -> Result<(), String> {
        tch::no_grad(|| {
            for (p, buf) in self.params.iter_mut().zip(&mut self.momentum) {
                let g = p.grad();
                let b = match buf.take() {
                    None => g.copy(),
                    Some(b) => b * 0.9 + &g,
                };
                let _ = p.f_sub_(&(&b * self.lr)).map_err(|e| e.to_string())?;
                *buf = Some(b);
            }
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
fn every_variant_matches_its_pytorch_reference_on_a_tiny_network() {
    let mut rng = SplitMix(42);
    let mut u = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
    let mut init = serde_json::Map::new();
    for (name, shape, _) in NAMES {
        let n: i64 = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| if name == "norm.weight" { 1.0 + u() * 0.5 } else { u() * 1.5 }).collect();
        init.insert(name.into(), json!(v));
    }
    let x: Vec<Vec<f64>> = (0..12).map(|_| vec![u() * 3.0, u() * 3.0]).collect();
    let y: Vec<i64> = (0..12).map(|i| i % 3).collect();
    let cases = vec![
        json!({"id": "sam.sam", "params": {"rho": 0.05}}),
        json!({"id": "sam.sam", "params": {"rho": 0.1, "m": 5}}),
        json!({"id": "sam.asam", "params": {"rho": 0.5, "eta": 0.01}}),
        json!({"id": "sam.asam", "params": {"rho": 1.0, "variant": "davda54"}}),
        json!({"id": "sam.gam", "params": {"grad_rho": 0.03, "grad_norm_rho": 0.2, "beta0": 0.1, "beta1": 0.1, "gamma": 0.05}}),
        json!({"id": "sam.fsam", "params": {"rho": 0.05, "keep_ratio": 0.25, "mask_iter": 2}}),
        json!({"id": "sam.sam_on", "params": {"rho": 0.5, "eta": 0.01}}),
        json!({"id": "sam.sam_on", "params": {"rho": 0.3, "adaptive": false}}),
        json!({"id": "sam.amp", "params": {"epsilon": 0.1, "inner_lr": 1.0, "inner_iter": 2}}),
        json!({"id": "sam.fd_gr", "params": {"gamma": 0.1, "epsilon": 0.05}}),
        json!({"id": "sam.fd_gr", "params": {"gamma": 0.1, "epsilon": 0.05, "direction": "backward"}}),
        json!({"id": "sam.saf", "epochs": 4,
               "params": {"lambda": 0.3, "tau": 2.0, "minus_epoch": 2, "kl_start": 0, "kl_end": 300}}),
        json!({"id": "sam.mesa", "epochs": 3,
               "params": {"decay": 0.6, "lambda": 0.5, "tau": 2.0, "kl_start": 0, "kl_end": 360}}),
    ];
    let (steps, lr) = (4, 0.1);
    let request = json!({"init": init, "x": x, "y": y, "steps": steps, "lr": lr, "cases": cases});
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/sam_reference.py");
    let want: Vec<Value> = serde_json::from_value(run_python_reference(&script, &request)).unwrap();

    let plugin = host::load(&built_plugin("xlab_plugin_sam")).unwrap();
    let xs: Vec<f64> = x.iter().flatten().copied().collect();
    for (case, want) in cases.iter().zip(&want) {
        let mut rule = instantiate(&plugin, case["id"].as_str().unwrap(), case["params"].clone());
        let mut net = Tiny {
            params: NAMES
                .iter()
                .map(|(n, shape, _)| {
                    let v: Vec<f64> = init[*n].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                    Tensor::from_slice(&v).reshape(*shape).set_requires_grad(true)
                })
                .collect(),
            momentum: NAMES.iter().map(|_| None).collect(),
            x: Tensor::from_slice(&xs).reshape([12, 2]),
            y: Tensor::from_slice(&y),
            lr,
            objective: None,
        };
        if case["id"] == "sam.saf" || case["id"] == "sam.mesa" {
            // An objective: plain SGD steps, the loss through the component, over epochs.
            let mut saf = rule;
            saf.setup(&xlab_plugin_api::RunInfo { num_classes: 3, n_train: 12, ..Default::default() }).unwrap();
            net.objective = Some(saf);
            for e in 0..case["epochs"].as_u64().unwrap() {
                net.objective.as_mut().unwrap().on_epoch(e).unwrap();
                for _ in 0..steps {
                    net.forward_backward().unwrap_or_else(|m| panic!("{case}: {m}"));
                    net.optimizer_step().unwrap();
                }
            }
        } else {
            for s in 0..steps {
                rule.step(&mut net, 0, s).unwrap_or_else(|e| panic!("{case}: {e}"));
            }
        }
        for (i, (name, _, _)) in NAMES.iter().enumerate() {
            let got = to_vec(&net.params[i]);
            let expect: Vec<f64> = want[*name].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let moved: f64 =
                expect.iter().zip(init[*name].as_array().unwrap()).map(|(a, b)| (a - b.as_f64().unwrap()).abs()).sum();
            assert!(moved > 0.0, "{case}: {name} never moved");
            for (a, b) in got.iter().zip(&expect) {
                assert!((a - b).abs() < 1e-10, "{case}: {name}: plugin {got:?} vs PyTorch {expect:?}");
            }
        }
    }
}
