//! `xlab query --compare-to`: paired comparisons against a baseline over shared seeds, checked
//! against scipy on the same differences, over a store `xlab import` builds from fixed records.
//! Also the seed aggregates (`iqm`, `bootstrap_ci`, `pareto`).

mod common;

use common::{python, xlab};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// Two datasets × three methods; `erm` and `a` over six seeds, `b` over two. `a` is better than
/// `erm` by about 0.02 on `d1` and about nothing on `d2`.
fn lines() -> String {
    let noise = [0.004, -0.007, 0.011, -0.002, 0.006, -0.009];
    let mut jobs = Vec::new();
    let mut ids = Vec::new();
    for (dataset, base) in [("d1", 0.80), ("d2", 0.70)] {
        for (method, effect, seeds) in [("erm", 0.0, 6), ("a", 0.02, 6), ("b", -0.01, 2)] {
            for seed in 0..seeds {
                let id = format!("{:016x}", ids.len() + 1);
                let effect = if dataset == "d2" && method == "a" { 0.0 } else { effect };
                // Each method's own noise per seed, so the differences vary.
                let acc = base + effect + noise[seed] + noise[(seed + method.len()) % 6] * 0.5;
                let job = json!({
                    "id": id, "experiment": "cmp", "stage": "train", "seed": seed,
                    "config": {"task": "train", "data": {"name": dataset}, "method": method},
                    "point": [["data.name", dataset], ["method", method]], "parents": [], "status": "done",
                    "attempts": [], "summary": {"test.acc": acc, "test.loss": 1.0 - acc},
                    "provenance": {"xlab_version": "test", "libtorch": null, "host": null, "device": null},
                    "artifacts": []
                });
                jobs.push(json!({"type": "job", "job": job, "metrics": {}}).to_string());
                ids.push(id);
            }
        }
    }
    let exp = json!({"type": "experiment", "name": "cmp", "file": "cmp.yaml", "source": "", "updated_unix": 0,
        "stages": [{"name": "train", "sweep_keys": ["data.name", "method"], "jobs": ids}]});
    std::iter::once(exp.to_string()).chain(jobs).map(|l| l + "\n").collect()
}

fn store() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cmp.jsonl");
    std::fs::write(&file, lines()).unwrap();
    let store = dir.path().join("results");
    let out = Command::new(xlab()).arg("--store").arg(&store).arg("import").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (dir, store)
}

fn query(store: &Path, args: &[&str]) -> std::process::Output {
    Command::new(xlab()).arg("--store").arg(store).arg("query").args(args).env("NO_COLOR", "1").output().unwrap()
}

