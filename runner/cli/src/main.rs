//! `xlab`: the coordinator and command line. It owns the results store and the schedule and
//! never links libtorch, so `xlab query` starts instantly anywhere the results folder is.

// Queries read and parse every record of an experiment on every core; with glibc's allocator
// most of that time went to growing per-thread arenas (page faults, mprotect). 100,000 jobs:
// 0.83 s → 0.60 s on 2 cores.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod aggregate;
mod filter;
mod gc;
mod live;
mod plot;
mod plugins;
mod raster;
mod scan;
mod show;
mod status;
mod table;
mod vocab;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use xlab_sched::{Progress, RunOptions};
use xlab_store::{JobStatus, ResultStore, Store, StoreError};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes to standard output; a closed pipe (`xlab query | head`) ends the program quietly.
fn emit(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let r = o.write_fmt(args).and_then(|_| if newline { o.write_all(b"\n") } else { Ok(()) });
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(exit::ENVIRONMENT.into());
    }
}

macro_rules! outln {
    ($($t:tt)*) => { emit(format_args!($($t)*), true) };
}

macro_rules! out {
    ($($t:tt)*) => { emit(format_args!($($t)*), false) };
}

#[derive(Parser)]
#[command(name = "xlab", version, about = "A declarative experiment runner for deep-learning research")]
struct Cli {
    /// The results store (default `results/`).
    #[arg(long, global = true, env = "XLAB_STORE", default_value = "results")]
    store: PathBuf,
    /// More log output (-v: per-epoch metrics, -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
    /// A GitHub-flavoured Markdown table.
    Markdown,
    /// A booktabs table for a paper (`\usepackage{booktabs}`).
    Latex,
}

