//! The state of a run, for `xlab status`: `xlab run` keeps `<store>/status.json` current (jobs
//! running, their device, epoch and latest metrics; counts of done, failed and queued jobs), so
//! another terminal can follow a run while the store is locked by it. After the run, `xlab
//! status` reads the store itself.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub experiment: String,
    pub pid: u32,
    pub started_unix: u64,
    pub updated_unix: u64,
    /// False while the run is going (or if it died without a word).
    pub finished: bool,
    pub total: usize,
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub stopped: usize,
    pub running: Vec<RunningJob>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningJob {
    pub job: String,
    pub stage: String,
    pub label: String,
    pub device: String,
    pub attempt: u32,
    pub started_unix: u64,
    pub epoch: u64,
    pub epochs: u64,
    /// The latest training loss and validation/test accuracy reported.
    pub metrics: BTreeMap<String, f64>,
    /// The Slurm job running it, under the Slurm executor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
}

pub fn path(store: &Path) -> PathBuf {
    store.join("status.json")
}

/// The status file of a run that joined the run owning the store (`xlab_sched::hub`).
pub fn joined_path(store: &Path, pid: u32) -> PathBuf {
    store.join(format!("status-{pid}.json"))
}

/// The status of every run in progress on the store: the owner's, then those joined to it
/// (whose processes are alive and have not finished).
pub fn in_progress(store: &Path) -> Vec<Snapshot> {
    let read = |p: &Path| -> Option<Snapshot> { std::fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok()) };
    let mut out: Vec<Snapshot> = read(&path(store)).filter(|s| !s.finished).into_iter().collect();
    let mut joined: Vec<Snapshot> = std::fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("status-"))
        .filter_map(|e| read(&e.path()))
        // SAFETY: kill(2) with signal 0 only asks whether the process exists.
        .filter(|s| !s.finished && unsafe { libc::kill(s.pid as i32, 0) } == 0)
        .collect();
    joined.sort_by_key(|s| s.started_unix);
    out.extend(joined);
    out
}

/// Keeps the snapshot and writes it at most twice a second (and when asked to), and drives the
/// terminal's live view when there is one.
pub struct Tracker {
    file: PathBuf,
    pub snap: Snapshot,
    last: Option<Instant>,
    live: Option<crate::live::Live>,
}

/// Why a job left the running set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Done,
    Failed,
    /// Stopped at a checkpoint by a stop request; it resumes next time.
    Stopped,
    /// Failed in a way worth another attempt, which is queued.
    Retrying,
    /// A search's trial stopped at a rung; it may be promoted later.
    Paused,
}

fn now() -> u64 {
    xlab_store::now_unix()
}

impl Tracker {
    pub fn new(file: PathBuf, experiment: &str, total: usize, live: Option<crate::live::Live>) -> Self {
        let snap = Snapshot {
            experiment: experiment.into(),
            pid: std::process::id(),
            started_unix: now(),
            updated_unix: now(),
            total,
            ..Default::default()
        };
        let mut t = Tracker { file, snap, last: None, live };
        // `xlab status` lists the run from its start, before any job has started.
        t.write(true);
        t
    }

    pub fn skipped(&mut self) {
        self.snap.skipped += 1;
        if let Some(l) = self.live.as_mut() {
            l.skipped();
        }
    }

    pub fn started(&mut self, job: &xlab_plan::Job, device: &str, attempt: u32, slurm_job: Option<&str>) {
        let epochs = job.config_json.get("epochs").and_then(|e| e.as_u64()).unwrap_or(0);
        if let Some(l) = self.live.as_mut() {
            l.started(job.id.as_str(), format!("{} {} on {device}", job.stage, job.label()), epochs.max(1));
        }
        self.snap.running.retain(|r| r.job != job.id.as_str());
        self.snap.running.push(RunningJob {
            job: job.id.to_string(),
            stage: job.stage.clone(),
            label: job.label(),
            device: device.into(),
            attempt,
            started_unix: now(),
            epoch: 0,
            epochs,
            metrics: BTreeMap::new(),
            slurm_job: slurm_job.map(str::to_string),
        });
        self.write(true);
    }

