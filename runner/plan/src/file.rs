//! The experiment file as written: parsed from YAML with positions, before any merging.

use crate::SpecError;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use std::path::Path;

/// Defines the config keys once: [`CONFIG_KEYS`], the fields of [`ConfigPart`] and of
/// [`StageFile`] (followed by the stage's own fields), [`StageFile::config_part`] and
/// [`ConfigPart::entries`]. A test keeps the list equal to the fields of [`crate::JobConfig`].
macro_rules! config_keys {
    ($($key:ident),* $(,)?; $(#[$stage_meta:meta])* pub struct StageFile { $($stage_fields:tt)* }) => {
        /// The keys of a job config that a file may set in `defaults` or in a stage.
        pub const CONFIG_KEYS: &[&str] = &[$(stringify!($key)),*];

        /// A partial job config, merged later; every key is checked against the job config's
        /// types after merging.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ConfigPart {
            $(
                #[serde(default, deserialize_with = "explicit")]
                pub $key: Option<Value>,
            )*
        }

        $(#[$stage_meta])*
        pub struct StageFile {
            $(
                #[serde(default, deserialize_with = "explicit")]
                pub $key: Option<Value>,
            )*
            $($stage_fields)*
        }

        impl StageFile {
            pub fn config_part(&self) -> ConfigPart {
                ConfigPart { $($key: self.$key.clone()),* }
            }
        }

        impl ConfigPart {
            /// The keys that are set, in [`CONFIG_KEYS`] order.
            pub fn entries(&self) -> Vec<(&'static str, &Value)> {
                let all = [$(&self.$key),*];
                CONFIG_KEYS.iter().zip(all).filter_map(|(k, v)| v.as_ref().map(|v| (*k, v))).collect()
            }
        }
    };
}

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
    /// Files merged under this one, in order (resolved before the rest is read; see [`parse`]).
    #[serde(default)]
    pub include: Vec<String>,
    /// At most this many jobs of the whole run at once (a stage's own `max_parallel` caps it).
    #[serde(default)]
    pub max_parallel: Option<u32>,
    /// Where the jobs run: `local` (this machine's devices, the default) or `{slurm: {...}}`.
    /// Not part of any job's identity: the same file gives the same jobs on either.
    #[serde(default)]
    pub executor: Option<Value>,
}

/// `executor:` at the top of a file: `local`, `slurm` (with Slurm's defaults) or
/// `{slurm: {partition: …, …}}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Executor {
    Local,
    Slurm(Box<Slurm>),
}

impl TryFrom<Value> for Executor {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        const EXPECTED: &str = "expected `local`, `slurm` or `{slurm: {partition: …, time: …}}`";
        let (name, body) = match v {
            Value::String(s) => (s, None),
            Value::Mapping(m) if m.len() == 1 => {
                let (k, body) = m.into_iter().next().expect("one entry");
                (k.as_str().unwrap_or_default().to_string(), Some(body))
            }
            _ => return Err(EXPECTED.into()),
        };
        match (name.as_str(), body) {
            ("local", None) => Ok(Executor::Local),
            ("local", Some(Value::Mapping(m))) if m.is_empty() => Ok(Executor::Local),
            ("slurm", None | Some(Value::Null)) => Ok(Executor::Slurm(Box::default())),
            ("slurm", Some(body)) => {
                serde_yaml::from_value(body).map(|s| Executor::Slurm(Box::new(s))).map_err(|e| format!("slurm: {e}"))
            }
            (other, _) => Err(format!("unknown executor `{other}`: {EXPECTED}")),
        }
    }
}

