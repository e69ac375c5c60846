//! `xlab run`, `xlab resume` and `xlab validate`: an experiment's plan, checked against the
//! store and the device pool, run by the scheduler with live progress, then its results table.

use crate::commands::query::{query, Format};
use crate::common::*;
use crate::{filter, live, plugins, status, vocab, Cli, LogFormat, VERSION};
use clap::ValueEnum;
use std::path::PathBuf;
use std::time::Instant;
use xlab_sched::{Progress, RunOptions};
use xlab_store::ResultStore;

/// Where and how `xlab run` and `xlab resume` run jobs.
#[derive(clap::Args)]
pub struct RunArgs {
    /// CPU jobs at a time (default: one per CPU core, divided by --threads).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Threads per job.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Where jobs run: `auto` (every GPU NVML or `nvidia-smi` finds, else CPU slots), `cpu`, `cuda`
    /// (every GPU) or a list such as `cuda:0,cuda:2` or `cpu,cuda:1`.
    #[arg(long, env = "XLAB_DEVICES", default_value = "auto")]
    pub devices: xlab_sched::Devices,
    /// Jobs sharing one GPU at a time (small jobs pack; each sees only its GPU).
    #[arg(long, default_value_t = 1)]
    pub jobs_per_device: usize,
    /// Stop starting jobs after the first deterministic failure (as `fail_fast: true` on
    /// every stage).
    #[arg(long)]
    pub fail_fast: bool,
    /// At most this many jobs at once in the whole run (overrides the file's `max_parallel:`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel: Option<u32>,
    /// Where jobs run: `local` (this machine) or `slurm` (one batch job per job, with the file's
    /// `executor: {slurm: {...}}` settings if it has them). Default: the file's `executor:`, else
    /// local.
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorKind>,
    /// Run the done jobs this filter matches again, as new attempts (the earlier attempts stay
    /// in each job's record, its earlier files in `runs/JOB/attempt-N/`), e.g. after changing
    /// a plugin: `--rerun 'step_rule.use ~ "^sam"'`. The filter language of `xlab query`.
    #[arg(long, value_name = "FILTER")]
    pub rerun: Option<String>,
    /// With the Slurm executor: submit the coordinator itself as a Slurm job (one CPU, the
    /// file's `coordinator_time`) and return at once. It owns the store from its node; `xlab
    /// status`, `xlab query` and the other read commands work from here, and `xlab attach`
    /// follows its log.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum ExecutorKind {
    Local,
    Slurm,
}

impl RunArgs {
    fn pool(&self) -> xlab_sched::PoolRequest {
        xlab_sched::PoolRequest {
            devices: self.devices.clone(),
            cpu_jobs: self.jobs,
            jobs_per_gpu: self.jobs_per_device,
            threads: self.threads,
        }
    }
}

#[derive(clap::Args)]
pub struct RunCommand {
    pub file: PathBuf,
    #[command(flatten)]
    pub how: RunArgs,
}

#[derive(clap::Args)]
pub struct ResumeCommand {
    /// The experiment's name (`xlab query` and `xlab status` show it).
    pub name: String,
    #[command(flatten)]
    pub how: RunArgs,
}

#[derive(clap::Args)]
pub struct ValidateCommand {
    pub file: PathBuf,
}

pub fn run(cli: &Cli, args: &RunCommand) -> Result<u8, Failure> {
    let RunCommand { file, how } = args;
    let plan = xlab_plan::load(file, &mut plugins::WorkerPlugins::new(worker_path()))?;
    if how.detach {
        return crate::commands::detach::submit(cli, &plan, how);
    }
    run_plan(cli, plan, how)
}

