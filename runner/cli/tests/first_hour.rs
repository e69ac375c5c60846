//! What a new user meets in the first hour: a moved or cloned experiment keeps its results,
//! stores made before files were identified by content still find their jobs, and editing an
//! experiment file never hides what it ran before.

use std::path::Path;
use std::process::Output;

mod common;
use common::{cmd, text};

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stderr)
}

/// A small two-feature CSV with a header and a named label column.
fn write_csv(path: &Path) {
    let mut s = String::from("f1,f2,label\n");
    for i in 0..120 {
        let x = (i as f64 * 0.37).sin();
        let y = (i as f64 * 0.11).cos();
        s += &format!("{x:.4},{y:.4},{}\n", if x + y > 0.0 { "pos" } else { "neg" });
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, s).unwrap();
}

const CSV_EXPERIMENT: &str = "name: moved
defaults:
  task: train
  data: {name: csv, path: data/points.csv, label: label, n_val: 20, n_test: 20}
  model: {name: mlp, hidden: [8]}
  optimizer: {name: sgd, lr: 0.1}
  epochs: 2
  batch_size: 16
stages:
  train: {seeds: 2}
  eval:
    needs: train
    task: evaluate
";

#[test]
fn a_moved_experiment_keeps_its_results() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    for at in ["here", "elsewhere/clone"] {
        write_csv(&dir.path().join(at).join("data/points.csv"));
        std::fs::write(dir.path().join(at).join("moved.yaml"), CSV_EXPERIMENT).unwrap();
    }
    let err = ok(cmd(&store).arg("run").arg(dir.path().join("here/moved.yaml")).output().unwrap());
    assert!(err.contains("4 done, 0 skipped"), "{err}");
    let err = ok(cmd(&store).arg("run").arg(dir.path().join("elsewhere/clone/moved.yaml")).output().unwrap());
    assert!(err.contains("0 done, 4 skipped"), "the same content in another folder is the same jobs: {err}");
    // Other content is other jobs.
    let other = dir.path().join("elsewhere/clone/data/points.csv");
    let changed = std::fs::read_to_string(&other).unwrap().replacen("pos", "neg", 3);
    std::fs::write(&other, changed).unwrap();
    let err = ok(cmd(&store).arg("run").arg(dir.path().join("elsewhere/clone/moved.yaml")).output().unwrap());
    assert!(err.contains("4 done, 0 skipped"), "{err}");
}

/// A store written before files were identified by content holds the jobs under ids that hash
/// the data file's absolute path. Such a store (made here by renaming a fresh store's ids to
/// those, through export and import) still has its jobs found: nothing reruns, and a new stage
/// consumes the old jobs.
#[test]
fn a_store_made_before_content_identity_still_finds_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    write_csv(&dir.path().join("data/points.csv"));
    let file = dir.path().join("moved.yaml");
    std::fs::write(&file, CSV_EXPERIMENT).unwrap();
    let fresh = dir.path().join("fresh");
    ok(cmd(&fresh).arg("run").arg(&file).output().unwrap());
    ok(cmd(&fresh).args(["export", "-o"]).arg(dir.path().join("new.jsonl")).output().unwrap());
    let old = dir.path().join("old");
    let plan = xlab_plan::load(&file, &mut xlab_plan::NoPlugins).unwrap();
    let mut lines = std::fs::read_to_string(dir.path().join("new.jsonl")).unwrap();
    let mut renamed = 0;
    for job in plan.jobs() {
        let earlier = job.earlier_id.as_ref().expect("a job with a file has an earlier id that differs");
        assert_ne!(&job.id, earlier);
        renamed += lines.matches(job.id.as_str()).count();
        lines = lines.replace(job.id.as_str(), earlier.as_str());
        // The job's files (weights the next stage loads) go with it.
        let (from, to) = (fresh.join("runs").join(job.id.as_str()), old.join("runs").join(earlier.as_str()));
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&from).unwrap().flatten().filter(|f| f.path().is_file()) {
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    assert!(renamed >= 4);
    std::fs::write(dir.path().join("old.jsonl"), lines).unwrap();
    ok(cmd(&old).arg("import").arg(dir.path().join("old.jsonl")).output().unwrap());
    let err = ok(cmd(&old).arg("run").arg(&file).output().unwrap());
    assert!(err.contains("0 done, 4 skipped"), "{err}");
    // A stage added later runs against the jobs found under their earlier ids.
    std::fs::write(
        &file,
        format!("{CSV_EXPERIMENT}  again:\n    needs: train\n    task: evaluate\n    data: {{n_test: 10}}\n"),
    )
    .unwrap();
    let err = ok(cmd(&old).arg("run").arg(&file).output().unwrap());
    assert!(err.contains("2 done, 4 skipped"), "{err}");
    let q = text(&cmd(&old).args(["query", "--format", "csv"]).output().unwrap().stdout);
    assert_eq!(q.lines().filter(|l| l.starts_with("train,")).count(), 1, "{q}");
}