/// `executor: {slurm: {...}}`: each ready job becomes a Slurm batch job (a job array when a
/// stage has several ready at once) running `xlab-worker` on the node Slurm allocates.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Slurm {
    /// `--partition`.
    #[serde(default)]
    pub partition: Option<String>,
    /// `--account`.
    #[serde(default)]
    pub account: Option<String>,
    /// `--time`, in any form Slurm takes (`30`, `2:00:00`, `1-12`).
    #[serde(default)]
    pub time: Option<String>,
    /// `--gpus` of each job (0: a CPU job); a stage's `resources: {gpus: N}` overrides it.
    #[serde(default)]
    pub gpus_per_job: Option<u32>,
    /// `--cpus-per-task`, the job's thread count (default: `--threads`).
    #[serde(default)]
    pub cpus_per_job: Option<u32>,
    /// `--mem`, e.g. `16G`.
    #[serde(default)]
    pub mem: Option<String>,
    /// More `sbatch` arguments, as given (e.g. `--qos=high`, `--signal=TERM@120`).
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// At most this many tasks of one job array run at once (`--array=…%N`).
    #[serde(default)]
    pub array_parallelism: Option<u32>,
    /// Seconds between looks at the queue and the workers' event files (default 2).
    #[serde(default)]
    pub poll_s: Option<f64>,
    /// At most this many of your jobs in Slurm's queue at once, pending or running, each array
    /// task counted: a site limit `sacctmgr` does not show (xlab reads `MaxSubmitJobs` of your
    /// association and QOS where it can, and `MaxArraySize` always).
    #[serde(default)]
    pub max_submit: Option<u32>,
    /// Jobs per Slurm allocation (default 1): short jobs stop paying the queue's latency each.
    /// A pack of the same stage and resources runs `pack_at_once` of them side by side and the
    /// rest as those end; each is still its own job (identity, attempts, failure class).
    #[serde(default)]
    pub pack: Option<u32>,
    /// How many of a pack's jobs run at once (default: all of them; 1: one after another). The
    /// allocation asks for that many times `cpus_per_job`, `gpus_per_job` and `mem`, and for
    /// `time` times the number of jobs each lane runs in turn.
    #[serde(default)]
    pub pack_at_once: Option<u32>,
    /// `--time` of the coordinator itself under `xlab run --detach` (default: the partition's
    /// default time limit). When it runs out, the submitted jobs go on in Slurm and the same
    /// command re-attaches to them.
    #[serde(default)]
    pub coordinator_time: Option<String>,
}

config_keys! {
    task, data, model, optimizer, epochs, batch_size, step_rule, batch_transform, objective, sampler, guidance, denoiser,
    samples, sample_batch, sharpness, schedule, clip_grad_norm, label_smoothing, init, shuffle, augment, noop, deterministic, diffusion,
    precision, loss_scale, ema, reconstruct, attention, labels, negative;
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct StageFile {
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
        /// What each job takes from the device pool: `{slots: 2, device: cuda}`. Not part of
        /// the identity.
        #[serde(default)]
        pub resources: Option<ResourcesFile>,
        /// Run a job again after a crash, out-of-memory error or timeout, up to this many times
        /// (waiting 1 s, 2 s, 4 s, … between attempts; an out-of-memory job prefers another device).
        /// Not part of the identity, like the next two.
        #[serde(default)]
        pub retries: Option<u32>,
        /// Each attempt's wall-clock limit, in seconds (`timeout: 3600`) or with a unit (`90s`,
        /// `30m`, `2h`).
        #[serde(default)]
        pub timeout: Option<serde_yaml::Value>,
        /// The longest one training step may take (`10m`, `90s`, or seconds; 30 minutes unless
        /// set): a step past it ends its job as `hung`, naming the plugin call it is stuck in.
        #[serde(default)]
        pub step_timeout: Option<serde_yaml::Value>,
        /// Stop starting jobs after the first job of this stage fails deterministically (config
        /// error, divergence, worker error); running jobs finish.
        #[serde(default)]
        pub fail_fast: Option<bool>,
        /// Ready jobs of stages with a higher priority start first (default 0; ties go by stage
        /// order, then sweep order).
        #[serde(default)]
        pub priority: Option<i32>,
        /// At most this many of the stage's jobs run at once.
        #[serde(default)]
        pub max_parallel: Option<u32>,
        /// The stage this one consumes: `needs: train` (one child per parent job),
        /// `needs: {stage: train, select: all}` (one child that sees every parent job) or
        /// `needs: {stage: train, select: best, metric: val.acc, mode: max, k: 1, per: [...]}`
        /// (a child for each of the k best parent jobs, per group of `per` values).
        #[serde(default)]
        pub needs: Option<NeedsFile>,
        /// An adaptive search over the stage's points: `{algorithm: asha, metric: val.acc,
        /// mode: max, min_epochs: 1, reduction: 3}`. Not part of the identity: a trial is its
        /// config and seed with the full budget, and a rung is where it paused.
        #[serde(default)]
        pub search: Option<SearchFile>,
        /// The order the stage's jobs start in: `plan` (the sweep's, first key slowest),
        /// `shuffled` (a fixed random permutation) or `interleave` (a job of each value of the
        /// first swept key in turn, so that every method shows early). Not part of identity.
        #[serde(default)]
        pub order: Option<Order>,
    }
}