pub fn resume(cli: &Cli, args: &ResumeCommand) -> Result<u8, Failure> {
    let ResumeCommand { name, how } = args;
    let exp = named_experiment(&existing_store(&cli.store)?, name)?;
    // The text as it was run; relative paths (data, includes, plugins) still resolve
    // from where the file was.
    let file = PathBuf::from(&exp.file);
    if std::fs::read_to_string(&file).is_ok_and(|now| now != exp.source) {
        tracing::warn!("{} changed since `{name}` last ran; resuming the experiment as it was then", file.display());
    }
    let plan = xlab_plan::load_str(&file, &exp.source, &mut plugins::WorkerPlugins::new(worker_path()))?;
    if how.detach {
        return crate::commands::detach::submit(cli, &plan, how);
    }
    run_plan(cli, plan, how)
}

pub fn validate(_cli: &Cli, args: &ValidateCommand) -> Result<u8, Failure> {
    let ValidateCommand { file } = args;
    let plan = xlab_plan::load(file, &mut plugins::WorkerPlugins::new(worker_path()))?;
    let n: usize = plan.stages.iter().map(|s| s.jobs.len()).sum();
    let proposed: Vec<String> = plan
        .stages
        .iter()
        .filter_map(|s| {
            s.search.as_ref()?.tpe.as_ref().map(|t| format!("{} trial(s) TPE proposes in `{}`", t.trials, s.name))
        })
        .collect();
    let and = if proposed.is_empty() { String::new() } else { format!(" and the {}", proposed.join(", ")) };
    outln!("{}: ok — experiment `{}`, {} stage(s), {n} job(s){and}", file.display(), plan.name, plan.stages.len());
    Ok(0)
}

/// Counts SIGINT and SIGTERM: the scheduler stops gracefully at the first and kills its
/// workers at the second.
fn count_stop_requests() -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let stops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let s = std::sync::Arc::clone(&stops);
        // SAFETY: the handler only increments an atomic, which is async-signal-safe.
        let registered = unsafe {
            signal_hook::low_level::register(sig, move || {
                s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        };
        if let Err(e) = registered {
            tracing::warn!("cannot catch signal {sig}: {e}; Ctrl-C will end xlab without a graceful stop");
        }
    }
    stops
}

/// The Slurm settings when jobs go to Slurm: `--executor`, else the file's `executor:`.
pub(crate) fn slurm_settings(how: &RunArgs, plan: &xlab_plan::Plan) -> Option<xlab_plan::file::Slurm> {
    use xlab_plan::file::Executor;
    match (how.executor, &plan.executor) {
        (Some(ExecutorKind::Local), _) | (None, None | Some(Executor::Local)) => None,
        (_, Some(Executor::Slurm(s))) => Some((**s).clone()),
        (Some(ExecutorKind::Slurm), _) => Some(Default::default()),
    }
}

/// Looks at the plan's jobs the store already holds as done, before a run skips them: returns
/// those `--rerun` selects, and warns about the others that a different build of one of their
/// plugins produced (same id and version, another file: a plugin edited and rebuilt without a
/// version bump), which would otherwise be reused without a word.
fn review_done_jobs(
    store: &dyn ResultStore,
    plan: &xlab_plan::Plan,
    rerun: Option<&str>,
) -> Result<std::collections::HashSet<String>, Failure> {
    let mut filter = parse_filter(rerun)?;
    let mut done = Vec::new();
    for job in plan.jobs() {
        if let Some(rec) = store.job(job.id.as_str())?.filter(|r| r.status == xlab_store::JobStatus::Done) {
            done.push((job, rec));
        }
    }
    let mut selected = std::collections::HashSet::new();
    if let Some((f, q)) = &mut filter {
        let vocab = vocab::Vocab::of_records(done.iter().map(|(_, r)| r));
        if done.is_empty() {
            tracing::warn!("--rerun: no job of `{}` is done yet, so there is nothing to run again", plan.name);
        } else {
            f.bind(&vocab).map_err(|e| user_error(format!("bad --rerun filter:\n{}", e.render(q))))?;
            for (job, rec) in &done {
                if f.matches(&filter::StoredJob { record: rec, series: None }) {
                    selected.insert(job.id.to_string());
                }
            }
            tracing::info!(
                "--rerun matched {} of the {} done job(s); they run again as new attempts",
                selected.len(),
                done.len()
            );
        }
    }
    // Plugin id -> (version, jobs built by another file of it).
    let mut stale: std::collections::BTreeMap<&str, (&str, usize)> = Default::default();
    for (job, rec) in done.iter().filter(|(j, _)| !selected.contains(j.id.as_str())) {
        for used in &job.plugins {
            let before = rec.provenance.plugins.iter().find(|p| p.id == used.id);
            if before.is_some_and(|b| !b.sha256.is_empty() && b.sha256 != used.sha256) {
                stale.entry(&used.id).or_insert((&used.version, 0)).1 += 1;
            }
        }
    }
    for (plugin, (version, n)) in stale {
        tracing::warn!(
            "{n} done job(s) of `{}` were produced by another build of plugin `{plugin}` {version} (its file's SHA-256 \
             differs) and are kept as done, since the version did not change\n  hint: to run them with this build, \
             `xlab run FILE --rerun FILTER` (e.g. --rerun 'step_rule.use ~ \"^{plugin}\\.\"'); bump the plugin's version \
             when its behaviour changes",
            plan.name
        );
    }
    Ok(selected)
}

