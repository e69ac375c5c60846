//! Stages that need stages: children run after their own parents, read their final weights,
//! fan out one per parent (`each`) or see them all (`all`), and a failed parent blocks its
//! children without running them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn xlab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab"))
}

fn cmd(store: &Path) -> Command {
    let mut c = Command::new(xlab());
    c.arg("--store").arg(store).env("XLAB_WORKER", xlab().with_file_name("xlab-worker")).env_remove("XLAB_PLUGIN_PATH");
    c
}

fn show(store: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(&cmd(store).args(["show", id]).output().unwrap().stdout).unwrap()
}

fn ids(store: &Path, file: &Path, stage: &str) -> Vec<String> {
    let out = cmd(store).arg("plan").arg(file).output().unwrap();
    let plan = String::from_utf8_lossy(&out.stdout).into_owned();
    plan.lines()
        .skip_while(|l| !l.contains(&format!("stage `{stage}`")))
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn evaluate_stages_consume_their_parents() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/evaluate.yaml");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("9 done, 0 skipped"), "{err}");

    let train = ids(&store, &file, "train");
    let shifted = ids(&store, &file, "shifted");
    let ensemble = ids(&store, &file, "ensemble");
    assert_eq!((train.len(), shifted.len(), ensemble.len()), (4, 4, 1));
    for (child, parent) in shifted.iter().zip(&train) {
        let c = show(&store, child);
        let p = show(&store, parent);
        assert_eq!(c["parents"], serde_json::json!([parent]));
        assert_eq!(c["seed"], p["seed"]);
        // The child started after its parent ended.
        assert!(c["attempts"][0]["started_unix"].as_u64() >= p["attempts"][0]["ended_unix"].as_u64());
        // The shifted test set is harder for a model that leaned on the attribute.
        assert!(c["summary"]["test.acc"].as_f64().unwrap() < p["summary"]["test.acc"].as_f64().unwrap(), "{child}");
    }
    let e = show(&store, &ensemble[0]);
    assert_eq!(e["parents"].as_array().unwrap().len(), 4);
    assert_eq!(e["summary"]["eval.models"], 4.0);

    // Evaluating a parent's weights with `each` on the parent's own data reproduces its test
    // accuracy: the child really loaded the parent's final weights.
    let same = dir.path().join("same.yaml");
    std::fs::write(
        &same,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace(", eval_correlation: 0.1}", "}")
            .replace("name: evaluate", "name: same"),
    )
    .unwrap();
    let out = cmd(&store).arg("run").arg(&same).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (child, parent) in ids(&store, &same, "shifted").iter().zip(&train) {
        let (c, p) = (show(&store, child), show(&store, parent));
        assert_eq!(c["summary"]["test.acc"], p["summary"]["test.acc"], "{child}");
    }
}

#[test]
fn a_failed_parent_blocks_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("blocked.yaml");
    std::fs::write(
        &file,
        "name: blocked\ndefaults:\n  task: train\n  data: {name: two_moons, n_train: 200, n_val: 0, n_test: 100}\n  model: {name: mlp, hidden: [8]}\n  optimizer: {name: sgd}\n  epochs: 2\nstages:\n  train:\n    grid: {optimizer.lr: [0.1, 1.0e30]}\n  eval:\n    needs: train\n    task: evaluate\n",
    )
    .unwrap();
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2 done, 0 skipped (already done), 2 failed"), "{err}");
    assert!(err.contains("FAILED (parent_failed) eval train.optimizer.lr=1e+30"), "{err}");
    let blocked = ids(&store, &file, "eval")[1].clone();
    let rec = show(&store, &blocked);
    assert_eq!(rec["attempts"][0]["outcome"], "parent_failed");
    assert!(rec["attempts"][0]["pid"].is_null(), "a blocked job never starts a worker");
}
