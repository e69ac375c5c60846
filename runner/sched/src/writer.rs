//! The store's single writer: every change to the store during a run goes through one thread,
//! which applies what has queued up in batches and makes finished jobs durable at once.

use crossbeam_channel::Receiver;
use std::collections::BTreeMap;
use xlab_store::{JobRecord, ResultStore};

/// The metric values reported at one step.
type StepPoints = (u64, BTreeMap<String, f64>);

pub enum StoreOp {
    Job(Box<JobRecord>),
    Metrics { job: String, step: u64, values: BTreeMap<String, f64> },
}

/// Applies operations until every sender is gone. Returns the first store error, if any; after
/// an error the writer keeps draining so that senders never block, but writes nothing more.
pub fn run(store: &dyn ResultStore, ops: Receiver<StoreOp>) -> Result<(), xlab_store::StoreError> {
    let mut first_error = None;
    let mut last_flush = std::time::Instant::now();
    while let Ok(op) = ops.recv() {
        let mut batch = vec![op];
        batch.extend(ops.try_iter().take(4096));
        if first_error.is_some() {
            continue;
        }
        let mut durable = false;
        // Points that queued up together are written together, one batch per job.
        let mut points: BTreeMap<String, Vec<StepPoints>> = BTreeMap::new();
        for op in batch {
            let r = match op {
                StoreOp::Job(j) => {
                    // Job records change rarely (attempt start, provenance, checkpoint, end) and
                    // each change is worth keeping through a crash: make them durable at once.
                    durable = true;
                    // A job record follows its own points: write those first.
                    match points.remove(&j.id) {
                        Some(p) => store.put_metrics_batch(&j.id, &p).and_then(|_| store.put_job(&j)),
                        None => store.put_job(&j),
                    }
                }
                StoreOp::Metrics { job, step, values } => {
                    points.entry(job).or_default().push((step, values));
                    Ok(())
                }
            };
            if let Err(e) = r {
                first_error = Some(e);
                break;
            }
        }
        if first_error.is_none() {
            for (job, p) in points {
                if let Err(e) = store.put_metrics_batch(&job, &p) {
                    first_error = Some(e);
                    break;
                }
            }
        }
        durable |= last_flush.elapsed() >= std::time::Duration::from_secs(1);
        if durable && first_error.is_none() {
            last_flush = std::time::Instant::now();
            if let Err(e) = store.flush() {
                first_error = Some(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => store.flush(),
    }
}
