//! `xlab query`: an experiment's results as a table (terminal, CSV, JSON, Markdown, LaTeX),
//! one row per sweep point with mean ± std over seeds, or grouped and aggregated on request.

use crate::common::*;
use crate::{aggregate, filter, table, vocab, Cli};
use clap::ValueEnum;
use xlab_store::ResultStore;

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
    /// A GitHub-flavoured Markdown table.
    Markdown,
    /// A booktabs table for a paper (`\usepackage{booktabs}`).
    Latex,
    /// A Parquet file (-o FILE, or standard output when it is not a terminal): typed columns
    /// for pandas and polars.
    Parquet,
    /// An Arrow IPC file (`pyarrow.ipc.open_file`, `polars.read_ipc`).
    Arrow,
}

#[derive(clap::Args)]
pub struct QueryArgs {
    /// Only jobs this matches, e.g. `stage == "train" and optimizer.lr < 0.1 and
    /// last(val.acc) > 0.9` (names: stage, status, seed, id, config keys; last/max/min/at of
    /// a metric; ==, !=, <, <=, >, >=, in [...], ~ "regex", and, or, not).
    pub filter: Option<String>,
    /// The experiment (default: the only or most recently run one).
    #[arg(long, short = 'e')]
    pub experiment: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Metrics to show, comma-separated (default: the test and sample metrics).
    #[arg(long, short = 'm', value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Group jobs by these config keys or job fields (stage, seed, status), comma-separated,
    /// instead of by stage and sweep point.
    #[arg(long, value_delimiter = ',')]
    pub group_by: Vec<String>,
    /// Aggregates per group: mean, std, sem, median, min, max, ci95, iqm, bootstrap_ci of a
    /// metric, count(), and pareto(a, b) marking the groups on the front of two metrics (`-a`:
    /// lower is better); e.g. `mean(test.acc),ci95(test.acc),count()`.
    #[arg(long)]
    pub agg: Option<String>,
    /// Compare every group with a baseline, the jobs this filter matches, over the seeds they
    /// share: the mean paired difference, its 95% bootstrap interval, a paired test's p-value
    /// and the number of pairs, per metric (-m, else the test and sample metrics); e.g.
    /// `--compare-to 'step_rule.use == null and objective.use == null'`.
    #[arg(long, value_name = "FILTER")]
    pub compare_to: Option<String>,
    /// The paired test of --compare-to.
    #[arg(long, value_enum, default_value_t = aggregate::PairedTest::T, requires = "compare_to")]
    pub test: aggregate::PairedTest,
    /// Sort rows by a column, e.g. `-mean(test.acc)` (descending) or `optimizer.lr`.
    #[arg(long, allow_hyphen_values = true)]
    pub sort: Option<String>,
    /// At most this many rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write the table to this file instead of standard output.
    #[arg(long, short = 'o')]
    pub output: Option<std::path::PathBuf>,
    /// Also the jobs of earlier versions of the experiment's file (before an edit, or another
    /// file with the same `name:`), which the current version does not have.
    #[arg(long)]
    pub all_versions: bool,
}

pub fn run(cli: &Cli, args: &QueryArgs) -> Result<u8, Failure> {
    let QueryArgs {
        filter,
        experiment,
        format,
        metrics,
        group_by,
        agg,
        compare_to,
        test,
        sort,
        limit,
        output,
        all_versions,
    } = args;
    let out = Out { path: output.as_deref(), format: *format };
    let filter = parse_filter(filter.as_deref())?;
    let baseline = parse_filter(compare_to.as_deref()).map_err(|f| user_error(format!("--compare-to: {}", f.error)))?;
    let store = existing_store(&cli.store)?;
    let exp = versions_of(pick_experiment(&store, experiment.as_deref())?, *all_versions);
    note_unfinished_run(&cli.store, &store, &exp.name);
    let (vocab, filter) = bind_filter(&store, &exp, filter)?;
    let baseline = match baseline {
        Some(b) => bind_filter(&store, &exp, Some(b)).map_err(|f| user_error(format!("--compare-to: {}", f.error)))?.1,
        None => None,
    };
    check_metrics(&vocab, &exp, metrics, "-m")?;
    if !group_by.is_empty() || agg.is_some() || sort.is_some() || limit.is_some() || baseline.is_some() {
        let compare = baseline.as_ref().map(|b| (b, *test));
        let grouping = Grouping { keys: group_by, aggs: agg.as_deref(), compare, sort: sort.as_deref(), limit: *limit };
        grouped_query(&store, &exp, &vocab, out, metrics, filter.as_ref(), &grouping)?;
        return Ok(0);
    }
    query_to(&store, &exp, out, metrics, filter.as_ref())?;
    Ok(0)
}

