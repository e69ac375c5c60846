//! The scheduler loop: decide what to run, place ready jobs on free slots, turn worker events
//! into store writes.

use crate::disk;
use crate::pool::{Held, Need, Pool, Slot};
use crate::slurm::{self, SlurmExec};
use crate::spawn::{self, Exit, Msg};
use crate::writer::{self, StoreOp};
use crossbeam_channel::{unbounded, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xlab_proto::{Event, FailureCause, JobRequest, Lease, ParentRef, PROTOCOL_VERSION};
use xlab_spec::{Job, Plan};
use xlab_store::{
    now_unix, ArtifactRecord, Attempt, ExperimentRecord, FaultSite, JobRecord, JobStatus, Provenance, ResultStore,
    StageRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error(transparent)]
    Store(#[from] xlab_store::StoreError),
    #[error(
        "cannot start the worker {worker}: {error}\n  hint: build it with `make build`, or point XLAB_WORKER at it"
    )]
    Spawn { worker: PathBuf, error: std::io::Error },
    #[error("cannot submit to Slurm: {0}")]
    Submit(String),
    #[error(
        "job {job} ({stage}) is still in Slurm as job {slurm}, submitted by an earlier `xlab run --executor slurm`\n  hint: run with \
         `--executor slurm` to re-attach to it, or `scancel {slurm}` first to run it here"
    )]
    StillInSlurm { job: String, stage: String, slurm: String },
    #[error("{0}")]
    Io(String),
}

pub struct RunOptions {
    /// The `xlab-worker` executable.
    pub worker: PathBuf,
    /// The local slots jobs run on (not used when `slurm` is set).
    pub pool: Pool,
    /// Submit jobs to Slurm instead of running them here.
    pub slurm: Option<SlurmExec>,
    /// The coordinator's version, recorded with every job.
    pub xlab_version: String,
    /// The git commit the coordinator was built from.
    pub git_commit: String,
    /// Stop requests (Ctrl-C, SIGTERM) received so far: at 1, no job starts and running workers
    /// are asked to stop at a checkpoint; at 2, they are killed. Their jobs stay resumable.
    pub stop: Arc<AtomicUsize>,
    /// Stop starting jobs after the first deterministic failure, in every stage.
    pub fail_fast: bool,
    /// At most this many jobs at once (`--max-parallel`; else the file's `max_parallel:`).
    pub max_parallel: Option<usize>,
    /// Jobs to run again although the store holds them as done (`xlab run --rerun FILTER`):
    /// each gets a new attempt, its earlier attempts stay in its record and its earlier files
    /// move to `runs/JOB/attempt-N/`.
    pub rerun: std::collections::HashSet<String>,
}

/// How often the loop looks at stop requests, timeouts and retry delays while it waits.
const TICK: Duration = Duration::from_millis(100);

/// What happened to one job, for whoever displays progress.
#[derive(Debug)]
pub enum Progress<'a> {
    /// Already done in the store; not run again.
    Skipped {
        job: &'a Job,
    },
    Started {
        job: &'a Job,
        device: &'a str,
        attempt: u32,
        /// The Slurm job running it, under the Slurm executor.
        slurm_job: Option<&'a str>,
    },
    /// The worker continues from a checkpoint of an earlier attempt.
    Resumed {
        job: &'a Job,
        epoch: u64,
        /// Batches into epoch `epoch + 1` (0: from the end of epoch `epoch`).
        step_in_epoch: u64,
    },
    Metrics {
        job: &'a Job,
        step: u64,
        values: &'a BTreeMap<String, f64>,
    },
    Finished {
        job: &'a Job,
        summary: &'a BTreeMap<String, f64>,
    },
    Failed {
        job: &'a Job,
        cause: FailureCause,
        message: &'a str,
    },
    /// The attempt failed in a way worth another try, which starts after `delay`.
    Retrying {
        job: &'a Job,
        cause: FailureCause,
        message: &'a str,
        delay: Duration,
    },
    /// The worker warns about the job's result (it did not fail).
    Warning {
        job: &'a Job,
        message: &'a str,
    },
    /// The job stopped at a checkpoint because the run was asked to stop; it resumes next time.
    Stopped {
        job: &'a Job,
        message: &'a str,
    },
}

#[derive(Debug, Default)]
pub struct RunReport {
    pub total: usize,
    pub skipped: usize,
    pub done: usize,
    pub failed: Vec<(String, FailureCause, String)>,
    /// Jobs stopped by a stop request (resumable).
    pub stopped: usize,
    /// Why the run ended before every job ran, if it did: a stop request or `fail_fast`.
    pub ended_early: Option<String>,
    /// Jobs that never started because the run ended early.
    pub not_started: usize,
    /// Slurm jobs left running when the run was stopped; the next run re-attaches to them.
    pub detached: usize,
    /// Why the run stopped starting jobs for want of room on the store's disk (or a store that
    /// could not be written), if it did.
    pub disk_full: Option<String>,
    /// Stages whose first config error held their other jobs back (a config error repeats in
    /// every job that shares the config): the stage, how many jobs it held back, the error.
    pub held_back: Vec<(String, usize, String)>,
}

struct Running {
    /// The pool slots it holds (several with `resources: {slots: N}`), all of one device, and
    /// the memory it reserved there; none for a Slurm job.
    held: Option<Held>,
    pid: u32,
    /// The Slurm job running it, once submitted.
    slurm_id: Option<String>,
    started: Instant,
    timed_out: bool,
    /// Sent SIGTERM on a stop request: a worker still starting up (before its handler is in
    /// place) dies of it, having done nothing that could be lost.
    asked_to_stop: bool,
    record: JobRecord,
    terminal: Option<Result<BTreeMap<String, f64>, (FailureCause, String)>>,
}

