//! A finished diffusion training continued to more epochs: edit `epochs`, run again, and the
//! new job starts from the finished one's checkpoint (weights, optimizer, EMA) instead of from
//! scratch, ending bit for bit where a fresh run of that many epochs ends. Only where that
//! holds: a cosine schedule, whose learning rate depends on the epoch count, starts afresh.

use std::path::Path;

mod common;
use common::cmd;

fn experiment(epochs: u32, schedule: &str, keep: &str) -> String {
    format!(
        r#"
name: longer
stages:
  train:
    task: train
    data: {{name: blobs, n_train: 300, n_val: 50, n_test: 50, classes: 3, dim: 2}}
    model: {{name: time_mlp, hidden: [32, 32]}}
    optimizer: {{name: adam, lr: 0.003}}
    batch_size: 50
    epochs: {epochs}
    schedule: {schedule}
    ema: {{decay: 0.9}}
    diffusion: {{timesteps: 100, conditional: true, p_uncond: 0.1}}
    checkpoint: {{keep_weights: {keep}}}
"#
    )
}

fn run(store: &Path, file: &Path, text: &str) -> String {
    std::fs::write(file, text).unwrap();
    let out = cmd(store).arg("run").arg(file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

fn show(store: &Path, id: &str) -> serde_json::Value {
    let out = cmd(store).args(["show", id, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn only_job(store: &Path, file: &Path) -> String {
    let ids = common::stage_job_ids(store, file, "train");
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids[0].clone()
}

#[test]
fn a_finished_training_continues_to_more_epochs_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("longer.yaml");
    let store = dir.path().join("results");
    run(&store, &file, &experiment(4, "{name: constant}", "[2]"));
    let short = only_job(&store, &file);

    let err = run(&store, &file, &experiment(8, "{name: constant}", "[2, 6]"));
    let long = only_job(&store, &file);
    assert_ne!(short, long, "8 epochs is another job");
    assert!(
        err.contains(&format!(
            "continues job {short} (the same training with 4 epochs) from its checkpoint after epoch 4"
        )),
        "{err}"
    );
    let rec = show(&store, &long);
    assert_eq!(rec["provenance"]["continued_from"], serde_json::json!({"job": short, "epoch": 4}), "{rec}");
    // The whole history: epochs 1–4 come from the finished job, 5–8 were trained now.
    let epochs: Vec<f64> = rec["metrics"]["epoch"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert_eq!(epochs, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], "{}", rec["metrics"]);

    // A fresh 8-epoch run elsewhere ends in the same weights and average, bit for bit, and
    // keeps the same weights of epochs 2 and 6.
    let fresh_store = dir.path().join("fresh");
    let err = run(&fresh_store, &file, &experiment(8, "{name: constant}", "[2, 6]"));
    assert!(!err.contains("continues job"), "{err}");
    let runs = |s: &Path| s.join("runs").join(&long);
    for f in [
        "weights.safetensors",
        "weights_ema.safetensors",
        "weights-epoch2.safetensors",
        "weights_ema-epoch2.safetensors",
        "weights-epoch6.safetensors",
    ] {
        let a = std::fs::read(runs(&store).join(f)).unwrap_or_else(|e| panic!("continued {f}: {e}"));
        let b = std::fs::read(runs(&fresh_store).join(f)).unwrap_or_else(|e| panic!("fresh {f}: {e}"));
        assert!(a == b, "{f} differs between the continued and the fresh run");
    }
    let fresh = show(&fresh_store, &long);
    let measured = |r: &serde_json::Value| -> serde_json::Map<String, serde_json::Value> {
        r["summary"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.starts_with("time."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(measured(&rec), measured(&fresh), "the same final metrics, timings aside");
    assert!(fresh["provenance"].get("continued_from").is_none(), "{}", fresh["provenance"]);

    // Running the file again runs nothing.
    let err = run(&store, &file, &experiment(8, "{name: constant}", "[2, 6]"));
    assert!(err.contains("0 done, 1 skipped"), "{err}");
}

#[test]
fn a_cosine_schedule_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("longer.yaml");
    let store = dir.path().join("results");
    let cosine = "{name: cosine, min_lr: 0.0001}";
    run(&store, &file, &experiment(3, cosine, "[]"));
    let err = run(&store, &file, &experiment(5, cosine, "[]"));
    assert!(!err.contains("continues job"), "{err}");
    let rec = show(&store, &only_job(&store, &file));
    assert!(rec["provenance"].get("continued_from").is_none(), "{}", rec["provenance"]);
    assert_eq!(rec["summary"]["epoch"], 5.0);
}
