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
        query(&store, "mixture", "sample.swd,sample.raw.swd,sample.out_of_range,sample.raw.abs_max,sample.mmd,sample.nfe,sample.model_passes,sample.uncond_skipped,val.loss");
    let stage = |s: &str| rows.iter().filter(|r| r["stage"] == s).collect::<Vec<_>>();
    for r in stage("train") {
        assert!(metric(r, "val.loss") < 0.9, "the denoising loss went down: {r}");
    }
    // Samples of every trained variant land near the held-out mixture, in the data's units:
    // within a few blob widths (0.5) of it, with centres drawn in [-10, 10]².
    for r in stage("sample") {
        assert!(metric(r, "sample.swd") < 2.0, "{r}");
        assert_eq!(metric(r, "sample.nfe"), 20.0);
        assert_eq!(metric(r, "sample.model_passes"), 20.0, "unguided: one pass per step");
        // Unclipped DDIM leaves some values outside the training data's range: the delivered
        // samples are clamped to it, and the raw values keep their own figures.
        let outside = metric(r, "sample.out_of_range");
        assert!((0.0..=1.0).contains(&outside), "{r}");
        let abs_max = metric(r, "sample.raw.abs_max");
        assert_eq!(outside > 0.0, abs_max > 1.0, "{r}");
        if outside > 0.0 {
            assert_ne!(metric(r, "sample.swd"), metric(r, "sample.raw.swd"), "{r}");
        }
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
        assert!(metric(r, "sample.swd") < 4.0, "{r}");
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
    assert!(metric(cf[0], "sample.swd") < 2.0, "{}", cf[0]);
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
    // The grid is in the job's run folder: 20 samples of 8×8 zoomed to 32 px, 8 a row, each
    // with a 12 px strip for its label.
    let png =
        files_under(&store).into_iter().find(|p| p.ends_with("samples.png")).unwrap_or_else(|| panic!("{rows} {id:?}"));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) =
        (u32::from_be_bytes(bytes[16..20].try_into().unwrap()), u32::from_be_bytes(bytes[20..24].try_into().unwrap()));
    assert_eq!((w, h), (8 * 34 + 2, 3 * (32 + 12 + 2) + 2));
    assert!(files_under(&store).iter().any(|p| p.ends_with("scorer.safetensors")), "the training kept its classifier");
    // The conditional UNet's weights name its null label and image shape in their metadata
    // (the classifier's weights name their classes).
    let metas: Vec<serde_json::Value> = files_under(&store)
        .into_iter()
        .filter(|p| p.ends_with("weights.safetensors"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
            header["__metadata__"].clone()
        })
        .collect();
    assert_eq!(metas.len(), 2, "{metas:?}");
    let unet = metas.iter().find(|m| m.get("xlab.diffusion").is_some()).expect("the diffusion weights");
    assert_eq!(
        (unet["xlab.null_label"].as_str(), unet["xlab.image"].as_str()),
        (Some("10"), Some("[1,8,8]")),
        "{unet}"
    );
    let clf = metas.iter().find(|m| m.get("xlab.diffusion").is_none()).expect("the classifier's weights");
    assert_eq!(clf["xlab.classes"].as_str(), Some("10"), "{clf}");
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
    assert!(err.contains("must be a diffusion model (`time_mlp`, `unet`, or a `torchscript` denoiser)"), "{err}");
    std::fs::write(
        &bad,
        "name: bad\nstages:\n  a:\n    task: sample\n    data: {name: two_moons}\n    denoiser: {name: exact}\n    samples: 4\n    sampler: {use: diffusion.ddim}\n    guidance: {use: diffusion.cfg}\n",
    )
    .unwrap();
    let out = cmd(&store).arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a class-conditional model"));
}

