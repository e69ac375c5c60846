//! Adaptive search (`search:` on a stage): ASHA pauses trials at rungs (their checkpoints are the
//! pause), promotes the best by continuing from there, prunes the rest, and records every
//! decision before acting on it. Real coordinator, worker processes and store.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

mod common;
use common::{attempts, cmd, job_ids, snapshot, text, weights, write_file};

/// Nine learning rates, 9 epochs each; rungs at 1, 3 and 9 epochs with η = 3.
const SEARCH: &str = r#"name: asha
defaults:
  task: train
  deterministic: true
  data: {name: two_moons, n_train: 1000, n_val: 200, n_test: 200, noise: 0.3}
  model: {name: mlp, hidden: [32]}
  optimizer: {name: sgd, momentum: 0.9}
  batch_size: 32
  epochs: 9
stages:
  train:
    grid:
      optimizer.lr: [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    search:
      algorithm: asha
      metric: val.loss
      mode: min
      min_epochs: 1
      reduction: 3
"#;

/// TPE over a learning rate and a width, with ASHA stopping its trials early.
const TPE: &str = r#"name: tpe
defaults:
  task: train
  deterministic: true
  data: {name: two_moons, n_train: 1000, n_val: 200, n_test: 200, noise: 0.3}
  model: {name: mlp, hidden: [32]}
  optimizer: {name: sgd, momentum: 0.9}
  batch_size: 32
  epochs: 9
stages:
  train:
    random:
      optimizer.lr: loguniform(0.0003, 3.0)
      model.hidden: choice([[16], [32]])
    search:
      algorithm: tpe
      metric: val.loss
      mode: min
      trials: 10
      startup: 4
      seed: 3
      stopping: asha
      min_epochs: 1
      reduction: 3
"#;

fn run_ok(store: &Path, file: &Path) -> String {
    let out = cmd(store).arg("run").arg(file).args(["-j", "1"]).env("XLAB_NO_LIVE", "1").output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    err
}

fn decisions(store: &Path) -> Vec<serde_json::Value> {
    decisions_of(store, "asha")
}

fn decisions_of(store: &Path, experiment: &str) -> Vec<serde_json::Value> {
    let out = cmd(store).args(["search-log", experiment, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn asha_pauses_promotes_from_checkpoints_prunes_and_records_every_decision() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "search.yaml", SEARCH);
    let store = dir.path().join("results");
    let plan = text(&cmd(&store).arg("plan").arg(&file).output().unwrap().stdout);
    assert!(
        plan.contains("search of `train`: ASHA over 9 trial(s) by val.loss (min), rungs at epochs 1, 3, 9 (η = 3)"),
        "{plan}"
    );
    assert!(plan.contains("at most 81 epochs"), "{plan}");

    let err = run_ok(&store, &file);
    assert!(err.contains("epochs trained of the 81 an exhaustive sweep would"), "{err}");
    let log = decisions(&store);
    let kind = |k: &str| log.iter().filter(|d| d["kind"] == k).count();
    assert_eq!(kind("start"), 9, "every trial starts once");
    assert!(kind("promote") >= 2, "{log:?}");
    let ids = job_ids(&store, &file);
    let mut finished = Vec::new();
    for id in &ids {
        let v: serde_json::Value =
            serde_json::from_slice(&cmd(&store).args(["show", id, "--json"]).output().unwrap().stdout).unwrap();
        let epochs = v["metrics"]["val.loss"].as_array().unwrap().len() as u64;
        match v["status"].as_str().unwrap() {
            "done" => {
                assert_eq!(epochs, 9);
                finished.push(id.clone());
            }
            "pruned" => {
                // It trained to the rung it was pruned at, not an epoch more.
                let at = log.iter().find(|d| d["kind"] == "prune" && d["trial"] == id.as_str()).unwrap();
                assert_eq!(epochs, at["epoch"].as_u64().unwrap(), "{id}");
            }
            other => panic!("{id} is {other}"),
        }
        // `xlab show` of a trial lists the decisions about it.
        let ours = v["decisions"].as_array().unwrap();
        assert!(!ours.is_empty() && ours.iter().all(|d| d["trial"] == id.as_str()), "{id}: {ours:?}");
        // A promoted trial continues from its checkpoint: one attempt per rung it ran towards.
        let promoted = log.iter().filter(|d| d["kind"] == "promote" && d["trial"] == id.as_str()).count();
        let tried = attempts(&store, id);
        assert_eq!(tried.len(), promoted + 1, "{id}: {tried:?}");
        assert!(tried[..promoted].iter().all(|a| a == "paused"), "{id}: {tried:?}");
    }
    assert_eq!(kind("prune"), 9 - finished.len());
    // Every promotion took a trial ranked within the best ⌊n/η⌋ of its rung.
    for d in log.iter().filter(|d| d["kind"] == "promote") {
        assert!(d["rank"].as_u64().unwrap() <= d["keep"].as_u64().unwrap(), "{d}");
        assert_eq!(d["keep"].as_u64().unwrap(), d["of"].as_u64().unwrap() / 3, "{d}");
    }

    // A trial trained to the end through its rungs is the same job as the plain run of its
    // config, with the same series and weights: rungs are state, not identity.
    let plain = write_file(dir.path(), "plain.yaml", SEARCH.split("    search:").next().unwrap());
    let reference = dir.path().join("reference");
    run_ok(&reference, &plain);
    assert_eq!(job_ids(&reference, &plain), ids, "the same jobs");
    assert_eq!(snapshot(&store, &finished), snapshot(&reference, &finished));
    assert_eq!(weights(&store, &finished), weights(&reference, &finished));
    // And that plain run on the search's store trains the pruned trials on from their rungs.
    let again = run_ok(&store, &plain);
    assert!(again.contains("resumed train"), "{again}");
}

/// Runs `text` whole on one store and killed at 10 random moments on another, then to the end:
/// the same decisions in the same order, the same jobs and the same results.
fn killed_at_random_moments(text_of_file: &str, experiment: &str) {
    let dir = tempfile::tempdir().unwrap();
    // Four times the data of the other tests: long enough a search that 10 kills land in it.
    let file = write_file(dir.path(), "search.yaml", &text_of_file.replace("n_train: 1000", "n_train: 4000"));
    let whole = dir.path().join("whole");
    let t0 = std::time::Instant::now();
    run_ok(&whole, &file);
    // Kills come at most 8% of an uninterrupted run's time (on this machine, under its present
    // load) after a start, so that most of them land inside the search even when the load
    // drops and later runs go faster than the measured one (at 15%, a lighter machine once
    // finished the search after 4 kills).
    let whole_ms = t0.elapsed().as_millis() as u64;
    let expected = decisions_of(&whole, experiment);

    let store = dir.path().join("results");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut kills = 0;
    for _ in 0..10 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut child = cmd(&store)
            .arg("run")
            .arg(&file)
            .args(["-j", "1"])
            .env("XLAB_NO_LIVE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300 + state % (whole_ms * 8 / 100).max(1)));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    assert!(kills >= 5, "the search ended after {kills} kills");
    run_ok(&store, &file);
    let got = decisions_of(&store, experiment);
    if got != expected {
        // Both logs, whole, for whoever looks into it.
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("search-kills-{experiment}.json"));
        let _ = std::fs::create_dir_all(keep.parent().unwrap());
        let _ = std::fs::write(&keep, serde_json::json!({"uninterrupted": expected, "killed": got}).to_string());
        panic!(
            "after {kills} kills the decisions differ from an uninterrupted run's; both logs are in {}",
            keep.display()
        );
    }
    let ids = job_ids(&store, &file);
    assert_eq!(ids, job_ids(&whole, &file));
    assert_eq!(snapshot(&store, &ids), snapshot(&whole, &ids));
}

#[test]
fn a_search_killed_at_random_moments_records_the_same_decisions() {
    killed_at_random_moments(SEARCH, "asha");
}

#[test]
fn a_tpe_search_killed_at_random_moments_proposes_and_decides_the_same() {
    killed_at_random_moments(TPE, "tpe");
}

#[test]
fn a_hyperband_search_killed_at_random_moments_records_the_same_decisions() {
    killed_at_random_moments(&SEARCH.replace("algorithm: asha", "algorithm: hyperband"), "asha");
}

#[test]
fn hyperband_runs_brackets_of_asha_from_each_rung() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "hb.yaml", &SEARCH.replace("algorithm: asha", "algorithm: hyperband"));
    let store = dir.path().join("results");
    let plan = text(&cmd(&store).arg("plan").arg(&file).output().unwrap().stdout);
    assert!(
        plan.contains("Hyperband over 9 trial(s) by val.loss (min) in 3 brackets (5 from epoch 1, 2 from epoch 3, 2 from epoch 9)"),
        "{plan}"
    );
    run_ok(&store, &file);
    let log = decisions(&store);
    // Numbered in one sequence across the brackets.
    let seqs: Vec<u64> = log.iter().map(|d| d["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..log.len() as u64).collect::<Vec<_>>());
    for (bracket, first_rung, trials) in [(0, 1, 5), (1, 3, 2), (2, 9, 2)] {
        let ours: Vec<&serde_json::Value> = log.iter().filter(|d| d["bracket"] == bracket).collect();
        let starts: Vec<&&serde_json::Value> = ours.iter().filter(|d| d["kind"] == "start").collect();
        assert_eq!(starts.len(), trials, "bracket {bracket}: {ours:?}");
        assert!(starts.iter().all(|d| d["epoch"] == first_rung), "bracket {bracket} starts towards epoch {first_rung}");
        // Each bracket trains its best trial to the end, even one too small for ⌊n/η⌋.
        let ended = starts
            .iter()
            .filter(|d| {
                let v: serde_json::Value = serde_json::from_slice(
                    &cmd(&store).args(["show", d["trial"].as_str().unwrap(), "--json"]).output().unwrap().stdout,
                )
                .unwrap();
                v["status"] == "done"
            })
            .count();
        assert!(ended >= 1, "bracket {bracket}: {ours:?}");
    }
    assert!(log.iter().all(|d| d["bracket"].is_u64()), "{log:?}");
}

#[test]
fn tpe_proposes_trials_records_each_proposal_first_and_identifies_them_as_plain_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "tpe.yaml", TPE);
    let store = dir.path().join("results");
    let plan = text(&cmd(&store).arg("plan").arg(&file).output().unwrap().stdout);
    assert!(plan.contains("a TPE search over optimizer.lr, model.hidden: 0 of 10 trial(s) proposed so far"), "{plan}");
    assert!(
        plan.contains("TPE proposes 10 trial(s) by val.loss (min), the first 4 at random (seed 3); stopped early by ASHA at epochs 1, 3, 9 (η = 3)"),
        "{plan}"
    );
    let err = run_ok(&store, &file);
    assert!(err.contains("[10/10]") || err.contains("/10]"), "trials count towards the total: {err}");
    let log = decisions_of(&store, "tpe");
    let suggested: Vec<&serde_json::Value> = log.iter().filter(|d| d["kind"] == "suggest").collect();
    assert_eq!(suggested.len(), 10, "{log:?}");
    let methods: Vec<&str> = suggested.iter().map(|d| d["method"].as_str().unwrap()).collect();
    assert_eq!(methods[..4], ["random"; 4]);
    assert!(methods[4..].iter().all(|m| *m == "tpe"), "{methods:?}");
    for d in &suggested {
        // Written before the trial started, with a point inside the space.
        let start = log.iter().find(|s| s["kind"] == "start" && s["trial"] == d["trial"]).unwrap();
        assert!(start["seq"].as_u64() > d["seq"].as_u64(), "{d} before {start}");
        let lr = d["params"]["optimizer.lr"].as_f64().unwrap();
        assert!((0.0003..3.0).contains(&lr), "{d}");
        assert!([serde_json::json!([16]), serde_json::json!([32])].contains(&d["params"]["model.hidden"]), "{d}");
    }
    let ids = job_ids(&store, &file);
    assert_eq!(ids.len(), 10);
    let plan = text(&cmd(&store).arg("plan").arg(&file).output().unwrap().stdout);
    assert!(plan.contains("10 of 10 trial(s) proposed so far"), "{plan}");

    // The trial that trained to the end is the job a plain grid over its point is.
    let best = suggested
        .iter()
        .find(|d| {
            let v: serde_json::Value = serde_json::from_slice(
                &cmd(&store).args(["show", d["trial"].as_str().unwrap(), "--json"]).output().unwrap().stdout,
            )
            .unwrap();
            v["status"] == "done"
        })
        .expect("a trial reached the end");
    let (lr, hidden) = (&best["params"]["optimizer.lr"], &best["params"]["model.hidden"]);
    let plain = TPE.split("    random:").next().unwrap().to_string()
        + &format!("    grid:\n      optimizer.lr: [{lr}]\n      model.hidden: [{hidden}]\n");
    let plain = write_file(dir.path(), "plain.yaml", &plain.replace("name: tpe", "name: plain"));
    assert_eq!(job_ids(&store, &plain), [best["trial"].as_str().unwrap().to_string()]);
    // Run again, the search is done: nothing trains, nothing is decided.
    let again = run_ok(&store, &file);
    assert!(!again.contains("started train"), "{again}");
    assert_eq!(decisions_of(&store, "tpe"), log);
}