/// Where a query's table goes, and as what.
#[derive(Clone, Copy)]
pub(crate) struct Out<'a> {
    pub path: Option<&'a std::path::Path>,
    pub format: Format,
}

impl Out<'_> {
    /// Writes text, to the file or standard output.
    fn text(&self, text: &str) -> Result<(), Failure> {
        match self.path {
            Some(p) => std::fs::write(p, text).map_err(|e| user_error(format!("cannot write {}: {e}", p.display()))),
            None => {
                out!("{text}");
                Ok(())
            }
        }
    }

    /// Writes a table as Parquet or Arrow, to the file or (not a terminal) standard output.
    fn columns(&self, batch: arrow_array::RecordBatch) -> Result<(), Failure> {
        use crate::interop::columns;
        let mut bytes = Vec::new();
        match self.format {
            Format::Parquet => columns::write_parquet(&mut bytes, &[batch])?,
            _ => columns::write_arrow(&mut bytes, &[batch])?,
        }
        match self.path {
            Some(p) => std::fs::write(p, bytes).map_err(|e| user_error(format!("cannot write {}: {e}", p.display()))),
            None if std::io::IsTerminal::is_terminal(&std::io::stdout()) => Err(user_error(
                "a Parquet or Arrow table is binary and standard output is a terminal\n  hint: write it to a file with -o \
                 FILE, or pipe it"
                    .into(),
            )),
            None => {
                use std::io::Write;
                std::io::stdout().write_all(&bytes).map_err(|e| user_error(format!("cannot write the table: {e}")))
            }
        }
    }
}

pub(crate) struct Grouping<'a> {
    pub keys: &'a [String],
    pub aggs: Option<&'a str>,
    pub compare: Option<(&'a filter::Filter, aggregate::PairedTest)>,
    pub sort: Option<&'a str>,
    pub limit: Option<usize>,
}

fn grouped_query(
    store: &dyn ResultStore,
    exp: &xlab_store::ExperimentRecord,
    vocab: &vocab::Vocab,
    out: Out<'_>,
    wanted: &[String],
    filter: Option<&filter::Filter>,
    g: &Grouping<'_>,
) -> Result<(), Failure> {
    let grouped = grouped(store, exp, vocab, wanted, filter, g)?;
    if grouped.rows.is_empty() && filter.is_some() {
        say_matched_none(exp);
    }
    let keys = &grouped.keys;
    let (header, cells) = (grouped.header(), grouped.cells());
    match out.format {
        Format::Table if out.path.is_none() => {
            outln!("experiment `{}`", exp.name);
            outln!("{}", table::terminal(&header, &cells, keys.len()));
        }
        Format::Table => out.text(&table::terminal(&header, &cells, keys.len()))?,
        Format::Csv => out.text(&table::csv(&grouped.exact_header(), &grouped.exact_cells()))?,
        Format::Json => out.text(&(serde_json::to_string_pretty(&grouped.json()).expect("json") + "\n"))?,
        Format::Markdown => out.text(&table::markdown(&header, &cells))?,
        Format::Latex => out.text(&table::latex(&header, &cells))?,
        Format::Parquet | Format::Arrow => out.columns(crate::interop::grouped_batch(&grouped)?)?,
    }
    Ok(())
}

