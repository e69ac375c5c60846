//! `xlab search-log EXP`: the decisions of an experiment's adaptive searches (`search:`), in
//! the order they were made, with the numbers each rests on; and how a run reports a search.

use crate::common::*;
use crate::Cli;
use xlab_store::{Decision, DecisionKind};

#[derive(clap::Args)]
pub struct SearchLogArgs {
    /// The experiment (default: the most recently run one).
    pub experiment: Option<String>,
    /// Only this stage's search.
    #[arg(long)]
    pub stage: Option<String>,
    /// One JSON object per line, as stored.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: &Cli, args: &SearchLogArgs) -> Result<u8, Failure> {
    let store = existing_store(&cli.store)?;
    let exp = pick_experiment(&store, args.experiment.as_deref())?;
    let mut any = false;
    for stage in &exp.stages {
        if args.stage.as_ref().is_some_and(|s| *s != stage.name) {
            continue;
        }
        let decisions = store.decisions(&exp.name, &stage.name)?;
        if decisions.is_empty() {
            continue;
        }
        any = true;
        if !args.json {
            outln!("experiment `{}`, stage `{}`: {} decision(s)", exp.name, stage.name, decisions.len());
        }
        for d in &decisions {
            if args.json {
                outln!("{}", serde_json::to_string(d).expect("decisions serialize"));
            } else {
                let label = store.job(&d.trial)?.map(|r| label_of(&r)).unwrap_or_default();
                outln!("  {:>4}  {}", d.seq, describe(d, &label));
            }
        }
    }
    if !any {
        let which = args.stage.as_ref().map(|s| format!("stage `{s}` of ")).unwrap_or_default();
        eprintln!("{which}experiment `{}` has no search decisions (a stage searches with `search:`)", exp.name);
    }
    Ok(0)
}

/// `lr=0.1 seed=0`: a job's sweep point and seed.
pub(crate) fn label_of(r: &xlab_store::JobRecord) -> String {
    let mut parts: Vec<String> = r.point.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.push(format!("seed={}", r.seed));
    parts.join(" ")
}

fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// One decision, readably.
pub(crate) fn describe(d: &Decision, label: &str) -> String {
    let standing = match (d.value, d.rank, d.of, d.keep) {
        (Some(v), Some(r), Some(of), Some(keep)) => {
            format!(" ({v:.4}, {} of {of} there; the best {keep} go on)", ordinal(r))
        }
        (Some(v), ..) => format!(" ({v:.4})"),
        _ => String::new(),
    };
    let bracket = d.bracket.map(|b| format!(" [bracket {b}]")).unwrap_or_default();
    let line = match d.kind {
        DecisionKind::Suggest => {
            let how = match (d.method.as_deref(), d.based_on) {
                (Some("random"), _) => "at random (one of its first `startup` trials)".to_string(),
                (_, Some(n)) => format!("by TPE from the results of {n} trial(s)"),
                _ => String::new(),
            };
            format!("suggest {label} (job {}) {how}", d.trial)
        }
        DecisionKind::Start => format!("start   {label} (job {}), towards epoch {}", d.trial, d.epoch),
        DecisionKind::Promote => {
            format!("promote {label} (job {}) from epoch {}{standing}", d.trial, d.epoch)
        }
        DecisionKind::Prune => format!("prune   {label} (job {}) at epoch {}{standing}", d.trial, d.epoch),
    };
    line + &bracket
}

/// What a run says of each search when it ends: the epochs it trained against the exhaustive
/// sweep's, and whether the early rungs predicted the final metric (early stopping may otherwise
/// be killing late bloomers).
pub(crate) fn report(summaries: &[xlab_sched::search::SearchSummary]) {
    for s in summaries {
        let stage = match s.bracket {
            Some(b) => format!("{}` bracket `{b}", s.stage),
            None => s.stage.clone(),
        };
        let s = &xlab_sched::search::SearchSummary { stage, ..s.clone() };
        if let Some(why) = &s.broken {
            tracing::error!("search `{}` stopped early: {why}", s.stage);
        }
        let share = if s.epochs_full > 0 { 100.0 * s.epochs_used as f64 / s.epochs_full as f64 } else { 0.0 };
        tracing::info!(
            "search `{}`: {} of {} trials trained to the end, {} pruned; {} epochs trained of the {} an exhaustive \
             sweep would ({share:.0}%)",
            s.stage,
            s.finished,
            s.trials,
            s.pruned,
            s.epochs_used,
            s.epochs_full
        );
        for (epoch, n, rho) in &s.rung_vs_final {
            match rho {
                Some(r) if *r < 0.6 => tracing::warn!(
                    "search `{}`: {} at epoch {epoch} ranks the {n} trials that reached the end with Spearman ρ = \
                     {r:.2} against their final {}: early stopping may be killing late bloomers\n  hint: a larger \
                     `min_epochs` lets trials train longer before the first rung",
                    s.stage,
                    s.metric,
                    s.metric
                ),
                Some(r) => tracing::info!(
                    "search `{}`: {} at epoch {epoch} against the final value, over the {n} trials that reached the \
                     end: Spearman ρ = {r:.2}",
                    s.stage,
                    s.metric
                ),
                None => tracing::info!(
                    "search `{}`: {} trial(s) reached both epoch {epoch} and the end, too few to say how well that \
                     rung predicts the final {}",
                    s.stage,
                    n,
                    s.metric
                ),
            }
        }
    }
}
