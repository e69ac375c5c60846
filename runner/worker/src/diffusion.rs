//! Diffusion models: the time-conditioned networks (`time_mlp`, `unet`), their training
//! (METHODS.md 3.1, with DDPM-IP through a batch transform and label dropout for classifier-free
//! guidance) and the data scaling they share with sampling.

use crate::data::{self, Dataset};
use crate::events::Emitter;
use crate::optim::Optimizer;
use crate::train::{self, CheckpointPlan, Components, Failure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};
use xlab_plugin_api::RunInfo;
use xlab_proto::FailureCause;
use xlab_spec::config::{Diffusion, JobConfig, ModelConfig, Prediction};

/// The affine map of the training data onto [-1, 1]: per feature for vectors, one range over
/// all pixels for images. Sampling uses the same map, fitted on the same training split.
pub struct Scale {
    lo: Tensor,
    hi: Tensor,
}

impl Scale {
    pub fn fit(train_x: &Tensor, image: bool) -> Scale {
        let x = train_x.to_kind(Kind::Double);
        if image {
            Scale { lo: x.min(), hi: x.max() }
        } else {
            Scale { lo: x.amin(0, true), hi: x.amax(0, true) }
        }
    }

    /// `x` mapped onto the training data's [-1, 1], in float64.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let (lo, hi) = (self.lo.to_device(x.device()), self.hi.to_device(x.device()));
        (x.to_kind(Kind::Double) - &lo) / (&hi - &lo).clamp_min(1e-12) * 2.0 - 1.0
    }

    /// The inverse map: model space back to the data's own units (float64).
    pub fn invert(&self, x: &Tensor) -> Tensor {
        let (lo, hi) = (self.lo.to_device(x.device()), self.hi.to_device(x.device()));
        // One new tensor the size of `x`, the rest in place (sample sets can be large).
        let mut y = x.to_kind(Kind::Double) + 1.0;
        let _ = y.g_mul_(&((&hi - &lo).clamp_min(1e-12) / 2.0));
        let _ = y.g_add_(&lo);
        y
    }

    /// Clamps rows in the data's units to the training data's range, in place.
    pub fn clamp_(&self, y: &mut Tensor) {
        let (lo, hi) = (self.lo.to_device(y.device()), self.hi.to_device(y.device()));
        let _ = y.clamp_tensor_(Some(&lo), Some(&hi));
    }
}

/// The sinusoidal embedding of (possibly fractional) timesteps `t` `[B]`: `[sin(t·f), cos(t·f)]`
/// with frequencies f_i = 10000^(−i/half).
fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.sin(), args.cos()], 1)
}

/// The largest group count ≤ 8 that divides `channels`.
fn groups_for(channels: i64) -> i64 {
    (1..=8).rev().find(|g| channels % g == 0).unwrap_or(1)
}

struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    skip: Option<nn::Conv2D>,
}

impl ResBlock {
    fn new(p: &nn::Path, cin: i64, cout: i64, tdim: i64) -> ResBlock {
        let same = nn::ConvConfig { padding: 1, ..Default::default() };
        ResBlock {
            norm1: nn::group_norm(p / "norm1", groups_for(cin), cin, Default::default()),
            conv1: nn::conv2d(p / "conv1", cin, cout, 3, same),
            time: nn::linear(p / "time", tdim, cout, Default::default()),
            norm2: nn::group_norm(p / "norm2", groups_for(cout), cout, Default::default()),
            conv2: nn::conv2d(p / "conv2", cout, cout, 3, same),
            skip: (cin != cout).then(|| nn::conv2d(p / "skip", cin, cout, 1, Default::default())),
        }
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = h + self.time.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let skip = match &self.skip {
            Some(s) => s.forward(x),
            None => x.shallow_clone(),
        };
        h + skip
    }
}

enum Body {
    Mlp { layers: Vec<nn::Linear>, out: nn::Linear },
    Unet(Box<UnetBody>),
}