#[test]
fn search_mistakes_are_refused_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    for (change, says) in [
        ("reduction: 3", "reduction: 1", "`reduction` is η"),
        ("min_epochs: 1", "min_epochs: 10", "`min_epochs` is the first rung: from 1 to the stage's `epochs` (9)"),
        ("algorithm: asha", "algorithm: bohb", "unknown variant `bohb`"),
        ("algorithm: asha", "algorithm: tpe", "TPE proposes points from distributions, not from a `grid:`"),
        ("      reduction: 3\n", "      reduction: 3\n      trials: 8\n", "`trials` is TPE's"),
        ("metric: val.loss", "metric: loss", "`loss` is not a metric trials log at every epoch"),
        ("metric: val.loss", "metric: val.los", "no trial logs `val.los`"),
        ("metric: val.loss", "metric: val.accuracy", "did you mean `val.acc`?"),
        ("metric: val.loss", "metric: val.worst_group_acc", "the stage's data has no groups"),
        ("n_val: 200", "n_val: 0", "the stage's data has no validation split"),
        ("      reduction: 3\n", "      reduction: 3\n      patience: 2\n", "unknown field `patience`"),
    ]
    .map(|(a, b, c)| ((a, b), c))
    {
        let f = write_file(dir.path(), "bad.yaml", &SEARCH.replace(change.0, change.1));
        let out = cmd(&store).arg("validate").arg(&f).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", change.1);
        assert!(err.contains(says), "{}: {err}", change.1);
        assert!(err.contains("bad.yaml:"), "at its line: {err}");
    }
    let swept = write_file(
        dir.path(),
        "epochs.yaml",
        &SEARCH.replace("      optimizer.lr: [", "      epochs: [3, 9]\n      optimizer.lr: ["),
    );
    let out = cmd(&store).arg("validate").arg(&swept).output().unwrap();
    assert!(text(&out.stderr).contains("share one budget"), "{}", text(&out.stderr));

    for (change, says) in [
        (("      trials: 10\n", ""), "TPE needs `trials`"),
        (
            (
                "    random:\n      optimizer.lr: loguniform(0.0003, 3.0)\n      model.hidden: choice([[16], [32]])\n",
                "",
            ),
            "TPE proposes points from the distributions of `random:`, and this stage has none",
        ),
        (("    random:\n", "    random:\n      samples: 8\n"), "`random.samples` does not apply under TPE"),
        (("    random:\n", "    seeds: 2\n    random:\n"), "TPE proposes one job per trial, but `seeds` gives 2"),
        (("      stopping: asha\n", ""), "`min_epochs` shapes early stopping"),
        (("      startup: 4", "      startup: 0"), "`startup` must be at least 1"),
        (("      stopping: asha", "      stopping: median"), "unknown variant `median`"),
        (("uniform(0.0003, 3.0)", "uniform(3.0, 0.0003)"), "the low end must be below the high end"),
        (
            ("stages:\n", "stages:\n  eval:\n    task: evaluate\n    needs: train\n"),
            "`train` is a TPE search, whose trials are only known as it runs",
        ),
    ] {
        let f = write_file(dir.path(), "bad.yaml", &TPE.replace(change.0, change.1));
        let out = cmd(&store).arg("validate").arg(&f).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", change.1);
        assert!(err.contains(says), "{}: {err}", change.1);
        assert!(err.contains("bad.yaml:"), "at its line: {err}");
    }
}
