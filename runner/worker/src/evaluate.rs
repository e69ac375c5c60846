//! Evaluation and metrics: loss, accuracy, calibration (ECE), per-class recall and per-group
//! accuracy of a model on a split; the `evaluate` task over parents' weights; the sharpness
//! probes (Hessian top eigenvalue, m-sharpness); and the one-class-predictor warning.

use crate::data::{self, Split};
use crate::events::Emitter;
use crate::model;
use crate::Failure;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use tch::nn;
use tch::{Device, Kind, Tensor};
use xlab_plan::config::JobConfig;
use xlab_proto::FailureCause;

/// Loss, accuracy, calibration, per-class recall and (with groups) per-group loss and accuracy
/// and worst-group accuracy on one split, without gradients, as `name.loss`, `name.acc`,
/// `name.ece`, `name.class_recall.C`, `name.worst_class_recall`, `name.group_loss.G`,
/// `name.group_acc.G`, `name.worst_group_acc`.
pub(crate) fn evaluate(
    net: &model::Model,
    name: &str,
    split: &Split,
    groups: usize,
    device: Device,
) -> Result<BTreeMap<String, f64>, Failure> {
    let region = crate::amp::job_region(device).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let probs = probabilities(net, &split.x, device, EVAL_ROWS);
    drop(region);
    score(&probs, name, split, groups, device)
}

/// Rows of a split that go through the network at once when it is evaluated: memory stays
/// bounded by this batch, never by the split's size.
pub(crate) const EVAL_ROWS: i64 = 1024;

/// The network's class probabilities (float64) for every row of `x`, without gradients, `rows`
/// rows at a time, each batch moved to `device` only for its own pass. The network is in
/// evaluation mode (no row sees another), so the batches give what one pass over `x` would.
pub(crate) fn probabilities(net: &model::Model, x: &Tensor, device: Device, rows: i64) -> Tensor {
    let n = x.size()[0];
    tch::no_grad(|| {
        let parts: Vec<Tensor> = (0..n)
            .step_by(rows.max(1) as usize)
            .map(|s| {
                let batch = x.narrow(0, s, rows.min(n - s)).to_device(device);
                crate::amp::full(net.forward_t(&batch, false)).softmax(-1, Kind::Double)
            })
            .collect();
        Tensor::cat(&parts, 0)
    })
}

/// Equal-width confidence bins of the expected calibration error.
const ECE_BINS: usize = 15;