/// A sample stage that cannot work with the stage it samples from is refused when the file is
/// read, at its line, naming that stage; nothing runs.
#[test]
fn mistakes_across_stages_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let train = |diffusion: &str| {
        format!(
            "  train:\n    task: train\n    data: {{name: two_moons}}\n    model: {{name: time_mlp}}\n    \
             optimizer: {{name: adam}}\n    diffusion: {{timesteps: 100{diffusion}}}\n"
        )
    };
    let sample = |needs: &str, data: &str, steps: u32, extra: &str| {
        format!(
            "  s:\n    needs: {needs}\n    task: sample\n    data: {data}\n    denoiser: {{name: trained}}\n    \
             samples: 4\n    sampler: {{use: diffusion.ddim, steps: {steps}}}\n{extra}"
        )
    };
    let classifier =
        "  clf:\n    task: train\n    data: {name: two_moons}\n    model: {name: mlp}\n    optimizer: {name: adam}\n";
    let moons = "{name: two_moons}";
    let cases = [
        (
            format!("{classifier}{}", sample("clf", moons, 20, "")),
            "x.yaml:9:5: stages.s: `needs: clf` names a stage that trains no diffusion model",
        ),
        (
            format!("{}{}", train(""), sample("train", moons, 20, "    guidance: {use: diffusion.cfg}\n")),
            "x.yaml:16:5: stages.s: guidance needs a class-conditional model, and stage `train` trains without `conditional: true`",
        ),
        (
            format!(
                "{}{}",
                train(", conditional: true, p_uncond: 0"),
                sample("train", moons, 20, "    guidance: {use: diffusion.cfg}\n")
            ),
            "never trained the null label (`p_uncond: 0`)",
        ),
        (
            format!("{}{}", train(""), sample("train", moons, 200, "")),
            "x.yaml:15:36: stages.s: 200 steps is more than the 100 timesteps stage `train` trains with",
        ),
        (
            format!("{}{}", train(""), sample("train", "{name: blobs, dim: 3}", 20, "")),
            "x.yaml:12:5: stages.s: rows of 3 features, but stage `train` trains its model on rows of 2",
        ),
        (
            format!("{}{}", train(""), sample("train", moons, 20, "")).replace("{name: trained}", "{name: trained, weights: ema}"),
            "`weights: ema` takes the weights' average, and stage `train` trains without `ema:`",
        ),
        (
            "  s:\n    task: sample\n    data: {name: two_moons}\n    denoiser: {name: exact, timesteps: 50}\n    \
             samples: 4\n    sampler: {use: diffusion.euler, steps: 80}\n"
                .to_string(),
            "80 steps is more than the 50 timesteps of `denoiser`",
        ),
    ];
    let file = dir.path().join("x.yaml");
    for (stages, want) in cases {
        std::fs::write(&file, format!("name: x\nstages:\n{stages}")).unwrap();
        let out = cmd(&store).arg("run").arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stages}\n{err}");
        assert!(err.contains(want), "{stages}\nwanted: {want}\ngot: {err}");
        assert!(!store.join("runs").exists(), "nothing ran: {err}");
    }
    // The closed-form sampler's steps are not timesteps: 200 of them on a 100-step schedule run.
    std::fs::write(
        &file,
        "name: x\nstages:\n  s:\n    task: sample\n    data: {name: two_moons, n_train: 20}\n    \
         denoiser: {name: exact, timesteps: 100}\n    samples: 4\n    sampler: {use: diffusion.closed_form, steps: 200}\n",
    )
    .unwrap();
    let out = cmd(&store).arg("validate").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// What only the data files tell: a sample stage scoring against rows its parent trained on is
