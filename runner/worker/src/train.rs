//! The `train` task: mini-batch training with evaluation on the validation and test splits
//! after every epoch.

use crate::checkpoint;
use crate::data::{self, Split};
use crate::events::Emitter;
use crate::model;
use crate::optim::Optimizer;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn;
use tch::{Device, Kind, Tensor};
use xlab_plugin_api::host::{Instance, StepDriver};
use xlab_plugin_api::{RunInfo, Sampling};
use xlab_proto::FailureCause;
use xlab_spec::config::JobConfig;

/// A job failure with its classified cause.
#[derive(Debug)]
pub struct Failure {
    pub cause: FailureCause,
    pub message: String,
}

impl Failure {
    pub fn new(cause: FailureCause, message: impl Into<String>) -> Self {
        Self { cause, message: message.into() }
    }
}

impl From<tch::TchError> for Failure {
    fn from(e: tch::TchError) -> Self {
        let message = e.to_string();
        let cause = if is_out_of_memory(&message) { FailureCause::OutOfMemory } else { FailureCause::Error };
        // libtorch appends a C++ backtrace; the first line says what happened.
        Self { cause, message: message.lines().next().unwrap_or_default().to_string() }
    }
}

/// libtorch's words for a failed allocation: "CUDA out of memory", and on the CPU
/// "DefaultCPUAllocator: can't allocate memory" or "not enough memory".
pub fn is_out_of_memory(message: &str) -> bool {
    ["out of memory", "not enough memory", "can't allocate memory"].iter().any(|m| message.contains(m))
}

