//! `xlab query` output in every format, pinned word for word, over a store built by `xlab
//! import` from records this test writes (fixed values, so the snapshots hold on any machine).
//! The snapshot is insta's: `cargo insta review` (or `INSTA_UPDATE=always`) accepts a change.

use std::path::{Path, PathBuf};
use std::process::Command;

fn xlab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab"))
}

fn run(store: &Path, args: &[&str]) -> String {
    let out = Command::new(xlab()).arg("--store").arg(store).args(args).env("NO_COLOR", "1").output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Two stages: `train` sweeps two learning rates over three seeds; `tune` is one point with two
/// seeds, one of them failed.
fn export_lines() -> String {
    let mut ids = Vec::new();
    let mut jobs = Vec::new();
    let mut n = 0;
    for (stage, lr, seeds) in [("train", 0.01, 3), ("train", 0.1, 3), ("tune", 0.05, 2)] {
        for seed in 0..seeds {
            n += 1;
            let id = format!("{n:016x}");
            let done = !(stage == "tune" && seed == 1);
            let acc = 0.5 + lr * 3.0 + f64::from(seed) * 0.0125;
            let loss = 1.0 - acc / 2.0;
            let summary = if done {
                serde_json::json!({"test.acc": acc, "test.loss": loss, "val.acc": acc - 0.01})
            } else {
                serde_json::json!({})
            };
            let point =
                if stage == "train" { serde_json::json!([["optimizer.lr", lr]]) } else { serde_json::json!([]) };
            let job = serde_json::json!({
                "id": id, "experiment": "formats", "stage": stage, "seed": seed,
                "config": {"task": "train", "optimizer": {"name": "sgd", "lr": lr}},
                "point": point, "parents": [], "status": if done { "done" } else { "failed" },
                "attempts": [], "summary": summary,
                "provenance": {"xlab_version": "test", "libtorch": null, "host": null, "device": null},
                "artifacts": []
            });
            let metrics =
                if done { serde_json::json!({"test.acc": [[1, acc - 0.1], [2, acc]]}) } else { serde_json::json!({}) };
            jobs.push(serde_json::json!({"type": "job", "job": job, "metrics": metrics}).to_string());
            ids.push((stage, id));
        }
    }
    let stage_ids = |s: &str| ids.iter().filter(|(st, _)| *st == s).map(|(_, id)| id.clone()).collect::<Vec<_>>();
    let exp = serde_json::json!({"type": "experiment", "name": "formats", "file": "formats.yaml", "source": "", "updated_unix": 0,
        "stages": [{"name": "train", "sweep_keys": ["optimizer.lr"], "jobs": stage_ids("train")},
                   {"name": "tune", "sweep_keys": [], "jobs": stage_ids("tune")}]});
    std::iter::once(exp.to_string()).chain(jobs).map(|l| l + "\n").collect()
}

#[test]
fn every_output_format_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("formats.jsonl");
    std::fs::write(&lines, export_lines()).unwrap();
    let store = dir.path().join("results");
    run(&store, &["import", lines.to_str().unwrap()]);
    let grouped = [
        "--group-by",
        "stage",
        "--agg",
        "mean(test.acc),std(test.acc),ci95(test.acc),count()",
        "--sort",
        "-mean(test.acc)",
    ];
    let mut got = String::new();
    for format in ["table", "csv", "json", "markdown", "latex"] {
        got += &format!("## query --format {format}\n");
        got += &run(&store, &["query", "-e", "formats", "--format", format]);
        got += &format!("## query 'last(test.acc) > 0.55' --group-by stage … --format {format}\n");
        let mut args = vec!["query", "last(test.acc) > 0.55", "-e", "formats", "--format", format];
        args.extend(grouped);
        got += &run(&store, &args);
    }
    insta::with_settings!({snapshot_path => "snapshots/query", prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!("formats", got);
    });
}

