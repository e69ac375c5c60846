//! The `invert` task: an inverting sampler (`diffusion.ddim_inverse`) maps held-out data rows
//! to the noise the denoiser would have drawn them from; with `reconstruct:` a forward sampler
//! maps those latents back, and the round trip's error is measured in the data's units.
//!
//! The rows are the data's test split (the first `samples` of them, or all), in the model's
//! [-1, 1] space as the denoiser was trained; a class-conditional model is asked for each row's
//! own label. Metrics: `invert.nfe`, the latents' mean, standard deviation, largest magnitude
//! and Kolmogorov–Smirnov distance from N(0, 1) over all their values (latents of data the
//! model fits are standard normal), and with `reconstruct:` `invert.recon_rmse` and
//! `invert.recon_max_abs` (data units) and `reconstruct.nfe`. `latents.safetensors` keeps the
//! rows, their latents and the reconstruction.

use crate::data;
use crate::events::Emitter;
use crate::files::save_atomically_tensors;
use crate::host::Components;
use crate::sample::{draw, load_denoiser, Denoising, DEFAULT_SAMPLE_BATCH};
use crate::Failure;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use xlab_plan::config::JobConfig;
use xlab_proto::FailureCause;

/// The largest gap between the empirical distribution of `values` and the standard normal's.
pub fn ks_to_standard_normal(values: &Tensor) -> Result<f64, Failure> {
    let (sorted, _) = values.to_kind(Kind::Double).reshape([-1]).sort(0, false);
    let n = sorted.size()[0];
    let cdf = ((&sorted / std::f64::consts::SQRT_2).erf() + 1.0) * 0.5;
    let steps = Tensor::arange(n, (Kind::Double, sorted.device()));
    let above = (&steps + 1.0) / n as f64 - &cdf;
    let below = &cdf - steps / n as f64;
    Ok(f64::try_from(above.max())?.max(f64::try_from(below.max())?))
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
    let Some(denoiser) = &cfg.denoiser else {
        return Err(Failure::new(FailureCause::Config, "`task: invert` needs `denoiser`"));
    };
    let data = data::build(&cfg.data).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let (x0, scale, ac, model) = load_denoiser(cfg, denoiser, &data, device, parents, out)?;
    let available = data.test.x.size()[0];
    let n = cfg.samples.map_or(available, |s| i64::from(s).min(available));
    if n == 0 {
        return Err(Failure::new(FailureCause::Config, "the data's test split has no rows to invert"));
    }
    let rows = data.test.x.narrow(0, 0, n).to_kind(Kind::Double).to_device(device);
    let start_rows = scale.apply(&rows);
    let labels = model.as_ref().filter(|m| m.conditional).map(|_| data.test.y.narrow(0, 0, n).to_device(device));
    let label_rows = |first: i64, b: i64| labels.as_ref().map(|l| l.narrow(0, first, b).to_kind(Kind::Int64));
    let x0 = x0.to_device(device);
    let den = Denoising { x0: &x0, ac: &ac, model: model.as_ref(), image: data.image, device, seed, negative: None };
    let batch = i64::from(cfg.sample_batch.unwrap_or(DEFAULT_SAMPLE_BATCH));
    let Components { sampler, reconstruct, .. } = comps;
    let sampler =
        sampler.as_mut().ok_or_else(|| Failure::new(FailureCause::Config, "`task: invert` needs a `sampler`"))?;
    let inverted = draw(
        n,
        batch,
        &den,
        sampler,
        Default::default(),
        &mut |first, b| Ok(start_rows.narrow(0, first, b)),
        &label_rows,
    )?;
    let latents = inverted.samples;
    let mut values = BTreeMap::new();
    values.insert("invert.rows".to_string(), n as f64);
    values.insert("invert.nfe".to_string(), inverted.nfe);
    values.insert("time.invert_s".to_string(), inverted.seconds);
    values.insert("invert.latent_mean".to_string(), f64::try_from(latents.mean(Kind::Double))?);
    values.insert("invert.latent_std".to_string(), f64::try_from(latents.std(true))?);
    values.insert("invert.latent_abs_max".to_string(), f64::try_from(latents.abs().max())?);
    values.insert("invert.latent_ks".to_string(), ks_to_standard_normal(&latents)?);
    let mut saved = vec![
        ("rows", rows.to_kind(Kind::Float).to_device(Device::Cpu)),
        ("latents", latents.to_kind(Kind::Float).to_device(Device::Cpu)),
    ];
    if let Some(back_sampler) = reconstruct.as_mut() {
        let back = draw(
            n,
            batch,
            &den,
            back_sampler,
            Default::default(),
            &mut |first, b| Ok(latents.narrow(0, first, b)),
            &label_rows,
        )?;
        let recon = scale.invert(&back.samples);
        let err = &recon - &rows;
        values.insert("reconstruct.nfe".to_string(), back.nfe);
        values.insert("time.reconstruct_s".to_string(), back.seconds);
        values.insert("invert.recon_rmse".to_string(), f64::try_from(err.square().mean(Kind::Double).sqrt())?);
        values.insert("invert.recon_max_abs".to_string(), f64::try_from(err.abs().max())?);
        saved.push(("reconstruction", recon.to_kind(Kind::Float).to_device(Device::Cpu)));
    }
    values.insert("sys.peak_rss_mb".to_string(), crate::peak_rss_mb());
    out.metrics(1, values.clone());
    let named: Vec<(&str, &Tensor)> = saved.iter().map(|(k, t)| (*k, t)).collect();
    save_atomically_tensors(&run_dir.join("latents.safetensors"), &named)?;
    out.artifact("latents", "latents.safetensors", "tensors");
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ks_distance_of_normal_quantiles_is_small_and_of_a_shift_is_large() {
        // The standard normal's quantiles at (i + ½)/n: a KS distance of exactly 1/(2n).
        let n = 200;
        let q: Vec<f64> = (0..n)
            .map(|i| {
                let p = (i as f64 + 0.5) / n as f64;
                // Φ⁻¹ by bisection on erf.
                let (mut lo, mut hi) = (-10.0f64, 10.0f64);
                for _ in 0..200 {
                    let mid = 0.5 * (lo + hi);
                    let c = f64::try_from(((Tensor::from(mid) / std::f64::consts::SQRT_2).erf() + 1.0) * 0.5).unwrap();
                    if c < p {
                        lo = mid
                    } else {
                        hi = mid
                    }
                }
                0.5 * (lo + hi)
            })
            .collect();
        let ks = ks_to_standard_normal(&Tensor::from_slice(&q)).unwrap();
        assert!((ks - 0.5 / n as f64).abs() < 1e-9, "{ks}");
        let shifted: Vec<f64> = q.iter().map(|v| v + 1.0).collect();
        assert!(ks_to_standard_normal(&Tensor::from_slice(&shifted)).unwrap() > 0.3);
    }
}
