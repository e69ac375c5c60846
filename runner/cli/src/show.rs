//! Readable views of one job (`xlab show JOB`) and of what a store holds (`xlab experiments`).

use std::collections::BTreeMap;
use std::fmt::Write;
use xlab_store::{JobRecord, JobStatus, ResultStore};

fn value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn when(unix: u64) -> String {
    let secs = xlab_store::now_unix().saturating_sub(unix);
    match secs {
        0..120 => format!("{secs} s ago"),
        120..7200 => format!("{} min ago", secs / 60),
        7200..172_800 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// A final value for reading: whole numbers whole, large ones to one decimal, else four.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

/// A metric of the compact set: not a per-class or per-group breakdown.
pub fn headline(name: &str) -> bool {
    !name.contains(".group_") && !name.contains("class_recall")
}

/// One job for people: what it is, how it went, its final metrics (the compact set; the rest are
/// counted) and where its files are.
pub fn summary(store: &dyn ResultStore, rec: &JobRecord, series: &BTreeMap<String, Vec<(u64, f64)>>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "job {}: {}", rec.id, rec.status.as_str());
    let _ = writeln!(o, "  experiment `{}`, stage `{}`, seed {}", rec.experiment, rec.stage, rec.seed);
    if !rec.point.is_empty() {
        let p: Vec<String> = rec.point.iter().map(|(k, v)| format!("{k}={}", value(v))).collect();
        let _ = writeln!(o, "  point: {}", p.join(" "));
    }
    if !rec.parents.is_empty() {
        let _ = writeln!(o, "  parents: {}", rec.parents.join(", "));
    }
    if let Some(s) = &rec.selected {
        let _ = writeln!(o, "  selected parent: {s}");
    }
    let _ = writeln!(o, "config:");
    for (k, v) in crate::common::flatten_json(&rec.config) {
        let _ = writeln!(o, "  {k}: {}", value(&v));
    }
    let _ = writeln!(o, "attempts:");
    if rec.attempts.is_empty() {
        let _ = writeln!(o, "  none yet");
    }
    for a in &rec.attempts {
        let took =
            a.ended_unix.map_or("still running".to_string(), |e| format!("{} s", e.saturating_sub(a.started_unix)));
        let mut line = format!(
            "  #{} on {}: {} ({took}, started {})",
            a.number,
            a.device,
            a.outcome.as_deref().unwrap_or("running"),
            when(a.started_unix)
        );
        if let Some(e) = &a.error {
            let _ = write!(line, "\n     {}", e.lines().next().unwrap_or_default());
        }
        if let Some(site) = &a.site {
            let mut at = Vec::new();
            at.extend(site.signal.map(|s| format!("signal {s}")));
            at.extend(site.step.map(|s| format!("step {s}")));
            at.extend(site.call.clone());
            let _ = write!(line, "\n     at {}", at.join(", "));
        }
        let _ = writeln!(o, "{line}");
    }
    if rec.status == JobStatus::Done || !rec.summary.is_empty() {
        let _ = writeln!(o, "final metrics:");
        let shown: Vec<(&String, &f64)> = rec.summary.iter().filter(|(k, _)| headline(k)).collect();
        let width = shown.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &shown {
            let _ = writeln!(o, "  {k:width$}  {}", number(**v));
        }
        let hidden = rec.summary.len() - shown.len();
        if hidden > 0 {
            let _ = writeln!(o, "  (and {hidden} per-class and per-group metrics: --json)");
        }
    } else if !series.is_empty() {
        let latest: Vec<String> = series
            .iter()
            .filter(|(k, _)| headline(k))
            .filter_map(|(k, s)| s.last().map(|(step, v)| format!("{k}={v:.4} (step {step})")))
            .take(6)
            .collect();
        let _ = writeln!(o, "latest metrics: {}", latest.join(", "));
    }
    for w in &rec.warnings {
        let _ = writeln!(o, "warning: {w}");
    }
    let p = &rec.provenance;
    if !p.xlab_version.is_empty() {
        let mut prov = vec![format!("xlab {}", p.xlab_version)];
        prov.extend(p.git_commit.as_ref().map(|c| format!("commit {c}")));
        prov.extend(p.libtorch.as_ref().map(|l| format!("libtorch {l}")));
        prov.extend(p.host.as_ref().map(|h| format!("host {h}")));
        prov.extend(p.device.as_ref().map(|d| format!("device {d}")));
        prov.extend(p.threads.map(|t| format!("{t} thread(s)")));
        let m = &p.machine;
        prov.extend(m.cuda.as_ref().map(|c| format!("CUDA {c}")));
        prov.extend(m.driver.as_ref().map(|d| format!("driver {d}")));
        prov.extend(m.gpu.clone());
        prov.extend(m.cpu.clone());
        let _ = writeln!(o, "provenance: {}", prov.join(", "));
        if let Some(c) = &p.continued_from {
            let _ = writeln!(
                o,
                "  continued job {} (the same training with {} epochs) from its checkpoint after epoch {}",
                c.job, c.epoch, c.epoch
            );
        }
        for u in &p.plugins {
            let _ = writeln!(
                o,
                "  plugin {} {} ({}, sha256 {})",
                u.id,
                u.version,
                u.file,
                &u.sha256[..u.sha256.len().min(12)]
            );
        }
    }
    if !rec.artifacts.is_empty() {
        let _ = writeln!(o, "files (under {}):", store.dir().display());
        for a in &rec.artifacts {
            let _ = writeln!(o, "  {} ({}): {}", a.name, a.kind, a.path);
        }
    }
    let _ = writeln!(o, "(`xlab show {} --json`: the whole record with every metric series)", rec.id);
    o
}

/// Every experiment of the store: file, stages, and its jobs by status.
pub fn experiments(store: &dyn ResultStore) -> anyhow::Result<String> {
    let mut all = store.experiments()?;
    if all.is_empty() {
        return Ok(format!("store {} holds no experiments yet; `xlab run FILE` records one\n", store.dir().display()));
    }
    all.sort_by_key(|e| std::cmp::Reverse(e.updated_unix));
    let mut rows = Vec::new();
    for e in &all {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut n = 0;
        for id in e.stages.iter().flat_map(|s| s.jobs.iter()) {
            n += 1;
            let status = store.job(id)?.map_or("pending", |j| j.status.as_str());
            *counts.entry(status).or_default() += 1;
        }
        let by: Vec<String> = counts.iter().map(|(s, c)| format!("{c} {s}")).collect();
        let hidden = e.hidden_jobs().len();
        let version = match hidden {
            0 => e.version().to_string(),
            n => format!("{} ({n} earlier job(s))", e.version()),
        };
        rows.push(vec![
            e.name.clone(),
            version,
            e.file.clone(),
            e.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
            format!("{n}: {}", by.join(", ")),
            when(e.updated_unix),
        ]);
    }
    let header = ["experiment", "version", "file", "stages", "jobs", "last run"].map(String::from);
    Ok(format!("{}\n", crate::table::terminal(&header, &rows, 6)))
}
