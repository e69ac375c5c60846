//! The records kept in the store, serialized as JSON values in sled trees.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An experiment as last run: its file, its text and its jobs by stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExperimentRecord {
    pub name: String,
    pub file: String,
    pub source: String,
    pub updated_unix: u64,
    pub stages: Vec<StageRecord>,
    /// The versions of the file run before this one (an edit, or another file with the same
    /// `name:`), oldest first; their jobs stay in the store and in `--all-versions` views.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<ExperimentVersion>,
}

/// A version of an experiment's file that was run and then replaced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExperimentVersion {
    /// 1 for the first version run.
    pub version: u32,
    pub file: String,
    pub source: String,
    pub updated_unix: u64,
    pub stages: Vec<StageRecord>,
}

impl ExperimentRecord {
    /// The current version's number (1 when the file was never replaced).
    pub fn version(&self) -> u32 {
        self.earlier.last().map_or(1, |e| e.version + 1)
    }

    /// Records that `next` replaces this run of the experiment: when the text differs (an edit,
    /// or another file with the same `name:`), the current version joins `earlier` (and keeps
    /// its jobs). The same text from another path (a moved checkout, `./x.yaml` for `x.yaml`) is
    /// the same version. Returns whether it made a new one.
    pub fn replace_with(&mut self, next: ExperimentRecord) -> bool {
        let replaced = next.source != self.source;
        let earlier = std::mem::take(&mut self.earlier);
        let old = std::mem::replace(self, next);
        self.earlier = earlier;
        if replaced {
            let version = old.version();
            self.earlier.push(ExperimentVersion {
                version,
                file: old.file,
                source: old.source,
                updated_unix: old.updated_unix,
                stages: old.stages,
            });
        }
        replaced
    }

    /// Jobs of earlier versions that the current one does not have: (stage, job id, version).
    pub fn hidden_jobs(&self) -> Vec<(&str, &str, u32)> {
        let current: std::collections::HashSet<&str> =
            self.stages.iter().flat_map(|s| s.jobs.iter().map(String::as_str)).collect();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for v in self.earlier.iter().rev() {
            for s in &v.stages {
                for j in &s.jobs {
                    if !current.contains(j.as_str()) && seen.insert(j.as_str()) {
                        out.push((s.name.as_str(), j.as_str(), v.version));
                    }
                }
            }
        }
        out
    }

    /// The experiment with the jobs of every version: each stage's jobs of the current version,
    /// then those only earlier versions ran (newest version first).
    pub fn with_all_versions(&self) -> ExperimentRecord {
        let mut all = ExperimentRecord { earlier: Vec::new(), ..self.clone() };
        for v in self.earlier.iter().rev() {
            merge_stages(&mut all.stages, v.stages.clone());
        }
        all
    }
}

/// Adds the stages and jobs of `from` that `into` lacks; returns whether it added any.
pub fn merge_stages(into: &mut Vec<StageRecord>, from: Vec<StageRecord>) -> bool {
    let mut changed = false;
    for s in from {
        match into.iter_mut().find(|m| m.name == s.name) {
            Some(m) => {
                for j in s.jobs {
                    if !m.jobs.contains(&j) {
                        m.jobs.push(j);
                        changed = true;
                    }
                }
                for k in s.sweep_keys {
                    if !m.sweep_keys.contains(&k) {
                        m.sweep_keys.push(k);
                    }
                }
            }
            None => {
                into.push(s);
                changed = true;
            }
        }
    }
    changed
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub name: String,
    pub sweep_keys: Vec<String>,
    pub jobs: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Known but never started.
    Pending,
    /// A worker holds it now (or held it when the coordinator stopped).
    Running,
    Done,
    Failed,
    /// Stopped before finishing, by the user or by a coordinator that went away.
    Interrupted,
    /// An adaptive search's trial waiting at a rung (at a checkpoint) to be promoted or pruned.
    Paused,
    /// An adaptive search's trial stopped early for good: others did better at its rung.
    Pruned,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
            Self::Paused => "paused",
            Self::Pruned => "pruned",
        }
    }
}

/// One attempt at running a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attempt {
    pub number: u32,
    pub started_unix: u64,
    pub ended_unix: Option<u64>,
    pub device: String,
    pub pid: Option<u32>,
    /// `done`, or the failure cause (`error`, `crashed`, `diverged`, ...).
    pub outcome: Option<String>,
    pub error: Option<String>,
    /// The Slurm job that ran it (`1234`, or `1234_5` for a task of a job array), when the run
    /// used the Slurm executor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
    /// Where the worker was when it crashed or hung (from its progress file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<FaultSite>,
}

