//! The scheduler loop: decide what to run, place ready jobs on free slots, turn worker events
//! into store writes.

use crate::disk;
use crate::hub::Peers;
use crate::machine::{need_of, Action, Ending, Flow, Machine, Outcome, Settings, Start, StartFailure, Told};
use crate::pool::{Slot, Slots};
use crate::slurm::{self, SlurmExec};
use crate::spawn::{self, Exit, Msg};
use crate::writer::{self, StoreOp};
use crossbeam_channel::{unbounded, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xlab_plan::{Job, Plan};
use xlab_proto::{Event, FailureCause, JobRequest, Lease, ParentRef, PROTOCOL_VERSION};
use xlab_store::{now_unix, ExperimentRecord, FaultSite, JobRecord, JobStatus, Provenance, ResultStore, StageRecord};

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
    /// The local slots jobs run on (not used when `slurm` is set): this run's own, or those of
    /// the run that owns the store, shared with it (see [`crate::hub`]).
    pub pool: Box<dyn Slots>,
    /// The other runs on the store, when it is shared: jobs another run holds are waited for,
    /// and the owner's stop requests are followed.
    pub peers: Option<Arc<dyn Peers>>,
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
        /// The finished job (the same training with fewer epochs) whose checkpoint it
        /// continues, when not its own.
        from_job: Option<String>,
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
    /// Another run on the store runs the job: this run waits for it, and then reports it as
    /// `Finished` or `Failed`.
    Elsewhere {
        job: &'a Job,
    },
    /// The stage's search decided about trial `job` (recorded in the store already).
    Search {
        job: &'a Job,
        decision: &'a xlab_store::Decision,
    },
    /// A search's trial stopped at its rung, at a checkpoint, with its metric there.
    Paused {
        job: &'a Job,
        epoch: u64,
        value: f64,
    },
}