/// Loss, accuracy, calibration, per-class recall and (with groups) per-group loss and accuracy
/// and worst-group accuracy on one split, without gradients, as `name.loss`, `name.acc`,
/// `name.ece`, `name.class_recall.C`, `name.worst_class_recall`, `name.group_loss.G`,
/// `name.group_acc.G`, `name.worst_group_acc`.
fn evaluate(
    net: &model::Model,
    name: &str,
    split: &Split,
    groups: usize,
    device: Device,
) -> Result<BTreeMap<String, f64>, Failure> {
    let region = crate::amp::job_region(device).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let probs =
        tch::no_grad(|| crate::amp::full(net.forward_t(&split.x.to_device(device), false)).softmax(-1, Kind::Double));
    drop(region);
    score(&probs, name, split, groups, device)
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
fn score(
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
                let pr = crate::amp::full(net.forward_t(&split.x.to_device(device), false)).softmax(-1, Kind::Double);
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
fn sharpness(
    net: &model::Model,
    params: &[Tensor],
    train: &Split,
    sh: &xlab_spec::config::Sharpness,
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

/// What the loss compares the logits with.
enum Target {
    /// Class indices: the usual cross-entropy.
    Hard(Tensor),
    /// Soft targets from a batch transform: `−Σ_c t_c log softmax(z)_c`.
    Soft(Tensor),
}

/// The plugin components of a job.
#[derive(Default)]
pub struct Components {
    pub step_rule: Option<Instance>,
    pub batch_transform: Option<Instance>,
    pub objective: Option<Instance>,
    pub sampler: Option<Instance>,
    pub guidance: Option<Instance>,
}

impl Components {
    pub fn all(&mut self) -> impl Iterator<Item = &mut Instance> {
        self.slots().map(|(_, i)| i)
    }

    /// The components present, by slot name.
    pub fn slots(&mut self) -> impl Iterator<Item = (&'static str, &mut Instance)> {
        [
            ("step_rule", &mut self.step_rule),
            ("batch_transform", &mut self.batch_transform),
            ("objective", &mut self.objective),
            ("sampler", &mut self.sampler),
            ("guidance", &mut self.guidance),
        ]
        .into_iter()
        .filter_map(|(k, i)| i.as_mut().map(|i| (k, i)))
    }
}

/// Running sums of what one epoch reports. The per-example statistics of each batch stay on the
/// device until the epoch ends (`settle`), so recording them costs no host synchronization.
#[derive(Default)]
struct EpochStats {
    /// The host-side sums (loss, correct, examples, steps, passes, plugin values, per group);
    /// a checkpoint inside the epoch saves them as they are.
    totals: checkpoint::PartialEpoch,
    /// Per training example: 0 not visited, 1 right, 2 wrong at its latest visit this epoch.
    verdict: Vec<u8>,
    /// Batches recorded since the last `settle`, in order.
    pending: Vec<Recorded>,
    /// The running count of correct predictions, on the device.
    correct_on_device: Option<Tensor>,
}

/// One batch's training-pass statistics, still on the device.
struct Recorded {
    index: Tensor,
    right: Tensor,
    /// Per-example losses and group ids, when the data has groups.
    by_group: Option<(Tensor, Tensor)>,
}

impl EpochStats {
    fn new(n_train: usize, groups: usize) -> Self {
        let totals = checkpoint::PartialEpoch { groups: vec![(0.0, 0.0, 0.0); groups], ..Default::default() };
        EpochStats { totals, verdict: vec![0; n_train], ..Default::default() }
    }

    /// Records the training-pass predictions of one batch (before its update): `correct` is the
    /// per-row credit (fractional for soft targets), `pred == labels` decides each example's
    /// verdict.
    fn record(
        &mut self,
        per_example: &Tensor,
        pred: &Tensor,
        labels: &Tensor,
        index: &Tensor,
        correct: &Tensor,
        group: Option<&Tensor>,
    ) {
        let batch_correct = correct.sum(Kind::Double);
        self.correct_on_device = Some(match self.correct_on_device.take() {
            Some(c) => c + batch_correct,
            None => batch_correct,
        });
        self.pending.push(Recorded {
            index: index.shallow_clone(),
            right: pred.eq_tensor(labels),
            by_group: group.map(|g| (per_example.detach().to_kind(Kind::Double), g.shallow_clone())),
        });
    }

    /// Brings the recorded batches to the host, in the order they were recorded.
    fn settle(&mut self) -> Result<(), tch::TchError> {
        if let Some(c) = self.correct_on_device.take() {
            self.totals.correct += f64::try_from(c)?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let cat = |f: &dyn Fn(&Recorded) -> Tensor| Tensor::cat(&pending.iter().map(f).collect::<Vec<_>>(), 0);
        let idx = Vec::<i64>::try_from(cat(&|r| r.index.shallow_clone()))?;
        let right = Vec::<bool>::try_from(cat(&|r| r.right.shallow_clone()))?;
        for (i, ok) in idx.iter().zip(&right) {
            self.verdict[*i as usize] = if *ok { 1 } else { 2 };
        }
        if pending.iter().all(|r| r.by_group.is_some()) {
            let pair = |r: &Recorded| r.by_group.as_ref().map(|(l, g)| (l.shallow_clone(), g.shallow_clone()));
            let losses = Vec::<f64>::try_from(cat(&|r| pair(r).expect("checked").0))?;
            let groups = Vec::<i64>::try_from(cat(&|r| pair(r).expect("checked").1))?;
            for ((g, l), ok) in groups.into_iter().zip(losses).zip(right) {
                if let Some(e) = self.totals.groups.get_mut(g as usize) {
                    e.0 += l;
                    e.1 += f64::from(u8::from(ok));
                    e.2 += 1.0;
                }
            }
        }
        Ok(())
    }

    /// A value a plugin logged; the epoch reports the mean of each name's values.
    fn log(&mut self, name: &str, value: f64) {
        let e = self.totals.plugin.entry(name.to_string()).or_default();
        e.0 += value;
        e.1 += 1;
    }

    /// Recall of each class over the examples visited this epoch, judged at their latest visit.
    fn class_recall(&self, labels: &[i64], classes: usize) -> Vec<Option<f64>> {
        let mut hit = vec![(0u64, 0u64); classes];
        for (v, y) in self.verdict.iter().zip(labels) {
            if let (1 | 2, Some(h)) = (v, hit.get_mut(*y as usize)) {
                h.0 += u64::from(*v == 1);
                h.1 += 1;
            }
        }
        hit.iter().map(|(r, n)| (*n > 0).then(|| *r as f64 / *n as f64)).collect()
    }

    /// The examples misclassified at their latest visit.
    fn errors(&self) -> Vec<u64> {
        self.verdict.iter().enumerate().filter(|(_, v)| **v == 2).map(|(i, _)| i as u64).collect()
    }
}

/// The host side of one optimizer step: the callbacks a step rule drives.
struct Driver<'a> {
    net: &'a model::Model,
    opt: &'a mut Optimizer,
    params: &'a mut [(Tensor, String, u32)],
    x: Tensor,
    target: Target,
    /// The batch's class labels (before any batch transform).
    labels: Tensor,
    group: Option<Tensor>,
    index: Tensor,
    objective: Option<&'a mut Instance>,
    rng: &'a mut ChaCha8Rng,
    stats: &'a mut EpochStats,
    passes: u32,
    frozen: bool,
    /// Rows in the batch, and which of them a pass of this step has reported already.
    batch: usize,
    reported: Vec<bool>,
    /// Every model variable (parameters and buffers), for objectives that read or swap them.
    vars: &'a [(String, Tensor)],
    /// The training options that shape each pass and update.
    options: &'a TrainOptions,
    /// A parameter gradient added to every pass's (by parameter; a batch transform's clean-loss
    /// term, see `input_grad`).
    clean_grad: Option<CleanGrad>,
    /// `precision: fp16`: the loss scale, and whether a pass of this step found a non-finite
    /// gradient (the optimizer step is then skipped).
    scaler: Option<&'a crate::amp::Scaler>,
    found_inf: bool,
    /// Feature mixing (SelMix): each row's partner inputs and μ; the logits are then
    /// head(μ·f(x) + (1−μ)·f(partner)).
    partner: Option<(Tensor, Tensor)>,
}

/// A kept parameter gradient, by parameter (`None` where a parameter got none).
type CleanGrad = Vec<Option<Tensor>>;

/// What `input_grad` gives back: ∂L/∂x, the kept parameter gradient, and whether fp16 loss
/// scaling found a non-finite gradient (the step is then skipped).
type InputGrad = (Tensor, Option<CleanGrad>, bool);

/// The gradient of `weight` · mean cross-entropy of the model on a batch with respect to its
/// inputs, for a batch transform that asks (saliency-guided mixing). `train` runs the model in
/// training mode; with `keep` the parameter gradient is returned too, for the step's passes to
/// add (it is otherwise discarded). Under fp16 the loss is scaled and the gradients unscaled as
/// in a training pass. Leaves the parameters' `.grad` zeroed.
#[allow(clippy::too_many_arguments)]
fn input_grad(
    net: &model::Model,
    opt: &mut Optimizer,
    params: &[(Tensor, String, u32)],
    scaler: Option<&crate::amp::Scaler>,
    x: &Tensor,
    y: &Tensor,
    weight: f64,
    train: bool,
    keep: bool,
) -> Result<InputGrad, String> {
    net.set_frozen(false);
    opt.zero_grad();
    let x = x.detach().set_requires_grad(true);
    let region = crate::amp::job_region(x.device())?;
    let logits = crate::amp::full(net.forward_t(&x, train));
    let loss =
        logits.f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0).map_err(tch_err)? * weight;
    drop(region);
    backward_scaled(&loss, scaler)?;
    let g = x.grad().detach();
    let found_inf = match scaler {
        Some(s) => {
            let mut grads = defined_grads(params);
            grads.push(g.shallow_clone());
            s.unscale(&grads)
        }
        None => false,
    };
    let kept = keep.then(|| {
        params.iter().map(|(p, _, _)| Some(p.grad()).filter(Tensor::defined).map(|g| g.detach().copy())).collect()
    });
    opt.zero_grad();
    Ok((g, kept, found_inf))
}

/// The model as the step's batch transform may query it (`TransformModel`), and what the
/// transform asked of the step.
struct BatchModel<'b> {
    net: &'b model::Model,
    opt: &'b mut Optimizer,
    params: &'b [(Tensor, String, u32)],
    scaler: Option<&'b crate::amp::Scaler>,
    x: &'b Tensor,
    y: &'b Tensor,
    x_train: &'b Tensor,
    val: &'b Split,
    device: Device,
    clean_grad: Option<CleanGrad>,
    found_inf: bool,
    grad_passes: u32,
    /// Feature mixing of the returned batch: partners, μ and the rows' training indices.
    mix: Option<(Tensor, Tensor, Tensor)>,
}

const NO_HEAD: &str = "needs the model split into features and a classifier head, which a TorchScript module is not";

impl xlab_plugin_api::host::TransformModel for BatchModel<'_> {
    fn input_grad(&mut self, weight: f64, train: bool, keep: bool) -> Result<Tensor, String> {
        let (g, kept, overflow) =
            input_grad(self.net, self.opt, self.params, self.scaler, self.x, self.y, weight, train, keep)?;
        self.clean_grad = kept;
        self.found_inf |= overflow;
        self.grad_passes += 1;
        Ok(g)
    }

    fn validation(&mut self) -> Result<(Tensor, Tensor, Tensor), String> {
        if self.val.is_empty() {
            return Err("needs a validation split: give the data `n_val` examples".into());
        }
        let x = self.val.x.to_device(self.device);
        let _region = crate::amp::job_region(self.device)?;
        let (features, logits) = tch::no_grad(|| {
            let f = self.net.features_t(&x, false).ok_or(NO_HEAD)?;
            let l = self.net.head(&f).ok_or(NO_HEAD)?;
            Ok::<_, String>((crate::amp::full(f), crate::amp::full(l)))
        })?;
        Ok((features, logits.argmax(-1, false), self.val.y.to_device(self.device)))
    }

    fn head(&mut self, features: &Tensor) -> Result<Tensor, String> {
        let f = features.to_device(self.device).to_kind(Kind::Float);
        tch::no_grad(|| self.net.head(&f)).ok_or_else(|| NO_HEAD.to_string())
    }

    fn rows(&mut self, index: &Tensor) -> Result<Tensor, String> {
        let n = self.x_train.size()[0];
        let idx = index.to_device(self.device).to_kind(Kind::Int64);
        if idx.numel() > 0
            && !(bool::try_from(idx.ge(0).all()).unwrap_or(false) && i64::try_from(idx.max()).unwrap_or(n) < n)
        {
            return Err(format!("training example indices must be in 0..{n}"));
        }
        Ok(self.x_train.index_select(0, &idx))
    }

    fn feature_mix(&mut self, partner: &Tensor, mu: &Tensor, index: &Tensor) -> Result<(), String> {
        if self.net.is_script() {
            return Err(NO_HEAD.into());
        }
        let d = self.device;
        self.mix = Some((partner.to_device(d), mu.to_device(d).to_kind(Kind::Float), index.to_device(d)));
        Ok(())
    }
}

