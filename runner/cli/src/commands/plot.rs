//! `xlab plot METRIC`: learning curves, or a final metric against a config key, as SVG or PNG.

use crate::common::*;
use crate::{plot, raster, Cli};
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// The metric, e.g. `val.acc`.
    pub metric: String,
    /// Only jobs this matches (the filter language of `xlab query`).
    #[arg(long)]
    pub filter: Option<String>,
    #[arg(long, short = 'e')]
    pub experiment: Option<String>,
    /// Group jobs by these config keys or job fields (default: stage and the sweep keys).
    #[arg(long, value_delimiter = ',')]
    pub group_by: Vec<String>,
    /// Plot the metric's final value against this config key (e.g. `optimizer.lr`), or against
    /// another metric's final value (e.g. `sample.nfe`), instead of the learning curve; groups
    /// default to the other sweep keys.
    #[arg(long)]
    pub x: Option<String>,
    /// A logarithmic x axis (for learning rates and other log-spaced sweeps).
    #[arg(long)]
    pub log_x: bool,
    /// A logarithmic y axis (losses, FID); the band is then the geometric ± std.
    #[arg(long)]
    pub log_y: bool,
    /// The plot's title (default: the experiment).
    #[arg(long)]
    pub title: Option<String>,
    /// The x axis's label (default: `epoch`, `step` or the --x key).
    #[arg(long)]
    pub xlabel: Option<String>,
    /// The y axis's label (default: the metric).
    #[arg(long)]
    pub ylabel: Option<String>,
    /// Also the jobs of earlier versions of the experiment's file.
    #[arg(long)]
    pub all_versions: bool,
    /// The file to write, `.svg` or `.png` (default: `<experiment>-<metric>.svg`).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

pub fn run(cli: &Cli, args: &PlotArgs) -> Result<u8, Failure> {
    let PlotArgs { metric, filter, experiment, group_by, x, log_x, log_y, title, xlabel, ylabel, all_versions, output } =
        args;
    let filter = parse_filter(filter.as_deref())?;
    let store = existing_store(&cli.store)?;
    let exp = versions_of(pick_experiment(&store, experiment.as_deref())?, *all_versions);
    let (vocab, filter) = bind_filter(&store, &exp, filter)?;
    check_metrics(&vocab, &exp, std::slice::from_ref(metric), "the metric")?;
    check_group_keys(&vocab, &exp, group_by, "--group-by")?;
    if let Some(k) = x {
        if !vocab.is_key(k) && !vocab.is_metric(k) {
            let hint = vocab.suggest(k).map_or_else(
                || "plot against a config key (`optimizer.lr`) or another metric's final value (`sample.nfe`)".into(),
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
        Some("png") => {
            raster::png(&scene).map_err(|e| Failure { code: exit::ENVIRONMENT, error: anyhow::anyhow!(e) })?
        }
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
