//! The diffusion family end to end through real runs: a class-conditional time-conditioned MLP
//! trained on a 2-D mixture (ε and v prediction, DDPM-IP), then sampled by a later stage of the
//! same graph with and without guidance; the closed-form sampler on the training set; and a UNet
//! on the offline digits whose samples come back as a picture.

use std::path::Path;

mod common;
use common::{cmd, files_under};

fn query(store: &Path, experiment: &str, metrics: &str) -> Vec<serde_json::Value> {
    let out = cmd(store).args(["query", "-e", experiment, "--format", "json", "-m", metrics]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn metric(row: &serde_json::Value, name: &str) -> f64 {
    row["metrics"][name]["mean"].as_f64().unwrap_or_else(|| panic!("no {name}: {row}"))
}

const MIXTURE: &str = r#"
name: mixture
defaults:
  task: train
  data: {name: blobs, n_train: 1000, n_val: 200, n_test: 1000, classes: 4, dim: 2, spread: 0.5}
  optimizer: {name: adam, lr: 0.003}
  batch_size: 100
  model: {name: time_mlp, hidden: [64, 64]}
stages:
  train:
    epochs: 12
    diffusion: {timesteps: 500, conditional: true, p_uncond: 0.2}
    variants:
      - {}
      - diffusion: {prediction: v}
      - batch_transform: {use: diffusion.ddpm_ip, gamma: 0.1}
  sample:
    needs: train
    task: sample
    model: null
    optimizer: null
    denoiser: {name: trained}
    samples: 500
    sampler: {use: diffusion.ddim, steps: 20, clip_sample: false}
  guided:
    needs: {stage: train, select: best, metric: val.loss, mode: min}
    task: sample
    model: null
    optimizer: null
    denoiser: {name: trained}
    samples: 500
    sampler: {use: diffusion.ddim, steps: 20, clip_sample: false}
    variants:
      - guidance: {use: diffusion.cfg, guidance_scale: 1.5}
      - guidance: {use: diffusion.adaptive_guidance, guidance_scale: 1.5, threshold: 0.9}
  closed_form:
    task: sample
    model: null
    optimizer: null
    denoiser: {name: exact, timesteps: 500}
    samples: 500
    sampler: {use: diffusion.closed_form, steps: 50}
"#;

#[test]
fn a_trained_mixture_model_samples_close_to_held_out_data() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixture.yaml");
    std::fs::write(&file, MIXTURE).unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // 3 trainings, a sample of each, 2 guided samples of the best, 1 closed-form.
    assert!(err.contains("9 done, 0 skipped"), "{err}");

    let rows =
        query(&store, "mixture", "sample.swd,sample.mmd,sample.nfe,sample.model_passes,sample.uncond_skipped,val.loss");
    let stage = |s: &str| rows.iter().filter(|r| r["stage"] == s).collect::<Vec<_>>();
    for r in stage("train") {
        assert!(metric(r, "val.loss") < 0.9, "the denoising loss went down: {r}");
    }
    // Samples of every trained variant land near the held-out mixture: the data spans about
    // [-1, 1], so standard normal noise is around 0.5 away in SWD.
    for r in stage("sample") {
        assert!(metric(r, "sample.swd") < 0.2, "{r}");
        assert_eq!(metric(r, "sample.nfe"), 20.0);
        assert_eq!(metric(r, "sample.model_passes"), 20.0, "unguided: one pass per step");
    }
    let guided = stage("guided");
    let by_use = |u: &str| *guided.iter().find(|r| r["point"]["guidance.use"] == u).unwrap_or_else(|| panic!("{u}"));
    let (cfg, ada) = (by_use("diffusion.cfg"), by_use("diffusion.adaptive_guidance"));
    assert_eq!(metric(cfg, "sample.model_passes"), 40.0, "CFG: two passes per step");
    assert_eq!(metric(cfg, "sample.uncond_skipped"), 0.0);
    let skipped = metric(ada, "sample.uncond_skipped");
    assert!(skipped > 0.0, "adaptive guidance skipped no step: {ada}");
    assert_eq!(metric(ada, "sample.model_passes"), 40.0 - skipped);
    for r in [cfg, ada] {
        assert!(metric(r, "sample.swd") < 0.4, "{r}");
    }
    // Quality against NFE, one line per guidance variant: the x axis is another metric.
    let svg = dir.path().join("nfe.svg");
    let plot = cmd(&store)
        .args(["plot", "sample.swd", "-e", "mixture", "--x", "sample.model_passes", "--group-by", "stage", "-o"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(plot.status.success(), "{}", String::from_utf8_lossy(&plot.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains(">sample.model_passes<") && text.contains(">guided (n=1)<") && text.contains(">sample (n=3)<"),
        "{text}"
    );
    let cf = stage("closed_form");
    assert_eq!(metric(cf[0], "sample.nfe"), 49.0, "S − 1 score evaluations");
    assert!(metric(cf[0], "sample.swd") < 0.2, "{}", cf[0]);
}

#[test]
fn a_unet_on_digits_draws_a_grid_of_samples() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("digits.yaml");
    std::fs::write(
        &file,
        r#"
name: digits
stages:
  classifier:
    task: train
    data: {name: digits}
    model: {name: mlp, hidden: [32]}
    optimizer: {name: adam, lr: 0.01}
    epochs: 5
  train:
    needs: classifier
    task: train
    data: {name: digits}
    model: {name: unet, channels: [8, 16], time_dim: 16}
    diffusion: {timesteps: 200, conditional: true}
    optimizer: {name: adam, lr: 0.002}
    batch_size: 128
    epochs: 1
  sample:
    needs: train
    task: sample
    data: {name: digits}
    denoiser: {name: trained}
    samples: 20
    sampler: {use: diffusion.dpmpp_2m, steps: 5}
"#,
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let show = cmd(&store).args(["query", "-e", "digits", "stage == \"sample\"", "--format", "json"]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    // The classifier the training kept scores the samples: its accuracy on the labels asked
    // for, its confidence, and the Fréchet distance in its hidden features to the test images.
    let m = |k: &str| rows[0]["metrics"][k]["mean"].as_f64().unwrap_or_else(|| panic!("no {k}: {rows}"));
    assert!((0.0..=1.0).contains(&m("sample.class_acc")), "{rows}");
    assert!((0.1..=1.0).contains(&m("sample.class_confidence")), "{rows}");
    assert!(m("sample.fd") > 0.0, "{rows}");
    let id = rows[0]["jobs"].as_array().and_then(|j| j.first()).and_then(|j| j.as_str()).map(str::to_string);
    // The grid is in the job's run folder: 20 samples of 8×8 zoomed to 32 px, 8 a row.
    let png =
        files_under(&store).into_iter().find(|p| p.ends_with("samples.png")).unwrap_or_else(|| panic!("{rows} {id:?}"));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) =
        (u32::from_be_bytes(bytes[16..20].try_into().unwrap()), u32::from_be_bytes(bytes[20..24].try_into().unwrap()));
    assert_eq!((w, h), (8 * 34 + 2, 3 * 34 + 2));
    assert!(files_under(&store).iter().any(|p| p.ends_with("scorer.safetensors")), "the training kept its classifier");
    // A classifier model on a diffusion job, or guidance without a conditional model, is refused
    // before anything runs.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad\nstages:\n  a:\n    task: train\n    data: {name: digits}\n    model: {name: cnn}\n    diffusion: {}\n    optimizer: {name: adam}\n",
    )
    .unwrap();
    let out = cmd(&store).arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must be a diffusion model (`time_mlp` or `unet`)"), "{err}");
    std::fs::write(
        &bad,
        "name: bad\nstages:\n  a:\n    task: sample\n    data: {name: two_moons}\n    denoiser: {name: exact}\n    samples: 4\n    sampler: {use: diffusion.ddim}\n    guidance: {use: diffusion.cfg}\n",
    )
    .unwrap();
    let out = cmd(&store).arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a class-conditional model"));
}
