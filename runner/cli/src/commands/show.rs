//! `xlab show JOB`, `xlab experiments` and `xlab compare A B`: one job, the store's
//! experiments, and two jobs side by side.

use crate::common::*;
use crate::{show, table, Cli};
use xlab_store::ResultStore;

#[derive(clap::Args)]
pub struct ShowArgs {
    pub job: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct CompareArgs {
    pub a: String,
    b: String,
}

pub fn show(cli: &Cli, args: &ShowArgs) -> Result<u8, Failure> {
    let ShowArgs { job, json } = args;
    let store = existing_store(&cli.store)?;
    let rec = find_job(&store, job)?;
    let series = store.metrics_of(&rec.id)?;
    // A search's trial: the decisions about it (`xlab search-log` has the whole search).
    let decisions: Vec<xlab_store::Decision> =
        store.decisions(&rec.experiment, &rec.stage)?.into_iter().filter(|d| d.trial == rec.id).collect();
    if *json {
        let mut v = serde_json::to_value(&rec).expect("json");
        v["metrics"] = serde_json::to_value(xlab_proto::floats::Floats::to_repr(&series)).expect("json");
        if !decisions.is_empty() {
            v["decisions"] = serde_json::to_value(&decisions).expect("json");
        }
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        out!("{}", show::summary(&store, &rec, &series));
        if !decisions.is_empty() {
            outln!("search decisions (`xlab search-log {}` has the whole search):", rec.experiment);
            let label = crate::commands::search::label_of(&rec);
            for d in &decisions {
                outln!("  {:>4}  {}", d.seq, crate::commands::search::describe(d, &label));
            }
        }
    }
    Ok(0)
}

pub fn compare(cli: &Cli, args: &CompareArgs) -> Result<u8, Failure> {
    let CompareArgs { a, b } = args;
    let store = existing_store(&cli.store)?;
    let (ra, rb) = (find_job(&store, a)?, find_job(&store, b)?);
    outln!("a: {} ({} {}, {})", ra.id, ra.experiment, ra.stage, ra.status.as_str());
    outln!("b: {} ({} {}, {})", rb.id, rb.experiment, rb.stage, rb.status.as_str());
    let (config, rows) = differences(&ra, &rb, false);
    if config.is_empty() {
        outln!("same config");
    } else {
        let header = ["config".to_string(), "a".into(), "b".into()];
        outln!("{}", table::terminal(&header, &config, 1));
    }
    let header = ["metric".to_string(), "a".into(), "b".into(), "b − a".into()];
    outln!("{}", table::terminal(&header, &rows, 1));
    Ok(0)
}

/// Two jobs' differences: the config keys (and seed) whose values differ, `[key, a, b]`, and
/// their final metrics, `[metric, a, b, b − a]` (with `only_different`, those that differ).
pub(crate) fn differences(
    ra: &xlab_store::JobRecord,
    rb: &xlab_store::JobRecord,
    only_different: bool,
) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
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
    if ra.seed != rb.seed {
        config.push(vec!["seed".into(), ra.seed.to_string(), rb.seed.to_string()]);
    }
    let names: std::collections::BTreeSet<&String> = ra.summary.keys().chain(rb.summary.keys()).collect();
    let rows: Vec<Vec<String>> = names
        .into_iter()
        .filter(|m| {
            !only_different || ra.summary.get(*m).map(|v| v.to_bits()) != rb.summary.get(*m).map(|v| v.to_bits())
        })
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
    (config, rows)
}

pub fn experiments(cli: &Cli) -> Result<u8, Failure> {
    let store = existing_store(&cli.store)?;
    out!("{}", show::experiments(&store)?);
    Ok(0)
}