/// Finds the jobs a store recorded before files were identified by content (see
/// `Plan::adopt_earlier_ids`).
pub(crate) fn adopt_earlier_ids(store: &dyn ResultStore, plan: &mut xlab_plan::Plan) {
    let n = plan.adopt_earlier_ids(&mut |id| store.job(id).ok().flatten().is_some());
    if n > 0 {
        tracing::debug!("{n} job(s) of `{}` found under the ids they were recorded with", plan.name);
    }
}

/// Says when this run replaces the file an experiment last ran from (an edit, or another file
/// with the same `name:`): the earlier version and its jobs stay, and how to see them.
fn say_if_replacing(store: &dyn ResultStore, plan: &xlab_plan::Plan) -> Result<(), Failure> {
    let Some(before) = store.experiment(&plan.name)? else { return Ok(()) };
    let file = plan.file.display().to_string();
    if before.source == plan.source {
        return Ok(());
    }
    let planned: std::collections::HashSet<&str> = plan.jobs().map(|j| j.id.as_str()).collect();
    let all = before.with_all_versions();
    let earlier_only = all.stages.iter().flat_map(|s| &s.jobs).filter(|j| !planned.contains(j.as_str())).count();
    let what = if before.file == file {
        format!("an edited {file}")
    } else {
        format!("{file} (it last ran from {})", before.file)
    };
    tracing::warn!(
        "experiment `{}` runs from {what}: version {} of it, after version {}. {earlier_only} job(s) of earlier versions \
         are not in this one; they stay in the store, and `xlab query --all-versions` shows \
         them",
        plan.name,
        before.version() + 1,
        before.version()
    );
    Ok(())
}

fn run_plan(cli: &Cli, plan: xlab_plan::Plan, how: &RunArgs) -> Result<u8, Failure> {
    let shown = Shown { live: matches!(cli.log_format, LogFormat::Human) && !cli.quiet, table: true };
    run_plan_in(&cli.store, plan, how, shown)
}

/// What a run shows besides its log: the live progress display, and the results table at the end.
pub(crate) struct Shown {
    pub live: bool,
    pub table: bool,
}

