//! Starting a worker process for a job and reading its event stream.

use crate::pool::Slot;
use crossbeam_channel::Sender;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use xlab_proto::{Event, JobRequest, Lease};

/// What a worker's reader thread tells the scheduler loop. `usize` is the job's index.
#[derive(Debug)]
pub enum Msg {
    Event(usize, Event),
    /// A line on the worker's stdout that is not an event (kept in the job's log).
    Noise(usize, String),
    Exited(usize, std::io::Result<ExitStatus>),
}

/// The request file and log file of a job, inside its run folder.
pub fn request_path(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("job.json")
}

pub fn log_path(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("worker.log")
}

/// The lease a worker sees: a GPU slot's physical index becomes `cuda:0` behind
/// `CUDA_VISIBLE_DEVICES`.
pub fn lease_for(slot: &Slot) -> (Lease, String) {
    match slot.device.strip_prefix("cuda:") {
        Some(physical) => (Lease { device: "cuda:0".into(), threads: slot.threads }, physical.to_string()),
        None => (Lease { device: "cpu".into(), threads: slot.threads }, String::new()),
    }
}

/// Writes the job request and starts the worker; a reader thread forwards its events to `tx` and
/// reports its exit. Returns the worker's pid.
pub fn spawn(
    worker: &Path,
    req: &JobRequest,
    visible_devices: &str,
    index: usize,
    tx: Sender<Msg>,
) -> std::io::Result<u32> {
    std::fs::create_dir_all(&req.run_dir)?;
    let request = request_path(&req.run_dir);
    std::fs::write(&request, serde_json::to_vec_pretty(req).expect("requests serialize"))?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path(&req.run_dir))?;
    // `deterministic: true`: one thread (the worker does the same for libtorch's own pool), and
    // cuBLAS's reproducible workspace, which must be set before CUDA starts.
    let deterministic = req.config.get("deterministic") == Some(&serde_json::Value::Bool(true));
    let threads = if deterministic { "1".to_string() } else { req.lease.threads.to_string() };
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(worker);
    if deterministic {
        command.env("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
    }
    let mut child = command
        .arg("run")
        .arg("--job")
        .arg(&request)
        .env("CUDA_VISIBLE_DEVICES", visible_devices)
        .env("OMP_NUM_THREADS", &threads)
        .env("MKL_NUM_THREADS", &threads)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        // Its own process group: a Ctrl-C at the terminal reaches the coordinator only, which
        // asks each worker to stop at a checkpoint (and kills them on a second Ctrl-C).
        .process_group(0)
        .spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout is piped");
    std::thread::Builder::new().name(format!("worker-{pid}")).spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let msg = match Event::from_line(&line) {
                Ok(e) => Msg::Event(index, e),
                Err(_) => Msg::Noise(index, line),
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
        let _ = tx.send(Msg::Exited(index, child.wait()));
    })?;
    Ok(pid)
}
