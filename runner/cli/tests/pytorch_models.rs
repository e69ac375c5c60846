//! xlab's weights in PyTorch: `python/xlab_torch.py` builds every built-in model, loads the
//! weights a training wrote with `strict=True`, and its outputs equal xlab's (`xlab-worker
//! forward`) on the same inputs. Every norm of the classifiers, a conditional and an
//! unconditional denoiser, raw and averaged weights. And mixed precision: one training step of
//! each denoiser under `torch.autocast` (bf16, fp16) gives xlab's prediction, loss and
//! gradients.

mod common;
use common::*;

const MODELS: &str = r#"
name: models
defaults:
  task: train
  epochs: 1
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  data: {name: two_moons, n_train: 128, n_val: 0, n_test: 64}
stages:
  mlp:
    model: {name: mlp, hidden: [16, 8], norm: batch}
    ema: {decay: 0.9}
  mlp_layer:
    model: {name: mlp, hidden: [8], norm: layer, activation: gelu}
  mlp_group:
    model: {name: mlp, hidden: [12], norm: group, activation: tanh}
  cnn:
    data: {name: digits, n_val: 0, n_test: 1700}
    model: {name: cnn, channels: [4, 8], norm: batch}
  cnn_layer:
    data: {name: digits, n_val: 0, n_test: 1700}
    model: {name: cnn, channels: [6], norm: layer}
  cnn_group:
    data: {name: digits, n_val: 0, n_test: 1700}
    model: {name: cnn, channels: [6], norm: group}
  resnet18:
    data: {name: digits, n_val: 0, n_test: 1740}
    model: {name: resnet18}
  wrn:
    data: {name: digits, n_val: 0, n_test: 1700}
    model: {name: wrn, depth: 10, width: 2}
  time_mlp:
    model: {name: time_mlp, hidden: [32, 32], time_dim: 16}
    diffusion: {timesteps: 100, conditional: true}
    optimizer: {name: adam, lr: 0.003}
  time_mlp_plain:
    model: {name: time_mlp, hidden: [16], time_dim: 8}
    diffusion: {timesteps: 50}
    optimizer: {name: adam, lr: 0.003}
  unet:
    data: {name: digits, n_val: 0, n_test: 1500}
    model: {name: unet, channels: [8, 16], time_dim: 16}
    diffusion: {timesteps: 100, conditional: true}
    optimizer: {name: adam, lr: 0.002}
    ema: {decay: 0.9}
  unet_cross:
    data: {name: digits, n_val: 0, n_test: 1500}
    model: {name: unet, channels: [8, 16], time_dim: 16, cross_attention: {tokens: 3, heads: 2}}
    diffusion: {timesteps: 100, conditional: true, p_uncond: 0.2}
    optimizer: {name: adam, lr: 0.002}
"#;

#[test]
fn every_built_in_model_loads_in_pytorch_and_computes_what_xlab_computes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = write_file(dir.path(), "models.yaml", MODELS);
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut weights: Vec<String> = files_under(&store.join("runs"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && !p.to_string_lossy().contains("ckpt"))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("weights")))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    weights.sort();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pytorch_models.py");
    let worker = xlab().with_file_name("xlab-worker");
    let out = std::process::Command::new(python()).arg(&script).arg(&worker).args(&weights).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&got).unwrap());
    let mut models = std::collections::BTreeMap::new();
    for (path, r) in got.as_object().unwrap() {
        let (diff, scale) = (r["max_abs_diff"].as_f64().unwrap(), r["scale"].as_f64().unwrap());
        assert!(scale > 0.0 && diff <= 1e-5 * scale.max(1.0), "{path}: {r}");
        *models.entry(r["model"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    // 12 trainings, two of which keep a weights average too.
    let want: std::collections::BTreeMap<String, usize> =
        [("mlp", 4), ("cnn", 3), ("resnet18", 1), ("wrn", 1), ("time_mlp", 2), ("unet", 3)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(models, want, "{got}");
}

const CROSS: &str = r#"
name: cross
stages:
  unet:
    task: train
    epochs: 2
    data: {name: digits, n_val: 0, n_test: 200}
    model: {name: unet, channels: [8, 16], time_dim: 16, cross_attention: {tokens: 4, heads: 2}}
    diffusion: {timesteps: 100, conditional: true, p_uncond: 0.2}
    optimizer: {name: adam, lr: 0.003}
"#;

/// Normalized Attention Guidance (docs/methods.md §3.11) in xlab's UNet with cross-attention,
/// through the real `diffusion.nag` plugin, against the PyTorch transcription of the reference
/// processor on the same weights (`strict=True`) and fixed inputs, to 1e-6: in the 2B context
/// layout (no CFG) and the 3B one (CFG, only the cond rows guided), at two parameter sets, and
/// outside the guidance's time window (the plain prediction).
#[test]
fn nag_equals_the_pytorch_transcription_of_the_reference_processor() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = write_file(dir.path(), "cross.yaml", CROSS);
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let weights = files_under(&store.join("runs"))
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "weights.safetensors"))
        .expect("the training's weights");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pytorch_nag.py");
    let worker = xlab().with_file_name("xlab-worker");
    let out = std::process::Command::new(python()).arg(&script).arg(&worker).arg(&weights).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&got).unwrap());
    for (case, r) in got.as_object().unwrap() {
        let f = |k: &str| r[k].as_f64().unwrap();
        for k in ["diff_2b", "diff_3b_cond", "diff_3b_uncond", "diff_plain"] {
            assert!(f(k) <= 1e-6, "{case}: {k} = {} (of outputs up to {})", f(k), f("scale"));
        }
        // One pass of [cond; uncond] guides the cond rows as a pass of the cond rows alone does.
        assert!(f("cond_rows_3b_vs_2b") <= 1e-6, "{case}: {r}");
        if r["inside_window"].as_bool().unwrap() {
            assert!(f("nag_effect") > 1e-3, "{case}: the guidance changed nothing: {r}");
        } else {
            assert_eq!(f("nag_effect"), 0.0, "{case}: outside its window the guidance acted: {r}");
        }
    }
    assert_eq!(got.as_object().unwrap().len(), 3);
}