/// Backward of `loss`, multiplied by the fp16 loss scale when there is one.
fn backward_scaled(loss: &Tensor, scaler: Option<&crate::amp::Scaler>) -> Result<(), String> {
    match scaler {
        Some(s) => (loss * f64::from(s.scale)).f_backward(),
        None => loss.f_backward(),
    }
    .map_err(tch_err)
}

/// The parameters' gradients that exist.
fn defined_grads(params: &[(Tensor, String, u32)]) -> Vec<Tensor> {
    params.iter().map(|(p, _, _)| p.grad()).filter(Tensor::defined).collect()
}

/// `label_smoothing` and `clip_grad_norm` of the job's config.
struct TrainOptions {
    label_smoothing: f64,
    clip_grad_norm: Option<f64>,
    classes: i64,
}

/// What an objective sees of the host during one pass.
struct ObjectiveHost<'a> {
    stats: &'a mut EpochStats,
    first: bool,
    net: &'a model::Model,
    vars: &'a [(String, Tensor)],
    x: &'a Tensor,
}

impl xlab_plugin_api::host::ObjectiveDriver for ObjectiveHost<'_> {
    fn log(&mut self, name: &str, value: f64) {
        if self.first {
            self.stats.log(name, value);
        }
    }

    fn model_state(&mut self) -> Vec<(String, Tensor)> {
        self.vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn forward_with(&mut self, vars: &[Tensor]) -> Result<Tensor, String> {
        if self.net.is_script() {
            return Err("this objective runs the model with other weights, which a TorchScript model cannot do".into());
        }
        if vars.len() != self.vars.len() {
            return Err(format!("{} tensors for a model with {} variables", vars.len(), self.vars.len()));
        }
        let mut map = std::collections::HashMap::new();
        for ((name, own), v) in self.vars.iter().zip(vars) {
            if own.size() != v.size() {
                return Err(format!("`{name}` has shape {:?}, given {:?}", own.size(), v.size()));
            }
            map.insert(name.clone(), v.to_kind(own.kind()).to_device(own.device()));
        }
        // The model's own variables are not modified: the autograd graph of the current pass
        // still needs them as they are.
        Ok(tch::no_grad(|| self.net.forward_with(self.x, &map)))
    }
}

fn tch_err(e: tch::TchError) -> String {
    e.to_string()
}

impl Driver<'_> {
    /// Zero grads, forward, loss, backward on rows `lo..hi` of the batch. Rows seen for the
    /// first time in this step are the ones whose loss and predictions are reported, and an
    /// objective updates its state only on such a pass.
    fn pass(&mut self, lo: usize, hi: usize) -> Result<f64, String> {
        self.net.set_frozen(self.frozen);
        self.opt.zero_grad();
        let whole = lo == 0 && hi == self.batch;
        let rows = |t: &Tensor| if whole { t.shallow_clone() } else { t.narrow(0, lo as i64, (hi - lo) as i64) };
        let (x, labels, index) = (rows(&self.x), rows(&self.labels), rows(&self.index));
        let group = self.group.as_ref().map(rows);
        // `precision: bf16 | fp16`: the forward pass and the loss under autocast, the backward after it.
        let region = crate::amp::job_region(x.device())?;
        let logits = match &self.partner {
            Some((p, mu)) => {
                // Both feature passes with BatchNorm frozen: normalized by the running
                // statistics, which stay as they are (the reference fine-tunes with BatchNorm's
                // updates turned off).
                let f1 = self.net.features_t(&x, false).ok_or(NO_HEAD)?;
                let f2 = self.net.features_t(&rows(p), false).ok_or(NO_HEAD)?;
                let mu = rows(mu).to_kind(f1.kind()).unsqueeze(1);
                let mixed = &f1 * &mu + f2 * (mu.ones_like() - &mu);
                crate::amp::full(self.net.head(&mixed).ok_or(NO_HEAD)?)
            }
            None => crate::amp::full(self.net.forward_t(&x, true)),
        };
        let pred = logits.argmax(-1, false);
        let (per_example, correct) = match &self.target {
            Target::Hard(y) => {
                let y = rows(y);
                let eps = self.options.label_smoothing;
                (
                    logits
                        .f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::None, -100, eps)
                        .map_err(tch_err)?,
                    pred.eq_tensor(&y).to_kind(Kind::Float),
                )
            }
            Target::Soft(t) => {
                let t = rows(t);
                let eps = self.options.label_smoothing;
                let smoothed =
                    if eps > 0.0 { &t * (1.0 - eps) + eps / self.options.classes as f64 } else { t.shallow_clone() };
                (
                    -(&smoothed * logits.log_softmax(-1, Kind::Float)).sum_dim_intlist(1, false, Kind::Float),
                    t.gather(1, &pred.unsqueeze(1), false).squeeze_dim(1),
                )
            }
        };
        let first = self.reported[lo..hi].iter().all(|r| !r);
        let stats = &mut *self.stats;
        let loss = match self.objective.as_deref_mut() {
            Some(obj) => {
                let mut host = ObjectiveHost { stats: &mut *stats, first, net: self.net, vars: self.vars, x: &x };
                obj.objective_full(&per_example, &correct, group.as_ref(), &index, Some(&logits), first, &mut host)?
            }
            None => per_example.mean(Kind::Float),
        };
        drop(region);
        backward_scaled(&loss, self.scaler)?;
        let overflow = self.scaler.is_some_and(|s| s.unscale(&defined_grads(self.params)));
        self.found_inf |= overflow;
        if let (Some(extra), false) = (&self.clean_grad, overflow) {
            tch::no_grad(|| {
                for ((p, _, _), e) in self.params.iter().zip(extra) {
                    if let Some(e) = e {
                        let mut g = p.grad();
                        if g.defined() {
                            let _ = g.g_add_(e);
                        }
                    }
                }
            });
        }
        let value = f64::try_from(&loss).map_err(tch_err)?;
        if !value.is_finite() {
            return Err(format!("{DIVERGED}training loss is {value}"));
        }
        if first {
            stats.record(&per_example, &pred, &labels, &index, &correct, group.as_ref());
            let b = hi - lo;
            stats.totals.loss_sum += value * b as f64;
            stats.totals.seen += b;
            self.reported[lo..hi].iter_mut().for_each(|r| *r = true);
        }
        self.passes += 1;
        Ok(value)
    }
}

