//! `xlab run --detach` and `xlab attach`: the coordinator of a Slurm run as a Slurm job itself,
//! so that nothing has to stay up on a login node (which may kill long-running processes). It
//! owns the store from its node and serves reads to other machines (see `xlab_store::live`):
//! `xlab status`, `xlab query` and every other read work from the login node meanwhile, and
//! `xlab attach` follows its log.

use crate::commands::run::{slurm_settings, RunArgs};
use crate::common::*;
use crate::Cli;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xlab_sched::slurm::Coordinator;
use xlab_store::{JobStatus, ResultStore, Store};

/// Submits the command line this process was started with, less `--detach`, as the coordinator.
pub fn submit(cli: &Cli, plan: &xlab_plan::Plan, how: &RunArgs) -> Result<u8, Failure> {
    let environment = |e: String| Failure { code: exit::ENVIRONMENT, error: anyhow::anyhow!(e) };
    let Some(settings) = slurm_settings(how, plan) else {
        return Err(user_error(
            "--detach submits the coordinator itself to Slurm, so it needs the Slurm executor\n  hint: add \
             `--executor slurm`, or set `executor: {slurm: {...}}` in the file"
                .into(),
        ));
    };
    if let Some(c) = Coordinator::read(&cli.store) {
        if let Ok(Some(e)) = c.state() {
            if !e.ended() {
                return Err(environment(format!(
                    "the coordinator of `{}` already runs on this store as Slurm job {} ({})\n  hint: `xlab attach` \
                     follows it; `scancel {}` stops it (its jobs go on in Slurm, and the next run re-attaches to them)",
                    c.experiment, c.slurm_job, e.state, c.slurm_job
                )));
            }
        }
    }
    // A run here that owns the store would refuse the coordinator: say so now, not in its log.
    drop(Store::open(&cli.store)?);
    let mut argv: Vec<String> = std::env::args().filter(|a| a != "--detach").collect();
    argv[0] = std::env::current_exe()
        .map_err(|e| environment(format!("cannot find this program's own path: {e}")))?
        .display()
        .to_string();
    if how.executor.is_none() {
        // The file says Slurm; the coordinator's command says it too, for whoever reads it.
        argv.extend(["--executor".to_string(), "slurm".to_string()]);
    }
    let started = Instant::now();
    let c = Coordinator::submit(&settings, &cli.store, &plan.name, &argv).map_err(environment)?;
    outln!(
        "submitted the coordinator of `{}` as Slurm job {} in {:.1} s; it runs the experiment from there and owns the store",
        plan.name,
        c.slurm_job,
        started.elapsed().as_secs_f64()
    );
    outln!("  follow it:   xlab attach {}    (its log: {})", plan.name, c.output.display());
    outln!("  meanwhile:   xlab status, xlab query -e {} and every read command work from here", plan.name);
    outln!(
        "  stop it:     scancel {}    (its jobs go on in Slurm; run the same command again to re-attach)",
        c.slurm_job
    );
    Ok(0)
}

#[derive(clap::Args)]
pub struct AttachArgs {
    /// The experiment (default: the one the store's detached coordinator runs).
    pub experiment: Option<String>,
    /// Print what the coordinator has logged so far and its state, and return.
    #[arg(long)]
    pub no_follow: bool,
}

/// Follows the store's detached coordinator: its log as it grows, until it ends; then how the
/// experiment stands. Exit 0 when every job is done, 1 when some are not.
pub fn attach(cli: &Cli, args: &AttachArgs) -> Result<u8, Failure> {
    let c = Coordinator::read(&cli.store).ok_or_else(|| {
        user_error(format!(
            "no detached coordinator on the store {}\n  hint: `xlab run FILE --executor slurm --detach` starts one",
            cli.store.display()
        ))
    })?;
    if let Some(e) = args.experiment.as_ref().filter(|e| **e != c.experiment) {
        return Err(user_error(format!(
            "the store's detached coordinator runs `{}`, not `{e}`\n  hint: `xlab attach {}`",
            c.experiment, c.experiment
        )));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop));
    eprintln!(
        "following the coordinator of `{}`, Slurm job {} (Ctrl-C stops following; the coordinator runs on)",
        c.experiment, c.slurm_job
    );
    let mut offset = 0u64;
    let mut said_pending = false;
    let mut last_look: Option<Instant> = None;
    let mut failing_since: Option<Instant> = None;
    loop {
        offset = print_from(&c.output, offset);
        if stop.load(Ordering::SeqCst) {
            eprintln!("stopped following; the coordinator runs on (`xlab attach` follows it again)");
            return Ok(exit::STOPPED);
        }
        if last_look.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_look = Some(Instant::now());
            match c.state() {
                Ok(Some(e)) if e.state == "PENDING" => {
                    if !said_pending {
                        eprintln!("the coordinator waits in Slurm's queue ({})", e.reason);
                        said_pending = true;
                    }
                }
                Ok(Some(e)) if !e.ended() => {}
                Ok(ended) => {
                    // Its last lines may reach this filesystem a moment after Slurm says it ended.
                    std::thread::sleep(Duration::from_millis(500));
                    print_from(&c.output, offset);
                    let how = ended.map_or("Slurm no longer lists it".to_string(), |e| e.state);
                    eprintln!("the coordinator (Slurm job {}) ended: {how}", c.slurm_job);
                    return standing(cli, &c.experiment);
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(30) {
                        eprintln!("squeue has not answered for {} s: {e}", since.elapsed().as_secs());
                        failing_since = Some(Instant::now());
                    }
                }
            }
        }
        if args.no_follow {
            let state = c.state().ok().flatten().map_or("no longer listed by Slurm".into(), |e| e.state);
            eprintln!("the coordinator (Slurm job {}) is {state}", c.slurm_job);
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Prints what `path` holds past `offset`; the new offset.
fn print_from(path: &std::path::Path, offset: u64) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else { return offset };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(offset)).is_err() || f.read_to_end(&mut buf).is_err() {
        return offset;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&buf).and_then(|()| out.flush());
    offset + buf.len() as u64
}

/// How the experiment stands in the store once its coordinator ended: 0 when every job is done.
fn standing(cli: &Cli, experiment: &str) -> Result<u8, Failure> {
    let store = read_store(&cli.store)?;
    let Some(exp) = store.experiment(experiment)? else {
        eprintln!(
            "the store holds no experiment `{experiment}`: the coordinator ended before it began (its log says why)"
        );
        return Ok(exit::JOBS_FAILED);
    };
    let ids: Vec<&str> = exp.stages.iter().flat_map(|s| s.jobs.iter().map(String::as_str)).collect();
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let records = store.jobs_by_id(&ids)?;
    for r in &records {
        *counts.entry(r.as_ref().map_or("not started", |r| r.status.as_str())).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    eprintln!("`{experiment}`: {}", parts.join(", "));
    let all_done = records.iter().all(|r| r.as_ref().is_some_and(|r| r.status == JobStatus::Done));
    Ok(if all_done { 0 } else { exit::JOBS_FAILED })
}
