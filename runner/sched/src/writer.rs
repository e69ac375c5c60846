//! The store's single writer: every change to the store during a run goes through one thread,
//! which applies what has queued up in batches and makes finished jobs durable at once.
//!
//! A write that fails (a full disk, most often) loses nothing: what could not be written, and
//! what was written since the last successful flush, stays queued in order and is tried again
//! every second with what arrives meanwhile (every write replaces by key, so writing twice is
//! harmless). The scheduler reads [`Health`] and starts no job while the store cannot be
//! written; when the writes go through again, it goes on.
//!
//! A write that never returns (sled 0.34 can stall for good, every thread waiting on another)
//! is caught by [`watch_stalls`]: one store call busy for longer than the limit is reported with
//! what to do, instead of a run that hangs for ever.

use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xlab_store::{JobRecord, ResultStore, StoreError};

/// The metric values reported at one step.
type StepPoints = (u64, BTreeMap<String, f64>);

pub enum StoreOp {
    Job(Box<JobRecord>),
    Metrics { job: String, step: u64, values: BTreeMap<String, f64> },
}

/// Whether the store can be written: the error of the write that is being retried, if any.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<Option<String>>>);

impl Health {
    /// The store error being retried, if the store cannot be written now.
    pub fn failing(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, v: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }
}

/// When the writer's current store call began, for [`watch_stalls`].
pub struct Busy {
    /// Milliseconds since `base`, plus one; 0 while no store call runs.
    since: AtomicU64,
    base: Instant,
}

impl Default for Busy {
    fn default() -> Self {
        Busy { since: AtomicU64::new(0), base: Instant::now() }
    }
}

impl Busy {
    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    /// Runs one store call, marked busy while it runs.
    fn during<T>(&self, f: impl FnOnce() -> T) -> T {
        self.since.store(self.now(), Ordering::Release);
        let out = f();
        self.since.store(0, Ordering::Release);
        out
    }

    /// How long the current store call has run, if one runs.
    fn busy_for(&self) -> Option<Duration> {
        match self.since.load(Ordering::Acquire) {
            0 => None,
            t => Some(Duration::from_millis(self.now().saturating_sub(t))),
        }
    }
}

/// The longest one store call may take before the database counts as stalled: 120 s, or
/// `XLAB_STORE_STALL_S` seconds.
pub fn stall_limit() -> Duration {
    let secs = std::env::var("XLAB_STORE_STALL_S").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0);
    Duration::from_secs_f64(secs.unwrap_or(120.0))
}

/// Watches the writer until `done` is set: when one store call has been busy for longer than
/// `limit`, calls `stalled` once with what to tell the user and returns.
pub fn watch_stalls(busy: &Busy, limit: Duration, done: &AtomicBool, stalled: impl FnOnce(String)) {
    let tick = (limit / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        if busy.busy_for().is_some_and(|d| d > limit) {
            stalled(format!(
                "the store's database has made no progress on one write for {} s: it is stalled (sled 0.34 can \
                 stall for good, every thread waiting on another)\n  hint: nothing finished is lost: stop here and run \
                 the same command again (every job resumes from its last checkpoint); if it stalls again, `xlab export` \
                 this store and `xlab import` it into a new one (new stores use 8 MiB log segments, with which the \
                 stall was not seen); `XLAB_STORE_STALL_S` sets this limit",
                (limit.as_secs_f64() * 10.0).round() / 10.0
            ));
            return;
        }
    }
}

/// One write, in the order the operations came.
enum Unit {
    Points { job: String, points: Vec<StepPoints> },
    Job(Box<JobRecord>),
}

impl Unit {
    fn write(&self, store: &dyn ResultStore) -> Result<(), StoreError> {
        match self {
            Unit::Points { job, points } => store.put_metrics_batch(job, points),
            Unit::Job(j) => store.put_job(j),
        }
    }
}

/// Points that queued up together are written together, one batch per job; a job record
/// follows its own points.
fn units(batch: Vec<StoreOp>, out: &mut Vec<Unit>) {
    let mut points: BTreeMap<String, Vec<StepPoints>> = BTreeMap::new();
    for op in batch {
        match op {
            StoreOp::Job(j) => {
                if let Some(p) = points.remove(&j.id) {
                    out.push(Unit::Points { job: j.id.clone(), points: p });
                }
                out.push(Unit::Job(j));
            }
            StoreOp::Metrics { job, step, values } => points.entry(job).or_default().push((step, values)),
        }
    }
    out.extend(points.into_iter().map(|(job, points)| Unit::Points { job, points }));
}

