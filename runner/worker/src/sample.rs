//! The `sample` task: a sampler component draws samples from a denoiser, and the samples are
//! scored against the data.

use crate::data;
use crate::events::Emitter;
use crate::train::{save_atomically_tensors, Components, Failure};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn;
use tch::{Device, Kind, Tensor};
use xlab_proto::FailureCause;
use xlab_spec::config::{BetaSchedule, DenoiserConfig, ExactDenoiser, JobConfig, Prediction};

/// ᾱ_t for t = 0..T−1 in float64 (METHODS.md 3.1). diffusers builds the linear schedules in
/// float32; computing in float64 differs by about 1e-6 relative.
pub fn alphas_cumprod(d: &ExactDenoiser) -> Vec<f64> {
    let t = d.timesteps as usize;
    let lin = |a: f64, b: f64, i: usize| if t == 1 { a } else { a + (b - a) * i as f64 / (t - 1) as f64 };
    let betas: Vec<f64> = match d.schedule {
        BetaSchedule::Linear => (0..t).map(|i| lin(d.beta_start, d.beta_end, i)).collect(),
        BetaSchedule::ScaledLinear => (0..t).map(|i| lin(d.beta_start.sqrt(), d.beta_end.sqrt(), i).powi(2)).collect(),
        BetaSchedule::SquaredcosCapV2 => {
            let f = |u: f64| ((u + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
            (0..t).map(|i| (1.0 - f((i + 1) as f64 / t as f64) / f(i as f64 / t as f64)).min(0.999)).collect()
        }
    };
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// The exact ε̂ for the empirical distribution of `x0` (rows) under ᾱ.
pub fn exact_eps(x: &Tensor, x0: &Tensor, alpha_bar: f64) -> Tensor {
    let sa = alpha_bar.sqrt();
    let var = 1.0 - alpha_bar;
    // −‖x − √ᾱ xᵢ‖² / (2(1−ᾱ)) for every sample (rows of x) and training point i.
    let d2 = (x.unsqueeze(1) - x0.unsqueeze(0) * sa).square().sum_dim_intlist(-1, false, Kind::Double);
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
struct TrainedModel {
    net: crate::diffusion::DiffusionNet,
    /// The classifier kept by the training job, to score the samples in the data's own units.
    scorer: Option<(crate::model::Model, nn::VarStore)>,
    scale: crate::diffusion::Scale,
    prediction: Prediction,
    /// The label of each sample (class i mod K), when the model is conditional.
    labels: Option<Tensor>,
    null_label: i64,
    /// Keeps the network's variables alive.
    _vs: nn::VarStore,
}

/// Evaluation counts of one sampling run.
#[derive(Default)]
struct Evals {
    /// Network passes over the whole batch: conditional and unconditional.
    passes: u64,
    /// Denoiser calls whose unconditional pass the guidance found unneeded.
    skipped_uncond: u64,
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
    // The training points (for the exact denoiser and the closed-form samplers), the held-out
    // points the samples are scored against, and the schedule: all in the model's [-1, 1] space.
    let (x0, held_out, ac, model) = match denoiser {
        DenoiserConfig::Exact(den) => {
            // Per feature for vectors, one range over all pixels for images (as training does).
            let scale = crate::diffusion::Scale::fit(&data.train.x, data.image.is_some());
            (scale.apply(&data.train.x), scale.apply(&data.test.x), alphas_cumprod(den), None)
        }
        DenoiserConfig::Trained(_) => {
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
            let p = crate::diffusion::prepare(&pcfg, &d)?;
            let mut vs = nn::VarStore::new(device);
            let net = crate::diffusion::network(&vs, &pcfg, &d, &p.data)?;
            let weights = parent.run_dir.join("weights.safetensors");
            vs.load(&weights).map_err(|e| {
                Failure::new(
                    FailureCause::Error,
                    format!("cannot load {} into the parent's model: {e}", weights.display()),
                )
            })?;
            let classes = p.data.classes as i64;
            let labels =
                net.is_conditional().then(|| Tensor::arange(i64::from(n), (Kind::Int64, device)).remainder(classes));
            let x0 = p.scale.apply(&p.data.train.x);
            let held_out = p.scale.apply(&data.test.x);
            let scorer = load_scorer(&parent.run_dir, &p.data, device)?;
            let model = TrainedModel {
                net,
                scorer,
                scale: p.scale,
                prediction: d.prediction,
                labels,
                null_label: classes,
                _vs: vs,
            };
            (x0, held_out, p.alphas, Some(model))
        }
    };
    if comps.guidance.is_some() && model.as_ref().is_none_or(|m| m.labels.is_none()) {
        return Err(Failure::new(
            FailureCause::Config,
            "`guidance` needs a class-conditional trained model (`diffusion: {conditional: true}` in the parent)",
        ));
    }
    let x0 = x0.to_device(device);
    let ac_t = Tensor::from_slice(&ac).to_device(device);
    let dim = x0.size()[1];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise: Vec<f64> = (0..n as usize * dim as usize).map(|_| data::normal(&mut rng)).collect();
    let noise = Tensor::from_slice(&noise).reshape([n as i64, dim]).to_device(device);
    let mut plugin_rng = ChaCha8Rng::seed_from_u64(seed);
    plugin_rng.set_stream(u64::MAX);
    let t_max = ac.len() as f64 - 1.0;
    let mut evals = Evals::default();
    let mut need_uncond = true;
    if let Some(g) = comps.guidance.as_mut() {
        g.setup(&xlab_plugin_api::RunInfo {
            num_classes: model.as_ref().map_or(0, |m| m.null_label),
            n_train: x0.size()[0] as u64,
            seed,
            parents: parents.to_vec(),
            image: data.image,
            ..Default::default()
        })
        .map_err(|m| Failure::new(FailureCause::Error, m))?;
    }
    let Components { sampler, guidance, .. } = comps;
    let sampler =
        sampler.as_mut().ok_or_else(|| Failure::new(FailureCause::Config, "`task: sample` needs a `sampler`"))?;
    let mut eps = |x: &Tensor, t: f64| -> Result<Tensor, String> {
        if !(0.0..=t_max).contains(&t) {
            return Err(format!("timestep {t} is outside 0..={t_max}"));
        }
        let a = alpha_at(&ac, t);
        let Some(m) = &model else {
            return Ok(exact_eps(&x.to_kind(Kind::Double), &x0, a));
        };
        let b = x.size()[0];
        let xf = x.to_kind(Kind::Float);
        // The network's prediction as ε: v = √ᾱ ε − √(1−ᾱ) x₀ gives ε = √ᾱ v + √(1−ᾱ) x_t.
        let as_eps = |p: Tensor, xt: &Tensor| match m.prediction {
            Prediction::Epsilon => p,
            Prediction::V => p * a.sqrt() + xt * (1.0 - a).sqrt(),
        };
        let run = |xs: &Tensor, labels: Option<&Tensor>| {
            let ts = Tensor::full([xs.size()[0]], t, (Kind::Float, xs.device()));
            tch::no_grad(|| m.net.forward(xs, &ts, labels))
        };
        let out = match (guidance.as_mut(), &m.labels) {
            (Some(g), Some(labels)) => {
                let (cond, uncond) = if need_uncond {
                    // One batched pass of 2B rows: with the labels, then with the null label.
                    let both = run(
                        &Tensor::cat(&[&xf, &xf], 0),
                        Some(&Tensor::cat(&[labels.shallow_clone(), labels.full_like(m.null_label)], 0)),
                    );
                    evals.passes += 2;
                    let both = as_eps(both, &Tensor::cat(&[&xf, &xf], 0));
                    (both.narrow(0, 0, b), Some(both.narrow(0, b, b)))
                } else {
                    evals.passes += 1;
                    evals.skipped_uncond += 1;
                    (as_eps(run(&xf, Some(labels)), &xf), None)
                };
                let (e, next) = g.guide(&cond, uncond.as_ref())?;
                need_uncond = next;
                e
            }
            (_, labels) => {
                evals.passes += 1;
                as_eps(run(&xf, labels.as_ref()), &xf)
            }
        };
        Ok(out.to_kind(x.kind()))
    };
    let started = std::time::Instant::now();
    let mut evaluations = 0u64;
    let mut watched = |x: &Tensor, t: f64| {
        crate::watch::evaluation_begins(evaluations);
        evaluations += 1;
        eps(x, t)
    };
    crate::watch::evaluation_begins(0);
    let sampled =
        sampler.sample(&noise, &mut watched, &ac_t, Some(&x0), &mut || rand::RngCore::next_u64(&mut plugin_rng));
    crate::watch::step_ends();
    let (samples, nfe) = sampled.map_err(|m| Failure::new(FailureCause::Error, m))?;
    let samples = samples.to_kind(Kind::Double);
    // Bringing one value to the host waits for the device to finish the samples.
    let _ = f64::try_from(samples.sum(Kind::Double))?;
    let sample_s = started.elapsed().as_secs_f64();
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
    let d = (samples.unsqueeze(1) - x0.unsqueeze(0)).square().sum_dim_intlist(-1, false, Kind::Double).sqrt();
    let nn = d.amin(1, false);
    let mut values = BTreeMap::new();
    values.insert("sample.nfe".to_string(), nfe as f64);
    values.insert("time.sample_s".to_string(), sample_s);
    values.insert("time.nfe_per_s".to_string(), nfe as f64 / sample_s);
    if model.is_some() {
        values.insert("sample.model_passes".to_string(), evals.passes as f64);
        if guidance.is_some() {
            values.insert("sample.uncond_skipped".to_string(), evals.skipped_uncond as f64);
        }
    }
    values.insert("sample.nn_dist".to_string(), f64::try_from(nn.mean(Kind::Double))?);
    values.insert("sample.nn_dist_max".to_string(), f64::try_from(nn.max())?);
    let mean_gap = (samples.mean_dim(0, false, Kind::Double) - x0.mean_dim(0, false, Kind::Double)).norm();
    values.insert("sample.mean_gap".to_string(), f64::try_from(mean_gap)?);
    let held_out = held_out.to_device(device);
    values.insert("sample.swd".to_string(), crate::quality::sliced_wasserstein(&samples, &held_out, 128, 0)?);
    values.insert("sample.mmd".to_string(), crate::quality::mmd_rbf(&samples, &held_out)?);
    if let Some(m) = &model {
        if let Some((scorer, _)) = &m.scorer {
            // In the data's own units, as the classifier was trained.
            let own = m.scale.invert(&samples).to_kind(Kind::Float);
            let probs = tch::no_grad(|| scorer.forward_t(&own, false).softmax(-1, Kind::Double));
            let (conf, pred) = probs.max_dim(-1, false);
            values.insert("sample.class_confidence".to_string(), f64::try_from(conf.mean(Kind::Double))?);
            if let Some(labels) = &m.labels {
                let right = pred.eq_tensor(labels).to_kind(Kind::Double).mean(Kind::Double);
                values.insert("sample.class_acc".to_string(), f64::try_from(right)?);
            }
            let feats = |x: &Tensor| tch::no_grad(|| scorer.features(&x.to_kind(Kind::Float).to_device(device)));
            let fd = crate::quality::frechet(&feats(&own), &feats(&data.test.x))?;
            values.insert("sample.fd".to_string(), fd);
        }
    }
    out.metrics(1, values.clone());
    save_atomically_tensors(
        &run_dir.join("samples.safetensors"),
        &[("samples", &samples.to_kind(Kind::Float).to_device(Device::Cpu))],
    )?;
    out.artifact("samples", "samples.safetensors", "samples");
    if let Some(image) = data.image {
        crate::quality::write_grid_png(&run_dir.join("samples.png"), &samples.to_device(Device::Cpu), image, 8)?;
        out.artifact("samples_grid", "samples.png", "image");
    }
    Ok(values)
}

/// The classifier a diffusion training kept (`diffusion::SCORER_CONFIG`), built for the data.
fn load_scorer(
    run_dir: &Path,
    data: &data::Dataset,
    device: Device,
) -> Result<Option<(crate::model::Model, nn::VarStore)>, Failure> {
    let path = run_dir.join(crate::diffusion::SCORER_CONFIG);
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
    let weights = run_dir.join(crate::diffusion::SCORER_WEIGHTS);
    vs.load(&weights).map_err(|e| bad(format!("cannot load {} into it: {e}", weights.display())))?;
    Ok(Some((net, vs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn den(schedule: BetaSchedule) -> ExactDenoiser {
        ExactDenoiser { schedule, timesteps: 1000, beta_start: 1e-4, beta_end: 0.02 }
    }

    /// METHODS.md 3.1 (float64 values).
    #[test]
    fn schedules_match_the_known_values() {
        let a = alphas_cumprod(&den(BetaSchedule::Linear));
        assert!((a[0] - 0.9999).abs() < 1e-12);
        assert!((a[499] - 0.0785872429).abs() < 1e-9, "{}", a[499]);
        assert!((a[999] - 4.03582977e-5).abs() < 1e-12, "{}", a[999]);
        let c = alphas_cumprod(&den(BetaSchedule::SquaredcosCapV2));
        assert!((1.0 - c[0] - 4.1284225e-5).abs() < 1e-12, "{}", 1.0 - c[0]);
        assert!((c[499] - 0.4938435904).abs() < 1e-9, "{}", c[499]);
        assert!((c[999] - 2.4287669e-9).abs() < 1e-15, "{}", c[999]);
    }

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
