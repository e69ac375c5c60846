//! The scheduler's decisions as a state machine: which jobs are ready, which starts next and on
//! which slots, what a worker's event or exit means for its record, retries and their delays,
//! stop requests, timeouts, config errors that hold a stage back, `fail_fast` and a full disk.
//!
//! It starts no process, touches no store or file and reads no clock. Inputs arrive as method
//! calls that carry the time; what to do leaves as [`Action`]s (save a record, send a signal,
//! tell the user), which `run` carries out for local workers and Slurm jobs alike. Every
//! transition is unit-tested below without a process.

use crate::pool::{Held, Need, Slots};
use crate::run::RunReport;
use crate::search::{Asha, Next};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};
use xlab_plan::{Job, JobId, Plan};
use xlab_proto::{Event, FailureCause};
use xlab_store::{now_unix, ArtifactRecord, Attempt, Decision, FaultSite, JobRecord, JobStatus};

/// A worker's final word: its summary, or why it failed.
pub(crate) type Outcome = Result<BTreeMap<String, f64>, (FailureCause, String)>;

/// Something for the caller to do, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write this record to the store.
    Save(Box<JobRecord>),
    /// Store a metrics row of job `job` (and show it).
    Metrics { job: usize, step: u64, values: BTreeMap<String, f64> },
    /// Send `signal` to a local worker.
    Signal { pid: u32, signal: i32 },
    /// Stop job `job`, which runs in Slurm job `slurm` (alone, or in a pack).
    Cancel { job: usize, slurm: String },
    /// Tell whoever displays progress.
    Tell(Told),
    /// Record a search's decision, durably, before anything acts on it.
    Decide(Box<Decision>),
    /// A search proposed job `0` (a new trial, appended to the jobs): record it with its
    /// stage's jobs.
    NewJob(usize),
}

/// What happened to job `job` (an index into the plan's jobs), for the progress display.
#[derive(Debug)]
pub(crate) enum Told {
    Skipped {
        job: usize,
    },
    Started {
        job: usize,
        device: String,
        attempt: u32,
    },
    Resumed {
        job: usize,
        epoch: u64,
        step_in_epoch: u64,
        /// The finished job whose checkpoint it continues, when not its own.
        from_job: Option<String>,
    },
    Finished {
        job: usize,
        summary: BTreeMap<String, f64>,
    },
    Failed {
        job: usize,
        cause: FailureCause,
        message: String,
    },
    Retrying {
        job: usize,
        cause: FailureCause,
        message: String,
        delay: Duration,
    },
    Warning {
        job: usize,
        message: String,
    },
    Stopped {
        job: usize,
        message: String,
    },
    /// Another run on the store holds the job: this run waits for it.
    Elsewhere {
        job: usize,
    },
    /// A search decided about trial `job`.
    Search {
        job: usize,
        decision: Box<Decision>,
    },
    /// Trial `job` paused at its rung, with its metric there.
    Paused {
        job: usize,
        epoch: u64,
        value: f64,
    },
}

/// What the store recorded of one search stage: its decisions, and per trial (job index) the
/// series of the search metric.
pub(crate) type SearchHistory = (Vec<Decision>, HashMap<usize, Vec<(u64, f64)>>);

/// Who runs an attempt: a local worker process or a Slurm job.
pub(crate) enum Start {
    Pid(u32),
    Slurm(String),
}

/// Why a job placed on slots could not start.
pub(crate) enum StartFailure {
    /// Its request could not be written for want of room (described): it waits for room.
    DiskFull(String),
    /// Anything else: the run starts no more jobs.
    Other,
}

/// Whether the run goes on after a tick.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Go,
    /// Stopped with jobs left running in Slurm, for the next run to re-attach to.
    Detach,
}

/// What the machine knows about a running attempt, handed to whoever classifies its end.
#[derive(Debug, Default)]
pub(crate) struct Ending {
    pub timed_out: bool,
    /// Sent SIGTERM on a stop request: a worker still starting up (before its handler is in
    /// place) dies of it, having done nothing that could be lost.
    pub asked_to_stop: bool,
    /// The worker's own final event, if it sent one.
    pub terminal: Option<Outcome>,
}

struct Running {
    /// The pool slots it holds (several with `resources: {slots: N}`), all of one device, and
    /// the memory it reserved there; none for a Slurm job.
    held: Option<Held>,
    pid: u32,
    /// The Slurm job running it, once submitted.
    slurm_id: Option<String>,
    started: Instant,
    ending: Ending,
}

/// What every attempt records about the coordinator that started it.
pub(crate) struct Settings {
    pub pool: Box<dyn Slots>,
    pub slurm: bool,
    /// At most this many jobs at once.
    pub cap: usize,
    pub fail_fast: bool,
    pub xlab_version: String,
    pub git_commit: String,
}

pub(crate) struct Machine<'p> {
    jobs: Vec<&'p Job>,
    /// Where the jobs a search proposes as it runs live, and the plan that makes them.
    born: Option<(&'p Plan, &'p typed_arena::Arena<Job>)>,
    index: HashMap<&'p str, usize>,
    records: Vec<JobRecord>,
    /// Jobs whose parents have not all finished.
    waiting: Vec<usize>,
    /// Ready jobs, in the order they became ready.
    queue: VecDeque<usize>,
    /// Retries waiting for their delay.
    delayed: Vec<(Instant, usize)>,
    running: HashMap<usize, Running>,
    /// Attempts made in this run, per job.
    attempts_here: HashMap<usize, u32>,
    /// Slurm jobs of this run, per job, that left the queue before they started.
    unstarted_here: HashMap<usize, u32>,
    /// The device a job ran out of memory on, avoided by its next attempt.
    avoid: HashMap<usize, String>,
    /// Jobs another run on the store holds: waited for, then taken as they are (done or
    /// failed), or run here if that run let them go unfinished.
    elsewhere: Vec<usize>,
    /// The stages' adaptive searches, and the search of each of their trials.
    searches: Vec<Asha>,
    search_of: HashMap<usize, usize>,
    /// Stop requests acted on so far.
    signalled: usize,
    settings: Settings,
    pub(crate) report: RunReport,
    actions: Vec<Action>,
}

/// How many times in one run a job's Slurm job may leave the queue before it starts and be
/// submitted again.
const NOT_STARTED_LIMIT: u32 = 3;

/// Failures another attempt may cure.
fn retryable(cause: FailureCause) -> bool {
    matches!(cause, FailureCause::Crashed | FailureCause::OutOfMemory | FailureCause::Timeout | FailureCause::Hung)
}