/// Where and how `xlab run` and `xlab resume` run jobs.
#[derive(clap::Args)]
struct RunArgs {
    /// CPU jobs at a time (default: one per CPU core, divided by --threads).
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Threads per job.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Where jobs run: `auto` (every GPU NVML or `nvidia-smi` finds, else CPU slots), `cpu`, `cuda`
    /// (every GPU) or a list such as `cuda:0,cuda:2` or `cpu,cuda:1`.
    #[arg(long, env = "XLAB_DEVICES", default_value = "auto")]
    devices: xlab_sched::Devices,
    /// Jobs sharing one GPU at a time (small jobs pack; each sees only its GPU).
    #[arg(long, default_value_t = 1)]
    jobs_per_device: usize,
    /// Stop starting jobs after the first deterministic failure (as `fail_fast: true` on
    /// every stage).
    #[arg(long)]
    fail_fast: bool,
    /// At most this many jobs at once in the whole run (overrides the file's `max_parallel:`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_parallel: Option<u32>,
    /// Where jobs run: `local` (this machine) or `slurm` (one batch job per job, with the file's
    /// `executor: {slurm: {...}}` settings if it has them). Default: the file's `executor:`, else
    /// local.
    #[arg(long, value_enum)]
    executor: Option<ExecutorKind>,
    /// Run the done jobs this filter matches again, as new attempts (the earlier attempts stay
    /// in each job's record, its earlier files in `runs/JOB/attempt-N/`), e.g. after changing
    /// a plugin: `--rerun 'step_rule.use ~ "^sam"'`. The filter language of `xlab query`.
    #[arg(long, value_name = "FILTER")]
    rerun: Option<String>,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum ExecutorKind {
    Local,
    Slurm,
}

impl RunArgs {
    fn pool(&self) -> xlab_sched::PoolRequest {
        xlab_sched::PoolRequest {
            devices: self.devices.clone(),
            cpu_jobs: self.jobs,
            jobs_per_gpu: self.jobs_per_device,
            threads: self.threads,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment file: jobs already done in the store are skipped.
    Run {
        file: PathBuf,
        #[command(flatten)]
        how: RunArgs,
    },
    /// Run a stored experiment again as it was last run (the file's text kept in the store):
    /// done jobs are skipped, interrupted ones continue from their checkpoints, failed ones retry.
    Resume {
        /// The experiment's name (`xlab query` and `xlab status` show it).
        name: String,
        #[command(flatten)]
        how: RunArgs,
    },
    /// Check an experiment file without running anything.
    Validate { file: PathBuf },
    /// Show the jobs of an experiment file and what the store already holds of them.
    Plan { file: PathBuf },
    /// Results of an experiment: one row per sweep point, mean ± std over seeds.
    Query {
        /// Only jobs this matches, e.g. `stage == "train" and optimizer.lr < 0.1 and
        /// last(val.acc) > 0.9` (names: stage, status, seed, id, config keys; last/max/min/at of
        /// a metric; ==, !=, <, <=, >, >=, in [...], ~ "regex", and, or, not).
        filter: Option<String>,
        /// The experiment (default: the only or most recently run one).
        #[arg(long, short = 'e')]
        experiment: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Metrics to show, comma-separated (default: the test and sample metrics).
        #[arg(long, short = 'm', value_delimiter = ',')]
        metrics: Vec<String>,
        /// Group jobs by these config keys or job fields (stage, seed, status), comma-separated,
        /// instead of by stage and sweep point.
        #[arg(long, value_delimiter = ',')]
        group_by: Vec<String>,
        /// Aggregates per group: mean, std, sem, median, min, max, ci95 of a metric, and
        /// count(); e.g. `mean(test.acc),ci95(test.acc),count()`.
        #[arg(long)]
        agg: Option<String>,
        /// Sort rows by a column, e.g. `-mean(test.acc)` (descending) or `optimizer.lr`.
        #[arg(long, allow_hyphen_values = true)]
        sort: Option<String>,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<usize>,
        /// Also the jobs of earlier versions of the experiment's file (before an edit, or another
        /// file with the same `name:`), which the current version does not have.
        #[arg(long)]
        all_versions: bool,
    },
    /// Learning curves of a metric as SVG: a line per group (default: stage and sweep point)
    /// with the mean over seeds and a ± std band.
    Plot {
        /// The metric, e.g. `val.acc`.
        metric: String,
        /// Only jobs this matches (the filter language of `xlab query`).
        #[arg(long)]
        filter: Option<String>,
        #[arg(long, short = 'e')]
        experiment: Option<String>,
        /// Group jobs by these config keys or job fields (default: stage and the sweep keys).
        #[arg(long, value_delimiter = ',')]
        group_by: Vec<String>,
        /// Plot the metric's final value against this config key (e.g. `optimizer.lr`), or against
        /// another metric's final value (e.g. `sample.nfe`), instead of the learning curve; groups
        /// default to the other sweep keys.
        #[arg(long)]
        x: Option<String>,
        /// A logarithmic x axis (for learning rates and other log-spaced sweeps).
        #[arg(long)]
        log_x: bool,
        /// A logarithmic y axis (losses, FID); the band is then the geometric ± std.
        #[arg(long)]
        log_y: bool,
        /// The plot's title (default: the experiment).
        #[arg(long)]
        title: Option<String>,
        /// The x axis's label (default: `epoch`, `step` or the --x key).
        #[arg(long)]
        xlabel: Option<String>,
        /// The y axis's label (default: the metric).
        #[arg(long)]
        ylabel: Option<String>,
        /// Also the jobs of earlier versions of the experiment's file.
        #[arg(long)]
        all_versions: bool,
        /// The file to write, `.svg` or `.png` (default: `<experiment>-<metric>.svg`).
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Export results: experiments and jobs with config, provenance and metric series.
    Export {
        /// Only this experiment.
        #[arg(long, short = 'e')]
        experiment: Option<String>,
        /// `jsonl` (complete, for `xlab import`) or `csv` (one row per job, final metrics).
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Write to this file instead of standard output.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Merge results exported elsewhere (`xlab export --format jsonl`), by job identity.
    Import { file: PathBuf },
    /// Remove checkpoints no job needs: a done job's (it has its final weights), and all but
    /// the newest valid one of an unfinished job (its resume point), and leftover temporary files.
    Gc {
        /// Only this experiment's jobs.
        #[arg(long, short = 'e')]
        experiment: Option<String>,
        /// Keep each done job's newest checkpoint too.
        #[arg(long)]
        keep_last: bool,
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// What a run is doing (from `xlab run`'s status file while it holds the store) or what the
    /// store holds: jobs done, running, queued and failed, and each running job's progress.
    Status {
        /// The experiment (default: the most recently run one).
        #[arg(long, short = 'e')]
        experiment: Option<String>,
    },
    /// One job, readably: status, sweep point, config, attempts, final metrics, provenance and
    /// files. JOB may be a unique prefix of its id. `--json`: the whole record, with every
    /// metric series.
    Show {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// The experiments the store holds: their files, stages and how many jobs are done.
    Experiments,
    /// Two jobs side by side: the config keys that differ, then every final metric of either
    /// with its difference (b − a).
    Compare { a: String, b: String },
    /// Report versions, libtorch, devices, store and plugin locations.
    Doctor,
    /// Print the JSON Schema of experiment files (also in experiments/schema.json), for editors.
    Schema,
    /// Installed plugins and their components.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Every plugin found (id, components, version, file, sha256), and files refused with why.
    List {
        /// Print the registry as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One component's parameters with types, defaults and docs, and the paper it implements.
    Describe { id: String },
}

/// `1.5 MB`, `312 kB`, `12 B`.
fn human_bytes(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} B"),
        1_000..1_000_000 => format!("{:.0} kB", b as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        _ => format!("{:.2} GB", b as f64 / 1e9),
    }
}

/// Exit codes by who is at fault.
mod exit {
    /// Some jobs failed.
    pub const JOBS_FAILED: u8 = 1;
    /// The user's input is wrong (experiment file, arguments).
    pub const USER: u8 = 2;
    /// The environment is wrong (store in use, missing worker, I/O).
    pub const ENVIRONMENT: u8 = 3;
    /// Stopped by Ctrl-C or SIGTERM before every job ran (the shell's code for SIGINT).
    pub const STOPPED: u8 = 130;
}

/// An error with the exit code it deserves.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

/// Spec errors are the user's; everything else that reaches `?` (store, I/O) is the
/// environment's.
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = if error.downcast_ref::<xlab_spec::SpecError>().is_some() { exit::USER } else { exit::ENVIRONMENT };
        Failure { code, error }
    }
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
        Command::Run { file, how } => {
            let plan = xlab_spec::load(file, &mut plugins::WorkerPlugins::new(worker_path()))?;
            run(cli, plan, how)
        }
        Command::Resume { name, how } => {
            let exp = named_experiment(&existing_store(&cli.store)?, name)?;
            // The text as it was run; relative paths (data, includes, plugins) still resolve
            // from where the file was.
            let file = PathBuf::from(&exp.file);
            if std::fs::read_to_string(&file).is_ok_and(|now| now != exp.source) {
                tracing::warn!(
                    "{} changed since `{name}` last ran; resuming the experiment as it was then",
                    file.display()
                );
            }
            let plan = xlab_spec::load_str(&file, &exp.source, &mut plugins::WorkerPlugins::new(worker_path()))?;
            run(cli, plan, how)
        }
        Command::Validate { file } => {
            let plan = xlab_spec::load(file, &mut plugins::WorkerPlugins::new(worker_path()))?;
            let n: usize = plan.stages.iter().map(|s| s.jobs.len()).sum();
            outln!("{}: ok — experiment `{}`, {} stage(s), {n} job(s)", file.display(), plan.name, plan.stages.len());
            Ok(0)
        }
        Command::Plan { file } => plan(cli, file),
        Command::Query { filter, experiment, format, metrics, group_by, agg, sort, limit, all_versions } => {
            let filter = parse_filter(filter.as_deref())?;
            let store = existing_store(&cli.store)?;
            let exp = versions_of(pick_experiment(&store, experiment.as_deref())?, *all_versions);
            let (vocab, filter) = bind_filter(&store, &exp, filter)?;
            check_metrics(&vocab, &exp, metrics, "-m")?;
            check_group_keys(&vocab, &exp, group_by, "--group-by")?;
            if !group_by.is_empty() || agg.is_some() || sort.is_some() || limit.is_some() {
                let grouping = Grouping { keys: group_by, aggs: agg.as_deref(), sort: sort.as_deref(), limit: *limit };
                grouped_query(&store, &exp, &vocab, *format, metrics, filter.as_ref(), &grouping)?;
                return Ok(0);
            }
            query(&store, &exp, *format, metrics, filter.as_ref())?;
            Ok(0)
        }
        Command::Gc { experiment, keep_last, dry_run } => {
            let store = existing_store(&cli.store)?;
            if let Some(name) = experiment {
                named_experiment(&store, name)?;
            }
            let report = gc::collect(&store, experiment.as_deref(), *keep_last, *dry_run)?;
            for (path, bytes) in report.files.iter().filter(|_| *dry_run) {
                outln!("would remove {} ({})", path.display(), human_bytes(*bytes));
            }
            let verb = if *dry_run { "would remove" } else { "removed" };
            outln!(
                "{verb} {} file(s), {}, from {} job(s); {} unfinished job(s) keep their newest checkpoint to resume from",
                report.files.len(),
                human_bytes(report.bytes()),
                report.jobs,
                report.kept_for_resume
            );
            if report.in_slurm > 0 {
                outln!(
                    "left {} job(s) alone that may still run in Slurm (`xlab status` shows them; run the experiment again \
                     to collect them first)",
                    report.in_slurm
                );
            }
            Ok(0)
        }
        Command::Export { experiment, format, output } => {
            let store = existing_store(&cli.store)?;
            if let Some(name) = experiment {
                named_experiment(&store, name)?;
            }
            let lines = store.export(experiment.as_deref())?;
            let text = match format {
                ExportFormat::Jsonl => {
                    lines.iter().map(|l| serde_json::to_string(l).expect("json") + "\n").collect::<String>()
                }
                ExportFormat::Csv => table::jobs_csv(&lines),
            };
            match output {
                Some(path) => std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?,
                None => out!("{text}"),
            }
            Ok(0)
        }
        Command::Import { file } => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let mut lines = Vec::new();
            for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let line = serde_json::from_str(l).map_err(|e| Failure {
                    code: exit::USER,
                    error: anyhow::anyhow!("{}:{}: not an xlab export line: {e}\n  hint: import reads what `xlab export --format jsonl` writes", file.display(), i + 1),
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
        Command::Show { job, json } => {
            let store = existing_store(&cli.store)?;
            let rec = find_job(&store, job)?;
            let series = store.metrics_of(&rec.id)?;
            if *json {
                let mut v = serde_json::to_value(&rec).expect("json");
                v["metrics"] = serde_json::to_value(xlab_proto::floats::Floats::to_repr(&series)).expect("json");
                outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                out!("{}", show::summary(&store, &rec, &series));
            }
            Ok(0)
        }
        Command::Experiments => {
            let store = existing_store(&cli.store)?;
            out!("{}", show::experiments(&store)?);
            Ok(0)
        }
        Command::Status { experiment } => status_command(cli, experiment.as_deref()),
        Command::Compare { a, b } => {
            let store = existing_store(&cli.store)?;
            let (ra, rb) = (find_job(&store, a)?, find_job(&store, b)?);
            outln!("a: {} ({} {}, {})", ra.id, ra.experiment, ra.stage, ra.status.as_str());
            outln!("b: {} ({} {}, {})", rb.id, rb.experiment, rb.stage, rb.status.as_str());
            let (fa, fb) = (flatten_json(&ra.config), flatten_json(&rb.config));
            let keys: std::collections::BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
            let mut config = Vec::new();
            for k in keys {
                let (x, y) = (fa.get(k), fb.get(k));
                if x != y {
                    let show = |v: Option<&serde_json::Value>| v.map_or("-".to_string(), |v| v.to_string());
                    config.push(vec![k.clone(), show(x), show(y)]);
                }
            }
            config.extend(
                [("seed", ra.seed, rb.seed)]
                    .iter()
                    .filter(|(_, x, y)| x != y)
                    .map(|(k, x, y)| vec![k.to_string(), x.to_string(), y.to_string()]),
            );
            if config.is_empty() {
                outln!("same config");
            } else {
                let header = ["config".to_string(), "a".into(), "b".into()];
                outln!("{}", table::terminal(&header, &config, 1));
            }
            let names: std::collections::BTreeSet<&String> = ra.summary.keys().chain(rb.summary.keys()).collect();
            let rows: Vec<Vec<String>> = names
                .into_iter()
                .map(|m| {
                    let (x, y) = (ra.summary.get(m), rb.summary.get(m));
                    let f = |v: Option<&f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
                    let d = match (x, y) {
                        (Some(x), Some(y)) => format!("{:+.4}", y - x),
                        _ => "-".into(),
                    };
                    vec![m.clone(), f(x), f(y), d]
                })
                .collect();
            let header = ["metric".to_string(), "a".into(), "b".into(), "b − a".into()];
            outln!("{}", table::terminal(&header, &rows, 1));
            Ok(0)
        }
        Command::Doctor => doctor(cli),
        Command::Plot {
            metric,
            filter,
            experiment,
            group_by,
            x,
            log_x,
            log_y,
            title,
            xlabel,
            ylabel,
            all_versions,
            output,
        } => {
            let filter = parse_filter(filter.as_deref())?;
            let store = existing_store(&cli.store)?;
            let exp = versions_of(pick_experiment(&store, experiment.as_deref())?, *all_versions);
            let (vocab, filter) = bind_filter(&store, &exp, filter)?;
            check_metrics(&vocab, &exp, std::slice::from_ref(metric), "the metric")?;
            check_group_keys(&vocab, &exp, group_by, "--group-by")?;
            if let Some(k) = x {
                if !vocab.is_key(k) && !vocab.is_metric(k) {
                    let hint = vocab.suggest(k).map_or_else(
                        || {
                            "plot against a config key (`optimizer.lr`) or another metric's final value (`sample.nfe`)"
                                .into()
                        },
                        |c| format!("did you mean `{c}`?"),
                    );
                    return Err(user_error(format!(
                        "--x `{k}`: no job of experiment `{}` has this config key or metric\n  hint: {hint}",
                        exp.name
                    )));
                }
            }
            let mut keys = if group_by.is_empty() { default_group_keys(&exp) } else { group_by.clone() };
            if group_by.is_empty() {
                keys.retain(|k| Some(k) != x.as_ref());
            }
            let (curves, per_epoch) = plot::curves(&store, &exp, filter.as_ref(), &keys, metric, x.as_deref())?;
            if curves.is_empty() {
                let what = match x {
                    Some(k) => format!("a final `{metric}` and a number at `{k}`"),
                    None => format!("a series for `{metric}`"),
                };
                return Err(Failure {
                    code: exit::USER,
                    error: anyhow::anyhow!(
                        "no job of experiment `{}` has {what}\n  hint: `xlab show JOB` lists a job's metrics and config",
                        exp.name
                    ),
                });
            }
            if *log_x && curves.iter().flat_map(|c| c.points.keys()).any(|p| p.0 <= 0.0) {
                return Err(Failure { code: exit::USER, error: anyhow::anyhow!("`--log-x` needs x values above 0") });
            }
            if *log_y && curves.iter().flat_map(|c| c.points.values().flatten()).any(|v| *v <= 0.0) {
                return Err(user_error(format!("`--log-y` needs values of `{metric}` above 0")));
            }
            let path = output.clone().unwrap_or_else(|| match x {
                Some(k) => PathBuf::from(format!("{}-{metric}-vs-{k}.svg", exp.name)),
                None => PathBuf::from(format!("{}-{metric}.svg", exp.name)),
            });
            let x_label = match (xlabel, x) {
                (Some(l), _) => l.as_str(),
                (None, Some(k)) => k.as_str(),
                (None, None) if per_epoch => "epoch",
                (None, None) => "step",
            };
            let axis = plot::XAxis { label: x_label, log: *log_x, y_label: ylabel.as_deref(), log_y: *log_y };
            let title = title.clone().unwrap_or_else(|| format!("experiment `{}`", exp.name));
            let scene = plot::layout(&title, metric, &curves, &axis);
            let bytes = match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
                Some("png") => raster::png(&scene),
                Some("svg") => plot::svg(&scene).into_bytes(),
                _ => {
                    return Err(Failure {
                        code: exit::USER,
                        error: anyhow::anyhow!(
                            "cannot tell the format of {}\n  hint: name the file .svg or .png",
                            path.display()
                        ),
                    })
                }
            };
            std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
            outln!("wrote {} ({} curve(s))", path.display(), curves.len());
            Ok(0)
        }
        Command::Schema => {
            outln!("{}", serde_json::to_string_pretty(&xlab_spec::schema::schema()).expect("json"));
            Ok(0)
        }
        Command::Plugins { command } => plugins_command(command),
    }
}

fn status_command(cli: &Cli, experiment: Option<&str>) -> Result<u8, Failure> {
    if !cli.store.join("db").is_dir() {
        existing_store(&cli.store)?;
    }
    let snap: Option<status::Snapshot> =
        std::fs::read(status::path(&cli.store)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    match Store::open(&cli.store) {
        Err(StoreError::InUse { pid, .. }) => {
            match snap.filter(|s| !s.finished && experiment.is_none_or(|e| e == s.experiment)) {
                Some(s) => {
                    outln!(
                        "running (updated {} ago)",
                        status::ago(xlab_store::now_unix().saturating_sub(s.updated_unix))
                    );
                    out!("{}", status::render(&s));
                }
                None => outln!("the store is in use by pid {pid}, which has not reported a run's status"),
            }
            Ok(0)
        }
        Err(e) => Err(e.into()),
        Ok(store) => {
            let exp = pick_experiment(&store, experiment)?;
            outln!("experiment `{}` (no run in progress)", exp.name);
            let mut failed = Vec::new();
            // Jobs a stopped `xlab run --executor slurm` left in Slurm, with what Slurm says now.
            let mut in_slurm = Vec::new();
            for stage in &exp.stages {
                let mut counts = std::collections::BTreeMap::<&str, usize>::new();
                for id in &stage.jobs {
                    let Some(rec) = store.job(id)? else { continue };
                    *counts.entry(rec.status.as_str()).or_default() += 1;
                    if let Some(slurm) = rec.in_slurm() {
                        in_slurm.push((rec.id.clone(), rec.stage.clone(), slurm.to_string()));
                    }
                    if rec.status == JobStatus::Failed {
                        let last = rec.attempts.last();
                        let why = last.and_then(|a| a.error.as_deref()).unwrap_or("").lines().next().unwrap_or("");
                        let cause = last.and_then(|a| a.outcome.as_deref()).unwrap_or("failed");
                        failed.push(format!("  {} {} ({cause}): {why}", rec.id, rec.stage));
                    }
                }
                let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
                outln!("  stage `{}`: {}", stage.name, parts.join(", "));
            }
            if !in_slurm.is_empty() {
                let queue = xlab_sched::slurm::queue();
                outln!("in Slurm (run the same command again to re-attach and collect their results):");
                for (id, stage, slurm) in in_slurm {
                    outln!("  {id} {stage}: Slurm job {slurm}, {}", status::slurm_state(&queue, &slurm));
                }
            }
            if !failed.is_empty() {
                outln!("failed jobs (`xlab show JOB` has the full record):");
                for f in failed {
                    outln!("{f}");
                }
            }
            if snap.is_some_and(|s| !s.finished && s.experiment == exp.name) {
                outln!("its last run ended without finishing; run the same command again to resume");
            }
            Ok(0)
        }
    }
}

/// `{"optimizer": {"lr": 0.1}}` → `optimizer.lr = 0.1`.
pub(crate) fn flatten_json(v: &serde_json::Value) -> std::collections::BTreeMap<String, serde_json::Value> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut std::collections::BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", v, &mut out);
    out
}

fn open_store(dir: &Path) -> Result<Store, Failure> {
    Ok(Store::open(dir)?)
}

/// Opens the store a read command reads: a folder without one (a mistyped `--store`) is an
/// error, and nothing is created there.
fn existing_store(dir: &Path) -> Result<Store, Failure> {
    if !dir.join("db").is_dir() {
        return Err(Failure {
            code: exit::USER,
            error: anyhow::anyhow!(
                "there is no xlab store at {}{}\n  hint: check `--store` (or `XLAB_STORE`); `xlab run FILE` makes a \
                 store where it is told to",
                dir.display(),
                if dir.exists() { " (the folder has no `db/`)" } else { " (no such folder)" }
            ),
        });
    }
    open_store(dir)
}

/// The `xlab-worker` executable: `XLAB_WORKER`, or the one beside this `xlab`.
fn worker_path() -> PathBuf {
    if let Some(p) = std::env::var_os("XLAB_WORKER") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().ok();
    exe.and_then(|e| e.parent().map(|d| d.join("xlab-worker"))).unwrap_or_else(|| PathBuf::from("xlab-worker"))
}

/// Counts SIGINT and SIGTERM: the scheduler stops gracefully at the first and kills its
/// workers at the second.
fn count_stop_requests() -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let stops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let s = std::sync::Arc::clone(&stops);
        // SAFETY: the handler only increments an atomic, which is async-signal-safe.
        let registered = unsafe {
            signal_hook::low_level::register(sig, move || {
                s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        };
        if let Err(e) = registered {
            tracing::warn!("cannot catch signal {sig}: {e}; Ctrl-C will end xlab without a graceful stop");
        }
    }
    stops
}

/// The Slurm settings when jobs go to Slurm: `--executor`, else the file's `executor:`.
fn slurm_settings(how: &RunArgs, plan: &xlab_spec::Plan) -> Option<xlab_spec::file::Slurm> {
    use xlab_spec::file::Executor;
    match (how.executor, &plan.executor) {
        (Some(ExecutorKind::Local), _) | (None, None | Some(Executor::Local)) => None,
        (_, Some(Executor::Slurm(s))) => Some(s.clone()),
        (Some(ExecutorKind::Slurm), _) => Some(Default::default()),
    }
}

/// Looks at the plan's jobs the store already holds as done, before a run skips them: returns
/// those `--rerun` selects, and warns about the others that a different build of one of their
/// plugins produced (same id and version, another file: a plugin edited and rebuilt without a
/// version bump), which would otherwise be reused without a word.
fn review_done_jobs(
    store: &dyn ResultStore,
    plan: &xlab_spec::Plan,
    rerun: Option<&str>,
) -> Result<std::collections::HashSet<String>, Failure> {
    let mut filter = parse_filter(rerun)?;
    let mut done = Vec::new();
    for job in plan.jobs() {
        if let Some(rec) = store.job(job.id.as_str())?.filter(|r| r.status == xlab_store::JobStatus::Done) {
            done.push((job, rec));
        }
    }
    let mut selected = std::collections::HashSet::new();
    if let Some((f, q)) = &mut filter {
        let vocab = vocab::Vocab::of_records(done.iter().map(|(_, r)| r));
        if done.is_empty() {
            tracing::warn!("--rerun: no job of `{}` is done yet, so there is nothing to run again", plan.name);
        } else {
            f.bind(&vocab).map_err(|e| user_error(format!("bad --rerun filter:\n{}", e.render(q))))?;
            for (job, rec) in &done {
                if f.matches(&filter::StoredJob { record: rec, series: None }) {
                    selected.insert(job.id.to_string());
                }
            }
            tracing::info!(
                "--rerun matched {} of the {} done job(s); they run again as new attempts",
                selected.len(),
                done.len()
            );
        }
    }
    // Plugin id -> (version, jobs built by another file of it).
    let mut stale: std::collections::BTreeMap<&str, (&str, usize)> = Default::default();
    for (job, rec) in done.iter().filter(|(j, _)| !selected.contains(j.id.as_str())) {
        for used in &job.plugins {
            let before = rec.provenance.plugins.iter().find(|p| p.id == used.id);
            if before.is_some_and(|b| !b.sha256.is_empty() && b.sha256 != used.sha256) {
                stale.entry(&used.id).or_insert((&used.version, 0)).1 += 1;
            }
        }
    }
    for (plugin, (version, n)) in stale {
        tracing::warn!(
            "{n} done job(s) of `{}` were produced by another build of plugin `{plugin}` {version} (its file's SHA-256 \
             differs) and are kept as done, since the version did not change\n  hint: to run them with this build, \
             `xlab run FILE --rerun FILTER` (e.g. --rerun 'step_rule.use ~ \"^{plugin}\\.\"'); bump the plugin's version \
             when its behaviour changes",
            plan.name
        );
    }
    Ok(selected)
}

/// Finds the jobs a store recorded before files were identified by content (see
/// `Plan::adopt_earlier_ids`).
fn adopt_earlier_ids(store: &dyn ResultStore, plan: &mut xlab_spec::Plan) {
    let n = plan.adopt_earlier_ids(&mut |id| store.job(id).ok().flatten().is_some());
    if n > 0 {
        tracing::debug!("{n} job(s) of `{}` found under the ids they were recorded with", plan.name);
    }
}

/// Says when this run replaces the file an experiment last ran from (an edit, or another file
/// with the same `name:`): the earlier version and its jobs stay, and how to see them.
fn say_if_replacing(store: &dyn ResultStore, plan: &xlab_spec::Plan) -> Result<(), Failure> {
    let Some(before) = store.experiment(&plan.name)? else { return Ok(()) };
    let file = plan.file.display().to_string();
    if before.source == plan.source {
        return Ok(());
    }
    let planned: std::collections::HashSet<&str> = plan.jobs().map(|j| j.id.as_str()).collect();
    let all = before.with_all_versions();
    let earlier_only = all.stages.iter().flat_map(|s| &s.jobs).filter(|j| !planned.contains(j.as_str())).count();
    let what = if before.file == file {
        format!("an edited {file}")
    } else {
        format!("{file} (it last ran from {})", before.file)
    };
    tracing::warn!(
        "experiment `{}` runs from {what}: version {} of it, after version {}. {earlier_only} job(s) of earlier versions \
         are not in this one; they stay in the store, and `xlab query --all-versions` shows \
         them",
        plan.name,
        before.version() + 1,
        before.version()
    );
    Ok(())
}

fn run(cli: &Cli, mut plan: xlab_spec::Plan, how: &RunArgs) -> Result<u8, Failure> {
    let fail_fast = how.fail_fast;
    let (pool, slurm) = match slurm_settings(how, &plan) {
        Some(settings) => {
            let s = xlab_sched::slurm::SlurmExec::new(settings, &worker_path(), &cli.store, how.threads)
                .map_err(|e| Failure { code: exit::ENVIRONMENT, error: anyhow::anyhow!(e) })?;
            (xlab_sched::Pool::new(Vec::new()), Some(s))
        }
        None => {
            let pool = xlab_sched::build_pool(&how.pool(), &xlab_sched::detect_gpus())
                .map_err(|e| Failure { code: exit::USER, error: anyhow::anyhow!(e) })?;
            xlab_sched::check_placement(&plan, &pool)
                .map_err(|e| Failure { code: exit::USER, error: anyhow::anyhow!(e) })?;
            (pool, None)
        }
    };
    let store = open_store(&cli.store)?;
    adopt_earlier_ids(&store, &mut plan);
    say_if_replacing(&store, &plan)?;
    let rerun = review_done_jobs(&store, &plan, how.rerun.as_deref())?;
    let total = plan.jobs().count();
    let cap = how.max_parallel.or(plan.max_parallel).map(|m| m as usize);
    let (at_once, on) = match &slurm {
        Some(s) => (cap.map_or("every ready job".into(), |c| format!("up to {c}")), s.describe()),
        None => (pool.len().min(cap.unwrap_or(usize::MAX)).to_string(), pool.describe()),
    };
    tracing::info!(
        "experiment `{}`: {total} job(s) in {} stage(s), {at_once} at a time on {on}, store {}",
        plan.name,
        plan.stages.len(),
        cli.store.display()
    );
    let opts = RunOptions {
        worker: worker_path(),
        pool,
        slurm,
        xlab_version: VERSION.into(),
        git_commit: env!("XLAB_GIT_COMMIT").into(),
        stop: count_stop_requests(),
        fail_fast,
        max_parallel: how.max_parallel.map(|m| m as usize),
        rerun,
    };
    let started = Instant::now();
    let mut finished = 0usize;
    let live = live::wanted(matches!(cli.log_format, LogFormat::Human) && !cli.quiet).then(|| live::Live::start(total));
    let mut tracker = status::Tracker::new(&cli.store, &plan.name, total, live);
    let mut observe = |p: Progress<'_>| match p {
        Progress::Skipped { job } => {
            tracker.skipped();
            finished += 1;
            tracing::info!("[{finished}/{total}] {} {} already done (job {})", job.stage, job.label(), job.id);
        }
        Progress::Started { job, device, attempt, slurm_job } => {
            tracker.started(job, device, attempt, slurm_job);
            let again = if attempt > 1 { format!(", attempt {attempt}") } else { String::new() };
            tracing::info!("started {} {} on {device} (job {}{again})", job.stage, job.label(), job.id);
        }
        Progress::Resumed { job, epoch, step_in_epoch: 0 } => {
            tracing::info!("resumed {} {} from its checkpoint after epoch {epoch}", job.stage, job.label());
        }
        Progress::Resumed { job, epoch, step_in_epoch } => {
            tracing::info!(
                "resumed {} {} from its checkpoint in epoch {}, after {step_in_epoch} batches",
                job.stage,
                job.label(),
                epoch + 1
            );
        }
        Progress::Metrics { job, step, values } => {
            tracker.metrics(job.id.as_str(), step, values);
            let shown: Vec<String> =
                values.iter().filter(|(k, _)| k.as_str() != "epoch").map(|(k, v)| format!("{k}={v:.4}")).collect();
            tracing::debug!("{} {} step {step}: {}", job.stage, job.label(), shown.join(" "));
        }
        Progress::Finished { job, summary } => {
            tracker.ended(job.id.as_str(), status::Ended::Done);
            finished += 1;
            // The headline test metrics; per-group values stay in the store (`xlab show`).
            let shown: Vec<String> = summary
                .iter()
                .filter(|(k, _)| k.starts_with("test.") && !k.contains(".group_"))
                .map(|(k, v)| format!("{k}={v:.4}"))
                .collect();
            tracing::info!("[{finished}/{total}] done {} {}: {}", job.stage, job.label(), shown.join(" "));
        }
        Progress::Warning { job, message } => {
            tracing::warn!("{} {} (job {}): {message}", job.stage, job.label(), job.id);
        }
        Progress::Retrying { job, cause, message, delay } => {
            tracker.ended(job.id.as_str(), status::Ended::Retrying);
            tracing::warn!(
                "{} {} failed ({}): {message}; trying again in {} s (job {})",
                job.stage,
                job.label(),
                cause.as_str(),
                delay.as_secs(),
                job.id
            );
        }
        Progress::Stopped { job, message } => {
            tracker.ended(job.id.as_str(), status::Ended::Stopped);
            tracing::warn!("{} {} {message} (job {})", job.stage, job.label(), job.id);
        }
        Progress::Failed { job, cause, message } => {
            tracker.ended(job.id.as_str(), status::Ended::Failed);
            finished += 1;
            tracing::error!(
                "[{finished}/{total}] FAILED ({}) {} {} (job {}): {message}",
                cause.as_str(),
                job.stage,
                job.label(),
                job.id
            );
        }
    };
    let report = xlab_sched::run(&store, &plan, opts, &mut observe)?;
    tracker.finish();
    tracing::info!(
        "{} done, {} skipped (already done), {} failed in {:.1}s",
        report.done,
        report.skipped,
        report.failed.len(),
        started.elapsed().as_secs_f64()
    );
    query(&store, &pick_experiment(&store, Some(&plan.name))?, Format::Table, &[], None)?;
    if report.detached > 0 {
        eprintln!(
            "{} job(s) keep running in Slurm. Run the same command again to re-attach to them (their results are \
             collected then); `scancel` stops them.",
            report.detached
        );
    }
    if let Some(why) = &report.ended_early {
        if report.detached == 0 || report.stopped + report.not_started > 0 {
            eprintln!(
                "{why}: {} job(s) stopped (each resumes from its last checkpoint), {} not started. Run the same command \
                 again to resume; nothing recorded is lost.",
                report.stopped, report.not_started
            );
        }
        if report.disk_full.is_some() {
            return Ok(exit::ENVIRONMENT);
        }
        if report.failed.is_empty() {
            return Ok(exit::STOPPED);
        }
    }
    if report.failed.is_empty() {
        return Ok(0);
    }
    let config = report.failed.iter().filter(|f| f.1 == xlab_proto::FailureCause::Config).count();
    let other = report.failed.len() - config;
    let held: usize = report.held_back.iter().map(|h| h.1).sum();
    if config > 0 {
        let held = if held > 0 {
            format!(" ({held} more job(s) of the same stage(s) were not started)")
        } else {
            String::new()
        };
        eprintln!(
            "{config} job(s) failed with a config error{held}: running them again as they are fails the same way. \
             Fix the experiment file (or the data it names) and run it again."
        );
    }
    if other > 0 {
        eprintln!(
            "{other} job(s) failed; their logs are in {}/runs/<job>/worker.log. Run the same command again to retry them.",
            cli.store.display()
        );
    }
    Ok(exit::JOBS_FAILED)
}

fn plan(cli: &Cli, file: &Path) -> Result<u8, Failure> {
    let mut plan = xlab_spec::load(file, &mut plugins::WorkerPlugins::new(worker_path()))?;
    let store = if cli.store.join("db").exists() { Some(open_store(&cli.store)?) } else { None };
    if let Some(s) = &store {
        adopt_earlier_ids(s, &mut plan);
    }
    outln!("experiment `{}` ({})", plan.name, file.display());
    for stage in &plan.stages {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        let mut each = Vec::with_capacity(stage.jobs.len());
        for job in &stage.jobs {
            let status = match &store {
                Some(s) => s.job(job.id.as_str())?.map(|r| r.status),
                None => None,
            };
            let key = match status {
                None | Some(JobStatus::Pending) => "new",
                Some(JobStatus::Done) => "done",
                Some(JobStatus::Failed) => "failed",
                Some(JobStatus::Running | JobStatus::Interrupted) => "interrupted",
            };
            *counts.entry(key).or_default() += 1;
            each.push(key);
        }
        let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let mut sweep =
            if stage.sweep_keys.is_empty() { String::new() } else { format!(" over {}", stage.sweep_keys.join(", ")) };
        if let Some((parent, select)) = &stage.needs {
            let how = match (select, stage.jobs.first().and_then(|j| j.pick.as_ref())) {
                (xlab_spec::file::Select::Each, _) => "one per job".to_string(),
                (xlab_spec::file::Select::All, _) => "all jobs".to_string(),
                (xlab_spec::file::Select::Best, Some(p)) => {
                    format!("best by {} {}", p.metric, if p.mode == xlab_spec::file::Mode::Max { "max" } else { "min" })
                }
                (xlab_spec::file::Select::Best, None) => "best".to_string(),
            };
            sweep = format!(" needing `{parent}` ({how}){sweep}");
        }
        outln!("  stage `{}`: {} job(s){sweep}: {}", stage.name, stage.jobs.len(), parts.join(", "));
        for (job, status) in stage.jobs.iter().zip(each) {
            outln!("    {}  {status:<11}  {}", job.id, job.label());
        }
    }
    Ok(0)
}

struct Grouping<'a> {
    keys: &'a [String],
    aggs: Option<&'a str>,
    sort: Option<&'a str>,
    limit: Option<usize>,
}

/// The experiment a query names, or the most recently run one.
fn pick_experiment(store: &dyn ResultStore, experiment: Option<&str>) -> Result<xlab_store::ExperimentRecord, Failure> {
    Ok(match experiment {
        Some(name) => store.experiment(name)?.with_context(|| {
            format!("no experiment `{name}` in store {}; `xlab run FILE` records one", store.dir().display())
        })?,
        None => {
            let mut all = store.experiments()?;
            all.sort_by_key(|e| e.updated_unix);
            all.pop().with_context(|| {
                format!("store {} holds no experiments yet; run one with `xlab run FILE`", store.dir().display())
            })?
        }
    })
}

/// The experiment with the jobs of its earlier versions (`--all-versions`), or as last run,
/// with a note when earlier versions hold jobs it does not show.
fn versions_of(exp: xlab_store::ExperimentRecord, all: bool) -> xlab_store::ExperimentRecord {
    if all {
        return exp.with_all_versions();
    }
    let hidden = exp.hidden_jobs().len();
    if hidden > 0 {
        eprintln!(
            "note: {hidden} job(s) of earlier versions of `{}`'s file are not shown (this is version {}); --all-versions shows them",
            exp.name,
            exp.version()
        );
    }
    exp
}

/// The experiment a command names; a name the store lacks is the user's mistake, with the
/// closest stored name or the names it holds.
fn named_experiment(store: &dyn ResultStore, name: &str) -> Result<xlab_store::ExperimentRecord, Failure> {
    if let Some(e) = store.experiment(name)? {
        return Ok(e);
    }
    let known: Vec<String> = store.experiments()?.into_iter().map(|e| e.name).collect();
    let hint = match xlab_spec::did_you_mean(name, known.iter().map(String::as_str)) {
        Some(c) => format!("did you mean `{c}`?"),
        None if known.is_empty() => "the store holds no experiments yet".to_string(),
        None => format!("it holds: {}", known.join(", ")),
    };
    Err(Failure {
        code: exit::USER,
        error: anyhow::anyhow!("no experiment `{name}` in store {}\n  hint: {hint}", store.dir().display()),
    })
}

/// The job a command names by its id or a unique prefix of it (`xlab show 3f2a`).
fn find_job(store: &dyn ResultStore, id: &str) -> Result<xlab_store::JobRecord, Failure> {
    if let Some(rec) = store.job(id)? {
        return Ok(rec);
    }
    let found = if id.is_empty() { Vec::new() } else { store.job_ids_with_prefix(id, 6)? };
    match found.as_slice() {
        [one] => Ok(store.job(one)?.with_context(|| format!("job {one} vanished from the store"))?),
        [] => Err(user_error(format!(
            "no job `{id}` in store {}\n  hint: `xlab query --format json` and `xlab plan FILE` list job ids",
            store.dir().display()
        ))),
        many => Err(user_error(format!(
            "`{id}` is the start of {} job ids ({}{}); give more of it",
            if many.len() > 5 { "more than 5".to_string() } else { many.len().to_string() },
            many.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if many.len() > 5 { ", …" } else { "" }
        ))),
    }
}

/// A filter given on the command line; a mistake is the user's, with a caret under it.
fn parse_filter(text: Option<&str>) -> Result<Option<(filter::Filter, &str)>, Failure> {
    text.map(|q| {
        filter::Filter::parse(q)
            .map(|f| (f, q))
            .map_err(|e| Failure { code: exit::USER, error: anyhow::anyhow!("bad filter:\n{}", e.render(q)) })
    })
    .transpose()
}

fn user_error(message: String) -> Failure {
    Failure { code: exit::USER, error: anyhow::anyhow!(message) }
}

/// What the experiment's jobs hold, and the filter checked against it (a name no job has is
/// the user's mistake, with a caret under it).
fn bind_filter(
    store: &dyn ResultStore,
    exp: &xlab_store::ExperimentRecord,
    filter: Option<(filter::Filter, &str)>,
) -> Result<(vocab::Vocab, Option<filter::Filter>), Failure> {
    let vocab = vocab::Vocab::of(store, exp)?;
    let filter = match filter {
        Some((mut f, q)) => {
            f.bind(&vocab).map_err(|e| user_error(format!("bad filter:\n{}", e.render(q))))?;
            Some(f)
        }
        None => None,
    };
    Ok((vocab, filter))
}

/// Refuses metric names no job of the experiment has logged, with a "did you mean".
fn check_metrics(
    vocab: &vocab::Vocab,
    exp: &xlab_store::ExperimentRecord,
    metrics: &[String],
    what: &str,
) -> Result<(), Failure> {
    for m in metrics {
        if !vocab.is_metric(m) {
            let hint = match vocab.suggest_metric(m) {
                Some(c) => format!("did you mean `{c}`?"),
                None if vocab.metrics.is_empty() => "no job of it has logged a metric yet".into(),
                None => "`xlab show JOB` lists a job's metrics".into(),
            };
            return Err(user_error(format!("{what}: no metric `{m}` in experiment `{}`\n  hint: {hint}", exp.name)));
        }
    }
    Ok(())
}

/// Stage and every sweep key: the groups of the default results table.
fn default_group_keys(exp: &xlab_store::ExperimentRecord) -> Vec<String> {
    let mut k = vec!["stage".to_string()];
    for s in &exp.stages {
        k.extend(s.sweep_keys.iter().filter(|x| !k.contains(x)).cloned().collect::<Vec<_>>());
    }
    k
}

/// Refuses a key to group by that no job of the experiment has (`--group-by stagee` used to put
/// every job in one group with an empty key): a job field (stage, status, seed, id, experiment)
/// or a dotted config key of at least one job, with a "did you mean".
fn check_group_keys(
    vocab: &vocab::Vocab,
    exp: &xlab_store::ExperimentRecord,
    keys: &[String],
    flag: &str,
) -> Result<(), Failure> {
    for k in keys {
        if !vocab.is_key(k) {
            let hint = match vocab.suggest_key(k) {
                Some(c) => format!("did you mean `{c}`?"),
                None => "group by a job field (stage, status, seed, id) or a config key, e.g. `optimizer.lr`".into(),
            };
            return Err(user_error(format!(
                "{flag} `{k}`: no job of experiment `{}` has this field or config key\n  hint: {hint}",
                exp.name
            )));
        }
    }
    Ok(())
}

/// A valid filter that matched no job says so (on stderr; the empty table still prints).
fn say_matched_none(exp: &xlab_store::ExperimentRecord) {
    let n: usize = exp.stages.iter().map(|s| s.jobs.len()).sum();
    eprintln!("the filter matched 0 of the {n} job(s) of experiment `{}`", exp.name);
}

fn grouped_query(
    store: &dyn ResultStore,
    exp: &xlab_store::ExperimentRecord,
    vocab: &vocab::Vocab,
    format: Format,
    wanted: &[String],
    filter: Option<&filter::Filter>,
    g: &Grouping<'_>,
) -> Result<(), Failure> {
    let user = |m: String| Failure { code: exit::USER, error: anyhow::anyhow!(m) };
    let keys: Vec<String> = if g.keys.is_empty() { default_group_keys(exp) } else { g.keys.to_vec() };
    let aggs = match g.aggs {
        Some(text) => {
            let aggs = aggregate::parse_aggs(text).map_err(|m| user(format!("bad --agg: {m}")))?;
            let named: Vec<String> = aggs.iter().filter(|a| a.func != "count").map(|a| a.metric.clone()).collect();
            check_metrics(vocab, exp, &named, "--agg")?;
            aggs
        }
        None => {
            let metrics = if wanted.is_empty() {
                table::default_metrics(&table::rows(store, exp, filter)?)
            } else {
                wanted.to_vec()
            };
            let mut a: Vec<aggregate::Agg> = metrics
                .iter()
                .flat_map(|m| ["mean", "std"].map(|f| aggregate::Agg { func: f, metric: m.clone() }))
                .collect();
            a.push(aggregate::Agg { func: "count", metric: String::new() });
            a
        }
    };
    let mut grouped = aggregate::group(store, exp, filter, &keys, &aggs)?;
    if grouped.rows.is_empty() && filter.is_some() {
        say_matched_none(exp);
    }
    if let Some(by) = g.sort {
        grouped.sort(by).map_err(|m| user(format!("bad --sort: {m}")))?;
    }
    if let Some(n) = g.limit {
        grouped.rows.truncate(n);
    }
    let (header, cells) = (grouped.header(), grouped.cells());
    match format {
        Format::Table => {
            outln!("experiment `{}`", exp.name);
            outln!("{}", table::terminal(&header, &cells, keys.len()));
        }
        Format::Csv => out!("{}", table::csv(&header, &grouped.exact_cells())),
        Format::Json => outln!("{}", serde_json::to_string_pretty(&grouped.json()).expect("json")),
        Format::Markdown => out!("{}", table::markdown(&header, &cells)),
        Format::Latex => out!("{}", table::latex(&header, &cells)),
    }
    Ok(())
}

fn query(
    store: &dyn ResultStore,
    exp: &xlab_store::ExperimentRecord,
    format: Format,
    wanted: &[String],
    filter: Option<&filter::Filter>,
) -> Result<(), Failure> {
    let rows = table::rows(store, exp, filter)?;
    if rows.is_empty() && filter.is_some() {
        say_matched_none(exp);
    }
    let metrics = if wanted.is_empty() { table::default_metrics(&rows) } else { wanted.to_vec() };
    match format {
        Format::Table => {
            outln!("experiment `{}`", exp.name);
            outln!("{}", table::render(&rows, &metrics));
        }
        Format::Csv => out!("{}", table::render_csv(&rows, &metrics)),
        Format::Markdown => out!("{}", table::render_markdown(&rows, &metrics)),
        Format::Latex => out!("{}", table::render_latex(&rows, &metrics)),
        Format::Json => {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    let point: serde_json::Map<String, serde_json::Value> = r.point.iter().cloned().collect();
                    let stats: serde_json::Map<String, serde_json::Value> = r
                        .metrics
                        .iter()
                        .map(|(k, xs)| {
                            let (mean, std) = table::mean_std(xs);
                            let f = xlab_proto::floats::to_json;
                            let values: Vec<serde_json::Value> = xs.iter().copied().map(f).collect();
                            let std = std.map(f);
                            (k.clone(), serde_json::json!({"mean": f(mean), "std": std, "n": xs.len(), "values": values}))
                        })
                        .collect();
                    serde_json::json!({"stage": r.stage, "point": point, "metrics": stats, "done": r.done, "jobs": r.jobs})
                })
                .collect();
            outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
    }
    Ok(())
}

fn plugins_command(cmd: &PluginsCommand) -> Result<u8, Failure> {
    let registry = plugins::WorkerPlugins::fetch(&worker_path(), &[])
        .map_err(|m| Failure { code: exit::ENVIRONMENT, error: anyhow::anyhow!(m) })?;
    match cmd {
        PluginsCommand::List { json } => {
            if *json {
                outln!("{}", serde_json::to_string_pretty(&registry).expect("json"));
                return Ok(0);
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
            t.set_header(["component", "kind", "plugin", "version", "file", "sha256"]);
            for p in &registry.plugins {
                for c in &p.components {
                    t.add_row([
                        c.id.as_str(),
                        c.kind.as_str(),
                        p.id.as_str(),
                        p.version.as_str(),
                        p.file.as_str(),
                        &p.sha256[..12],
                    ]);
                }
            }
            outln!("{t}");
            for r in &registry.refused {
                outln!("refused {}: {}", r.file, r.reason);
            }
            Ok(0)
        }
        PluginsCommand::Describe { id } => {
            let Some((plugin, c)) = registry.component(id) else {
                let hint = match xlab_spec::did_you_mean(id, registry.component_ids()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "see `xlab plugins list`".to_string(),
                };
                return Err(Failure {
                    code: exit::USER,
                    error: anyhow::anyhow!("unknown plugin component `{id}`\n  hint: {hint}"),
                });
            };
            outln!("{} ({}) from plugin `{}` {} ({})", c.id, c.kind, plugin.id, plugin.version, plugin.file);
            outln!("  {}", c.summary);
            outln!("  reference: {}", c.reference);
            outln!("  passes per step: {}; stateful: {}; random: {}", c.passes_per_step, c.stateful, c.random);
            outln!("parameters:");
            for p in &c.params {
                let range = match (p.min, p.max) {
                    (Some(a), Some(b)) => format!(" in [{a}, {b}]"),
                    (Some(a), None) => format!(" ≥ {a}"),
                    (None, Some(b)) => format!(" ≤ {b}"),
                    (None, None) => String::new(),
                };
                let choices =
                    if p.choices.is_empty() { String::new() } else { format!(" one of {}", p.choices.join("|")) };
                outln!("  {:<14} {:?}{range}{choices}, default {}: {}", p.name, p.ty, p.default, p.doc);
            }
            Ok(0)
        }
    }
}

fn doctor(cli: &Cli) -> Result<u8, Failure> {
    outln!("xlab {VERSION} ({})", env!("XLAB_GIT_COMMIT"));
    let worker = worker_path();
    outln!("worker:       {}", worker.display());
    match std::process::Command::new(&worker).arg("probe").output() {
        Ok(out) if out.status.success() => {
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("the worker's probe did not print JSON")?;
            let s = |k: &str| {
                v.get(k).map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).unwrap_or_default()
            };
            outln!("libtorch:     {} at {}", s("libtorch_version"), s("libtorch_dir"));
            outln!("CUDA library: {}", s("cuda_library"));
            outln!(
                "CUDA usable:  {} ({} device(s), cuDNN {})",
                s("cuda_available"),
                s("cuda_devices"),
                s("cudnn_available")
            );
            outln!("CPU threads:  {} (host {})", s("cpu_threads"), s("host"));
        }
        Ok(out) => outln!("libtorch:     the worker's probe failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => outln!("libtorch:     cannot start the worker: {e} (build it with `make build`)"),
    }
    let gpus = xlab_sched::detect_gpus();
    for g in &gpus {
        outln!("GPU:          cuda:{} {} ({} MiB)", g.index, g.name, g.memory_mib);
    }
    if gpus.is_empty() {
        outln!("GPUs:         none found (neither NVML nor nvidia-smi answers); jobs run on CPU slots");
    }
    let abs = std::path::absolute(&cli.store).unwrap_or_else(|_| cli.store.clone());
    let state = match Store::open(&cli.store) {
        Ok(s) => format!("{} experiment(s)", s.experiments().map(|e| e.len()).unwrap_or(0)),
        Err(StoreError::InUse { pid, .. }) => format!("in use by pid {pid}"),
        Err(e) => format!("cannot open: {e}"),
    };
    outln!("store:        {} ({state})", abs.display());
    // `--executor slurm` needs Slurm's commands here, and a controller that answers.
    let slurm = match std::process::Command::new("sbatch").arg("--version").output() {
        Err(_) => "no `sbatch` on PATH (`--executor slurm` needs Slurm's commands)".into(),
        Ok(o) if !o.status.success() => {
            let said = String::from_utf8_lossy(&o.stderr);
            format!("`sbatch` is installed but fails: {}", said.lines().last().unwrap_or("").trim())
        }
        Ok(o) => match xlab_sched::slurm::queue() {
            Ok(q) => format!("{} ({} job(s) of yours listed)", String::from_utf8_lossy(&o.stdout).trim(), q.len()),
            Err(e) => format!("{}, but {}", String::from_utf8_lossy(&o.stdout).trim(), e.lines().next().unwrap_or("")),
        },
    };
    outln!("Slurm:        {slurm}");
    let mut path: Vec<String> = worker.parent().map(|d| vec![d.display().to_string()]).unwrap_or_default();
    if let Some(p) = std::env::var_os("XLAB_PLUGIN_PATH") {
        path.extend(std::env::split_paths(&p).map(|d| d.display().to_string()));
    }
    outln!("plugin path:  {}", path.join(":"));
    Ok(0)
}
