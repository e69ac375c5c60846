//! `xlab status`: what a run is doing (from its status file while it holds the store), or what
//! the store holds of an experiment.

use crate::common::*;
use crate::{status, Cli};
use xlab_store::{JobStatus, ResultStore, Store, StoreError};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The experiment (default: the most recently run one).
    #[arg(long, short = 'e')]
    pub experiment: Option<String>,
}

pub fn run(cli: &Cli, args: &StatusArgs) -> Result<u8, Failure> {
    let experiment = args.experiment.as_deref();
    if !cli.store.join("db").is_dir() {
        existing_store(&cli.store)?;
    }
    let snap: Option<status::Snapshot> =
        std::fs::read(status::path(&cli.store)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    // A coordinator submitted with `xlab run --detach` that Slurm has not finished.
    if let Some(c) = xlab_sched::slurm::Coordinator::read(&cli.store) {
        let queue = xlab_sched::slurm::queue();
        if queue.as_ref().is_ok_and(|q| q.get(&c.slurm_job).is_some_and(|e| !e.ended())) {
            outln!(
                "detached coordinator of `{}`: Slurm job {}, {} (`xlab attach` follows its log)",
                c.experiment,
                c.slurm_job,
                status::slurm_state(&queue, &c.slurm_job)
            );
        }
    }
    match Store::open(&cli.store) {
        Err(StoreError::InUse { pid, .. }) => {
            // Every run in progress on the store: the owner's and those that joined it.
            let runs: Vec<status::Snapshot> = status::in_progress(&cli.store)
                .into_iter()
                .filter(|s| experiment.is_none_or(|e| e == s.experiment))
                .collect();
            if runs.is_empty() {
                outln!("the store is in use by pid {pid}, which has not reported a run's status");
            }
            if runs.len() > 1 {
                outln!("{} runs in progress on this store, sharing its device pool", runs.len());
            }
            for s in runs {
                outln!("running (updated {} ago)", status::ago(xlab_store::now_unix().saturating_sub(s.updated_unix)));
                out!("{}", status::render(&s));
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