struct UnetBody {
    image: [i64; 3],
    conv_in: nn::Conv2D,
    down: Vec<ResBlock>,
    mid: ResBlock,
    up: Vec<ResBlock>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

/// A network that predicts ε (or v) from x_t, t and, when conditional, the class label; the
/// label `classes` is the null label of classifier-free guidance.
pub struct DiffusionNet {
    time_dim: i64,
    time1: nn::Linear,
    time2: nn::Linear,
    label: Option<nn::Embedding>,
    body: Body,
}

impl DiffusionNet {
    pub fn build(
        root: &nn::Path,
        cfg: &ModelConfig,
        input_dim: usize,
        image: Option<[i64; 3]>,
        classes: Option<usize>,
    ) -> Result<DiffusionNet, String> {
        let (time_dim, body_dim) = match cfg {
            ModelConfig::TimeMlp(m) => (m.time_dim as i64, m.time_dim as i64),
            ModelConfig::Unet(u) => (u.time_dim as i64, u.time_dim as i64),
            _ => return Err("a diffusion job needs a diffusion model (`time_mlp` or `unet`)".into()),
        };
        let time1 = nn::linear(root / "time" / "0", time_dim, body_dim, Default::default());
        let time2 = nn::linear(root / "time" / "2", body_dim, body_dim, Default::default());
        let label = classes.map(|k| nn::embedding(root / "label", k as i64 + 1, body_dim, Default::default()));
        let body = match cfg {
            ModelConfig::TimeMlp(m) => {
                let mut width = input_dim as i64 + body_dim;
                let mut layers = Vec::new();
                for (i, &h) in m.hidden.iter().enumerate() {
                    layers.push(nn::linear(root / "layers" / i, width, h as i64, Default::default()));
                    width = h as i64;
                }
                let out = nn::linear(root / "out", width, input_dim as i64, Default::default());
                Body::Mlp { layers, out }
            }
            ModelConfig::Unet(u) => {
                let image = image.ok_or("`unet` needs image data")?;
                let ch: Vec<i64> = u.channels.iter().map(|&c| c as i64).collect();
                let same = nn::ConvConfig { padding: 1, ..Default::default() };
                let conv_in = nn::conv2d(root / "conv_in", image[0], ch[0], 3, same);
                let mut down = Vec::new();
                let mut prev = ch[0];
                for (i, &c) in ch.iter().enumerate() {
                    down.push(ResBlock::new(&(root / "down" / i), prev, c, body_dim));
                    prev = c;
                }
                let mid = ResBlock::new(&(root / "mid"), prev, prev, body_dim);
                let mut up = Vec::new();
                for (i, &c) in ch.iter().enumerate().rev() {
                    up.push(ResBlock::new(&(root / "up" / i), prev + c, c, body_dim));
                    prev = c;
                }
                let norm_out = nn::group_norm(root / "norm_out", groups_for(prev), prev, Default::default());
                let conv_out = nn::conv2d(root / "conv_out", prev, image[0], 3, same);
                Body::Unet(Box::new(UnetBody { image, conv_in, down, mid, up, norm_out, conv_out }))
            }
            _ => unreachable!("checked above"),
        };
        Ok(DiffusionNet { time_dim, time1, time2, label, body })
    }

    pub fn is_conditional(&self) -> bool {
        self.label.is_some()
    }

    /// The prediction for flat rows `x` `[B, D]` at timesteps `t` `[B]` (float) with labels `[B]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Tensor {
        let mut temb = self.time2.forward(&self.time1.forward(&timestep_embedding(t, self.time_dim)).silu());
        if let (Some(e), Some(l)) = (&self.label, labels) {
            temb += e.forward(l);
        }
        match &self.body {
            Body::Mlp { layers, out } => {
                let mut h = Tensor::cat(&[x.shallow_clone(), temb], 1);
                for l in layers {
                    h = l.forward(&h).silu();
                }
                out.forward(&h)
            }
            Body::Unet(u) => {
                let UnetBody { image, conv_in, down, mid, up, norm_out, conv_out } = &**u;
                let b = x.size()[0];
                let mut h = conv_in.forward(&x.reshape([b, image[0], image[1], image[2]]));
                let mut skips = Vec::new();
                for (i, block) in down.iter().enumerate() {
                    h = block.forward(&h, &temb);
                    skips.push(h.shallow_clone());
                    if i + 1 < down.len() {
                        h = h.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
                    }
                }
                h = mid.forward(&h, &temb);
                for (k, block) in up.iter().enumerate() {
                    let skip = skips.pop().expect("one skip per level");
                    h = block.forward(&Tensor::cat(&[h, skip], 1), &temb);
                    if k + 1 < up.len() {
                        h = h.upsample_nearest2d([h.size()[2] * 2, h.size()[3] * 2], None, None);
                    }
                }
                conv_out.forward(&norm_out.forward(&h).silu()).reshape([b, -1])
            }
        }
    }
}