impl StepDriver for Driver<'_> {
    fn forward_backward(&mut self) -> Result<f64, String> {
        self.pass(0, self.batch)
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn forward_backward_rows(&mut self, lo: usize, hi: usize) -> Result<f64, String> {
        self.pass(lo, hi)
    }

    fn n_params(&self) -> usize {
        self.params.len()
    }

    fn param(&mut self, i: usize) -> (&mut Tensor, &str, u32) {
        let (t, n, tags) = &mut self.params[i];
        (t, n.as_str(), *tags)
    }

    fn optimizer_step(&mut self) -> Result<(), String> {
        // fp16: a step whose gradients overflowed is skipped, as `GradScaler.step` does.
        if self.found_inf {
            return Ok(());
        }
        if let Some(max) = self.options.clip_grad_norm {
            clip_grad_norm(self.params, max);
        }
        self.opt.step();
        Ok(())
    }

    fn freeze_norm_stats(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn log(&mut self, name: &str, value: f64) {
        self.stats.log(name, value);
    }
}

/// Scales the gradients so their global L2 norm is at most `max`, on the device (no host read),
/// as `torch.nn.utils.clip_grad_norm_`: coefficient min(1, max/(‖g‖ + 1e-6)).
pub(crate) fn clip_grad_norm(params: &[(Tensor, String, u32)], max: f64) {
    let grads: Vec<Tensor> = params.iter().map(|(p, _, _)| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return;
    }
    tch::no_grad(|| {
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm().to_kind(Kind::Float)).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max / (total + 1e-6)).clamp_max(1.0);
        for mut g in grads {
            let _ = g.g_mul_(&coef.to_kind(g.kind()));
        }
    });
}

/// Marks a driver error as divergence, so the job's failure is classified as such.
const DIVERGED: &str = "diverged: ";

/// Where and how often a job checkpoints.
pub struct CheckpointPlan<'a> {
    pub job_id: &'a str,
    /// After every this many epochs.
    pub every: u32,
    /// And at the end of an epoch this many milliseconds or more after the last checkpoint.
    pub every_ms: Option<u64>,
    /// And inside epochs, after every this many optimizer steps (of the whole run).
    pub every_steps: Option<u32>,
}

impl CheckpointPlan<'_> {
    /// The newest valid checkpoint in `run_dir`, warning about each one skipped as invalid.
    pub(crate) fn latest(&self, run_dir: &Path) -> Option<checkpoint::Checkpoint> {
        let mut skipped = Vec::new();
        let latest = checkpoint::latest(run_dir, self.job_id, &mut skipped);
        for s in &skipped {
            tracing::warn!("skipping checkpoint {s}");
        }
        latest
    }

    /// At the end of epoch `done` (1-based) of `epochs`: writes a checkpoint with `save` after
    /// the last epoch, when asked to stop (Ctrl-C, SIGTERM), when `every_ms` has passed since
    /// `last_saved`, and every `every` epochs; asked to stop, the job then ends as cancelled.
    pub(crate) fn end_of_epoch(
        &self,
        done: u64,
        epochs: u32,
        last_saved: &mut std::time::Instant,
        out: &mut Emitter,
        save: impl FnOnce() -> Result<String, Failure>,
    ) -> Result<(), Failure> {
        let last = done == u64::from(epochs);
        let stopping = !last && crate::stop_requested();
        let time_is_up = self.every_ms.is_some_and(|ms| last_saved.elapsed().as_millis() >= u128::from(ms));
        if last || stopping || time_is_up || done.is_multiple_of(u64::from(self.every.max(1))) {
            *last_saved = std::time::Instant::now();
            let path = save()?;
            out.send(&xlab_proto::Event::Checkpoint { epoch: done, path, step_in_epoch: 0 });
        }
        if stopping {
            return Err(Failure::new(
                FailureCause::Cancelled,
                format!("stopped after epoch {done} of {epochs}, at a checkpoint"),
            ));
        }
        Ok(())
    }
}

/// Tells the coordinator that the job resumed, and re-sends what was measured before, so a
/// store that lost its last writes is made whole.
pub(crate) fn announce_resume(out: &mut Emitter, c: &checkpoint::Checkpoint) {
    tracing::info!(epoch = c.meta.epoch, step_in_epoch = c.meta.step_in_epoch, "resuming from checkpoint");
    out.send(&xlab_proto::Event::Resumed { epoch: c.meta.epoch, step_in_epoch: c.meta.step_in_epoch });
    for (step, values) in &c.meta.metrics {
        out.metrics(*step, values.clone());
    }
}

/// What a training job's components are told at setup: the data's classes, sizes, labels,
/// groups and domains, and the run's length.
pub fn run_info(
    cfg: &JobConfig,
    data: &data::Dataset,
    seed: u64,
    parents: &[xlab_proto::ParentRef],
) -> Result<RunInfo, Failure> {
    let n = data.train.len();
    let ids = |t: &Option<Tensor>| -> Result<Vec<i64>, Failure> {
        match t {
            Some(t) => Vec::<i64>::try_from(t).map_err(Failure::from),
            None => Ok(vec![]),
        }
    };
    Ok(RunInfo {
        num_classes: data.classes as i64,
        n_train: n as u64,
        group_counts: data.group_counts(),
        train_labels: Vec::<i64>::try_from(&data.train.y)?,
        train_groups: ids(&data.train.group)?,
        train_domains: ids(&data.train.domain)?,
        epochs: u64::from(cfg.epochs),
        steps_per_epoch: n.div_ceil(cfg.batch_size as usize) as u64,
        seed,
        parents: parents.to_vec(),
        image: data.image,
    })
}

