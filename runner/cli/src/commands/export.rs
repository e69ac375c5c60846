//! `xlab export` (JSON lines for `xlab import`, CSV of final metrics, Parquet tables for pandas
//! and polars, TensorBoard event files) and `xlab import` (merging exported results by job
//! identity).

use crate::common::*;
use crate::{table, Cli};
use anyhow::Context;
use clap::ValueEnum;
use std::path::PathBuf;
use xlab_store::ResultStore;

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
    /// A folder (-o DIR) with `jobs.parquet` (a row per job: config keys as typed columns,
    /// provenance, final metrics) and `metrics.parquet` (job, metric, step, value).
    Parquet,
    /// A folder (-o DIR) with a TensorBoard run per job: its metric series as scalars and its
    /// config as hyperparameters.
    Tensorboard,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Only this experiment.
    #[arg(long, short = 'e')]
    pub experiment: Option<String>,
    /// `jsonl` (complete, for `xlab import`), `csv` (one row per job, final metrics), `parquet`
    /// or `tensorboard` (a folder each).
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,
    /// Write to this file (for parquet and tensorboard: this folder) instead of standard output.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Parquet: only these metric series in metrics.parquet, comma-separated (`none`: no
    /// metrics.parquet).
    #[arg(long, short = 'm', value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Write into a folder that holds other files.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    pub file: PathBuf,
}

pub fn export(cli: &Cli, args: &ExportArgs) -> Result<u8, Failure> {
    let ExportArgs { experiment, format, output, metrics, force } = args;
    let store = existing_store(&cli.store)?;
    if let Some(name) = experiment {
        named_experiment(&store, name)?;
    }
    if matches!(format, ExportFormat::Parquet | ExportFormat::Tensorboard) {
        let Some(dir) = output else {
            return Err(user_error(format!(
                "--format {} writes a folder\n  hint: name it with -o DIR",
                if *format == ExportFormat::Parquet { "parquet" } else { "tensorboard" }
            )));
        };
        return folder_export(cli, &store, experiment.as_deref(), *format, metrics, *force, dir);
    }
    if !metrics.is_empty() || *force {
        return Err(user_error("-m and --force go with --format parquet or tensorboard".into()));
    }
    let lines = store.export(experiment.as_deref())?;
    let text = match format {
        ExportFormat::Jsonl => lines.iter().map(|l| serde_json::to_string(l).expect("json") + "\n").collect::<String>(),
        ExportFormat::Csv => table::jobs_csv(&lines),
        ExportFormat::Parquet | ExportFormat::Tensorboard => unreachable!("written as folders above"),
    };
    match output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?,
        None => out!("{text}"),
    }
    Ok(0)
}

pub fn import(cli: &Cli, args: &ImportArgs) -> Result<u8, Failure> {
    let ImportArgs { file } = args;
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut lines = Vec::new();
    for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line = serde_json::from_str(l).map_err(|e| Failure {
            code: exit::USER,
            error: anyhow::anyhow!(
                "{}:{}: not an xlab export line: {e}\n  hint: import reads what `xlab export --format jsonl` writes",
                file.display(),
                i + 1
            ),
        })?;
        lines.push(line);
    }
    let store = open_store(&cli.store)?;
    let r = store.import(lines)?;
    outln!(
        "imported {}: {} new job(s), {} updated, {} already here; {} new experiment(s), {} merged",
        file.display(),
        r.jobs_new,
        r.jobs_updated,
        r.jobs_kept,
        r.experiments_new,
        r.experiments_merged
    );
    Ok(0)
}

fn folder_export(
    cli: &Cli,
    store: &Opened,
    experiment: Option<&str>,
    format: ExportFormat,
    metrics: &[String],
    force: bool,
    dir: &std::path::Path,
) -> Result<u8, Failure> {
    use crate::interop;
    let experiments = match experiment {
        Some(name) => vec![named_experiment(store, name)?],
        None => store.experiments()?,
    };
    if experiments.is_empty() {
        return Err(user_error(format!("store {} holds no experiments yet", cli.store.display())));
    }
    let no_series = matches!(metrics, [n] if n == "none");
    if !metrics.is_empty() && !no_series {
        // A metric no job logged is a typo, not an empty table.
        let mut known = std::collections::BTreeSet::new();
        for e in &experiments {
            known.extend(crate::vocab::Vocab::of(store, &e.with_all_versions())?.metrics);
        }
        for m in metrics {
            if !known.contains(m) {
                let hint = xlab_plan::did_you_mean(m, known.iter().map(String::as_str)).map_or_else(
                    || "`xlab show JOB` lists a job's metrics".to_string(),
                    |c| format!("did you mean `{c}`?"),
                );
                return Err(user_error(format!("-m: no job logged a metric `{m}`\n  hint: {hint}")));
            }
        }
    }
    interop::prepare_folder(dir, force).map_err(user_error)?;
    let written = match format {
        ExportFormat::Parquet => {
            let series = match metrics {
                [] => interop::SeriesWanted::All,
                [none] if none == "none" => interop::SeriesWanted::None,
                some => interop::SeriesWanted::Only(some.iter().cloned().collect()),
            };
            interop::export_parquet(store, &experiments, &series, dir)?
        }
        _ => interop::export_tensorboard(store, &experiments, dir)?,
    };
    let what = if format == ExportFormat::Parquet {
        format!(
            "{} job(s) in jobs.parquet, {} point(s) of {} metric(s) in metrics.parquet",
            written.jobs, written.points, written.metrics
        )
    } else {
        format!("{} run(s) with {} point(s) of {} metric(s)", written.jobs, written.points, written.metrics)
    };
    outln!("wrote {}: {what}", dir.display());
    if written.running > 0 {
        eprintln!("note: {} job(s) are still running; their series so far are in the export", written.running);
    }
    if written.not_run > 0 {
        eprintln!("note: {} planned job(s) have not run and have no row", written.not_run);
    }
    if !written.empty_experiments.is_empty() {
        eprintln!("note: experiment(s) with no jobs, left out: {}", written.empty_experiments.join(", "));
    }
    if written.non_finite > 0 {
        eprintln!(
            "note: {} final metric value(s) are NaN or infinite; they are exported as they are",
            written.non_finite
        );
    }
    Ok(0)
}