const MIXED: &str = r#"
name: mixed
defaults:
  task: train
  epochs: 2
  optimizer: {name: adam, lr: 0.003}
  data: {name: two_moons, n_train: 256, n_val: 64, n_test: 256}
stages:
  time_mlp:
    model: {name: time_mlp, hidden: [32, 32], time_dim: 16}
    diffusion: {timesteps: 100, conditional: true, p_uncond: 0.2}
    precision: bf16
  unet:
    data: {name: digits, n_val: 0, n_test: 100}
    model: {name: unet, channels: [8, 16], time_dim: 16}
    diffusion: {timesteps: 100, conditional: true}
    precision: fp16
    loss_scale: {init: 65536, growth_interval: 4}
  sample:
    needs: time_mlp
    task: sample
    model: null
    optimizer: null
    denoiser: {name: trained}
    samples: 256
    sampler: {use: diffusion.ddim, steps: 20}
    grid: {precision: [fp32, bf16]}
"#;

/// Mixed-precision diffusion: a bf16 time_mlp and an fp16 UNet (with loss scaling) train, and a
/// sample job runs its network under autocast. One training step of each, under
/// `torch.autocast("cpu", dtype)` on the same weights and inputs, gives xlab's prediction, loss
/// and every gradient (measured: bit for bit), while the half-precision prediction is visibly
/// not fp32's.
#[test]
fn mixed_precision_denoisers_match_pytorch_autocast() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = write_file(dir.path(), "mixed.yaml", MIXED);
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = cmd(&store)
        .args(["query", "-e", "mixed", "--format", "json", "-m", "amp.loss_scale,amp.skipped,train.loss,sample.swd"])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&rows.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let metric = |stage: &str, name: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r["stage"] == stage)
            .map(|r| r["metrics"][name]["mean"].as_f64().unwrap_or_else(|| panic!("{stage}: no {name}: {r}")))
            .collect()
    };
    assert!(metric("unet", "amp.loss_scale")[0] > 0.0 && metric("unet", "amp.skipped")[0] >= 0.0);
    assert!(metric("time_mlp", "train.loss")[0].is_finite());
    let swd = metric("sample", "sample.swd");
    assert_eq!(swd.len(), 2);
    assert!(swd[0] != swd[1] && (swd[0] - swd[1]).abs() < 0.05, "fp32 and bf16 sampling: {swd:?}");

    let mut weights: Vec<String> = files_under(&store.join("runs"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "weights.safetensors"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    weights.sort();
    assert_eq!(weights.len(), 2, "{weights:?}");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pytorch_autocast.py");
    let worker = xlab().with_file_name("xlab-worker");
    let out = std::process::Command::new(python()).arg(&script).arg(&worker).args(&weights).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&got).unwrap());
    for (path, r) in got.as_object().unwrap() {
        for precision in ["fp32", "bf16", "fp16"] {
            for what in ["out", "loss", "grad"] {
                let d = r[precision][what].as_f64().unwrap();
                assert!(d <= 1e-6, "{path} {precision}: {what} differs from PyTorch's by {d:e} (relative)");
            }
        }
        for precision in ["bf16", "fp16"] {
            let apart = r[precision]["from_fp32"].as_f64().unwrap();
            assert!(apart > 1e-4, "{path}: the {precision} prediction is within {apart:e} of fp32's: no autocast?");
        }
    }
}