/// Runs a plan in the store in `dir` (owning it, or joining the run that does).
pub(crate) fn run_plan_in(
    dir: &std::path::Path,
    mut plan: xlab_plan::Plan,
    how: &RunArgs,
    shown: Shown,
) -> Result<u8, Failure> {
    let fail_fast = how.fail_fast;
    let slurm_wanted = slurm_settings(how, &plan);
    // This machine's pool, checked before the store is made: a plan it can never place is
    // refused with nothing written (a run that joins another uses that run's pool instead).
    let local = match slurm_wanted {
        Some(_) => None,
        None => {
            let pool = xlab_sched::build_pool(&how.pool(), &xlab_sched::detect_gpus())
                .map_err(|e| Failure { code: exit::USER, error: anyhow::anyhow!(e) })?;
            let placed = xlab_sched::check_placement(&plan, &pool);
            if let Err(e) = &placed {
                if std::os::unix::net::UnixStream::connect(xlab_store::live::socket_path(dir)).is_err() {
                    return Err(Failure { code: exit::USER, error: anyhow::anyhow!(e.clone()) });
                }
            }
            Some((pool, placed))
        }
    };
    // The store, ours or (while another run owns it) shared with that run; see `xlab_sched::hub`.
    let opened = open_or_join(dir)?;
    if let (Owning::Join(remote), Some(_)) = (&opened, &slurm_wanted) {
        let (pid, command) = remote.owner();
        return Err(Failure {
            code: exit::ENVIRONMENT,
            error: anyhow::anyhow!(
                "the store {} is in use by pid {pid} ({command}); a run that submits to Slurm cannot join it\n  hint: \
                 wait for it to finish, or use another store with --store DIR",
                dir.display()
            ),
        });
    }
    // The owner's pool is the hub's, shared with the runs that join it later.
    let (slots, slurm, joined, hub): (Box<dyn xlab_sched::Slots>, _, _, _) = match (&opened, slurm_wanted) {
        (Owning::Own(_), Some(settings)) => {
            let s = xlab_sched::slurm::SlurmExec::new(settings, &worker_path(), dir, how.threads)
                .map_err(|e| Failure { code: exit::ENVIRONMENT, error: anyhow::anyhow!(e) })?;
            (Box::new(xlab_sched::Pool::new(Vec::new())), Some(s), None, None)
        }
        (Owning::Own(_), None) => {
            // Checked above; refused here when the run that owned the store has ended since.
            let (pool, placed) = local.expect("a local pool without Slurm");
            placed.map_err(|e| Failure { code: exit::USER, error: anyhow::anyhow!(e) })?;
            let hub = xlab_sched::hub::Hub::new(pool, &plan.name);
            (hub.slots(), None, None, Some(hub))
        }
        (Owning::Join(remote), _) => {
            let joined = xlab_sched::hub::Joined::join(std::sync::Arc::clone(remote), &plan.name)
                .map_err(|e| Failure { code: exit::ENVIRONMENT, error: anyhow::anyhow!(e) })?;
            let slots = joined.slots();
            xlab_sched::check_placement(&plan, &*slots).map_err(|e| Failure {
                code: exit::USER,
                error: anyhow::anyhow!("{e} (the pool of the run that owns the store, which this run shares)"),
            })?;
            (slots, None, Some(joined), None)
        }
    };
    let store: &dyn ResultStore = match &opened {
        Owning::Own(s) => s,
        Owning::Join(r) => &**r,
    };
    adopt_earlier_ids(store, &mut plan);
    say_if_replacing(store, &plan)?;
    let rerun = review_done_jobs(store, &plan, how.rerun.as_deref())?;
    // A TPE search's trials count whether proposed already or still to come.
    let total =
        plan.stages.iter().map(|s| s.search.as_ref().map_or(s.jobs.len(), |x| x.trials(s.jobs.len()))).sum::<usize>();
    let cap = how.max_parallel.or(plan.max_parallel).map(|m| m as usize);
    let (at_once, on) = match &slurm {
        Some(s) => (cap.map_or("every ready job".into(), |c| format!("up to {c}")), s.describe()),
        None => (slots.len().min(cap.unwrap_or(usize::MAX)).to_string(), slots.describe()),
    };
    match (&opened, &joined) {
        (Owning::Join(remote), Some(j)) => {
            let (pid, _) = remote.owner();
            let others: Vec<String> = j
                .members()
                .unwrap_or_default()
                .iter()
                .filter(|m| m.pid != std::process::id())
                .map(|m| format!("`{}` (pid {})", m.experiment, m.pid))
                .collect();
            tracing::info!(
                "experiment `{}`: {total} job(s) in {} stage(s), store {} — shared with the run(s) of {} already on it: \
                 this run's jobs take turns with theirs on the pool of pid {pid} ({on}); Ctrl-C here stops this run's \
                 jobs only",
                plan.name,
                plan.stages.len(),
                dir.display(),
                others.join(", ")
            );
        }
        _ => tracing::info!(
            "experiment `{}`: {total} job(s) in {} stage(s), {at_once} at a time on {on}, store {}",
            plan.name,
            plan.stages.len(),
            dir.display()
        ),
    }
    let peers = match (&hub, &joined) {
        (Some(h), _) => Some(h.peers()),
        (_, Some(j)) => Some(j.peers()),
        _ => None,
    };
    let stop = count_stop_requests();
    let opts = RunOptions {
        worker: worker_path(),
        pool: slots,
        peers,
        slurm,
        xlab_version: VERSION.into(),
        git_commit: env!("XLAB_GIT_COMMIT").into(),
        stop: std::sync::Arc::clone(&stop),
        fail_fast,
        max_parallel: how.max_parallel.map(|m| m as usize),
        rerun,
    };
    let started = Instant::now();
    let mut finished = 0usize;
    let live = live::wanted(shown.live).then(|| live::Live::start(total));
    let status_file = match &joined {
        Some(_) => status::joined_path(dir, std::process::id()),
        None => status::path(dir),
    };
    let mut tracker = status::Tracker::new(status_file, &plan.name, total, live);
    let mut observe = |p: Progress<'_>| match p {
        Progress::Skipped { job } => {
            tracker.skipped();
            finished += 1;
            tracing::info!("[{finished}/{total}] {} {} already done (job {})", job.stage, job.label(), job.id);
        }
        Progress::Started { job, device, attempt, slurm_job } => {
            tracker.started(job, device, attempt, slurm_job);
            let again = if attempt > 1 { format!(", attempt {attempt}") } else { String::new() };
            tracing::info!("started {} {} on {device} (job {}{again})", job.stage, job.label(), job.id);
        }
        Progress::Resumed { job, epoch, from_job: Some(from), .. } => {
            tracing::info!(
                "{} {} continues job {from} (the same training with {epoch} epochs) from its checkpoint after epoch {epoch}",
                job.stage,
                job.label()
            );
        }
        Progress::Resumed { job, epoch, step_in_epoch: 0, .. } => {
            tracing::info!("resumed {} {} from its checkpoint after epoch {epoch}", job.stage, job.label());
        }
        Progress::Resumed { job, epoch, step_in_epoch, .. } => {
            tracing::info!(
                "resumed {} {} from its checkpoint in epoch {}, after {step_in_epoch} batches",
                job.stage,
                job.label(),
                epoch + 1
            );
        }
        Progress::Metrics { job, step, values } => {
            tracker.metrics(job.id.as_str(), step, values);
            // Formatted only for `-v`: a job streaming rows would otherwise pay for every value.
            if tracing::enabled!(tracing::Level::DEBUG) {
                let shown: Vec<String> =
                    values.iter().filter(|(k, _)| k.as_str() != "epoch").map(|(k, v)| format!("{k}={v:.4}")).collect();
                tracing::debug!("{} {} step {step}: {}", job.stage, job.label(), shown.join(" "));
            }
        }
        Progress::Finished { job, summary } => {
            tracker.ended(job.id.as_str(), status::Ended::Done);
            finished += 1;
            // The headline test metrics; per-group values stay in the store (`xlab show`).
            let shown: Vec<String> = summary
                .iter()
                .filter(|(k, _)| k.starts_with("test.") && !k.contains(".group_"))
                .map(|(k, v)| format!("{k}={v:.4}"))
                .collect();
            tracing::info!("[{finished}/{total}] done {} {}: {}", job.stage, job.label(), shown.join(" "));
        }
        Progress::Warning { job, message } => {
            tracing::warn!("{} {} (job {}): {message}", job.stage, job.label(), job.id);
        }
        Progress::Retrying {
            job,
            cause: cause @ (xlab_proto::FailureCause::NotStarted | xlab_proto::FailureCause::Preempted),
            message,
            ..
        } => {
            tracker.ended(job.id.as_str(), status::Ended::Retrying);
            let again = match cause {
                xlab_proto::FailureCause::NotStarted => {
                    "submitting it again (it never ran, so this does not count against `retries:`)"
                }
                _ => "submitting it again to resume from its last checkpoint (preemption does not count against `retries:`)",
            };
            tracing::warn!("{} {}: {message}; {again} (job {})", job.stage, job.label(), job.id);
        }
        Progress::Retrying { job, cause, message, delay } => {
            tracker.ended(job.id.as_str(), status::Ended::Retrying);
            tracing::warn!(
                "{} {} failed ({}): {message}; trying again in {} s (job {})",
                job.stage,
                job.label(),
                cause.as_str(),
                delay.as_secs(),
                job.id
            );
        }
        Progress::Stopped { job, message } => {
            tracker.ended(job.id.as_str(), status::Ended::Stopped);
            tracing::warn!("{} {} {message} (job {})", job.stage, job.label(), job.id);
        }
        Progress::Search { job, decision } => {
            tracing::info!("search `{}`: {}", job.stage, crate::commands::search::describe(decision, &job.label()));
        }
        Progress::Paused { job, epoch, value } => {
            tracker.ended(job.id.as_str(), status::Ended::Paused);
            tracing::info!("paused {} {} at epoch {epoch} ({value:.4}), at a checkpoint", job.stage, job.label());
        }
        Progress::Elsewhere { job } => {
            tracing::info!(
                "{} {} is running in another run on this store; waiting for it (job {})",
                job.stage,
                job.label(),
                job.id
            );
        }
        Progress::Failed { job, cause, message } => {
            tracker.ended(job.id.as_str(), status::Ended::Failed);
            finished += 1;
            tracing::error!(
                "[{finished}/{total}] FAILED ({}) {} {} (job {}): {message}",
                cause.as_str(),
                job.stage,
                job.label(),
                job.id
            );
        }
    };
    // While it runs, every other command reads the store through this process (see
    // `xlab_store::live`): a server thread answers them beside the scheduler.
    let serving = std::sync::atomic::AtomicBool::new(false);
    let ran = std::sync::atomic::AtomicBool::new(false);
    let report = std::thread::scope(|scope| {
        let Owning::Own(own) = &opened else {
            return xlab_sched::run(store, &plan, opts, &mut observe);
        };
        let host = hub.as_deref().map(|h| h as &dyn xlab_store::live::Host);
        let serving = &serving;
        scope.spawn(move || {
            if let Err(e) = xlab_store::live::serve(own, serving, host, || {}) {
                tracing::warn!(
                    "cannot serve reads of the store while this runs ({e}); other commands see it as in use until the \
                     run ends"
                );
            }
        });
        // The runs that joined this one follow its stop requests: the store goes when it goes.
        if let Some(h) = &hub {
            let (h, stop, ran) = (std::sync::Arc::clone(h), std::sync::Arc::clone(&stop), &ran);
            scope.spawn(move || {
                while !ran.load(std::sync::atomic::Ordering::Acquire) {
                    h.set_stops(stop.load(std::sync::atomic::Ordering::SeqCst));
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
        }
        let report = xlab_sched::run(store, &plan, opts, &mut observe);
        if let Some(h) = &hub {
            h.owner_done();
            wait_for_joined(h, &stop);
        }
        ran.store(true, std::sync::atomic::Ordering::Release);
        xlab_store::live::stop_serving(dir, serving);
        report
    })?;
    tracker.finish();
    if joined.is_some() {
        tracker.remove();
    }
    tracing::info!(
        "{} done, {} skipped (already done), {}{} failed in {:.1}s",
        report.done,
        report.skipped,
        match report.elsewhere {
            0 => String::new(),
            n => format!("{n} done by another run on this store, "),
        },
        report.failed.len(),
        started.elapsed().as_secs_f64()
    );
    crate::commands::search::report(&report.searches);
    if shown.table {
        query(store, &pick_experiment(store, Some(&plan.name))?, Format::Table, &[], None)?;
    }
    if report.detached > 0 {
        eprintln!(
            "{} job(s) keep running in Slurm. Run the same command again to re-attach to them (their results are \
             collected then); `scancel` stops them.",
            report.detached
        );
    }
    if let Some(why) = &report.ended_early {
        if report.detached == 0 || report.stopped + report.not_started > 0 {
            eprintln!(
                "{why}: {} job(s) stopped (each resumes from its last checkpoint), {} not started. Run the same command \
                 again to resume; nothing recorded is lost.",
                report.stopped, report.not_started
            );
        }
        if report.disk_full.is_some() {
            return Ok(exit::ENVIRONMENT);
        }
        if report.failed.is_empty() {
            return Ok(exit::STOPPED);
        }
    }
    if report.failed.is_empty() {
        return Ok(0);
    }
    let config = report.failed.iter().filter(|f| f.1 == xlab_proto::FailureCause::Config).count();
    let other = report.failed.len() - config;
    let held: usize = report.held_back.iter().map(|h| h.1).sum();
    if config > 0 {
        let held = if held > 0 {
            format!(" ({held} more job(s) of the same stage(s) were not started)")
        } else {
            String::new()
        };
        eprintln!(
            "{config} job(s) failed with a config error{held}: running them again as they are fails the same way. \
             Fix the experiment file (or the data it names) and run it again."
        );
    }
    if other > 0 {
        eprintln!(
            "{other} job(s) failed; their logs are in {}/runs/<job>/worker.log. Run the same command again to retry them.",
            dir.display()
        );
    }
    Ok(exit::JOBS_FAILED)
}

/// The store for a run: opened here, or, while another run owns it, shared with that run.
enum Owning {
    Own(xlab_store::Store),
    Join(std::sync::Arc<xlab_store::live::RemoteStore>),
}

/// Opens the store in `dir` to run in it; when a run owns it, connects to that run to join it.
fn open_or_join(dir: &std::path::Path) -> Result<Owning, Failure> {
    match open_store(dir) {
        Ok(s) => Ok(Owning::Own(s)),
        Err(f) => match f.error.downcast_ref::<xlab_store::StoreError>() {
            Some(xlab_store::StoreError::InUse { pid, command, .. }) => {
                match xlab_store::live::RemoteStore::connect(dir, (*pid, command.clone())) {
                    Ok(remote) => Ok(Owning::Join(std::sync::Arc::new(remote))),
                    Err(_) => Err(f),
                }
            }
            _ => Err(f),
        },
    }
}

/// The owner's run has ended, but runs that joined it still use the store through it: it waits
/// for them (passing on Ctrl-C, which stops them too).
fn wait_for_joined(hub: &xlab_sched::hub::Hub, stop: &std::sync::atomic::AtomicUsize) {
    let mut said = 0usize;
    loop {
        let joined = hub.joined();
        if joined.is_empty() {
            return;
        }
        if said != joined.len() {
            said = joined.len();
            let who: Vec<String> = joined.iter().map(|m| format!("`{}` (pid {})", m.experiment, m.pid)).collect();
            tracing::info!(
                "this run is done; {} other run(s) on this store go on through it: {}. Waiting for them (Ctrl-C stops \
                 them at a checkpoint; they resume when run again)",
                joined.len(),
                who.join(", ")
            );
        }
        hub.set_stops(stop.load(std::sync::atomic::Ordering::SeqCst));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
