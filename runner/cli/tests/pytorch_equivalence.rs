//! Exact reproduction: xlab trains from the same initial weights on the same rows in the same
//! order as a plain PyTorch loop (tests/reference/pytorch_loop.py, run with the project's torch)
//! and ends at the same weights to float tolerance. The data comes in as an `.npz` file and the
//! initial weights as safetensors with PyTorch's `state_dict` names, both written by the script.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn xlab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab"))
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("XLAB_PYTHON") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run `make setup`", p.display());
    p
}

/// The float32 tensors of a safetensors file, by name.
fn read_safetensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" || info["dtype"] != "F32" {
            continue;
        }
        let (a, b) =
            (info["data_offsets"][0].as_u64().unwrap() as usize, info["data_offsets"][1].as_u64().unwrap() as usize);
        out.insert(name.clone(), data[a..b].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect());
    }
    out
}

#[test]
fn training_matches_a_pytorch_loop_from_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    train_both(dir.path(), &Run::default());
}

/// A batch transform that asks the worker for the model's input gradient and keeps the clean
/// loss's parameter gradient (Co-Mixup's clean_lam) gets exactly that: the worker's update adds
/// the gradient of weight · CE of the clean batch, as the PyTorch loop does by hand. The
/// transform is the fixture plugin's `fixture.clean_loss`, which leaves the batch unmixed.
#[test]
fn a_kept_clean_loss_gradient_joins_the_update_as_in_pytorch() {
    let (plain, kept) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (without, _) = train_both(plain.path(), &Run::default());
    let (with, _) = train_both(kept.path(), &Run { clean: Some(0.7), ..Run::default() });
    let d = apart(&without, &with);
    assert!(d > 1e-3, "the clean loss moved the weights by at most {d:e}");
}

