//! Stages that need stages: children run after their own parents, read their final weights,
//! fan out one per parent (`each`) or see them all (`all`), and a failed parent blocks its
//! children without running them.

use std::path::Path;

mod common;
use common::{cmd, stage_job_ids as ids};

fn show(store: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(&cmd(store).args(["show", id, "--json"]).output().unwrap().stdout).unwrap()
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

/// `select: best` waits for every candidate, then hands the child the best one by the metric;
/// the child's record names it, and evaluating it reproduces its validation accuracy.
#[test]
fn best_selects_the_parent_with_the_best_metric() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("best.yaml");
    std::fs::write(
        &file,
        "name: best\ndefaults:\n  task: train\n  data: {name: two_moons, n_train: 200, n_val: 200, n_test: 200}\n  \
         model: {name: mlp, hidden: [16]}\n  optimizer: {name: sgd, lr: 0.1}\n  epochs: 3\n  batch_size: 32\n\
         stages:\n  train:\n    grid:\n      optimizer.lr: [0.00001, 0.001, 0.3]\n  \
         pick:\n    task: evaluate\n    needs: {stage: train, select: best, metric: val.acc, k: 2}\n",
    )
    .unwrap();
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let train = ids(&store, &file, "train");
    let mut ranked: Vec<(f64, String)> =
        train.iter().map(|id| (show(&store, id)["summary"]["val.acc"].as_f64().unwrap(), id.clone())).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (rank, child) in ids(&store, &file, "pick").iter().enumerate() {
        let c = show(&store, child);
        assert_eq!(c["selected"], ranked[rank].1.as_str(), "rank {}", rank + 1);
        assert_eq!(c["parents"].as_array().unwrap().len(), 3, "the record keeps every candidate");
        assert_eq!(c["summary"]["val.acc"].as_f64().unwrap(), ranked[rank].0);
        assert_eq!(c["summary"]["eval.models"], 1.0);
    }
}

/// JTT across two stages: the ERM parent leaves its training-pass errors in its run folder, and
/// the child visits each error example 1 + λ_up times per epoch.
#[test]
fn jtt_upsamples_what_its_parent_got_wrong_while_training() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("jtt.yaml");
    std::fs::write(
        &file,
        "name: jtt\ndefaults:\n  task: train\n  data: {name: spurious, n_train: 600, n_val: 200, n_test: 200}\n  \
         model: {name: mlp, hidden: [16]}\n  optimizer: {name: sgd, lr: 0.05}\n  epochs: 2\n  batch_size: 50\n\
         stages:\n  erm:\n    epochs: 1\n    seeds: 2\n  \
         jtt:\n    objective: {use: dro.jtt, up_weight: 3}\n    needs: erm\n",
    )
    .unwrap();
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (child, parent) in ids(&store, &file, "jtt").iter().zip(ids(&store, &file, "erm")) {
        let errors_file = store.join("runs").join(&parent).join("train-errors/epoch-00001.json");
        let recorded: serde_json::Value = serde_json::from_slice(&std::fs::read(&errors_file).unwrap()).unwrap();
        let e = recorded["errors"].as_array().unwrap().len() as f64;
        assert!(e > 0.0, "one epoch of ERM on spurious data makes mistakes");
        let p = show(&store, &parent);
        // The error set is what the parent's training pass got wrong: 1 − train.acc of its epoch.
        assert!((e / 600.0 - (1.0 - p["summary"]["train.acc"].as_f64().unwrap())).abs() < 1e-9);
        let c = show(&store, child);
        assert_eq!(c["summary"]["jtt.errors"].as_f64().unwrap(), e);
        assert_eq!(c["summary"]["train.examples"].as_f64().unwrap(), 600.0 + 3.0 * e);
    }
}
