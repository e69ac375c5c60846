//! `mixup.selmix`: SelMix, selective mixup fine-tuning for non-decomposable objectives
//! (Ramasubramanian et al., ICLR 2024), in its supervised form.
//!
//! Reference: val-iisc/SelMix `finetuning/selmix_ssl.py` (the loop), `MetricOptimisation/
//! base_optimizer.py` and `metrics.py` (the gains), `dataloaders/sampler.py` (the joint sampler
//! with `semi_supervised=False`), `models/wrapper.py` (feature mixing) and `trainMetricOpt.py`.
//!
//! Every `every` steps, before the step, on the validation split in evaluation mode:
//! - C: the confusion matrix normalized over all examples (K×K), clipped to [1e-7, 1e4] where
//!   the reference clips it;
//! - z_k: class prototypes, the mean penultimate feature of class k;
//! - mixed prototypes z_ij = m·z_i + (1−m)·z_j with m = (λ_min + 1)/2, and the head's softmax
//!   p_ij on each;
//! - the logit change rate LCR[i,j,q,l] = −⟨z_ij, z_q⟩·p_ij[l] + [l = i]·⟨z_ii, z_q⟩;
//! - the metric's gain rate D = dM/dA (`mean_recall`, `min_recall` with its multiplicative-weights
//!   λ updated by λ_k ← λ_k^β·exp(−val_lr·recall_k) and normalized, `g_mean`, `h_mean`);
//! - G[i,j] = Σ_{q,l} D[q,l]·LCR[i,j,q,l] and P = softmax(G/T) over all K² pairs, kept where
//!   G > 0, plus 1e-8, normalized.
//!
//! Each step draws its own batch of the host's batch size: with ε = 1/K³,
//! p₁(i) = Σ_j (P[i,j] + ε) and p₂(j|i) = (P[i,j] + ε)/(p₁(i) + ε), example n is drawn with
//! weight p₁(y_n)/prior(y_n), then for each drawn example of class i a partner m with weight
//! p₂(y_m|i)/prior(y_m) (the training set is both sides of the pair); then μ ~ U(mix_min, 1) per
//! row. The rows train as head(μ·f(x) + (1−μ)·f(x')) against the first example's label (the
//! host's feature mixing; both feature passes with BatchNorm frozen, normalizing by its running
//! statistics).
//!
//! Randomness, from the host's stream only: all first examples, then all partners, then all μ,
//! each weighted draw as one uniform against the cumulative weights.
//!
//! Deviations:
//! - The reference fine-tunes a FixMatch-pretrained model on labelled and pseudo-labelled data;
//!   here both examples of a pair come from the labelled training set, as the reference's
//!   sampler does with `semi_supervised=False`. Start it from a trained model with `init:`.
//! - The reference turns BatchNorm's updates off by keeping no running statistics at all
//!   (batch statistics in evaluation too); here BatchNorm is frozen at its running statistics
//!   during the mixed passes, as in evaluation.
//! - C is always K×K (sklearn's drops a class that neither appears nor is predicted); a class
//!   with no validation example is refused.
//! - The loss's logit temperature is 1.

use serde::{Deserialize, Serialize};
use xlab_plugin_api::tch::{Device, Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Batch, BatchTransform, Component, ComponentKind, HostRng, PluginError, Result, RunInfo, State, Transformed,
};

#[derive(Debug, Clone, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct SelMixParams {
    /// the objective: mean_recall, min_recall, g_mean or h_mean
    #[param(default = "min_recall", choices = ["mean_recall", "min_recall", "g_mean", "h_mean"])]
    pub metric: String,
    /// T of the pair distribution softmax(G/T)
    #[param(default = 1.0, min = 1e-09)]
    pub temperature: f64,
    /// mixed prototypes at λ = (λ_min + 1)/2 (the reference's MinRecall uses 0.8)
    #[param(default = 0.6, min = 0.0, max = 1.0)]
    pub lambda_min: f64,
    /// feature mixing μ ~ U(mix_min, 1)
    #[param(default = 0.6, min = 0.0, max = 1.0)]
    pub mix_min: f64,
    /// steps between re-estimates on the validation split
    #[param(default = 5, min = 1.0)]
    pub every: i64,
    /// min_recall: exponent of the multipliers' update
    #[param(default = 1.0)]
    pub beta: f64,
    /// min_recall: step size of the multipliers' update
    #[param(default = 1.0)]
    pub val_lr: f64,
}