/// A stream of draws for one purpose, fixed by the job's seed: `(epoch, batch)` of training,
/// or a named evaluation. Resuming at an epoch boundary redraws exactly what the uninterrupted
/// run drew.
fn stream(seed: u64, id: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0xD1FF_0510_u64);
    r.set_stream(id);
    r
}

const VAL_STREAM: u64 = u64::MAX - 1;

fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| data::normal(rng) as f32).collect()
}

/// One batch of the diffusion loss: what the model sees and what it must predict.
struct Noised {
    x_t: Tensor,
    t: Tensor,
    labels: Option<Tensor>,
    target: Tensor,
}

/// Draws t, ε and label dropout for `x0` `[B, D]` and forms x_t and the target. With a batch
/// transform, the drawn ε goes through it: it returns the noise that forms x_t and the
/// regression target (DDPM-IP: ε + γξ and ε).
#[allow(clippy::too_many_arguments)]
fn noised(
    d: &Diffusion,
    ac: &Tensor,
    x0: &Tensor,
    y: &Tensor,
    index: &Tensor,
    classes: i64,
    rng: &mut ChaCha8Rng,
    transform: Option<&mut xlab_plugin_api::host::Instance>,
) -> Result<Noised, Failure> {
    let (b, dim) = (x0.size()[0], x0.size()[1]);
    let device = x0.device();
    let t: Vec<i64> = (0..b).map(|_| rng.gen_range(0..i64::from(d.timesteps))).collect();
    let eps = Tensor::from_slice(&normals(rng, (b * dim) as usize)).reshape([b, dim]).to_device(device);
    let labels = d.conditional.then(|| {
        let keep: Vec<i64> = (0..b).map(|_| i64::from(rng.gen::<f64>() >= d.p_uncond)).collect();
        let keep = Tensor::from_slice(&keep).to_device(device);
        y * &keep + (1 - &keep) * classes
    });
    let (noise, target_eps) = match transform {
        Some(tr) => {
            let (n, tgt) = tr
                .transform(&eps, y, None, None, index, classes, &mut || rand::RngCore::next_u64(rng))
                .map_err(|m| Failure::new(FailureCause::Error, m))?;
            if n.size() != eps.size() || tgt.size() != eps.size() {
                return Err(Failure::new(
                    FailureCause::Error,
                    format!(
                        "the batch transform returned noise {:?} and target {:?} for noise {:?}",
                        n.size(),
                        tgt.size(),
                        eps.size()
                    ),
                ));
            }
            (n.to_kind(Kind::Float), tgt.to_kind(Kind::Float))
        }
        None => (eps.shallow_clone(), eps),
    };
    let t = Tensor::from_slice(&t).to_device(device);
    let ab = ac.index_select(0, &t).unsqueeze(1);
    let (sa, so) = (ab.sqrt(), (-&ab + 1.0).sqrt());
    let x_t = &sa * x0 + &so * &noise;
    let target = match d.prediction {
        Prediction::Epsilon => target_eps,
        Prediction::V => &sa * target_eps - &so * x0,
    };
    Ok(Noised { x_t, t: t.to_kind(Kind::Float), labels, target })
}

