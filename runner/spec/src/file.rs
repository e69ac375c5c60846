//! The experiment file as written: parsed from YAML with positions, before any merging.

use crate::SpecError;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use std::path::Path;

/// The keys of a job config that a file may set in `defaults` or in a stage. Kept equal to the
/// fields of [`crate::JobConfig`] by a test.
pub const CONFIG_KEYS: &[&str] = &[
    "task",
    "data",
    "model",
    "optimizer",
    "epochs",
    "batch_size",
    "step_rule",
    "batch_transform",
    "objective",
    "sampler",
    "denoiser",
    "samples",
    "sharpness",
    "schedule",
    "clip_grad_norm",
    "label_smoothing",
    "init",
    "shuffle",
    "augment",
    "noop",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    /// The experiment's name; results are grouped under it.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Config shared by every stage; a stage's own keys override it (maps merge deeply).
    #[serde(default)]
    pub defaults: Option<ConfigPart>,
    pub stages: IndexMap<String, StageFile>,
    /// Extra plugin libraries or folders, relative to this file.
    #[serde(default)]
    pub plugins: Vec<String>,
}

/// A partial job config, merged later; every key is checked against the job config's types
/// after merging.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPart {
    #[serde(default, deserialize_with = "explicit")]
    pub task: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub data: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub model: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub optimizer: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub epochs: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub batch_size: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub step_rule: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub batch_transform: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub objective: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub sampler: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub denoiser: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub samples: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub sharpness: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub schedule: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub clip_grad_norm: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub label_smoothing: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub init: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub shuffle: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub augment: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub noop: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageFile {
    #[serde(default, deserialize_with = "explicit")]
    pub task: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub data: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub model: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub optimizer: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub epochs: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub batch_size: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub step_rule: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub batch_transform: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub objective: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub sampler: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub denoiser: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub samples: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub sharpness: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub schedule: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub clip_grad_norm: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub label_smoothing: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub init: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub shuffle: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub augment: Option<Value>,
    #[serde(default, deserialize_with = "explicit")]
    pub noop: Option<Value>,
    /// Cartesian product over dotted config keys, e.g. `optimizer.lr: [0.01, 0.1]`.
    #[serde(default)]
    pub grid: IndexMap<String, Vec<Value>>,
    /// Lists walked together: the i-th values of every key form one point.
    #[serde(default)]
    pub zip: IndexMap<String, Vec<Value>>,
    /// `samples` points drawn with their own `seed` from distributions per key:
    /// `uniform(a, b)`, `loguniform(a, b)`, `int(a, b)` (both ends included), `choice([x, y])`.
    #[serde(default)]
    pub random: Option<RandomSweep>,
    /// Partial configs, each with its own `grid` (conditional parameters: momentum only for SGD).
    #[serde(default)]
    pub variants: Vec<serde_yaml::Mapping>,
    /// `seeds: 3` means seeds 0, 1, 2; `seeds: [7, 8]` lists them.
    #[serde(default)]
    pub seeds: Option<Seeds>,
    /// How often jobs checkpoint. Not part of a job's identity: it changes how a job runs,
    /// not what it computes.
    #[serde(default)]
    pub checkpoint: Option<CheckpointPolicy>,
    /// Run a job again after a crash, out-of-memory error or timeout, up to this many times
    /// (waiting 1 s, 2 s, 4 s, … between attempts; an out-of-memory job prefers another device).
    /// Not part of the identity, like the next two.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Each attempt's wall-clock limit, in seconds (`timeout: 3600`) or with a unit (`90s`,
    /// `30m`, `2h`).
    #[serde(default)]
    pub timeout: Option<serde_yaml::Value>,
    /// Stop starting jobs after the first job of this stage fails deterministically (config
    /// error, divergence, worker error); running jobs finish.
    #[serde(default)]
    pub fail_fast: Option<bool>,
    /// The stage this one consumes: `needs: train` (one child per parent job),
    /// `needs: {stage: train, select: all}` (one child that sees every parent job) or
    /// `needs: {stage: train, select: best, metric: val.acc, mode: max, k: 1, per: [...]}`
    /// (a child for each of the k best parent jobs, per group of `per` values).
    #[serde(default)]
    pub needs: Option<NeedsFile>,
}

#[derive(Debug, Clone)]
pub enum NeedsFile {
    Stage(String),
    Full(NeedsFull),
}