const METRICS: [&str; 4] = ["mean_recall", "min_recall", "g_mean", "h_mean"];

/// What carries over between steps (and checkpoints).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Saved {
    /// Steps taken.
    steps: u64,
    /// `min_recall`'s multipliers.
    lambdas: Vec<f64>,
    /// The current sampling distribution over class pairs, row-major K×K.
    p: Vec<f64>,
}

pub struct SelMix {
    p: SelMixParams,
    labels: Vec<i64>,
    prior: Vec<f64>,
    classes: usize,
    saved: Saved,
}

impl Component for SelMix {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "mixup.selmix";
    const SUMMARY: &'static str =
        "SelMix: mixup in feature space of class pairs chosen to raise a non-decomposable metric such as the worst class's recall";
    const REFERENCE: &'static str = "Ramasubramanian et al., Selective Mixup Fine-Tuning for Optimizing Non-Decomposable Objectives, ICLR 2024; val-iisc/SelMix";
    const RANDOM: bool = true;
    const STATEFUL: bool = true;
    const QUERIES_MODEL: bool = true;
    type Params = SelMixParams;

    fn new(p: SelMixParams) -> Result<Self> {
        if !METRICS.contains(&p.metric.as_str()) {
            return Err(PluginError(format!("metric is one of {}, got `{}`", METRICS.join(", "), p.metric)));
        }
        if !(p.temperature > 0.0 && p.temperature.is_finite()) || p.every < 1 {
            return Err(PluginError("temperature must be > 0 and every at least 1".into()));
        }
        if ![p.lambda_min, p.mix_min].iter().all(|v| (0.0..=1.0).contains(v)) {
            return Err(PluginError("lambda_min and mix_min must be in [0, 1]".into()));
        }
        Ok(SelMix { p, labels: vec![], prior: vec![], classes: 0, saved: Saved::default() })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        let k = info.num_classes as usize;
        if info.train_labels.is_empty() || k < 2 {
            return Err(PluginError(format!("{} needs the training labels of a classification task", Self::ID)));
        }
        let mut count = vec![0.0; k];
        for &y in &info.train_labels {
            count[y as usize] += 1.0;
        }
        if let Some(c) = count.iter().position(|&c| c == 0.0) {
            return Err(PluginError(format!("class {c} has no training example to draw")));
        }
        let n = info.train_labels.len() as f64;
        self.prior = count.iter().map(|c| c / n).collect();
        self.labels = info.train_labels.clone();
        self.classes = k;
        if self.saved.lambdas.is_empty() {
            self.saved.lambdas = vec![1.0 / k as f64; k];
        }
        Ok(())
    }

    fn save_state(&self) -> Result<State> {
        Ok(State { json: serde_json::to_value(&self.saved)?, tensors: Default::default() })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        self.saved = serde_json::from_value(state.json)?;
        Ok(())
    }
}

/// The validation statistics the gains start from.
pub struct Estimate {
    /// Confusion matrix normalized over all examples, row-major K×K (unclipped).
    pub cm: Vec<f64>,
    /// Class prototypes, K × d.
    pub prototypes: Vec<Vec<f64>>,
}

/// The classifier head on feature rows: logits, one row per input row.
pub type HeadFn<'a> = dyn FnMut(&[Vec<f64>]) -> Result<Vec<Vec<f64>>> + 'a;