#[derive(Debug, Default)]
pub struct RunReport {
    pub total: usize,
    pub skipped: usize,
    pub done: usize,
    /// Jobs another run on the store ran to the end while this one waited for them.
    pub elsewhere: usize,
    /// Search trials pruned in this run.
    pub pruned: usize,
    /// What each search stage did.
    pub searches: Vec<crate::search::SearchSummary>,
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

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this process started and has not reaped yet (its reader thread
    // reaps it only after it exits), so the pid cannot name another process.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Checks that the pool can hold every stage's jobs (`resources:`): a device of the asked kind
/// with the asked number of slots. Says which stage asks for what, and what the pool has.
pub fn check_placement(plan: &Plan, pool: &dyn Slots) -> Result<(), String> {
    for stage in &plan.stages {
        let Some(job) = stage.jobs.first() else { continue };
        let need = need_of(job);
        let Some(why) = pool.never_fits(need) else { continue };
        let kind = match need.kind {
            _ if need.gpus > 0 => "whole GPU(s)",
            xlab_plan::file::DeviceKind::Any => "any device",
            xlab_plan::file::DeviceKind::Cpu => "the CPU",
            xlab_plan::file::DeviceKind::Cuda => "a GPU",
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

/// Runs every job of the plan that the store does not hold as done: the process and Slurm side
/// of the scheduler. What to run, when and what each outcome means is decided by
/// [`Machine`]; this loop feeds it the time, stop requests, room on the disk and what workers
/// report, and carries out its actions.
pub fn run(
    store: &dyn ResultStore,
    plan: &Plan,
    opts: RunOptions,
    observe: &mut dyn FnMut(Progress<'_>),
) -> Result<RunReport, SchedError> {
    // A TPE search's trials so far are the jobs it proposed (and recorded) in earlier runs.
    let proposed;
    let plan = if plan.stages.iter().any(|s| s.template.is_some()) {
        proposed = with_proposed_trials(store, plan)?;
        &proposed
    } else {
        plan
    };
    let jobs: Vec<&Job> = plan.jobs().collect();
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

    let mut stored: Vec<JobRecord> = Vec::with_capacity(jobs.len());
    for job in &jobs {
        stored.push(match store.job(job.id.as_str())? {
            Some(r) => r,
            None => new_record(plan, job),
        });
    }
    if opts.slurm.is_none() {
        // Running a job here while Slurm still runs it would have two workers write one run
        // folder. Checked for every job before any record changes: a refused run leaves the
        // store as it found it, and the Slurm run re-attaches to all of its jobs.
        let mut listed: Option<Option<std::collections::HashMap<String, slurm::QueueEntry>>> = None;
        for rec in stored.iter().filter(|r| r.status != JobStatus::Done || opts.rerun.contains(r.id.as_str())) {
            let Some(id) = rec.in_slurm() else { continue };
            let queue = listed.get_or_insert_with(|| slurm::queue().ok());
            if queue.as_ref().and_then(|q| q.get(id)).is_some_and(|e| !e.ended()) {
                return Err(SchedError::StillInSlurm {
                    job: rec.id.clone(),
                    stage: rec.stage.clone(),
                    slurm: id.to_string(),
                });
            }
        }
    }

    // On a store shared with other runs, the jobs this run is to run are claimed; those another
    // run holds are waited for, and their records left as that run writes them.
    let mut elsewhere: Vec<usize> = Vec::new();
    if let Some(peers) = &opts.peers {
        let wanted: Vec<String> = stored
            .iter()
            .filter(|r| r.status != JobStatus::Done || opts.rerun.contains(r.id.as_str()))
            .map(|r| r.id.clone())
            .collect();
        let held: std::collections::HashSet<String> = peers
            .claim(&wanted)
            .map_err(|e| SchedError::Io(format!("cannot claim jobs from the owner: {e}")))?
            .into_iter()
            .collect();
        elsewhere = jobs.iter().enumerate().filter(|(_, j)| held.contains(j.id.as_str())).map(|(i, _)| i).collect();
    }
    let held_elsewhere: std::collections::HashSet<usize> = elsewhere.iter().copied().collect();

    let mut records: Vec<JobRecord> = Vec::with_capacity(jobs.len());
    // Jobs an earlier run left in Slurm: (index, Slurm id), followed again rather than resubmitted.
    let mut reattach: Vec<(usize, String)> = Vec::new();
    for ((i, job), mut rec) in jobs.iter().enumerate().zip(stored) {
        if held_elsewhere.contains(&i) {
            records.push(rec);
            continue;
        }
        if rec.status == JobStatus::Done && opts.rerun.contains(job.id.as_str()) {
            set_aside_files(store, &rec)?;
            rec.status = JobStatus::Pending;
            rec.summary.clear();
            rec.artifacts.clear();
        }
        if rec.status != JobStatus::Done {
            if let (Some(id), Some(_)) = (rec.in_slurm(), &opts.slurm) {
                reattach.push((i, id.to_string()));
                records.push(rec);
                continue;
            }
            if rec.status == JobStatus::Running {
                // We hold the store's lock (or, on a shared store, the job's claim), so whoever
                // ran it is gone.
                rec.status = JobStatus::Interrupted;
                if let Some(a) = rec.attempts.last_mut().filter(|a| a.ended_unix.is_none()) {
                    a.outcome = Some("interrupted".into());
                }
            }
            rec.point = job.point.clone();
            rec.experiment = plan.name.clone();
            store.put_job(&rec)?;
        }
        records.push(rec);
    }
    store.flush()?;
    let settings = Settings {
        slurm: opts.slurm.is_some(),
        cap: opts.max_parallel.or(plan.max_parallel.map(|m| m as usize)).unwrap_or(usize::MAX),
        fail_fast: opts.fail_fast,
        xlab_version: opts.xlab_version.clone(),
        git_commit: opts.git_commit.clone(),
        pool: opts.pool,
    };
    // The trials searches propose as this run goes on.
    let born = typed_arena::Arena::new();
    let mut m = Machine::new(plan, records, &reattach, &elsewhere, settings, Instant::now());
    // Each search stage's state, as recorded: its decisions and its trials' metric series.
    let mut history = HashMap::new();
    for stage in &plan.stages {
        let Some(search) = &stage.search else { continue };
        let decisions = store.decisions(&plan.name, &stage.name)?;
        let mut series = HashMap::new();
        if !decisions.is_empty() {
            for (i, job) in jobs.iter().enumerate().filter(|(_, j)| j.stage == stage.name) {
                series.insert(i, store.metric_series(job.id.as_str(), &search.metric)?);
            }
        }
        history.insert(stage.name.clone(), (decisions, series));
    }
    m.with_searches(plan, history, &born);
    let experiment = std::cell::RefCell::new(record);
    let peers = opts.peers.clone();
    let mut peer_stops = 0usize;
    let mut owner_gone = false;
    let mut last_look = Instant::now();
    // When this run last asked the other runs (once per tick: a joined run asks through the
    // owner's socket, and workers' events can arrive thousands of times a second).
    let mut last_tick: Option<Instant> = None;

    let (ops_tx, ops_rx) = unbounded::<StoreOp>();
    let (tx, rx) = unbounded::<Msg>();
    let health = writer::Health::default();
    let busy = writer::Busy::default();
    let writer_done = std::sync::atomic::AtomicBool::new(false);
    let mut room = disk::Room::new(store.dir());
    let report = std::thread::scope(|scope| {
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
        let carry = |m: &mut Machine<'_>, observe: &mut dyn FnMut(Progress<'_>)| {
            let mut decided = false;
            for action in m.drain() {
                match action {
                    Action::Save(rec) => {
                        let _ = ops_tx.send(StoreOp::Job(rec));
                    }
                    Action::Metrics { job, step, values } => {
                        observe(Progress::Metrics { job: m.job(job), step, values: &values });
                        let _ = ops_tx.send(StoreOp::Metrics { job: m.job(job).id.to_string(), step, values });
                    }
                    Action::Signal { pid, signal: sig } => signal(pid, sig),
                    Action::Cancel { job, slurm } => {
                        let attempt = m.record(job).attempts.len() as u32;
                        let events = store.run_dir(m.job(job).id.as_str()).join(events_file(attempt));
                        opts.slurm.as_ref().expect("only Slurm jobs are cancelled").stop_job(&slurm, &events);
                    }
                    Action::Tell(told) => tell(m, told, observe),
                    Action::NewJob(i) => {
                        // The stage's jobs as recorded grow with each trial proposed.
                        let job = m.job(i);
                        let mut record = experiment.borrow_mut();
                        if let Some(s) = record.stages.iter_mut().find(|s| s.name == job.stage) {
                            s.jobs.push(job.id.to_string());
                        }
                        if let Err(e) = store.put_experiment(&record) {
                            tracing::error!("cannot record the new trial {} of stage `{}`: {e}", job.id, job.stage);
                        }
                    }
                    Action::Decide(d) => {
                        decided = true;
                        if let Err(e) = store.put_decision(&d) {
                            tracing::error!("cannot record a decision of the search of stage `{}`: {e}", d.stage);
                        }
                    }
                }
            }
            // Durable before any decision is acted on (the caller starts jobs after this): a run
            // started again after a kill rebuilds the search from them and never contradicts one.
            if decided {
                if let Err(e) = store.flush() {
                    tracing::error!("cannot make the search's decisions durable: {e}");
                }
            }
        };
        carry(&mut m, observe);
        // One worker per slot starts loading libtorch now; each job started takes one and
        // starts a replacement while work remains.
        let mut standbys = spawn::Standbys::new(&opts.worker, store.dir().join("standby.log"));
        if opts.slurm.is_none() && m.more_to_start() {
            for i in 0..m.pool().len() {
                let (lease, visible) = spawn::lease_for(&m.pool().slot(i));
                let key = spawn::WorkerKey { visible, threads: lease.threads, deterministic: false };
                standbys.fill(&key);
            }
        }
        // Slurm jobs are followed by a watcher thread: their event files and the queue.
        let (watch_tx, watch_rx) = unbounded::<slurm::Watched>();
        if let Some(s) = &opts.slurm {
            let (tx, poll) = (tx.clone(), s.poll());
            scope.spawn(move || slurm::watch(watch_rx, tx, poll));
            for (i, id) in &reattach {
                follow(s, &watch_tx, store, m.job(*i), *i, m.record(*i), id, " (re-attached)", observe);
            }
        }
        let mut result = Ok(());
        // Under a cap on the user's queued Slurm jobs: until when ready jobs wait for room.
        let mut held_back: Option<Instant> = None;
        loop {
            if let Some(p) = peers.as_ref().filter(|_| last_tick.is_none_or(|t| t.elapsed() >= TICK)) {
                last_tick = Some(Instant::now());
                look_at_peers(&mut m, &**p, store, &mut peer_stops, &mut last_look);
                if !owner_gone && p.owner_gone() {
                    // Nothing this run does can be recorded any more: its workers stop at once,
                    // and each job resumes from its last checkpoint when the command runs again.
                    owner_gone = true;
                    result = Err(SchedError::Io(
                        "the run that owned the store went away (killed, or its machine went down), so this run \
                         stopped too\n  hint: run the same command again to resume; each job resumes from its last \
                         checkpoint"
                            .into(),
                    ));
                    if m.running_count() == 0 {
                        break;
                    }
                    tracing::error!(
                        "the run that owns this store went away: stopping this run's {} worker(s) at once",
                        m.running_count()
                    );
                }
                carry(&mut m, observe);
            }
            let stops = opts.stop.load(Ordering::SeqCst).max(peer_stops).max(if owner_gone { 2 } else { 0 });
            let mut shortage = |running: usize| {
                health.failing().map(|e| format!("cannot write the store ({e})")).or_else(|| room.short(running))
            };
            let flow = m.tick(Instant::now(), stops, &mut shortage);
            carry(&mut m, observe);
            if flow == Flow::Detach {
                break;
            }
            // Slurm, when the user's queued jobs are capped: how many may go in now.
            let mut queue_room: Option<usize> = None;
            if let (Some(s), true) = (&opts.slurm, m.has_ready()) {
                if held_back.is_some_and(|until| Instant::now() < until) {
                    queue_room = Some(0);
                } else if let Some(free) = s.room() {
                    let free = free.unwrap_or_else(|e| {
                        tracing::warn!(
                            "cannot count your jobs in Slurm's queue ({e}); submitting nothing until it answers"
                        );
                        0
                    });
                    // Each place in the queue takes a pack of jobs.
                    queue_room = Some(free * s.pack());
                    if free == 0 {
                        if held_back.is_none() {
                            let (cap, from) = s.limits().max_submit.clone().unwrap_or_default();
                            tracing::info!(
                                "{} job(s) ready, held back: {cap} of your jobs are in Slurm's queue, as many as {from} allows; \
                                 they go in as jobs leave it",
                                m.ready_count()
                            );
                        }
                        held_back = Some(Instant::now() + s.poll());
                    } else {
                        held_back = None;
                    }
                }
            }
            // Slurm: the jobs placed in this round, submitted together below.
            let mut to_submit: Vec<(usize, JobRequest)> = Vec::new();
            loop {
                if queue_room.is_some_and(|r| to_submit.len() >= r) {
                    break;
                }
                let Some((i, held)) = m.next_start(Instant::now()) else { break };
                // A search's decision to run this job is recorded before the job starts.
                carry(&mut m, observe);
                let parents: Vec<ParentRef> = m
                    .inputs(i)
                    .into_iter()
                    .map(|p| ParentRef {
                        job_id: p.to_string(),
                        run_dir: store.run_dir(p.as_str()),
                        config: m.job(m.index_of(p.as_str()).expect("a parent in the plan")).config_json.clone(),
                    })
                    .collect();
                let Some(held) = held else {
                    let s = opts.slurm.as_ref().expect("only Slurm places jobs without slots");
                    let gpus = s.gpus_for(m.job(i));
                    let lease =
                        Lease { device: if gpus > 0 { "cuda:0" } else { "cpu" }.into(), threads: s.cpus() as usize };
                    to_submit.push((i, request(store, m.job(i), m.record(i), lease, &parents, m.pause_at(i))));
                    continue;
                };
                let slot = Slot {
                    device: held.device.clone(),
                    threads: held.slots.iter().map(|&s| m.pool().slot(s).threads).sum(),
                };
                let (lease, visible) = spawn::lease_for(&slot);
                let req = request(store, m.job(i), m.record(i), lease, &parents, m.pause_at(i));
                let key = spawn::WorkerKey {
                    visible,
                    threads: req.lease.threads,
                    deterministic: m.job(i).config.deterministic,
                };
                let pid = match standbys.hand_over(&key, &req, i, &tx) {
                    Some(pid) => Ok(pid),
                    None => spawn::spawn(&opts.worker, &req, &key, i, tx.clone()),
                };
                match pid {
                    Ok(pid) => {
                        m.started(i, Some(held), &slot.device, key.threads_used(), Start::Pid(pid), Instant::now());
                        // The next job of this kind finds a worker that has loaded libtorch.
                        if m.more_to_start() {
                            standbys.fill(&key);
                        }
                    }
                    Err(error) if disk::is_full(&error) => {
                        // Its request could not be written: the job waits for room.
                        let why = StartFailure::DiskFull(room.describe_now(m.running_count()));
                        m.start_failed(i, &held, why);
                    }
                    Err(error) => {
                        m.start_failed(i, &held, StartFailure::Other);
                        result = Err(SchedError::Spawn { worker: opts.worker.clone(), error });
                    }
                }
                carry(&mut m, observe);
            }
            if let (Some(s), false) = (&opts.slurm, to_submit.is_empty()) {
                // One `sbatch` per stage and resources: a job array when several are ready.
                let mut groups: Vec<(SubmitKey, Vec<(usize, JobRequest)>)> = Vec::new();
                for (i, req) in to_submit {
                    let key = (m.job(i).stage.clone(), s.gpus_for(m.job(i)), m.job(i).config.deterministic);
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, g)) => g.push((i, req)),
                        None => groups.push((key, vec![(i, req)])),
                    }
                }
                for ((stage, gpus, deterministic), group) in groups {
                    let submitted = if result.is_ok() {
                        submit(s, &plan.name, &stage, gpus, deterministic, &group, &m)
                    } else {
                        Err((Vec::new(), SchedError::Submit("an earlier submission failed".into())))
                    };
                    let ids = match submitted {
                        Ok(ids) => ids,
                        Err((ids, e)) => {
                            // The arrays submitted before the refusal run; the rest start no more.
                            m.submit_failed(&group[ids.len()..].iter().map(|(i, _)| *i).collect::<Vec<_>>());
                            if result.is_ok() {
                                result = Err(e);
                            }
                            ids
                        }
                    };
                    for ((i, req), id) in group.into_iter().zip(ids) {
                        let (device, threads) = (&req.lease.device, req.lease.threads);
                        m.started(i, None, device, threads, Start::Slurm(id.clone()), Instant::now());
                        follow(s, &watch_tx, store, m.job(i), i, m.record(i), &id, "", observe);
                    }
                    carry(&mut m, observe);
                }
            }
            if m.finished() {
                break;
            }
            if m.can_start_now() && queue_room != Some(0) {
                continue;
            }
            let first = match rx.recv_timeout(TICK) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => unreachable!("the loop holds a sender"),
            };
            // What else has arrived is taken in before anything starts, so that jobs that end
            // together (a Slurm array cancelled before it started) are submitted again together.
            for msg in std::iter::once(first).chain(rx.try_iter().take(MESSAGES_PER_ROUND)) {
                match msg {
                    Msg::Event(i, e) => {
                        if let Event::Checkpoint { path, .. } = &e {
                            room.saw_checkpoint(&store.run_dir(m.job(i).id.as_str()).join(path));
                        }
                        m.worker_event(i, e);
                    }
                    Msg::Noise(i, line) => tracing::warn!(job = %m.job(i).id, "worker wrote a non-event line: {line}"),
                    Msg::Exited(i, status) => {
                        let run_dir = store.run_dir(m.job(i).id.as_str());
                        let timeout_ms = m.job(i).exec.timeout_ms;
                        m.exited(
                            i,
                            Instant::now(),
                            |ending| classify(ending, status, &run_dir, timeout_ms),
                            |running| room.describe_now(running),
                        );
                    }
                }
                carry(&mut m, observe);
            }
        }
        let mut report = m.into_report();
        standbys.close();
        drop(ops_tx);
        let written = writer.join().expect("the store writer does not panic");
        if report.disk_full.is_none() {
            if let Some(e) = health.failing() {
                report.disk_full = Some(format!("cannot write the store ({e})"));
            }
        }
        result.and(written.map_err(SchedError::from)).map(|()| report)
    })?;
    Ok(report)
}

/// The plan with the trials its TPE searches proposed so far, recorded as `suggest` decisions,
/// in the order they were proposed.
pub fn with_proposed_trials(store: &dyn ResultStore, plan: &Plan) -> Result<Plan, SchedError> {
    let mut out = plan.clone();
    for stage in out.stages.iter_mut().filter(|s| s.template.is_some()) {
        let mut decisions = store.decisions(&plan.name, &stage.name)?;
        decisions.sort_by_key(|d| d.seq);
        let mut ids = std::collections::HashSet::new();
        for d in decisions.iter().filter(|d| d.kind == xlab_store::DecisionKind::Suggest) {
            let point: Vec<(String, serde_json::Value)> = d.params.clone().unwrap_or_default().into_iter().collect();
            let job = plan.make_trial(&stage.name, &point).map_err(|e| {
                SchedError::Io(format!(
                    "cannot make again the trial {} that the search of stage `{}` proposed: {e}",
                    d.trial, stage.name
                ))
            })?;
            if ids.insert(job.id.clone()) {
                stage.jobs.push(job);
            }
        }
    }
    Ok(out)
}

/// On a shared store: passes on the owner's stop requests, takes the waited-for jobs that other
/// runs let go, and looks (twice a second) whether those they ran are done.
fn look_at_peers(
    m: &mut Machine<'_>,
    peers: &dyn Peers,
    store: &dyn ResultStore,
    stops: &mut usize,
    last_look: &mut Instant,
) {
    let waiting: Vec<usize> = m.waited_for();
    let ids: Vec<String> = waiting.iter().map(|&i| m.job(i).id.to_string()).collect();
    let Ok(tick) = peers.tick(&ids) else { return };
    *stops = tick.stops;
    let read = |id: &str| store.job(id).ok().flatten();
    for id in &tick.released {
        if let (Some(i), Some(rec)) = (m.index_of(id), read(id)) {
            m.seen_elsewhere(i, rec, true);
        }
    }
    if waiting.is_empty() || last_look.elapsed() < Duration::from_millis(500) {
        return;
    }
    *last_look = Instant::now();
    let still: Vec<&str> = m.waited_for().iter().map(|&i| m.job(i).id.as_str()).collect();
    if let Ok(recs) = store.jobs_by_id(&still) {
        for rec in recs.into_iter().flatten() {
            if matches!(rec.status, JobStatus::Done | JobStatus::Failed) {
                if let Some(i) = m.index_of(&rec.id) {
                    m.seen_elsewhere(i, rec, false);
                }
            }
        }
    }
}

/// Shows what the machine told, with the job it is about.
fn tell(m: &Machine<'_>, told: Told, observe: &mut dyn FnMut(Progress<'_>)) {
    match told {
        Told::Skipped { job } => observe(Progress::Skipped { job: m.job(job) }),
        Told::Started { job, device, attempt } => {
            observe(Progress::Started { job: m.job(job), device: &device, attempt, slurm_job: None })
        }
        Told::Resumed { job, epoch, step_in_epoch, from_job } => {
            observe(Progress::Resumed { job: m.job(job), epoch, step_in_epoch, from_job })
        }
        Told::Finished { job, summary } => observe(Progress::Finished { job: m.job(job), summary: &summary }),
        Told::Failed { job, cause, message } => observe(Progress::Failed { job: m.job(job), cause, message: &message }),
        Told::Retrying { job, cause, message, delay } => {
            observe(Progress::Retrying { job: m.job(job), cause, message: &message, delay })
        }
        Told::Warning { job, message } => observe(Progress::Warning { job: m.job(job), message: &message }),
        Told::Stopped { job, message } => observe(Progress::Stopped { job: m.job(job), message: &message }),
        Told::Elsewhere { job } => observe(Progress::Elsewhere { job: m.job(job) }),
        Told::Search { job, decision } => observe(Progress::Search { job: m.job(job), decision: &decision }),
        Told::Paused { job, epoch, value } => observe(Progress::Paused { job: m.job(job), epoch, value }),
    }
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

pub(crate) fn new_record(plan: &Plan, job: &Job) -> JobRecord {
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
fn request(
    store: &dyn ResultStore,
    job: &Job,
    rec: &JobRecord,
    lease: Lease,
    parents: &[ParentRef],
    pause_after_epoch: Option<u64>,
) -> JobRequest {
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
        pause_after_epoch,
        keep_weights: job.exec.keep_weights.clone(),
        continue_from: extended(store, job),
    }
}

/// The finished job with the most epochs among those this one extends exactly
/// (`Job::extends`) whose checkpoint after its last epoch is still there.
fn extended(store: &dyn ResultStore, job: &Job) -> Option<xlab_proto::ContinueFrom> {
    let shorter = job.extends();
    if shorter.is_empty() {
        return None;
    }
    let ids: Vec<&str> = shorter.iter().map(|(_, id)| id.as_str()).collect();
    let records = store.jobs_by_id(&ids).ok()?;
    shorter.iter().zip(records).find_map(|((epochs, id), rec)| {
        let run_dir = store.run_dir(id.as_str());
        let done = rec.is_some_and(|r| r.status == JobStatus::Done);
        let point = xlab_proto::artifacts::CheckpointPoint { epoch: u64::from(*epochs), step: 0 };
        let kept = run_dir.join(format!("{}.json", point.stem())).is_file();
        (done && kept).then(|| xlab_proto::ContinueFrom { job_id: id.to_string(), run_dir, epoch: u64::from(*epochs) })
    })
}

/// At most this many more messages from workers are taken in after one, before the loop looks
/// at what to start again.
const MESSAGES_PER_ROUND: usize = 256;

/// Jobs submitted together share their stage, GPU count and `deterministic`.
type SubmitKey = (String, u32, bool);

/// Writes the requests of jobs of one stage with the same resources and submits them with one
/// `sbatch`; their Slurm ids, in order.
fn submit(
    s: &SlurmExec,
    experiment: &str,
    stage: &str,
    gpus: u32,
    deterministic: bool,
    group: &[(usize, JobRequest)],
    m: &Machine<'_>,
) -> Result<Vec<String>, (Vec<String>, SchedError)> {
    let mut subs = Vec::with_capacity(group.len());
    for (i, req) in group {
        let request = spawn::write_request(req).map_err(|e| {
            (Vec::new(), SchedError::Submit(format!("cannot write the request of job {}: {e}", req.job_id)))
        })?;
        let attempt = m.record(*i).attempts.len() as u32 + 1;
        subs.push(slurm::Submission {
            request,
            events: req.run_dir.join(events_file(attempt)),
            log: spawn::log_path(&req.run_dir),
            stage: stage.to_string(),
            gpus,
            deterministic,
        });
    }
    s.submit(experiment, &subs).map_err(|(ids, e)| (ids, SchedError::Submit(e)))
}

/// How a job's worker ended: its own final event if it sent one, else a classified crash with
/// the end of its log; and, for a crash or hang, where the worker was (its step and plugin call,
/// from the progress file it left in `run_dir`).
fn classify(
    ending: Ending,
    exit: Exit,
    run_dir: &std::path::Path,
    timeout_ms: Option<u64>,
) -> (Outcome, Option<FaultSite>) {
    let log = || log_tail(&spawn::log_path(run_dir), 5);
    let progress = || xlab_proto::progress::Progress::read(run_dir);
    let mut site: Option<FaultSite> = None;
    let with_log =
        |what: String, tail: String| if tail.is_empty() { what } else { format!("{what}; its log ends:\n{tail}") };
    let terminal = ending.terminal;
    let outcome = if ending.timed_out {
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
            (None, Exit::Slurm { id, state, note, started: false, .. }) => {
                let how = match state.as_deref() {
                    // It waited in Slurm's queue, or in its pack for a lane.
                    Some("CANCELLED") => "was cancelled".to_string(),
                    Some(s) => format!("ended as {s}"),
                    None => "left Slurm's queue".to_string(),
                };
                let said = if note.is_empty() { String::new() } else { format!(" (Slurm says: {note})") };
                Err((FailureCause::NotStarted, format!("Slurm job {id} {how} before it started{said}")))
            }
            // A packed job's worker that ended on its own while its allocation ran on.
            (None, Exit::Slurm { id, state: None, worker: Some(how), .. }) => Err((
                FailureCause::Crashed,
                with_log(format!("its worker in Slurm job {id} {how} without a final report"), log()),
            )),
            (Some(Err((FailureCause::Cancelled, _))) | None, Exit::Slurm { id, state, note, .. }) => {
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
            (_, Exit::Process(Ok(s))) if ending.asked_to_stop && s.signal() == Some(libc::SIGTERM) => {
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
    (outcome, site)
}

fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