impl<'de> Deserialize<'de> for NeedsFile {
    /// A stage name, or a map whose own errors (an unknown key, a bad `mode`) are reported as
    /// they are rather than as "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(NeedsFile::Stage(s)),
            v @ Value::Mapping(_) => NeedsFull::deserialize(v).map(NeedsFile::Full).map_err(D::Error::custom),
            _ => Err(D::Error::custom("expected a stage name, or `{stage: NAME, select: each|all|best, ...}`")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeedsFull {
    pub stage: String,
    #[serde(default)]
    pub select: Select,
    /// `select: best`: the parent metric (its final value) that ranks the parents.
    #[serde(default)]
    pub metric: Option<String>,
    /// `select: best`: whether larger (`max`, the default) or smaller (`min`) is better.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// `select: best`: how many of the best parents get a child (default 1).
    #[serde(default)]
    pub k: Option<u32>,
    /// `select: best`: parent config keys (dotted) whose values split the parents into groups
    /// ranked separately, e.g. `[objective.use]` for the best run of each method; `seed` ranks
    /// each seed's jobs apart (the child then takes that seed).
    #[serde(default)]
    pub per: Vec<String>,
}

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Max,
    Min,
}

/// How a `select: best` stage ranks its parent stage's jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BestSpec {
    pub metric: String,
    pub mode: Mode,
    pub k: u32,
    pub per: Vec<String>,
}

/// How a dependent stage fans out over its parent stage's jobs.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// One child per parent job; the child takes the parent's seed and sweep point.
    #[default]
    Each,
    /// One child (per own sweep point and seed) that sees every parent job.
    All,
    /// One child per rank 1..=k (per group of `per` values, own sweep point and seed), that sees
    /// the parent job ranked there by `metric` once every candidate has finished.
    Best,
}

impl NeedsFile {
    pub fn stage(&self) -> &str {
        match self {
            NeedsFile::Stage(s) => s,
            NeedsFile::Full(f) => &f.stage,
        }
    }

    pub fn select(&self) -> Select {
        match self {
            NeedsFile::Stage(_) => Select::Each,
            NeedsFile::Full(f) => f.select,
        }
    }