fn json_query(store: &Path, args: &[&str]) -> Vec<Value> {
    let out = query(store, &[args, &["--format", "json"]].concat());
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// scipy's ttest_rel and wilcoxon p-values on `d`.
fn scipy_p(d: &[f64]) -> (f64, f64) {
    let code = format!(
        "from scipy import stats; d = {d:?}; print(stats.ttest_rel(d, [0.0] * len(d)).pvalue, stats.wilcoxon(d).pvalue)"
    );
    let out = Command::new(python()).args(["-c", &code]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let p: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (p[0], p[1])
}

fn accs(rows: &[Value], dataset: &str, method: &str) -> Vec<f64> {
    rows.iter()
        .filter(|r| r["data.name"] == dataset && r["method"] == method)
        .map(|r| r["test.acc"].as_f64().unwrap())
        .collect()
}

#[test]
fn paired_comparisons_match_scipy_and_pair_within_what_varies_in_the_baseline() {
    let (_dir, store) = store();
    // The jobs one by one (ordered by seed within a point), for the expected differences.
    let jobs = json_query(&store, &["--group-by", "data.name,method,seed", "--agg", "mean(test.acc)"]);
    let jobs: Vec<Value> = jobs
        .into_iter()
        .map(|mut r| {
            r["test.acc"] = r["mean(test.acc)"].clone();
            r
        })
        .collect();
    let rows = json_query(&store, &["--compare-to", "method == \"erm\"", "-m", "test.acc"]);
    assert_eq!(rows.len(), 6, "{rows:#?}");
    for dataset in ["d1", "d2"] {
        let erm = accs(&jobs, dataset, "erm");
        let base = rows.iter().find(|r| r["data.name"] == dataset && r["method"] == "erm").unwrap();
        assert_eq!(base["diff(test.acc)"], Value::Null, "the baseline's own row has no difference");
        // `a` pairs with `erm` of the same dataset (the key varying within the baseline), seed by seed.
        let a = accs(&jobs, dataset, "a");
        let d: Vec<f64> = a.iter().zip(&erm).map(|(x, y)| x - y).collect();
        let row = rows.iter().find(|r| r["data.name"] == dataset && r["method"] == "a").unwrap();
        let mean = d.iter().sum::<f64>() / 6.0;
        assert!((row["diff(test.acc)"].as_f64().unwrap() - mean).abs() < 1e-12, "{row}");
        assert_eq!(row["pairs(test.acc)"], 6.0);
        let (p_t, p_w) = scipy_p(&d);
        assert!((row["p_t(test.acc)"].as_f64().unwrap() - p_t).abs() < 1e-9, "{row} vs scipy {p_t}");
        let ci = row["diff_ci95(test.acc)"].as_array().unwrap();
        let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
        assert!(lo <= mean && mean <= hi && lo < hi, "{row}");
        if dataset == "d1" {
            assert!(lo > 0.0 && p_t < 0.01, "a clear gain is clear: {row}");
        } else {
            assert!(lo < 0.0 && hi > 0.0 && p_t > 0.05, "no gain is no gain: {row}");
        }
        let wil = json_query(&store, &["--compare-to", "method == \"erm\"", "-m", "test.acc", "--test", "wilcoxon"]);
        let wrow = wil.iter().find(|r| r["data.name"] == dataset && r["method"] == "a").unwrap();
        assert!((wrow["p_wilcoxon(test.acc)"].as_f64().unwrap() - p_w).abs() < 1e-9, "{wrow} vs scipy {p_w}");
        // `b` shares two seeds: a difference, and no interval or p-value.
        let b = rows.iter().find(|r| r["data.name"] == dataset && r["method"] == "b").unwrap();
        assert_eq!(b["pairs(test.acc)"], 2.0);
        assert!(b["diff(test.acc)"].is_f64() && b["p_t(test.acc)"].is_null() && b["diff_ci95(test.acc)"].is_null());
    }
    // People see why: the note instead of a p-value, and the same numbers every time.
    let text = |args: &[&str]| String::from_utf8(query(&store, args).stdout).unwrap();
    let table = text(&["--compare-to", "method == \"erm\"", "-m", "test.acc"]);
    assert!(table.contains("2 shared seeds") && table.contains("baseline"), "{table}");
    assert_eq!(table, text(&["--compare-to", "method == \"erm\"", "-m", "test.acc"]), "the bootstrap is seeded");
    let csv = text(&["--compare-to", "method == \"erm\"", "-m", "test.acc", "--format", "csv"]);
    assert!(
        csv.lines().next().unwrap().contains("diff_ci95(test.acc).lo,diff_ci95(test.acc).hi,p_t(test.acc)"),
        "{csv}"
    );
}

#[test]
fn an_ambiguous_or_empty_baseline_is_refused_with_what_to_do() {
    let (_dir, store) = store();
    // Grouped by method alone, `erm` has two jobs per seed (one per dataset).
    let out = query(&store, &["--group-by", "method", "--compare-to", "method == \"erm\""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("more than one done job of seed 0") && err.contains("hint: narrow the filter"), "{err}");
    // Narrowed to one dataset it pairs.
    let rows =
        json_query(&store, &["data.name == \"d1\"", "--group-by", "method", "--compare-to", "method == \"erm\""]);
    assert_eq!(rows.len(), 3);
    let out = query(&store, &["--compare-to", "method == \"sgd\""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--compare-to matched none of the 28 job(s)"), "{err}");
    let out = query(&store, &["--compare-to", "methd == \"erm\""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--compare-to") && err.contains("did you mean `method`"), "{err}");
}

#[test]
fn seed_aggregates_iqm_bootstrap_and_pareto() {
    let (_dir, store) = store();
    let rows = json_query(
        &store,
        &[
            "data.name == \"d1\"",
            "--agg",
            "mean(test.acc),iqm(test.acc),bootstrap_ci(test.acc),pareto(test.acc, test.loss)",
        ],
    );
    let jobs = json_query(&store, &["data.name == \"d1\"", "--group-by", "method,seed", "--agg", "mean(test.acc)"]);
    for r in &rows {
        let mut xs: Vec<f64> =
            jobs.iter().filter(|j| j["method"] == r["method"]).map(|j| j["mean(test.acc)"].as_f64().unwrap()).collect();
        xs.sort_by(f64::total_cmp);
        let cut = xs.len() / 4;
        let iqm = xs[cut..xs.len() - cut].iter().sum::<f64>() / (xs.len() - 2 * cut) as f64;
        assert!((r["iqm(test.acc)"].as_f64().unwrap() - iqm).abs() < 1e-12, "{r}");
        let ci = r["bootstrap_ci(test.acc)"].as_array().unwrap();
        let mean = r["mean(test.acc)"].as_f64().unwrap();
        assert!(ci[0].as_f64().unwrap() <= mean && mean <= ci[1].as_f64().unwrap(), "{r}");
    }
    // test.loss is 1 − acc and lower-is-better by name: only the best mean is on the front.
    let front: Vec<&Value> = rows.iter().filter(|r| r["pareto(test.acc, test.loss)"] == true).collect();
    assert_eq!(front.len(), 1, "{rows:#?}");
    assert_eq!(front[0]["method"], "a");
    // Told that higher loss is better, every point is on the front (the two trade off exactly).
    let rows = json_query(&store, &["data.name == \"d1\"", "--agg", "pareto(test.acc, +test.loss)"]);
    assert!(rows.iter().all(|r| r["pareto(test.acc, +test.loss)"] == true), "{rows:#?}");
    let out = query(&store, &["--agg", "pareto(test.acc)"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("takes two metrics"));
}