/// `order:` of a stage.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    #[default]
    Plan,
    Shuffled,
    Interleave,
}

/// `search:` on a stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchFile {
    pub algorithm: Algorithm,
    /// The metric trials are ranked by at each rung, as logged every epoch (`val.acc`,
    /// `val.worst_group_acc`, `train.loss`, ...).
    pub metric: String,
    #[serde(default)]
    pub mode: Mode,
    /// The first rung, in epochs (default 1).
    #[serde(default)]
    pub min_epochs: Option<u32>,
    /// η: each rung keeps the best 1/η of the trials that reached it (default 3, at least 2).
    #[serde(default)]
    pub reduction: Option<u32>,
    /// TPE: how many trials it proposes in all.
    #[serde(default)]
    pub trials: Option<u32>,
    /// TPE: how many trials are drawn at random before it models the results (default 10).
    #[serde(default)]
    pub startup: Option<u32>,
    /// TPE: the seed of its proposals (default 0).
    #[serde(default)]
    pub seed: Option<u64>,
    /// TPE: early stopping of its trials (`asha`), with `min_epochs` and `reduction`.
    #[serde(default)]
    pub stopping: Option<Stopping>,
}

/// Early stopping of a TPE search's trials (`search.stopping`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stopping {
    Asha,
}

/// The search algorithm of `search:`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Asynchronous successive halving (Li et al. 2020).
    Asha,
    Hyperband,
    Tpe,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Asha => "asha",
            Self::Hyperband => "hyperband",
            Self::Tpe => "tpe",
        }
    }
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
        if metric.trim().is_empty() {
            return Err("`metric:` is empty; name the parent metric that ranks the jobs, e.g. `metric: val.acc`".into());
        }
        let k = f.k.unwrap_or(1);
        if k == 0 {
            return Err("`k` must be at least 1".into());
        }
        Ok(Some(BestSpec { metric, mode: f.mode.unwrap_or_default(), k, per: f.per.clone() }))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RandomSweep {
    /// How many points to draw; absent under a TPE search, whose `trials` it is.
    #[serde(default)]
    pub samples: Option<u32>,
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
    #[serde(default)]
    pub every_epochs: Option<u32>,
    /// Checkpoint at the end of the first epoch that ends this many minutes or more after the
    /// last checkpoint (with `every_epochs` too: whichever comes first).
    #[serde(default)]
    pub every_minutes: Option<f64>,
    /// Checkpoint inside epochs too, after every this many optimizer steps (counted over the
    /// whole run); Ctrl-C then stops at the next such step instead of the epoch's end.
    #[serde(default)]
    pub every_steps: Option<u32>,
    /// A diffusion training also keeps its weights at the end of these epochs (1-based), as
    /// `weights-epoch{N}.safetensors` (and `weights_ema-epoch{N}.safetensors` with `ema:`), for
    /// sample stages that ask for `denoiser: {name: trained, epoch: N}`.
    #[serde(default)]
    pub keep_weights: Vec<u32>,
}

/// What one job of a stage takes from the device pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    /// Slots of one device the job takes (`--jobs-per-device` slots per device): a job with
    /// `slots: 2` on a CPU runs with the threads of two slots; on a GPU it shares the GPU with
    /// fewer jobs.
    #[serde(default)]
    pub slots: Option<u32>,
    /// The kind of device the job runs on: `cpu`, `cuda` or `any` (the default).
    #[serde(default)]
    pub device: Option<DeviceKind>,
    /// The job's memory estimate on its device, in GB: jobs with estimates share a device only
    /// while their sum fits its memory (a GPU's, or the machine's for the CPU).
    #[serde(default)]
    pub memory_gb: Option<f64>,
    /// Whole GPUs for the job (every slot of each); the worker sees them as `cuda:0`,
    /// `cuda:1`, … and trains on `cuda:0`. Instead of `slots`.
    #[serde(default)]
    pub gpus: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Any,
    Cpu,
    Cuda,
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