    pub fn metrics(&mut self, job: &str, step: u64, values: &BTreeMap<String, f64>) {
        if let Some(l) = self.live.as_mut() {
            l.metrics(job, step, values);
        }
        if let Some(r) = self.snap.running.iter_mut().find(|r| r.job == job) {
            r.epoch = step;
            for k in ["train.loss", "val.acc", "test.acc", "time.steps_per_s"] {
                if let Some(v) = values.get(k) {
                    r.metrics.insert(k.into(), *v);
                }
            }
        }
        self.write(false);
    }

    /// A job left the running set.
    pub fn ended(&mut self, job: &str, how: Ended) {
        self.snap.running.retain(|r| r.job != job);
        match how {
            Ended::Done => self.snap.done += 1,
            Ended::Failed => self.snap.failed += 1,
            Ended::Stopped => self.snap.stopped += 1,
            Ended::Retrying | Ended::Paused => {}
        }
        if let Some(l) = self.live.as_mut() {
            l.ended(job, matches!(how, Ended::Done | Ended::Failed), how == Ended::Failed);
        }
        self.write(true);
    }

    pub fn finish(&mut self) {
        self.snap.finished = true;
        self.snap.running.clear();
        if let Some(l) = self.live.take() {
            l.finish();
        }
        self.write(true);
    }

    /// Removes the status file (a joined run's, once it finished).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.file);
    }

    fn write(&mut self, now_anyway: bool) {
        if !now_anyway && self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
            return;
        }
        self.last = Some(Instant::now());
        self.snap.updated_unix = now();
        let tmp = self.file.with_extension("json.tmp");
        let ok = std::fs::write(&tmp, serde_json::to_vec_pretty(&self.snap).expect("snapshots serialize"))
            .and_then(|_| std::fs::rename(&tmp, &self.file));
        if let Err(e) = ok {
            tracing::debug!("cannot write {}: {e}", self.file.display());
        }
    }
}

/// `3m 20s` style durations.
pub fn ago(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// What Slurm says of a job, for `xlab status`: `RUNNING on node7`, `PENDING (Resources)`.
pub fn slurm_state(queue: &Result<HashMap<String, xlab_sched::slurm::QueueEntry>, String>, id: &str) -> String {
    match queue {
        Err(_) => "state unknown: squeue did not answer".into(),
        Ok(q) => match q.get(id) {
            None => "no longer in Slurm's queue".into(),
            Some(e) if e.state == "PENDING" => format!("PENDING ({})", e.reason),
            Some(e) if e.node.is_empty() => e.state.clone(),
            Some(e) => format!("{} on {}", e.state, e.node),
        },
    }
}

/// The live view of a snapshot: counts, then a line per running job.
pub fn render(s: &Snapshot) -> String {
    let slurm = s.running.iter().any(|r| r.slurm_job.is_some()).then(xlab_sched::slurm::queue);
    let queued = s.total.saturating_sub(s.done + s.skipped + s.failed + s.stopped + s.running.len());
    let mut out = format!(
        "experiment `{}`: {} done, {} running, {} queued, {} failed{} of {} (run by pid {}, {} elapsed)\n",
        s.experiment,
        s.done + s.skipped,
        s.running.len(),
        queued,
        s.failed,
        if s.stopped > 0 { format!(", {} stopped", s.stopped) } else { String::new() },
        s.total,
        s.pid,
        ago(s.updated_unix.saturating_sub(s.started_unix)),
    );
    for r in &s.running {
        let m: Vec<String> = r.metrics.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
        let device = match (&r.slurm_job, &slurm) {
            (Some(id), Some(q)) => format!("Slurm job {id}, {}", slurm_state(q, id)),
            _ => r.device.clone(),
        };
        out += &format!(
            "  {} {} on {} (job {}{}): epoch {}/{}, {} running{}{}\n",
            r.stage,
            r.label,
            device,
            r.job,
            if r.attempt > 1 { format!(", attempt {}", r.attempt) } else { String::new() },
            r.epoch,
            r.epochs,
            ago(s.updated_unix.saturating_sub(r.started_unix)),
            if m.is_empty() { "" } else { ", " },
            m.join(" ")
        );
    }
    out
}