/// Where a crash or a hang happened: the signal that ended the worker (none for a hang or an
/// exit without a report), the training step it was in, and the plugin call it was inside.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultSite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
}

/// Where a result came from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub xlab_version: String,
    /// The git commit the coordinator was built from; with uncommitted changes `-dirty+` and
    /// the first 12 hex digits of the SHA-256 of `git diff HEAD`, so two dirty builds differ.
    #[serde(default)]
    pub git_commit: Option<String>,
    pub libtorch: Option<String>,
    pub host: Option<String>,
    pub device: Option<String>,
    /// Threads the job's worker was given (CPU results depend on it: reductions split by thread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Plugin libraries used: id, version, file and its sha256.
    #[serde(default)]
    pub plugins: Vec<xlab_proto::plugins::PluginUse>,
    /// libtorch's CUDA version, the driver, the GPU and the CPU.
    #[serde(default, skip_serializing_if = "is_default")]
    pub machine: xlab_proto::Machine,
    /// The finished job (the same training with fewer epochs) whose checkpoint this one
    /// started from, instead of from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continued_from: Option<ContinuedFrom>,
}

/// Where a training that extends a finished one started: that job and its epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContinuedFrom {
    pub job: String,
    pub epoch: u64,
}

fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArtifactRecord {
    pub name: String,
    pub kind: String,
    /// Relative to the store's folder.
    pub path: String,
}

/// A job: identity, resolved config, status, attempts and final metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub experiment: String,
    pub stage: String,
    pub seed: u64,
    pub config: serde_json::Value,
    /// The swept values that distinguish this job within its stage.
    pub point: Vec<(String, serde_json::Value)>,
    pub parents: Vec<String>,
    /// With `select: best`: the parent (one of `parents`) the job was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<String>,
    pub status: JobStatus,
    pub attempts: Vec<Attempt>,
    /// Final value of each metric (NaN and infinities kept, see `xlab_proto::floats`).
    #[serde(with = "xlab_proto::floats::json")]
    pub summary: BTreeMap<String, f64>,
    pub provenance: Provenance,
    pub artifacts: Vec<ArtifactRecord>,
    /// What the worker warned about (its latest attempt), e.g. a single predicted class on
    /// unscaled features.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl JobRecord {
    /// The Slurm job of a running attempt that a Slurm run submitted: the job may still run in
    /// Slurm whether or not a coordinator follows it.
    pub fn in_slurm(&self) -> Option<&str> {
        if self.status != JobStatus::Running {
            return None;
        }
        self.attempts.last().filter(|a| a.ended_unix.is_none()).and_then(|a| a.slurm_job.as_deref())
    }
}

/// One decision of an adaptive search (`search:` on a stage), written to the store before it is
/// acted on. With the trials' metric series, the decisions are the search's whole state: a run
/// that starts again rebuilds it from them and never contradicts one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    pub experiment: String,
    pub stage: String,
    /// Its place in the stage's log, from 0.
    pub seq: u64,
    pub kind: DecisionKind,
    /// The trial (job id) it is about.
    pub trial: String,
    /// The rung (0 = the first) the trial starts towards (`start`), is promoted from
    /// (`promote`) or stops at (`prune`), and that rung's epoch.
    pub rung: u32,
    pub epoch: u64,
    /// The trial's metric at that rung (`promote`, `prune`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Its rank there (1: the best) among `of` trials that reached the rung, of which the best
    /// `keep` go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// The point a proposal (`suggest`) sets, by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
    /// How many finished trials (complete or pruned) a proposal rests on; below the search's
    /// `startup` it was drawn at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub based_on: Option<u32>,
    /// How a proposal was made: `random` (the search's startup) or `tpe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The Hyperband bracket of the trial (0: the one with every rung).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bracket: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// TPE proposes a new trial (its point in `params`).
    Suggest,
    /// A new trial starts, towards the first rung.
    Start,
    /// A paused trial continues from its checkpoint towards the next rung.
    Promote,
    /// A paused trial stops for good.
    Prune,
}

impl DecisionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Suggest => "suggest",
            Self::Start => "start",
            Self::Promote => "promote",
            Self::Prune => "prune",
        }
    }
}
