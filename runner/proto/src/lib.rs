//! The wire protocol between the `xlab` coordinator and `xlab-worker` processes.
//!
//! The coordinator writes a [`JobRequest`] as JSON into the job's run folder and starts one
//! worker per job. The worker answers with a stream of [`Event`]s, one JSON object per line on
//! its standard output; its human-readable log goes to standard error, which the coordinator
//! keeps in the run folder. Nothing here links libtorch.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Version of this protocol; a worker refuses a request of another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// The machine a job ran on, beyond its host name: what a reproduction has to match.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// The CUDA version libtorch was built for (`13.0`), absent for a CPU-only libtorch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<String>,
    /// The NVIDIA driver's version, when the job ran on a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The GPU's name, when the job ran on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// The CPU's model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
}

/// Everything a worker needs to run one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub protocol: u32,
    /// The job's identity (see `xlab_plan::identity`).
    pub job_id: String,
    pub experiment: String,
    pub stage: String,
    /// The job's seed; every random draw of the job derives from it.
    pub seed: u64,
    /// The canonical resolved config of the job (validated by the coordinator).
    pub config: serde_json::Value,
    /// The device lease granted by the coordinator.
    pub lease: Lease,
    /// Folder for the job's artifacts (checkpoints, weights, logs).
    pub run_dir: PathBuf,
    /// The plugin libraries the job's components come from.
    #[serde(default)]
    pub plugins: Vec<plugins::PluginUse>,
    /// Write a checkpoint every this many epochs (and after the last one).
    #[serde(default = "one")]
    pub checkpoint_every: u32,
    /// Also write one inside an epoch after every this many optimizer steps (counted over the
    /// whole run).
    #[serde(default)]
    pub checkpoint_every_steps: Option<u32>,
    /// Also write one at the end of an epoch when this many milliseconds passed since the last.
    #[serde(default)]
    pub checkpoint_every_ms: Option<u64>,
    /// A training step that makes no progress for this long is a hung job (`step_timeout:`).
    #[serde(default)]
    pub step_timeout_ms: Option<u64>,
    /// The finished jobs this one consumes (`needs:` in the experiment file).
    #[serde(default)]
    pub parents: Vec<ParentRef>,
    /// An adaptive search's rung: the job stops after this epoch (fewer than its `epochs`),
    /// at a checkpoint, and ends as paused; promoted, it continues from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_after_epoch: Option<u64>,
    /// Epochs (1-based) at whose end a diffusion training keeps its weights as well
    /// (`checkpoint.keep_weights`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_weights: Vec<u32>,
    /// A finished job this one extends exactly (the same training with fewer epochs): with no
    /// checkpoint of its own, the worker starts from that job's checkpoint after `epoch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_from: Option<ContinueFrom>,
}

/// The finished job a training continues from, and the epoch of its checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContinueFrom {
    pub job_id: String,
    pub run_dir: PathBuf,
    pub epoch: u64,
}

/// A finished parent job, as its child sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    pub job_id: String,
    /// Its run folder, with its final weights and checkpoints.
    pub run_dir: PathBuf,
    /// Its resolved config.
    pub config: serde_json::Value,
}

fn one() -> u32 {
    1
}

/// The slice of the machine a worker may use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// `cpu` or `cuda:N` (as seen by the worker after CUDA_VISIBLE_DEVICES is applied).
    pub device: String,
    /// Intra-op threads the worker may use.
    pub threads: usize,
}

/// Why a job failed, classified so that retries and reports can act on it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// The job's config could not be turned into a runnable job (a user mistake).
    Config,
    /// Loss or weights became NaN or infinite.
    Diverged,
    /// The device ran out of memory.
    OutOfMemory,
    /// The worker exited with an error of its own.
    Error,
    /// The worker was killed by a signal or vanished without a final event.
    Crashed,
    /// The job ran past its time limit.
    Timeout,
    /// One training step made no progress for longer than the stage's `step_timeout`.
    Hung,
    /// The user stopped the run.
    Cancelled,
    /// A parent job failed, so this one could not run.
    ParentFailed,
    /// Not a failure: an adaptive search's trial stopped at a rung, at a checkpoint, as asked.
    Paused,
    /// Not a failure: the job's Slurm job left the queue before its worker started (cancelled
    /// while pending, or lost with the controller's state); it is submitted again and does not
    /// count against `retries:`.
    NotStarted,
    /// Not a failure: Slurm preempted the job for a higher-priority one; it is submitted again
    /// to resume from its last checkpoint and does not count against `retries:`.
    Preempted,
}

