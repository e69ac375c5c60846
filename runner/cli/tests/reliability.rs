//! Failure paths that used to lose or misreport results: NaN and infinite metrics through every
//! boundary, libtorch errors in the middle of a step, plugins that crash or hang the same way on
//! every attempt, and `select: best` over candidates whose metric is NaN. Real coordinator and
//! worker processes, the real fixture plugin, a real sled store.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

mod common;
use common::{attempts, cmd, job_ids, text, wait_for};

/// A copy of the fixture plugin beside the experiment file, named as the file's `plugins:` does.
fn with_fixture(dir: &Path) {
    let built = common::xlab().with_file_name("libxlab_fixture_plugin.so");
    assert!(built.exists(), "{} is missing: build the workspace first (`make build`)", built.display());
    std::fs::copy(built, dir.join("fixture.so")).unwrap();
}

fn experiment(dir: &Path, name: &str, body: &str) -> PathBuf {
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, body).unwrap();
    f
}

fn show(store: &Path, id: &str) -> serde_json::Value {
    let out = cmd(store).args(["show", id, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const ODD: &str = r#"
name: odd
plugins: [fixture.so]
defaults:
  task: train
  data: {name: two_moons, n_train: 4096, n_val: 64, n_test: 128}
  model: {name: mlp, hidden: [64, 64]}
  optimizer: {name: sgd, lr: 0.05}
  batch_size: 16
  epochs: 12
stages:
  odd:
    step_rule: {use: fixture.odd_metrics}
"#;

/// A plugin metric that is NaN every step and one that is +∞: the job finishes `done` (not
/// `crashed`), every epoch's point is stored, a checkpoint holding them resumes after the
/// coordinator is killed, and show, query (table and JSON), export/import and plot keep them.
#[test]
fn nan_and_infinite_metrics_cross_every_boundary() {
    let dir = tempfile::tempdir().unwrap();
    with_fixture(dir.path());
    let file = experiment(dir.path(), "odd", ODD);
    let store = dir.path().join("results");
    let id = job_ids(&store, &file).remove(0);
    // Kill the coordinator (its worker follows) once a checkpoint holding NaN and ∞ is written.
    let mut run = cmd(&store).arg("run").arg(&file).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let ckpt = store.join("runs").join(&id).join("ckpt-000002.json");
    wait_for("checkpoint after epoch 2", Duration::from_secs(120), || ckpt.exists());
    run.kill().unwrap();
    run.wait().unwrap();
    let meta = std::fs::read_to_string(&ckpt).unwrap();
    assert!(meta.contains("\"NaN\"") && meta.contains("\"inf\""), "{meta}");

    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("from its checkpoint after epoch"), "the job resumed from its checkpoint: {err}");
    let rec = show(&store, &id);
    assert_eq!(rec["status"], "done");
    assert_eq!(rec["summary"]["nan"], "NaN");
    assert_eq!(rec["summary"]["inf"], "inf");
    assert_eq!(rec["metrics"]["nan"].as_array().unwrap().len(), 12, "{}", rec["metrics"]["nan"]);
    assert!(rec["metrics"]["inf"].as_array().unwrap().iter().all(|p| p[1] == "inf"));
    assert!(rec["summary"]["test.acc"].as_f64().unwrap() > 0.5);

    let out = cmd(&store).args(["query", "-m", "nan,inf,test.acc"]).output().unwrap();
    let table = text(&out.stdout);
    assert!(table.contains("NaN") && table.contains(" inf "), "{table}");
    let out = cmd(&store).args(["query", "-m", "nan,inf", "--format", "json"]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["metrics"]["nan"]["values"][0], "NaN", "{rows}");
    assert_eq!(rows[0]["metrics"]["inf"]["mean"], "inf", "{rows}");
    let out = cmd(&store).args(["query", "-m", "nan,inf", "--format", "csv"]).output().unwrap();
    assert!(text(&out.stdout).contains("NaN") && text(&out.stdout).contains("inf"), "{}", text(&out.stdout));

    // Export, then import into a new store: the values survive the round trip.
    let export = dir.path().join("odd.jsonl");
    let out = cmd(&store).args(["export", "-o"]).arg(&export).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::read_to_string(&export).unwrap().contains("\"NaN\""));
    let other = dir.path().join("other");
    let out = cmd(&other).arg("import").arg(&export).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let copy = show(&other, &id);
    assert_eq!((&copy["summary"], &copy["metrics"]["nan"]), (&rec["summary"], &rec["metrics"]["nan"]));

    // A plot of a metric that is NaN throughout draws no line and says why.
    let svg = dir.path().join("nan.svg");
    let out = cmd(&store).args(["plot", "nan", "-o"]).arg(&svg).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.contains("12 NaN/inf not drawn") && !drawn.contains("NaN,"), "{drawn}");
}

