//! The dashboard's JSON: the store's experiments, an experiment's table (the rows of `xlab
//! query`, from the same code), learning curves with seed bands, and one job.

use super::cache::Reader;
use super::Reply;
use crate::common::*;
use crate::table;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use xlab_store::{JobStatus, ResultStore};

/// Every experiment, newest first, with its jobs counted by status.
pub(super) fn experiments(store: &Reader<'_>) -> Result<Reply, Failure> {
    let mut all = store.experiments()?;
    all.sort_by_key(|e| std::cmp::Reverse(e.updated_unix));
    let mut out = Vec::new();
    for e in &all {
        let ids: Vec<&str> = e.stages.iter().flat_map(|s| s.jobs.iter().map(String::as_str)).collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for rec in store.jobs_by_id(&ids)?.into_iter().flatten() {
            *counts.entry(rec.status.as_str()).or_default() += 1;
        }
        let stages: Vec<Value> = e.stages.iter().map(|s| json!({"name": s.name, "jobs": s.jobs.len()})).collect();
        out.push(json!({
            "name": e.name, "file": e.file, "updated_unix": e.updated_unix, "jobs": ids.len(),
            "counts": counts, "stages": stages,
        }));
    }
    Ok(Reply::json(&json!({
        "store": store.dir().display().to_string(),
        "live": store.is_live(),
        "experiments": out,
        "running": running(store),
    })))
}

/// Reads what the first pages need (every experiment's records, vocabulary and unfiltered rows)
/// while nobody waits for it.
pub(super) fn warm(store: &Reader<'_>) -> Result<Reply, Failure> {
    let reply = experiments(store)?;
    for e in store.experiments()? {
        let (exp, _, _) = experiment_and_filter(store, Some(&e.name), None)?;
        rows_of(store, &exp, None, None)?;
    }
    Ok(reply)
}

/// The jobs runs on the store are running now, from their status files: device, epoch, the
/// latest metrics, the rate and what is left.
pub(super) fn running_now(store: &Reader<'_>) -> Result<Reply, Failure> {
    let live = store.is_live();
    // The page reads a view again when the store's state changes; a run's store changes always.
    let version = (!live).then(|| store.generation());
    Ok(Reply::json(&json!({"live": live, "version": version, "running": running(store)})))
}

fn running(store: &Reader<'_>) -> Vec<Value> {
    let now = xlab_store::now_unix();
    let mut out = Vec::new();
    for run in crate::status::in_progress(store.dir()) {
        // SAFETY: kill(2) with signal 0 only asks whether the process exists.
        if unsafe { libc::kill(run.pid as i32, 0) } != 0 {
            continue;
        }
        for j in run.running {
            let secs = now.saturating_sub(j.started_unix).max(1) as f64;
            let rate = j.epoch as f64 / secs;
            let eta = (rate > 0.0).then(|| (j.epochs.saturating_sub(j.epoch)) as f64 / rate);
            out.push(json!({
                "experiment": run.experiment, "job": j.job, "stage": j.stage, "label": j.label, "device": j.device,
                "attempt": j.attempt, "epoch": j.epoch, "epochs": j.epochs, "metrics": j.metrics,
                "epochs_per_min": rate * 60.0, "eta_s": eta,
            }));
        }
    }
    out
}

/// The experiment named `exp` (or the newest), its vocabulary, and its filter bound to it.
fn experiment_and_filter(
    store: &Reader<'_>,
    exp: Option<&str>,
    filter: Option<&str>,
) -> Result<(xlab_store::ExperimentRecord, Arc<crate::vocab::Vocab>, Option<crate::filter::Filter>), Failure> {
    let exp = pick_experiment(store, exp.filter(|e| !e.is_empty()))?;
    let parsed = parse_filter(filter.filter(|f| !f.trim().is_empty()))?;
    let vocab = store.derived(&format!("vocab\0{}", exp.name), || Ok(crate::vocab::Vocab::of(store, &exp)?))?;
    let filter = bind_to(&vocab, parsed)?;
    Ok((exp, vocab, filter))
}