/// Trains the job's model, resuming from the newest valid checkpoint in its run folder; returns
/// the final metrics.
#[allow(clippy::too_many_arguments)]
pub fn run(
    cfg: &JobConfig,
    seed: u64,
    device: Device,
    run_dir: &Path,
    ckpt: &CheckpointPlan<'_>,
    parents: &[xlab_proto::ParentRef],
    comps: &mut Components,
    out: &mut Emitter,
) -> Result<BTreeMap<String, f64>, Failure> {
    let (Some(model_cfg), Some(opt_cfg)) = (&cfg.model, &cfg.optimizer) else {
        return Err(Failure::new(FailureCause::Config, "`task: train` needs `model` and `optimizer`"));
    };
    if model_cfg.is_diffusion() {
        return Err(Failure::new(FailureCause::Config, "a diffusion model trains with `diffusion:`"));
    }
    let data = data::build(&cfg.data).map_err(|m| Failure::new(FailureCause::Error, m))?;
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let net = model::build_checked(&vs.root(), model_cfg, data.input_dim, data.image, data.classes)
        .map_err(|m| Failure::new(FailureCause::Config, m))?;
    // Every variable (parameters and normalization buffers) is checkpointed; the trainable
    // ones go to the optimizer and the step rule.
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let trainable: Vec<(String, Tensor)> =
        named.iter().filter(|(_, t)| t.requires_grad()).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let mut opt = Optimizer::new(opt_cfg, trainable.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    let norms = net.norm_prefixes();
    let mut params: Vec<(Tensor, String, u32)> =
        trainable.iter().map(|(n, t)| (t.shallow_clone(), n.clone(), model::tags_of(n, &norms))).collect();
    tracing::info!(params = model::parameter_count(&vs), train = data.train.len(), "model built");
    if let Some(init) = &cfg.init {
        load_init(&named, &init.path)?;
    }
    let mut ema = cfg.ema.as_ref().map(|e| crate::ema::Average::new(e, &named));

    let x_train = data.train.x.to_device(device);
    let y_train = data.train.y.to_device(device);
    let g_train = data.train.group.as_ref().map(|g| g.to_device(device));
    let d_train = data.train.domain.as_ref().map(|d| d.to_device(device));
    let n = data.train.len();
    let bs = cfg.batch_size as usize;
    let base_lr = opt_cfg.lr();
    let total_steps = n.div_ceil(bs) as u64 * u64::from(cfg.epochs);
    let options = TrainOptions {
        label_smoothing: cfg.label_smoothing,
        clip_grad_norm: cfg.clip_grad_norm,
        classes: data.classes as i64,
    };
    let info = run_info(cfg, &data, seed, parents)?;
    record_standardization(run_dir, &data, out)?;
    for c in comps.all() {
        c.setup(&info).map_err(|m| Failure::new(FailureCause::Error, m))?;
    }
    // Plugins draw from their own stream, derived from the job's seed.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX);
    let mut history: Vec<(u64, BTreeMap<String, f64>)> = Vec::new();
    let mut total_passes = 0u64;
    let mut global_step = 0u64;
    let mut first_epoch = 0u64;

    // `precision: fp16`: the dynamic loss scale, checkpointed with the run.
    let mut scaler = (cfg.precision == xlab_spec::config::Precision::Fp16)
        .then(|| crate::amp::Scaler::new(cfg.loss_scale.clone().unwrap_or_default()));
    // A checkpoint inside an epoch: batches done, the epoch's order, its statistics so far.
    let mut resume_inside: Option<(u64, Vec<i64>, EpochStats)> = None;
    if let Some(c) = ckpt.latest(run_dir) {
        restore(&c, &named, &mut opt, comps, &mut rng, ema.as_mut())?;
        if let (Some(sc), Some((scale, tracker))) = (scaler.as_mut(), c.meta.loss_scale) {
            sc.scale = scale;
            sc.growth_tracker = tracker;
        }
        if c.meta.step_in_epoch > 0 {
            resume_inside = Some(inside_epoch(&c, n, data.groups)?);
        }
        announce_resume(out, &c);
        first_epoch = c.meta.epoch;
        global_step = c.meta.global_step;
        history = c.meta.metrics;
        total_passes = history.last().and_then(|(_, v)| v.get("cost.passes")).map(|p| *p as u64).unwrap_or(0);
    }

    let mut summary = history.last().map(|(_, v)| v.clone()).unwrap_or_default();
    let mut last_checkpoint = std::time::Instant::now();
    for epoch in first_epoch..u64::from(cfg.epochs) {
        // Resuming inside this epoch: its hooks ran and its order was drawn before the checkpoint.
        let (done_before, order, mut stats) = match resume_inside.take() {
            Some(inside) => inside,
            None => {
                for c in comps.all() {
                    c.on_epoch(epoch).map_err(|m| Failure::new(FailureCause::Error, m))?;
                }
                let sampling = match comps.objective.as_mut() {
                    Some(o) => o.sampling(epoch, n).map_err(|m| Failure::new(FailureCause::Error, m))?,
                    None => Sampling::Uniform,
                };
                let order = match &sampling {
                    Sampling::Uniform if !cfg.shuffle => (0..n as i64).collect(),
                    Sampling::Uniform => data::epoch_order(n, seed, epoch),
                    Sampling::Weighted(w) => data::weighted_epoch_order(w, seed, epoch),
                    Sampling::Repeat(c) => data::repeat_epoch_order(c, seed, epoch),
                };
                (0, order, EpochStats::new(n, data.groups))
            }
        };
        let batches = order.len().div_ceil(bs) as u64;
        let started = std::time::Instant::now();
        // One upload of the epoch's order (and augmentation draws); each batch is a slice of it
        // on the device.
        let order_on_device = Tensor::from_slice(&order).to_device(device);
        let draws = match (&cfg.augment, data.image) {
            (Some(a), Some(image)) => {
                let (oy, ox, flip) = data::augment_draws(order.len(), seed, epoch, a.crop, a.flip);
                let up = |v: &[i64]| Tensor::from_slice(v).to_device(device);
                Some((up(&oy), up(&ox), Tensor::from_slice(&flip).to_device(device), i64::from(a.crop), image))
            }
            _ => None,
        };
        for (k, chunk) in order.chunks(bs).enumerate().skip(done_before as usize) {
            crate::watch::step_begins(epoch, global_step);
            let (at, len) = ((k * bs) as i64, chunk.len() as i64);
            let idx = order_on_device.narrow(0, at, len);
            let xb = x_train.index_select(0, &idx);
            let xb = match &draws {
                Some((oy, ox, flip, pad, image)) => data::augment_batch(
                    &xb,
                    *image,
                    *pad,
                    &oy.narrow(0, at, len),
                    &ox.narrow(0, at, len),
                    &flip.narrow(0, at, len),
                ),
                None => xb,
            };
            let yb = y_train.index_select(0, &idx);
            let gb = g_train.as_ref().map(|g| g.index_select(0, &idx));
            let db = d_train.as_ref().map(|d| d.index_select(0, &idx));
            let mut yb_labels = yb.shallow_clone();
            let (mut idx, mut gb) = (idx, gb);
            let mut rows = chunk.len();
            // What the batch transform asked of the step: a clean-loss gradient to keep
            // (Co-Mixup's clean_lam), the passes it ran (counted in `cost.passes`), feature mixing.
            let mut clean_grad = None;
            let mut found_inf = false;
            let mut grad_passes = 0u32;
            let mut partner = None;
            let (x, target) = match comps.batch_transform.as_mut() {
                Some(t) => {
                    let mut bm = BatchModel {
                        net: &net,
                        opt: &mut opt,
                        params: &params,
                        scaler: scaler.as_ref(),
                        x: &xb,
                        y: &yb,
                        x_train: &x_train,
                        val: &data.val,
                        device,
                        clean_grad: None,
                        found_inf: false,
                        grad_passes: 0,
                        mix: None,
                    };
                    let model: Option<&mut dyn xlab_plugin_api::host::TransformModel> =
                        if t.queries_model { Some(&mut bm) } else { None };
                    let (x, soft) = t
                        .transform_with(
                            &xb,
                            &yb,
                            gb.as_ref(),
                            db.as_ref(),
                            &idx,
                            data.classes as i64,
                            &mut || rng.next_u64(),
                            model,
                        )
                        .map_err(|m| Failure::new(FailureCause::Error, m))?;
                    clean_grad = bm.clean_grad;
                    found_inf = bm.found_inf;
                    grad_passes = bm.grad_passes;
                    let out_rows = x.size()[0] as usize;
                    if let Some((p, mu, index)) = bm.mix {
                        // The transform drew its own examples: the rows' labels, groups and
                        // indices follow them.
                        if p.size()[0] as usize != out_rows || mu.numel() != out_rows || index.numel() != out_rows {
                            return Err(Failure::new(
                                FailureCause::Error,
                                format!("feature mixing needs one partner, μ and index per row ({out_rows} rows)"),
                            ));
                        }
                        yb_labels = y_train.index_select(0, &index);
                        gb = g_train.as_ref().map(|g| g.index_select(0, &index));
                        idx = index;
                        rows = out_rows;
                        partner = Some((p, mu));
                    } else if out_rows != rows {
                        // A transform may return k blocks of the batch (RegMixup's [x; x̃]): each
                        // row stands for example r mod B.
                        if !out_rows.is_multiple_of(rows) || soft.size()[0] as usize != out_rows {
                            return Err(Failure::new(
                                FailureCause::Error,
                                format!("the batch transform returned {out_rows} rows for a batch of {rows}"),
                            ));
                        }
                        let k = (out_rows / rows) as i64;
                        yb_labels = yb_labels.repeat([k]);
                        idx = idx.repeat([k]);
                        gb = gb.map(|g| g.repeat([k]));
                        rows = out_rows;
                    }
                    (x, Target::Soft(soft.to_kind(Kind::Float)))
                }
                None => (xb, Target::Hard(yb)),
            };
            opt.lr_factor = cfg.schedule.factor(base_lr, global_step, epoch, total_steps);
            let steps_before = opt.steps;
            let mut driver = Driver {
                net: &net,
                opt: &mut opt,
                params: &mut params,
                x,
                target,
                labels: yb_labels,
                group: gb,
                index: idx,
                objective: comps.objective.as_mut(),
                rng: &mut rng,
                stats: &mut stats,
                passes: 0,
                frozen: false,
                batch: rows,
                reported: vec![false; rows],
                vars: &named,
                options: &options,
                clean_grad,
                scaler: scaler.as_ref(),
                found_inf,
                partner,
            };
            let stepped = match comps.step_rule.as_mut() {
                Some(rule) => rule.step(&mut driver, epoch, global_step),
                None => driver.forward_backward().and_then(|_| driver.optimizer_step()),
            };
            let passes = driver.passes;
            let found_inf = driver.found_inf;
            if let Some(a) = ema.as_mut() {
                if opt.steps != steps_before {
                    a.after_step(&named, opt.steps);
                }
            }
            if let Some(sc) = scaler.as_mut() {
                sc.update(found_inf);
                stats.log("amp.skipped", f64::from(u8::from(found_inf)));
            }
            if let Err(m) = stepped {
                let cause = if m.contains(DIVERGED) { FailureCause::Diverged } else { FailureCause::Error };
                return Err(Failure::new(
                    cause,
                    format!("epoch {}, step {}: {}", epoch + 1, global_step, m.replace(DIVERGED, "")),
                ));
            }
            crate::watch::step_ends();
            stats.totals.passes += u64::from(passes + grad_passes);
            stats.totals.steps += 1;
            global_step += 1;
            // A checkpoint inside the epoch, at every `every_steps` steps of the run (the
            // statistics are brought to the host there in every run, interrupted or not, so
            // their sums are the same).
            let done = k as u64 + 1;
            if done < batches && ckpt.every_steps.is_some_and(|e| global_step.is_multiple_of(u64::from(e))) {
                stats.settle().map_err(Failure::from)?;
                let stopping = crate::stop_requested();
                let mut meta = checkpoint_meta(ckpt, epoch, global_step, &opt, &rng, &history);
                meta.loss_scale = scaler.as_ref().map(|s| (s.scale, s.growth_tracker));
                meta.step_in_epoch = done;
                meta.partial = Some(stats.totals.clone());
                let extra = vec![
                    ("state.order".to_string(), Tensor::from_slice(&order)),
                    ("state.verdict".to_string(), Tensor::from_slice(&stats.verdict)),
                ];
                let path = save_checkpoint(run_dir, meta, &named, &opt, comps, extra, ema.as_ref())?;
                out.send(&xlab_proto::Event::Checkpoint { epoch, path, step_in_epoch: done });
                last_checkpoint = std::time::Instant::now();
                if stopping {
                    return Err(Failure::new(
                        FailureCause::Cancelled,
                        format!(
                            "stopped in epoch {} of {} after {done} of {batches} batches, at a checkpoint",
                            epoch + 1,
                            cfg.epochs
                        ),
                    ));
                }
            }
        }
        stats.settle().map_err(Failure::from)?;
        let t = &stats.totals;
        total_passes += t.passes;
        // The epoch's statistics are host values now, so the device has finished its work.
        let train_s = started.elapsed().as_secs_f64();
        let mut values = BTreeMap::new();
        values.insert("time.train_s".to_string(), train_s);
        values.insert("time.steps_per_s".to_string(), t.steps as f64 / train_s);
        values.insert("time.examples_per_s".to_string(), t.seen as f64 / train_s);
        values.insert("train.loss".to_string(), t.loss_sum / t.seen as f64);
        values.insert("train.acc".to_string(), t.correct / t.seen as f64);
        values.insert("cost.passes_per_step".to_string(), t.passes as f64 / t.steps as f64);
        values.insert("cost.passes".to_string(), total_passes as f64);
        if let Some(sc) = &scaler {
            values.insert("amp.loss_scale".to_string(), f64::from(sc.scale));
        }
        for (k, (sum, count)) in &t.plugin {
            values.insert(k.clone(), sum / f64::from(*count));
        }
        for (k, (loss, right, seen)) in t.groups.iter().enumerate() {
            if *seen > 0.0 {
                values.insert(format!("train.group_loss.{k}"), loss / seen);
                values.insert(format!("train.group_acc.{k}"), right / seen);
            }
        }
        let recall = stats.class_recall(&info.train_labels, data.classes);
        for (c, r) in recall.iter().enumerate() {
            if let Some(r) = r {
                values.insert(format!("train.class_recall.{c}"), *r);
            }
        }
        if let Some(w) = recall.iter().flatten().copied().reduce(f64::min) {
            values.insert("train.worst_class_recall".to_string(), w);
        }
        values.insert("train.examples".to_string(), t.seen as f64);
        values.insert("train.lr".to_string(), base_lr * opt.lr_factor);
        write_train_errors(run_dir, epoch + 1, n, stats.errors())?;
        for (name, split) in [("val", &data.val), ("test", &data.test)] {
            if split.is_empty() {
                continue;
            }
            values.extend(evaluate(&net, name, split, data.groups, device)?);
            if let Some(a) = &ema {
                // The average's accuracy and loss, as `val.ema.acc`, `test.ema.loss`, ….
                let averaged = a.swapped(&named, || evaluate(&net, name, split, data.groups, device))?;
                for m in ["acc", "loss", "worst_group_acc"] {
                    if let Some(v) = averaged.get(&format!("{name}.{m}")) {
                        values.insert(format!("{name}.ema.{m}"), *v);
                    }
                }
            }
        }
        values.insert("time.epoch_s".to_string(), started.elapsed().as_secs_f64());
        values.insert("epoch".to_string(), (epoch + 1) as f64);
        tracing::info!(
            epoch = epoch + 1,
            train_loss = values["train.loss"],
            test_acc = values.get("test.acc").copied(),
            "epoch done"
        );
        out.metrics(epoch + 1, values.clone());
        history.push((epoch + 1, values.clone()));
        summary = values;
        ckpt.end_of_epoch(epoch + 1, cfg.epochs, &mut last_checkpoint, out, || {
            let mut meta = checkpoint_meta(ckpt, epoch + 1, global_step, &opt, &rng, &history);
            meta.loss_scale = scaler.as_ref().map(|s| (s.scale, s.growth_tracker));
            save_checkpoint(run_dir, meta, &named, &opt, comps, Vec::new(), ema.as_ref())
        })?;
    }
    save_weights(&vs, ema.as_ref(), run_dir, &model_metadata(cfg, &data), out)?;
    if let Some(split) = single_class(&summary, data.classes) {
        if data.looks_unscaled() {
            out.send(&xlab_proto::Event::Warning {
                message: format!(
                    "it predicts a single class on the {split} split, and its features look unscaled (magnitudes in \
                     the hundreds or more); `standardize: true` under `data:` scales them with the training split's \
                     statistics"
                ),
            });
        }
    }
    Ok(summary)
}

/// The split (test, else validation) on which every example was predicted as one class: one
/// class has recall 1 and every other 0.
fn single_class(summary: &BTreeMap<String, f64>, classes: usize) -> Option<&'static str> {
    ["test", "val"].into_iter().find(|split| {
        let recalls: Vec<f64> =
            (0..classes).filter_map(|c| summary.get(&format!("{split}.class_recall.{c}")).copied()).collect();
        recalls.len() == classes && classes >= 2 && recalls.iter().filter(|r| **r > 0.0).count() == 1
    })
}