/// A forward pass that cannot allocate its activations (a batch of 2¹⁸ rows through 2²⁰ hidden
/// units: 1 TiB) fails inside a panicking tensor method; the job is recorded `out_of_memory`
/// with libtorch's words and retried as the policy says, not recorded as a crash.
#[test]
fn running_out_of_memory_in_the_forward_pass_is_out_of_memory_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let file = experiment(
        dir.path(),
        "oom",
        "name: oom\ndefaults:\n  task: train\n  data: {name: two_moons, n_train: 262144, n_val: 0, n_test: 16}\n  \
         model: {name: mlp, hidden: [1048576]}\n  optimizer: {name: sgd, lr: 0.1}\n  batch_size: 262144\n  epochs: 1\n\
         stages:\n  big: {retries: 1}\n",
    );
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let id = job_ids(&store, &file).remove(0);
    assert_eq!(attempts(&store, &id), ["out_of_memory", "out_of_memory"], "{err}");
    let rec = show(&store, &id);
    let message = rec["attempts"][0]["error"].as_str().unwrap();
    assert!(message.contains("can't allocate memory"), "{message}");
}

const FAULTY: &str = r#"
name: faulty
plugins: [fixture.so]
defaults:
  task: train
  data: {name: two_moons, n_train: 256, n_val: 0, n_test: 64}
  model: {name: mlp, hidden: [16]}
  optimizer: {name: sgd, lr: 0.1}
  batch_size: 32
  epochs: 2
stages:
  STAGE
"#;

/// Runs FAULTY with `stage`, which must fail its one job with `outcome` on exactly two
/// attempts; returns the job's record.
fn fails_twice(stage: &str, outcome: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    with_fixture(dir.path());
    let file = experiment(dir.path(), "faulty", &FAULTY.replace("STAGE", stage));
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let id = job_ids(&store, &file).remove(0);
    assert_eq!(attempts(&store, &id), [outcome, outcome], "{err}");
    show(&store, &id)
}

/// A plugin that segfaults at the same step on every attempt: the second attempt ends exactly as
/// the first, so the job is not retried further although `retries: 3` allows it, and the record
/// says where (signal, step, plugin call).
#[test]
fn a_crash_that_repeats_at_the_same_step_is_not_retried() {
    let rec = fails_twice("segv: {step_rule: {use: fixture.crashes, at_step: 11}, retries: 3}", "crashed");
    let message = rec["attempts"][1]["error"].as_str().unwrap();
    assert!(
        message.contains("worker killed by signal 11 (SIGSEGV) at step 11 (epoch 2), inside `fixture.crashes` step"),
        "{message}"
    );
    assert!(message.contains("attempt 1 ended the same way at the same step") && message.contains("not retried"));
    assert_eq!(
        rec["attempts"][0]["site"],
        serde_json::json!({"signal": 11, "step": 11, "call": "`fixture.crashes` step"})
    );
}

/// A plugin that never returns from a step: the worker's watchdog ends the job as `hung` after
/// the stage's `step_timeout`, naming the plugin call, and a hang at the same step again is not
/// retried either.
#[test]
fn a_step_past_its_limit_is_hung_and_names_the_plugin() {
    let rec = fails_twice("stuck: {step_rule: {use: fixture.hangs, at_step: 2}, step_timeout: 1s, retries: 2}", "hung");
    let message = rec["attempts"][0]["error"].as_str().unwrap();
    assert!(
        message.contains("step 2 (epoch 1) made no progress for 1 s, inside `fixture.hangs` step")
            && message.contains("`step_timeout:`"),
        "{message}"
    );
    assert!(rec["attempts"][1]["error"].as_str().unwrap().contains("not retried"));
}
