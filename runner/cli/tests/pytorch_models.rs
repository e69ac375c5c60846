//! xlab's weights in PyTorch: `python/xlab_torch.py` builds every built-in model, loads the
//! weights a training wrote with `strict=True`, and its outputs equal xlab's (`xlab-worker
//! forward`) on the same inputs. Every norm of the classifiers, a conditional and an
//! unconditional denoiser, raw and averaged weights.

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
    // 11 trainings, two of which keep a weights average too.
    let want: std::collections::BTreeMap<String, usize> =
        [("mlp", 4), ("cnn", 3), ("resnet18", 1), ("wrn", 1), ("time_mlp", 2), ("unet", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(models, want, "{got}");
}
