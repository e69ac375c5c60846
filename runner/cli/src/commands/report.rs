//! `xlab report [EXP] [-o FILE]`: an experiment as one self-contained page (see `crate::report`).

use crate::aggregate::PairedTest;
use crate::common::*;
use crate::{report, Cli};
use clap::ValueEnum;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum ReportFormat {
    /// One HTML page with its figures inside; it fetches nothing.
    Html,
    /// GitHub-flavoured Markdown, its figures in a folder beside it (`NAME_files/`).
    Markdown,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The experiment (default: the only or most recently run one).
    pub experiment: Option<String>,
    /// Where to write it (default: `EXP-report.html`, or `.md`).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Default: from the output's extension (`.md`: markdown), else html.
    #[arg(long, value_enum)]
    pub format: Option<ReportFormat>,
    /// Metrics of the tables, comma-separated (default: the test and sample metrics).
    #[arg(long, short = 'm', value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Add paired comparisons against the jobs this filter matches (as `xlab query
    /// --compare-to`).
    #[arg(long, value_name = "FILTER")]
    pub compare_to: Option<String>,
    /// The paired test of --compare-to.
    #[arg(long, value_enum, default_value_t = PairedTest::T, requires = "compare_to")]
    pub test: PairedTest,
}

pub fn run(cli: &Cli, args: &ReportArgs) -> Result<u8, Failure> {
    let ReportArgs { experiment, output, format, metrics, compare_to, test } = args;
    let store = existing_store(&cli.store)?;
    let exp = pick_experiment(&store, experiment.as_deref())?;
    note_unfinished_run(&cli.store, &store, &exp.name);
    let baseline = parse_filter(compare_to.as_deref()).map_err(|f| user_error(format!("--compare-to: {}", f.error)))?;
    let (vocab, baseline) =
        bind_filter(&store, &exp, baseline).map_err(|f| user_error(format!("--compare-to: {}", f.error)))?;
    check_metrics(&vocab, &exp, metrics, "-m")?;
    let format = match (format, output.as_ref().and_then(|p| p.extension()).and_then(|e| e.to_str())) {
        (Some(f), _) => *f,
        (None, Some("md" | "markdown")) => ReportFormat::Markdown,
        _ => ReportFormat::Html,
    };
    let path = output.clone().unwrap_or_else(|| {
        PathBuf::from(format!("{}-report.{}", exp.name, if format == ReportFormat::Html { "html" } else { "md" }))
    });
    let generated = format!(
        "Written by xlab {} ({}) on {} from store {}.",
        crate::VERSION,
        env!("XLAB_GIT_COMMIT"),
        utc_now(),
        std::fs::canonicalize(&cli.store).unwrap_or_else(|_| cli.store.clone()).display()
    );
    let req = report::Request {
        metrics: metrics.clone(),
        compare: baseline.as_ref().zip(compare_to.as_deref()).map(|(b, t)| (b, t, *test)),
        generated,
    };
    let blocks = report::build(&store, &exp, &req).map_err(|e| user_error(format!("{e:#}")))?;
    let title = format!("Experiment `{}`", exp.name);
    let write = |p: &Path, bytes: &[u8]| {
        std::fs::write(p, bytes).map_err(|e| Failure {
            code: exit::ENVIRONMENT,
            error: anyhow::anyhow!("cannot write {}: {e}", p.display()),
        })
    };
    match format {
        ReportFormat::Html => write(&path, report::html(&title, &blocks).as_bytes())?,
        ReportFormat::Markdown => {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("report");
            let folder = format!("{stem}_files");
            let (text, files) = report::markdown(&title, &blocks, &folder);
            let base = path.parent().unwrap_or(Path::new(""));
            if !files.is_empty() {
                std::fs::create_dir_all(base.join(&folder)).map_err(|e| Failure {
                    code: exit::ENVIRONMENT,
                    error: anyhow::anyhow!("cannot create {}: {e}", base.join(&folder).display()),
                })?;
            }
            for (rel, bytes) in &files {
                write(&base.join(rel), bytes)?;
            }
            write(&path, text.as_bytes())?;
        }
    }
    outln!("wrote {}", path.display());
    Ok(0)
}

/// The time now, `2026-12-04 20:15 UTC`.
fn utc_now() -> String {
    let secs = xlab_store::now_unix();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}