/// The denoising loss of a whole split, with draws fixed by the seed (comparable across epochs).
fn split_loss(
    net: &DiffusionNet,
    d: &Diffusion,
    ac: &Tensor,
    x0: &Tensor,
    y: &Tensor,
    classes: i64,
    seed: u64,
) -> Result<f64, Failure> {
    let mut rng = stream(seed, VAL_STREAM);
    let index = Tensor::arange(x0.size()[0], (Kind::Int64, x0.device()));
    let nz = noised(d, ac, x0, y, &index, classes, &mut rng, None)?;
    let pred = tch::no_grad(|| net.forward(&nz.x_t, &nz.t, nz.labels.as_ref()));
    Ok(f64::try_from((pred - nz.target).square().mean(Kind::Double))?)
}

/// The data and schedule a diffusion job (and the sampling jobs after it) work with.
pub struct Prepared {
    pub data: Dataset,
    pub scale: Scale,
    /// ᾱ_t, float64 on the host.
    pub alphas: Vec<f64>,
}

pub fn prepare(cfg: &JobConfig, d: &Diffusion) -> Result<Prepared, Failure> {
    let data = data::build(&cfg.data).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let scale = Scale::fit(&data.train.x, data.image.is_some());
    Ok(Prepared { scale, alphas: crate::sample::alphas_cumprod(&d.noise()), data })
}

/// Builds the job's network under `vs`.
pub fn network(vs: &nn::VarStore, cfg: &JobConfig, d: &Diffusion, data: &Dataset) -> Result<DiffusionNet, Failure> {
    let model =
        cfg.model.as_ref().ok_or_else(|| Failure::new(FailureCause::Config, "a diffusion job needs `model`"))?;
    DiffusionNet::build(&vs.root(), model, data.input_dim, data.image, d.conditional.then_some(data.classes))
        .map_err(|m| Failure::new(FailureCause::Config, m))
}