/// Failures another attempt may cure.
fn retryable(cause: FailureCause) -> bool {
    matches!(cause, FailureCause::Crashed | FailureCause::OutOfMemory | FailureCause::Timeout | FailureCause::Hung)
}

/// Whether the job's last attempt crashed or hung exactly as the one before it: the same
/// outcome, signal, training step and plugin call. Such a failure is the job's own and would
/// repeat on every attempt, so it is not retried; returns what to add to the message.
fn repeated_fault(rec: &JobRecord) -> Option<String> {
    let [.., before, last] = rec.attempts.as_slice() else { return None };
    let (a, b) = (last.site.as_ref()?, before.site.as_ref()?);
    let same = last.outcome.is_some() && last.outcome == before.outcome && a == b && a.step.is_some();
    same.then(|| {
        format!(
            "; attempt {} ended the same way at the same step, so the fault is the job's own and it is not retried              (fix the cause, then run the same command again)",
            before.number
        )
    })
}

/// `11 (SIGSEGV)`.
fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => return sig.to_string(),
    };
    format!("{sig} ({name})")
}

/// Failures that repeat when the same job runs again.
fn deterministic(cause: FailureCause) -> bool {
    matches!(cause, FailureCause::Config | FailureCause::Diverged | FailureCause::Error)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this process started and has not reaped yet (its reader thread
    // reaps it only after it exits), so the pid cannot name another process.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Checks that the pool can hold every stage's jobs (`resources:`): a device of the asked kind
/// with the asked number of slots. Says which stage asks for what, and what the pool has.
pub fn check_placement(plan: &Plan, pool: &Pool) -> Result<(), String> {
    for stage in &plan.stages {
        let Some(job) = stage.jobs.first() else { continue };
        let need = need_of(job);
        let Some(why) = pool.never_fits(need) else { continue };
        let kind = match need.kind {
            _ if need.gpus > 0 => "whole GPU(s)",
            xlab_spec::file::DeviceKind::Any => "any device",
            xlab_spec::file::DeviceKind::Cpu => "the CPU",
            xlab_spec::file::DeviceKind::Cuda => "a GPU",
        };
        let memory = match need.memory_mib {
            0 => String::new(),
            m => format!(" with {:.1} GB", m as f64 / 1024.0),
        };
        return Err(format!(
            "stage `{}` asks for {} {}{kind}{memory} (`resources:`), but the pool ({}) {why}\n  hint: run with \
             more `--jobs-per-device`, other `--devices`, or lower `resources`",
            stage.name,
            need.gpus.max(need.slots),
            if need.gpus > 0 { "" } else { "slot(s) of " },
            pool.describe()
        ));
    }
    Ok(())
}

/// What a job takes from the pool.
fn need_of(job: &Job) -> Need {
    Need {
        slots: job.exec.slots as usize,
        kind: job.exec.device,
        memory_mib: job.exec.memory_mib,
        gpus: job.exec.gpus as usize,
    }
}

/// Runs every job of the plan that the store does not hold as done.
pub fn run(
    store: &dyn ResultStore,
    plan: &Plan,
    mut opts: RunOptions,
    observe: &mut dyn FnMut(Progress<'_>),
) -> Result<RunReport, SchedError> {
    let jobs: Vec<&Job> = plan.jobs().collect();
    let mut report = RunReport { total: jobs.len(), ..Default::default() };
    let next = ExperimentRecord {
        name: plan.name.clone(),
        file: plan.file.display().to_string(),
        source: plan.source.clone(),
        updated_unix: now_unix(),
        stages: plan
            .stages
            .iter()
            .map(|s| StageRecord {
                name: s.name.clone(),
                sweep_keys: s.sweep_keys.clone(),
                jobs: s.jobs.iter().map(|j| j.id.to_string()).collect(),
            })
            .collect(),
        earlier: Vec::new(),
    };
    // Running another version of the file (an edit, or another file with the same `name:`)
    // keeps the earlier version and its jobs, and says so.
    let record = match store.experiment(&plan.name)? {
        Some(mut before) => {
            before.replace_with(next);
            before
        }
        None => next,
    };
    store.put_experiment(&record)?;

    let mut records: Vec<JobRecord> = Vec::with_capacity(jobs.len());
    let mut queue = VecDeque::new();
    let mut waiting: Vec<usize> = Vec::new();
    // Jobs an earlier run left in Slurm: (index, Slurm id), followed again rather than resubmitted.
    let mut reattach: Vec<(usize, String)> = Vec::new();
    let mut slurm_queue: Option<Option<std::collections::HashMap<String, slurm::QueueEntry>>> = None;
    for (i, job) in jobs.iter().enumerate() {
        let mut rec = match store.job(job.id.as_str())? {
            Some(r) => r,
            None => new_record(plan, job),
        };
        if rec.status == JobStatus::Done && opts.rerun.contains(job.id.as_str()) {
            set_aside_files(store, &rec)?;
            rec.status = JobStatus::Pending;
            rec.summary.clear();
            rec.artifacts.clear();
        }
        if rec.status == JobStatus::Done {
            report.skipped += 1;
            observe(Progress::Skipped { job });
        } else {
            if let Some(id) = rec.in_slurm().map(str::to_string) {
                if opts.slurm.is_some() {
                    reattach.push((i, id));
                    records.push(rec);
                    continue;
                }
                // Running it here while Slurm still runs it would have two workers write one
                // run folder.
                let listed = slurm_queue.get_or_insert_with(|| slurm::queue().ok());
                if listed.as_ref().and_then(|q| q.get(&id)).is_some_and(|e| !e.ended()) {
                    return Err(SchedError::StillInSlurm { job: rec.id.clone(), stage: rec.stage.clone(), slurm: id });
                }
            }
            if rec.status == JobStatus::Running {
                // We hold the store's lock, so whoever ran it is gone.
                rec.status = JobStatus::Interrupted;
                if let Some(a) = rec.attempts.last_mut().filter(|a| a.ended_unix.is_none()) {
                    a.outcome = Some("interrupted".into());
                }
            }
            rec.point = job.point.clone();
            rec.experiment = plan.name.clone();
            store.put_job(&rec)?;
            waiting.push(i);
        }
        records.push(rec);
    }
    store.flush()?;
    let index: HashMap<&str, usize> = jobs.iter().enumerate().map(|(i, j)| (j.id.as_str(), i)).collect();
    // Jobs run in DAG order: a job is ready once all its parents are done. A `select: best`
    // job waits for all its candidates to finish (done or failed), then picks among the done.
    let release = |waiting: &mut Vec<usize>,
                   queue: &mut VecDeque<usize>,
                   records: &mut [JobRecord]|
     -> Vec<(usize, FailureCause, String)> {
        let mut blocked = Vec::new();
        let mut picks: Vec<(usize, String)> = Vec::new();
        waiting.retain(|&i| {
            let parents: Vec<&JobRecord> = jobs[i].parents.iter().map(|p| &records[index[p.as_str()]]).collect();
            if let Some(pick) = &jobs[i].pick {
                if !parents.iter().all(|p| matches!(p.status, JobStatus::Done | JobStatus::Failed)) {
                    return true;
                }
                let done: Vec<(&str, &BTreeMap<String, f64>)> = parents
                    .iter()
                    .filter(|p| p.status == JobStatus::Done)
                    .map(|p| (p.id.as_str(), &p.summary))
                    .collect();
                match pick.choose(&done) {
                    Ok(id) => {
                        picks.push((i, id.to_string()));
                        queue.push_back(i);
                    }
                    Err(m) if done.len() < pick.rank as usize => blocked.push((i, FailureCause::ParentFailed, m)),
                    Err(m) => blocked.push((i, FailureCause::Config, m)),
                }
                return false;
            }
            if let Some(p) = parents.iter().find(|p| p.status == JobStatus::Failed) {
                blocked.push((i, FailureCause::ParentFailed, format!("parent job {} ({}) failed", p.id, p.stage)));
                false
            } else if parents.iter().all(|p| p.status == JobStatus::Done) {
                queue.push_back(i);
                false
            } else {
                true
            }
        });
        // The parent each released `select: best` job is given, kept in its record.
        for (i, id) in picks {
            records[i].selected = Some(id);
        }
        blocked
    };

    let (ops_tx, ops_rx) = unbounded::<StoreOp>();
    let (tx, rx) = unbounded::<Msg>();
    let health = writer::Health::default();
    let busy = writer::Busy::default();
    let writer_done = std::sync::atomic::AtomicBool::new(false);
    let mut room = disk::Room::new(store.dir());
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let r = writer::run(store, ops_rx, &health, &busy);
            writer_done.store(true, Ordering::Release);
            r
        });
        // A store call that never returns ends the run with what to do; the workers, whose
        // parent then goes away, stop too, and every job resumes from its last checkpoint.
        scope.spawn(|| {
            writer::watch_stalls(&busy, writer::stall_limit(), &writer_done, |message| {
                tracing::error!("{message}");
                std::process::exit(3);
            })
        });
        // One worker per slot starts loading libtorch now; each job started takes one and
        // starts a replacement while work remains.
        let mut standbys = spawn::Standbys::new(&opts.worker, store.dir().join("standby.log"));
        if opts.slurm.is_none() && (!queue.is_empty() || !waiting.is_empty()) {
            for i in 0..opts.pool.len() {
                let (lease, visible) = spawn::lease_for(opts.pool.slot(i));
                let key = spawn::WorkerKey { visible, threads: lease.threads, deterministic: false };
                standbys.fill(&key);
            }
        }
        let mut running: HashMap<usize, Running> = HashMap::new();
        // Slurm jobs are followed by a watcher thread: their event files and the queue.
        let (watch_tx, watch_rx) = unbounded::<slurm::Watched>();
        if let Some(s) = &opts.slurm {
            let (tx, poll) = (tx.clone(), s.poll());
            scope.spawn(move || slurm::watch(watch_rx, tx, poll));
            for (i, id) in std::mem::take(&mut reattach) {
                follow(s, &watch_tx, store, jobs[i], i, &records[i], &id, " (re-attached)", observe);
                running.insert(i, Running::new(None, 0, Some(id), records[i].clone()));
            }
        }
        let mut result = Ok(());
        // Retries waiting for their delay, attempts made in this run, devices to avoid.
        let mut delayed: Vec<(Instant, usize)> = Vec::new();
        let mut attempts_here: HashMap<usize, u32> = HashMap::new();
        let mut avoid: HashMap<usize, String> = HashMap::new();
        let mut signalled = 0usize;
        loop {
            // Release what became ready; fail (without running) what a failed parent blocks.
            loop {
                let blocked = release(&mut waiting, &mut queue, &mut records);
                if blocked.is_empty() {
                    break;
                }
                for (i, cause, message) in blocked {
                    let rec = &mut records[i];
                    rec.status = JobStatus::Failed;
                    rec.attempts.push(Attempt {
                        number: rec.attempts.len() as u32 + 1,
                        started_unix: now_unix(),
                        ended_unix: Some(now_unix()),
                        device: String::new(),
                        pid: None,
                        outcome: Some(cause.as_str().into()),
                        error: Some(message.clone()),
                        slurm_job: None,
                        site: None,
                    });
                    let _ = ops_tx.send(StoreOp::Job(Box::new(rec.clone())));
                    report.failed.push((jobs[i].id.to_string(), cause, message.clone()));
                    observe(Progress::Failed { job: jobs[i], cause, message: &message });
                }
            }
            // Stop requests: the first stops new starts and asks workers to checkpoint and stop,
            // the second kills them.
            let stops = opts.stop.load(Ordering::SeqCst);
            if stops >= 1 && opts.slurm.is_some() {
                // Slurm jobs do not need this process: leave them running, recorded as such, for
                // the next run to re-attach to.
                tracing::warn!(
                    "stopping: no new jobs; {} job(s) keep running in Slurm, and the same command re-attaches to them \
                     (`scancel` stops them)",
                    running.len()
                );
                report.ended_early.get_or_insert_with(|| "stopped by request".into());
                report.detached = running.len();
                break;
            }
            if stops >= 1 && signalled < 1 {
                signalled = 1;
                tracing::warn!(
                    "stopping: no new jobs; {} running job(s) stop at their next epoch end (or `checkpoint.every_steps` step), after a checkpoint \
                     (press Ctrl-C again to kill them at once)",
                    running.len()
                );
                report.ended_early.get_or_insert_with(|| "stopped by request".into());
                for r in running.values_mut() {
                    r.asked_to_stop = true;
                    signal(r.pid, libc::SIGTERM);
                }
            }
            if stops >= 2 && signalled < 2 {
                signalled = 2;
                tracing::warn!(
                    "killing {} running worker(s); their jobs resume from their last checkpoint",
                    running.len()
                );
                for r in running.values() {
                    signal(r.pid, libc::SIGKILL);
                }
            }
            for r in running.values_mut() {
                let limit = jobs_exec_timeout(&jobs, &index, &r.record.id);
                if !r.timed_out && limit.is_some_and(|l| r.started.elapsed() > l) {
                    r.timed_out = true;
                    match &r.slurm_id {
                        Some(id) => SlurmExec::cancel(id),
                        None => signal(r.pid, libc::SIGKILL),
                    }
                }
            }
            if report.ended_early.is_some() {
                queue.clear();
                delayed.clear();
            }
            let now = Instant::now();
            delayed.retain(|&(due, i)| {
                if due <= now {
                    queue.push_back(i);
                    false
                } else {
                    true
                }
            });
            // No new job while the store cannot be written or its disk lacks room for one;
            // running jobs go on, and jobs start again once there is room.
            let short = match queue.is_empty() {
                true => None,
                false => health
                    .failing()
                    .map(|e| format!("cannot write the store ({e})"))
                    .or_else(|| room.short(running.len())),
            };
            match (&short, &report.disk_full) {
                (Some(m), None) => tracing::warn!(
                    "{m}\n  starting no more jobs until there is room; {} running job(s) go on",
                    running.len()
                ),
                (None, Some(_)) if !queue.is_empty() => {
                    tracing::info!("there is room on the disk again; starting jobs")
                }
                _ => {}
            }
            if short.is_some() || !queue.is_empty() {
                report.disk_full = short;
            }
            if report.disk_full.is_some() && running.is_empty() && report.ended_early.is_none() {
                report.ended_early = report.disk_full.clone();
                queue.clear();
                delayed.clear();
            }
            let cap = opts.max_parallel.or(plan.max_parallel.map(|m| m as usize)).unwrap_or(usize::MAX);
            // Slurm: the jobs placed in this round, submitted together below.
            let mut to_submit: Vec<(usize, JobRequest)> = Vec::new();
            while report.disk_full.is_none() && (opts.slurm.is_some() || opts.pool.free() > 0) && running.len() < cap {
                // The ready job to start: highest stage priority, then plan order, skipping
                // stages at their `max_parallel` and jobs whose slots are not free now.
                let busy = |stage: &str| running.keys().filter(|&&r| jobs[r].stage == stage).count();
                let mut ready: Vec<(usize, usize)> = queue
                    .iter()
                    .enumerate()
                    .filter(|(_, &i)| jobs[i].exec.max_parallel.is_none_or(|m| busy(&jobs[i].stage) < m as usize))
                    .map(|(at, &i)| (at, i))
                    .collect();
                ready.sort_by_key(|&(_, i)| (std::cmp::Reverse(jobs[i].exec.priority), i));
                let placed = ready.into_iter().find_map(|(at, i)| {
                    if opts.slurm.is_some() {
                        // Slurm's queue holds what its nodes cannot run yet.
                        return Some((at, None));
                    }
                    let avoid = avoid.get(&i).map(String::as_str);
                    opts.pool.take(need_of(jobs[i]), avoid).map(|held| (at, Some(held)))
                });
                let Some((at, held)) = placed else { break };
                let i = queue.remove(at).expect("an index into the queue");
                let picked = records[i].selected.clone();
                let parents: Vec<ParentRef> = jobs[i]
                    .parents
                    .iter()
                    .filter(|p| picked.as_ref().is_none_or(|c| c == p.as_str()))
                    .map(|p| ParentRef {
                        job_id: p.to_string(),
                        run_dir: store.run_dir(p.as_str()),
                        config: jobs[index[p.as_str()]].config_json.clone(),
                    })
                    .collect();
                let Some(held) = held else {
                    let s = opts.slurm.as_ref().expect("only Slurm places jobs without slots");
                    let gpus = s.gpus_for(jobs[i]);
                    let lease =
                        Lease { device: if gpus > 0 { "cuda:0" } else { "cpu" }.into(), threads: s.cpus() as usize };
                    to_submit.push((i, request(store, jobs[i], &records[i], lease, &parents)));
                    // Holds its place under `max_parallel` until submitted.
                    running.insert(i, Running::new(None, 0, None, records[i].clone()));
                    continue;
                };
                let slot = Slot {
                    device: held.device.clone(),
                    threads: held.slots.iter().map(|&s| opts.pool.slot(s).threads).sum(),
                };
                let (lease, visible) = spawn::lease_for(&slot);
                let req = request(store, jobs[i], &records[i], lease, &parents);
                let key = spawn::WorkerKey {
                    visible,
                    threads: req.lease.threads,
                    deterministic: jobs[i].config.deterministic,
                };
                let pid = match standbys.hand_over(&key, &req, i, &tx) {
                    Some(pid) => Ok(pid),
                    None => spawn::spawn(&opts.worker, &req, &key, i, tx.clone())
                        .map_err(|error| SchedError::Spawn { worker: opts.worker.clone(), error }),
                };
                match pid {
                    Ok(pid) => {
                        record_start(
                            &opts,
                            jobs[i],
                            &mut records[i],
                            &slot.device,
                            key.threads_used(),
                            Start::Pid(pid),
                            &ops_tx,
                        );
                        // The next job of this kind finds a worker that has loaded libtorch.
                        if !queue.is_empty() || !waiting.is_empty() || !delayed.is_empty() {
                            standbys.fill(&key);
                        }
                        let attempt = records[i].attempts.len() as u32;
                        observe(Progress::Started { job: jobs[i], device: &slot.device, attempt, slurm_job: None });
                        running.insert(i, Running::new(Some(held), pid, None, records[i].clone()));
                    }
                    Err(SchedError::Spawn { error, .. }) if disk::is_full(&error) => {
                        // Its request could not be written: the job waits for room.
                        opts.pool.give_back(&held);
                        queue.push_front(i);
                        report.disk_full = Some(room.describe_now(running.len()));
                        tracing::warn!(
                            "cannot start job {}: {}\n  starting no more jobs until there is room",
                            jobs[i].id,
                            room.describe_now(running.len())
                        );
                        break;
                    }
                    Err(e) => {
                        opts.pool.give_back(&held);
                        result = Err(e);
                        queue.clear();
                    }
                }
            }
            if let (Some(s), false) = (&opts.slurm, to_submit.is_empty()) {
                // One `sbatch` per stage and resources: a job array when several are ready.
                let mut groups: Vec<(SubmitKey, Vec<(usize, JobRequest)>)> = Vec::new();
                for (i, req) in to_submit {
                    let key = (jobs[i].stage.clone(), s.gpus_for(jobs[i]), jobs[i].config.deterministic);
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, g)) => g.push((i, req)),
                        None => groups.push((key, vec![(i, req)])),
                    }
                }
                for ((stage, gpus, deterministic), group) in groups {
                    let submitted = if result.is_ok() {
                        submit(s, &plan.name, &stage, gpus, deterministic, &group, &records)
                    } else {
                        Err(SchedError::Submit("an earlier submission failed".into()))
                    };
                    let ids = match submitted {
                        Ok(ids) => ids,
                        Err(e) => {
                            for (i, _) in &group {
                                running.remove(i);
                            }
                            if result.is_ok() {
                                result = Err(e);
                            }
                            queue.clear();
                            continue;
                        }
                    };
                    for ((i, req), id) in group.into_iter().zip(ids) {
                        let (device, threads) = (&req.lease.device, req.lease.threads);
                        record_start(
                            &opts,
                            jobs[i],
                            &mut records[i],
                            device,
                            threads,
                            Start::Slurm(id.clone()),
                            &ops_tx,
                        );
                        follow(s, &watch_tx, store, jobs[i], i, &records[i], &id, "", observe);
                        let r = running.get_mut(&i).expect("placed above");
                        r.record = records[i].clone();
                        r.slurm_id = Some(id);
                        r.started = Instant::now();
                    }
                }
            }
            if running.is_empty() && queue.is_empty() && (delayed.is_empty() || report.ended_early.is_some()) {
                break;
            }
            if running.is_empty() && !queue.is_empty() && opts.pool.free() > 0 {
                continue;
            }
            let msg = match rx.recv_timeout(TICK) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => unreachable!("the loop holds a sender"),
            };
            match msg {
                Msg::Event(i, e) => {
                    if let Event::Checkpoint { path, .. } = &e {
                        room.saw_checkpoint(&store.run_dir(jobs[i].id.as_str()).join(path));
                    }
                    on_event(jobs[i], running.get_mut(&i).expect("event from a running job"), e, &ops_tx, observe)
                }
                Msg::Noise(i, line) => tracing::warn!(job = %jobs[i].id, "worker wrote a non-event line: {line}"),
                Msg::Exited(i, status) => {
                    let mut r = running.remove(&i).expect("exit of a running job");
                    if let Some(held) = &r.held {
                        opts.pool.give_back(held);
                    }
                    let mut outcome = finish(&mut r, status, store, jobs[i].exec.timeout_ms);
                    // A crash or hang that repeats the previous attempt's is not worth another.
                    let repeat = match &mut outcome {
                        Err((c, message)) if retryable(*c) => repeated_fault(&r.record).inspect(|more| {
                            message.push_str(more);
                            if let Some(a) = r.record.attempts.last_mut() {
                                a.error = Some(message.clone());
                            }
                        }),
                        _ => None,
                    };
                    let tries = attempts_here.entry(i).or_insert(0);
                    *tries += 1;
                    match &outcome {
                        Ok(summary) => {
                            report.done += 1;
                            observe(Progress::Finished { job: jobs[i], summary });
                        }
                        Err((FailureCause::Cancelled, message)) => {
                            r.record.status = JobStatus::Interrupted;
                            report.stopped += 1;
                            observe(Progress::Stopped { job: jobs[i], message });
                        }
                        Err((_, message)) if disk::says_full(message) => {
                            // The job could not write (a checkpoint, its samples): it resumes from
                            // its last good checkpoint once there is room; no more jobs start.
                            r.record.status = JobStatus::Interrupted;
                            if let Some(a) = r.record.attempts.last_mut() {
                                a.outcome = Some("interrupted".into());
                            }
                            report.stopped += 1;
                            report.disk_full.get_or_insert_with(|| room.describe_now(running.len()));
                            observe(Progress::Stopped { job: jobs[i], message });
                        }
                        Err((_, message)) if signalled >= 2 => {
                            // Killed on the second stop request: interrupted, not failed.
                            r.record.status = JobStatus::Interrupted;
                            if let Some(a) = r.record.attempts.last_mut() {
                                a.outcome = Some("interrupted".into());
                            }
                            report.stopped += 1;
                            observe(Progress::Stopped { job: jobs[i], message });
                        }
                        Err((cause, message))
                            if retryable(*cause)
                                && *tries <= jobs[i].exec.retries
                                && report.ended_early.is_none()
                                && repeat.is_none() =>
                        {
                            // 1 s, 2 s, 4 s, … up to a minute; after running out of memory, try
                            // another device if there is one.
                            let delay = Duration::from_secs(1u64 << (*tries - 1).min(6)).min(Duration::from_secs(60));
                            r.record.status = JobStatus::Pending;
                            if let (FailureCause::OutOfMemory, Some(held)) = (cause, &r.held) {
                                avoid.insert(i, held.device.clone());
                            }
                            delayed.push((Instant::now() + delay, i));
                            observe(Progress::Retrying { job: jobs[i], cause: *cause, message, delay });
                        }
                        Err((cause, message)) => {
                            report.failed.push((jobs[i].id.to_string(), *cause, message.clone()));
                            observe(Progress::Failed { job: jobs[i], cause: *cause, message });
                            if *cause == FailureCause::Config {
                                // The stage's other jobs share its config: they would fail the
                                // same way. They stay pending, to run once the file is fixed.
                                let stage = &jobs[i].stage;
                                let before = queue.len() + delayed.len() + waiting.len();
                                queue.retain(|&q| jobs[q].stage != *stage);
                                delayed.retain(|(_, q)| jobs[*q].stage != *stage);
                                waiting.retain(|&q| jobs[q].stage != *stage);
                                let held = before - queue.len() - delayed.len() - waiting.len();
                                if held > 0 {
                                    tracing::warn!(
                                        "stage `{stage}`: a config error, so its {held} other job(s) are not started \
                                         (they would fail the same way)"
                                    );
                                    report.held_back.push((stage.clone(), held, message.clone()));
                                }
                            }
                            if (deterministic(*cause) || repeat.is_some()) && (opts.fail_fast || jobs[i].exec.fail_fast)
                            {
                                report.ended_early.get_or_insert_with(|| {
                                    format!(
                                        "fail_fast: job {} ({}) failed ({})",
                                        jobs[i].id,
                                        jobs[i].stage,
                                        cause.as_str()
                                    )
                                });
                            }
                        }
                    }
                    let _ = ops_tx.send(StoreOp::Job(Box::new(r.record.clone())));
                    records[i] = r.record;
                    continue;
                }
            }
        }
        report.not_started = records.iter().filter(|r| r.status == JobStatus::Pending).count();
        standbys.close();
        drop(ops_tx);
        let written = writer.join().expect("the store writer does not panic");
        if report.disk_full.is_none() {
            if let Some(e) = health.failing() {
                report.disk_full = Some(format!("cannot write the store ({e})"));
            }
        }
        result.and(written.map_err(SchedError::from))
    })?;
    Ok(report)
}

