//! Starting a worker process for a job and reading its event stream.

use crate::pool::Slot;
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use xlab_proto::{Event, JobRequest, Lease};

/// What a worker's reader thread tells the scheduler loop. `usize` is the job's index.
#[derive(Debug)]
pub enum Msg {
    Event(usize, Event),
    /// A line on the worker's stdout that is not an event (kept in the job's log).
    Noise(usize, String),
    Exited(usize, Exit),
}

/// How a job's worker ended.
#[derive(Debug)]
pub enum Exit {
    /// A local worker process exited (or could not be waited for).
    Process(std::io::Result<ExitStatus>),
    /// A Slurm job left the queue: its final state while Slurm still listed it (`None`: gone
    /// from the queue), the line Slurm wrote about its end, if any, and whether its worker ever
    /// started (its batch script opened the event file); for a job of a pack, how its worker
    /// ended as the pack's supervisor noted it.
    Slurm { id: String, state: Option<String>, note: String, started: bool, worker: Option<String> },
}

/// The request file and log file of a job, inside its run folder.
pub fn request_path(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("job.json")
}

pub fn log_path(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("worker.log")
}

/// The lease a worker sees: a GPU slot's physical index becomes `cuda:0` behind
/// `CUDA_VISIBLE_DEVICES`; whole GPUs `cuda:1,cuda:3` become `cuda:0` and `cuda:1`.
pub fn lease_for(slot: &Slot) -> (Lease, String) {
    let physical: Option<Vec<&str>> = slot.device.split(',').map(|d| d.strip_prefix("cuda:")).collect();
    match physical {
        Some(list) => (Lease { device: "cuda:0".into(), threads: slot.threads }, list.join(",")),
        None => (Lease { device: "cpu".into(), threads: slot.threads }, String::new()),
    }
}

/// What a worker process starts with besides its job: its GPU, its thread count, and whether
/// the job asks for deterministic results. Workers waiting for a job are kept per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerKey {
    /// `CUDA_VISIBLE_DEVICES` (empty for CPU).
    pub visible: String,
    pub threads: usize,
    pub deterministic: bool,
}

impl WorkerKey {
    /// The threads the worker runs with: `deterministic: true` means one (the worker does the
    /// same for libtorch's own pool), whatever the slot.
    pub fn threads_used(&self) -> usize {
        if self.deterministic {
            1
        } else {
            self.threads
        }
    }

    fn command(&self, worker: &Path) -> Command {
        // With `deterministic: true`, also cuBLAS's reproducible workspace, which must be set
        // before CUDA starts.
        let threads = self.threads_used().to_string();
        let mut c = Command::new(worker);
        if self.deterministic {
            c.env("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
        }
        use std::os::unix::process::CommandExt;
        c.env("CUDA_VISIBLE_DEVICES", &self.visible)
            // The worker stops when this process goes away (see `xlab_worker::exit_with_parent`).
            .env("XLAB_PARENT_PID", std::process::id().to_string())
            .env("OMP_NUM_THREADS", &threads)
            .env("MKL_NUM_THREADS", &threads)
            .stdout(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches the coordinator only, which
            // asks each worker to stop at a checkpoint (and kills them on a second Ctrl-C).
            .process_group(0);
        c
    }
}

/// A worker started before its job: libtorch loads (about half a second) while the slot's
/// previous job runs, and the job starts at once when it is handed over.
pub struct Standby {
    child: Child,
    stdin: ChildStdin,
}

/// The workers waiting for a job, per key.
pub struct Standbys {
    worker: PathBuf,
    /// Where waiting workers log until they get a job (then they log to the job's folder).
    log: PathBuf,
    ready: HashMap<WorkerKey, Vec<Standby>>,
}

impl Standbys {
    pub fn new(worker: &Path, log: PathBuf) -> Self {
        Standbys { worker: worker.to_path_buf(), log, ready: HashMap::new() }
    }

    /// Starts one more waiting worker for `key`; a failure only costs the head start.
    pub fn fill(&mut self, key: &WorkerKey) {
        let started = (|| {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
            let mut child =
                key.command(&self.worker).arg("standby").stdin(Stdio::piped()).stderr(Stdio::from(log)).spawn()?;
            let stdin = child.stdin.take().expect("stdin is piped");
            Ok::<_, std::io::Error>(Standby { child, stdin })
        })();
        match started {
            Ok(s) => self.ready.entry(key.clone()).or_default().push(s),
            Err(e) => tracing::debug!("cannot start a waiting worker: {e}"),
        }
    }

    /// Hands the job to a waiting worker of its key, if there is one that is still alive;
    /// returns its pid.
    pub fn hand_over(&mut self, key: &WorkerKey, req: &JobRequest, index: usize, tx: &Sender<Msg>) -> Option<u32> {
        while let Some(mut s) = self.ready.get_mut(key).and_then(Vec::pop) {
            let request = match write_request(req) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("cannot write the job request: {e}");
                    self.ready.entry(key.clone()).or_default().push(s);
                    return None;
                }
            };
            let line = format!("{}\n", request.display());
            if s.stdin.write_all(line.as_bytes()).and_then(|_| s.stdin.flush()).is_err() {
                // It died while starting: reap it and try the next.
                let _ = s.child.kill();
                let _ = s.child.wait();
                continue;
            }
            drop(s.stdin);
            let pid = s.child.id();
            match read_events(s.child, index, tx.clone()) {
                Ok(()) => return Some(pid),
                Err(e) => tracing::warn!("cannot watch worker {pid}: {e}"),
            }
        }
        None
    }

    /// Ends every waiting worker (they hold nothing).
    pub fn close(&mut self) {
        for (_, list) in self.ready.drain() {
            for mut s in list {
                let _ = s.child.kill();
                let _ = s.child.wait();
            }
        }
    }
}

impl Drop for Standbys {
    fn drop(&mut self) {
        self.close();
    }
}

pub(crate) fn write_request(req: &JobRequest) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(&req.run_dir)?;
    let request = request_path(&req.run_dir);
    std::fs::write(&request, serde_json::to_vec_pretty(req).expect("requests serialize"))?;
    Ok(request)
}

/// A thread forwards the worker's events to `tx` and reports its exit.
fn read_events(mut child: Child, index: usize, tx: Sender<Msg>) -> std::io::Result<()> {
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
        let _ = tx.send(Msg::Exited(index, Exit::Process(child.wait())));
    })?;
    Ok(())
}

/// Writes the job request and starts a worker for it; a reader thread forwards its events to
/// `tx` and reports its exit. Returns the worker's pid.
pub fn spawn(worker: &Path, req: &JobRequest, key: &WorkerKey, index: usize, tx: Sender<Msg>) -> std::io::Result<u32> {
    let request = write_request(req)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path(&req.run_dir))?;
    let child = key
        .command(worker)
        .arg("run")
        .arg("--job")
        .arg(&request)
        .stdin(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()?;
    let pid = child.id();
    read_events(child, index, tx)?;
    Ok(pid)
}