/// Trains a diffusion model, resuming from the newest valid checkpoint; checkpoints at the ends
/// of epochs as the plan says (and when asked to stop).
#[allow(clippy::too_many_arguments)]
pub fn run(
    cfg: &JobConfig,
    d: &Diffusion,
    seed: u64,
    device: Device,
    run_dir: &Path,
    ckpt: &CheckpointPlan<'_>,
    parents: &[xlab_proto::ParentRef],
    comps: &mut Components,
    out: &mut Emitter,
) -> Result<BTreeMap<String, f64>, Failure> {
    let scorer = scorer_parent(parents)?;
    let opt_cfg = cfg.optimizer.as_ref().ok_or_else(|| Failure::new(FailureCause::Config, "needs `optimizer`"))?;
    let p = prepare(cfg, d)?;
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let net = network(&vs, cfg, d, &p.data)?;
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = Optimizer::new(opt_cfg, named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    if let Some(init) = &cfg.init {
        train::load_init(&named, &init.path)?;
    }
    let mut ema = cfg.ema.as_ref().map(|e| crate::ema::Average::new(e, &named));
    tracing::info!(params = crate::model::parameter_count(&vs), train = p.data.train.len(), "diffusion model built");
    let ac = Tensor::from_slice(&p.alphas).to_kind(Kind::Float).to_device(device);
    let x_train = p.scale.apply(&p.data.train.x).to_kind(Kind::Float).to_device(device);
    let y_train = p.data.train.y.to_device(device);
    let classes = p.data.classes as i64;
    let n = p.data.train.len();
    let bs = cfg.batch_size as usize;
    let steps_per_epoch = n.div_ceil(bs) as u64;
    let total_steps = steps_per_epoch * u64::from(cfg.epochs);
    let base_lr = opt_cfg.lr();
    let info = RunInfo {
        num_classes: classes,
        n_train: n as u64,
        train_labels: Vec::<i64>::try_from(&p.data.train.y)?,
        epochs: u64::from(cfg.epochs),
        steps_per_epoch,
        seed,
        image: p.data.image,
        ..Default::default()
    };
    for c in comps.all() {
        c.setup(&info).map_err(|m| Failure::new(FailureCause::Error, m))?;
    }
    // Every draw comes from a stream fixed by (seed, epoch, batch); this one only keeps the
    // checkpoint format's random-stream field meaningful.
    let unused_rng = ChaCha8Rng::seed_from_u64(seed);
    let mut history: Vec<(u64, BTreeMap<String, f64>)> = Vec::new();
    let mut first_epoch = 0;
    let mut global_step = 0;
    if let Some(c) = ckpt.latest(run_dir) {
        let mut r = unused_rng.clone();
        train::restore(&c, &named, &mut opt, comps, &mut r, ema.as_mut())?;
        train::announce_resume(out, &c);
        first_epoch = c.meta.epoch;
        global_step = c.meta.global_step;
        history = c.meta.metrics;
    }
    let mut summary = history.last().map(|(_, v)| v.clone()).unwrap_or_default();
    let mut last_checkpoint = std::time::Instant::now();
    for epoch in first_epoch..u64::from(cfg.epochs) {
        for c in comps.all() {
            c.on_epoch(epoch).map_err(|m| Failure::new(FailureCause::Error, m))?;
        }
        let order = if cfg.shuffle { data::epoch_order(n, seed, epoch) } else { (0..n as i64).collect() };
        let order_on_device = Tensor::from_slice(&order).to_device(device);
        let started = std::time::Instant::now();
        let mut loss_sum: Option<Tensor> = None;
        for (k, chunk) in order.chunks(bs).enumerate() {
            crate::watch::step_begins(epoch, global_step);
            let idx = order_on_device.narrow(0, (k * bs) as i64, chunk.len() as i64);
            let x0 = x_train.index_select(0, &idx);
            let y = y_train.index_select(0, &idx);
            let mut rng = stream(seed, (epoch << 32) | k as u64);
            let nz = noised(d, &ac, &x0, &y, &idx, classes, &mut rng, comps.batch_transform.as_mut())?;
            opt.zero_grad();
            let pred = net.forward(&nz.x_t, &nz.t, nz.labels.as_ref());
            let loss = (pred - &nz.target).square().mean(Kind::Float);
            loss.backward();
            if let Some(max) = cfg.clip_grad_norm {
                let params: Vec<(Tensor, String, u32)> =
                    named.iter().map(|(n, t)| (t.shallow_clone(), n.clone(), 0)).collect();
                train::clip_grad_norm(&params, max);
            }
            opt.lr_factor = cfg.schedule.factor(base_lr, global_step, epoch, total_steps);
            opt.step();
            if let Some(a) = ema.as_mut() {
                a.after_step(&named, opt.steps);
            }
            crate::watch::step_ends();
            global_step += 1;
            let weighted = loss.detach().to_kind(Kind::Double) * chunk.len() as f64;
            loss_sum = Some(match loss_sum.take() {
                Some(s) => s + weighted,
                None => weighted,
            });
        }
        let train_loss = match loss_sum {
            Some(s) => f64::try_from(s)? / n as f64,
            None => f64::NAN,
        };
        if !train_loss.is_finite() {
            return Err(Failure::new(
                FailureCause::Diverged,
                format!("the training loss is {train_loss} in epoch {}", epoch + 1),
            ));
        }
        let train_s = started.elapsed().as_secs_f64();
        let mut values = BTreeMap::new();
        values.insert("train.loss".to_string(), train_loss);
        values.insert("train.lr".to_string(), base_lr * opt.lr_factor);
        values.insert("train.examples".to_string(), n as f64);
        values.insert("time.train_s".to_string(), train_s);
        values.insert("time.steps_per_s".to_string(), steps_per_epoch as f64 / train_s);
        values.insert("time.examples_per_s".to_string(), n as f64 / train_s);
        for (name, split) in [("val", &p.data.val), ("test", &p.data.test)] {
            if split.is_empty() {
                continue;
            }
            let x0 = p.scale.apply(&split.x).to_kind(Kind::Float).to_device(device);
            let y = split.y.to_device(device);
            let loss = split_loss(&net, d, &ac, &x0, &y, classes, seed)?;
            values.insert(format!("{name}.loss"), loss);
            if let Some(a) = &ema {
                let averaged = a.swapped(&named, || split_loss(&net, d, &ac, &x0, &y, classes, seed))?;
                values.insert(format!("{name}.ema.loss"), averaged);
            }
        }
        values.insert("epoch".to_string(), (epoch + 1) as f64);
        tracing::info!(epoch = epoch + 1, train_loss, "epoch done");
        out.metrics(epoch + 1, values.clone());
        history.push((epoch + 1, values.clone()));
        summary = values;
        ckpt.end_of_epoch(epoch + 1, cfg.epochs, &mut last_checkpoint, out, || {
            let meta = train::checkpoint_meta(ckpt, epoch + 1, global_step, &opt, &unused_rng, &history);
            train::save_checkpoint(run_dir, meta, &named, &opt, comps, Vec::new(), ema.as_ref())
        })?;
    }
    train::save_weights(&vs, ema.as_ref(), run_dir, &weights_metadata(cfg, d, &p)?, out)?;
    if let Some(p) = scorer {
        keep_scorer(p, run_dir)?;
        out.artifact("scorer", SCORER_CONFIG, "scorer");
    }
    Ok(summary)
}

/// What a diffusion model's weights need to be used outside xlab, as safetensors metadata
/// (JSON strings): besides [`train::model_metadata`], the diffusion config (schedule,
/// timesteps, β range, prediction type, conditioning), the data scaling
/// x ↦ 2(x − lo)/(hi − lo) − 1 and the null label's index (the class count).
fn weights_metadata(cfg: &JobConfig, d: &Diffusion, p: &Prepared) -> Result<BTreeMap<String, String>, Failure> {
    let values = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1]));
    let mut about = train::model_metadata(cfg, &p.data);
    about.insert("xlab.diffusion".to_string(), serde_json::to_string(d).expect("json"));
    let scale = serde_json::json!({
        "lo": values(&p.scale.lo)?, "hi": values(&p.scale.hi)?,
        "per_feature": p.data.image.is_none(),
        "to_model": "2 * (x - lo) / (hi - lo) - 1",
    });
    about.insert("xlab.data_scale".to_string(), scale.to_string());
    if d.conditional {
        about.insert("xlab.null_label".to_string(), p.data.classes.to_string());
    }
    Ok(about)
}