/// The rows of `xlab query` for an experiment and filter (kept while the store is unchanged).
fn rows_of(
    store: &Reader<'_>,
    exp: &xlab_store::ExperimentRecord,
    filter_text: Option<&str>,
    filter: Option<&crate::filter::Filter>,
) -> Result<Arc<Vec<table::Row>>, Failure> {
    let key = format!("rows\0{}\0{}", exp.name, filter_text.unwrap_or("").trim());
    store.derived(&key, || Ok(table::rows(store, exp, filter)?))
}

/// The experiment `exp` and those named in `with` (comma-separated), each with its vocabulary
/// and its rows under `filter` (bound to each experiment's keys).
type Shown = (xlab_store::ExperimentRecord, Arc<crate::vocab::Vocab>, Arc<Vec<table::Row>>);

fn several(
    store: &Reader<'_>,
    exp: Option<&str>,
    with: Option<&str>,
    filter: Option<&str>,
) -> Result<Vec<Shown>, Failure> {
    let (first, vocab, bound) = experiment_and_filter(store, exp, filter)?;
    let rows = rows_of(store, &first, filter, bound.as_ref())?;
    let mut out = vec![(first, vocab, rows)];
    for name in with.unwrap_or("").split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if out.iter().any(|(e, _, _)| e.name == name) {
            continue;
        }
        let (exp, vocab, bound) = experiment_and_filter(store, Some(name), filter)
            .map_err(|f| Failure { code: f.code, error: anyhow::anyhow!("with `{name}`: {:#}", f.error) })?;
        let rows = rows_of(store, &exp, filter, bound.as_ref())?;
        out.push((exp, vocab, rows));
    }
    Ok(out)
}

/// Refuses metrics that no shown experiment has (with the first one's "did you mean").
fn check_metrics_of(shown: &[Shown], metrics: &[String], what: &str) -> Result<(), Failure> {
    let missing: Vec<String> =
        metrics.iter().filter(|m| !shown.iter().any(|(_, v, _)| v.is_metric(m))).cloned().collect();
    check_metrics(&shown[0].1, &shown[0].0, &missing, what)
}

/// Items of `lists` in the order they first appear.
fn union<'a>(lists: impl Iterator<Item = &'a [String]>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in lists {
        for k in l {
            if !out.contains(k) {
                out.push(k.clone());
            }
        }
    }
    out
}

/// The rows of `xlab query` for an experiment (and any others shown with it): one per stage and
/// sweep point.
pub(super) fn table(
    store: &Reader<'_>,
    exp: Option<&str>,
    with: Option<&str>,
    filter: Option<&str>,
    metrics: Option<&str>,
) -> Result<Reply, Failure> {
    let shown = several(store, exp, with, filter)?;
    let wanted: Vec<String> =
        metrics.unwrap_or("").split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect();
    check_metrics_of(&shown, &wanted, "metrics")?;
    let columns: Vec<Vec<String>> = shown.iter().map(|(_, _, rows)| table::columns(rows)).collect();
    let keys = union(columns.iter().map(Vec::as_slice));
    let metrics = if wanted.is_empty() {
        let defaults: Vec<Vec<String>> = shown.iter().map(|(_, _, rows)| table::default_metrics(rows)).collect();
        union(defaults.iter().map(Vec::as_slice))
    } else {
        wanted
    };
    let all: Vec<Vec<String>> = shown.iter().map(|(_, v, _)| v.metrics.iter().cloned().collect()).collect();
    // Each metric's mean and standard deviation over the row's finished seeds (the page shows
    // these; `xlab query --format json` has every value).
    let f = xlab_proto::floats::to_json;
    let mut out: Vec<Value> = Vec::new();
    for (exp, _, rows) in &shown {
        out.extend(rows.iter().map(|r| {
            let point: serde_json::Map<String, Value> = r.point.iter().cloned().collect();
            let stats: serde_json::Map<String, Value> = r
                .metrics
                .iter()
                .map(|(k, xs)| {
                    let (mean, std) = table::mean_std(xs);
                    (k.clone(), json!({"mean": f(mean), "std": std.map(f)}))
                })
                .collect();
            json!({
                "experiment": exp.name, "stage": r.stage, "point": point, "metrics": stats, "done": r.done,
                "jobs": r.jobs, "ids": r.ids, "running": r.running, "pruned": r.pruned, "paused": r.paused,
            })
        }));
    }
    Ok(Reply::json(&json!({
        "experiment": shown[0].0.name,
        "experiments": shown.iter().map(|(e, _, _)| &e.name).collect::<Vec<_>>(),
        "keys": keys,
        "metrics": metrics,
        "all_metrics": union(all.iter().map(Vec::as_slice)),
        "rows": out,
    })))
}