    /// The ranking of `select: best`; an error names a setting that is missing or misplaced.
    pub fn best(&self) -> Result<Option<BestSpec>, String> {
        let NeedsFile::Full(f) = self else { return Ok(None) };
        if f.select != Select::Best {
            let stray = [
                ("metric", f.metric.is_some()),
                ("mode", f.mode.is_some()),
                ("k", f.k.is_some()),
                ("per", !f.per.is_empty()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(format!("`{key}` only applies to `select: best`"));
            }
            return Ok(None);
        }
        let metric = f.metric.clone().ok_or("`select: best` needs `metric:`, the parent metric that ranks the jobs")?;
        let k = f.k.unwrap_or(1);
        if k == 0 {
            return Err("`k` must be at least 1".into());
        }
        Ok(Some(BestSpec { metric, mode: f.mode.unwrap_or_default(), k, per: f.per.clone() }))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RandomSweep {
    pub samples: u32,
    #[serde(default)]
    pub seed: u64,
    /// Dotted key → distribution.
    #[serde(flatten)]
    pub params: IndexMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPolicy {
    /// Checkpoint after every this many epochs (and after the last one).
    pub every_epochs: u32,
}

impl StageFile {
    pub fn config_part(&self) -> ConfigPart {
        ConfigPart {
            task: self.task.clone(),
            data: self.data.clone(),
            model: self.model.clone(),
            optimizer: self.optimizer.clone(),
            epochs: self.epochs.clone(),
            batch_size: self.batch_size.clone(),
            step_rule: self.step_rule.clone(),
            batch_transform: self.batch_transform.clone(),
            objective: self.objective.clone(),
            sampler: self.sampler.clone(),
            denoiser: self.denoiser.clone(),
            samples: self.samples.clone(),
            sharpness: self.sharpness.clone(),
            schedule: self.schedule.clone(),
            clip_grad_norm: self.clip_grad_norm.clone(),
            label_smoothing: self.label_smoothing.clone(),
            init: self.init.clone(),
            shuffle: self.shuffle.clone(),
            augment: self.augment.clone(),
            noop: self.noop.clone(),
        }
    }
}

impl ConfigPart {
    /// The keys that are set, in [`CONFIG_KEYS`] order.
    pub fn entries(&self) -> Vec<(&'static str, &Value)> {
        let all = [
            &self.task,
            &self.data,
            &self.model,
            &self.optimizer,
            &self.epochs,
            &self.batch_size,
            &self.step_rule,
            &self.batch_transform,
            &self.objective,
            &self.sampler,
            &self.denoiser,
            &self.samples,
            &self.sharpness,
            &self.schedule,
            &self.clip_grad_norm,
            &self.label_smoothing,
            &self.init,
            &self.shuffle,
            &self.augment,
            &self.noop,
        ];
        CONFIG_KEYS.iter().zip(all).filter_map(|(k, v)| v.as_ref().map(|v| (*k, v))).collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a seed count (e.g. `3`) or a list of seeds (e.g. `[0, 1, 2]`)")]
pub enum Seeds {
    Count(u64),
    List(Vec<u64>),
}

impl Seeds {
    pub fn list(&self) -> Vec<u64> {
        match self {
            Seeds::Count(n) => (0..*n).collect(),
            Seeds::List(v) => v.clone(),
        }
    }
}

/// A present key keeps its value even when it is `null` (`model: null` removes a default);
/// only a missing key is `None`.
fn explicit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Reads and parses an experiment file. Every malformed input becomes a [`SpecError`].
pub fn read(path: &Path) -> Result<(String, ExperimentFile), SpecError> {
    let bytes = std::fs::read(path).map_err(|e| {
        SpecError::new(path, format!("cannot read the experiment file: {e}"))
            .hint("check the path; experiment files usually live under experiments/")
    })?;
    let source = String::from_utf8(bytes).map_err(|e| {
        SpecError::new(path, format!("not a UTF-8 text file (invalid byte at offset {})", e.utf8_error().valid_up_to()))
            .hint("an experiment file is YAML text")
    })?;
    let file = parse(path, &source)?;
    Ok((source, file))
}

/// Parses experiment YAML from a string; `path` is used in messages only.
pub fn parse(path: &Path, source: &str) -> Result<ExperimentFile, SpecError> {
    if source.trim().is_empty() || source.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
        return Err(SpecError::new(path, "the file is empty")
            .hint("an experiment needs at least `name:` and `stages:`; see experiments/quickstart.yaml"));
    }
    if let Some((i, line)) =
        source.lines().enumerate().find(|(_, l)| l.starts_with('\t') || l.trim_start_matches(' ').starts_with('\t'))
    {
        let col = line.find('\t').unwrap_or(0) + 1;
        return Err(SpecError::new(path, "tab character in indentation")
            .at(i + 1, col)
            .hint("YAML indents with spaces only; replace the tab with spaces"));
    }
    // Untyped first: this catches duplicate keys (which typed maps would silently overwrite)
    // and syntax errors, with their positions.
    serde_yaml::from_str::<serde_yaml::Value>(source).map_err(|e| yaml_error(path, &e))?;
    serde_yaml::from_str::<ExperimentFile>(source).map_err(|e| yaml_error(path, &e))
}

/// A YAML error with a hint for the usual causes.
fn yaml_error(path: &Path, e: &serde_yaml::Error) -> SpecError {
    let err = SpecError::from_yaml(path, e);
    let m = err.message.as_str();
    let hint = if m.contains("did not find expected key") || m.contains("did not find expected '-'") {
        Some("check the indentation here: the keys of one map start in the same column")
    } else if m.contains("found unexpected end of stream") {
        Some("a quoted string or a bracket is not closed")
    } else if m.contains("mapping values are not allowed") {
        Some("a `key: value` inside a value: quote the value, or fix the indentation")
    } else if m.contains("duplicate entry") {
        Some("each key may appear once in a map; remove or rename the repeated one")
    } else if m.contains("repetition limit") || m.contains("recursion limit") {
        Some("the file expands (through anchors and aliases) to an enormous document")
    } else {
        None
    };
    match (hint, err.hint.is_none()) {
        (Some(h), true) => err.hint(h),
        _ => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CONFIG_KEYS`, `ConfigPart` and `StageFile` list the job config's fields by hand; this
    /// keeps them equal to the fields of `JobConfig`.
    #[test]
    fn config_keys_are_the_job_config_fields() {
        let full = r#"
task: sample
data: {name: two_moons}
model: {name: mlp}
optimizer: {name: sgd}
epochs: 1
batch_size: 1
step_rule: {use: a.b}
batch_transform: {use: a.c}
objective: {use: a.d}
sampler: {use: a.e}
denoiser: {name: exact}
samples: 3
sharpness: {}
schedule: {name: cosine}
clip_grad_norm: 1.0
label_smoothing: 0.1
init: w.safetensors
shuffle: false
augment: {flip: true}
noop: {sleep_s: 0.1}
"#;
        let cfg: crate::JobConfig = serde_yaml::from_str(full).unwrap();
        let v = serde_json::to_value(&cfg).unwrap();
        let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        let mut keys = CONFIG_KEYS.to_vec();
        keys.sort_unstable();
        assert_eq!(fields, keys);
        let part: ConfigPart = serde_yaml::from_str(full).unwrap();
        assert_eq!(part.entries().len(), CONFIG_KEYS.len());
        let stage: StageFile = serde_yaml::from_str(full).unwrap();
        assert_eq!(stage.config_part().entries().len(), CONFIG_KEYS.len());
    }
}
