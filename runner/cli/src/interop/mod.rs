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
use std::collections::{BTreeSet, HashMap};
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
    let mut rows: Vec<JobRow> = Vec::new();
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
        let got: Vec<(JobRow, Option<xlab_store::Series>)> =
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
                Some((JobRow::of(view.record), s))
            })?;
        written.not_run += planned - got.len();
        for (row, s) in got {
            if !seen.insert(row.id.clone()) {
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
                job_keys.extend(std::iter::repeat_n(rows.len() as i32, p.value.len()));
                written.points += p.value.len();
                parts.push(p);
            }
            written.running += usize::from(row.status == JobStatus::Running);
            written.non_finite += row.summary.iter().filter(|(_, v)| !v.is_finite()).count();
            rows.push(row);
        }
    }
    written.jobs = rows.len();
    written.metrics = metric_names.len();
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let jobs = jobs_batch(rows)?;
    columns::write_parquet(create(&dir.join("jobs.parquet"))?, &[jobs])?;
    if !matches!(series, SeriesWanted::None) {
        let ids = Arc::new(StringArray::from_iter_values(ids.iter()));
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

/// The leaves of a config as dotted keys (`optimizer.lr`), in key order; a list is one leaf.
pub fn leaves(v: &Value, at: &str, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaves(v, &if at.is_empty() { k.clone() } else { format!("{at}.{k}") }, out);
            }
        }
        other => out.push((at.to_string(), other.clone())),
    }
}

/// A job's row of the jobs table, taken from its record where it is read (on every core).
pub struct JobRow {
    id: String,
    experiment: String,
    stage: String,
    seed: u64,
    status: JobStatus,
    attempts: usize,
    started: Option<u64>,
    ended: Option<u64>,
    parents: Option<String>,
    config: Vec<(String, Value)>,
    /// xlab_version, git_commit, libtorch, cuda, driver, gpu, cpu, host, device, plugins.
    provenance: [Option<String>; 10],
    threads: Option<usize>,
    summary: Vec<(String, f64)>,
}

const PROVENANCE: [&str; 10] =
    ["xlab_version", "git_commit", "libtorch", "cuda", "driver", "gpu", "cpu", "host", "device", "plugins"];

impl JobRow {
    pub fn of(r: &JobRecord) -> JobRow {
        let mut config = Vec::new();
        leaves(&r.config, "", &mut config);
        let p = &r.provenance;
        let plugins = (!p.plugins.is_empty()).then(|| {
            p.plugins
                .iter()
                .map(|u| format!("{} {} sha256:{}", u.id, u.version, u.sha256))
                .collect::<Vec<_>>()
                .join("; ")
        });
        JobRow {
            id: r.id.clone(),
            experiment: r.experiment.clone(),
            stage: r.stage.clone(),
            seed: r.seed,
            status: r.status,
            attempts: r.attempts.len(),
            started: r.attempts.first().map(|a| a.started_unix),
            ended: r.attempts.last().and_then(|a| a.ended_unix),
            parents: (!r.parents.is_empty()).then(|| r.parents.join(",")),
            config,
            provenance: [
                Some(p.xlab_version.clone()).filter(|v| !v.is_empty()),
                p.git_commit.clone(),
                p.libtorch.clone(),
                p.machine.cuda.clone(),
                p.machine.driver.clone(),
                p.machine.gpu.clone(),
                p.machine.cpu.clone(),
                p.host.clone(),
                p.device.clone(),
                plugins,
            ],
            threads: p.threads,
            summary: r.summary.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

/// Columns that rows fill by name, each as long as the rows so far (null where a row has none).
#[derive(Default)]
struct Named<T> {
    index: HashMap<String, usize>,
    columns: Vec<(String, Vec<Option<T>>)>,
}

impl<T: Clone> Named<T> {
    fn set(&mut self, row: usize, name: &str, v: T) {
        let i = match self.index.get(name) {
            Some(i) => *i,
            None => {
                self.index.insert(name.to_string(), self.columns.len());
                self.columns.push((name.to_string(), Vec::new()));
                self.columns.len() - 1
            }
        };
        let col = &mut self.columns[i].1;
        col.resize(row, None);
        col.push(Some(v));
    }

    /// The columns, sorted by name, each padded to `rows`.
    fn finish(mut self, rows: usize) -> Vec<(String, Vec<Option<T>>)> {
        for (_, c) in &mut self.columns {
            c.resize(rows, None);
        }
        self.columns.sort_by(|a, b| a.0.cmp(&b.0));
        self.columns
    }
}

/// The jobs table: identity and status, `config.KEY` per config key, provenance, and one column
/// per final metric.
pub fn jobs_batch(rows: Vec<JobRow>) -> anyhow::Result<RecordBatch> {
    let n = rows.len();
    let mut config: Named<Value> = Named::default();
    let mut metrics: Named<f64> = Named::default();
    for (i, r) in rows.iter().enumerate() {
        for (k, v) in &r.config {
            config.set(i, k, v.clone());
        }
        for (k, v) in &r.summary {
            metrics.set(i, k, *v);
        }
    }
    let text = |f: &dyn Fn(&JobRow) -> Option<String>| Column::Text(rows.iter().map(f).collect());
    let int = |f: &dyn Fn(&JobRow) -> Option<u64>| Column::Int(rows.iter().map(|r| f(r).map(|x| x as i64)).collect());
    let mut cols: Vec<(String, Column)> = vec![
        ("id".into(), text(&|r| Some(r.id.clone()))),
        ("experiment".into(), text(&|r| Some(r.experiment.clone()))),
        ("stage".into(), text(&|r| Some(r.stage.clone()))),
        ("seed".into(), int(&|r| Some(r.seed))),
        ("status".into(), text(&|r| serde_json::to_value(r.status).ok().and_then(|v| v.as_str().map(String::from)))),
        ("attempts".into(), int(&|r| Some(r.attempts as u64))),
        ("started_unix".into(), int(&|r| r.started)),
        ("ended_unix".into(), int(&|r| r.ended)),
        ("parents".into(), text(&|r| r.parents.clone())),
    ];
    for (k, values) in config.finish(n) {
        cols.push((
            format!("config.{k}"),
            Column::Json(values.into_iter().map(|v| v.unwrap_or(Value::Null)).collect()),
        ));
    }
    for (i, name) in PROVENANCE.iter().enumerate() {
        cols.push((name.to_string(), text(&|r| r.provenance[i].clone())));
        if *name == "device" {
            cols.push(("threads".into(), int(&|r| r.threads.map(|t| t as u64))));
        }
    }
    for (m, values) in metrics.finish(n) {
        // A metric named like a column above keeps its values apart.
        let name = if cols.iter().any(|(c, _)| *c == m) { format!("metric.{m}") } else { m };
        cols.push((name, Column::Num(values)));
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
