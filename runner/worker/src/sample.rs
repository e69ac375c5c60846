//! The `sample` task: a sampler component draws samples from a denoiser, and the samples are
//! scored against the data.

use crate::data;
use crate::denoiser::alphas_cumprod;
use crate::events::Emitter;
use crate::files::save_atomically_tensors;
use crate::host::Components;
use crate::Failure;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn;
use tch::{Device, Kind, Tensor};
use xlab_plan::config::{DenoiserConfig, JobConfig, LabelsName, Prediction, SampleLabels, WeightsChoice};
use xlab_plugin_host::Instance;
use xlab_proto::FailureCause;

/// The exact ε̂ for the empirical distribution of `x0` (rows) under ᾱ. The squared distances
/// ‖x − √ᾱ xᵢ‖² come from one matrix product (no samples × points × features tensor).
pub fn exact_eps(x: &Tensor, x0: &Tensor, alpha_bar: f64) -> Tensor {
    let sa = alpha_bar.sqrt();
    let var = 1.0 - alpha_bar;
    let d2 = crate::quality::squared_distances(x, &(x0 * sa));
    let w = (-d2 / (2.0 * var)).softmax(-1, Kind::Double);
    let x0_hat = w.matmul(x0);
    (x - x0_hat * sa) / var.sqrt()
}

/// ᾱ at a possibly fractional timestep: σ = √((1−ᾱ)/ᾱ) is interpolated linearly between the
/// neighbouring integer timesteps, as diffusers' Euler and Heun schedulers interpolate their
/// sigmas, and ᾱ = 1/(1+σ²). At integer timesteps this is ᾱ_t itself.
fn alpha_at(ac: &[f64], t: f64) -> f64 {
    let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
    let sigma = |a: f64| ((1.0 - a) / a).sqrt();
    let s = sigma(ac[lo]) + (sigma(ac[hi]) - sigma(ac[lo])) * (t - lo as f64);
    1.0 / (1.0 + s * s)
}

/// What a trained denoiser needs at sampling time: the parent's network and its conditioning.
pub(crate) struct TrainedModel {
    net: crate::denoiser::DiffusionNet,
    /// The classifier kept by the training job, to score the samples in the data's own units.
    scorer: Option<(crate::model::Model, nn::VarStore)>,
    prediction: Prediction,
    /// Whether the model takes a label: sample i then asks for class i mod `null_label`.
    pub(crate) conditional: bool,
    /// The class count, which is also the null label's index.
    pub(crate) null_label: i64,
    /// Keeps the network's variables alive.
    _vs: nn::VarStore,
}

/// An attention guidance while sampling (`attention:` with `negative:`): the component, the
/// negative class, and the last training timestep (for its time window).
pub(crate) struct AttnGuidance<'a, 'b> {
    pub instance: &'a std::cell::RefCell<&'b mut Instance>,
    pub negative: i64,
    pub t_max: f64,
}

impl TrainedModel {
    /// The network's prediction as ε for rows `x` at timestep `t` (ᾱ = `a`), under the job's
    /// autocast, in float32: v = √ᾱ ε − √(1−ᾱ) x₀ gives ε = √ᾱ v + √(1−ᾱ) x_t. With an attention
    /// guidance, its first `rows` rows are guided in the cross-attention layers.
    fn predict(
        &self,
        x: &Tensor,
        t: f64,
        a: f64,
        labels: Option<&Tensor>,
        attn: Option<(&AttnGuidance<'_, '_>, i64)>,
    ) -> Result<Tensor, String> {
        let xf = x.to_kind(Kind::Float);
        let ts = Tensor::full([xf.size()[0]], t, (Kind::Float, xf.device()));
        let region = crate::amp::job_region(xf.device())?;
        let p = tch::no_grad(|| match attn {
            None => Ok(self.net.forward(&xf, &ts, labels)),
            Some((g, rows)) => {
                let mut inst = g.instance.borrow_mut();
                let mut combine = |pos: &Tensor, neg: &Tensor| inst.attend(pos, neg, t, g.t_max);
                let negative = Tensor::full([rows], g.negative, (Kind::Int64, xf.device()));
                let mut guide = crate::denoiser::AttnGuide { negative, combine: &mut combine };
                self.net.forward_guided(&xf, &ts, labels, Some(&mut guide))
            }
        });
        let p = crate::amp::full(p?);
        drop(region);
        Ok(match self.prediction {
            Prediction::Epsilon => p,
            Prediction::V => p * a.sqrt() + xf * (1.0 - a).sqrt(),
        })
    }

