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
    /// Aggregates per group: mean, std, sem, median, min, max, ci95 of a metric, and
    /// count(); e.g. `mean(test.acc),ci95(test.acc),count()`.
    #[arg(long)]
    pub agg: Option<String>,
    /// Sort rows by a column, e.g. `-mean(test.acc)` (descending) or `optimizer.lr`.
    #[arg(long, allow_hyphen_values = true)]
    pub sort: Option<String>,
    /// At most this many rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also the jobs of earlier versions of the experiment's file (before an edit, or another
    /// file with the same `name:`), which the current version does not have.
    #[arg(long)]
    pub all_versions: bool,
}

pub fn run(cli: &Cli, args: &QueryArgs) -> Result<u8, Failure> {
    let QueryArgs { filter, experiment, format, metrics, group_by, agg, sort, limit, all_versions } = args;
    let filter = parse_filter(filter.as_deref())?;
    let store = existing_store(&cli.store)?;
    let exp = versions_of(pick_experiment(&store, experiment.as_deref())?, *all_versions);
    note_unfinished_run(&cli.store, &store, &exp.name);
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

struct Grouping<'a> {
    keys: &'a [String],
    aggs: Option<&'a str>,
    sort: Option<&'a str>,
    limit: Option<usize>,
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

pub(crate) fn query(
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
            let v: Vec<serde_json::Value> = rows.iter().map(table::row_json).collect();
            outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
    }
    Ok(())
}