/// The worker's feature mixing (SelMix's path) trains exactly as a PyTorch loop that mixes the
/// hidden features by hand: `fixture.feature_mix` pairs each row with its mirror at μ = 0.7.
#[test]
fn feature_mixed_batches_train_as_in_pytorch() {
    let (plain, mixed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (without, _) = train_both(plain.path(), &Run::default());
    let (with, _) = train_both(mixed.path(), &Run { feature_mix: Some(0.7), ..Run::default() });
    let d = apart(&without, &with);
    assert!(d > 1e-3, "feature mixing moved the weights by at most {d:e}");
}

/// One side-by-side run: the precision, a clean-loss weight for `fixture.clean_loss`, an fp16
/// loss scale (initial scale, growth interval), and a μ for `fixture.feature_mix`.
struct Run {
    precision: &'static str,
    clean: Option<f64>,
    loss_scale: Option<(f64, u32)>,
    feature_mix: Option<f64>,
}

impl Default for Run {
    fn default() -> Self {
        Run { precision: "fp32", clean: None, loss_scale: None, feature_mix: None }
    }
}

/// `precision: bf16` runs the forward pass under libtorch's CPU autocast, as `torch.autocast("cpu",
/// dtype=torch.bfloat16)` does in the PyTorch loop, and ends at its weights; those differ from
/// the fp32 run's, so the autocast did take effect.
#[test]
fn bf16_training_matches_a_pytorch_autocast_loop() {
    let (d32, d16) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (fp32, _) = train_both(d32.path(), &Run::default());
    let (bf16, _) = train_both(d16.path(), &Run { precision: "bf16", ..Run::default() });
    assert!(apart(&fp32, &bf16) > 1e-3, "bf16 weights differ from fp32 ones by at most {:e}", apart(&fp32, &bf16));
}

/// `precision: fp16` runs the forward pass under CPU fp16 autocast with dynamic loss scaling and
/// matches `torch.amp.GradScaler("cpu")` in the documented loop (unscale, clip, step, update):
/// the same weights, the same steps skipped for overflowing gradients, the same final scale. The
/// initial scale of 2²⁴ overflows fp16 at first, so the scale backs off; a growth interval of 10
/// steps grows it again within the run.
#[test]
fn fp16_training_matches_a_pytorch_grad_scaler_loop() {
    let dir = tempfile::tempdir().unwrap();
    let (_, record) =
        train_both(dir.path(), &Run { precision: "fp16", loss_scale: Some((16777216.0, 10)), ..Run::default() });
    let (ours, torch) = (&record["xlab"], &record["torch"]);
    let skipped: Vec<f64> = torch["skipped"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(skipped[0] >= 2.0, "the first steps overflow at 2^24: {skipped:?}");
    // 13 steps an epoch (200 rows, 16 a batch); xlab reports the fraction of the epoch's steps.
    let frac: Vec<f64> =
        ours["metrics"]["amp.skipped"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert_eq!(frac, skipped.iter().map(|s| s / 13.0).collect::<Vec<_>>(), "skipped steps per epoch");
    let scale: Vec<f64> =
        ours["metrics"]["amp.loss_scale"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert_eq!(scale.last().copied(), torch["loss_scale"].as_f64(), "final loss scale");
}

/// The largest absolute difference between two sets of weights.
fn apart(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    a.iter().flat_map(|(n, x)| x.iter().zip(&b[n]).map(|(p, q)| (p - q).abs())).fold(0.0f32, f32::max)
}

/// Trains the same MLP with xlab and with the PyTorch loop as `run` says, checks that they end
/// at the same weights and losses, and returns xlab's final weights and both sides' records
/// (`{"xlab": the job as \`xlab show\` prints it, "torch": the loop's output}`).
fn train_both(dir: &Path, run: &Run) -> (BTreeMap<String, Vec<f32>>, serde_json::Value) {
    let (precision, clean) = (run.precision, run.clean);
    let request = serde_json::json!({
        "dir": dir, "seed": 3, "n_train": 200, "n_test": 50, "dim": 10, "classes": 3, "hidden": 32,
        "epochs": 3, "batch_size": 16, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": true,
        "label_smoothing": 0.1, "clip_grad_norm": 1.0, "min_lr": 0.001, "precision": precision,
        "clean_weight": clean,
        "loss_scale": run.loss_scale.map(|(init, interval)| serde_json::json!({"init": init, "growth_interval": interval})),
        "feature_mix": run.feature_mix,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/pytorch_loop.py");
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(request.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let torch: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // 16 rows a batch over 200 rows: the last batch of each epoch has 8.
    let yaml = r#"
name: equivalence
defaults:
  task: train
  data: {name: npz, path: data.npz, n_test: 50}
  model: {name: mlp, hidden: [32]}
  init: init.safetensors
  shuffle: false
  optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.0005, nesterov: true}
  schedule: {name: cosine, min_lr: 0.001}
  label_smoothing: 0.1
  clip_grad_norm: 1.0
  epochs: 3
  batch_size: 16
  precision: PRECISION
stages:
  train: {}
"#;
    let fixture = match (clean, run.feature_mix) {
        (Some(w), _) => Some(format!("{{use: fixture.clean_loss, weight: {w}}}")),
        (None, Some(mu)) => Some(format!("{{use: fixture.feature_mix, mu: {mu}}}")),
        (None, None) => None,
    };
    let yaml = match fixture {
        Some(transform) => {
            std::fs::copy(xlab().with_file_name("libxlab_fixture_plugin.so"), dir.join("fixture.so"))
                .expect("the fixture plugin is built with the workspace");
            yaml.replacen("defaults:", "plugins: [fixture.so]\ndefaults:", 1)
                .replace("  train: {}", &format!("  train:\n    batch_transform: {transform}"))
        }
        None => yaml.to_string(),
    };
    let yaml = match run.loss_scale {
        Some((init, interval)) => yaml.replace(
            "  precision: PRECISION",
            &format!("  precision: PRECISION\n  loss_scale: {{init: {init}, growth_interval: {interval}}}"),
        ),
        None => yaml,
    };
    let file = dir.join("equivalence.yaml");
    std::fs::write(&file, yaml.replace("PRECISION", precision)).unwrap();
    let store = dir.join("results");
    let run = Command::new(xlab())
        .arg("--store")
        .arg(&store)
        .arg("run")
        .arg(&file)
        .env("XLAB_WORKER", xlab().with_file_name("xlab-worker"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let job = std::fs::read_dir(store.join("runs")).unwrap().next().unwrap().unwrap().path();
    let ours = read_safetensors(&job.join("weights.safetensors"));
    let theirs = read_safetensors(&dir.join("torch_final.safetensors"));
    let init = read_safetensors(&dir.join("init.safetensors"));
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    let mut worst = 0.0f32;
    for (name, a) in &ours {
        let b = &theirs[name];
        let moved = a.iter().zip(&init[name]).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(moved > 1e-3, "{name} was trained");
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs() / (1e-3 + y.abs()));
        }
    }
    assert!(worst < 1e-4, "{precision}: final weights differ from PyTorch's by up to {worst:e} (relative)");

    let show = Command::new(xlab())
        .arg("--store")
        .arg(&store)
        .args(["show", job.file_name().unwrap().to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let record: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let ours: Vec<f64> =
        record["metrics"]["train.loss"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    let theirs: Vec<f64> = torch["train_loss"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(ours.len(), 3);
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "train.loss per epoch: xlab {ours:?}, PyTorch {theirs:?}");
    }
    (read_safetensors(&job.join("weights.safetensors")), serde_json::json!({"xlab": record, "torch": torch}))
}