/// What the grouped view asks for: keys, aggregates, a baseline to compare with, a sort.
pub(super) struct GroupedAsk<'a> {
    pub exp: Option<&'a str>,
    pub filter: Option<&'a str>,
    pub metrics: Option<&'a str>,
    pub group_by: Option<&'a str>,
    pub agg: Option<&'a str>,
    pub compare_to: Option<&'a str>,
    pub test: Option<&'a str>,
    pub sort: Option<&'a str>,
}

/// `xlab query --group-by … --agg … --compare-to …` for the dashboard: the header and the cells
/// as the command prints them, and the values for programs.
pub(super) fn grouped(store: &Reader<'_>, ask: &GroupedAsk<'_>) -> Result<Reply, Failure> {
    use crate::aggregate::PairedTest;
    let (exp, vocab, filter) = experiment_and_filter(store, ask.exp, ask.filter)?;
    let list = |t: Option<&str>| -> Vec<String> {
        t.unwrap_or("").split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect()
    };
    let (wanted, keys) = (list(ask.metrics), list(ask.group_by));
    check_metrics(&vocab, &exp, &wanted, "metrics")?;
    let baseline = match ask.compare_to.filter(|c| !c.trim().is_empty()) {
        Some(text) => {
            let parsed = parse_filter(Some(text)).map_err(|f| user_error(format!("compare to: {}", f.error)))?;
            bind_filter(store, &exp, parsed).map_err(|f| user_error(format!("compare to: {}", f.error)))?.1
        }
        None => None,
    };
    let test = if ask.test == Some("wilcoxon") { PairedTest::Wilcoxon } else { PairedTest::T };
    let g = crate::commands::query::Grouping {
        keys: &keys,
        aggs: ask.agg.filter(|a| !a.trim().is_empty()),
        compare: baseline.as_ref().map(|b| (b, test)),
        sort: ask.sort.filter(|s| !s.trim().is_empty()),
        limit: None,
    };
    let grouped = crate::commands::query::grouped(store, &exp, &vocab, &wanted, filter.as_ref(), &g)?;
    Ok(Reply::json(&json!({
        "experiment": exp.name,
        "keys": grouped.keys.len(),
        "header": grouped.header(),
        "cells": grouped.cells(),
        "rows": grouped.json(),
    })))
}