impl FailureCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Diverged => "diverged",
            Self::OutOfMemory => "out_of_memory",
            Self::Error => "error",
            Self::Crashed => "crashed",
            Self::Timeout => "timeout",
            Self::Hung => "hung",
            Self::Cancelled => "cancelled",
            Self::ParentFailed => "parent_failed",
            Self::Paused => "paused",
            Self::NotStarted => "not_started",
            Self::Preempted => "preempted",
        }
    }

    /// The cause [`FailureCause::as_str`] names.
    pub fn parse(name: &str) -> Option<FailureCause> {
        [
            Self::Config,
            Self::Diverged,
            Self::OutOfMemory,
            Self::Error,
            Self::Crashed,
            Self::Timeout,
            Self::Hung,
            Self::Cancelled,
            Self::ParentFailed,
            Self::Paused,
            Self::NotStarted,
            Self::Preempted,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }
}

/// One line of a worker's event stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The worker set up its device and is about to run.
    Started {
        pid: u32,
        device: String,
        libtorch: String,
        host: String,
        /// What else a result depends on: see [`Machine`].
        #[serde(default)]
        machine: Machine,
    },
    /// Scalar metric points, e.g. `train.loss` at step 3.
    Metrics {
        step: u64,
        #[serde(with = "floats::json")]
        values: BTreeMap<String, f64>,
    },
    /// The job continues from a checkpoint written by an earlier attempt.
    Resumed {
        epoch: u64,
        /// Batches into epoch `epoch + 1` (0: from the end of epoch `epoch`).
        #[serde(default)]
        step_in_epoch: u64,
        /// The finished job whose checkpoint it continues (`JobRequest::continue_from`), when
        /// not its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_job: Option<String>,
    },
    /// A checkpoint after `epoch` is durable at `path` (relative to the run folder).
    Checkpoint {
        epoch: u64,
        path: String,
        /// Batches into epoch `epoch + 1` (0: at the end of epoch `epoch`).
        #[serde(default)]
        step_in_epoch: u64,
    },
    /// A file the job produced and made durable, relative to the run folder.
    Artifact { name: String, path: String, kind: String },
    /// Something the researcher should know about the job's result although it did not fail
    /// (e.g. it predicts a single class on features that look unscaled).
    Warning { message: String },
    /// The job finished; `summary` holds its final metrics.
    Finished {
        #[serde(with = "floats::json")]
        summary: BTreeMap<String, f64>,
    },
    /// The job failed; the worker exits non-zero after sending this.
    Failed { cause: FailureCause, message: String },
}

