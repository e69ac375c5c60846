//! The store's single writer: every change to the store during a run goes through one thread,
//! which applies what has queued up in batches and makes finished jobs durable at once.
//!
//! A write that fails (a full disk, most often) loses nothing: what could not be written, and
//! what was written since the last successful flush, stays queued in order and is tried again
//! every second with what arrives meanwhile (every write replaces by key, so writing twice is
//! harmless). The scheduler reads [`Health`] and starts no job while the store cannot be
//! written; when the writes go through again, it goes on.

use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::BTreeMap;
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
pub fn run(store: &dyn ResultStore, ops: Receiver<StoreOp>, health: &Health) -> Result<(), StoreError> {
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
        batch.extend(ops.try_iter().take(4096));
        // Job records change rarely (attempt start, provenance, checkpoint, end) and each change
        // is worth keeping through a crash: make them durable at once.
        let durable = batch.iter().any(|op| matches!(op, StoreOp::Job(_)))
            || last_flush.elapsed() >= Duration::from_secs(1)
            || error.is_some();
        units(batch, &mut pending);
        match write(store, &mut pending, &mut unflushed, durable) {
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
    match write(store, &mut pending, &mut unflushed, true) {
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
) -> Result<bool, StoreError> {
    let mut rest = std::mem::take(pending).into_iter();
    for u in rest.by_ref() {
        if let Err(e) = u.write(store) {
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
    match store.flush() {
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