/// Gains and sampling distribution for one estimate: `head` gives softmax inputs (logits) for
/// feature rows. Returns (P, G), row-major K×K; `lambdas` is `min_recall`'s state, updated.
pub fn sampling_distribution(
    p: &SelMixParams,
    est: &Estimate,
    lambdas: &mut [f64],
    head: &mut HeadFn<'_>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let k = est.prototypes.len();
    let kf = k as f64;
    let cm: Vec<f64> = est.cm.iter().map(|v| v.clamp(1e-7, 1e4)).collect();
    let c = |i: usize, j: usize| cm[i * k + j];
    let z = &est.prototypes;
    let m = (p.lambda_min + 1.0) / 2.0;
    let mixed: Vec<Vec<f64>> =
        (0..k * k).map(|ij| z[ij / k].iter().zip(&z[ij % k]).map(|(a, b)| m * a + (1.0 - m) * b).collect()).collect();
    let pred: Vec<Vec<f64>> = head(&mixed)?.into_iter().map(|l| softmax(&l)).collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    // ⟨z_ij, z_q⟩ for every pair and class.
    let dots: Vec<Vec<f64>> = mixed.iter().map(|v| z.iter().map(|zq| dot(v, zq)).collect()).collect();
    let rowsum: Vec<f64> = (0..k).map(|i| (0..k).map(|j| c(i, j)).sum()).collect();
    // dC/dA restricted to row i: dc[i][j][l] = ∂C[i,j]/∂A[i,l].
    let dc =
        |i: usize, j: usize, l: usize| if l == j { c(i, j) - kf * c(i, j).powi(2) } else { -kf * c(i, l) * c(i, j) };
    let raw = |i: usize, j: usize| est.cm[i * k + j];
    let recall: Vec<f64> = (0..k).map(|i| raw(i, i) / (0..k).map(|j| raw(i, j)).sum::<f64>()).collect();
    let mut gain = vec![0.0; k * k];
    match p.metric.as_str() {
        "mean_recall" | "min_recall" => {
            let weight: Vec<f64> = if p.metric == "min_recall" {
                let clipped_recall: Vec<f64> = (0..k).map(|i| c(i, i) / rowsum[i]).collect();
                let new: Vec<f64> =
                    lambdas.iter().zip(&clipped_recall).map(|(l, r)| l.powf(p.beta) * (-p.val_lr * r).exp()).collect();
                let total: f64 = new.iter().sum();
                for (l, n) in lambdas.iter_mut().zip(&new) {
                    *l = n / total;
                }
                lambdas.iter().map(|l| l * kf).collect()
            } else {
                vec![1.0; k]
            };
            for i in 0..k {
                for j in 0..k {
                    gain[i * k + j] =
                        weight[i] * if i == j { c(i, i) - kf * c(i, i).powi(2) } else { -kf * c(i, j) * c(i, i) };
                }
            }
        }
        metric => {
            // dM/dC, then dM/dA[q,l] = Σ_j dM/dC[q,j]·dC[q,j]/dA[q,l].
            let dm_dc: Vec<f64> = if metric == "g_mean" {
                let gm = (recall.iter().map(|r| r.ln()).sum::<f64>() / kf).exp();
                (0..k * k)
                    .map(|ij| {
                        let (i, j) = (ij / k, ij % k);
                        let d = if i == j { 1.0 / c(i, i) - 1.0 / rowsum[i] } else { -1.0 / rowsum[i] };
                        gm * d / kf
                    })
                    .collect()
            } else {
                let hm = kf / recall.iter().map(|r| 1.0 / r).sum::<f64>();
                (0..k * k)
                    .map(|ij| {
                        let (i, j) = (ij / k, ij % k);
                        let d = if i == j { 1.0 / c(i, i) - rowsum[i] / c(i, i).powi(2) } else { 1.0 / c(i, i) };
                        -hm * hm / kf * d
                    })
                    .collect()
            };
            for q in 0..k {
                for l in 0..k {
                    gain[q * k + l] = (0..k).map(|j| dm_dc[q * k + j] * dc(q, j, l)).sum();
                }
            }
        }
    }
    // G[i,j] = Σ_{q,l} D[q,l]·LCR[i,j,q,l].
    let g: Vec<f64> = (0..k * k)
        .map(|ij| {
            let i = ij / k;
            (0..k)
                .map(|q| {
                    (0..k)
                        .map(|l| {
                            let lcr = -dots[ij][q] * pred[ij][l] + if l == i { dots[i * k + i][q] } else { 0.0 };
                            gain[q * k + l] * lcr
                        })
                        .sum::<f64>()
                })
                .sum()
        })
        .collect();
    let scaled: Vec<f64> = g.iter().map(|v| v / p.temperature).collect();
    let soft = softmax(&scaled);
    let masked: Vec<f64> = soft.iter().zip(&g).map(|(s, v)| if *v > 0.0 { *s } else { 0.0 } + 1e-8).collect();
    let total: f64 = masked.iter().sum();
    Ok((masked.iter().map(|v| v / total).collect(), g))
}