    /// The predictions with the labels and with `uncond` (the null label, or the negative class),
    /// from one pass of 2B rows; an attention guidance acts on the conditional rows only.
    fn predict_both(
        &self,
        x: &Tensor,
        t: f64,
        a: f64,
        labels: &Tensor,
        uncond: i64,
        attn: Option<&AttnGuidance<'_, '_>>,
    ) -> Result<(Tensor, Tensor), String> {
        let rows = x.size()[0];
        let both = self.predict(
            &Tensor::cat(&[x, x], 0),
            t,
            a,
            Some(&Tensor::cat(&[labels.shallow_clone(), labels.full_like(uncond)], 0)),
            attn.map(|g| (g, rows)),
        )?;
        Ok((both.narrow(0, 0, rows), both.narrow(0, rows, rows)))
    }

    /// The labels asked for by samples `start..start + count` (`labels:` of the job): class
    /// i mod K by default, the null label for `none`, one class, or a list cycled through.
    pub(crate) fn labels(
        &self,
        chosen: Option<&SampleLabels>,
        start: i64,
        count: i64,
        device: Device,
    ) -> Option<Tensor> {
        if !self.conditional {
            return None;
        }
        let index = Tensor::arange_start(start, start + count, (Kind::Int64, device));
        Some(match chosen {
            None | Some(SampleLabels::Named(LabelsName::Cycle)) => index.remainder(self.null_label),
            Some(SampleLabels::Named(LabelsName::None)) => index.full_like(self.null_label),
            Some(SampleLabels::One(c)) => index.full_like(i64::from(*c)),
            Some(SampleLabels::List(l)) => {
                let l: Vec<i64> = l.iter().map(|&c| i64::from(c)).collect();
                Tensor::from_slice(&l).to_device(device).index_select(0, &index.remainder(l.len() as i64))
            }
        })
    }

    /// Refuses classes the model does not know (the plan checks them where the data's class
    /// count is known before reading it).
    fn check_classes(&self, cfg: &JobConfig) -> Result<(), Failure> {
        let named = cfg.labels.as_ref().map_or(&[][..], SampleLabels::classes);
        let bad = named.iter().map(|&c| ("labels", c)).chain(cfg.negative.map(|c| ("negative", c)));
        for (key, c) in bad {
            if !self.conditional {
                return Err(Failure::new(
                    FailureCause::Config,
                    format!("`{key}` names a class, and the parent's model is unconditional"),
                ));
            }
            if i64::from(c) >= self.null_label {
                return Err(Failure::new(
                    FailureCause::Config,
                    format!("`{key}`: class {c}, and the parent's model knows classes 0 to {}", self.null_label - 1),
                ));
            }
        }
        Ok(())
    }
}

/// How many samples go through the sampler at once when `sample_batch` is not set.
pub const DEFAULT_SAMPLE_BATCH: u32 = 1024;

/// Evaluation counts of one sampling run.
#[derive(Default, Clone, Copy)]
struct Evals {
    /// Network passes over the whole batch: conditional and unconditional.
    passes: u64,
    /// Denoiser calls whose unconditional pass the guidance found unneeded.
    skipped_uncond: u64,
}