/// The classifier a diffusion training keeps for scoring its samples: its config, and its final
/// weights beside it.
pub const SCORER_CONFIG: &str = "scorer.json";
pub const SCORER_WEIGHTS: &str = "scorer.safetensors";

/// A diffusion training that `needs:` a classifier stage keeps that one classifier as the scorer
/// of the samples drawn from it later.
fn scorer_parent(parents: &[xlab_proto::ParentRef]) -> Result<Option<&xlab_proto::ParentRef>, Failure> {
    match parents {
        [] => Ok(None),
        [p] => {
            let cfg: JobConfig = serde_json::from_value(p.config.clone())
                .map_err(|e| Failure::new(FailureCause::Config, format!("parent {}: config: {e}", p.job_id)))?;
            match cfg.model {
                Some(m) if !m.is_diffusion() && cfg.diffusion.is_none() => Ok(Some(p)),
                _ => Err(Failure::new(
                    FailureCause::Config,
                    format!("a diffusion training's parent is the classifier that scores its samples; {} is not one", p.job_id),
                )),
            }
        }
        more => Err(Failure::new(
            FailureCause::Config,
            format!("a diffusion training keeps one classifier to score its samples; it has {} parents (use `select: best`)", more.len()),
        )),
    }
}

fn keep_scorer(p: &xlab_proto::ParentRef, run_dir: &Path) -> Result<(), Failure> {
    let fail = |m: String| Failure::new(FailureCause::Error, m);
    let weights = p.run_dir.join("weights.safetensors");
    let tmp = run_dir.join("scorer.tmp.safetensors");
    std::fs::copy(&weights, &tmp).map_err(|e| fail(format!("cannot copy {}: {e}", weights.display())))?;
    train::finish_atomic(&tmp, &run_dir.join(SCORER_WEIGHTS))?;
    let json = serde_json::json!({"job_id": p.job_id, "config": p.config});
    crate::checkpoint::write_atomic(&run_dir.join(SCORER_CONFIG), &serde_json::to_vec_pretty(&json).expect("json"))
        .map_err(|e| fail(format!("cannot write {SCORER_CONFIG}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlab_spec::config::{BetaSchedule, TimeMlp, Unet};

    fn diffusion(prediction: Prediction) -> Diffusion {
        Diffusion {
            schedule: BetaSchedule::Linear,
            timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            prediction,
            conditional: false,
            p_uncond: 0.0,
        }
    }

    #[test]
    fn noised_inputs_and_targets_follow_the_forward_process() {
        let d = diffusion(Prediction::V);
        let ac = Tensor::from_slice(&crate::sample::alphas_cumprod(&d.noise())).to_kind(Kind::Float);
        let x0 = Tensor::from_slice(&[0.5f32, -0.25, 1.0, 0.0]).reshape([2, 2]);
        let y = Tensor::from_slice(&[0i64, 1]);
        let idx = Tensor::from_slice(&[0i64, 1]);
        let nz = noised(&d, &ac, &x0, &y, &idx, 2, &mut stream(3, 7), None).unwrap();
        // Redraw the same stream by hand: t, then ε.
        let mut r = stream(3, 7);
        let t: Vec<i64> = (0..2).map(|_| r.gen_range(0..1000)).collect();
        let eps = Tensor::from_slice(&normals(&mut r, 4)).reshape([2, 2]);
        let ab = ac.index_select(0, &Tensor::from_slice(&t)).unsqueeze(1);
        let want_xt = ab.sqrt() * &x0 + (-&ab + 1.0).sqrt() * &eps;
        let want_v = ab.sqrt() * &eps - (-&ab + 1.0).sqrt() * &x0;
        assert!(nz.x_t.allclose(&want_xt, 1e-6, 1e-6, false));
        assert!(nz.target.allclose(&want_v, 1e-6, 1e-6, false));
        assert_eq!(Vec::<f32>::try_from(&nz.t).unwrap(), t.iter().map(|&v| v as f32).collect::<Vec<_>>());
    }

    #[test]
    fn label_dropout_uses_the_null_label_at_its_rate() {
        let mut d = diffusion(Prediction::Epsilon);
        d.conditional = true;
        d.p_uncond = 0.25;
        let ac = Tensor::ones([1000], (Kind::Float, Device::Cpu)) * 0.5;
        let n = 4000;
        let x0 = Tensor::zeros([n, 1], (Kind::Float, Device::Cpu));
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
        let nz = noised(&d, &ac, &x0, &y, &y, 3, &mut stream(1, 1), None).unwrap();
        let labels = nz.labels.unwrap();
        let null = f64::try_from(labels.eq(3).to_kind(Kind::Double).mean(Kind::Double)).unwrap();
        assert!((null - 0.25).abs() < 0.03, "{null}");
        let kept = labels.ne(3);
        assert!(bool::try_from(labels.masked_select(&kept).eq_tensor(&y.masked_select(&kept)).all()).unwrap());
    }

    #[test]
    fn networks_keep_the_input_shape() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mlp = ModelConfig::TimeMlp(TimeMlp { hidden: vec![16, 16], time_dim: 8 });
        let net = DiffusionNet::build(&vs.root(), &mlp, 2, None, Some(3)).unwrap();
        let x = Tensor::randn([5, 2], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[0.0f32, 10.5, 999.0, 3.0, 4.0]);
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 0]);
        assert_eq!(net.forward(&x, &t, Some(&labels)).size(), vec![5, 2]);
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = ModelConfig::Unet(Unet { channels: vec![8, 16], time_dim: 8 });
        let net = DiffusionNet::build(&vs.root(), &unet, 64, Some([1, 8, 8]), None).unwrap();
        let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward(&x, &Tensor::from_slice(&[1.0f32, 2.0, 3.0]), None).size(), vec![3, 64]);
        // 28×28 (MNIST-sized) through three levels: 28 → 14 → 7 and back.
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = ModelConfig::Unet(Unet { channels: vec![8, 16, 16], time_dim: 8 });
        let net = DiffusionNet::build(&vs.root(), &unet, 784, Some([1, 28, 28]), Some(10)).unwrap();
        let x = Tensor::randn([2, 784], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[3i64, 10]);
        assert_eq!(net.forward(&x, &Tensor::from_slice(&[5.0f32, 500.0]), Some(&labels)).size(), vec![2, 784]);
    }
}