/// Failures that repeat when the same job runs again.
fn deterministic(cause: FailureCause) -> bool {
    matches!(cause, FailureCause::Config | FailureCause::Diverged | FailureCause::Error)
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

/// What a job takes from the pool.
pub(crate) fn need_of(job: &Job) -> Need {
    Need {
        slots: job.exec.slots as usize,
        kind: job.exec.device,
        memory_mib: job.exec.memory_mib,
        gpus: job.exec.gpus as usize,
    }
}

/// Marks the attempt in progress as interrupted (it resumes from its last checkpoint).
fn interrupt(rec: &mut JobRecord) {
    rec.status = JobStatus::Interrupted;
    if let Some(a) = rec.attempts.last_mut() {
        a.outcome = Some("interrupted".into());
    }
}

impl<'p> Machine<'p> {
    /// Starts from the store's records of the plan's jobs (one per job, in plan order); jobs in
    /// `reattach` are still running in Slurm under the given ids and are followed, not started.
    /// Jobs in `elsewhere` are held by another run on the store and are waited for.
    pub(crate) fn new(
        plan: &'p Plan,
        records: Vec<JobRecord>,
        reattach: &[(usize, String)],
        elsewhere: &[usize],
        settings: Settings,
        now: Instant,
    ) -> Self {
        let jobs: Vec<&Job> = plan.jobs().collect();
        assert_eq!(jobs.len(), records.len(), "one record per job");
        let index = jobs.iter().enumerate().map(|(i, j)| (j.id.as_str(), i)).collect();
        let elsewhere: std::collections::HashSet<usize> = elsewhere.iter().copied().collect();
        let mut m = Machine {
            report: RunReport { total: jobs.len(), ..Default::default() },
            jobs,
            born: None,
            index,
            records,
            waiting: Vec::new(),
            queue: VecDeque::new(),
            delayed: Vec::new(),
            running: HashMap::new(),
            attempts_here: HashMap::new(),
            unstarted_here: HashMap::new(),
            avoid: HashMap::new(),
            elsewhere: Vec::new(),
            searches: Vec::new(),
            search_of: HashMap::new(),
            signalled: 0,
            settings,
            actions: Vec::new(),
        };
        for i in 0..m.jobs.len() {
            if let Some((_, id)) = reattach.iter().find(|(r, _)| *r == i) {
                m.running.insert(
                    i,
                    Running { held: None, pid: 0, slurm_id: Some(id.clone()), started: now, ending: Ending::default() },
                );
            } else if m.records[i].status == JobStatus::Done {
                m.report.skipped += 1;
                m.actions.push(Action::Tell(Told::Skipped { job: i }));
            } else if elsewhere.contains(&i) {
                m.elsewhere.push(i);
                m.actions.push(Action::Tell(Told::Elsewhere { job: i }));
            } else {
                m.waiting.push(i);
            }
        }
        m
    }

    /// The actions decided since the last call, in order.
    pub(crate) fn drain(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    pub(crate) fn record(&self, i: usize) -> &JobRecord {
        &self.records[i]
    }

    /// Job `i`: of the plan, or proposed by a search as it ran.
    pub(crate) fn job(&self, i: usize) -> &'p Job {
        self.jobs[i]
    }

    pub(crate) fn pool(&self) -> &dyn Slots {
        &*self.settings.pool
    }

    /// Sets up the searches of the plan's `search:` stages from what the store recorded of them:
    /// per stage, its decisions and each trial's series of the search metric (by job index).
    /// The trials a search proposes as it runs (TPE) are made by `plan` and kept in `born`.
    pub(crate) fn with_searches(
        &mut self,
        plan: &'p Plan,
        mut history: HashMap<String, SearchHistory>,
        born: &'p typed_arena::Arena<Job>,
    ) {
        self.born = Some((plan, born));
        for stage in &plan.stages {
            let Some(spec) = &stage.search else { continue };
            let trials: Vec<usize> = (0..self.jobs.len()).filter(|&i| self.jobs[i].stage == stage.name).collect();
            let (decisions, series) = history.remove(&stage.name).unwrap_or_default();
            let hyperband = spec.algorithm == xlab_plan::file::Algorithm::Hyperband;
            let seq = std::rc::Rc::new(std::cell::Cell::new(0));
            for (skipped, members) in spec.brackets(trials.len()) {
                let members: Vec<usize> = members.iter().map(|&k| trials[k]).collect();
                let points: Vec<(usize, &[(String, serde_json::Value)])> =
                    members.iter().map(|&t| (t, self.jobs[t].point.as_slice())).collect();
                // Each bracket is an ASHA over its trials, from its first rung.
                let mut bracket = spec.clone();
                bracket.algorithm = xlab_plan::file::Algorithm::Asha;
                bracket.rungs = spec.rungs[skipped..].to_vec();
                let mut a = Asha::new(&plan.name, &stage.name, bracket, members.clone())
                    .in_bracket(hyperband.then_some(skipped as u32), seq.clone())
                    .proposing(&points);
                let records = &self.records;
                let index = &self.index;
                let (now, prune) = a.rebuild(&decisions, &series, &|t| records[t].status == JobStatus::Done, &|id| {
                    index.get(id).copied()
                });
                self.waiting.retain(|t| !a.has_started(*t));
                for t in now {
                    self.queue.push_back(t);
                }
                for t in prune {
                    if self.records[t].status != JobStatus::Pruned {
                        self.records[t].status = JobStatus::Pruned;
                        self.actions.push(Action::Save(Box::new(self.records[t].clone())));
                    }
                }
                let si = self.searches.len();
                for t in members {
                    self.search_of.insert(t, si);
                }
                self.searches.push(a);
            }
        }
    }

    /// The epoch job `i` pauses after (a search's trial heading for a rung below the top).
    pub(crate) fn pause_at(&self, i: usize) -> Option<u64> {
        self.search_of.get(&i).and_then(|&s| self.searches[s].pause_at(i))
    }

    /// Search trials that became ready go to their search, which decides when they start.
    fn sift_searches(&mut self) {
        if self.searches.is_empty() {
            return;
        }
        let (searches, search_of) = (&mut self.searches, &self.search_of);
        self.queue.retain(|t| match search_of.get(t) {
            Some(&s) if !searches[s].is_heading(*t) => {
                searches[s].ready(*t);
                false
            }
            _ => true,
        });
    }

    /// Gives each search with nothing queued its next trial (a promotion or a new one),
    /// recording the decision first; then prunes what a settled search leaves paused.
    fn feed_searches(&mut self) {
        for s in 0..self.searches.len() {
            let queued = self.queue.iter().any(|t| self.search_of.get(t) == Some(&s));
            if queued || self.report.ended_early.is_some() {
                continue;
            }
            // A proposal becomes a new trial, which is then started.
            for _ in 0..2 {
                let jobs = &self.jobs;
                match self.searches[s].next(&|t: usize| jobs[t].id.to_string()) {
                    Some(Next::Run(t, d)) => {
                        self.actions.push(Action::Decide(Box::new(d.clone())));
                        self.actions.push(Action::Tell(Told::Search { job: t, decision: Box::new(d) }));
                        self.queue.push_back(t);
                        break;
                    }
                    Some(proposal @ Next::Propose { .. }) => {
                        if !self.make_trial(s, proposal) {
                            break;
                        }
                    }
                    None => break,
                }
            }
        }
        self.settle_searches();
    }

    /// Makes search `s`'s proposal a new job, drawing again while it repeats a job of the plan;
    /// whether a trial was made.
    fn make_trial(&mut self, s: usize, mut proposal: Next) -> bool {
        let Some((plan, born)) = self.born else { return false };
        loop {
            let Next::Propose { point, params, based_on, attempt } = proposal else { return false };
            let search = &mut self.searches[s];
            match plan.make_trial(&search.stage, &point) {
                Ok(job) if self.index.contains_key(job.id.as_str()) => match search.propose(attempt + 1) {
                    Some(again) => proposal = again,
                    None => {
                        search.exhausted();
                        return false;
                    }
                },
                Ok(job) => {
                    let job: &'p Job = born.alloc(job);
                    let i = self.jobs.len();
                    self.jobs.push(job);
                    self.index.insert(job.id.as_str(), i);
                    self.records.push(crate::run::new_record(plan, job));
                    self.search_of.insert(i, s);
                    self.report.total += 1;
                    let d = search.proposed(i, job.id.as_str(), &job.point, params, based_on);
                    search.ready(i);
                    self.actions.push(Action::Decide(Box::new(d.clone())));
                    self.actions.push(Action::NewJob(i));
                    self.actions.push(Action::Save(Box::new(self.records[i].clone())));
                    self.actions.push(Action::Tell(Told::Search { job: i, decision: Box::new(d) }));
                    return true;
                }
                Err(e) => {
                    let m = format!("the search cannot make its next trial: {e}");
                    tracing::error!("stage `{}`: {m}", search.stage);
                    search.broken = Some(m);
                    return false;
                }
            }
        }
    }

    fn settle_searches(&mut self) {
        if self.report.ended_early.is_some() {
            return;
        }
        for s in 0..self.searches.len() {
            let jobs = &self.jobs;
            for (t, d) in self.searches[s].settle(&|t: usize| jobs[t].id.to_string()) {
                self.actions.push(Action::Decide(Box::new(d.clone())));
                self.records[t].status = JobStatus::Pruned;
                self.report.pruned += 1;
                self.actions.push(Action::Save(Box::new(self.records[t].clone())));
                self.actions.push(Action::Tell(Told::Search { job: t, decision: Box::new(d) }));
            }
        }
    }

    /// The jobs another run holds, which this one waits for.
    pub(crate) fn waited_for(&self) -> Vec<usize> {
        self.elsewhere.clone()
    }

    /// Job `i`, which another run held, as that run left it (`rec`, read from the store):
    /// done or failed, it counts as such here; else `taken` says whether this run now holds it
    /// (the other let it go), and it runs here.
    pub(crate) fn seen_elsewhere(&mut self, i: usize, mut rec: JobRecord, taken: bool) {
        if !self.elsewhere.contains(&i) {
            return;
        }
        match rec.status {
            JobStatus::Done => {
                self.elsewhere.retain(|&e| e != i);
                self.report.elsewhere += 1;
                self.actions.push(Action::Tell(Told::Finished { job: i, summary: rec.summary.clone() }));
                self.records[i] = rec;
            }
            JobStatus::Failed => {
                self.elsewhere.retain(|&e| e != i);
                let message = rec.attempts.last().and_then(|a| a.error.clone()).unwrap_or_default();
                let cause = rec
                    .attempts
                    .last()
                    .and_then(|a| a.outcome.as_deref())
                    .and_then(FailureCause::parse)
                    .unwrap_or(FailureCause::Error);
                self.report.failed.push((self.jobs[i].id.to_string(), cause, message.clone()));
                self.actions.push(Action::Tell(Told::Failed { job: i, cause, message }));
                self.records[i] = rec;
            }
            _ if taken => {
                self.elsewhere.retain(|&e| e != i);
                if rec.status == JobStatus::Running {
                    // The run that held it let it go: it is not running any more.
                    interrupt(&mut rec);
                }
                self.records[i] = rec;
                self.actions.push(Action::Save(Box::new(self.records[i].clone())));
                self.waiting.push(i);
            }
            _ => {}
        }
    }

    pub(crate) fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Whether jobs remain that have not started: a worker kept on standby will be used.
    pub(crate) fn more_to_start(&self) -> bool {
        !self.queue.is_empty() || !self.waiting.is_empty() || !self.delayed.is_empty()
    }

    /// The parents job `i` consumes: all of them, or the one its `select: best` picked.
    pub(crate) fn inputs(&self, i: usize) -> Vec<&'p JobId> {
        let picked = self.records[i].selected.as_deref();
        self.jobs[i].parents.iter().filter(|p| picked.is_none_or(|c| c == p.as_str())).collect()
    }

    /// The job `id`'s index, if it is in the plan.
    pub(crate) fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// One turn of the loop at time `now`, `stops` stop requests received so far: releases
    /// ready jobs (and fails those a failed parent blocks), acts on stop requests and timeouts,
    /// moves due retries to the queue and checks for room (`shortage(running)`: why no job may
    /// start now, if so; asked only while jobs are ready).
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        stops: usize,
        shortage: &mut dyn FnMut(usize) -> Option<String>,
    ) -> Flow {
        self.release_all();
        self.sift_searches();
        self.settle_searches();
        if stops >= 1 && self.settings.slurm {
            // Slurm jobs do not need this process: leave them running, recorded as such, for
            // the next run to re-attach to.
            tracing::warn!(
                "stopping: no new jobs; {} job(s) keep running in Slurm, and the same command re-attaches to them \
                 (`scancel` stops them)",
                self.running.len()
            );
            self.report.ended_early.get_or_insert_with(|| "stopped by request".into());
            self.report.detached = self.running.len();
            return Flow::Detach;
        }
        if stops >= 1 && self.signalled < 1 {
            self.signalled = 1;
            tracing::warn!(
                "stopping: no new jobs; {} running job(s) stop at their next epoch end (or `checkpoint.every_steps` step), after a checkpoint \
                 (press Ctrl-C again to kill them at once)",
                self.running.len()
            );
            self.report.ended_early.get_or_insert_with(|| "stopped by request".into());
            for r in self.running.values_mut() {
                r.ending.asked_to_stop = true;
                self.actions.push(Action::Signal { pid: r.pid, signal: libc::SIGTERM });
            }
        }
        if stops >= 2 && self.signalled < 2 {
            self.signalled = 2;
            tracing::warn!(
                "killing {} running worker(s); their jobs resume from their last checkpoint",
                self.running.len()
            );
            for r in self.running.values() {
                self.actions.push(Action::Signal { pid: r.pid, signal: libc::SIGKILL });
            }
        }
        for (&i, r) in self.running.iter_mut() {
            let limit = self.jobs[i].exec.timeout_ms.map(Duration::from_millis);
            if !r.ending.timed_out && limit.is_some_and(|l| now.saturating_duration_since(r.started) > l) {
                r.ending.timed_out = true;
                self.actions.push(match &r.slurm_id {
                    Some(id) => Action::Cancel { job: i, slurm: id.clone() },
                    None => Action::Signal { pid: r.pid, signal: libc::SIGKILL },
                });
            }
        }
        if self.report.ended_early.is_some() {
            self.queue.clear();
            self.delayed.clear();
        }
        let queue = &mut self.queue;
        self.delayed.retain(|&(due, i)| {
            if due <= now {
                queue.push_back(i);
                false
            } else {
                true
            }
        });
        // No new job while the store cannot be written or its disk lacks room for one;
        // running jobs go on, and jobs start again once there is room.
        let short = if self.queue.is_empty() { None } else { shortage(self.running.len()) };
        match (&short, &self.report.disk_full) {
            (Some(m), None) => tracing::warn!(
                "{m}\n  starting no more jobs until there is room; {} running job(s) go on",
                self.running.len()
            ),
            (None, Some(_)) if !self.queue.is_empty() => {
                tracing::info!("there is room on the disk again; starting jobs")
            }
            _ => {}
        }
        if short.is_some() || !self.queue.is_empty() {
            self.report.disk_full = short;
        }
        if self.report.disk_full.is_some() && self.running.is_empty() && self.report.ended_early.is_none() {
            self.report.ended_early = self.report.disk_full.clone();
            self.queue.clear();
            self.delayed.clear();
        }
        Flow::Go
    }

    /// Releases what became ready until nothing changes; fails (without running) what a failed
    /// parent blocks.
    fn release_all(&mut self) {
        loop {
            let blocked = self.release();
            if blocked.is_empty() {
                return;
            }
            for (i, cause, message) in blocked {
                let rec = &mut self.records[i];
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
                self.actions.push(Action::Save(Box::new(rec.clone())));
                self.report.failed.push((self.jobs[i].id.to_string(), cause, message.clone()));
                self.actions.push(Action::Tell(Told::Failed { job: i, cause, message }));
                if let Some(&s) = self.search_of.get(&i) {
                    self.searches[s].blocked(i);
                }
            }
        }
    }

    /// Jobs run in DAG order: a job is ready once all its parents are done. A `select: best`
    /// job waits for all its candidates to finish (done or failed), then picks among the done.
    /// Returns the jobs a failed parent blocks.
    fn release(&mut self) -> Vec<(usize, FailureCause, String)> {
        let mut blocked = Vec::new();
        let mut picks: Vec<(usize, String)> = Vec::new();
        let (jobs, index, records, queue) = (&self.jobs, &self.index, &self.records, &mut self.queue);
        self.waiting.retain(|&i| {
            let parents: Vec<&JobRecord> = jobs[i].parents.iter().map(|p| &records[index[p.as_str()]]).collect();
            if let Some(pick) = &jobs[i].pick {
                if !parents.iter().all(|p| matches!(p.status, JobStatus::Done | JobStatus::Failed | JobStatus::Pruned))
                {
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
            } else if let Some(p) = parents.iter().find(|p| p.status == JobStatus::Pruned) {
                let m = format!("parent job {} ({}) was pruned by its stage's search", p.id, p.stage);
                blocked.push((i, FailureCause::ParentFailed, m));
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
            self.records[i].selected = Some(id);
        }
        blocked
    }

    /// The next ready job to start, and the slots it takes (none under Slurm, whose queue
    /// holds what its nodes cannot run yet): highest stage priority, then plan order,
    /// skipping stages at their `max_parallel` and jobs whose slots are not free now. The
    /// caller starts it and answers with [`Machine::started`] or [`Machine::start_failed`].
    pub(crate) fn next_start(&mut self, now: Instant) -> Option<(usize, Option<Held>)> {
        let slurm = self.settings.slurm;
        if self.report.disk_full.is_some() || self.running.len() >= self.settings.cap {
            return None;
        }
        if !slurm && self.settings.pool.free() == 0 {
            self.want_best();
            return None;
        }
        self.feed_searches();
        let busy = |stage: &str| self.running.keys().filter(|&&r| self.jobs[r].stage == stage).count();
        let mut ready: Vec<(usize, usize)> = self
            .queue
            .iter()
            .enumerate()
            .filter(|(_, &i)| self.jobs[i].exec.max_parallel.is_none_or(|m| busy(&self.jobs[i].stage) < m as usize))
            .map(|(at, &i)| (at, i))
            .collect();
        ready.sort_by_key(|&(_, i)| (std::cmp::Reverse(self.jobs[i].exec.priority), i));
        let found = ready.iter().find_map(|&(at, i)| {
            if slurm {
                return Some((at, None));
            }
            let avoid = self.avoid.get(&i).map(String::as_str);
            self.settings
                .pool
                .take(need_of(self.jobs[i]), avoid, self.jobs[i].exec.priority)
                .map(|held| (at, Some(held)))
        });
        let Some((at, held)) = found else {
            if let Some(&(_, i)) = ready.first() {
                self.settings.pool.wanting(need_of(self.jobs[i]), self.jobs[i].exec.priority);
            }
            return None;
        };
        let i = self.queue.remove(at).expect("an index into the queue");
        if slurm {
            // Holds its place under `max_parallel` until submitted.
            self.running
                .insert(i, Running { held: None, pid: 0, slurm_id: None, started: now, ending: Ending::default() });
        }
        Some((i, held))
    }

    /// Tells a shared pool that this run's best ready job waits for room.
    fn want_best(&mut self) {
        let best = self.queue.iter().copied().max_by_key(|&i| (self.jobs[i].exec.priority, std::cmp::Reverse(i)));
        if let Some(i) = best {
            self.settings.pool.wanting(need_of(self.jobs[i]), self.jobs[i].exec.priority);
        }
    }

    /// Job `i`, placed by [`Machine::next_start`], started on `device` with `threads` threads:
    /// records a new attempt.
    pub(crate) fn started(
        &mut self,
        i: usize,
        held: Option<Held>,
        device: &str,
        threads: usize,
        by: Start,
        now: Instant,
    ) {
        let job = self.jobs[i];
        let rec = &mut self.records[i];
        rec.status = JobStatus::Running;
        rec.summary.clear();
        rec.warnings.clear();
        rec.provenance.xlab_version = self.settings.xlab_version.clone();
        rec.provenance.git_commit = Some(self.settings.git_commit.clone());
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
            slurm_job: slurm_job.clone(),
            site: None,
        });
        let attempt = rec.attempts.len() as u32;
        self.actions.push(Action::Save(Box::new(rec.clone())));
        if slurm_job.is_none() {
            self.actions.push(Action::Tell(Told::Started { job: i, device: device.to_string(), attempt }));
        }
        self.running.insert(
            i,
            Running { held, pid: pid.unwrap_or(0), slurm_id: slurm_job, started: now, ending: Ending::default() },
        );
    }

    /// Job `i`, placed on `held`, could not start.
    pub(crate) fn start_failed(&mut self, i: usize, held: &Held, why: StartFailure) {
        self.settings.pool.give_back(held);
        match why {
            StartFailure::DiskFull(describe) => {
                tracing::warn!(
                    "cannot start job {}: {describe}\n  starting no more jobs until there is room",
                    self.jobs[i].id
                );
                self.queue.push_front(i);
                self.report.disk_full = Some(describe);
            }
            StartFailure::Other => self.queue.clear(),
        }
    }

    /// Slurm refused the submission of these placed jobs: the run starts no more.
    pub(crate) fn submit_failed(&mut self, jobs: &[usize]) {
        for i in jobs {
            self.running.remove(i);
        }
        self.queue.clear();
    }

    /// An event from the worker of running job `i`.
    pub(crate) fn worker_event(&mut self, i: usize, e: Event) {
        let job = self.jobs[i];
        let r = self.running.get_mut(&i).expect("an event from a running job");
        let rec = &mut self.records[i];
        match e {
            Event::Started { pid: _, device: _, libtorch, host, machine } => {
                rec.provenance.libtorch = Some(libtorch);
                rec.provenance.host = Some(host);
                rec.provenance.machine = machine;
                self.actions.push(Action::Save(Box::new(rec.clone())));
            }
            Event::Metrics { step, values } => {
                if let Some(&s) = self.search_of.get(&i) {
                    self.searches[s].saw(i, step, &values);
                }
                self.actions.push(Action::Metrics { job: i, step, values })
            }
            Event::Resumed { epoch, step_in_epoch, from_job } => {
                if let Some(from) = &from_job {
                    rec.provenance.continued_from = Some(xlab_store::ContinuedFrom { job: from.clone(), epoch });
                    self.actions.push(Action::Save(Box::new(rec.clone())));
                }
                self.actions.push(Action::Tell(Told::Resumed { job: i, epoch, step_in_epoch, from_job }))
            }
            Event::Checkpoint { epoch, path, step_in_epoch } => {
                let path = format!("runs/{}/{path}", job.id);
                rec.artifacts.retain(|a| a.name != "checkpoint");
                let kind = match step_in_epoch {
                    0 => format!("checkpoint after epoch {epoch}"),
                    s => format!("checkpoint in epoch {}, after {s} batches", epoch + 1),
                };
                rec.artifacts.push(ArtifactRecord { name: "checkpoint".into(), kind, path });
                self.actions.push(Action::Save(Box::new(rec.clone())));
            }
            Event::Artifact { name, path, kind } => {
                let path = format!("runs/{}/{path}", job.id);
                rec.artifacts.retain(|a| a.name != name);
                rec.artifacts.push(ArtifactRecord { name, kind, path });
            }
            Event::Warning { message } => {
                if !rec.warnings.contains(&message) {
                    rec.warnings.push(message.clone());
                }
                self.actions.push(Action::Tell(Told::Warning { job: i, message }));
            }
            Event::Finished { summary } => r.ending.terminal = Some(Ok(summary)),
            Event::Failed { cause, message } => r.ending.terminal = Some(Err((cause, message))),
        }
    }

    /// The worker of job `i` ended. `classify` turns what the machine knows of the attempt
    /// into its outcome and, for a crash or hang, where it happened; `room(running)` describes
    /// the disk when the job could not write for want of room.
    pub(crate) fn exited(
        &mut self,
        i: usize,
        now: Instant,
        classify: impl FnOnce(Ending) -> (Outcome, Option<FaultSite>),
        room: impl FnOnce(usize) -> String,
    ) {
        let r = self.running.remove(&i).expect("the exit of a running job");
        if let Some(held) = &r.held {
            self.settings.pool.give_back(held);
        }
        let (mut outcome, site) = classify(r.ending);
        let job = self.jobs[i];
        let rec = &mut self.records[i];
        let attempt = rec.attempts.last_mut().expect("a started job has an attempt");
        attempt.ended_unix = Some(now_unix());
        attempt.site = site;
        match &outcome {
            Ok(summary) => {
                rec.status = JobStatus::Done;
                rec.summary = summary.clone();
                attempt.outcome = Some("done".into());
            }
            Err((cause, message)) => {
                rec.status = JobStatus::Failed;
                attempt.outcome = Some(cause.as_str().into());
                attempt.error = Some(message.clone());
            }
        }
        // A crash or hang that repeats the previous attempt's is not worth another.
        let repeat = match &mut outcome {
            Err((c, message)) if retryable(*c) => repeated_fault(rec).inspect(|more| {
                message.push_str(more);
                if let Some(a) = rec.attempts.last_mut() {
                    a.error = Some(message.clone());
                }
            }),
            _ => None,
        };
        let tries = self.attempts_here.entry(i).or_insert(0);
        if !matches!(outcome, Err((FailureCause::NotStarted | FailureCause::Preempted, _))) {
            *tries += 1;
        }
        let tries = *tries;
        let search = self.search_of.get(&i).copied();
        match outcome {
            Ok(summary) => {
                self.report.done += 1;
                if let Some(s) = search {
                    self.searches[s].finished(i);
                }
                self.actions.push(Action::Tell(Told::Finished { job: i, summary }));
            }
            Err((FailureCause::Paused, message)) => match search.map(|s| (s, self.searches[s].paused(i))) {
                Some((_, Ok((epoch, value)))) => {
                    rec.status = JobStatus::Paused;
                    if let Some(a) = rec.attempts.last_mut() {
                        a.error = None;
                    }
                    self.actions.push(Action::Tell(Told::Paused { job: i, epoch, value }));
                }
                Some((s, Err(m))) => {
                    rec.status = JobStatus::Failed;
                    if let Some(a) = rec.attempts.last_mut() {
                        a.outcome = Some(FailureCause::Config.as_str().into());
                        a.error = Some(m.clone());
                    }
                    self.searches[s].failed(i);
                    self.searches[s].broken = Some(m.clone());
                    self.report.failed.push((job.id.to_string(), FailureCause::Config, m.clone()));
                    self.actions.push(Action::Tell(Told::Failed { job: i, cause: FailureCause::Config, message: m }));
                }
                None => {
                    let m = format!("paused although it is not a search's trial: {message}");
                    rec.status = JobStatus::Failed;
                    self.report.failed.push((job.id.to_string(), FailureCause::Error, m.clone()));
                    self.actions.push(Action::Tell(Told::Failed { job: i, cause: FailureCause::Error, message: m }));
                }
            },
            Err((cause @ (FailureCause::NotStarted | FailureCause::Preempted), message)) => {
                // Nothing is lost and `retries:` is untouched: a job that never started goes back
                // in with the others that are ready, a preempted one resumes from the checkpoint
                // it wrote on Slurm's signal. A job Slurm keeps dropping before it starts is a
                // failure, so the run cannot loop on it.
                let unstarted = match cause {
                    FailureCause::NotStarted => {
                        let n = self.unstarted_here.entry(i).or_insert(0);
                        *n += 1;
                        *n
                    }
                    _ => 0,
                };
                if self.signalled > 0 || self.report.ended_early.is_some() {
                    rec.status = JobStatus::Interrupted;
                    self.report.stopped += 1;
                    let next = match cause {
                        FailureCause::NotStarted => "submits it again",
                        _ => "resumes it from its last checkpoint",
                    };
                    let message = format!("{message}; the next `xlab run` {next}");
                    self.actions.push(Action::Tell(Told::Stopped { job: i, message }));
                } else if unstarted <= NOT_STARTED_LIMIT {
                    rec.status = JobStatus::Pending;
                    self.delayed.push((now, i));
                    self.actions.push(Action::Tell(Told::Retrying { job: i, cause, message, delay: Duration::ZERO }));
                } else {
                    let message = format!(
                        "{message}; its Slurm jobs left the queue before starting {unstarted} times in this run, so it \
                         is not submitted again (`squeue`'s reason and the cluster's limits say why; `xlab doctor` \
                         shows them)"
                    );
                    if let Some(a) = rec.attempts.last_mut() {
                        a.error = Some(message.clone());
                    }
                    let cause = FailureCause::Crashed;
                    rec.status = JobStatus::Failed;
                    if let Some(s) = search {
                        self.searches[s].failed(i);
                    }
                    self.report.failed.push((job.id.to_string(), cause, message.clone()));
                    self.actions.push(Action::Tell(Told::Failed { job: i, cause, message }));
                }
            }
            Err((FailureCause::Cancelled, message)) => {
                rec.status = JobStatus::Interrupted;
                self.report.stopped += 1;
                self.actions.push(Action::Tell(Told::Stopped { job: i, message }));
            }
            Err((_, message)) if crate::disk::says_full(&message) => {
                // The job could not write (a checkpoint, its samples): it resumes from its last
                // good checkpoint once there is room; no more jobs start.
                interrupt(rec);
                self.report.stopped += 1;
                self.report.disk_full.get_or_insert_with(|| room(self.running.len()));
                self.actions.push(Action::Tell(Told::Stopped { job: i, message }));
            }
            Err((_, message)) if self.signalled >= 2 => {
                // Killed on the second stop request: interrupted, not failed.
                interrupt(rec);
                self.report.stopped += 1;
                self.actions.push(Action::Tell(Told::Stopped { job: i, message }));
            }
            Err((cause, message))
                if retryable(cause)
                    && tries <= job.exec.retries
                    && self.report.ended_early.is_none()
                    && repeat.is_none() =>
            {
                // 1 s, 2 s, 4 s, … up to a minute; after running out of memory, try another
                // device if there is one.
                let delay = Duration::from_secs(1u64 << (tries - 1).min(6)).min(Duration::from_secs(60));
                rec.status = JobStatus::Pending;
                if let (FailureCause::OutOfMemory, Some(held)) = (cause, &r.held) {
                    self.avoid.insert(i, held.device.clone());
                }
                self.delayed.push((now + delay, i));
                self.actions.push(Action::Tell(Told::Retrying { job: i, cause, message, delay }));
            }
            Err((cause, message)) => {
                if let Some(s) = search {
                    self.searches[s].failed(i);
                }
                self.report.failed.push((job.id.to_string(), cause, message.clone()));
                self.actions.push(Action::Tell(Told::Failed { job: i, cause, message: message.clone() }));
                if cause == FailureCause::Config {
                    self.hold_back_stage(&job.stage, &message);
                }
                if (deterministic(cause) || repeat.is_some()) && (self.settings.fail_fast || job.exec.fail_fast) {
                    self.report.ended_early.get_or_insert_with(|| {
                        format!("fail_fast: job {} ({}) failed ({})", job.id, job.stage, cause.as_str())
                    });
                }
            }
        }
        self.actions.push(Action::Save(Box::new(self.records[i].clone())));
        self.settle_searches();
    }

    /// A config error: the stage's other jobs share its config and would fail the same way.
    /// They stay pending, to run once the file is fixed.
    fn hold_back_stage(&mut self, stage: &str, message: &str) {
        let jobs = &self.jobs;
        let before = self.queue.len() + self.delayed.len() + self.waiting.len();
        self.queue.retain(|&q| jobs[q].stage != stage);
        self.delayed.retain(|(_, q)| jobs[*q].stage != stage);
        self.waiting.retain(|&q| jobs[q].stage != stage);
        let held = before - self.queue.len() - self.delayed.len() - self.waiting.len();
        if held > 0 {
            tracing::warn!(
                "stage `{stage}`: a config error, so its {held} other job(s) are not started (they would fail the same way)"
            );
            self.report.held_back.push((stage.to_string(), held, message.to_string()));
        }
    }

    /// Nothing runs and nothing more will start.
    pub(crate) fn finished(&self) -> bool {
        self.running.is_empty()
            && self.queue.is_empty()
            && (self.delayed.is_empty() || self.report.ended_early.is_some())
            && (self.elsewhere.is_empty() || self.report.ended_early.is_some())
    }

    /// Whether a job is ready to start.
    pub(crate) fn has_ready(&self) -> bool {
        !self.queue.is_empty()
    }

    /// How many jobs are ready to start.
    pub(crate) fn ready_count(&self) -> usize {
        self.queue.len()
    }

    /// Nothing runs, yet a ready job could start at once: no reason to wait for a message.
    pub(crate) fn can_start_now(&self) -> bool {
        self.running.is_empty() && !self.queue.is_empty() && self.settings.pool.free() > 0
    }

    /// The run's report, with the jobs that never started counted.
    pub(crate) fn into_report(mut self) -> RunReport {
        self.report.not_started = self.records.iter().filter(|r| r.status == JobStatus::Pending).count();
        self.report.searches = self.searches.iter().map(Asha::summary).collect();
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use crate::run::new_record;
    use std::path::Path;
    use xlab_proto::plugins::Registry;

    /// Built-in components only: no plugin library is needed to plan these.
    const DEFAULTS: &str = "name: t\ndefaults:\n  task: train\n  data: {name: two_moons}\n  model: {name: mlp}\n  \
                            optimizer: {name: sgd, lr: 0.1}\n  epochs: 1\nstages:\n";

    fn plan(stages: &str) -> Plan {
        let text = format!("{DEFAULTS}{stages}");
        xlab_plan::load_str(Path::new("t.yaml"), &text, &mut Registry::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn settings(slots: usize) -> Settings {
        Settings {
            pool: Box::new(Pool::cpu(slots, 1)),
            slurm: false,
            cap: usize::MAX,
            fail_fast: false,
            xlab_version: "test".into(),
            git_commit: "c0ffee".into(),
        }
    }

    fn machine(plan: &Plan, slots: usize, t0: Instant) -> Machine<'_> {
        let records = plan.jobs().map(|j| new_record(plan, j)).collect();
        Machine::new(plan, records, &[], &[], settings(slots), t0)
    }

    fn no_shortage(_: usize) -> Option<String> {
        None
    }

    /// A tick, then starts what can start (worker pid 1000 + index); the started indices.
    fn turn(m: &mut Machine<'_>, now: Instant) -> Vec<usize> {
        assert_eq!(m.tick(now, 0, &mut no_shortage), Flow::Go);
        start_all(m, now)
    }

    fn start_all(m: &mut Machine<'_>, now: Instant) -> Vec<usize> {
        let mut started = Vec::new();
        while let Some((i, held)) = m.next_start(now) {
            m.started(i, held, "cpu", 1, Start::Pid(1000 + i as u32), now);
            started.push(i);
        }
        started
    }

    fn end(m: &mut Machine<'_>, i: usize, now: Instant, outcome: Outcome, site: Option<FaultSite>) {
        m.exited(i, now, |_| (outcome, site), |_| "the disk is full".into());
    }

    fn done(m: &mut Machine<'_>, i: usize, now: Instant, acc: f64) {
        end(m, i, now, Ok(BTreeMap::from([("val.acc".to_string(), acc)])), None);
    }

    fn crash(step: u64) -> (Outcome, Option<FaultSite>) {
        let site = FaultSite { signal: Some(libc::SIGSEGV), step: Some(step), call: None };
        (Err((FailureCause::Crashed, "worker killed by signal 11 (SIGSEGV)".into())), Some(site))
    }

    /// What the machine told, one short line each, and the signals it asked for.
    fn told(m: &mut Machine<'_>) -> Vec<String> {
        m.drain()
            .into_iter()
            .filter_map(|a| match a {
                Action::Tell(Told::Skipped { job }) => Some(format!("skipped {job}")),
                Action::Tell(Told::Started { job, attempt, .. }) => Some(format!("started {job} #{attempt}")),
                Action::Tell(Told::Finished { job, .. }) => Some(format!("finished {job}")),
                Action::Tell(Told::Failed { job, cause, .. }) => Some(format!("failed {job} {}", cause.as_str())),
                Action::Tell(Told::Retrying { job, delay, .. }) => Some(format!("retrying {job} in {delay:?}")),
                Action::Tell(Told::Stopped { job, .. }) => Some(format!("stopped {job}")),
                Action::Tell(Told::Warning { job, message }) => Some(format!("warning {job} {message}")),
                Action::Signal { pid, signal } => Some(format!("signal {pid} {signal}")),
                Action::Cancel { slurm, .. } => Some(format!("cancel {slurm}")),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn jobs_start_in_dag_order_on_free_slots_only() {
        let p = plan("  a:\n    seeds: 3\n  b:\n    needs: a\n");
        let t = Instant::now();
        let mut m = machine(&p, 2, t);
        // a0 and a1 fill the two slots; b's job of each seed waits for a's job of that seed.
        assert_eq!(turn(&mut m, t), vec![0, 1]);
        assert_eq!(m.pool().free(), 0);
        done(&mut m, 0, t, 0.9);
        // b0 is ready too, but a2 comes first in the plan.
        assert_eq!(turn(&mut m, t), vec![2]);
        done(&mut m, 1, t, 0.8);
        assert_eq!(turn(&mut m, t), vec![3]);
        done(&mut m, 2, t, 0.7);
        assert_eq!(turn(&mut m, t), vec![4]);
        done(&mut m, 3, t, 0.6);
        done(&mut m, 4, t, 0.6);
        assert!(!m.finished());
        assert_eq!(turn(&mut m, t), vec![5]);
        done(&mut m, 5, t, 0.6);
        assert_eq!(turn(&mut m, t), Vec::<usize>::new());
        assert!(m.finished());
        let saved = m.drain().into_iter().filter(|a| matches!(a, Action::Save(_))).count();
        assert_eq!(saved, 12, "each job saved when it starts and when it ends");
        let report = m.into_report();
        assert_eq!((report.done, report.failed.len(), report.not_started), (6, 0, 0));
    }

    #[test]
    fn done_jobs_are_skipped_and_their_children_start_at_once() {
        let p = plan("  a: {}\n  b:\n    needs: a\n");
        let t = Instant::now();
        let mut records: Vec<JobRecord> = p.jobs().map(|j| new_record(&p, j)).collect();
        records[0].status = JobStatus::Done;
        let mut m = Machine::new(&p, records, &[], &[], settings(1), t);
        assert_eq!(told(&mut m), vec!["skipped 0"]);
        assert_eq!(turn(&mut m, t), vec![1]);
        assert_eq!(m.into_report().skipped, 1);
    }

    #[test]
    fn a_failed_parent_fails_its_children_without_running_them() {
        let p = plan("  a:\n    seeds: 2\n  b:\n    needs: a\n");
        let t = Instant::now();
        let mut m = machine(&p, 4, t);
        assert_eq!(turn(&mut m, t), vec![0, 1]);
        end(&mut m, 0, t, Err((FailureCause::Error, "boom".into())), None);
        assert_eq!(turn(&mut m, t), Vec::<usize>::new());
        let lines = told(&mut m);
        assert_eq!(lines[lines.len() - 2..], ["failed 0 error", "failed 2 parent_failed"]);
        let parent = p.jobs().next().unwrap().id.to_string();
        assert_eq!(m.record(2).attempts[0].error.as_deref(), Some(&*format!("parent job {parent} (a) failed")));
        // The other seed's child still runs.
        done(&mut m, 1, t, 1.0);
        assert_eq!(turn(&mut m, t), vec![3]);
        done(&mut m, 3, t, 1.0);
        assert!(m.finished());
        assert_eq!(m.into_report().failed.len(), 2);
    }

    #[test]
    fn a_job_whose_slurm_job_never_started_is_submitted_again_without_using_a_retry() {
        let p = plan("  a:\n    retries: 1\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        turn(&mut m, t);
        let never =
            || Err((FailureCause::NotStarted, "Slurm job 7_1 was cancelled while it waited in Slurm's queue".into()));
        for _ in 0..NOT_STARTED_LIMIT {
            end(&mut m, 0, t, never(), None);
            assert_eq!(m.record(0).status, JobStatus::Pending);
            assert_eq!(told(&mut m).last().unwrap(), "retrying 0 in 0ns");
            assert_eq!(turn(&mut m, t), vec![0], "submitted again at once");
        }
        // It ran this time and crashed: its one retry is still there.
        let (o, s) = crash(3);
        end(&mut m, 0, t, o, s);
        assert_eq!(told(&mut m).last().unwrap(), "retrying 0 in 1s");
        assert_eq!(turn(&mut m, t + Duration::from_secs(1)), vec![0]);
        done(&mut m, 0, t, 0.5);
        assert!(m.finished());
        let outcomes: Vec<_> = m.record(0).attempts.iter().map(|a| a.outcome.clone().unwrap()).collect();
        assert_eq!(outcomes, ["not_started", "not_started", "not_started", "crashed", "done"]);
        assert_eq!(m.into_report().done, 1);
    }

    #[test]
    fn a_preempted_job_goes_back_in_at_once_without_using_a_retry() {
        let p = plan("  a: {}\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        for _ in 0..5 {
            turn(&mut m, t);
            end(&mut m, 0, t, Err((FailureCause::Preempted, "Slurm job 9 was preempted".into())), None);
            assert_eq!(m.record(0).status, JobStatus::Pending);
            assert_eq!(told(&mut m).last().unwrap(), "retrying 0 in 0ns");
        }
        turn(&mut m, t);
        done(&mut m, 0, t, 0.5);
        assert!(m.finished());
        let outcomes: Vec<_> = m.record(0).attempts.iter().map(|a| a.outcome.clone().unwrap()).collect();
        assert_eq!(outcomes, ["preempted", "preempted", "preempted", "preempted", "preempted", "done"]);
        let report = m.into_report();
        assert_eq!((report.done, report.failed.len()), (1, 0));
    }

    #[test]
    fn a_job_slurm_keeps_dropping_before_it_starts_fails_instead_of_looping() {
        let p = plan("  a: {}\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        for _ in 0..NOT_STARTED_LIMIT {
            turn(&mut m, t);
            end(&mut m, 0, t, Err((FailureCause::NotStarted, "gone".into())), None);
        }
        told(&mut m);
        turn(&mut m, t);
        end(&mut m, 0, t, Err((FailureCause::NotStarted, "gone".into())), None);
        assert_eq!(told(&mut m).last().unwrap(), "failed 0 crashed");
        assert_eq!(m.record(0).status, JobStatus::Failed);
        let error = m.record(0).attempts.last().unwrap().error.clone().unwrap();
        assert!(error.contains("before starting 4 times in this run"), "{error}");
        assert!(m.finished());
    }

    #[test]
    fn a_crash_is_retried_after_a_growing_delay_then_fails() {
        let p = plan("  a:\n    retries: 2\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        turn(&mut m, t);
        let (o, s) = crash(3);
        end(&mut m, 0, t, o, s);
        assert_eq!(m.record(0).status, JobStatus::Pending);
        assert!(told(&mut m).contains(&"retrying 0 in 1s".to_string()));
        // Not before its delay.
        assert_eq!(turn(&mut m, t + Duration::from_millis(900)), Vec::<usize>::new());
        assert!(!m.finished());
        assert_eq!(turn(&mut m, t + Duration::from_secs(1)), vec![0]);
        assert_eq!(m.record(0).attempts.len(), 2);
        // Another step this time: not the same fault, so the second retry waits 2 s.
        let (o, s) = crash(5);
        end(&mut m, 0, t + Duration::from_secs(2), o, s);
        assert!(told(&mut m).contains(&"retrying 0 in 2s".to_string()));
        assert_eq!(turn(&mut m, t + Duration::from_secs(4)), vec![0]);
        let (o, s) = crash(9);
        end(&mut m, 0, t + Duration::from_secs(5), o, s);
        assert!(told(&mut m).contains(&"failed 0 crashed".to_string()), "retries spent");
        assert_eq!(m.record(0).status, JobStatus::Failed);
        assert_eq!(m.record(0).attempts.len(), 3);
        assert!(m.finished());
    }

    #[test]
    fn a_crash_at_the_same_step_as_the_last_attempt_is_not_retried() {
        let p = plan("  a:\n    retries: 5\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        turn(&mut m, t);
        let (o, s) = crash(7);
        end(&mut m, 0, t, o, s);
        turn(&mut m, t + Duration::from_secs(1));
        let (o, s) = crash(7);
        end(&mut m, 0, t + Duration::from_secs(1), o, s);
        assert!(told(&mut m).contains(&"failed 0 crashed".to_string()));
        let error = m.record(0).attempts[1].error.clone().unwrap();
        assert!(error.contains("attempt 1 ended the same way at the same step"), "{error}");
    }

    #[test]
    fn a_config_error_holds_back_its_stage_and_fail_fast_ends_the_run() {
        let p = plan("  a:\n    seeds: 3\n  b:\n    epochs: 2\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        assert_eq!(turn(&mut m, t), vec![0]);
        end(&mut m, 0, t, Err((FailureCause::Config, "no such column".into())), None);
        // a1 and a2 would fail the same way; b is another stage and runs.
        assert_eq!(turn(&mut m, t), vec![3]);
        done(&mut m, 3, t, 1.0);
        turn(&mut m, t);
        assert!(m.finished());
        let report = m.into_report();
        assert_eq!(report.held_back, vec![("a".to_string(), 2, "no such column".to_string())]);
        assert_eq!(report.not_started, 2, "held back, still pending");

        let p = plan("  a:\n    seeds: 2\n    fail_fast: true\n  b:\n    epochs: 2\n");
        let mut m = machine(&p, 1, t);
        assert_eq!(turn(&mut m, t), vec![0]);
        end(&mut m, 0, t, Err((FailureCause::Diverged, "loss is NaN".into())), None);
        assert_eq!(turn(&mut m, t), Vec::<usize>::new());
        assert!(m.finished());
        let report = m.into_report();
        assert!(report.ended_early.as_deref().unwrap().starts_with("fail_fast: job"), "{:?}", report.ended_early);
        assert_eq!(report.not_started, 2);
    }

    #[test]
    fn stop_requests_ask_then_kill_and_the_jobs_stay_resumable() {
        let p = plan("  a:\n    seeds: 3\n");
        let t = Instant::now();
        let mut m = machine(&p, 2, t);
        assert_eq!(turn(&mut m, t), vec![0, 1]);
        told(&mut m);
        assert_eq!(m.tick(t, 1, &mut no_shortage), Flow::Go);
        let mut signals = told(&mut m);
        signals.sort();
        assert_eq!(signals, [format!("signal 1000 {}", libc::SIGTERM), format!("signal 1001 {}", libc::SIGTERM)]);
        assert!(m.next_start(t).is_none(), "no new job after a stop request");
        // Job 0 stops at its checkpoint; the classifier learns it was asked to.
        let mut asked = false;
        m.exited(
            0,
            t,
            |e| {
                asked = e.asked_to_stop;
                (Err((FailureCause::Cancelled, "stopped after a checkpoint".into())), None)
            },
            |_| String::new(),
        );
        assert!(asked);
        assert_eq!(m.tick(t, 2, &mut no_shortage), Flow::Go);
        assert_eq!(told(&mut m), ["stopped 0".to_string(), format!("signal 1001 {}", libc::SIGKILL)]);
        end(&mut m, 1, t, Err((FailureCause::Crashed, "worker killed by signal 9 (SIGKILL)".into())), None);
        assert_eq!(m.record(1).status, JobStatus::Interrupted, "killed on request is not a failure");
        assert!(m.finished());
        let report = m.into_report();
        assert_eq!((report.stopped, report.not_started, report.failed.len()), (2, 1, 0));
        assert_eq!(report.ended_early.as_deref(), Some("stopped by request"));
    }

    #[test]
    fn a_job_past_its_timeout_is_killed_once_and_ends_as_timed_out() {
        let p = plan("  a:\n    timeout: 10s\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        turn(&mut m, t);
        told(&mut m);
        m.tick(t + Duration::from_secs(9), 0, &mut no_shortage);
        assert!(told(&mut m).is_empty());
        m.tick(t + Duration::from_secs(11), 0, &mut no_shortage);
        m.tick(t + Duration::from_secs(12), 0, &mut no_shortage);
        assert_eq!(told(&mut m), [format!("signal 1000 {}", libc::SIGKILL)], "killed once");
        let mut timed_out = false;
        m.exited(
            0,
            t,
            |e| {
                timed_out = e.timed_out;
                (Err((FailureCause::Timeout, "ran past its timeout".into())), None)
            },
            |_| String::new(),
        );
        assert!(timed_out);
        assert_eq!(m.record(0).status, JobStatus::Failed);
    }

    #[test]
    fn no_job_starts_without_room_and_the_run_ends_when_nothing_runs() {
        let p = plan("  a:\n    seeds: 3\n");
        let t = Instant::now();
        let mut m = machine(&p, 2, t);
        assert_eq!(turn(&mut m, t), vec![0, 1]);
        done(&mut m, 0, t, 1.0);
        let mut full = |running: usize| Some(format!("the disk has room for no more jobs ({running} running)"));
        m.tick(t, 0, &mut full);
        assert!(m.next_start(t).is_none());
        assert!(!m.finished(), "job 1 still runs");
        // Room again: job 2 starts.
        assert_eq!(turn(&mut m, t), vec![2]);
        done(&mut m, 1, t, 1.0);
        done(&mut m, 2, t, 1.0);
        assert!(m.finished());

        let mut m = machine(&p, 1, t);
        assert_eq!(turn(&mut m, t), vec![0]);
        done(&mut m, 0, t, 1.0);
        m.tick(t, 0, &mut full);
        assert!(m.finished(), "nothing runs and nothing can start");
        let report = m.into_report();
        assert_eq!(report.ended_early.as_deref(), Some("the disk has room for no more jobs (0 running)"));
        assert_eq!(report.not_started, 2);
    }

    #[test]
    fn a_job_that_could_not_write_for_want_of_room_is_interrupted_not_failed() {
        let p = plan("  a:\n    seeds: 2\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        turn(&mut m, t);
        end(&mut m, 0, t, Err((FailureCause::Error, "cannot write checkpoint: No space left on device".into())), None);
        assert_eq!(m.record(0).status, JobStatus::Interrupted);
        assert_eq!(m.report.disk_full.as_deref(), Some("the disk is full"));
        assert!(m.next_start(t).is_none());
    }

    #[test]
    fn select_best_waits_for_every_candidate_and_records_its_pick() {
        let p = plan("  a:\n    grid: {optimizer.lr: [0.1, 0.2, 0.3]}\n  b:\n    needs: {stage: a, select: best, metric: val.acc, mode: max}\n");
        let t = Instant::now();
        let mut m = machine(&p, 3, t);
        assert_eq!(turn(&mut m, t), vec![0, 1, 2]);
        done(&mut m, 0, t, 0.5);
        end(&mut m, 1, t, Err((FailureCause::Diverged, "NaN".into())), None);
        assert_eq!(turn(&mut m, t), Vec::<usize>::new(), "candidate 2 still runs");
        done(&mut m, 2, t, 0.7);
        assert_eq!(turn(&mut m, t), vec![3]);
        let best = p.jobs().nth(2).unwrap().id.to_string();
        assert_eq!(m.record(3).selected.as_deref(), Some(best.as_str()));
        assert_eq!(m.inputs(3).iter().map(|p| p.to_string()).collect::<Vec<_>>(), vec![best]);
    }

    #[test]
    fn priority_max_parallel_and_the_global_cap_order_the_starts() {
        let p = plan("  a:\n    seeds: 3\n    max_parallel: 1\n  b:\n    seeds: 2\n    priority: 1\n    epochs: 2\n");
        let t = Instant::now();
        let mut m = machine(&p, 4, t);
        // b's two jobs first (priority), then one of a (its stage cap).
        assert_eq!(turn(&mut m, t), vec![3, 4, 0]);
        done(&mut m, 0, t, 1.0);
        assert_eq!(turn(&mut m, t), vec![1]);

        let mut s = settings(4);
        s.cap = 2;
        let records = p.jobs().map(|j| new_record(&p, j)).collect();
        let mut m = Machine::new(&p, records, &[], &[], s, t);
        assert_eq!(turn(&mut m, t), vec![3, 4]);
    }

    #[test]
    fn worker_events_update_the_record_and_the_final_event_reaches_the_classifier() {
        let p = plan("  a: {}\n");
        let t = Instant::now();
        let mut m = machine(&p, 1, t);
        turn(&mut m, t);
        told(&mut m);
        m.worker_event(0, Event::Checkpoint { epoch: 2, path: "checkpoint-2.json".into(), step_in_epoch: 0 });
        m.worker_event(0, Event::Warning { message: "predicts one class".into() });
        m.worker_event(0, Event::Warning { message: "predicts one class".into() });
        let summary = BTreeMap::from([("val.acc".to_string(), 0.75)]);
        m.worker_event(0, Event::Finished { summary: summary.clone() });
        let mut terminal = None;
        m.exited(
            0,
            t,
            |e| {
                terminal = e.terminal.clone();
                (e.terminal.unwrap(), None)
            },
            |_| String::new(),
        );
        assert_eq!(terminal, Some(Ok(summary.clone())));
        let rec = m.record(0);
        assert_eq!(rec.status, JobStatus::Done);
        assert_eq!(rec.summary, summary);
        assert_eq!(rec.warnings, ["predicts one class"]);
        let id = p.jobs().next().unwrap().id.to_string();
        assert_eq!(rec.artifacts[0].path, format!("runs/{id}/checkpoint-2.json"));
        assert_eq!(rec.artifacts[0].kind, "checkpoint after epoch 2");
        assert_eq!(rec.attempts[0].outcome.as_deref(), Some("done"));
    }

    #[test]
    fn out_of_memory_retries_avoid_the_device_it_ran_out_on() {
        let p = plan("  a:\n    retries: 1\n");
        let t = Instant::now();
        let slots = vec![
            crate::pool::Slot { device: "cuda:0".into(), threads: 1 },
            crate::pool::Slot { device: "cuda:1".into(), threads: 1 },
        ];
        let mut s = settings(1);
        s.pool = Box::new(Pool::new(slots));
        let records = p.jobs().map(|j| new_record(&p, j)).collect();
        let mut m = Machine::new(&p, records, &[], &[], s, t);
        m.tick(t, 0, &mut no_shortage);
        let (i, held) = m.next_start(t).unwrap();
        let first = held.as_ref().unwrap().device.clone();
        m.started(i, held, &first, 1, Start::Pid(7), t);
        end(&mut m, 0, t, Err((FailureCause::OutOfMemory, "CUDA out of memory".into())), None);
        m.tick(t + Duration::from_secs(1), 0, &mut no_shortage);
        let (_, held) = m.next_start(t).unwrap();
        assert_ne!(held.unwrap().device, first);
    }

    #[test]
    fn a_stop_under_slurm_detaches_and_leaves_its_jobs_running() {
        let p = plan("  a:\n    seeds: 2\n");
        let t = Instant::now();
        let mut s = settings(1);
        s.slurm = true;
        let records = p.jobs().map(|j| new_record(&p, j)).collect();
        let mut m = Machine::new(&p, records, &[(0, "4242".to_string())], &[], s, t);
        assert_eq!(m.running_count(), 1, "re-attached to the job Slurm still runs");
        m.tick(t, 0, &mut no_shortage);
        let (i, held) = m.next_start(t).unwrap();
        assert!(held.is_none(), "Slurm's queue holds what its nodes cannot run yet");
        m.started(i, None, "cpu", 1, Start::Slurm("4243".into()), t);
        assert_eq!(m.record(1).attempts[0].slurm_job.as_deref(), Some("4243"));
        assert_eq!(m.tick(t, 1, &mut no_shortage), Flow::Detach);
        let report = m.into_report();
        assert_eq!(report.detached, 2);
    }
}