/// The raw samples of every batch, in the model's [-1, 1] space, with their counts averaged
/// over the samples (a sample drawn in a batch counts that batch's figures).
pub(crate) struct Drawn {
    pub samples: Tensor,
    pub nfe: f64,
    pub passes: f64,
    pub skipped_uncond: f64,
    pub seconds: f64,
}

pub fn run(
    cfg: &JobConfig,
    seed: u64,
    device: Device,
    run_dir: &Path,
    parents: &[xlab_proto::ParentRef],
    comps: &mut Components,
    out: &mut Emitter,
) -> Result<BTreeMap<String, f64>, Failure> {
    let (Some(denoiser), Some(n)) = (&cfg.denoiser, cfg.samples) else {
        return Err(Failure::new(FailureCause::Config, "`task: sample` needs `denoiser` and `samples`"));
    };
    let data = data::build(&cfg.data).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let (x0, scale, ac, model) = load_denoiser(cfg, denoiser, &data, device, parents, out)?;
    if comps.guidance.is_some() && model.as_ref().is_none_or(|m| !m.conditional) {
        return Err(Failure::new(
            FailureCause::Config,
            "`guidance` needs a class-conditional trained model (`diffusion: {conditional: true}` in the parent)",
        ));
    }
    if let Some(m) = &model {
        m.check_classes(cfg)?;
        if comps.attention.is_some() && !m.net.has_cross_attention() {
            return Err(Failure::new(
                FailureCause::Config,
                "`attention` acts inside the model's cross-attention layers, and the parent's model has none",
            ));
        }
    }
    let x0 = x0.to_device(device);
    let batch = i64::from(cfg.sample_batch.unwrap_or(DEFAULT_SAMPLE_BATCH));
    let negative = cfg.negative.map(i64::from);
    let den = Denoising { x0: &x0, ac: &ac, model: model.as_ref(), image: data.image, device, seed, negative };
    let Components { sampler, guidance, attention, .. } = comps;
    let sampler =
        sampler.as_mut().ok_or_else(|| Failure::new(FailureCause::Config, "`task: sample` needs a `sampler`"))?;
    // The initial noise is one stream from the job's seed, whatever the batch size.
    let dim = x0.size()[1];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut noise = |_start: i64, b: i64| -> Result<Tensor, Failure> {
        let v: Vec<f64> = (0..b * dim).map(|_| data::normal(&mut rng)).collect();
        Ok(Tensor::from_slice(&v).reshape([b, dim]).to_device(device))
    };
    // Sample i asks for class i mod K, or as `labels:` says.
    let labels = |start: i64, b: i64| model.as_ref().and_then(|m| m.labels(cfg.labels.as_ref(), start, b, device));
    let guides = Guides { guidance: guidance.as_mut(), attention: attention.as_mut() };
    let drawn = draw(i64::from(n), batch, &den, sampler, guides, &mut noise, &labels)?;
    let mut values = BTreeMap::new();
    values.insert("sample.nfe".to_string(), drawn.nfe);
    values.insert("time.sample_s".to_string(), drawn.seconds);
    values.insert("time.nfe_per_s".to_string(), drawn.nfe / drawn.seconds);
    if model.is_some() {
        values.insert("sample.model_passes".to_string(), drawn.passes);
        if comps.guidance.is_some() {
            values.insert("sample.uncond_skipped".to_string(), drawn.skipped_uncond);
        }
    }
    let raw = drawn.samples;
    // Samples are delivered as an image pipeline delivers them: clamped to the training data's
    // range ([-1, 1] here), in the data's units. The raw values' figures keep their own names.
    let (outside, abs_max) = {
        let abs = raw.abs();
        (f64::try_from(abs.gt(1.0).sum(Kind::Double))? / abs.numel() as f64, f64::try_from(abs.max())?)
    };
    values.insert("sample.raw.abs_max".to_string(), abs_max);
    // Only the raw samples are kept: each use maps them to the data's units and clamps there.
    let own = |clamp: bool| {
        let mut y = scale.invert(&raw);
        if clamp {
            scale.clamp_(&mut y);
        }
        y
    };
    let train = scale.invert(&x0);
    let held_out = data.test.x.to_kind(Kind::Double).to_device(device);
    let scorer = model.as_ref().and_then(|m| m.scorer.as_ref().map(|(s, _)| (s, m)));
    let held_out_features = scorer.map(|(s, _)| crate::quality::in_chunks(&held_out, |x| features(s, x)));
    let quality = |clamp: bool| -> Result<BTreeMap<String, f64>, Failure> {
        let own = own(clamp);
        let mut q = BTreeMap::new();
        let nn = crate::quality::nearest_distance(&own, &train);
        q.insert("nn_dist".to_string(), f64::try_from(nn.mean(Kind::Double))?);
        q.insert("nn_dist_max".to_string(), f64::try_from(nn.max())?);
        let mean_gap = (own.mean_dim(0, false, Kind::Double) - train.mean_dim(0, false, Kind::Double)).norm();
        q.insert("mean_gap".to_string(), f64::try_from(mean_gap)?);
        q.insert("swd".to_string(), crate::quality::sliced_wasserstein(&own, &held_out, 128, 0)?);
        q.insert("mmd".to_string(), crate::quality::mmd_rbf(&own, &held_out)?);
        if let (Some((scorer, m)), Some(held_out_features)) = (scorer, &held_out_features) {
            // In the data's own units, as the classifier was trained.
            let probs = crate::quality::in_chunks(&own, |x| {
                tch::no_grad(|| scorer.forward_t(&x.to_kind(Kind::Float), false).softmax(-1, Kind::Double))
            });
            let (conf, pred) = probs.max_dim(-1, false);
            q.insert("class_confidence".to_string(), f64::try_from(conf.mean(Kind::Double))?);
            let asked = m.labels(cfg.labels.as_ref(), 0, own.size()[0], device);
            // Unconditional samples (`labels: none`) ask for no class to be right about.
            if let Some(labels) = asked.filter(|_| cfg.labels != Some(SampleLabels::Named(LabelsName::None))) {
                let right = pred.eq_tensor(&labels).to_kind(Kind::Double).mean(Kind::Double);
                q.insert("class_acc".to_string(), f64::try_from(right)?);
            }
            // The share of the delivered samples the scorer puts in each class (up to 20
            // classes), and in the negative class (what guidance away from it should lower).
            let classes = probs.size()[1];
            if clamp && classes <= 20 {
                let counts = pred.bincount(None::<Tensor>, classes).to_kind(Kind::Double) / pred.size()[0] as f64;
                for (k, share) in Vec::<f64>::try_from(counts)?.into_iter().enumerate() {
                    q.insert(format!("class_share.{k}"), share);
                }
            }
            if let Some(k) = negative {
                let share = pred.eq(k).to_kind(Kind::Double).mean(Kind::Double);
                q.insert("negative_share".to_string(), f64::try_from(share)?);
            }
            let own_features = crate::quality::in_chunks(&own, |x| features(scorer, x));
            q.insert("fd".to_string(), crate::quality::frechet(&own_features, held_out_features)?);
        }
        Ok(q)
    };
    let as_delivered = quality(true)?;
    // With every value in range the raw samples are the delivered ones: the same figures.
    let as_raw = if outside > 0.0 { quality(false)? } else { as_delivered.clone() };
    values.insert("sample.out_of_range".to_string(), outside);
    for (prefix, q) in [("sample.", as_delivered), ("sample.raw.", as_raw)] {
        values.extend(q.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
    }
    values.insert("sys.peak_rss_mb".to_string(), crate::peak_rss_mb());
    out.metrics(1, values.clone());
    // `samples`: as delivered, in the data's units; `raw`: the sampler's output in [-1, 1] space.
    let delivered_own = own(true).to_kind(Kind::Float).to_device(Device::Cpu);
    save_atomically_tensors(
        &run_dir.join("samples.safetensors"),
        &[("samples", &delivered_own), ("raw", &raw.to_kind(Kind::Float).to_device(Device::Cpu))],
    )?;
    out.artifact("samples", "samples.safetensors", "samples");
    if let Some(image) = data.image {
        let labelled = model.as_ref().filter(|m| m.conditional).map(|m| m.null_label);
        crate::quality::write_grid_png(
            &run_dir.join("samples.png"),
            &raw.narrow(0, 0, raw.size()[0].min(64)).clamp(-1.0, 1.0).to_device(Device::Cpu),
            image,
            8,
            labelled,
        )?;
        out.artifact("samples_grid", "samples.png", "image");
    }
    Ok(values)
}

/// The denoiser of a sample or invert job: the training points (for the exact denoiser and the
/// closed-form samplers) in the model's [-1, 1] space, the map between that space and the
/// data's units, the schedule, and the parent's trained model.
pub(crate) type Loaded = (Tensor, crate::denoiser::Scale, Vec<f64>, Option<TrainedModel>);

pub(crate) fn load_denoiser(
    cfg: &JobConfig,
    denoiser: &DenoiserConfig,
    data: &data::Dataset,
    device: Device,
    parents: &[xlab_proto::ParentRef],
    out: &mut Emitter,
) -> Result<Loaded, Failure> {
    Ok(match denoiser {
        DenoiserConfig::Exact(den) => {
            // Per feature for vectors, one range over all pixels for images (as training does).
            let scale = crate::denoiser::Scale::fit(&data.train.x, data.image.is_some());
            (scale.apply(&data.train.x), scale, alphas_cumprod(den), None)
        }
        DenoiserConfig::Trained(chosen) => {
            let [parent] = parents else {
                return Err(Failure::new(
                    FailureCause::Config,
                    format!(
                        "`denoiser: {{name: trained}}` samples from one trained parent; this job has {} (use `select: each` or `best`)",
                        parents.len()
                    ),
                ));
            };
            let pcfg: JobConfig = serde_json::from_value(parent.config.clone())
                .map_err(|e| Failure::new(FailureCause::Config, format!("parent {}: config: {e}", parent.job_id)))?;
            let d = pcfg.diffusion.clone().ok_or_else(|| {
                Failure::new(FailureCause::Config, format!("parent {} did not train a diffusion model", parent.job_id))
            })?;
            let p = crate::denoiser::prepare(&pcfg, &d)?;
            if p.data.input_dim != data.input_dim {
                return Err(Failure::new(
                    FailureCause::Config,
                    format!(
                        "this stage's data has rows of {} features, but the parent's model was trained on rows of {}; \
                         sample with the data the parent trains on",
                        data.input_dim, p.data.input_dim
                    ),
                ));
            }
            // The parent's own test split never overlaps its training rows; other data may.
            let shared = if pcfg.data == cfg.data { 0 } else { shared_rows(&data.test.x, &p.data.train.x)? };
            if shared > 0 {
                out.send(&xlab_proto::Event::Warning {
                    message: format!(
                        "{shared} of the {} held-out rows this job scores against are training rows of the parent's \
                         model, so the distances to them reward memorization; score against rows the parent never saw",
                        data.test.x.size()[0]
                    ),
                });
            }
            let mut vs = nn::VarStore::new(device);
            let net = crate::denoiser::network(&vs, &pcfg, &d, &p.data)?;
            net.set_train(false);
            let averaged = match chosen.weights {
                Some(w) => w == WeightsChoice::Ema,
                None => pcfg.ema.is_some(),
            };
            if averaged && pcfg.ema.is_none() {
                return Err(Failure::new(
                    FailureCause::Config,
                    format!(
                        "`weights: ema` takes the weights' average, and parent {} trained without `ema:`",
                        parent.job_id
                    ),
                ));
            }
            let file = match chosen.epoch {
                Some(e) => crate::files::epoch_weights(averaged, e),
                None if averaged => crate::ema::EMA_WEIGHTS.to_string(),
                None => "weights.safetensors".to_string(),
            };
            let weights = parent.run_dir.join(&file);
            if let (Some(e), false) = (chosen.epoch, weights.is_file()) {
                return Err(Failure::new(
                    FailureCause::Config,
                    format!(
                        "parent {} kept no weights of epoch {e} ({file}): it ran before its stage's \
                         `checkpoint.keep_weights` listed {e}; run it again to keep them (`xlab run FILE --rerun 'id == \"{}\"'`)",
                        parent.job_id, parent.job_id
                    ),
                ));
            }
            vs.load(&weights).map_err(|e| {
                Failure::new(
                    FailureCause::Error,
                    format!("cannot load {} into the parent's model: {e}", weights.display()),
                )
            })?;
            let x0 = p.scale.apply(&p.data.train.x);
            let scorer = load_scorer(&parent.run_dir, &p.data, device)?;
            let model = TrainedModel {
                conditional: net.is_conditional(),
                net,
                scorer,
                prediction: d.prediction,
                null_label: p.data.classes as i64,
                _vs: vs,
            };
            (x0, p.scale, p.alphas, Some(model))
        }
    })
}

/// How many rows of `a` are also rows of `b` (exactly, bit for bit).
fn shared_rows(a: &Tensor, b: &Tensor) -> Result<usize, Failure> {
    let rows = |t: &Tensor| -> Result<Vec<Vec<u32>>, Failure> {
        let width = t.size()[1] as usize;
        let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1]))?;
        Ok(v.chunks(width.max(1)).map(|r| r.iter().map(|x| x.to_bits()).collect()).collect())
    };
    let seen: std::collections::HashSet<Vec<u32>> = rows(b)?.into_iter().collect();
    Ok(rows(a)?.iter().filter(|r| seen.contains(*r)).count())
}

