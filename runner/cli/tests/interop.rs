//! Results where researchers work: `xlab export --format parquet` read by pandas and polars,
//! `xlab query --format parquet|arrow`, `xlab export --format tensorboard` read by TensorBoard's
//! own event reader, and the `xlab_results` Python package, each checked value for value
//! against the JSONL export and the query JSON (runner/cli/tests/interop_check.py). The store
//! holds NaN and infinite values, a running job and an empty experiment.

mod common;

use common::{cmd, python, text};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output};

fn lines() -> String {
    let mut out = Vec::new();
    let mut ids = Vec::new();
    let mut n = 0;
    for lr in [0.01, 0.1] {
        for seed in 0..3u64 {
            n += 1;
            let id = format!("{n:016x}");
            let (status, last) = match (lr, seed) {
                (0.1, 2) => ("running", 2),
                (0.1, 1) => ("failed", 3),
                _ => ("done", 4),
            };
            let acc = |s: u64| 0.5 + lr * 2.0 + s as f64 * 0.05 + seed as f64 * 0.01;
            let mut val: Vec<serde_json::Value> = (1..=last).map(|s| json!([s, acc(s)])).collect();
            let mut loss: Vec<serde_json::Value> = (1..=last).map(|s| json!([s, 1.0 / (s as f64 + lr)])).collect();
            let mut summary = json!({"test.acc": acc(last), "test.loss": 1.0 / (last as f64 + lr)});
            if status == "failed" {
                // A diverged job: its loss went to NaN and then to infinity.
                loss.push(json!([last + 1, "NaN"]));
                val.push(json!([last + 1, "-inf"]));
                summary = json!({"test.loss": "NaN", "test.acc": "-inf"});
            }
            if status == "running" {
                summary = json!({});
            }
            let job = json!({
                "id": id, "experiment": "interop", "stage": "train", "seed": seed,
                "config": {"task": "train", "deterministic": seed == 0, "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
                           "model": {"name": "mlp", "hidden": [16, 8]}, "epochs": 4,
                           "data": {"name": "csv", "path": {"path": "/data/points.csv", "sha256": "ab12"}}},
                "point": [["optimizer.lr", lr]], "parents": [], "status": status,
                "attempts": [{"number": 1, "started_unix": 1_790_000_000u64 + n, "ended_unix": if status == "running" { None } else { Some(1_790_000_100u64 + n) },
                              "device": "cpu", "pid": null, "outcome": null, "error": null}],
                "summary": summary,
                "provenance": {"xlab_version": "0.1.0", "libtorch": "2.11.0", "host": "lab1", "device": "cpu", "threads": 1,
                               "plugins": [{"id": "sam", "version": "0.1.0", "file": "/p/libxlab_plugin_sam.so", "sha256": "ff00"}]},
                "artifacts": []
            });
            out.push(json!({"type": "job", "job": job, "metrics": {"val.acc": val, "train.loss": loss}}).to_string());
            ids.push(id);
        }
    }
    let exp = json!({"type": "experiment", "name": "interop", "file": "interop.yaml", "source": "", "updated_unix": 1,
        "stages": [{"name": "train", "sweep_keys": ["optimizer.lr"], "jobs": ids}]});
    let empty = json!({"type": "experiment", "name": "nothing-yet", "file": "nothing.yaml", "source": "", "updated_unix": 0,
        "stages": [{"name": "train", "sweep_keys": [], "jobs": []}]});
    [exp.to_string(), empty.to_string()].into_iter().chain(out).map(|l| l + "\n").collect()
}

fn ok(out: Output) -> (String, String) {
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    (text(&out.stdout), text(&out.stderr))
}

fn store(dir: &Path) -> std::path::PathBuf {
    std::fs::write(dir.join("in.jsonl"), lines()).unwrap();
    let store = dir.join("results");
    ok(cmd(&store).arg("import").arg(dir.join("in.jsonl")).output().unwrap());
    ok(cmd(&store).args(["export", "--format", "jsonl", "-o"]).arg(dir.join("all.jsonl")).output().unwrap());
    store
}

fn check(args: &[&Path], what: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop_check.py");
    let out = Command::new(python()).arg(script).arg(what).args(args).output().unwrap();
    let (stdout, _) = ok(out);
    stdout
}