/// Reads an experiment file's text; a missing or non-UTF-8 file is a [`SpecError`].
pub fn read_text(path: &Path) -> Result<String, SpecError> {
    let bytes = std::fs::read(path).map_err(|e| {
        SpecError::new(path, format!("cannot read the experiment file: {e}"))
            .hint("check the path; experiment files usually live under experiments/")
    })?;
    let source = String::from_utf8(bytes).map_err(|e| {
        SpecError::new(path, format!("not a UTF-8 text file (invalid byte at offset {})", e.utf8_error().valid_up_to()))
            .hint("an experiment file is YAML text")
    })?;
    Ok(source)
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
    let doc = serde_yaml::from_str::<serde_yaml::Value>(source).map_err(|e| yaml_error(path, &e))?;
    if doc.get("include").is_none() && !has_interpolation(&doc) {
        return serde_yaml::from_str::<ExperimentFile>(source).map_err(|e| yaml_error(path, &e));
    }
    // With `include:` or `${…}`, the merged document is read (without line numbers: the keys'
    // paths still say where).
    let mut chain = vec![std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())];
    let mut merged = with_includes(path, doc, &mut chain)?;
    if let Value::Mapping(m) = &mut merged {
        m.remove("include");
    }
    let root = merged.clone();
    interpolate(path, &root, &mut merged, "")?;
    serde_path_to_error::deserialize::<_, ExperimentFile>(merged).map_err(|e| {
        let at = e.path().to_string();
        let err = yaml_error(path, e.inner());
        if at == "." {
            err
        } else {
            err.context(&at)
        }
    })
}

/// A document with its `include:` files merged under it: each included file (relative to the
/// including one, itself resolved the same way) in order, then the document over them. Maps
/// merge key by key; anything else is replaced by the later value.
fn with_includes(path: &Path, doc: Value, chain: &mut Vec<std::path::PathBuf>) -> Result<Value, SpecError> {
    if doc.get("include").is_none() {
        return Ok(doc);
    }
    let includes = include_list(&doc).map_err(|m| SpecError::new(path, m).context("include"))?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut merged = Value::Mapping(Default::default());
    for inc in includes {
        let p = base_dir.join(&inc);
        let abs = std::path::absolute(&p).unwrap_or_else(|_| p.clone());
        if chain.contains(&abs) {
            let names: Vec<String> = chain.iter().chain([&abs]).map(|c| c.display().to_string()).collect();
            return Err(SpecError::new(path, format!("`include` goes round in a circle: {}", names.join(" → ")))
                .context("include"));
        }
        let regular = std::fs::metadata(&p).and_then(|m| {
            if m.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"))
            }
        });
        let text = regular.and_then(|_| std::fs::read_to_string(&p)).map_err(|e| {
            SpecError::new(path, format!("cannot read included file {}: {e}", p.display()))
                .context("include")
                .hint("included paths are relative to the file that includes them")
        })?;
        let sub = serde_yaml::from_str::<Value>(&text).map_err(|e| yaml_error(&p, &e))?;
        chain.push(abs);
        let sub = with_includes(&p, sub, chain)?;
        chain.pop();
        merge_yaml(&mut merged, sub);
    }
    merge_yaml(&mut merged, doc);
    Ok(merged)
}

/// The files a document's `include:` names (a path or a list of paths; none without the key).
pub(crate) fn include_list(doc: &Value) -> Result<Vec<String>, &'static str> {
    match doc.get("include") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("`include` lists file paths"),
        Some(_) => Err("`include` is a file path or a list of them"),
    }
}

/// As the defaults merge into stages: maps merge key by key, except that a map naming another
/// variant (`name:` or `use:`) replaces the old one whole; anything else is replaced.
fn merge_yaml(base: &mut Value, over: Value) {
    let switches = |b: &serde_yaml::Mapping, o: &serde_yaml::Mapping| {
        ["name", "use"].iter().any(|k| matches!((b.get(*k), o.get(*k)), (Some(x), Some(y)) if x != y))
    };
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) if switches(b, &o) => *b = o,
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge_yaml(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn has_interpolation(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("${"),
        Value::Sequence(items) => items.iter().any(has_interpolation),
        Value::Mapping(m) => m.iter().any(|(k, v)| has_interpolation(k) || has_interpolation(v)),
        Value::Tagged(t) => has_interpolation(&t.value),
        _ => false,
    }
}