/// The classifier's hidden features (the input of its last layer) of rows in the data's units,
/// in float32 (the Fréchet statistics sum them in float64).
fn features(scorer: &crate::model::Model, x: &Tensor) -> Tensor {
    tch::no_grad(|| scorer.features(&x.to_kind(Kind::Float)))
}

/// What a sampler run queries: the training points in the model's space (the exact denoiser,
/// the closed-form samplers), the schedule, and the trained model if any.
pub(crate) struct Denoising<'a> {
    pub x0: &'a Tensor,
    pub ac: &'a [f64],
    pub model: Option<&'a TrainedModel>,
    pub image: Option<[i64; 3]>,
    pub device: Device,
    pub seed: u64,
    /// The negative class (`negative:`): guidance's unconditional prediction takes it instead
    /// of the null label, and an attention guidance steers away from it.
    pub negative: Option<i64>,
}

/// The components that steer a sampler's evaluations: a guidance over the conditional and
/// unconditional predictions, and an attention guidance inside the network.
#[derive(Default)]
pub(crate) struct Guides<'a> {
    pub guidance: Option<&'a mut Instance>,
    pub attention: Option<&'a mut Instance>,
}

/// Runs `sampler` over `n` rows, `batch` at a time, from the rows `start(first, count)` gives
/// (noise for sampling, data for an inversion, latents for a reconstruction), a conditional
/// model asking for `labels(first, count)`. A stochastic sampler's own draws come per batch
/// from the job's seed. The guidance is set up afresh for every batch, as for a run of its own.
pub(crate) fn draw(
    n: i64,
    batch: i64,
    den: &Denoising<'_>,
    sampler: &mut Instance,
    guides: Guides<'_>,
    start: &mut dyn FnMut(i64, i64) -> Result<Tensor, Failure>,
    labels: &dyn Fn(i64, i64) -> Option<Tensor>,
) -> Result<Drawn, Failure> {
    let Denoising { x0, ac, model, image, device, seed, negative } = *den;
    let Guides { mut guidance, attention } = guides;
    let ac_t = Tensor::from_slice(ac).to_device(device);
    let mut plugin_rng = ChaCha8Rng::seed_from_u64(seed);
    plugin_rng.set_stream(u64::MAX);
    let t_max = ac.len() as f64 - 1.0;
    let attention = attention.map(std::cell::RefCell::new);
    let attn = match (&attention, negative) {
        (Some(instance), Some(negative)) => Some(AttnGuidance { instance, negative, t_max }),
        _ => None,
    };
    let attn = attn.as_ref();
    // Guidance's unconditional prediction: the null label, or the negative class.
    let uncond = |m: &TrainedModel| negative.unwrap_or(m.null_label);
    let dim = x0.size()[1];
    // Filled batch by batch (no second copy of every sample at the end).
    let all = Tensor::zeros([n, dim], (Kind::Double, device));
    let (mut nfe, mut passes, mut skipped, mut seconds) = (0.0, 0.0, 0.0, 0.0);
    let evaluations = std::cell::Cell::new(0u64);
    let mut first = 0;
    while first < n {
        let b = batch.min(n - first);
        let noise = start(first, b)?;
        let labels = labels(first, b);
        let info = xlab_plugin_api::RunInfo {
            num_classes: model.map_or(0, |m| m.null_label),
            n_train: x0.size()[0] as u64,
            seed,
            image,
            ..Default::default()
        };
        if let Some(g) = guidance.as_mut() {
            g.setup(&info).map_err(|m| Failure::new(FailureCause::Error, m))?;
        }
        if let Some(a) = &attention {
            a.borrow_mut().setup(&info).map_err(|m| Failure::new(FailureCause::Error, m))?;
        }
        let evals = std::cell::Cell::new(Evals::default());
        let count = |passes: u64, skipped: u64| {
            let e = evals.get();
            evals.set(Evals { passes: e.passes + passes, skipped_uncond: e.skipped_uncond + skipped });
        };
        let mut need_uncond = true;
        crate::watch::evaluation_begins(evaluations.get());
        // Every call starts an evaluation (the watch names it when a plugin hangs or crashes).
        let begin = |t: f64| -> Result<f64, String> {
            crate::watch::evaluation_begins(evaluations.get());
            evaluations.set(evaluations.get() + 1);
            if !(0.0..=t_max).contains(&t) {
                return Err(format!("timestep {t} is outside 0..={t_max}"));
            }
            Ok(alpha_at(ac, t))
        };
        let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> {
            let a = begin(t)?;
            let Some(m) = model else {
                return Ok(exact_eps(&x.to_kind(Kind::Double), x0, a));
            };
            let out = match (guidance.as_mut(), &labels) {
                (Some(g), Some(labels)) => {
                    let (cond, uncond) = if need_uncond {
                        count(2, 0);
                        let (c, u) = m.predict_both(x, t, a, labels, uncond(m), attn)?;
                        (c, Some(u))
                    } else {
                        count(1, 1);
                        (m.predict(x, t, a, Some(labels), attn.map(|g| (g, x.size()[0])))?, None)
                    };
                    let (e, next) = g.guide(&cond, uncond.as_ref())?;
                    need_uncond = next;
                    e
                }
                (_, labels) => {
                    count(1, 0);
                    m.predict(x, t, a, labels.as_ref(), attn.map(|g| (g, x.size()[0])))?
                }
            };
            Ok(out.to_kind(x.kind()))
        };
        // A sampler that guides itself (`diffusion.pcg`) asks for both predictions at once.
        let mut both = |x: &Tensor, t: f64| -> Result<(Tensor, Tensor), String> {
            let a = begin(t)?;
            match (model, &labels) {
                (Some(m), Some(labels)) => {
                    count(2, 0);
                    let (c, u) = m.predict_both(x, t, a, labels, uncond(m), attn)?;
                    Ok((c.to_kind(x.kind()), u.to_kind(x.kind())))
                }
                _ => Err("the sampler needs a class-conditional trained model".into()),
            }
        };
        let started = std::time::Instant::now();
        let sampled = sampler.sample_with(&noise, &mut eps, Some(&mut both), &ac_t, Some(x0), &mut || {
            rand::RngCore::next_u64(&mut plugin_rng)
        });
        crate::watch::step_ends();
        let (samples, calls) = sampled.map_err(|m| Failure::new(FailureCause::Error, m))?;
        let samples = samples.to_kind(Kind::Double);
        // Bringing one value to the host waits for the device to finish the samples.
        let _ = f64::try_from(samples.sum(Kind::Double))?;
        seconds += started.elapsed().as_secs_f64();
        if samples.size() != noise.size() {
            return Err(Failure::new(
                FailureCause::Error,
                format!("the sampler returned shape {:?} for noise of shape {:?}", samples.size(), noise.size()),
            ));
        }
        let finite = f64::try_from(samples.isfinite().all().to_kind(Kind::Double))?;
        if finite != 1.0 {
            return Err(Failure::new(FailureCause::Diverged, "the samples contain NaN or infinite values"));
        }
        let share = b as f64 / n as f64;
        nfe += calls as f64 * share;
        let evals = evals.get();
        passes += evals.passes as f64 * share;
        skipped += evals.skipped_uncond as f64 * share;
        all.narrow(0, first, b).copy_(&samples);
        first += b;
    }
    Ok(Drawn { samples: all, nfe, passes, skipped_uncond: skipped, seconds })
}