#[test]
fn parquet_tables_read_in_pandas_and_polars_equal_the_jsonl_export() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let out = dir.path().join("tables");
    let (said, notes) = ok(cmd(&store).args(["export", "--format", "parquet", "-o"]).arg(&out).output().unwrap());
    assert!(said.contains("6 job(s) in jobs.parquet, 44 point(s) of 2 metric(s)"), "{said}");
    assert!(notes.contains("1 job(s) are still running"), "{notes}");
    assert!(notes.contains("experiment(s) with no jobs, left out: nothing-yet"), "{notes}");
    assert!(notes.contains("2 final metric value(s) are NaN or infinite"), "{notes}");
    let checked = check(&[&out, &dir.path().join("all.jsonl")], "parquet");
    assert!(
        checked.contains("pandas: 6 jobs and 44 points equal")
            && checked.contains("polars: 6 jobs and 44 points equal")
    );

    // The folder it wrote before is written over; a folder with other files is refused.
    ok(cmd(&store).args(["export", "--format", "parquet", "-o"]).arg(&out).output().unwrap());
    let other = dir.path().join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("paper.tex"), "draft").unwrap();
    let refused = cmd(&store).args(["export", "--format", "parquet", "-o"]).arg(&other).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(text(&refused.stderr).contains("already holds other files (paper.tex)"), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("--force"));
    ok(cmd(&store).args(["export", "--format", "parquet", "--force", "-o"]).arg(&other).output().unwrap());
    assert!(other.join("paper.tex").exists() && other.join("jobs.parquet").exists());
    let typo = cmd(&store)
        .args(["export", "--format", "parquet", "-m", "val.acx", "-o"])
        .arg(dir.path().join("t"))
        .output()
        .unwrap();
    assert_eq!(typo.status.code(), Some(2));
    assert!(text(&typo.stderr).contains("did you mean `val.acc`?"), "{}", text(&typo.stderr));
    let no_dir = cmd(&store).args(["export", "--format", "parquet"]).output().unwrap();
    assert!(text(&no_dir.stderr).contains("hint: name it with -o DIR"), "{}", text(&no_dir.stderr));

    // The query table as Parquet and Arrow: the same numbers as its JSON.
    let (q, _) = ok(cmd(&store).args(["query", "-e", "interop", "--format", "json"]).output().unwrap());
    std::fs::write(dir.path().join("q.json"), q).unwrap();
    for format in ["parquet", "arrow"] {
        let file = dir.path().join(format!("q.{format}"));
        ok(cmd(&store).args(["query", "-e", "interop", "--format", format, "-o"]).arg(&file).output().unwrap());
    }
    let checked =
        check(&[&dir.path().join("q.json"), &dir.path().join("q.parquet"), &dir.path().join("q.arrow")], "query");
    assert!(checked.contains("parquet: 2 rows") && checked.contains("polars: 2 rows"), "{checked}");
}

#[test]
fn tensorboard_reads_back_every_series_and_the_hyperparameters() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let out = dir.path().join("tb");
    for _ in 0..2 {
        // Twice: an export over an earlier one replaces its runs (no doubled points).
        let (said, _) = ok(cmd(&store).args(["export", "--format", "tensorboard", "-o"]).arg(&out).output().unwrap());
        assert!(said.contains("6 run(s) with 44 point(s) of 2 metric(s)"), "{said}");
    }
    let checked = check(&[&out, &dir.path().join("all.jsonl")], "tensorboard");
    assert!(checked.contains("tensorboard: 6 runs and 44 points equal"), "{checked}");
}

#[test]
fn the_python_package_installs_without_a_compiler_and_reads_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let site = dir.path().join("site");
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python/xlab_results");
    ok(Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
        ])
        .arg(&site)
        .arg(&package)
        .output()
        .unwrap());
    let code = r#"
import json, math, sys
import xlab_results as xr
store, query = sys.argv[1], json.load(open(sys.argv[2]))
jobs = xr.jobs(store, experiment="interop")
assert len(jobs) == 6, len(jobs)
assert jobs["config.optimizer.lr"].dtype == "float64" and jobs["seed"].dtype == "int64"
done = jobs[jobs.status == "done"]
means = done.groupby("config.optimizer.lr")["test.acc"].mean()
for row in query:
    assert abs(means[row["point"]["optimizer.lr"]] - row["metrics"]["test.acc"]["mean"]) < 1e-12, row
failed = jobs[jobs.status == "failed"].iloc[0]
assert math.isnan(failed["test.loss"]) and failed["test.acc"] == -math.inf
curves = xr.curves(store, "val.acc", experiment="interop")
assert len(curves) == 22 and {"job", "step", "value", "stage", "seed", "config.optimizer.lr"} <= set(curves.columns)
try:
    xr.read(store)
    raise SystemExit("a store is not an export")
except xr.NotAnExport as e:
    assert "is not an xlab export" in str(e)
try:
    xr.curves(store, "val.acx", experiment="interop")
    raise SystemExit("an unknown metric is an error")
except xr.XlabError as e:
    assert "did you mean `val.acc`?" in str(e), e
print("ok", len(jobs), len(curves))
"#;
    let (q, _) = ok(cmd(&store).args(["query", "-e", "interop", "--format", "json"]).output().unwrap());
    std::fs::write(dir.path().join("q.json"), q).unwrap();
    let out = Command::new(python())
        .args(["-c", code])
        .arg(&store)
        .arg(dir.path().join("q.json"))
        .env("PYTHONPATH", &site)
        .env("XLAB", common::xlab())
        .env("XLAB_WORKER", common::xlab().with_file_name("xlab-worker"))
        .output()
        .unwrap();
    let (said, _) = ok(out);
    assert_eq!(said.trim(), "ok 6 22");
}