fn jobs_exec_timeout(jobs: &[&Job], index: &HashMap<&str, usize>, id: &str) -> Option<Duration> {
    index.get(id).and_then(|&i| jobs[i].exec.timeout_ms).map(Duration::from_millis)
}

/// Moves the files a finished job left in its run folder (checkpoints, weights, samples) to
/// `attempt-N/` inside it, N its last attempt, so that running it again starts afresh and
/// keeps them.
fn set_aside_files(store: &dyn ResultStore, rec: &JobRecord) -> Result<(), SchedError> {
    let dir = store.run_dir(&rec.id);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
    let last = rec.attempts.last().map_or(0, |a| a.number);
    let to = dir.join(format!("attempt-{last}"));
    let io = |e: std::io::Error| {
        SchedError::Io(format!("cannot set aside the files of job {} in {}: {e}", rec.id, dir.display()))
    };
    for entry in entries {
        let entry = entry.map_err(io)?;
        if entry.file_type().map_err(io)?.is_file() {
            std::fs::create_dir_all(&to).map_err(io)?;
            std::fs::rename(entry.path(), to.join(entry.file_name())).map_err(io)?;
        }
    }
    Ok(())
}

fn new_record(plan: &Plan, job: &Job) -> JobRecord {
    JobRecord {
        id: job.id.to_string(),
        experiment: plan.name.clone(),
        stage: job.stage.clone(),
        seed: job.seed,
        config: job.config_json.clone(),
        point: job.point.clone(),
        selected: None,
        parents: job.parents.iter().map(|p| p.to_string()).collect(),
        status: JobStatus::Pending,
        attempts: Vec::new(),
        summary: BTreeMap::new(),
        provenance: Provenance::default(),
        artifacts: Vec::new(),
        warnings: Vec::new(),
    }
}

