//! Normalized Attention Guidance end to end: a class-conditional UNet with cross-attention on
//! the digits, scored by the classifier it keeps; unconditional samples (`labels: none`),
//! NAG away from a negative class, and CFG with the negative class as its unconditional
//! prediction. And the ways to wire NAG wrong, refused when the file is read, at their line.

use std::path::Path;

mod common;
use common::cmd;

const NAG: &str = r#"
name: nag
defaults:
  task: sample
  data: {name: digits}
  denoiser: {name: trained}
  samples: 300
  sampler: {use: diffusion.ddim, steps: 10}
stages:
  clf:
    task: train
    denoiser: null
    samples: null
    sampler: null
    model: {name: cnn, channels: [16, 32]}
    optimizer: {name: adam, lr: 0.003}
    batch_size: 64
    epochs: 10
  unet:
    needs: clf
    task: train
    denoiser: null
    samples: null
    sampler: null
    model: {name: unet, channels: [16, 32], cross_attention: {tokens: 4, heads: 2}}
    diffusion: {timesteps: 1000, conditional: true, p_uncond: 0.1}
    optimizer: {name: adam, lr: 0.003}
    batch_size: 64
    epochs: 12
  plain:
    needs: unet
    labels: none
  nag:
    needs: unet
    labels: none
    negative: 3
    attention: {use: diffusion.nag}
  cfg_negative:
    needs: unet
    labels: none
    negative: 3
    guidance: {use: diffusion.cfg, guidance_scale: 3}
"#;

#[test]
fn nag_steers_unconditional_samples_away_from_the_negative_class_in_one_pass_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nag.yaml");
    std::fs::write(&file, NAG).unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("5 done, 0 skipped"), "{err}");
    let out = cmd(&store)
        .args(["query", "-e", "nag", "--format", "json", "-m"])
        .arg("sample.class_share.3,sample.negative_share,sample.model_passes,sample.fd")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let get = |stage: &str, m: &str| -> Option<f64> {
        let r = rows.iter().find(|r| r["stage"] == stage).unwrap();
        r["metrics"][m]["mean"].as_f64()
    };
    let base = get("plain", "sample.class_share.3").unwrap();
    let nag = get("nag", "sample.negative_share").unwrap();
    eprintln!("class 3: unguided {base}, NAG {nag}, CFG {:?}", get("cfg_negative", "sample.negative_share"));
    // NAG acts inside the one pass of the conditional rows; CFG makes two per step.
    assert_eq!(get("nag", "sample.model_passes"), Some(10.0));
    assert_eq!(get("cfg_negative", "sample.model_passes"), Some(20.0));
    // The paper's direction: the negative class's share drops below its base rate.
    assert!(base > 0.03, "the unguided samples hardly hold class 3 ({base}); the check would say nothing");
    assert!(nag < base, "NAG away from class 3: {nag}, unguided {base}");
    assert_eq!(get("nag", "sample.class_share.3"), Some(nag));
    assert!(get("nag", "sample.fd").unwrap().is_finite());
}

fn refused(store: &Path, dir: &Path, stages: &str, want: &str, hint: &str) {
    let file = dir.join("x.yaml");
    std::fs::write(&file, format!("name: x\nstages:\n{stages}")).unwrap();
    let out = cmd(store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stages}\n{err}");
    assert!(err.contains(want), "{stages}\nwanted: {want}\ngot: {err}");
    assert!(err.contains(hint), "{stages}\nwanted hint: {hint}\ngot: {err}");
    assert!(!store.join("runs").exists(), "nothing ran: {err}");
}

#[test]
fn nag_wired_wrong_is_refused_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let train = |model: &str, d: &str| {
        format!(
            "  train:\n    task: train\n    data: {{name: digits}}\n    model: {{name: unet{model}}}\n    \
             optimizer: {{name: adam}}\n    diffusion: {{timesteps: 100{d}}}\n"
        )
    };
    let cross = ", cross_attention: {tokens: 4, heads: 2}";
    let cond = ", conditional: true, p_uncond: 0.1";
    let sample = |extra: &str| {
        format!(
            "  s:\n    needs: train\n    task: sample\n    data: {{name: digits}}\n    denoiser: {{name: trained}}\n    \
             samples: 4\n    sampler: {{use: diffusion.ddim, steps: 10}}\n{extra}"
        )
    };
    let nag = "    negative: 3\n    attention: {use: diffusion.nag}\n";
    let cases = [
        // NAG on a model without cross-attention would do nothing.
        (
            format!("{}{}", train("", cond), sample(nag)),
            "x.yaml:17:5: stages.s: `diffusion.nag` acts inside the model's cross-attention layers, and stage `train`'s model has none",
            "`cross_attention: {tokens: 4, heads: 2}`".replace("2}", "1}"),
        ),
        (
            format!("{}{}", train(cross, cond), sample("    negative: 12\n    attention: {use: diffusion.nag}\n")),
            "x.yaml:16:5: stages.s: `negative` names class 12, and stage `train`'s model knows classes 0 to 9",
            "name a class from 0 to 9".into(),
        ),
        (
            format!("{}{}", train(cross, cond), sample("    attention: {use: diffusion.nag}\n")),
            "x.yaml:16:5: stages.s: `attention` names `diffusion.nag`, which steers away from a negative condition, and this job names none",
            "add `negative: CLASS`".into(),
        ),
        (
            format!("{}{}", train(cross, cond), sample("    negative: 3\n")),
            "x.yaml:16:5: stages.s: `negative` is used by guidance (as the unconditional prediction) or an attention guidance",
            "attention: {use: diffusion.nag}".into(),
        ),
        (
            format!("{}{}", train(cross, cond), sample("    labels: [1, 10]\n")),
            "stages.s: `labels` names class 10, and stage `train`'s model knows classes 0 to 9",
            "name a class from 0 to 9".into(),
        ),
        (
            format!("{}{}", train(cross, ", conditional: true, p_uncond: 0"), sample("    labels: none\n")),
            "`labels: none` asks for the null label, and stage `train` never trained it (`p_uncond: 0`)",
            "train `train` with label dropout".into(),
        ),
        (
            train(", cross_attention: {tokens: 1}", cond),
            "x.yaml:6:43: stages.train: `model.cross_attention.tokens` is 1; over a single token the attention weights are constant",
            "use at least 2".into(),
        ),
        (
            train(cross, ""),
            "stages.train: `model.cross_attention` attends over the class's tokens, and this model is unconditional",
            "drop `cross_attention`".into(),
        ),
        (
            format!("{}{}", train(cross, cond), sample("    negative: 3\n    attention: {use: diffusion.cfg}\n")),
            "`diffusion.cfg` is a `guidance` component; the `attention` slot needs a `attention`",
            "use it under `guidance:`".into(),
        ),
    ];
    for (stages, want, hint) in cases {
        refused(&store, dir.path(), &stages, want, &hint);
    }
}
