//! What the worker's tests share.

use std::path::PathBuf;
use xlab_proto::{JobRequest, Lease, PROTOCOL_VERSION};

/// A request for a job on one CPU thread that checkpoints after every epoch and sets nothing
/// else: no plugins, parents, pause or kept weights (callers add theirs with `..`).
pub fn cpu_request(
    run_dir: PathBuf,
    experiment: &str,
    stage: &str,
    job_id: &str,
    seed: u64,
    config: serde_json::Value,
) -> JobRequest {
    JobRequest {
        protocol: PROTOCOL_VERSION,
        job_id: job_id.into(),
        experiment: experiment.into(),
        stage: stage.into(),
        seed,
        config,
        lease: Lease { device: "cpu".into(), threads: 1 },
        run_dir,
        plugins: vec![],
        checkpoint_every: 1,
        checkpoint_every_ms: None,
        checkpoint_every_steps: None,
        step_timeout_ms: None,
        parents: vec![],
        pause_after_epoch: None,
        keep_weights: vec![],
        continue_from: None,
    }
}
