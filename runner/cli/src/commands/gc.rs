//! `xlab gc`: removes checkpoints no job needs.

use crate::common::*;
use crate::{gc, Cli};

#[derive(clap::Args)]
pub struct GcArgs {
    /// Only this experiment's jobs.
    #[arg(long, short = 'e')]
    pub experiment: Option<String>,
    /// Keep each done job's newest checkpoint too.
    #[arg(long)]
    pub keep_last: bool,
    /// List what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(cli: &Cli, args: &GcArgs) -> Result<u8, Failure> {
    let GcArgs { experiment, keep_last, dry_run } = args;
    let store = existing_store(&cli.store)?;
    if let (Opened::Live(remote), false) = (&store, *dry_run) {
        let (pid, command) = remote.owner();
        return Err(Failure {
            code: exit::ENVIRONMENT,
            error: anyhow::anyhow!(
                "store {} is in use by pid {pid} ({command}): its jobs are writing checkpoints now, so `xlab gc` \
                 removes nothing until that run ends\n  hint: `xlab gc --dry-run` lists what it would remove",
                cli.store.display()
            ),
        });
    }
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