/// The grouped table `--group-by`, `--agg`, `--compare-to`, `--sort` and `--limit` ask for (also
/// the dashboard's): default keys are the stage and the sweep keys, default aggregates the mean
/// and std of the test and sample metrics and the count.
pub(crate) fn grouped(
    store: &dyn ResultStore,
    exp: &xlab_store::ExperimentRecord,
    vocab: &vocab::Vocab,
    wanted: &[String],
    filter: Option<&filter::Filter>,
    g: &Grouping<'_>,
) -> Result<aggregate::Grouped, Failure> {
    let user = |m: String| Failure { code: exit::USER, error: anyhow::anyhow!(m) };
    let keys: Vec<String> = if g.keys.is_empty() { default_group_keys(exp) } else { g.keys.to_vec() };
    check_group_keys(vocab, exp, &keys, "--group-by")?;
    let metrics = || -> Result<Vec<String>, Failure> {
        Ok(if wanted.is_empty() { table::default_metrics(&table::rows(store, exp, filter)?) } else { wanted.to_vec() })
    };
    let aggs = match g.aggs {
        Some(text) => {
            let aggs = aggregate::parse_aggs(text).map_err(|m| user(format!("bad --agg: {m}")))?;
            let named: Vec<String> = aggs.iter().flat_map(|a| a.metrics().map(String::from)).collect();
            check_metrics(vocab, exp, &named, "--agg")?;
            aggs
        }
        None => {
            // Beside a comparison, the means alone (its columns say the rest).
            let funcs: &[&'static str] = if g.compare.is_some() { &["mean"] } else { &["mean", "std"] };
            let mut a: Vec<aggregate::Agg> =
                metrics()?.iter().flat_map(|m| funcs.iter().map(|f| aggregate::Agg::new(f, m))).collect();
            a.push(aggregate::Agg::new("count", ""));
            a
        }
    };
    let compare = match g.compare {
        Some((baseline, test)) => Some(aggregate::Compare { baseline, metrics: metrics()?, test }),
        None => None,
    };
    let mut grouped =
        aggregate::group(store, exp, filter, &keys, &aggs, compare.as_ref()).map_err(|e| user(format!("{e}")))?;
    if let Some(by) = g.sort {
        grouped.sort(by).map_err(|m| user(format!("bad --sort: {m}")))?;
    }
    if let Some(n) = g.limit {
        grouped.rows.truncate(n);
    }
    Ok(grouped)
}

pub(crate) fn query(
    store: &dyn ResultStore,
    exp: &xlab_store::ExperimentRecord,
    format: Format,
    wanted: &[String],
    filter: Option<&filter::Filter>,
) -> Result<(), Failure> {
    query_to(store, exp, Out { path: None, format }, wanted, filter)
}

fn query_to(
    store: &dyn ResultStore,
    exp: &xlab_store::ExperimentRecord,
    out: Out<'_>,
    wanted: &[String],
    filter: Option<&filter::Filter>,
) -> Result<(), Failure> {
    let rows = table::rows(store, exp, filter)?;
    if rows.is_empty() && filter.is_some() {
        say_matched_none(exp);
    }
    let metrics = if wanted.is_empty() { table::default_metrics(&rows) } else { wanted.to_vec() };
    match out.format {
        Format::Table if out.path.is_none() => {
            outln!("experiment `{}`", exp.name);
            outln!("{}", table::render(&rows, &metrics));
        }
        Format::Table => out.text(&(table::render(&rows, &metrics) + "\n"))?,
        Format::Csv => out.text(&table::render_csv(&rows, &metrics))?,
        Format::Markdown => out.text(&table::render_markdown(&rows, &metrics))?,
        Format::Latex => out.text(&table::render_latex(&rows, &metrics))?,
        Format::Json => {
            let v: Vec<serde_json::Value> = rows.iter().map(table::row_json).collect();
            out.text(&(serde_json::to_string_pretty(&v).expect("json") + "\n"))?;
        }
        Format::Parquet | Format::Arrow => out.columns(crate::interop::rows_batch(&rows, &metrics)?)?,
    }
    Ok(())
}
