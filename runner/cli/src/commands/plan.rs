//! `xlab plan FILE`: the jobs of an experiment file and what the store already holds of them.

use crate::commands::run::adopt_earlier_ids;
use crate::common::*;
use crate::{plugins, Cli};
use std::path::PathBuf;
use xlab_store::{JobStatus, ResultStore};

#[derive(clap::Args)]
pub struct PlanArgs {
    pub file: PathBuf,
}

pub fn run(cli: &Cli, args: &PlanArgs) -> Result<u8, Failure> {
    let file = &args.file;
    let mut plan = xlab_plan::load(file, &mut plugins::WorkerPlugins::new(worker_path()))?;
    let store = if cli.store.join("db").exists() { Some(read_store(&cli.store)?) } else { None };
    if let Some(s) = &store {
        adopt_earlier_ids(s, &mut plan);
        // A TPE search's jobs are the trials it proposed so far.
        plan = xlab_sched::with_proposed_trials(s, &plan)?;
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
                Some(JobStatus::Paused) => "paused",
                Some(JobStatus::Pruned) => "pruned",
            };
            *counts.entry(key).or_default() += 1;
            each.push(key);
        }
        let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let mut sweep =
            if stage.sweep_keys.is_empty() { String::new() } else { format!(" over {}", stage.sweep_keys.join(", ")) };
        if let Some((parent, select)) = &stage.needs {
            let how = match (select, stage.jobs.first().and_then(|j| j.pick.as_ref())) {
                (xlab_plan::file::Select::Each, _) => "one per job".to_string(),
                (xlab_plan::file::Select::All, _) => "all jobs".to_string(),
                (xlab_plan::file::Select::Best, Some(p)) => {
                    format!("best by {} {}", p.metric, if p.mode == xlab_plan::file::Mode::Max { "max" } else { "min" })
                }
                (xlab_plan::file::Select::Best, None) => "best".to_string(),
            };
            sweep = format!(" needing `{parent}` ({how}){sweep}");
        }
        match stage.search.as_ref().and_then(|s| s.tpe.as_ref()) {
            Some(t) => outln!(
                "  stage `{}`: a TPE search over {}: {} of {} trial(s) proposed so far{}{}",
                stage.name,
                stage.sweep_keys.join(", "),
                stage.jobs.len(),
                t.trials,
                if parts.is_empty() { "" } else { ": " },
                parts.join(", ")
            ),
            None => outln!("  stage `{}`: {} job(s){sweep}: {}", stage.name, stage.jobs.len(), parts.join(", ")),
        }
        for (job, status) in stage.jobs.iter().zip(each) {
            outln!("    {}  {status:<11}  {}", job.id, job.label());
        }
        if let Some(s) = &stage.search {
            // The budget of the search, rather than the jobs alone.
            let trials = s.trials(stage.jobs.len());
            let (full, halving) = s.budget(trials);
            let rungs: Vec<String> = s.rungs.iter().map(u64::to_string).collect();
            let mode = if s.mode == xlab_plan::file::Mode::Max { "max" } else { "min" };
            if let Some(t) = &s.tpe {
                let stopping = if s.rungs.len() > 1 {
                    format!(
                        "stopped early by ASHA at epochs {} (η = {}): at most {full} epochs, successive halving trains \
                         about {halving}",
                        rungs.join(", "),
                        s.reduction
                    )
                } else {
                    format!("each trains to the end: {full} epochs")
                };
                outln!(
                    "  search of `{}`: TPE proposes {} trial(s) by {} ({mode}), the first {} at random (seed {}); \
                     {stopping}",
                    stage.name,
                    t.trials,
                    s.metric,
                    t.startup.min(t.trials),
                    t.seed
                );
                continue;
            }
            if s.algorithm == xlab_plan::file::Algorithm::Hyperband {
                let brackets: Vec<String> = s
                    .brackets(trials)
                    .iter()
                    .map(|(skipped, members)| format!("{} from epoch {}", members.len(), s.rungs[*skipped]))
                    .collect();
                outln!(
                    "  search of `{}`: Hyperband over {trials} trial(s) by {} ({mode}) in {} brackets ({}), rungs at \
                     epochs {} (η = {}): at most {full} epochs if every trial trained to the end; its brackets \
                     train about {halving}",
                    stage.name,
                    s.metric,
                    s.rungs.len(),
                    brackets.join(", "),
                    rungs.join(", "),
                    s.reduction
                );
                continue;
            }
            outln!(
                "  search of `{}`: ASHA over {} trial(s) by {} ({}), rungs at epochs {} (η = {}): at most {full} epochs if \
                 every trial trained to the end; successive halving trains about {halving}",
                stage.name,
                trials,
                s.metric,
                mode,
                rungs.join(", "),
                s.reduction
            );
        }
    }
    Ok(0)
}
