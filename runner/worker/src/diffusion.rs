//! Diffusion models: the time-conditioned networks (`time_mlp`, `unet`), their training
//! (docs/methods.md §3.1, with DDPM-IP through a batch transform and label dropout for classifier-free
//! guidance) and the data scaling they share with sampling.

use crate::data::{self};
use crate::denoiser::{network, prepare, DiffusionNet, Prepared, SCORER_CONFIG, SCORER_WEIGHTS};
use crate::events::Emitter;
use crate::files::{self, CheckpointPlan};
use crate::host::Components;
use crate::optim::Optimizer;
use crate::Failure;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn;
use tch::{Device, Kind, Tensor};
use xlab_plan::config::{Diffusion, JobConfig, Precision, Prediction};
use xlab_plugin_api::RunInfo;
use xlab_proto::FailureCause;

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
    transform: Option<&mut xlab_plugin_host::Instance>,
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

/// The denoising loss of one batch, in float32: the network's prediction under the job's
/// autocast (`precision: bf16 | fp16`, as `torch.autocast` runs it), brought to float32, and its
/// mean squared error against the target, as a PyTorch loop computes
/// `F.mse_loss(model(x_t, t, y).float(), target)`.
pub fn denoising_loss(
    net: &DiffusionNet,
    x_t: &Tensor,
    t: &Tensor,
    labels: Option<&Tensor>,
    target: &Tensor,
) -> Result<Tensor, Failure> {
    let region = crate::amp::job_region(x_t.device()).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let pred = crate::amp::full(net.forward(x_t, t, labels));
    drop(region);
    Ok((pred - target).square().mean(Kind::Float))
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
    // Evaluation mode for a TorchScript denoiser's dropout, then back to training.
    net.set_train(false);
    let region = crate::amp::job_region(nz.x_t.device()).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let pred = tch::no_grad(|| crate::amp::full(net.forward(&nz.x_t, &nz.t, nz.labels.as_ref())));
    drop(region);
    net.set_train(true);
    Ok(f64::try_from((pred - nz.target).square().mean(Kind::Double))?)
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
    net.set_train(true);
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = Optimizer::new(opt_cfg, named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    if let Some(init) = &cfg.init {
        files::load_init(&named, &init.path)?;
    }
    let mut ema = cfg.ema.as_ref().map(|e| crate::ema::Average::new(e, &named));
    // `precision: fp16`: the dynamic loss scale, checkpointed with the run.
    let mut scaler =
        (cfg.precision == Precision::Fp16).then(|| crate::amp::Scaler::new(cfg.loss_scale.clone().unwrap_or_default()));
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
    if let Some(c) = ckpt.starting_point(run_dir, out)? {
        let mut r = unused_rng.clone();
        files::restore(&c, &named, &mut opt, comps, &mut r, ema.as_mut())?;
        if let (Some(sc), Some((scale, tracker))) = (scaler.as_mut(), c.meta.loss_scale) {
            sc.scale = scale;
            sc.growth_tracker = tracker;
        }
        ckpt.paused_at_resume(c.meta.epoch, c.meta.step_in_epoch, cfg.epochs)?;
        first_epoch = c.meta.epoch;
        global_step = c.meta.global_step;
        history = c.meta.metrics;
    }
    let mut summary = history.last().map(|(_, v)| v.clone()).unwrap_or_default();
    let mut last_checkpoint = std::time::Instant::now();
    // What the weights files say about themselves (the kept epochs' and the final ones).
    let about = weights_metadata(cfg, d, &p)?;
    for epoch in first_epoch..u64::from(cfg.epochs) {
        for c in comps.all() {
            c.on_epoch(epoch).map_err(|m| Failure::new(FailureCause::Error, m))?;
        }
        let order = if cfg.shuffle { data::epoch_order(n, seed, epoch) } else { (0..n as i64).collect() };
        let order_on_device = Tensor::from_slice(&order).to_device(device);
        let started = std::time::Instant::now();
        let mut loss_sum: Option<Tensor> = None;
        let mut skipped = 0u64;
        for (k, chunk) in order.chunks(bs).enumerate() {
            crate::watch::step_begins(epoch, global_step);
            let idx = order_on_device.narrow(0, (k * bs) as i64, chunk.len() as i64);
            let x0 = x_train.index_select(0, &idx);
            let y = y_train.index_select(0, &idx);
            let mut rng = stream(seed, (epoch << 32) | k as u64);
            let nz = noised(d, &ac, &x0, &y, &idx, classes, &mut rng, comps.batch_transform.as_mut())?;
            opt.zero_grad();
            let loss = denoising_loss(&net, &nz.x_t, &nz.t, nz.labels.as_ref(), &nz.target)?;
            // fp16: the scaled loss's gradients, unscaled; a step with a non-finite one is
            // skipped (the optimizer, the schedule's step count and the average stay put).
            let overflow = match &scaler {
                Some(sc) => {
                    (&loss * f64::from(sc.scale)).backward();
                    let grads: Vec<Tensor> = named.iter().map(|(_, t)| t.grad()).filter(Tensor::defined).collect();
                    sc.unscale(&grads)
                }
                None => {
                    loss.backward();
                    false
                }
            };
            if !overflow {
                if let Some(max) = cfg.clip_grad_norm {
                    let params: Vec<(Tensor, String, u32)> =
                        named.iter().map(|(n, t)| (t.shallow_clone(), n.clone(), 0)).collect();
                    crate::host::clip_grad_norm(&params, max);
                }
                opt.lr_factor = cfg.schedule.factor(base_lr, global_step, epoch, total_steps);
                opt.step().map_err(|m| Failure::new(FailureCause::Error, m))?;
                if let Some(a) = ema.as_mut() {
                    a.after_step(&named, opt.steps);
                }
            }
            if let Some(sc) = scaler.as_mut() {
                sc.update(overflow);
                skipped += u64::from(overflow);
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
        if let Some(sc) = &scaler {
            values.insert("amp.skipped".to_string(), skipped as f64 / steps_per_epoch as f64);
            values.insert("amp.loss_scale".to_string(), f64::from(sc.scale));
        }
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
        // Before the checkpoint: a checkpoint after this epoch means its kept weights exist.
        files::keep_epoch_weights(ckpt, epoch + 1, &vs, ema.as_ref(), run_dir, &about, out)?;
        ckpt.end_of_epoch(epoch + 1, cfg.epochs, &mut last_checkpoint, out, || {
            let mut meta = files::checkpoint_meta(ckpt, epoch + 1, global_step, &opt, &unused_rng, &history);
            meta.loss_scale = scaler.as_ref().map(|s| (s.scale, s.growth_tracker));
            files::save_checkpoint(run_dir, meta, &named, &opt, comps, Vec::new(), ema.as_ref())
        })?;
    }
    files::save_weights(&vs, ema.as_ref(), run_dir, &about, out)?;
    if let Some(p) = scorer {
        keep_scorer(p, run_dir)?;
        out.artifact("scorer", SCORER_CONFIG, "scorer");
    }
    Ok(summary)
}

/// What a diffusion model's weights need to be used outside xlab, as safetensors metadata
/// (JSON strings): besides [`files::model_metadata`], the diffusion config (schedule,
/// timesteps, β range, prediction type, conditioning), the data scaling
/// x ↦ 2(x − lo)/(hi − lo) − 1 and the null label's index (the class count).
fn weights_metadata(cfg: &JobConfig, d: &Diffusion, p: &Prepared) -> Result<BTreeMap<String, String>, Failure> {
    let values = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1]));
    let mut about = files::model_metadata(cfg, &p.data);
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
    files::finish_atomic(&tmp, &run_dir.join(SCORER_WEIGHTS))?;
    let json = serde_json::json!({"job_id": p.job_id, "config": p.config});
    crate::checkpoint::write_atomic(&run_dir.join(SCORER_CONFIG), &serde_json::to_vec_pretty(&json).expect("json"))
        .map_err(|e| fail(format!("cannot write {SCORER_CONFIG}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::{alphas_cumprod, DiffusionNet};
    use xlab_plan::config::{BetaSchedule, ModelConfig, TimeMlp, Unet};

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
        let ac = Tensor::from_slice(&alphas_cumprod(&d.noise())).to_kind(Kind::Float);
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
        let unet = ModelConfig::Unet(Unet { channels: vec![8, 16], time_dim: 8, cross_attention: None });
        let net = DiffusionNet::build(&vs.root(), &unet, 64, Some([1, 8, 8]), None).unwrap();
        let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward(&x, &Tensor::from_slice(&[1.0f32, 2.0, 3.0]), None).size(), vec![3, 64]);
        // 28×28 (MNIST-sized) through three levels: 28 → 14 → 7 and back.
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = ModelConfig::Unet(Unet { channels: vec![8, 16, 16], time_dim: 8, cross_attention: None });
        let net = DiffusionNet::build(&vs.root(), &unet, 784, Some([1, 28, 28]), Some(10)).unwrap();
        let x = Tensor::randn([2, 784], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[3i64, 10]);
        assert_eq!(net.forward(&x, &Tensor::from_slice(&[5.0f32, 500.0]), Some(&labels)).size(), vec![2, 784]);
    }
}
