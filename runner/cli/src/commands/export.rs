//! `xlab export` (JSON lines for `xlab import`, or CSV of final metrics) and `xlab import`
//! (merging exported results by job identity).

use crate::common::*;
use crate::{table, Cli};
use anyhow::Context;
use clap::ValueEnum;
use std::path::PathBuf;
use xlab_store::ResultStore;

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Only this experiment.
    #[arg(long, short = 'e')]
    pub experiment: Option<String>,
    /// `jsonl` (complete, for `xlab import`) or `csv` (one row per job, final metrics).
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    pub file: PathBuf,
}

pub fn export(cli: &Cli, args: &ExportArgs) -> Result<u8, Failure> {
    let ExportArgs { experiment, format, output } = args;
    let store = existing_store(&cli.store)?;
    if let Some(name) = experiment {
        named_experiment(&store, name)?;
    }
    let lines = store.export(experiment.as_deref())?;
    let text = match format {
        ExportFormat::Jsonl => lines.iter().map(|l| serde_json::to_string(l).expect("json") + "\n").collect::<String>(),
        ExportFormat::Csv => table::jobs_csv(&lines),
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