fn softmax(v: &[f64]) -> Vec<f64> {
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|x| (x - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// One draw with the given weights: a uniform against their running sum.
fn weighted(rng: &mut HostRng<'_>, cumulative: &[f64]) -> usize {
    let total = *cumulative.last().expect("weights");
    let u = rng.uniform() * total;
    cumulative.partition_point(|&c| c <= u).min(cumulative.len() - 1)
}

fn cumulative(w: impl Iterator<Item = f64>) -> Vec<f64> {
    w.scan(0.0, |acc, x| {
        *acc += x;
        Some(*acc)
    })
    .collect()
}

impl SelMix {
    fn estimate(&mut self, model: &xlab_plugin_api::ModelHost<'_>) -> Result<()> {
        let k = self.classes;
        let (features, pred, labels) = model.validation()?;
        let f = features.to_device(Device::Cpu).to_kind(Kind::Double);
        let pred = Vec::<i64>::try_from(pred.to_device(Device::Cpu))?;
        let labels = Vec::<i64>::try_from(labels.to_device(Device::Cpu))?;
        let d = f.size()[1] as usize;
        let rows = Vec::<f64>::try_from(f.flatten(0, -1))?;
        let mut cm = vec![0.0; k * k];
        let mut sums = vec![vec![0.0; d]; k];
        let mut counts = vec![0.0; k];
        for (n, (&y, &p)) in labels.iter().zip(&pred).enumerate() {
            cm[y as usize * k + p as usize] += 1.0;
            counts[y as usize] += 1.0;
            for (s, v) in sums[y as usize].iter_mut().zip(&rows[n * d..(n + 1) * d]) {
                *s += v;
            }
        }
        if let Some(c) = counts.iter().position(|&c| c == 0.0) {
            return Err(PluginError(format!("class {c} has no validation example; SelMix needs every class there")));
        }
        let n = labels.len() as f64;
        cm.iter_mut().for_each(|v| *v /= n);
        let prototypes = sums.iter().zip(&counts).map(|(s, c)| s.iter().map(|v| v / c).collect()).collect();
        let est = Estimate { cm, prototypes };
        let mut head = |feats: &[Vec<f64>]| -> Result<Vec<Vec<f64>>> {
            let flat: Vec<f64> = feats.iter().flatten().copied().collect();
            let t = Tensor::from_slice(&flat).reshape([feats.len() as i64, d as i64]);
            let logits = model.head(&t)?.to_device(Device::Cpu).to_kind(Kind::Double);
            let v = Vec::<f64>::try_from(logits.flatten(0, -1))?;
            Ok(v.chunks(k).map(<[f64]>::to_vec).collect())
        };
        let (p, _) = sampling_distribution(&self.p, &est, &mut self.saved.lambdas, &mut head)?;
        self.saved.p = p;
        Ok(())
    }
}

impl BatchTransform for SelMix {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let model = batch.model.as_ref().ok_or_else(|| {
            PluginError(format!(
                "{} needs the model (validation, head and training rows), and this host runs none",
                Self::ID
            ))
        })?;
        if self.saved.steps.is_multiple_of(self.p.every as u64) || self.saved.p.is_empty() {
            self.estimate(model)?;
        }
        self.saved.steps += 1;
        let k = self.classes;
        let eps = 1.0 / (k as f64).powi(3);
        let pm = &self.saved.p;
        let p1: Vec<f64> = (0..k).map(|i| (0..k).map(|j| pm[i * k + j] + eps).sum()).collect();
        let first = cumulative(self.labels.iter().map(|&y| p1[y as usize] / self.prior[y as usize]));
        let partner: Vec<Vec<f64>> = (0..k)
            .map(|i| {
                cumulative(
                    self.labels
                        .iter()
                        .map(|&y| (pm[i * k + y as usize] + eps) / (p1[i] + eps) / self.prior[y as usize]),
                )
            })
            .collect();
        let b = batch.x.size()[0] as usize;
        let a: Vec<i64> = (0..b).map(|_| weighted(rng, &first) as i64).collect();
        let c: Vec<i64> = a.iter().map(|&n| weighted(rng, &partner[self.labels[n as usize] as usize]) as i64).collect();
        let mu: Vec<f32> = (0..b).map(|_| (self.p.mix_min + (1.0 - self.p.mix_min) * rng.uniform()) as f32).collect();
        let (ia, ic) = (Tensor::from_slice(&a), Tensor::from_slice(&c));
        let x = model.rows(&ia)?;
        let x2 = model.rows(&ic)?;
        let y: Vec<i64> = a.iter().map(|&n| self.labels[n as usize]).collect();
        let target = Tensor::from_slice(&y).one_hot(k as i64).to_kind(batch.x.kind()).to_device(x.device());
        model.feature_mix(&x2, &Tensor::from_slice(&mu), &ia)?;
        Ok(Transformed { x, target })
    }
}