impl Event {
    /// Encodes the event as one JSON line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("events always serialize")
    }

    /// Decodes one line of a worker's standard output.
    pub fn from_line(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_single_lines() {
        let mut values = BTreeMap::new();
        values.insert("train.loss".to_string(), 0.25);
        let events = [
            Event::Metrics { step: 3, values },
            Event::Failed { cause: FailureCause::Diverged, message: "loss is NaN at step 7\nsecond line".into() },
        ];
        for e in events {
            let line = e.to_line();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(Event::from_line(&line).unwrap(), e);
        }
    }

    #[test]
    fn nan_and_infinite_metrics_cross_the_stream() {
        let values: BTreeMap<String, f64> =
            [("plugin.ratio".to_string(), f64::NAN), ("train.loss".to_string(), 0.5)].into();
        let summary: BTreeMap<String, f64> = [("test.loss".to_string(), f64::INFINITY)].into();
        for e in [Event::Metrics { step: 4, values }, Event::Finished { summary }] {
            let back = Event::from_line(&e.to_line()).unwrap();
            match (&e, &back) {
                (Event::Metrics { values: a, .. }, Event::Metrics { values: b, .. })
                | (Event::Finished { summary: a }, Event::Finished { summary: b }) => {
                    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
                    for (k, v) in a {
                        assert!(v.to_bits() == b[k].to_bits() || (v.is_nan() && b[k].is_nan()), "{k}");
                    }
                }
                _ => panic!("{back:?}"),
            }
        }
    }

    #[test]
    fn unknown_event_is_an_error() {
        assert!(Event::from_line(r#"{"event":"exploded"}"#).is_err());
        assert!(Event::from_line(r#"{"event":"finished","summary":{},"extra":1}"#).is_err());
    }
}

pub mod floats;
pub mod pack;
pub mod plugins;
pub mod progress;

/// Files a training job leaves in its run folder for the jobs that depend on it.
pub mod artifacts {
    use serde::{Deserialize, Serialize};
    use std::path::{Path, PathBuf};

    /// The training examples a job misclassified during one epoch's training pass: each
    /// minibatch predicted in train mode, before its own update (what JTT's error set is
    /// built from).
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    pub struct TrainErrors {
        /// 1-based: the epoch whose training pass made these predictions.
        pub epoch: u64,
        pub n_train: u64,
        /// Indices of the misclassified examples, ascending.
        pub errors: Vec<u64>,
    }

    /// Where a job's run folder keeps the training-pass errors of `epoch` (1-based).
    pub fn train_errors_path(run_dir: &Path, epoch: u64) -> PathBuf {
        run_dir.join("train-errors").join(format!("epoch-{epoch:05}.json"))
    }

    /// Where a checkpoint was taken: `epoch` epochs completed, and `step` batches into the next
    /// one (0 at an epoch's end). Orders by progress.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub struct CheckpointPoint {
        pub epoch: u64,
        pub step: u64,
    }

    impl CheckpointPoint {
        /// The file stem: `ckpt-00000E` after an epoch, `ckpt-00000E-s0000000S` inside the next.
        pub fn stem(&self) -> String {
            match self.step {
                0 => format!("ckpt-{:06}", self.epoch),
                s => format!("ckpt-{:06}-s{s:08}", self.epoch),
            }
        }

        fn parse(name: &str) -> Option<CheckpointPoint> {
            let rest = name.strip_prefix("ckpt-")?.strip_suffix(".json")?;
            let (epoch, step) = match rest.split_once("-s") {
                Some((e, s)) => (e.parse().ok()?, s.parse().ok()?),
                None => (rest.parse().ok()?, 0),
            };
            Some(CheckpointPoint { epoch, step })
        }
    }

    /// Checks that a checkpoint's tensor file (in `run_dir`) has the size and SHA-256 its JSON
    /// records; a truncated or corrupt one is refused with what was found.
    pub fn check_tensor_file(run_dir: &Path, file: &str, bytes: u64, sha256: &str) -> Result<(), String> {
        use sha2::{Digest, Sha256};
        let path = run_dir.join(file);
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if data.len() as u64 != bytes || hex::encode(Sha256::digest(&data)) != sha256 {
            return Err(format!("{file} is truncated or corrupt ({} bytes, {bytes} expected)", data.len()));
        }
        Ok(())
    }

    /// The checkpoints in a run folder (by their JSON files), newest first.
    pub fn checkpoint_points(run_dir: &Path) -> Vec<CheckpointPoint> {
        let mut points: Vec<CheckpointPoint> = std::fs::read_dir(run_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| CheckpointPoint::parse(&e.file_name().into_string().ok()?))
                    .collect()
            })
            .unwrap_or_default();
        points.sort_unstable_by(|a, b| b.cmp(a));
        points
    }

    /// Reads the training-pass errors of `epoch` (1-based) from a job's run folder.
    pub fn read_train_errors(run_dir: &Path, epoch: u64) -> Result<TrainErrors, String> {
        let path = train_errors_path(run_dir, epoch);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let t: TrainErrors = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if t.epoch != epoch || t.errors.iter().any(|&i| i >= t.n_train) {
            return Err(format!("{} is inconsistent (epoch {}, n_train {})", path.display(), t.epoch, t.n_train));
        }
        Ok(t)
    }
}
