//! `xlab`: the coordinator and command line. It owns the results store and the schedule and
//! never links libtorch, so `xlab query` starts instantly anywhere the results folder is.
//!
//! This file only parses the command line and dispatches: each command lives in its own module
//! under `commands/`, and what they share in `common`.

// Queries read and parse every record of an experiment on every core; with glibc's allocator
// most of that time went to growing per-thread arenas (page faults, mprotect). 100,000 jobs:
// 0.83 s → 0.60 s on 2 cores.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[macro_use]
mod output;
mod aggregate;
mod commands;
mod common;
mod filter;
mod gc;
mod interop;
mod live;
mod plot;
mod plugins;
mod raster;
mod report;
mod scan;
mod serve;
mod show;
mod stats;
mod status;
mod table;
mod vocab;

use clap::{Parser, Subcommand, ValueEnum};
use common::Failure;
use std::path::PathBuf;
use std::process::ExitCode;

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Parser)]
#[command(name = "xlab", version, about = "A declarative experiment runner for deep-learning research")]
pub struct Cli {
    /// The results store (default `results/`).
    #[arg(long, global = true, env = "XLAB_STORE", default_value = "results")]
    pub store: PathBuf,
    /// More log output (-v: per-epoch metrics, -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment file: jobs already done in the store are skipped.
    Run(commands::run::RunCommand),
    /// Follow the store's detached coordinator (`xlab run --executor slurm --detach`): its log
    /// as it grows, until it ends, then how the experiment stands.
    Attach(commands::detach::AttachArgs),
    /// Run a stored experiment again as it was last run (the file's text kept in the store):
    /// done jobs are skipped, interrupted ones continue from their checkpoints, failed ones retry.
    Resume(commands::run::ResumeCommand),
    /// Check an experiment file without running anything.
    Validate(commands::run::ValidateCommand),
    /// Show the jobs of an experiment file and what the store already holds of them.
    Plan(commands::plan::PlanArgs),
    /// Results of an experiment: one row per sweep point, mean ± std over seeds.
    Query(commands::query::QueryArgs),
    /// Learning curves of a metric as SVG: a line per group (default: stage and sweep point)
    /// with the mean over seeds and a ± std band.
    Plot(commands::plot::PlotArgs),
    /// An experiment as one self-contained page (HTML, or Markdown): the file, the plan, the
    /// results with intervals over seeds and paired comparisons, learning curves, sample grids
    /// and a provenance manifest.
    Report(commands::report::ReportArgs),
    /// Run a done job again from its stored record (config, seed, plugins by hash) in a fresh
    /// store, and say whether its metric series and final files are bit-identical, or by how
    /// much they differ (exit 1).
    Reproduce(commands::reproduce::ReproduceArgs),
    /// Export results: experiments and jobs with config, provenance and metric series.
    Export(commands::export::ExportArgs),
    /// Merge results exported elsewhere (`xlab export --format jsonl`), by job identity.
    Import(commands::export::ImportArgs),
    /// Remove checkpoints no job needs: a done job's (it has its final weights), and all but
    /// the newest valid one of an unfinished job (its resume point), and leftover temporary files.
    Gc(commands::gc::GcArgs),
    /// What a run is doing (from `xlab run`'s status file while it holds the store) or what the
    /// store holds: jobs done, running, queued and failed, and each running job's progress.
    Status(commands::status::StatusArgs),
    /// One job, readably: status, sweep point, config, attempts, final metrics, provenance and
    /// files. JOB may be a unique prefix of its id. `--json`: the whole record, with every
    /// metric series.
    Show(commands::show::ShowArgs),
    /// The experiments the store holds: their files, stages and how many jobs are done.
    Experiments,
    /// The decisions of an experiment's adaptive searches (`search:`): every start, promotion
    /// and pruning, in order, with the metric, rank and cut each rests on.
    SearchLog(commands::search::SearchLogArgs),
    /// Two jobs side by side: the config keys that differ, then every final metric of either
    /// with its difference (b − a).
    Compare(commands::show::CompareArgs),
    /// A local web dashboard over the store: experiments, tables, curves and jobs, live while
    /// runs write (read-only; binds 127.0.0.1 unless told otherwise).
    Serve(serve::ServeArgs),
    /// Report versions, libtorch, devices, store and plugin locations.
    Doctor,
    /// Print the JSON Schema of experiment files (also in experiments/schema.json), for editors.
    Schema,
    /// Installed plugins and their components.
    Plugins {
        #[command(subcommand)]
        command: commands::plugins::PluginsCommand,
    },
}

fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (_, 0) => "info",
        (_, 1) => "info,xlab=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_writer(|| live::LogWriter).with_ansi(ansi).with_env_filter(filter);
    match cli.log_format {
        LogFormat::Human => builder.without_time().with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match dispatch(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, error }) => {
            eprintln!("error: {error:#}");
            ExitCode::from(code)
        }
    }
}

fn dispatch(cli: &Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::Run(args) => commands::run::run(cli, args),
        Command::Resume(args) => commands::run::resume(cli, args),
        Command::Attach(args) => commands::detach::attach(cli, args),
        Command::Validate(args) => commands::run::validate(cli, args),
        Command::Plan(args) => commands::plan::run(cli, args),
        Command::Query(args) => commands::query::run(cli, args),
        Command::Plot(args) => commands::plot::run(cli, args),
        Command::Report(args) => commands::report::run(cli, args),
        Command::Reproduce(args) => commands::reproduce::run(cli, args),
        Command::Export(args) => commands::export::export(cli, args),
        Command::Import(args) => commands::export::import(cli, args),
        Command::Gc(args) => commands::gc::run(cli, args),
        Command::Status(args) => commands::status::run(cli, args),
        Command::Show(args) => commands::show::show(cli, args),
        Command::Experiments => commands::show::experiments(cli),
        Command::SearchLog(args) => commands::search::run(cli, args),
        Command::Compare(args) => commands::show::compare(cli, args),
        Command::Serve(args) => serve::run(cli, args),
        Command::Doctor => commands::doctor::run(cli),
        Command::Schema => {
            outln!("{}", serde_json::to_string_pretty(&xlab_plan::schema::schema()).expect("json"));
            Ok(0)
        }
        Command::Plugins { command } => commands::plugins::run(command),
    }
}
