//! Results where researchers already work: the store's jobs and metric series as Parquet (for
//! pandas and polars), query tables as Parquet or Arrow, and TensorBoard event files.
//!
//! An export folder holds `jobs.parquet` (one row per job: its identity, status, every config
//! key as a column of its own type, provenance and final metrics), `metrics.parquet` (one row
//! per logged point: job, metric, step, value) and `xlab-export.json` (what was written and what
//! was left out).

pub mod columns;
pub mod tensorboard;

use arrow_array::{ArrayRef, DictionaryArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use columns::Column;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use xlab_store::{ExperimentRecord, JobRecord, JobStatus, ResultStore};

/// The file every export folder holds: a folder with it is one xlab exported to before, and is
/// written over.
pub const MANIFEST: &str = "xlab-export.json";

/// Refuses a folder that holds files other than an earlier export of xlab's (one with its
/// `xlab-export.json`), unless `force`; makes it when missing.
pub fn prepare_folder(dir: &Path, force: bool) -> Result<(), String> {
    if dir.exists() && !dir.is_dir() {
        return Err(format!(
            "{} is a file, not a folder
  hint: -o names the folder to write into",
            dir.display()
        ));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        let names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        if !names.is_empty() && !names.iter().any(|n| n == MANIFEST) && !force {
            let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
            return Err(format!(
                "{} already holds other files ({}{}); an export writes into an empty folder or one it wrote before\n  \
                 hint: name a new folder, or add --force to write beside them",
                dir.display(),
                shown.join(", "),
                if names.len() > 3 { format!(" and {} more", names.len() - 3) } else { String::new() }
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Writes the export's manifest: what was written, from where, and what was left out.
pub fn write_manifest(dir: &Path, store: &dyn ResultStore, format: &str, written: &Written) -> anyhow::Result<()> {
    let manifest = serde_json::json!({
        "format": format,
        "xlab_version": crate::VERSION,
        "store": store.dir().display().to_string(),
        "written_unix": xlab_store::now_unix(),
        "summary": written,
    });
    std::fs::write(dir.join(MANIFEST), serde_json::to_string_pretty(&manifest)? + "\n")?;
    Ok(())
}

/// Which metric series go into `metrics.parquet`.
pub enum SeriesWanted {
    All,
    None,
    Only(BTreeSet<String>),
}

/// What an export wrote and left out.
#[derive(Default, serde::Serialize)]
pub struct Written {
    pub experiments: Vec<String>,
    pub jobs: usize,
    pub points: usize,
    pub metrics: usize,
    pub running: usize,
    /// Jobs the experiments plan that have not run (no record): not in the tables.
    pub not_run: usize,
    pub empty_experiments: Vec<String>,
    /// Final metric values that are NaN or infinite (kept as they are).
    pub non_finite: usize,
}

/// One job's part of the long metrics table.
struct Points {
    metric: Vec<i32>,
    step: Vec<i64>,
    value: Vec<f64>,
}

/// Writes `jobs.parquet` and `metrics.parquet` of the experiments into `dir`.
pub fn export_parquet(
    store: &dyn ResultStore,
    experiments: &[ExperimentRecord],
    series: &SeriesWanted,
    dir: &Path,
) -> anyhow::Result<Written> {
    let mut written = Written::default();
    let mut records: Vec<JobRecord> = Vec::new();
    let mut metric_names: Vec<String> = Vec::new();
    let mut metric_index: HashMap<String, i32> = HashMap::new();
    let mut job_keys: Vec<i32> = Vec::new();
    let mut parts: Vec<Points> = Vec::new();
    let mut seen = BTreeSet::new();
    for exp in experiments {
        let all = exp.with_all_versions();
        let planned: usize = all.stages.iter().map(|s| s.jobs.len()).sum();
        written.experiments.push(exp.name.clone());
        if planned == 0 {
            written.empty_experiments.push(exp.name.clone());
            continue;
        }
        let read_series = !matches!(series, SeriesWanted::None);
        let got: Vec<(JobRecord, Option<xlab_store::Series>)> =
            crate::scan::matching(store, &all, None, read_series, &|_, view| {
                let keep = |name: &String| match series {
                    SeriesWanted::All => true,
                    SeriesWanted::None => false,
                    SeriesWanted::Only(names) => names.contains(name),
                };
                let s = view
                    .series
                    .as_ref()
                    .map(|s| s.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), v.clone())).collect());
                Some((view.record.clone(), s))
            })?;
        written.not_run += planned - got.len();
        for (rec, s) in got {
            if !seen.insert(rec.id.clone()) {
                continue;
            }
            if let Some(s) = s {
                let mut p = Points { metric: Vec::new(), step: Vec::new(), value: Vec::new() };
                for (name, points) in s {
                    let next = metric_names.len() as i32;
                    let idx = *metric_index.entry(name.clone()).or_insert_with(|| {
                        metric_names.push(name);
                        next
                    });
                    p.metric.extend(std::iter::repeat_n(idx, points.len()));
                    for (step, v) in points {
                        p.step.push(step as i64);
                        p.value.push(v);
                    }
                }
                job_keys.extend(std::iter::repeat_n(records.len() as i32, p.value.len()));
                written.points += p.value.len();
                parts.push(p);
            }
            written.running += usize::from(rec.status == JobStatus::Running);
            written.non_finite += rec.summary.values().filter(|v| !v.is_finite()).count();
            records.push(rec);
        }
    }
    written.jobs = records.len();
    written.metrics = metric_names.len();
    let jobs = jobs_batch(&records)?;
    columns::write_parquet(create(&dir.join("jobs.parquet"))?, &[jobs])?;
    if !matches!(series, SeriesWanted::None) {
        let ids = Arc::new(StringArray::from_iter_values(records.iter().map(|r| r.id.as_str())));
        let names = Arc::new(StringArray::from_iter_values(metric_names.iter()));
        let metric: Vec<i32> = parts.iter().flat_map(|p| p.metric.iter().copied()).collect();
        let step: Vec<i64> = parts.iter().flat_map(|p| p.step.iter().copied()).collect();
        let value: Vec<f64> = parts.iter().flat_map(|p| p.value.iter().copied()).collect();
        drop(parts);
        let job = DictionaryArray::try_new(Int32Array::from(job_keys), ids)?;
        let metric = DictionaryArray::try_new(Int32Array::from(metric), names)?;
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(job),
            Arc::new(metric),
            Arc::new(Int64Array::from(step)),
            Arc::new(Float64Array::from(value)),
        ];
        let fields: Vec<Field> = ["job", "metric", "step", "value"]
            .iter()
            .zip(&arrays)
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), false))
            .collect();
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?;
        columns::write_parquet(create(&dir.join("metrics.parquet"))?, &[batch])?;
    } else {
        let _ = std::fs::remove_file(dir.join("metrics.parquet"));
    }
    write_manifest(dir, store, "parquet", &written)?;
    Ok(written)
}