/// Editing an experiment file (or running another file with the same `name:`) keeps the jobs
/// the earlier version ran: the run says so, the default query notes what it does not show, and
/// `--all-versions` shows them.
#[test]
fn an_edited_experiment_keeps_its_earlier_jobs_visible() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("edited.yaml");
    let v1 = "name: edited\ndefaults:\n  task: noop\n  data: {name: two_moons}\n  noop: {sleep_s: 0}\nstages:\n  a: {seeds: 2}\n";
    std::fs::write(&file, v1).unwrap();
    let err = ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    assert!(!err.contains("version"), "{err}");
    std::fs::write(&file, v1.replace("seeds: 2", "seeds: [5]")).unwrap();
    let err = ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    assert!(
        err.contains("version 2 of it, after version 1. 2 job(s) of earlier versions are not in this one"),
        "{err}"
    );
    let seeds = |extra: &[&str]| {
        let out = cmd(&store).args(["query", "--group-by", "seed", "--format", "csv"]).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mut s: Vec<String> =
            text(&out.stdout).lines().skip(1).map(|l| l.split(',').next().unwrap().to_string()).collect();
        s.sort();
        (s, text(&out.stderr))
    };
    let (now, note) = seeds(&[]);
    assert_eq!(now, ["5"]);
    assert!(
        note.contains("2 job(s) of earlier versions of `edited`'s file are not shown (this is version 2)"),
        "{note}"
    );
    let (all, note) = seeds(&["--all-versions"]);
    assert_eq!(all, ["0", "1", "5"]);
    assert!(!note.contains("not shown"), "{note}");
    // Running the same text again is not a new version, from another path neither.
    let err = ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    assert!(!err.contains("after version"), "{err}");
    let err = ok(cmd(&store).current_dir(dir.path()).args(["run", "./edited.yaml"]).output().unwrap());
    assert!(!err.contains("after version"), "{err}");
    let listed = text(&cmd(&store).arg("experiments").output().unwrap().stdout);
    assert!(listed.contains("edited"), "{listed}");
}

/// Mistakes only running code can find are caught by `xlab validate` and `xlab run` before any
/// job starts, at the line they are written on: a CSV column that does not exist, an npz
/// without `y`, an objective that needs groups on data without them, a parameter value the
/// method's constructor refuses.
#[test]
fn data_and_constructor_mistakes_are_caught_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_csv(&dir.path().join("points.csv"));
    let npz = dir.path().join("no_y.npz");
    let made = std::process::Command::new(common::python())
        .args(["-c", "import numpy as np, sys; np.savez(sys.argv[1], x=np.zeros((10, 2), np.float32))"])
        .arg(&npz)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let base = "name: mistakes\ndefaults:\n  task: train\n  data: {name: csv, path: points.csv, label: label, n_val: 20, n_test: 20}\n  model: {name: mlp, hidden: [8]}\n  optimizer: {name: sgd, lr: 0.1}\n  epochs: 1\nstages:\n";
    let cases = [
        (
            "a label column",
            "  s:\n    data: {label: diagnosis}\n",
            "points.csv has no label column `diagnosis`; its columns are f1, f2, label",
            "10:5",
        ),
        ("a group column", "  s:\n    data: {group: site}\n", "has no group column `site`", "10:5"),
        (
            "npz without y",
            "  s:\n    data: {name: npz, path: no_y.npz, n_val: 2, n_test: 2}\n",
            "no_y.npz has no array `y` (it has x)",
            "10:5",
        ),
        (
            "groups",
            "  s:\n    objective: {use: dro.group_dro}\n",
            "`dro.group_dro` cannot train on this job's data: dro.group_dro needs data with group labels",
            "10:5",
        ),
        (
            "constructor",
            "  s:\n    objective: {use: dro.group_dro, btl: true, alpha: 0}\n",
            "btl needs alpha > 0",
            "10:5",
        ),
    ];
    for (what, stage, message, at) in cases {
        let file = dir.path().join("mistakes.yaml");
        std::fs::write(&file, format!("{base}{stage}")).unwrap();
        let store = dir.path().join(format!("results-{}", what.replace(' ', "-")));
        for command in ["validate", "run"] {
            let out = cmd(&store).arg(command).arg(&file).output().unwrap();
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}, {command}: {err}");
            assert!(err.contains(message), "{what}, {command}: {err}");
            assert!(err.contains(&format!("mistakes.yaml:{at}")), "{what}, {command}: {err}");
        }
        assert!(!store.join("runs").exists(), "{what}: nothing ran");
    }
}