/// The classifier a diffusion training kept (`diffusion::SCORER_CONFIG`), built for the data.
fn load_scorer(
    run_dir: &Path,
    data: &data::Dataset,
    device: Device,
) -> Result<Option<(crate::model::Model, nn::VarStore)>, Failure> {
    let path = run_dir.join(crate::denoiser::SCORER_CONFIG);
    if !path.exists() {
        return Ok(None);
    }
    let bad = |m: String| Failure::new(FailureCause::Error, format!("{}: {m}", path.display()));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).map_err(|e| bad(e.to_string()))?)
        .map_err(|e| bad(e.to_string()))?;
    let cfg: JobConfig = serde_json::from_value(json["config"].clone()).map_err(|e| bad(e.to_string()))?;
    let model_cfg = cfg.model.ok_or_else(|| bad("the scorer has no model".into()))?;
    let mut vs = nn::VarStore::new(device);
    let net =
        crate::model::build_checked(&vs.root(), &model_cfg, data.input_dim, data.image, data.classes).map_err(bad)?;
    let weights = run_dir.join(crate::denoiser::SCORER_WEIGHTS);
    vs.load(&weights).map_err(|e| bad(format!("cannot load {} into it: {e}", weights.display())))?;
    Ok(Some((net, vs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_eps_of_a_single_point_is_the_oracle() {
        // One training point x₀* = 0.5: ε̂(x, t) = (x − √ᾱ·0.5)/√(1−ᾱ).
        let x0 = Tensor::from_slice(&[0.5f64]).reshape([1, 1]);
        let x = Tensor::from_slice(&[1.3f64, -0.2]).reshape([2, 1]);
        let e = exact_eps(&x, &x0, 0.64);
        let got: Vec<f64> = Vec::try_from(e.flatten(0, -1)).unwrap();
        assert!(
            (got[0] - (1.3 - 0.8 * 0.5) / 0.6).abs() < 1e-12 && (got[1] - (-0.2 - 0.4) / 0.6).abs() < 1e-12,
            "{got:?}"
        );
    }
}