/// Expected calibration error (Guo et al., 2017): over `bins` equal-width bins of the top-class
/// confidence (a bin is (lo, hi], the first also takes 0), Σ_b (n_b/N)·|acc_b − conf_b|.
pub fn expected_calibration_error(confidence: &[f64], correct: &[f64], bins: usize) -> f64 {
    let n = confidence.len();
    if n == 0 {
        return 0.0;
    }
    let mut sums = vec![(0.0f64, 0.0f64, 0usize); bins];
    for (c, r) in confidence.iter().zip(correct) {
        let b = ((c * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        sums[b].0 += c;
        sums[b].1 += r;
        sums[b].2 += 1;
    }
    // (n_b/N)·|acc_b − conf_b| = |Σ_b correct − Σ_b confidence| / N.
    sums.iter().filter(|s| s.2 > 0).map(|(c, r, _)| (r - c).abs() / n as f64).sum()
}

/// Loss, accuracy, calibration and per-group accuracies from predicted class probabilities.
pub(crate) fn score(
    probs: &Tensor,
    name: &str,
    split: &Split,
    groups: usize,
    device: Device,
) -> Result<BTreeMap<String, f64>, Failure> {
    let y = split.y.to_device(device);
    let mut out = BTreeMap::new();
    let picked = probs.gather(1, &y.unsqueeze(1), false).squeeze_dim(1).clamp_min(1e-12);
    let nll = -picked.log();
    out.insert(format!("{name}.loss"), f64::try_from(nll.mean(Kind::Double))?);
    let correct = probs.argmax(-1, false).eq_tensor(&y).to_kind(Kind::Double);
    out.insert(format!("{name}.acc"), f64::try_from(correct.mean(Kind::Double))?);
    let confidence = Vec::<f64>::try_from(probs.max_dim(-1, false).0.to_kind(Kind::Double))?;
    let right = Vec::<f64>::try_from(&correct)?;
    out.insert(format!("{name}.ece"), expected_calibration_error(&confidence, &right, ECE_BINS));
    // Recall of each class present in the split, and the worst of them.
    let classes = probs.size()[1];
    let hits = y.bincount(Some(&correct), classes);
    let counts = y.bincount::<Tensor>(None, classes).to_kind(Kind::Double);
    let (hits, counts) = (Vec::<f64>::try_from(hits.to_kind(Kind::Double))?, Vec::<f64>::try_from(counts)?);
    let mut worst_recall = f64::INFINITY;
    for (c, (h, n)) in hits.iter().zip(&counts).enumerate() {
        if *n > 0.0 {
            out.insert(format!("{name}.class_recall.{c}"), h / n);
            worst_recall = worst_recall.min(h / n);
        }
    }
    if worst_recall.is_finite() {
        out.insert(format!("{name}.worst_class_recall"), worst_recall);
    }
    if let Some(g) = &split.group {
        let g = g.to_device(device);
        let mut worst = f64::INFINITY;
        for k in 0..groups as i64 {
            let mask = g.eq(k).to_kind(Kind::Double);
            let n = f64::try_from(mask.sum(Kind::Double))?;
            if n > 0.0 {
                let acc = f64::try_from((&correct * &mask).sum(Kind::Double))? / n;
                out.insert(format!("{name}.group_acc.{k}"), acc);
                out.insert(format!("{name}.group_loss.{k}"), f64::try_from((&nll * &mask).sum(Kind::Double))? / n);
                worst = worst.min(acc);
            }
        }
        if worst.is_finite() {
            out.insert(format!("{name}.worst_group_acc"), worst);
        }
    }
    Ok(out)
}

/// The `evaluate` task: loads each parent job's final weights (built with the parent's model
/// config) and scores them on this job's validation and test splits. With several parents the
/// score is that of their averaged predictive distribution (an ensemble).
pub fn evaluate_parents(
    cfg: &JobConfig,
    parents: &[xlab_proto::ParentRef],
    device: Device,
    out: &mut Emitter,
) -> Result<BTreeMap<String, f64>, Failure> {
    if parents.is_empty() {
        return Err(Failure::new(
            FailureCause::Config,
            "`task: evaluate` needs parent jobs (`needs:` in the experiment file)",
        ));
    }
    let data = data::build(&cfg.data).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let mut probs: BTreeMap<&str, Tensor> = BTreeMap::new();
    let mut sharp: BTreeMap<String, f64> = BTreeMap::new();
    for p in parents {
        let pcfg: JobConfig = serde_json::from_value(p.config.clone())
            .map_err(|e| Failure::new(FailureCause::Config, format!("parent {}: config: {e}", p.job_id)))?;
        let model_cfg = pcfg.model.ok_or_else(|| {
            Failure::new(FailureCause::Config, format!("parent {} has no model to evaluate", p.job_id))
        })?;
        if model_cfg.is_diffusion() {
            return Err(Failure::new(
                FailureCause::Config,
                format!("parent {} trained a diffusion model; sample from it with `task: sample`", p.job_id),
            ));
        }
        let mut vs = nn::VarStore::new(device);
        let net = model::build_checked(&vs.root(), &model_cfg, data.input_dim, data.image, data.classes)
            .map_err(|m| Failure::new(FailureCause::Config, m))?;
        let weights = p.run_dir.join("weights.safetensors");
        vs.load(&weights).map_err(|e| {
            Failure::new(FailureCause::Error, format!("cannot load {} into the parent's model: {e}", weights.display()))
        })?;
        if let Some(sh) = &cfg.sharpness {
            let trainable: Vec<Tensor> = vs.trainable_variables();
            for (k, v) in sharpness(&net, &trainable, &data.train, sh, device)? {
                *sharp.entry(k).or_insert(0.0) += v / parents.len() as f64;
            }
        }
        let region = crate::amp::job_region(device).map_err(|m| Failure::new(FailureCause::Error, m))?;
        tch::no_grad(|| {
            for (name, split) in [("val", &data.val), ("test", &data.test)] {
                if split.is_empty() {
                    continue;
                }
                let pr = probabilities(&net, &split.x, device, EVAL_ROWS);
                let sum = match probs.remove(name) {
                    Some(acc) => acc + pr,
                    None => pr,
                };
                probs.insert(name, sum);
            }
        });
        drop(region);
    }
    let mut values = BTreeMap::new();
    for (name, split) in [("val", &data.val), ("test", &data.test)] {
        if let Some(p) = probs.get(name) {
            values.extend(score(&(p / parents.len() as f64), name, split, data.groups, device)?);
        }
    }
    values.insert("eval.models".to_string(), parents.len() as f64);
    values.extend(sharp);
    out.metrics(1, values.clone());
    Ok(values)
}

/// Sharpness of the mean training loss at the model's weights (see `config::Sharpness`): the
/// top Hessian eigenvalue by power iteration on Hessian-vector products, and the m-sharpness
/// estimate. The model runs in evaluation mode, so the loss is a function of the weights alone.
pub(crate) fn sharpness(
    net: &model::Model,
    params: &[Tensor],
    train: &Split,
    sh: &xlab_plan::config::Sharpness,
    device: Device,
) -> Result<BTreeMap<String, f64>, Failure> {
    let n = train.len().min(sh.samples) as i64;
    let x = train.x.narrow(0, 0, n).to_device(device);
    let y = train.y.narrow(0, 0, n).to_device(device);
    let loss_on = |lo: i64, len: i64| {
        net.forward_t(&x.narrow(0, lo, len), false).log_softmax(-1, Kind::Float).nll_loss(&y.narrow(0, lo, len))
    };
    let dot = |a: &[Tensor], b: &[Tensor]| -> Result<f64, Failure> {
        let mut s = 0.0;
        for (u, v) in a.iter().zip(b) {
            s += f64::try_from((u * v).sum(Kind::Double))?;
        }
        Ok(s)
    };
    // Power iteration: v ← Hv/‖Hv‖, λ = ⟨v, Hv⟩.
    let loss = loss_on(0, n);
    let grads = Tensor::f_run_backward(&[&loss], params, true, true)?;
    let mut gen = ChaCha8Rng::seed_from_u64(sh.seed);
    let mut v: Vec<Tensor> = params
        .iter()
        .map(|p| {
            let vals: Vec<f32> = (0..p.numel()).map(|_| crate::data::normal(&mut gen) as f32).collect();
            Tensor::from_slice(&vals).reshape(p.size()).to_device(device)
        })
        .collect();
    let mut lambda = 0.0;
    for _ in 0..sh.power_iterations {
        let norm = dot(&v, &v)?.sqrt();
        v = v.iter().map(|t| t / norm).collect();
        let gv = grads.iter().zip(&v).map(|(g, v)| (g * v).sum(Kind::Float)).fold(None, |acc: Option<Tensor>, t| {
            Some(match acc {
                Some(a) => a + t,
                None => t,
            })
        });
        let Some(gv) = gv else { break };
        let hv = Tensor::f_run_backward(&[&gv], params, true, false)?;
        lambda = dot(&v, &hv)?;
        v = hv;
    }
    // m-sharpness: one normalized ascent step per chunk of m examples.
    let m = sh.m as i64;
    let mut total = 0.0;
    let mut chunks = 0;
    let mut lo = 0;
    while lo < n {
        let len = m.min(n - lo);
        let before = loss_on(lo, len);
        let g = Tensor::f_run_backward(&[&before], params, false, false)?;
        let gn = dot(&g, &g)?.sqrt();
        let scale = sh.rho / (gn + 1e-12);
        let saved: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
        tch::no_grad(|| {
            for (p, g) in params.iter().zip(&g) {
                let _ = p.shallow_clone().f_add_(&(g * scale));
            }
        });
        let after = tch::no_grad(|| loss_on(lo, len));
        tch::no_grad(|| {
            for (p, s) in params.iter().zip(&saved) {
                let _ = p.shallow_clone().f_copy_(s);
            }
        });
        total += f64::try_from(&after)? - f64::try_from(&before)?;
        chunks += 1;
        lo += len;
    }
    Ok(BTreeMap::from([
        ("sharpness.hessian_top".to_string(), lambda),
        ("sharpness.m_sharpness".to_string(), total / f64::from(chunks)),
    ]))
}

/// The split (test, else validation) on which every example was predicted as one class: one
/// class has recall 1 and every other 0.
pub(crate) fn single_class(summary: &BTreeMap<String, f64>, classes: usize) -> Option<&'static str> {
    ["test", "val"].into_iter().find(|split| {
        let recalls: Vec<f64> =
            (0..classes).filter_map(|c| summary.get(&format!("{split}.class_recall.{c}")).copied()).collect();
        recalls.len() == classes && classes >= 2 && recalls.iter().filter(|r| **r > 0.0).count() == 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_calibration_error_by_hand() {
        // Bin (13/15, 14/15]: confidence 0.9 twice, one right: |0.5 − 0.9|·2/4 = 0.2.
        // Bin (8/15, 9/15]: confidence 0.6 twice, both right: |1 − 0.6|·2/4 = 0.2.
        let ece = expected_calibration_error(&[0.9, 0.9, 0.6, 0.6], &[1.0, 0.0, 1.0, 1.0], 15);
        assert!((ece - 0.4).abs() < 1e-12, "{ece}");
        assert_eq!(expected_calibration_error(&[0.8, 0.8, 0.8, 0.8, 0.8], &[1.0, 1.0, 1.0, 1.0, 0.0], 15), 0.0);
    }

    #[test]
    fn a_split_evaluated_in_batches_gets_the_probabilities_of_one_pass() {
        use xlab_plan::config::{Activation, Mlp, ModelConfig, Norm};
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig::Mlp(Mlp { hidden: vec![16, 16], activation: Activation::Relu, norm: Norm::Batch });
        let net = model::build(&vs.root(), &cfg, 5, None, 4);
        // Running statistics away from their initial values, as after training.
        let _ = net.forward_t(&(Tensor::randn([64, 5], (Kind::Float, Device::Cpu)) * 3.0 + 1.0), true);
        let x = Tensor::randn([103, 5], (Kind::Float, Device::Cpu));
        let whole = tch::no_grad(|| net.forward_t(&x, false).softmax(-1, Kind::Double));
        for rows in [1, 7, 50, 103, 1024] {
            let batched = probabilities(&net, &x, Device::Cpu, rows);
            assert_eq!(batched.size(), [103, 4]);
            let gap = f64::try_from((&batched - &whole).abs().max()).unwrap();
            assert!(gap < 1e-6, "{rows} rows at a time: {gap}");
        }
        // Evaluation mode: the batches leave the running statistics alone.
        let again = tch::no_grad(|| net.forward_t(&x, false).softmax(-1, Kind::Double));
        assert_eq!(f64::try_from((&again - &whole).abs().max()).unwrap(), 0.0);
    }
}