/// A string with its `${…}` references replaced.
pub(crate) enum Spliced<V> {
    /// The string was one reference: the value itself (a number stays a number).
    Value(V),
    Text(String),
}

/// Replaces the `${name}` references of `text`. A text that is one reference becomes the value;
/// references inside longer text are spliced in as text. `lookup` answers `None` for a reference
/// to leave as written (one resolved later).
pub(crate) fn splice<V, E>(
    text: &str,
    mut lookup: impl FnMut(&str) -> Result<Option<V>, E>,
    as_text: impl Fn(&V) -> String,
    unclosed: impl FnOnce() -> E,
) -> Result<Spliced<V>, E> {
    if let Some(name) = text.strip_prefix("${").and_then(|r| r.strip_suffix('}')).filter(|n| !n.contains("${")) {
        return Ok(match lookup(name.trim())? {
            Some(v) => Spliced::Value(v),
            None => Spliced::Text(text.to_string()),
        });
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(end) = rest[i..].find('}') else {
            return Err(unclosed());
        };
        match lookup(rest[i + 2..i + end].trim())? {
            Some(v) => out.push_str(&as_text(&v)),
            None => out.push_str(&rest[i..i + end + 1]),
        }
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(Spliced::Text(out))
}

/// A reference to the parent job (`${parent.config.optimizer.lr}`, `${parent.seed}`): resolved
/// per child job when the stages are expanded, not here.
pub(crate) fn is_parent_ref(name: &str) -> bool {
    name == "parent" || name.starts_with("parent.")
}

/// Replaces `${dotted.path}` references to other values of the document (`${defaults.optimizer.lr}`):
/// a string that is one reference takes the value itself (a number stays a number); a reference
/// inside longer text is spliced in as text. `${parent.…}` is left for the expansion.
fn interpolate(path: &Path, root: &Value, v: &mut Value, at: &str) -> Result<(), SpecError> {
    let here = || at.trim_start_matches('.').to_string();
    let lookup = |name: &str| -> Result<Option<Value>, SpecError> {
        if is_parent_ref(name) {
            return Ok(None);
        }
        let mut cur = root;
        for part in name.split('.') {
            cur = match cur.get(part) {
                Some(x) => x,
                None => {
                    return Err(SpecError::new(path, format!("`${{{name}}}` names nothing in this experiment"))
                        .context(here())
                        .hint("references are dotted paths from the top of the file, e.g. `${defaults.optimizer.lr}`"))
                }
            };
        }
        if has_interpolation(cur) {
            return Err(SpecError::new(path, format!("`${{{name}}}` refers to a value that is itself a reference"))
                .context(here()));
        }
        Ok(Some(cur.clone()))
    };
    match v {
        Value::String(s) if s.contains("${") => {
            let as_text = |v: &Value| match v {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
            };
            let unclosed = || SpecError::new(path, format!("`{s}`: a `${{` is not closed")).context(here());
            *v = match splice(s, lookup, as_text, unclosed)? {
                Spliced::Value(x) => x,
                Spliced::Text(t) => Value::String(t),
            };
        }
        Value::Sequence(items) => {
            for (i, x) in items.iter_mut().enumerate() {
                interpolate(path, root, x, &format!("{at}[{i}]"))?;
            }
        }
        Value::Mapping(m) => {
            for (k, x) in m.iter_mut() {
                let key = k.as_str().map(str::to_string).unwrap_or_default();
                interpolate(path, root, x, &format!("{at}.{key}"))?;
            }
        }
        _ => {}
    }
    Ok(())
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
guidance: {use: a.f}
reconstruct: {use: a.g}
attention: {use: a.h}
labels: none
negative: 3
diffusion: {}
denoiser: {name: exact}
samples: 3
sample_batch: 256
sharpness: {}
schedule: {name: cosine}
clip_grad_norm: 1.0
label_smoothing: 0.1
init: w.safetensors
shuffle: false
augment: {flip: true}
noop: {sleep_s: 0.1}
deterministic: true
precision: fp16
loss_scale: {init: 1024}
ema: {decay: 0.999}
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