fn create(path: &Path) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    let f = std::fs::File::create(path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(std::io::BufWriter::with_capacity(1 << 20, f))
}

/// Writes a TensorBoard run folder per job of the experiments into `dir`, the jobs of an
/// experiment written in parallel. An experiment's folder from an earlier export is replaced.
pub fn export_tensorboard(
    store: &dyn ResultStore,
    experiments: &[ExperimentRecord],
    dir: &Path,
) -> anyhow::Result<Written> {
    let mut written = Written::default();
    for exp in experiments {
        let all = exp.with_all_versions();
        let planned: usize = all.stages.iter().map(|s| s.jobs.len()).sum();
        written.experiments.push(exp.name.clone());
        if planned == 0 {
            written.empty_experiments.push(exp.name.clone());
            continue;
        }
        let _ = std::fs::remove_dir_all(tensorboard::experiment_folder(dir, &exp.name));
        type Done = (usize, BTreeSet<String>, bool, usize);
        let got: Vec<anyhow::Result<Done>> = crate::scan::matching(store, &all, None, true, &|_, view| {
            let series = view.series.clone().unwrap_or_default();
            let points = series.values().map(Vec::len).sum();
            let names = series.keys().cloned().collect();
            let non_finite = view.record.summary.values().filter(|v| !v.is_finite()).count();
            Some(
                tensorboard::write_job(dir, view.record, &series)
                    .map(|_| (points, names, view.record.status == JobStatus::Running, non_finite)),
            )
        })?;
        written.not_run += planned - got.len();
        let mut names = BTreeSet::new();
        for g in got {
            let (points, metric_names, running, non_finite) = g?;
            written.jobs += 1;
            written.points += points;
            written.running += usize::from(running);
            written.non_finite += non_finite;
            names.extend(metric_names);
        }
        written.metrics = written.metrics.max(names.len());
    }
    write_manifest(dir, store, "tensorboard", &written)?;
    Ok(written)
}