/// Writes the training split's statistics a `standardize: true` job scaled its data with.
fn record_standardization(run_dir: &Path, data: &data::Dataset, out: &mut Emitter) -> Result<(), Failure> {
    let Some(st) = &data.standardized else { return Ok(()) };
    let bytes = serde_json::to_vec_pretty(st).expect("statistics serialize");
    checkpoint::write_atomic(&run_dir.join("standardization.json"), &bytes)
        .map_err(|e| Failure::new(FailureCause::Error, format!("cannot write standardization.json: {e}")))?;
    out.artifact("standardization", "standardization.json", "training-split feature mean and std");
    Ok(())
}

/// Copies the tensors of a safetensors file into the model's variables, by name. Every variable
/// must be there with its shape; PyTorch's integer `num_batches_tracked` converts.
pub(crate) fn load_init(vars: &[(String, Tensor)], path: &str) -> Result<(), Failure> {
    let fail = |m: String| Failure::new(FailureCause::Config, format!("`init` {path}: {m}"));
    let given = Tensor::read_safetensors(path).map_err(|e| fail(format!("cannot read it as safetensors: {e}")))?;
    let mut missing = Vec::new();
    for (name, var) in vars {
        match given.iter().find(|(n, _)| n == name) {
            Some((_, t)) if t.size() == var.size() => {
                tch::no_grad(|| var.shallow_clone().copy_(&t.to_kind(var.kind())));
            }
            Some((_, t)) => {
                return Err(fail(format!("`{name}` has shape {:?}, the model's is {:?}", t.size(), var.size())));
            }
            None => missing.push(name.as_str()),
        }
    }
    if !missing.is_empty() {
        let have: Vec<&str> = given.iter().map(|(n, _)| n.as_str()).collect();
        return Err(fail(format!(
            "has no tensor for {} (it has {}); names follow PyTorch's state_dict of the same model",
            missing.join(", "),
            have.join(", ")
        )));
    }
    let unused: Vec<&str> =
        given.iter().map(|(n, _)| n.as_str()).filter(|n| !vars.iter().any(|(v, _)| v == n)).collect();
    if !unused.is_empty() {
        return Err(fail(format!("has tensors the model does not: {}", unused.join(", "))));
    }
    Ok(())
}

