//! The host side of each plugin component kind during training: the callbacks a step rule
//! drives (`Driver`: forward, backward, gradients, parameter perturbations, the optimizer
//! step), the model a batch transform sees, the objective's loss driver, and gradient clipping.
//! [`Components`] holds a job's plugin instances by slot.

use crate::data::Split;
use crate::epoch::EpochStats;
use crate::model;
use crate::optim::Optimizer;
use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};
use xlab_plugin_host::{Instance, StepDriver};

/// What the loss compares the logits with.
pub(crate) enum Target {
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
    pub reconstruct: Option<Instance>,
    pub attention: Option<Instance>,
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
            ("reconstruct", &mut self.reconstruct),
            ("attention", &mut self.attention),
        ]
        .into_iter()
        .filter_map(|(k, i)| i.as_mut().map(|i| (k, i)))
    }
}

/// The host side of one optimizer step: the callbacks a step rule drives.
pub(crate) struct Driver<'a> {
    pub(crate) net: &'a model::Model,
    pub(crate) opt: &'a mut Optimizer,
    pub(crate) params: &'a mut [(Tensor, String, u32)],
    pub(crate) x: Tensor,
    pub(crate) target: Target,
    /// The batch's class labels (before any batch transform).
    pub(crate) labels: Tensor,
    pub(crate) group: Option<Tensor>,
    pub(crate) index: Tensor,
    pub(crate) objective: Option<&'a mut Instance>,
    pub(crate) rng: &'a mut ChaCha8Rng,
    pub(crate) stats: &'a mut EpochStats,
    pub(crate) passes: u32,
    pub(crate) frozen: bool,
    /// Rows in the batch, and which of them a pass of this step has reported already.
    pub(crate) batch: usize,
    pub(crate) reported: Vec<bool>,
    /// Every model variable (parameters and buffers), for objectives that read or swap them.
    pub(crate) vars: &'a [(String, Tensor)],
    /// The training options that shape each pass and update.
    pub(crate) options: &'a TrainOptions,
    /// A parameter gradient added to every pass's (by parameter; a batch transform's clean-loss
    /// term, see `input_grad`).
    pub(crate) clean_grad: Option<CleanGrad>,
    /// `precision: fp16`: the loss scale, and whether a pass of this step found a non-finite
    /// gradient (the optimizer step is then skipped).
    pub(crate) scaler: Option<&'a crate::amp::Scaler>,
    pub(crate) found_inf: bool,
    /// Feature mixing (SelMix): each row's partner inputs and μ; the logits are then
    /// head(μ·f(x) + (1−μ)·f(partner)).
    pub(crate) partner: Option<(Tensor, Tensor)>,
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
pub(crate) struct BatchModel<'b> {
    pub(crate) net: &'b model::Model,
    pub(crate) opt: &'b mut Optimizer,
    pub(crate) params: &'b [(Tensor, String, u32)],
    pub(crate) scaler: Option<&'b crate::amp::Scaler>,
    pub(crate) x: &'b Tensor,
    pub(crate) y: &'b Tensor,
    pub(crate) x_train: &'b crate::data::TrainX,
    pub(crate) val: &'b Split,
    pub(crate) device: Device,
    pub(crate) clean_grad: Option<CleanGrad>,
    pub(crate) found_inf: bool,
    pub(crate) grad_passes: u32,
    /// Feature mixing of the returned batch: partners, μ and the rows' training indices.
    pub(crate) mix: Option<(Tensor, Tensor, Tensor)>,
}

const NO_HEAD: &str = "needs the model split into features and a classifier head, which a TorchScript module is not";

impl xlab_plugin_host::TransformModel for BatchModel<'_> {
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
        let n = self.x_train.len();
        let idx = index.to_device(self.device).to_kind(Kind::Int64);
        if idx.numel() > 0
            && !(bool::try_from(idx.ge(0).all()).unwrap_or(false) && i64::try_from(idx.max()).unwrap_or(n) < n)
        {
            return Err(format!("training example indices must be in 0..{n}"));
        }
        self.x_train.rows(&idx)
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
pub(crate) struct TrainOptions {
    pub(crate) label_smoothing: f64,
    pub(crate) clip_grad_norm: Option<f64>,
    pub(crate) classes: i64,
}

/// What an objective sees of the host during one pass.
struct ObjectiveHost<'a> {
    stats: &'a mut EpochStats,
    first: bool,
    net: &'a model::Model,
    vars: &'a [(String, Tensor)],
    x: &'a Tensor,
}

impl xlab_plugin_host::ObjectiveDriver for ObjectiveHost<'_> {
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
        self.opt.step()
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
pub(crate) const DIVERGED: &str = "diverged: ";