impl Running {
    fn new(held: Option<Held>, pid: u32, slurm_id: Option<String>, record: JobRecord) -> Self {
        Running {
            held,
            pid,
            slurm_id,
            started: Instant::now(),
            timed_out: false,
            asked_to_stop: false,
            record,
            terminal: None,
        }
    }
}

/// The file a Slurm job's worker writes its events to, per attempt (a later attempt never
/// writes into an earlier one's).
fn events_file(attempt: u32) -> String {
    format!("events-{attempt}.jsonl")
}

/// Has the watcher follow the Slurm job `id` running the latest attempt of `rec`, and reports it
/// started (`how`: what to add after its id, e.g. that it was re-attached).
#[allow(clippy::too_many_arguments)]
fn follow(
    s: &SlurmExec,
    watch: &Sender<slurm::Watched>,
    store: &dyn ResultStore,
    job: &Job,
    index: usize,
    rec: &JobRecord,
    id: &str,
    how: &str,
    observe: &mut dyn FnMut(Progress<'_>),
) {
    let attempt = rec.attempts.len() as u32;
    let watched = slurm::Watched {
        index,
        id: id.to_string(),
        events: store.run_dir(&rec.id).join(events_file(attempt)),
        output: s.output_path(id),
    };
    watch.send(watched).expect("the watcher runs until the run ends");
    observe(Progress::Started { job, device: &format!("Slurm job {id}{how}"), attempt, slurm_job: Some(id) });
}

/// What the worker of `job` is told.
fn request(store: &dyn ResultStore, job: &Job, rec: &JobRecord, lease: Lease, parents: &[ParentRef]) -> JobRequest {
    JobRequest {
        protocol: PROTOCOL_VERSION,
        job_id: job.id.to_string(),
        experiment: rec.experiment.clone(),
        stage: job.stage.clone(),
        seed: job.seed,
        config: job.config_json.clone(),
        lease,
        run_dir: store.run_dir(job.id.as_str()),
        plugins: job.plugins.clone(),
        checkpoint_every: job.exec.checkpoint_every_epochs,
        checkpoint_every_ms: job.exec.checkpoint_every_ms,
        checkpoint_every_steps: job.exec.checkpoint_every_steps,
        step_timeout_ms: Some(job.exec.step_timeout_ms),
        parents: parents.to_vec(),
    }
}

/// Jobs submitted together share their stage, GPU count and `deterministic`.
type SubmitKey = (String, u32, bool);

/// Who runs an attempt: a local worker process or a Slurm job.
enum Start {
    Pid(u32),
    Slurm(String),
}

/// Records a new attempt of `job`, started on `device`.
fn record_start(
    opts: &RunOptions,
    job: &Job,
    rec: &mut JobRecord,
    device: &str,
    threads: usize,
    by: Start,
    ops: &Sender<StoreOp>,
) {
    rec.status = JobStatus::Running;
    rec.summary.clear();
    rec.warnings.clear();
    rec.provenance.xlab_version = opts.xlab_version.clone();
    rec.provenance.git_commit = Some(opts.git_commit.clone());
    rec.provenance.device = Some(device.to_string());
    rec.provenance.threads = Some(if job.config.deterministic { 1 } else { threads });
    rec.provenance.plugins = job.plugins.clone();
    let (pid, slurm_job) = match by {
        Start::Pid(pid) => (Some(pid), None),
        Start::Slurm(id) => (None, Some(id)),
    };
    rec.attempts.push(Attempt {
        number: rec.attempts.len() as u32 + 1,
        started_unix: now_unix(),
        ended_unix: None,
        device: device.to_string(),
        pid,
        outcome: None,
        error: None,
        slurm_job,
        site: None,
    });
    let _ = ops.send(StoreOp::Job(Box::new(rec.clone())));
}

/// Writes the requests of jobs of one stage with the same resources and submits them with one
/// `sbatch`; their Slurm ids, in order.
fn submit(
    s: &SlurmExec,
    experiment: &str,
    stage: &str,
    gpus: u32,
    deterministic: bool,
    group: &[(usize, JobRequest)],
    records: &[JobRecord],
) -> Result<Vec<String>, SchedError> {
    let mut subs = Vec::with_capacity(group.len());
    for (i, req) in group {
        let request = spawn::write_request(req)
            .map_err(|e| SchedError::Submit(format!("cannot write the request of job {}: {e}", req.job_id)))?;
        let attempt = records[*i].attempts.len() as u32 + 1;
        subs.push(slurm::Submission {
            request,
            events: req.run_dir.join(events_file(attempt)),
            log: spawn::log_path(&req.run_dir),
            stage: stage.to_string(),
            gpus,
            deterministic,
        });
    }
    s.submit(experiment, &subs).map_err(SchedError::Submit)
}

fn on_event(job: &Job, r: &mut Running, e: Event, ops: &Sender<StoreOp>, observe: &mut dyn FnMut(Progress<'_>)) {
    match e {
        Event::Started { pid: _, device: _, libtorch, host } => {
            r.record.provenance.libtorch = Some(libtorch);
            r.record.provenance.host = Some(host);
            let _ = ops.send(StoreOp::Job(Box::new(r.record.clone())));
        }
        Event::Metrics { step, values } => {
            observe(Progress::Metrics { job, step, values: &values });
            let _ = ops.send(StoreOp::Metrics { job: job.id.to_string(), step, values });
        }
        Event::Resumed { epoch, step_in_epoch } => observe(Progress::Resumed { job, epoch, step_in_epoch }),
        Event::Checkpoint { epoch, path, step_in_epoch } => {
            let path = format!("runs/{}/{path}", job.id);
            r.record.artifacts.retain(|a| a.name != "checkpoint");
            let kind = match step_in_epoch {
                0 => format!("checkpoint after epoch {epoch}"),
                s => format!("checkpoint in epoch {}, after {s} batches", epoch + 1),
            };
            r.record.artifacts.push(ArtifactRecord { name: "checkpoint".into(), kind, path });
            let _ = ops.send(StoreOp::Job(Box::new(r.record.clone())));
        }
        Event::Artifact { name, path, kind } => {
            let path = format!("runs/{}/{path}", job.id);
            r.record.artifacts.retain(|a| a.name != name);
            r.record.artifacts.push(ArtifactRecord { name, kind, path });
        }
        Event::Warning { message } => {
            observe(Progress::Warning { job, message: &message });
            if !r.record.warnings.contains(&message) {
                r.record.warnings.push(message);
            }
        }
        Event::Finished { summary } => r.terminal = Some(Ok(summary)),
        Event::Failed { cause, message } => r.terminal = Some(Err((cause, message))),
    }
}

/// Settles a job whose worker exited: its own final event if it sent one, else a classified
/// crash with the end of its log.
fn finish(
    r: &mut Running,
    exit: Exit,
    store: &dyn ResultStore,
    timeout_ms: Option<u64>,
) -> Result<BTreeMap<String, f64>, (FailureCause, String)> {
    let log = || log_tail(&spawn::log_path(&store.run_dir(&r.record.id)), 5);
    // Where the worker was: its step and plugin call, from the progress file it left.
    let progress = || xlab_proto::progress::Progress::read(&store.run_dir(&r.record.id));
    let mut site: Option<FaultSite> = None;
    let with_log =
        |what: String, tail: String| if tail.is_empty() { what } else { format!("{what}; its log ends:\n{tail}") };
    let terminal = r.terminal.take();
    let outcome = if r.timed_out {
        Err((
            FailureCause::Timeout,
            format!("ran past its timeout of {} s and was killed", timeout_ms.unwrap_or(0) as f64 / 1000.0),
        ))
    } else {
        match (terminal, exit) {
            (Some(Ok(summary)), Exit::Process(Ok(s))) if s.success() => Ok(summary),
            (Some(Ok(summary)), Exit::Slurm { .. }) => Ok(summary),
            // SIGTERM from Slurm (scancel, time limit, preemption) makes the worker stop at a
            // checkpoint and say it was stopped; Slurm's state says why.
            (Some(Err((FailureCause::Cancelled, m))), Exit::Slurm { id, state, .. })
                if matches!(state.as_deref(), Some("COMPLETED" | "FAILED")) =>
            {
                // The worker was signalled but the job was not cancelled: it ended on its own.
                // That is Slurm's `--signal=B:TERM@T`, sent T seconds before the time limit (or
                // `scancel --batch --signal=TERM` by hand).
                Err((
                    FailureCause::Timeout,
                    format!("Slurm job {id} was signalled to stop before its time limit (`--signal`) and {m}"),
                ))
            }
            (Some(Err((FailureCause::Cancelled, _))) | None, Exit::Slurm { id, state, note }) => {
                let (cause, what) = slurm::classify(state.as_deref(), &note);
                Err((cause, with_log(format!("Slurm job {id} {what}"), log())))
            }
            (Some(Err((FailureCause::Hung, m))), _) => {
                let p = progress();
                site = Some(FaultSite {
                    signal: None,
                    step: p.as_ref().and_then(|p| p.step),
                    call: p.and_then(|p| p.call),
                });
                Err((FailureCause::Hung, m))
            }
            (Some(Err(f)), _) => Err(f),
            (_, Exit::Process(Err(e))) => Err((FailureCause::Crashed, format!("lost the worker: {e}"))),
            (_, Exit::Process(Ok(s))) if r.asked_to_stop && s.signal() == Some(libc::SIGTERM) => {
                Err((FailureCause::Cancelled, "stopped while it was starting, before its first epoch".into()))
            }
            (_, Exit::Process(Ok(s))) => {
                let p = progress();
                let at = p.as_ref().map(|p| format!(" {}", p.describe())).unwrap_or_default();
                let what = match s.signal() {
                    Some(sig) => format!("worker killed by signal {}{at}", signal_name(sig)),
                    None => format!("worker exited with {s} without a final report{at}"),
                };
                site = Some(FaultSite {
                    signal: s.signal(),
                    step: p.as_ref().and_then(|p| p.step),
                    call: p.and_then(|p| p.call),
                });
                Err((FailureCause::Crashed, with_log(what, log())))
            }
        }
    };
    let attempt = r.record.attempts.last_mut().expect("a started job has an attempt");
    attempt.ended_unix = Some(now_unix());
    attempt.site = site;
    match &outcome {
        Ok(summary) => {
            r.record.status = JobStatus::Done;
            r.record.summary = summary.clone();
            attempt.outcome = Some("done".into());
        }
        Err((cause, message)) => {
            r.record.status = JobStatus::Failed;
            attempt.outcome = Some(cause.as_str().into());
            attempt.error = Some(message.clone());
        }
    }
    outcome
}

fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
