//! The store's single writer: every change to the store during a run goes through one thread,
//! which applies what has queued up in batches and makes finished jobs durable at once.

use crossbeam_channel::Receiver;
use std::collections::BTreeMap;
use xlab_store::{JobRecord, JobStatus, Store};

pub enum StoreOp {
    Job(Box<JobRecord>),
    Metrics { job: String, step: u64, values: BTreeMap<String, f64> },
}

/// Applies operations until every sender is gone. Returns the first store error, if any; after
/// an error the writer keeps draining so that senders never block, but writes nothing more.
pub fn run(store: &Store, ops: Receiver<StoreOp>) -> Result<(), xlab_store::StoreError> {
    let mut first_error = None;
    while let Ok(op) = ops.recv() {
        let mut batch = vec![op];
        batch.extend(ops.try_iter().take(4096));
        if first_error.is_some() {
            continue;
        }
        let mut durable = false;
        for op in batch {
            let r = match op {
                StoreOp::Job(j) => {
                    durable |= matches!(j.status, JobStatus::Done | JobStatus::Failed);
                    store.put_job(&j)
                }
                StoreOp::Metrics { job, step, values } => store.put_metrics(&job, step, &values),
            };
            if let Err(e) = r {
                first_error = Some(e);
                break;
            }
        }
        if durable && first_error.is_none() {
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