/// warned about; rows of another width are a config error naming both widths, not a crash.
#[test]
fn held_out_rows_the_parent_trained_on_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let (mut two, mut three) = (String::from("a,b,label\n"), String::from("a,b,c,label\n"));
    for i in 0..300 {
        let (x, y) = ((i as f64 * 0.37).sin(), (i as f64 * 0.11).cos());
        two += &format!("{x:.4},{y:.4},{}\n", i % 2);
        three += &format!("{x:.4},{y:.4},{:.4},{}\n", x * y, i % 2);
    }
    std::fs::write(dir.path().join("two.csv"), two).unwrap();
    std::fs::write(dir.path().join("three.csv"), three).unwrap();
    let file = dir.path().join("overlap.yaml");
    std::fs::write(
        &file,
        "name: overlap\nstages:\n  train:\n    task: train\n    data: {name: csv, path: two.csv, n_test: 30}\n    \
         model: {name: time_mlp, hidden: [16]}\n    optimizer: {name: adam}\n    diffusion: {timesteps: 50}\n    epochs: 1\n  \
         wider:\n    needs: train\n    task: sample\n    data: {name: csv, path: two.csv, n_test: 90}\n    \
         denoiser: {name: trained}\n    samples: 8\n    sampler: {use: diffusion.ddim, steps: 5}\n  \
         other:\n    needs: train\n    task: sample\n    data: {name: csv, path: three.csv, n_test: 30}\n    \
         denoiser: {name: trained}\n    samples: 8\n    sampler: {use: diffusion.ddim, steps: 5}\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // The parent trains on rows 0..270; `wider` scores against rows 210..300.
    assert!(err.contains("60 of the 90 held-out rows this job scores against are training rows"), "{err}");
    assert!(err.contains("rows of 3 features, but the parent's model was trained on rows of 2"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    let id = common::stage_job_ids(&store, &file, "wider")[0].clone();
    let shown = String::from_utf8_lossy(&cmd(&store).args(["show", &id]).output().unwrap().stdout).to_string();
    assert!(shown.contains("warning: 60 of the 90 held-out rows"), "{shown}");
}

/// A diffusion training with `ema:` writes the average beside its weights; its sample jobs draw
/// from the average by default and record it, and `weights: raw` takes the raw weights.
#[test]
fn sample_jobs_draw_from_the_weights_average_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ema.yaml");
    std::fs::write(
        &file,
        "name: ema\nstages:\n  train:\n    task: train\n    data: {name: two_moons, n_train: 400}\n    \
         model: {name: time_mlp, hidden: [32]}\n    optimizer: {name: adam, lr: 0.003}\n    \
         diffusion: {timesteps: 100}\n    ema: {decay: 0.99}\n    epochs: 3\n  \
         averaged:\n    needs: train\n    task: sample\n    data: {name: two_moons, n_train: 400}\n    \
         denoiser: {name: trained}\n    samples: 64\n    sampler: {use: diffusion.ddim, steps: 10}\n  \
         raw:\n    needs: train\n    task: sample\n    data: {name: two_moons, n_train: 400}\n    \
         denoiser: {name: trained, weights: raw}\n    samples: 64\n    sampler: {use: diffusion.ddim, steps: 10}\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let show = |stage: &str| -> serde_json::Value {
        let id = common::stage_job_ids(&store, &file, stage)[0].clone();
        serde_json::from_slice(&cmd(&store).args(["show", &id, "--json"]).output().unwrap().stdout).unwrap()
    };
    assert_eq!(show("averaged")["config"]["denoiser"], serde_json::json!({"name": "trained", "weights": "ema"}));
    assert_eq!(show("raw")["config"]["denoiser"], serde_json::json!({"name": "trained", "weights": "raw"}));
    let train = show("train");
    let artifacts = train["artifacts"].to_string();
    assert!(artifacts.contains("weights_ema.safetensors"), "{artifacts}");
    // Both weight files say, in their safetensors metadata, what the weights need outside
    // xlab: read back with the safetensors library itself.
    let run_dir = store.join("runs").join(train["id"].as_str().unwrap());
    for file in ["weights.safetensors", "weights_ema.safetensors"] {
        let out = std::process::Command::new(common::python())
            .arg("-c")
            .arg("import json, sys\nfrom safetensors import safe_open\nwith safe_open(sys.argv[1], 'pt') as f:\n    print(json.dumps(f.metadata()))")
            .arg(run_dir.join(file))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let field = |k: &str| -> serde_json::Value {
            serde_json::from_str(meta[k].as_str().unwrap_or_else(|| panic!("{file}: no {k} in {meta}"))).unwrap()
        };
        assert_eq!(field("xlab.model")["name"], "time_mlp", "{meta}");
        assert_eq!(field("xlab.diffusion")["timesteps"], 100, "{meta}");
        assert_eq!(field("xlab.diffusion")["prediction"], "epsilon", "{meta}");
        let scale = field("xlab.data_scale");
        assert_eq!(scale["lo"].as_array().unwrap().len(), 2, "per feature for vectors: {meta}");
        assert!(scale["lo"][0].as_f64().unwrap() < scale["hi"][0].as_f64().unwrap(), "{meta}");
        assert_eq!(field("xlab.classes"), 2, "{meta}");
        assert!(meta.get("xlab.null_label").is_none(), "an unconditional model has no null label: {meta}");
    }
    let rows = query(&store, "ema", "sample.swd,val.ema.loss,val.loss");
    let by_stage = |s: &str| rows.iter().find(|r| r["stage"] == s).unwrap();
    assert!(metric(by_stage("train"), "val.ema.loss").is_finite());
    assert_ne!(metric(by_stage("averaged"), "sample.swd"), metric(by_stage("raw"), "sample.swd"));
}

/// A training keeps its weights at chosen epochs (`checkpoint: {keep_weights: [...]}`, not part
/// of its identity) and a sample stage draws from them (`denoiser: {name: trained, epoch: N}`):
/// the same samples as from a training that stopped there. Asking for an epoch that is not
/// kept, or not trained, is refused at its line.
#[test]
fn sampling_from_the_weights_of_an_earlier_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("epochs.yaml");
    let text = |keep: &str, epoch: &str| {
        format!(
            "name: epochs\ndefaults:\n  data: {{name: two_moons, n_train: 256, n_val: 64, n_test: 128}}\n  deterministic: true\nstages:\n  \
             long:\n    task: train\n    model: {{name: time_mlp, hidden: [32]}}\n    diffusion: {{timesteps: 50}}\n    \
             optimizer: {{name: adam, lr: 0.003}}\n    ema: {{decay: 0.9}}\n    epochs: 3\n    checkpoint: {{keep_weights: [{keep}]}}\n  \
             short:\n    task: train\n    model: {{name: time_mlp, hidden: [32]}}\n    diffusion: {{timesteps: 50}}\n    \
             optimizer: {{name: adam, lr: 0.003}}\n    ema: {{decay: 0.9}}\n    epochs: 1\n  \
             early:\n    needs: long\n    task: sample\n    denoiser: {{name: trained, epoch: {epoch}}}\n    samples: 64\n    \
             sampler: {{use: diffusion.ddim, steps: 10}}\n  \
             stopped:\n    needs: short\n    task: sample\n    denoiser: {{name: trained}}\n    samples: 64\n    \
             sampler: {{use: diffusion.ddim, steps: 10}}\n  \
             last:\n    needs: long\n    task: sample\n    denoiser: {{name: trained}}\n    samples: 64\n    \
             sampler: {{use: diffusion.ddim, steps: 10}}\n"
        )
    };
    std::fs::write(&file, text("1", "1")).unwrap();
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(
        &cmd(&store).args(["query", "-m", "sample.swd,sample.mmd", "--format", "json"]).output().unwrap().stdout,
    )
    .unwrap();
    let of = |stage: &str| {
        let m = &rows.as_array().unwrap().iter().find(|r| r["stage"] == stage).unwrap()["metrics"];
        ["sample.swd", "sample.mmd", "sample.nn_dist", "sample.mean_gap"].map(|k| m[k]["mean"].as_f64().unwrap())
    };
    assert_eq!(of("early"), of("stopped"), "epoch 1 of a longer training samples as a training of 1 epoch");
    assert_ne!(of("early"), of("last"));
    let kept = files_under(&store.join("runs"));
    let names: Vec<String> =
        kept.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    for f in ["weights-epoch1.safetensors", "weights_ema-epoch1.safetensors"] {
        assert_eq!(names.iter().filter(|n| *n == f).count(), 1, "{names:?}");
    }
    // Keeping more epochs does not change the training's identity (`long` is not run again),
    // and epoch 2 was not kept when it ran: the sample job says so and how to get it.
    std::fs::write(&file, text("1, 2", "2")).unwrap();
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("1 done, 4 skipped (already done), 1 failed") || err.contains("4 skipped"), "{err}");
    let log = files_under(&store.join("runs"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "worker.log"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .find(|l| l.contains("kept no weights of epoch 2"))
        .unwrap_or_default();
    assert!(log.contains("--rerun 'id =="), "{err}");
    // Epochs not kept, or not trained, are refused before anything runs.
    for (keep, epoch, said) in [
        ("1", "2", "stage `long` keeps no weights of epoch 2"),
        ("1", "7", "epoch 7, but stage `long` trains epochs 1 to 3"),
    ] {
        std::fs::write(&file, text(keep, epoch)).unwrap();
        let out = cmd(&store).arg("validate").arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        // At the line of `denoiser:` in the file.
        assert!(err.contains(said) && err.contains("epochs.yaml:24:"), "{err}");
    }
    // Keeping weights of an epoch the stage does not train, or on a stage that trains no
    // diffusion model.
    std::fs::write(&file, text("9", "1")).unwrap();
    let out = cmd(&store).arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("epoch 9 in `checkpoint.keep_weights`, but the stage trains epochs 1 to 3"), "{err}");
    std::fs::write(
        &file,
        text("1", "1").replacen(
            "model: {name: time_mlp, hidden: [32]}\n    diffusion: {timesteps: 50}\n",
            "model: {name: mlp}\n",
            1,
        ),
    )
    .unwrap();
    let out = cmd(&store).arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`checkpoint.keep_weights` keeps a diffusion training's weights"), "{err}");
}