/// A valid filter that matches nothing says so, with how many jobs there are, and the metrics
/// asked for are checked against every job of the experiment: a filter matching nothing does not
/// make `test.acc` "unknown" (it used to).
#[test]
fn a_filter_that_matches_nothing_says_so_and_metrics_stay_known() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("formats.jsonl");
    std::fs::write(&lines, export_lines()).unwrap();
    let store = dir.path().join("results");
    run(&store, &["import", lines.to_str().unwrap()]);
    let out = Command::new(xlab())
        .arg("--store")
        .arg(&store)
        .args(["query", "seed == 99", "-m", "test.acc"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("the filter matched 0 of the 8 job(s) of experiment `formats`"), "{err}");
    let out = Command::new(xlab())
        .arg("--store")
        .arg(&store)
        .args(["query", "seed == 99", "-m", "test.accc"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no metric `test.accc`") && err.contains("did you mean `test.acc`?"), "{err}");
}

/// `--group-by` with a key no job has is refused with a did-you-mean, instead of one group with
/// an empty key.
#[test]
fn an_unknown_group_by_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("formats.jsonl");
    std::fs::write(&lines, export_lines()).unwrap();
    let store = dir.path().join("results");
    run(&store, &["import", lines.to_str().unwrap()]);
    let out = Command::new(xlab()).arg("--store").arg(&store).args(["query", "--group-by", "stagee"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--group-by `stagee`") && err.contains("did you mean `stage`?"), "{err}");
    run(&store, &["query", "--group-by", "optimizer.lr"]);
}

/// Every name a query is given is checked against what the experiment's jobs hold: a typo in a
/// filter, `-m`, `--agg`, `--sort`, `--x` or a plot's metric is an error (exit 2) with a
/// "did you mean", never an empty table; an unquoted word gets a hint to quote it; a bare
/// metric name means its final value.
#[test]
fn typos_in_queries_and_plots_are_errors_with_a_did_you_mean() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("formats.jsonl");
    std::fs::write(&lines, export_lines()).unwrap();
    let store = dir.path().join("results");
    run(&store, &["import", lines.to_str().unwrap()]);
    let cases: &[(&[&str], &str)] = &[
        (&["query", "last(val.accuracy) > 0.5"], "did you mean `val.acc`?"),
        (&["query", "max(test.acc) > 0.5 and optimizer.lrr < 1"], "did you mean `optimizer.lr`?"),
        (&["query", "stage == train"], r#"quote it: `stage == "train"`"#),
        (&["query", "--group-by", "stage", "--sort", "-mean(test.accc)"], "did you mean `mean(test.acc)`?"),
        (&["query", "--agg", "mean(test.ac),count()"], "did you mean `test.acc`?"),
        (&["plot", "test.accuracy"], "did you mean `test.acc`?"),
        (&["plot", "test.acc", "--x", "optimizer.lrr"], "did you mean `optimizer.lr`?"),
        (&["plot", "test.acc", "--filter", "seeed == 1"], "did you mean `seed`?"),
    ];
    for (args, hint) in cases {
        let out = Command::new(xlab()).arg("--store").arg(&store).current_dir(dir.path()).args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(hint), "{args:?}: {err}");
    }
    // `val.acc > 0.8` is `last(val.acc) > 0.8`.
    let bare = run(&store, &["query", "val.acc > 0.8", "--format", "csv"]);
    let last = run(&store, &["query", "last(val.acc) > 0.8", "--format", "csv"]);
    assert_eq!(bare, last);
    assert_eq!(bare.lines().count(), 2, "only the lr=0.1 row: {bare}");
}

/// `xlab show` is readable by default and takes a unique prefix of an id; `xlab experiments`
/// lists what the store holds.
#[test]
fn show_reads_well_and_takes_a_prefix_and_experiments_lists_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("formats.jsonl");
    std::fs::write(&lines, export_lines()).unwrap();
    let store = dir.path().join("results");
    run(&store, &["import", lines.to_str().unwrap()]);
    let shown = run(&store, &["show", "0000000000000002"]);
    for want in [
        "job 0000000000000002: done",
        "stage `train`, seed 1",
        "point: optimizer.lr=0.01",
        "optimizer.name: sgd",
        "test.acc",
    ] {
        assert!(shown.contains(want), "{want}: {shown}");
    }
    let json: serde_json::Value = serde_json::from_str(&run(&store, &["show", "0000000000000002", "--json"])).unwrap();
    assert_eq!(json["metrics"]["test.acc"].as_array().unwrap().len(), 2);
    let out = Command::new(xlab()).arg("--store").arg(&store).args(["show", "000000000000000"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is the start of more than 5 job ids"), "{err}");
    let listed = run(&store, &["experiments"]);
    assert!(
        listed.contains("formats") && listed.contains("8: 7 done, 1 failed") && listed.contains("train, tune"),
        "{listed}"
    );
}