/// Raw tabular features in the hundreds train plain SGD to the majority class: the run says so
/// for each such job, `xlab show` keeps the warning, and `standardize: true` fixes it (its
/// training-split statistics kept beside the job).
#[test]
fn unscaled_features_are_named_and_standardize_fixes_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("f1,f2,label\n");
    for i in 0..300 {
        let a = 800.0 + 300.0 * (i as f64 * 0.7).sin();
        let b = 1200.0 + 200.0 * (i as f64 * 0.3).cos();
        csv += &format!("{a:.2},{b:.2},{}\n", if a > 900.0 { "M" } else { "B" });
    }
    std::fs::write(dir.path().join("raw.csv"), csv).unwrap();
    let file = dir.path().join("raw.yaml");
    std::fs::write(
        &file,
        "name: raw\ndefaults:\n  task: train\n  data: {name: csv, path: raw.csv, n_val: 50, n_test: 50}\n  model: {name: mlp, hidden: [16]}\n  optimizer: {name: sgd, lr: 0.05}\n  epochs: 3\nstages:\n  raw: {}\n  scaled:\n    data: {standardize: true}\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let err = ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("predicts a single class")).collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(warned[0].contains("raw seed=0") && warned[0].contains("standardize: true"), "{err}");
    let rows: serde_json::Value =
        serde_json::from_slice(&cmd(&store).args(["query", "--format", "json"]).output().unwrap().stdout).unwrap();
    let acc = |stage: &str| {
        rows.as_array().unwrap().iter().find(|r| r["stage"] == stage).unwrap()["metrics"]["test.acc"]["mean"]
            .as_f64()
            .unwrap()
    };
    assert!(acc("scaled") > acc("raw") + 0.2, "standardized features train: {rows}");
    let id = |stage: &str| common::stage_job_ids(&store, &file, stage)[0].clone();
    let shown = text(&cmd(&store).args(["show", &id("raw")]).output().unwrap().stdout);
    assert!(shown.contains("warning: it predicts a single class on the test split"), "{shown}");
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("runs").join(id("scaled")).join("standardization.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["mean"].as_array().unwrap().len(), 2);
    assert!(stats["mean"][1].as_f64().unwrap() > 1000.0, "{stats}");
}

/// A config error that only shows at run time (here weights under `init:` that do not fit the
/// model) holds back the rest of its stage instead of failing every job, and the run says to fix
/// the file rather than to retry.
#[test]
fn a_config_error_holds_back_its_stage_and_is_not_called_retryable() {
    let dir = tempfile::tempdir().unwrap();
    // A safetensors file with one tensor the MLP does not have.
    let header = br#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut padded = header.to_vec();
    while !padded.len().is_multiple_of(8) {
        padded.push(b' ');
    }
    let mut bytes = (padded.len() as u64).to_le_bytes().to_vec();
    bytes.extend(padded);
    bytes.extend(1.0f32.to_le_bytes());
    std::fs::write(dir.path().join("wrong.safetensors"), bytes).unwrap();
    let file = dir.path().join("held.yaml");
    std::fs::write(
        &file,
        "name: held\nmax_parallel: 1\ndefaults:\n  task: train\n  data: {name: two_moons, n_train: 64, n_val: 0, n_test: 32}\n  model: {name: mlp, hidden: [8]}\n  optimizer: {name: sgd, lr: 0.1}\n  epochs: 1\nstages:\n  fine:\n    seeds: 1\n  warm:\n    init: wrong.safetensors\n    seeds: 4\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stage `warm`: a config error, so its 3 other job(s) are not started"), "{err}");
    assert!(
        err.contains("1 job(s) failed with a config error (3 more job(s) of the same stage(s) were not started)"),
        "{err}"
    );
    assert!(err.contains("Fix the experiment file") && !err.contains("retry them"), "{err}");
    assert!(err.contains("1 done, 0 skipped (already done), 1 failed"), "the other stage ran: {err}");
}