/// Applies operations until every sender is gone, then makes them durable. Returns an error
/// only if some could still not be written at the end: it says how many, and that their jobs
/// resume from their checkpoints on the next run.
/// The most operations written together.
const BATCH: usize = 4096;

/// How long metric points wait for more to be written with (they are visible to readers of the
/// store after at most this long).
const COALESCE: Duration = Duration::from_millis(100);

pub fn run(store: &dyn ResultStore, ops: Receiver<StoreOp>, health: &Health, busy: &Busy) -> Result<(), StoreError> {
    let mut last_flush = Instant::now();
    // Written since the last successful flush, and not yet written.
    let mut unflushed: Vec<Unit> = Vec::new();
    let mut pending: Vec<Unit> = Vec::new();
    let mut error: Option<StoreError> = None;
    loop {
        let first = if error.is_some() {
            match ops.recv_timeout(Duration::from_secs(1)) {
                Ok(op) => Some(op),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match ops.recv() {
                Ok(op) => Some(op),
                Err(_) => break,
            }
        };
        let mut batch: Vec<StoreOp> = first.into_iter().collect();
        batch.extend(ops.try_iter().take(BATCH));
        // Metric points arrive a row at a time; written as they come, each row would rewrite
        // its series' chunks (and wake sled's I/O threads) on its own. Points that arrive
        // within a short window are written together instead; a job record ends the wait.
        let window = Instant::now() + COALESCE;
        while error.is_none() && batch.len() < BATCH && !batch.iter().any(|op| matches!(op, StoreOp::Job(_))) {
            match ops.recv_deadline(window) {
                Ok(op) => {
                    batch.push(op);
                    batch.extend(ops.try_iter().take(BATCH));
                }
                Err(_) => break,
            }
        }
        // Job records change rarely (attempt start, provenance, checkpoint, end) and each change
        // is worth keeping through a crash: make them durable at once.
        let durable = batch.iter().any(|op| matches!(op, StoreOp::Job(_)))
            || last_flush.elapsed() >= Duration::from_secs(1)
            || error.is_some();
        units(batch, &mut pending);
        match write(store, &mut pending, &mut unflushed, durable, busy) {
            Ok(flushed) => {
                if flushed {
                    last_flush = Instant::now();
                }
                if error.take().is_some() {
                    tracing::info!("the store can be written again; every queued result is in it");
                    health.set(None);
                }
            }
            Err(e) => {
                if error.is_none() {
                    tracing::error!(
                        "cannot write the store: {e}; keeping {} queued write(s) and trying again every second",
                        pending.len()
                    );
                    health.set(Some(e.to_string()));
                }
                error = Some(e);
            }
        }
    }
    match write(store, &mut pending, &mut unflushed, true, busy) {
        Ok(_) => Ok(()),
        Err(e) => {
            let jobs = pending.iter().filter(|u| matches!(u, Unit::Job(_))).count();
            let points: usize =
                pending.iter().map(|u| if let Unit::Points { points, .. } = u { points.len() } else { 0 }).sum();
            Err(StoreError::Unwritten { dir: store.dir().to_path_buf(), error: e.to_string(), records: jobs, points })
        }
    }
}

/// Writes `pending` in order (and flushes when `durable`); whatever is not known to be durable
/// after an error goes back to `pending`, in order. Returns whether it flushed.
fn write(
    store: &dyn ResultStore,
    pending: &mut Vec<Unit>,
    unflushed: &mut Vec<Unit>,
    durable: bool,
    busy: &Busy,
) -> Result<bool, StoreError> {
    let mut rest = std::mem::take(pending).into_iter();
    for u in rest.by_ref() {
        if let Err(e) = busy.during(|| u.write(store)) {
            // Not written, nor anything after it; and what was written since the last flush
            // may not survive. All of it is tried again.
            unflushed.push(u);
            unflushed.extend(rest);
            *pending = std::mem::take(unflushed);
            return Err(e);
        }
        unflushed.push(u);
    }
    if !durable {
        return Ok(false);
    }
    match busy.during(|| store.flush()) {
        Ok(()) => {
            unflushed.clear();
            Ok(true)
        }
        Err(e) => {
            *pending = std::mem::take(unflushed);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use xlab_store::{ExperimentRecord, Store};

    /// A real store whose flush blocks until released: sled's stall, which cannot be brought
    /// about on demand, as the writer sees it (a call that does not return).
    struct Stuck {
        inner: Store,
        release: crossbeam_channel::Receiver<()>,
    }

    impl ResultStore for Stuck {
        fn dir(&self) -> &std::path::Path {
            self.inner.dir()
        }
        fn flush(&self) -> Result<(), StoreError> {
            let _ = self.release.recv();
            self.inner.flush()
        }
        fn put_experiment(&self, e: &ExperimentRecord) -> Result<(), StoreError> {
            self.inner.put_experiment(e)
        }
        fn experiment(&self, name: &str) -> Result<Option<ExperimentRecord>, StoreError> {
            self.inner.experiment(name)
        }
        fn experiments(&self) -> Result<Vec<ExperimentRecord>, StoreError> {
            self.inner.experiments()
        }
        fn put_job(&self, j: &JobRecord) -> Result<(), StoreError> {
            self.inner.put_job(j)
        }
        fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
            self.inner.job(id)
        }
        fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
            self.inner.jobs()
        }
        fn put_decision(&self, d: &xlab_store::Decision) -> Result<(), StoreError> {
            self.inner.put_decision(d)
        }
        fn decisions(&self, experiment: &str, stage: &str) -> Result<Vec<xlab_store::Decision>, StoreError> {
            self.inner.decisions(experiment, stage)
        }
        fn job_ids_with_prefix(&self, prefix: &str, at_most: usize) -> Result<Vec<String>, StoreError> {
            self.inner.job_ids_with_prefix(prefix, at_most)
        }
        fn put_metrics_batch(&self, job: &str, points: &[(u64, BTreeMap<String, f64>)]) -> Result<(), StoreError> {
            self.inner.put_metrics_batch(job, points)
        }
        fn metric_series(&self, job: &str, name: &str) -> Result<Vec<(u64, f64)>, StoreError> {
            self.inner.metric_series(job, name)
        }
        fn metrics_of(&self, job: &str) -> Result<BTreeMap<String, Vec<(u64, f64)>>, StoreError> {
            self.inner.metrics_of(job)
        }
    }

    #[test]
    fn a_store_call_that_does_not_return_is_reported_as_a_stall() {
        let dir = tempfile::tempdir().unwrap();
        let (release_tx, release) = crossbeam_channel::unbounded();
        let store = Stuck { inner: Store::open(dir.path()).unwrap(), release };
        let (ops_tx, ops) = crossbeam_channel::unbounded();
        let (health, busy, done) = (Health::default(), Busy::default(), AtomicBool::new(false));
        let (said_tx, said) = crossbeam_channel::unbounded();
        std::thread::scope(|s| {
            let writer = s.spawn(|| run(&store, ops, &health, &busy));
            s.spawn(|| watch_stalls(&busy, Duration::from_millis(200), &done, |m| said_tx.send(m).unwrap()));
            let values: BTreeMap<String, f64> = [("train.loss".to_string(), 0.5)].into();
            ops_tx.send(StoreOp::Metrics { job: "j".into(), step: 1, values }).unwrap();
            drop(ops_tx);
            // The final flush blocks: the watchdog speaks within its limit.
            let message = said.recv_timeout(Duration::from_secs(10)).expect("the stall is reported");
            assert!(
                message.contains("no progress on one write for 0.2 s")
                    && message.contains("run the same command again")
            );
            release_tx.send(()).unwrap();
            writer.join().unwrap().unwrap();
            done.store(true, Ordering::Release);
        });
        assert_eq!(store.inner.metric_series("j", "train.loss").unwrap(), vec![(1, 0.5)]);
    }

    #[test]
    fn a_quick_store_is_never_reported() {
        let (busy, done) = (Busy::default(), AtomicBool::new(false));
        std::thread::scope(|s| {
            let w = s.spawn(|| {
                let mut said = false;
                watch_stalls(&busy, Duration::from_millis(300), &done, |_| said = true);
                said
            });
            for _ in 0..20 {
                busy.during(|| std::thread::sleep(Duration::from_millis(10)));
            }
            done.store(true, Ordering::Release);
            assert!(!w.join().unwrap());
        });
    }
}
