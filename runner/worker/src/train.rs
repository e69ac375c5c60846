//! The `train` task: the training loop. Mini-batches through the job's components, with
//! evaluation on the validation and test splits after every epoch, checkpoints inside and
//! between epochs, and resumption from the newest valid one.

use crate::data::{self};
use crate::epoch::{inside_epoch, EpochStats};
use crate::evaluate::{evaluate, single_class};
use crate::events::Emitter;
use crate::files::{
    announce_resume, checkpoint_meta, load_init, model_metadata, record_standardization, restore, save_checkpoint,
    save_weights, write_train_errors, CheckpointPlan,
};
use crate::host::{BatchModel, Components, Driver, Target, TrainOptions, DIVERGED};
use crate::model;
use crate::optim::Optimizer;
use crate::Failure;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn;
use tch::{Device, Kind, Tensor};
use xlab_plan::config::JobConfig;
use xlab_plugin_api::{RunInfo, Sampling};
use xlab_plugin_host::StepDriver;
use xlab_proto::FailureCause;

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
    let data = data::build_for(cfg.task, &cfg.data).map_err(|m| Failure::new(FailureCause::Error, m))?;
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

    let x_train = data::TrainX::new(&data, device);
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
    let mut scaler = (cfg.precision == xlab_plan::config::Precision::Fp16)
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
        announce_resume(out, &c, None);
        ckpt.paused_at_resume(c.meta.epoch, c.meta.step_in_epoch, cfg.epochs)?;
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
        // A streamed folder decodes the epoch's batches ahead of the steps.
        let mut ahead = data.train_stream.as_ref().map(|s| s.batches(&order, bs, done_before as usize));
        for (k, chunk) in order.chunks(bs).enumerate().skip(done_before as usize) {
            crate::watch::step_begins(epoch, global_step);
            let (at, len) = ((k * bs) as i64, chunk.len() as i64);
            let idx = order_on_device.narrow(0, at, len);
            let xb = match ahead.as_mut() {
                Some(a) => a.next_batch().map_err(|m| Failure::new(FailureCause::Error, m))?.to_device(device),
                None => x_train.rows(&idx).map_err(|m| Failure::new(FailureCause::Error, m))?,
            };
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
                    let model: Option<&mut dyn xlab_plugin_host::TransformModel> =
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