/// Writes the epoch's training-pass errors into the run folder, for dependent jobs (JTT).
fn write_train_errors(run_dir: &Path, epoch: u64, n: usize, errors: Vec<u64>) -> Result<(), Failure> {
    let path = xlab_proto::artifacts::train_errors_path(run_dir, epoch);
    let io = |e: std::io::Error| Failure::new(FailureCause::Error, format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let record = xlab_proto::artifacts::TrainErrors { epoch, n_train: n as u64, errors };
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&record).expect("json")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// A checkpoint's description with `epoch` epochs completed (plugin state, file and hash are
/// filled in when it is written).
pub(crate) fn checkpoint_meta(
    ckpt: &CheckpointPlan<'_>,
    epoch: u64,
    global_step: u64,
    opt: &Optimizer,
    rng: &ChaCha8Rng,
    history: &[(u64, BTreeMap<String, f64>)],
) -> checkpoint::Meta {
    checkpoint::Meta {
        format: checkpoint::FORMAT,
        job_id: ckpt.job_id.to_string(),
        epoch,
        global_step,
        optimizer_steps: opt.steps,
        plugin_rng_word_pos: rng.get_word_pos().to_string(),
        plugins: BTreeMap::new(),
        metrics: history.to_vec(),
        step_in_epoch: 0,
        partial: None,
        loss_scale: None,
        ema_updates: None,
        tensors_file: String::new(),
        tensors_bytes: 0,
        tensors_sha256: String::new(),
    }
}

/// The epoch in progress at a checkpoint taken inside it: batches done, order, statistics.
fn inside_epoch(c: &checkpoint::Checkpoint, n: usize, groups: usize) -> Result<(u64, Vec<i64>, EpochStats), Failure> {
    let bad = |m: String| Failure::new(FailureCause::Error, format!("checkpoint in epoch {}: {m}", c.meta.epoch + 1));
    let tensor = |name: &str| {
        c.tensors
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| bad(format!("no `{name}`")))
    };
    let order = Vec::<i64>::try_from(tensor("state.order")?).map_err(|e| bad(e.to_string()))?;
    let verdict = Vec::<u8>::try_from(tensor("state.verdict")?).map_err(|e| bad(e.to_string()))?;
    let p = c.meta.partial.clone().ok_or_else(|| bad("no epoch statistics".into()))?;
    if verdict.len() != n || p.groups.len() != groups {
        return Err(bad(format!("it was taken with {} training examples, the data has {n}", verdict.len())));
    }
    let stats = EpochStats { totals: p, verdict, ..Default::default() };
    Ok((c.meta.step_in_epoch, order, stats))
}