/// Learning curves of `metric`: per row (stage and sweep point), the mean over its seeds at each
/// step and the standard deviation (the band), from the jobs that logged the step; the first
/// `limit` rows that have the metric (`more` says whether rows were left out).
pub(super) fn curves(
    store: &Reader<'_>,
    exp: Option<&str>,
    with: Option<&str>,
    filter: Option<&str>,
    metric: Option<&str>,
    limit: usize,
) -> Result<Reply, Failure> {
    let shown = several(store, exp, with, filter)?;
    let vocab = &shown[0].1;
    let metric = match metric.filter(|m| !m.is_empty()) {
        Some(m) => m.to_string(),
        None => ["val.acc", "val.loss", "train.loss"]
            .iter()
            .find(|m| vocab.is_metric(m))
            .map(|m| m.to_string())
            .or_else(|| vocab.metrics.iter().next().cloned())
            .unwrap_or_default(),
    };
    // No job has logged a metric (all failed, or none has run): no curves, and the page says so.
    if !metric.is_empty() {
        check_metrics_of(&shown, std::slice::from_ref(&metric), "metric")?;
    }
    let mut groups = Vec::new();
    let mut more = false;
    for (exp, r) in
        shown.iter().flat_map(|(e, _, rows)| rows.iter().map(move |r| (e, r))).filter(|_| !metric.is_empty())
    {
        if groups.len() == limit {
            more = true;
            break;
        }
        let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for id in &r.ids {
            for (step, v) in store.metric_series(id, &metric)? {
                if v.is_finite() {
                    by_step.entry(step).or_default().push(v);
                }
            }
        }
        if by_step.is_empty() {
            continue;
        }
        let (mut steps, mut mean, mut std) = (Vec::new(), Vec::new(), Vec::new());
        for (s, xs) in by_step {
            let (m, sd) = table::mean_std(&xs);
            steps.push(s);
            mean.push(m);
            std.push(sd.unwrap_or(0.0));
        }
        let point: serde_json::Map<String, Value> = r.point.iter().cloned().collect();
        groups.push(json!({
            "experiment": exp.name, "stage": r.stage, "point": point, "seeds": r.ids.len(), "steps": steps,
            "mean": mean, "std": std,
        }));
    }
    let rows: usize = shown.iter().map(|(_, _, rows)| rows.len()).sum();
    Ok(Reply::json(&json!({
        "experiment": shown[0].0.name,
        "experiments": shown.iter().map(|(e, _, _)| &e.name).collect::<Vec<_>>(),
        "metric": metric, "groups": groups, "rows": rows, "more": more,
    })))
}

/// Two jobs, of any experiments: the config keys and final metrics that differ.
pub(super) fn compare(store: &Reader<'_>, a: &str, b: &str) -> Result<Reply, Failure> {
    let (ra, rb) = (find_job(store, a)?, find_job(store, b)?);
    let (config, metrics) = crate::commands::show::differences(&ra, &rb, true);
    let who = |r: &xlab_store::JobRecord| json!({"id": r.id, "experiment": r.experiment, "stage": r.stage, "status": r.status});
    Ok(Reply::json(&json!({"a": who(&ra), "b": who(&rb), "config": config, "metrics": metrics})))
}

/// One job: its record, every metric series' last value, the search decisions about it, its
/// files and the tail of its worker log.
pub(super) fn job(store: &Reader<'_>, id: &str) -> Result<Reply, Failure> {
    let rec = find_job(store, id)?;
    let series = store.metrics_of(&rec.id)?;
    let last: BTreeMap<&String, f64> = series.iter().filter_map(|(k, pts)| pts.last().map(|(_, v)| (k, *v))).collect();
    let decisions: Vec<xlab_store::Decision> =
        store.decisions(&rec.experiment, &rec.stage)?.into_iter().filter(|d| d.trial == rec.id).collect();
    let dir = store.run_dir(&rec.id);
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_file() {
                // The hash that provenance and `xlab reproduce` compare (files up to 256 MiB; a
                // bigger one would hold the page up).
                let sha256 = (meta.len() <= 256 << 20).then(|| std::fs::read(e.path()).ok()).flatten().map(|b| {
                    use sha2::Digest;
                    hex::encode(sha2::Sha256::digest(&b))
                });
                files.push(json!({"path": e.file_name().to_string_lossy(), "bytes": meta.len(), "sha256": sha256}));
            }
        }
    }
    files.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    let log = ["worker.log", "stderr.log"].iter().find_map(|n| std::fs::read(dir.join(n)).ok()).map(|b| {
        let text = String::from_utf8_lossy(&b).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    });
    let mut record = serde_json::to_value(&rec).expect("records serialize");
    record["last"] = json!(last
        .iter()
        .map(|(k, v)| (k.to_string(), xlab_proto::floats::to_json(*v)))
        .collect::<serde_json::Map<_, _>>());
    Ok(Reply::json(&json!({
        "job": record,
        "running": rec.status == JobStatus::Running,
        "decisions": decisions,
        "files": files,
        "log": log,
    })))
}