/// The leaves of a config as dotted keys (`optimizer.lr`); a list is one leaf.
pub fn leaves(v: &Value, at: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaves(v, &if at.is_empty() { k.clone() } else { format!("{at}.{k}") }, out);
            }
        }
        other => {
            out.insert(at.to_string(), other.clone());
        }
    }
}

/// The jobs table: identity and status, `config.KEY` per config key, provenance, and one column
/// per final metric.
pub fn jobs_batch(records: &[JobRecord]) -> anyhow::Result<RecordBatch> {
    let configs: Vec<BTreeMap<String, Value>> = records
        .iter()
        .map(|r| {
            let mut m = BTreeMap::new();
            leaves(&r.config, "", &mut m);
            m
        })
        .collect();
    let config_keys: BTreeSet<&String> = configs.iter().flat_map(|c| c.keys()).collect();
    let metric_names: BTreeSet<&String> = records.iter().flat_map(|r| r.summary.keys()).collect();
    let text = |f: &dyn Fn(&JobRecord) -> Option<String>| Column::Text(records.iter().map(f).collect());
    let mut cols: Vec<(String, Column)> = vec![
        ("id".into(), text(&|r| Some(r.id.clone()))),
        ("experiment".into(), text(&|r| Some(r.experiment.clone()))),
        ("stage".into(), text(&|r| Some(r.stage.clone()))),
        ("seed".into(), Column::Int(records.iter().map(|r| Some(r.seed as i64)).collect())),
        ("status".into(), text(&|r| serde_json::to_value(r.status).ok().and_then(|v| v.as_str().map(String::from)))),
        ("attempts".into(), Column::Int(records.iter().map(|r| Some(r.attempts.len() as i64)).collect())),
        (
            "started_unix".into(),
            Column::Int(records.iter().map(|r| r.attempts.first().map(|a| a.started_unix as i64)).collect()),
        ),
        (
            "ended_unix".into(),
            Column::Int(
                records.iter().map(|r| r.attempts.last().and_then(|a| a.ended_unix).map(|t| t as i64)).collect(),
            ),
        ),
        ("parents".into(), text(&|r| (!r.parents.is_empty()).then(|| r.parents.join(",")))),
    ];
    for k in &config_keys {
        let values = configs.iter().map(|c| c.get(*k).cloned().unwrap_or(Value::Null)).collect();
        cols.push((format!("config.{k}"), Column::Json(values)));
    }
    let p = |f: &dyn Fn(&xlab_store::Provenance) -> Option<String>| {
        Column::Text(records.iter().map(|r| f(&r.provenance)).collect())
    };
    cols.extend([
        ("xlab_version".to_string(), p(&|p| Some(p.xlab_version.clone()).filter(|v| !v.is_empty()))),
        ("git_commit".into(), p(&|p| p.git_commit.clone())),
        ("libtorch".into(), p(&|p| p.libtorch.clone())),
        ("cuda".into(), p(&|p| p.machine.cuda.clone())),
        ("driver".into(), p(&|p| p.machine.driver.clone())),
        ("gpu".into(), p(&|p| p.machine.gpu.clone())),
        ("cpu".into(), p(&|p| p.machine.cpu.clone())),
        ("host".into(), p(&|p| p.host.clone())),
        ("device".into(), p(&|p| p.device.clone())),
        ("threads".into(), Column::Int(records.iter().map(|r| r.provenance.threads.map(|t| t as i64)).collect())),
        (
            "plugins".into(),
            p(&|p| {
                (!p.plugins.is_empty()).then(|| {
                    p.plugins
                        .iter()
                        .map(|u| format!("{} {} sha256:{}", u.id, u.version, u.sha256))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
            }),
        ),
    ]);
    for m in metric_names {
        // A metric named like a column above keeps its values apart.
        let name = if cols.iter().any(|(n, _)| n == m) { format!("metric.{m}") } else { m.clone() };
        cols.push((name, Column::Num(records.iter().map(|r| r.summary.get(m).copied()).collect())));
    }
    columns::batch(cols)
}

/// `xlab query`'s table (a row per sweep point) as columns: stage, the sweep keys, and per
/// metric its mean, standard deviation and number of values; then done and planned jobs.
pub fn rows_batch(rows: &[crate::table::Row], metrics: &[String]) -> anyhow::Result<RecordBatch> {
    let keys = crate::table::columns(rows);
    let mut cols: Vec<(String, Column)> =
        vec![("stage".into(), Column::Text(rows.iter().map(|r| Some(r.stage.clone())).collect()))];
    for k in &keys {
        let values =
            rows.iter().map(|r| r.point.iter().find(|(p, _)| p == k).map_or(Value::Null, |(_, v)| v.clone())).collect();
        cols.push((k.clone(), Column::Json(values)));
    }
    for m in metrics {
        let stats: Vec<(Option<f64>, Option<f64>, usize)> = rows
            .iter()
            .map(|r| {
                let xs = r.metrics.get(m).map(Vec::as_slice).unwrap_or(&[]);
                if xs.is_empty() {
                    return (None, None, 0);
                }
                let (mean, std) = crate::table::mean_std(xs);
                (Some(mean), std, xs.len())
            })
            .collect();
        cols.push((format!("{m}.mean"), Column::Num(stats.iter().map(|s| s.0).collect())));
        cols.push((format!("{m}.std"), Column::Num(stats.iter().map(|s| s.1).collect())));
        cols.push((format!("{m}.n"), Column::Int(stats.iter().map(|s| Some(s.2 as i64)).collect())));
    }
    cols.push(("done".into(), Column::Int(rows.iter().map(|r| Some(r.done as i64)).collect())));
    cols.push(("jobs".into(), Column::Int(rows.iter().map(|r| Some(r.jobs as i64)).collect())));
    columns::batch(cols)
}

/// A grouped query's table as columns: the keys, then each aggregate (an interval as `.lo` and
/// `.hi`, a Pareto mark as a boolean).
pub fn grouped_batch(g: &crate::aggregate::Grouped) -> anyhow::Result<RecordBatch> {
    use crate::aggregate::Cell;
    let mut cols: Vec<(String, Column)> = Vec::new();
    for (i, k) in g.keys.iter().enumerate() {
        cols.push((k.clone(), Column::Json(g.rows.iter().map(|r| r.0[i].clone()).collect())));
    }
    for (i, a) in g.aggs.iter().enumerate() {
        let cells = g.rows.iter().map(|r| &r.1[i]);
        if a.is_interval() {
            let (lo, hi): (Vec<Option<f64>>, Vec<Option<f64>>) = cells
                .map(|c| match c {
                    Cell::Interval(lo, hi) => (Some(*lo), Some(*hi)),
                    _ => (None, None),
                })
                .unzip();
            cols.push((format!("{}.lo", a.label()), Column::Num(lo)));
            cols.push((format!("{}.hi", a.label()), Column::Num(hi)));
        } else if a.func == "pareto" {
            cols.push((a.label(), Column::Bool(cells.map(|c| matches!(c, Cell::Flag(true))).map(Some).collect())));
        } else {
            cols.push((
                a.label(),
                Column::Num(cells.map(|c| if let Cell::Num(x) = c { Some(*x) } else { None }).collect()),
            ));
        }
    }
    columns::batch(cols)
}