/// Gathers model, optimizer and plugin state (and `extra` tensors) into a checkpoint and
/// writes it.
pub(crate) fn save_checkpoint(
    run_dir: &Path,
    mut meta: checkpoint::Meta,
    named: &[(String, Tensor)],
    opt: &Optimizer,
    comps: &mut Components,
    extra: Vec<(String, Tensor)>,
    ema: Option<&crate::ema::Average>,
) -> Result<String, Failure> {
    let mut tensors: Vec<(String, Tensor)> = named.iter().map(|(n, t)| (format!("model.{n}"), t.detach())).collect();
    tensors.extend(extra);
    if let Some(a) = ema {
        meta.ema_updates = Some(a.updates);
        tensors.extend(a.state_tensors());
    }
    tensors.extend(opt.state_tensors());
    for (slot, inst) in comps.slots() {
        let (json, ts) = inst.save_state().map_err(|m| Failure::new(FailureCause::Error, m))?;
        meta.plugins.insert(slot.to_string(), json);
        tensors.extend(ts.into_iter().map(|(n, t)| (format!("plugin.{slot}.{n}"), t)));
    }
    let path = checkpoint::save(run_dir, meta, &tensors).map_err(|m| Failure::new(FailureCause::Error, m))?;
    Ok(path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default())
}

/// Puts model weights, optimizer state, plugin state, the random stream and the weights'
/// average (when the run keeps one) back.
pub(crate) fn restore(
    c: &checkpoint::Checkpoint,
    named: &[(String, Tensor)],
    opt: &mut Optimizer,
    comps: &mut Components,
    rng: &mut ChaCha8Rng,
    ema: Option<&mut crate::ema::Average>,
) -> Result<(), Failure> {
    let bad = |m: String| Failure::new(FailureCause::Error, format!("checkpoint after epoch {}: {m}", c.meta.epoch));
    if let Some(a) = ema {
        a.restore(&c.tensors, c.meta.ema_updates.unwrap_or(0))
            .map_err(|m| bad(format!("the weights' average: {m}")))?;
    }
    tch::no_grad(|| -> Result<(), Failure> {
        for (name, t) in named {
            let key = format!("model.{name}");
            let saved = c.tensors.iter().find(|(n, _)| *n == key).ok_or_else(|| bad(format!("no `{key}`")))?;
            let mut t = t.shallow_clone();
            t.f_copy_(&saved.1).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    })?;
    opt.load_state(c.meta.optimizer_steps, &c.tensors).map_err(bad)?;
    for (slot, inst) in comps.slots() {
        let json = c.meta.plugins.get(slot).cloned().unwrap_or(serde_json::Value::Null);
        let prefix = format!("plugin.{slot}.");
        let ts: Vec<(String, Tensor)> = c
            .tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(&prefix).map(|k| (k.to_string(), t.shallow_clone())))
            .collect();
        inst.load_state(&json, &ts).map_err(bad)?;
    }
    let pos: u128 = c.meta.plugin_rng_word_pos.parse().map_err(|e| bad(format!("random stream position: {e}")))?;
    rng.set_word_pos(pos);
    Ok(())
}

pub(crate) fn save_atomically_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp.safetensors");
    Tensor::write_safetensors(tensors, &tmp)?;
    finish_atomic(&tmp, path)
}

pub(crate) fn save_atomically(vs: &nn::VarStore, path: &Path) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp.safetensors");
    vs.save(&tmp)?;
    finish_atomic(&tmp, path)
}

/// What any trained model's weights say about themselves (safetensors metadata): the model's
/// config, the class count, the input width and the image shape.
pub(crate) fn model_metadata(cfg: &JobConfig, data: &data::Dataset) -> BTreeMap<String, String> {
    let mut about = BTreeMap::new();
    about.insert("xlab.model".to_string(), serde_json::to_string(&cfg.model).expect("json"));
    about.insert("xlab.classes".to_string(), data.classes.to_string());
    about.insert("xlab.input_dim".to_string(), data.input_dim.to_string());
    if let Some(image) = data.image {
        about.insert("xlab.image".to_string(), serde_json::to_string(&image).expect("json"));
    }
    about
}

/// Writes a training's final weights, and the weights' average when it keeps one, each with
/// `about` as its metadata, and reports them as artifacts.
pub(crate) fn save_weights(
    vs: &nn::VarStore,
    ema: Option<&crate::ema::Average>,
    run_dir: &Path,
    about: &BTreeMap<String, String>,
    out: &mut Emitter,
) -> Result<(), Failure> {
    let weights = run_dir.join("weights.safetensors");
    save_atomically(vs, &weights)?;
    add_metadata(&weights, about)?;
    out.artifact("weights", "weights.safetensors", "weights");
    if let Some(a) = ema {
        let averaged = run_dir.join(crate::ema::EMA_WEIGHTS);
        a.save(&averaged)?;
        add_metadata(&averaged, about)?;
        out.artifact("weights_ema", crate::ema::EMA_WEIGHTS, "weights");
    }
    Ok(())
}

/// Adds string entries to a safetensors file's `__metadata__` (what safetensors' `metadata()`
/// and `safe_open(...).metadata()` return), rewriting the header in place atomically; the
/// tensors and their offsets are unchanged.
pub(crate) fn add_metadata(path: &Path, entries: &BTreeMap<String, String>) -> Result<(), Failure> {
    let bad = |m: String| Failure::new(FailureCause::Error, format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let Some(len) = len.filter(|&l| 8 + l <= bytes.len()) else {
        return Err(bad("not a safetensors file".into()));
    };
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).map_err(|e| bad(format!("header: {e}")))?;
    let meta = header.entry("__metadata__").or_insert_with(|| serde_json::json!({}));
    for (k, v) in entries {
        meta[k] = serde_json::Value::String(v.clone());
    }
    let mut text = serde_json::to_vec(&header).expect("json");
    // The data that follows starts 8-byte aligned, as safetensors writes it.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let tmp = path.with_extension("meta.tmp");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + len..]);
    std::fs::write(&tmp, out).map_err(|e| bad(e.to_string()))?;
    finish_atomic(&tmp, path)
}

/// Syncs a temporary file, renames it into place and syncs the folder.
pub(crate) fn finish_atomic(tmp: &Path, path: &Path) -> Result<(), Failure> {
    let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(tmp).map_err(|e| Failure::new(FailureCause::Error, format!("cannot sync {}: {e}", tmp.display())))?;
    std::fs::rename(tmp, path)
        .map_err(|e| Failure::new(FailureCause::Error, format!("cannot rename {}: {e}", tmp.display())))?;
    if let Some(dir) = path.parent() {
        sync(dir).map_err(|e| Failure::new(FailureCause::Error, format!("cannot sync {}: {e}", dir.display())))?;
    }
    Ok(())
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
}
