//! `xlab reproduce JOB`: a deterministic job run again from its record in a fresh store comes out
//! bit-identical, a job that consumes another gets that one's files as they were, and a job
//! whose plugin file changed is refused, naming the plugin and both hashes. Real runs, real
//! plugins, real worker processes.

mod common;

use common::{cmd, stage_job_ids, text, xlab};
use std::process::Output;

const EXPERIMENT: &str = "name: repro
plugins: [fixture.so]
defaults:
  task: train
  deterministic: true
  data: {name: two_moons, n_train: 256, n_val: 64, n_test: 128, noise: 0.3}
  model: {name: mlp, hidden: [16]}
  optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
  epochs: 3
stages:
  train:
    step_rule: {use: sam.sam, rho: 0.05}
    batch_transform: {use: fixture.clean_loss}
  sharpness:
    task: evaluate
    needs: train
    sharpness: {samples: 64, power_iterations: 3, rho: 0.05, m: 32}
";

fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().unwrap();
    text(&out.stdout).split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_deterministic_job_reproduces_bit_for_bit_and_a_changed_plugin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("repro.yaml");
    let so = dir.path().join("fixture.so");
    std::fs::copy(xlab().with_file_name("libxlab_fixture_plugin.so"), &so).unwrap();
    std::fs::write(&file, EXPERIMENT).unwrap();
    let ok = |out: Output| {
        assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    };
    ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    let train = stage_job_ids(&store, &file, "train")[0].clone();
    let sharp = stage_job_ids(&store, &file, "sharpness")[0].clone();

    let out = ok(cmd(&store).args(["reproduce", &train[..8]]).output().unwrap());
    assert!(out.contains("result: bit-identical"), "{out}");
    assert!(out.contains("weights (runs/") && out.contains("): bit-identical (sha256 "), "{out}");
    assert!(out.contains("metric series: all ") && out.contains("wall-clock `time.*` series not compared"), "{out}");

    // The evaluate job reads the train job's weights: they are copied in, not trained again,
    // and its sharpness comes out the same. --keep leaves the fresh store to look at.
    let kept = dir.path().join("again");
    let out = ok(cmd(&store).args(["reproduce", &sharp, "--keep"]).arg(&kept).output().unwrap());
    assert!(out.contains("result: bit-identical"), "{out}");
    let rows = ok(cmd(&kept).args(["query", "--format", "json", "-m", "sharpness.hessian_top"]).output().unwrap());
    let rows: serde_json::Value = serde_json::from_str(&rows).unwrap();
    let first: serde_json::Value = serde_json::from_str(&ok(cmd(&store)
        .args(["query", "--format", "json", "-m", "sharpness.hessian_top"])
        .output()
        .unwrap()))
    .unwrap();
    assert_eq!(rows, first, "the kept store holds the same results");
    let attempts = ok(cmd(&kept).args(["show", &train, "--json"]).output().unwrap());
    let attempts: serde_json::Value = serde_json::from_str(&attempts).unwrap();
    assert_eq!(attempts["attempts"].as_array().map(Vec::len), Some(1), "the parent was copied, not run again");
    let out = cmd(&store).args(["reproduce", &sharp, "--keep"]).arg(&kept).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a store is never overwritten");

    // "Rebuild" the plugin: same id and version, other bytes.
    let before = sha256_of(&so);
    let mut bytes = std::fs::read(&so).unwrap();
    bytes.extend_from_slice(b"rebuilt");
    std::fs::write(&so, bytes).unwrap();
    let after = sha256_of(&so);
    let out = cmd(&store).args(["reproduce", &train]).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("plugin `fixture` changed since job"), "{err}");
    assert!(err.contains(&before) && err.contains(&after), "both hashes: {err}");

    let out = cmd(&store).args(["reproduce", "ffffffff"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no job `ffffffff`"), "{}", text(&out.stderr));
}
