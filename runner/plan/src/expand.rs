//! Expansion: defaults ⊕ stage ⊕ sweep point → one validated job per point and seed.

use crate::config::Task;
use crate::config::{
    ComponentUse, DenoiserConfig, JobConfig, LabelsName, ModelConfig, SampleLabels, WeightsChoice, COMPONENT_SLOTS,
};
use crate::error::did_you_mean;
use crate::file::{BestSpec, ConfigPart, DeviceKind, ExperimentFile, Mode, Seeds, Select, CONFIG_KEYS};
use crate::identity::{content_config, job_id, normalize_numbers, IdentityInput, JobId, PluginRef};
use crate::sweep::{
    check_key, check_size, grid_factor, leaves, product, random_factor, random_space, zip_factor, Change, Dist, Factor,
    Point, MAX_STAGE_JOBS,
};
use crate::SpecError;
use indexmap::IndexMap;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use xlab_proto::plugins::{resolve_params, CheckFailure, JobCheck, ParamError, PluginUse, Registry};

/// Where plugin descriptions come from. The coordinator asks a worker process (it never loads a
/// plugin itself), and only when an experiment uses a component.
pub trait PluginSource {
    /// The registry, including the extra libraries or folders an experiment file names.
    fn registry(&mut self, extra: &[PathBuf]) -> Result<&Registry, String>;

    /// Checks what only running code can (see [`JobCheck`]): the coordinator asks
    /// `xlab-worker check`. Without a worker there is nothing more to check.
    fn check_jobs(&mut self, _jobs: &[JobCheck]) -> Result<Vec<CheckFailure>, String> {
        Ok(Vec::new())
    }
}

/// A fixed registry (tests, or a registry fetched earlier).
impl PluginSource for Registry {
    fn registry(&mut self, _extra: &[PathBuf]) -> Result<&Registry, String> {
        Ok(self)
    }
}

/// For callers that have no plugins: any component use is an error.
pub struct NoPlugins;

impl PluginSource for NoPlugins {
    fn registry(&mut self, _extra: &[PathBuf]) -> Result<&Registry, String> {
        Err("no plugin registry is available here".into())
    }
}

/// A validated experiment: every job resolved, checked and identified. Only a `Plan` can be run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub file: PathBuf,
    /// The file's text, kept with the results for provenance.
    pub source: String,
    pub stages: Vec<StagePlan>,
    /// At most this many jobs of the whole run at once (`max_parallel:` at the top of the file).
    pub max_parallel: Option<u32>,
    /// `executor:` at the top of the file, if set.
    pub executor: Option<crate::file::Executor>,
}

#[derive(Debug, Clone)]
pub struct StagePlan {
    pub name: String,
    /// The parent stage and how this one fans out over it.
    pub needs: Option<(String, Select)>,
    /// The dotted keys this stage sweeps over, in file order.
    pub sweep_keys: Vec<String>,
    pub jobs: Vec<Job>,
    /// The adaptive search over its jobs (its trials), if it has `search:`.
    pub search: Option<Search>,
    /// How to make a trial of a TPE search, whose jobs are proposed as it runs (`jobs` is then
    /// empty in the file's plan).
    pub template: Option<TrialTemplate>,
}

/// An adaptive search of a stage (`search:`), checked: every trial trains for `rungs`' last
/// entry epochs, pausing at each earlier one to be promoted or pruned.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    pub algorithm: crate::file::Algorithm,
    pub metric: String,
    pub mode: Mode,
    /// η.
    pub reduction: u32,
    /// The epochs of the rungs, increasing; the last is the full budget. A search without
    /// early stopping (TPE alone) has only that one.
    pub rungs: Vec<u64>,
    /// TPE's proposals, when it proposes the trials (`algorithm: tpe`).
    pub tpe: Option<TpeSearch>,
}

/// `algorithm: tpe`: how many trials, how many drawn at random first, the seed, and the space
/// (the distributions of `random:`, by key in name order).
#[derive(Debug, Clone, PartialEq)]
pub struct TpeSearch {
    pub trials: u32,
    pub startup: u32,
    pub seed: u64,
    pub space: Vec<(String, Dist)>,
}

/// What a stage whose trials are proposed as it runs (TPE) needs to make one: the stage's
/// config before its sweep, its seed and execution settings, and the plugins it resolved.
#[derive(Debug, Clone)]
pub struct TrialTemplate {
    base: Value,
    seed: u64,
    exec: Exec,
    extra: Vec<PathBuf>,
    registry: Option<xlab_proto::plugins::Registry>,
}

impl Search {
    /// How many trials it runs, of the stage's `jobs` (the points of its sweep) or proposed.
    pub fn trials(&self, jobs: usize) -> usize {
        self.tpe.as_ref().map_or(jobs, |t| t.trials as usize)
    }

    /// Epochs if every trial trained to the end (the exhaustive sweep), and at most what
    /// successive halving spends: each rung's best 1/η go on from the rung before (per bracket
    /// under Hyperband).
    pub fn budget(&self, trials: usize) -> (u64, u64) {
        let full = trials as u64 * self.rungs.last().copied().unwrap_or(0);
        let halving = self
            .brackets(trials)
            .iter()
            .map(|(skipped, members)| halving(&self.rungs[*skipped..], members.len() as u64, self.reduction))
            .sum();
        (full, halving)
    }

    /// The trials (positions 0..`trials` in trial order) of each bracket, and how many of the
    /// rungs it skips. ASHA and TPE have one bracket with every rung. Hyperband (Li et al. 2018)
    /// has one per rung: bracket `s` starts at rung `s`, and receives trials in proportion to
    /// ⌈B/(h+1)·η^h⌉ (B brackets, h = the halvings it makes), dealt in turn by smooth weighted
    /// round robin so that every bracket gets its first trials early.
    pub fn brackets(&self, trials: usize) -> Vec<(usize, Vec<usize>)> {
        if self.algorithm != crate::file::Algorithm::Hyperband {
            return vec![(0, (0..trials).collect())];
        }
        let b = self.rungs.len();
        let eta = f64::from(self.reduction);
        let weights: Vec<i64> = (0..b)
            .map(|s| {
                let h = (b - 1 - s) as i32;
                (b as f64 / (h + 1) as f64 * eta.powi(h)).ceil() as i64
            })
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; b];
        let mut out: Vec<(usize, Vec<usize>)> = (0..b).map(|s| (s, Vec::new())).collect();
        for t in 0..trials {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += w;
            }
            let pick = (0..b).max_by_key(|&s| (current[s], std::cmp::Reverse(s))).expect("a bracket");
            current[pick] -= total;
            out[pick].1.push(t);
        }
        out
    }
}

/// Epochs successive halving spends on `n` trials over `rungs`: each rung's best 1/η go on
/// (at least one, so that the best trial trains to the end).
fn halving(rungs: &[u64], n: u64, reduction: u32) -> u64 {
    let mut n = n;
    let mut before = 0;
    let mut total = 0;
    for (k, &r) in rungs.iter().enumerate() {
        if k > 0 {
            n = (n / u64::from(reduction)).max(n.min(1));
        }
        total += n * (r - before);
        before = r;
    }
    total
}

/// The metrics every training job logs at the end of each epoch, by prefix, which a search can
/// rank trials by.
const SEARCH_METRIC_PREFIXES: [&str; 3] = ["val.", "train.", "test."];

/// The metrics evaluation logs on a split (`val.acc`, …), besides those per class and group.
const EVALUATED: [&str; 5] = ["acc", "loss", "ece", "worst_class_recall", "worst_group_acc"];

/// Checks `search:` of stage `ctx` against its jobs (for TPE, the probes of its space) and its
/// `random:` distributions.
fn check_search(
    file: &Path,
    ctx: &str,
    s: &crate::file::SearchFile,
    jobs: &[Job],
    random: Option<&crate::file::RandomSweep>,
) -> Result<Search, SpecError> {
    use crate::file::Algorithm;
    let here = format!("{ctx}.search");
    let err = |key: &str, m: String| SpecError::new(file, m).context(here.clone()).key(key);
    let tpe_keys = [("trials", s.trials.is_some()), ("startup", s.startup.is_some()), ("seed", s.seed.is_some())];
    let tpe = match s.algorithm {
        Algorithm::Asha | Algorithm::Hyperband => {
            if let Some((k, _)) = tpe_keys.iter().chain(&[("stopping", s.stopping.is_some())]).find(|(_, set)| *set) {
                let name = if s.algorithm == Algorithm::Asha { "ASHA" } else { "Hyperband" };
                return Err(err(k, format!("`{k}` is TPE's; {name}'s trials are the points of the stage's sweep"))
                    .hint("remove it, or use `algorithm: tpe` over distributions in `random:`"));
            }
            None
        }
        Algorithm::Tpe => {
            let Some(trials) = s.trials else {
                return Err(err("algorithm", "TPE needs `trials`: how many points it proposes in all".into())
                    .hint("add e.g. `trials: 32`"));
            };
            if trials == 0 || u64::from(trials) > MAX_STAGE_JOBS {
                return Err(err("trials", format!("`trials` must be from 1 to {MAX_STAGE_JOBS}, got {trials}")));
            }
            let startup = s.startup.unwrap_or(10);
            if startup == 0 {
                return Err(err("startup", "`startup` must be at least 1: TPE models results it has".into())
                    .hint("the first `startup` trials are drawn at random (default 10)"));
            }
            if s.stopping.is_none() {
                if let Some(k) = [("min_epochs", s.min_epochs.is_some()), ("reduction", s.reduction.is_some())]
                    .iter()
                    .find_map(|(k, set)| set.then_some(*k))
                {
                    return Err(err(k, format!("`{k}` shapes early stopping, which this TPE search has none of"))
                        .hint("add `stopping: asha` to stop poor trials early, or remove it"));
                }
            }
            let random = random.expect("a TPE stage has `random:` (checked before its jobs)");
            let mut space = random_space(random)
                .map_err(|(m, h)| SpecError::new(file, m).context(format!("{ctx}.random")).hint(h))?;
            space.sort_by(|a, b| a.0.cmp(&b.0));
            Some(TpeSearch { trials, startup, seed: s.seed.unwrap_or(0), space })
        }
    };
    if !SEARCH_METRIC_PREFIXES.iter().any(|p| s.metric.starts_with(p)) || s.metric.contains(' ') {
        return Err(err("metric", format!("`{}` is not a metric trials log at every epoch", s.metric))
            .hint("rank by a `val.` metric such as `val.acc`, `val.loss` or `val.worst_group_acc`"));
    }
    // What evaluation logs on the validation and test splits.
    if let Some(name) = s.metric.strip_prefix("val.").or_else(|| s.metric.strip_prefix("test.")) {
        let indexed = ["class_recall.", "group_acc.", "group_loss."]
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())));
        if !indexed && !EVALUATED.contains(&name) {
            let split = &s.metric[..s.metric.len() - name.len()];
            let hint = match did_you_mean(name, EVALUATED.iter().copied()) {
                Some(c) => format!("did you mean `{split}{c}`?"),
                None => format!(
                    "evaluation logs {}, and per class or group `class_recall.K`, `group_acc.K`, `group_loss.K`",
                    EVALUATED.map(|m| format!("`{split}{m}`")).join(", ")
                ),
            };
            return Err(err("metric", format!("no trial logs `{}`", s.metric)).hint(hint));
        }
        let by_group = name.starts_with("group_") || name == "worst_group_acc";
        if by_group && jobs.iter().all(|j| j.config.data.has_groups() == Some(false)) {
            return Err(err("metric", format!("no trial logs `{}`: the stage's data has no groups", s.metric))
                .hint("group metrics come from data with groups (`spurious`, or a file with a `group` column); rank by e.g. `val.worst_class_recall` or `val.acc`"));
        }
        if s.metric.starts_with("val.") && !jobs.is_empty() && jobs.iter().all(|j| j.config.data.n_val() == 0) {
            return Err(err(
                "metric",
                format!("no trial logs `{}`: the stage's data has no validation split", s.metric),
            )
            .hint("give the data a validation split (`data: {n_val: …}`), or rank by a `train.` metric"));
        }
    }
    let reduction = s.reduction.unwrap_or(3);
    if reduction < 2 {
        return Err(err(
            "reduction",
            format!("`reduction` is η, the fraction 1/η a rung keeps: it must be at least 2, got {reduction}"),
        ));
    }
    let mut epochs: Option<u32> = None;
    for j in jobs {
        if j.config.task != Task::Train {
            return Err(SpecError::new(
                file,
                "`search:` pauses and promotes training jobs, but this stage's task is not `train`",
            )
            .context(here.clone()));
        }
        match epochs {
            None => epochs = Some(j.config.epochs),
            Some(e) if e != j.config.epochs => {
                return Err(SpecError::new(
                    file,
                    format!(
                        "a search's trials share one budget, but this stage's jobs train for {e} and {} epochs",
                        j.config.epochs
                    ),
                )
                .context(here.clone())
                .hint("sweep other keys than `epochs` in a search stage"))
            }
            Some(_) => {}
        }
    }
    let epochs = u64::from(epochs.unwrap_or(1));
    let min = u64::from(s.min_epochs.unwrap_or(1));
    if min == 0 || min > epochs {
        return Err(err(
            "min_epochs",
            format!("`min_epochs` is the first rung: from 1 to the stage's `epochs` ({epochs}), got {min}"),
        ));
    }
    let mut rungs = Vec::new();
    let stops_early = tpe.is_none() || s.stopping.is_some();
    let mut r = min;
    while stops_early && r < epochs {
        rungs.push(r);
        r = r.saturating_mul(u64::from(reduction));
    }
    rungs.push(epochs);
    Ok(Search { algorithm: s.algorithm, metric: s.metric.clone(), mode: s.mode, reduction, rungs, tpe })
}

/// One job: a stage at one sweep point and one seed.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: JobId,
    /// The identity xlab gave this job before files were identified by content alone (their
    /// absolute path was part of it), when that differs: a store made then holds the job under
    /// it, and [`Plan::adopt_earlier_ids`] finds it there.
    pub earlier_id: Option<JobId>,
    pub stage: String,
    pub seed: u64,
    pub config: JobConfig,
    /// The canonical resolved config: what the identity hashes and the worker receives.
    pub config_json: Value,
    /// The swept values of this job, e.g. `[("optimizer.lr", 0.1)]`.
    pub point: Vec<(String, Value)>,
    pub parents: Vec<JobId>,
    /// With `select: best`: which of `parents` this job consumes, chosen when they have all
    /// finished. `parents` are then the candidates.
    pub pick: Option<Pick>,
    /// The plugin libraries its components come from.
    pub plugins: Vec<PluginUse>,
    /// How the job runs (not part of its identity).
    pub exec: Exec,
}

/// The parent a `select: best` job consumes: the one ranked `rank` (1 = best) by the final
/// value of `metric` among its finished candidates (ties broken by job id).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pick {
    pub metric: String,
    pub mode: Mode,
    pub rank: u32,
}

impl Pick {
    /// Ranks finished candidates `(job id, final metrics)`; returns the chosen id, or why none.
    /// A candidate whose metric is NaN (a diverged run) ranks after every other, in either mode.
    pub fn choose<'a>(
        &self,
        candidates: &[(&'a str, &std::collections::BTreeMap<String, f64>)],
    ) -> Result<&'a str, String> {
        let mut scored = Vec::new();
        for (id, summary) in candidates {
            match summary.get(&self.metric) {
                Some(v) => scored.push((*v, *id)),
                None => {
                    let mut have: Vec<&str> = summary.keys().map(String::as_str).collect();
                    have.truncate(12);
                    return Err(format!(
                        "parent job {id} has no metric `{}` to rank by (it has: {})",
                        self.metric,
                        have.join(", ")
                    ));
                }
            }
        }
        scored.sort_by(|a, b| {
            let by = match self.mode {
                Mode::Max => b.0.total_cmp(&a.0),
                Mode::Min => a.0.total_cmp(&b.0),
            };
            a.0.is_nan().cmp(&b.0.is_nan()).then(by).then(a.1.cmp(b.1))
        });
        scored.get(self.rank as usize - 1).map(|(_, id)| *id).ok_or_else(|| {
            format!(
                "rank {} of `{}` needs {} finished parent jobs, {} finished",
                self.rank,
                self.metric,
                self.rank,
                scored.len()
            )
        })
    }
}

/// Execution settings of a job: they change how it runs, never what it computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub checkpoint_every_epochs: u32,
    /// Also checkpoint at the end of an epoch when this many milliseconds passed since the last.
    pub checkpoint_every_ms: Option<u64>,
    /// Also checkpoint inside an epoch after every this many optimizer steps.
    pub checkpoint_every_steps: Option<u32>,
    /// Epochs (1-based) at whose end a diffusion training keeps its weights.
    pub keep_weights: Vec<u32>,
    /// Slots of one device the job takes.
    pub slots: u32,
    pub device: DeviceKind,
    /// The job's memory estimate on its device, in MiB (0: none).
    pub memory_mib: u64,
    /// Whole GPUs the job takes (0: slots of one device instead).
    pub gpus: u32,
    /// Further attempts after a crash, out-of-memory error or timeout.
    pub retries: u32,
    /// Wall-clock limit of one attempt, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// The longest one training step may take before the job is `hung`, in milliseconds.
    pub step_timeout_ms: u64,
    pub fail_fast: bool,
    /// Higher starts first among ready jobs.
    pub priority: i32,
    /// The stage's cap on jobs running at once.
    pub max_parallel: Option<u32>,
}

/// A training step that runs longer than this (30 minutes) is taken as hung, unless the stage
/// sets `step_timeout:`.
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 30 * 60 * 1000;

/// `3600`, `90s`, `30m`, `2h` → seconds.
fn parse_duration(v: &serde_yaml::Value) -> Result<f64, String> {
    let bad = || format!("must be seconds (`3600`) or a duration (`90s`, `30m`, `2h`), got {}", yaml_str(v));
    let secs = match v {
        serde_yaml::Value::Number(n) => n.as_f64().ok_or_else(bad)?,
        serde_yaml::Value::String(s) => {
            let s = s.trim();
            let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
            let x: f64 = num.trim().parse().map_err(|_| bad())?;
            x * match unit {
                "" | "s" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            }
        }
        _ => return Err(bad()),
    };
    if secs > 0.0 && secs.is_finite() {
        Ok(secs)
    } else {
        Err(bad())
    }
}

fn yaml_str(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).map(|s| s.trim().to_string()).unwrap_or_default()
}

impl Plan {
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.stages.iter().flat_map(|s| s.jobs.iter())
    }

    /// Gives each job that a store holds only under its earlier identity (see
    /// [`Job::earlier_id`]) that identity back, and its children the parent ids that go with it,
    /// so results recorded before files were identified by content are found, not rerun.
    /// `held`: whether the store holds a job. Returns how many jobs took their earlier id.
    pub fn adopt_earlier_ids(&mut self, held: &mut dyn FnMut(&str) -> bool) -> usize {
        let mut renamed: std::collections::HashMap<JobId, JobId> = std::collections::HashMap::new();
        for stage in &mut self.stages {
            for job in &mut stage.jobs {
                for p in &mut job.parents {
                    if let Some(to) = renamed.get(p) {
                        *p = to.clone();
                    }
                }
                if let Some(earlier) = &job.earlier_id {
                    if !held(job.id.as_str()) && held(earlier.as_str()) {
                        renamed.insert(job.id.clone(), earlier.clone());
                        job.id = earlier.clone();
                    }
                }
            }
        }
        renamed.len()
    }
}

impl Job {
    /// The jobs this one extends exactly, longest first: `(epochs, id)` of the same training
    /// with fewer epochs (the same config otherwise, seed, plugins and parents). A diffusion
    /// training draws every batch from (seed, epoch, batch) and its learning rate does not look
    /// at the epoch count unless the schedule is cosine, so its first E epochs are those of the
    /// same training run for E epochs: this job can continue from such a job's checkpoint after
    /// epoch E (weights, optimizer and EMA state) and end where a fresh run would, bit for bit.
    /// Empty for anything else (classifier training, a cosine schedule, plugin components, whose
    /// setup sees the epoch count).
    pub fn extends(&self) -> Vec<(u32, JobId)> {
        let c = &self.config;
        let exact = c.task == Task::Train
            && c.diffusion.is_some()
            && c.components().is_empty()
            && !matches!(c.schedule, crate::config::Schedule::Cosine(_));
        if !exact {
            return Vec::new();
        }
        let refs: Vec<PluginRef> =
            self.plugins.iter().map(|u| PluginRef { id: u.id.clone(), version: u.version.clone() }).collect();
        let pick = self.pick.as_ref().map(|p| serde_json::to_value(p).expect("picks serialize"));
        (1..c.epochs)
            .rev()
            .map(|e| {
                let mut config = self.config_json.clone();
                config["epochs"] = Value::from(e);
                let config = content_config(&config);
                let input = IdentityInput {
                    config: &config,
                    seed: self.seed,
                    plugins: &refs,
                    parents: &self.parents,
                    pick: pick.as_ref(),
                };
                (e, job_id(&input))
            })
            .collect()
    }

    /// A short human label of the sweep point, e.g. `optimizer.lr=0.1 seed=0`.
    pub fn label(&self) -> String {
        let show = |v: &Value| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut parts: Vec<String> = self.point.iter().map(|(k, v)| format!("{k}={}", show(v))).collect();
        parts.push(format!("seed={}", self.seed));
        parts.join(" ")
    }
}

fn yaml_to_json(file: &Path, ctx: &str, v: &serde_yaml::Value) -> Result<Value, SpecError> {
    serde_json::to_value(v).map(|j| normalize_numbers(&j)).map_err(|e| {
        SpecError::new(file, format!("cannot be represented as a config value: {e}")).context(ctx.to_string())
    })
}

/// Recursively merges `over` into `base`: maps merge key by key, anything else replaces. A map
/// that names a different variant (`name:` of a dataset, model or optimizer, `use:` of a
/// component) replaces the old one whole: its parameters belong to the old variant.
pub fn deep_merge(base: &mut Value, over: &Value) {
    let switches = |b: &Map<String, Value>, o: &Map<String, Value>| {
        ["name", "use"].iter().any(|k| matches!((b.get(*k), o.get(*k)), (Some(x), Some(y)) if x != y))
    };
    match (base, over) {
        (Value::Object(b), Value::Object(o)) if switches(b, o) => *b = o.clone(),
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => deep_merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn merge_part(file: &Path, ctx: &str, into: &mut Value, part: &ConfigPart) -> Result<(), SpecError> {
    for (k, v) in part.entries() {
        let v = yaml_to_json(file, &format!("{ctx}.{k}"), v)?;
        let mut over = Map::new();
        over.insert(k.to_string(), v);
        deep_merge(into, &Value::Object(over));
    }
    Ok(())
}

/// Sets a dotted key such as `optimizer.lr`, creating maps on the way.
fn set_dotted(root: &mut Value, key: &str, v: Value) -> Result<(), String> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() {
            return Err(format!("`{key}` has an empty segment"));
        }
        let obj = match cur {
            Value::Object(o) => o,
            other => {
                return Err(format!(
                    "`{}` is {}, not a map, so `{key}` cannot be set",
                    parts[..i].join("."),
                    kind(other)
                ))
            }
        };
        if i + 1 == parts.len() {
            obj.insert(p.to_string(), v);
            return Ok(());
        }
        cur = obj.entry(p.to_string()).or_insert_with(|| Value::Object(Map::new()));
    }
    unreachable!("split always yields one part")
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// The config keys `xlab-worker check` reads: jobs that agree on them are checked once.
const CHECKED_KEYS: [&str; 13] = [
    "task",
    "data",
    "model",
    "step_rule",
    "batch_transform",
    "objective",
    "sampler",
    "guidance",
    "reconstruct",
    "diffusion",
    "denoiser",
    "epochs",
    "batch_size",
];

/// Whether a job has anything that only running code can check: components, data read from a
/// file, or a TorchScript model. (Built-in data and models are checked here.)
fn worth_checking(config: &JobConfig) -> bool {
    use crate::config::{DataConfig, ModelConfig};
    if config.task == Task::Noop {
        return false;
    }
    !config.components().is_empty()
        || matches!(config.data, DataConfig::Npz(_) | DataConfig::Csv(_))
        || matches!(config.model, Some(ModelConfig::Torchscript(_)))
}

/// Resolves, validates and identifies every job of a parsed experiment file.
pub fn expand(
    file: &Path,
    source: String,
    exp: ExperimentFile,
    plugins: &mut dyn PluginSource,
) -> Result<Plan, SpecError> {
    if exp.name.trim().is_empty() {
        return Err(SpecError::new(file, "`name` is empty")
            .key("name")
            .hint("give the experiment a name, e.g. `name: quickstart`"));
    }
    if exp.stages.is_empty() {
        return Err(SpecError::new(file, "`stages` is empty")
            .key("stages")
            .hint("declare at least one stage, e.g. `stages: {train: {task: train}}`"));
    }
    let mut defaults = Value::Object(Map::new());
    if let Some(d) = &exp.defaults {
        merge_part(file, "defaults", &mut defaults, d)?;
    }
    let base_dir = file.parent().unwrap_or(Path::new("."));
    let extra: Vec<PathBuf> = exp.plugins.iter().map(|p| base_dir.join(p)).collect();
    for p in &extra {
        if !p.exists() {
            return Err(SpecError::new(file, format!("plugin path {} does not exist", p.display()))
                .context("plugins")
                .hint("paths in `plugins:` are relative to the experiment file"));
        }
    }
    let mut seen = HashSet::new();
    // Jobs for `xlab-worker check`, one per distinct data, model and components: (context, job).
    let mut checked: HashSet<String> = HashSet::new();
    let mut to_check: Vec<(String, JobCheck)> = Vec::new();
    let mut stages = Vec::new();
    let order = stage_order(file, &exp)?;
    let mut expanded: std::collections::HashMap<String, Vec<Job>> = std::collections::HashMap::new();
    for stage_name in order {
        let stage = &exp.stages[stage_name.as_str()];
        let stage_name = &stage_name;
        let ctx = format!("stages.{stage_name}");
        let needs = stage.needs.as_ref().map(|n| (n.stage().to_string(), n.select()));
        let best = match &stage.needs {
            Some(n) => n.best().map_err(|m| SpecError::new(file, m).context(format!("{ctx}.needs")))?,
            None => None,
        };
        if needs.as_ref().is_some_and(|(_, sel)| *sel == Select::Each) && stage.seeds.is_some() {
            return Err(SpecError::new(
                file,
                "a stage that needs another with `select: each` takes its parents' seeds",
            )
            .context(format!("{ctx}.seeds"))
            .hint("remove `seeds:` here, or use `select: all`"));
        }
        if best.as_ref().is_some_and(|b| b.per.iter().any(|k| k == "seed")) && stage.seeds.is_some() {
            return Err(SpecError::new(file, "a stage that picks the best job `per: [seed]` takes its parents' seeds")
                .context(format!("{ctx}.seeds"))
                .hint("remove `seeds:` here, or `seed` from `per`"));
        }
        let mut base = defaults.clone();
        merge_part(file, &ctx, &mut base, &stage.config_part())?;
        let tpe = stage.search.as_ref().is_some_and(|s| s.algorithm == crate::file::Algorithm::Tpe);
        if tpe {
            check_tpe_stage(file, &ctx, stage)?;
        }
        if let Some((parent, _)) = &needs {
            let proposed =
                exp.stages[parent.as_str()].search.as_ref().is_some_and(|s| s.algorithm == crate::file::Algorithm::Tpe);
            if proposed {
                return Err(SpecError::new(
                    file,
                    format!(
                        "`{parent}` is a TPE search, whose trials are only known as it runs: a stage cannot need it"
                    ),
                )
                .context(format!("{ctx}.needs"))
                .hint("run the best trial's config (`xlab search-log`, `xlab show`) in a stage of its own"));
            }
        }

        let mut factors: Vec<Factor> = Vec::new();
        for (key, values) in &stage.grid {
            factors.push(grid_factor(key, &sweep_values(file, &format!("{ctx}.grid"), key, values)?));
        }
        if !stage.zip.is_empty() {
            let mut keys = Vec::new();
            for (key, values) in &stage.zip {
                keys.push((key.clone(), sweep_values(file, &format!("{ctx}.zip"), key, values)?));
            }
            factors.push(zip_factor(&keys).map_err(|m| SpecError::new(file, m).context(format!("{ctx}.zip")))?);
        }
        if let Some(r) = &stage.random {
            let factor =
                if tpe { random_space(r).map(|space| crate::sweep::probe_factor(&space)) } else { random_factor(r) };
            factors.push(factor.map_err(|(m, h)| SpecError::new(file, m).context(format!("{ctx}.random")).hint(h))?);
        }
        if !stage.variants.is_empty() {
            let mut alternatives = Vec::new();
            let named = stage.variants.iter().filter(|v| v.contains_key("name")).count();
            if named > 0 && named < stage.variants.len() {
                let i = stage.variants.iter().position(|v| !v.contains_key("name")).unwrap_or(0);
                return Err(SpecError::new(file, "some variants have a `name` and this one has none")
                    .context(format!("{ctx}.variants[{i}]"))
                    .hint("name every variant (tables and legends then show `variant=NAME`) or none"));
            }
            let mut names: Vec<String> = Vec::new();
            for (i, v) in stage.variants.iter().enumerate() {
                let here = format!("{ctx}.variants[{i}]");
                let mut map = v.clone();
                let grid = map.remove("grid");
                // `name:` labels the variant in tables and legends instead of the keys it sets.
                let name = match map.remove("name") {
                    None => None,
                    Some(serde_yaml::Value::String(n)) if !n.trim().is_empty() => {
                        if names.contains(&n) {
                            return Err(SpecError::new(file, format!("two variants are named `{n}`"))
                                .context(here.clone())
                                .key("name")
                                .hint("give each variant its own name"));
                        }
                        names.push(n.clone());
                        Some(n)
                    }
                    Some(other) => {
                        return Err(SpecError::new(
                            file,
                            format!("a variant's `name` is text, not {}", yaml_str(&other)),
                        )
                        .context(here.clone())
                        .key("name"))
                    }
                };
                for k in map.keys() {
                    let name = k.as_str().unwrap_or_default();
                    if !CONFIG_KEYS.contains(&name) {
                        let mut e = SpecError::new(file, format!("unknown key `{name}` in a variant"))
                            .context(here.clone())
                            .key(name);
                        e.hint = Some(match did_you_mean(name, CONFIG_KEYS.iter().copied()) {
                            Some(c) => format!("did you mean `{c}`?"),
                            None => {
                                format!(
                                    "a variant sets config keys ({}) and may have a `name` and a `grid`",
                                    CONFIG_KEYS.join(", ")
                                )
                            }
                        });
                        return Err(e);
                    }
                }
                let partial = yaml_to_json(file, &here, &serde_yaml::Value::Mapping(map))?;
                let mut label = Vec::new();
                match name {
                    Some(n) => label.push(("variant".to_string(), Value::String(n))),
                    None => leaves("", &partial, &mut label),
                }
                let mut own: Vec<Factor> = vec![vec![Point { changes: vec![Change::Merge(partial)], label }]];
                if let Some(g) = grid {
                    let g: IndexMap<String, Vec<serde_yaml::Value>> = serde_yaml::from_value(g).map_err(|e| {
                        SpecError::new(file, format!("`grid` must map keys to lists: {e}")).context(here.clone())
                    })?;
                    for (key, values) in &g {
                        own.push(grid_factor(key, &sweep_values(file, &format!("{here}.grid"), key, values)?));
                    }
                }
                check_size(&own, "a variant's grid")
                    .map_err(|m| SpecError::new(file, m).context(here.clone()).hint("sweep fewer values"))?;
                alternatives.extend(product(&own));
            }
            factors.push(alternatives);
        }
        check_size(&factors, "the sweep")
            .map_err(|m| SpecError::new(file, m).context(ctx.clone()).hint("sweep fewer values"))?;
        let points = product(&factors);
        let mut sweep_keys: Vec<String> = Vec::new();
        for p in &points {
            for (k, _) in &p.label {
                if !sweep_keys.contains(k) {
                    sweep_keys.push(k.clone());
                }
            }
        }
        let timeout_ms = match &stage.timeout {
            None => None,
            Some(v) => Some(
                parse_duration(v)
                    .map(|s| (s * 1000.0).ceil() as u64)
                    .map_err(|m| SpecError::new(file, format!("`timeout` {m}")).context(format!("{ctx}.timeout")))?,
            ),
        };
        let step_timeout_ms = match &stage.step_timeout {
            None => DEFAULT_STEP_TIMEOUT_MS,
            Some(v) => parse_duration(v).map(|s| (s * 1000.0).ceil() as u64).map_err(|m| {
                SpecError::new(file, format!("`step_timeout` {m}")).context(format!("{ctx}.step_timeout"))
            })?,
        };
        let ckpt = stage.checkpoint.as_ref();
        let every_minutes = ckpt.and_then(|c| c.every_minutes);
        if every_minutes.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
            return Err(SpecError::new(file, "`checkpoint.every_minutes` must be a number > 0")
                .context(format!("{ctx}.checkpoint"))
                .key("every_minutes"));
        }
        let every_epochs = match ckpt {
            // Only a time cadence: epochs end without a checkpoint until the time is up.
            Some(c) if c.every_epochs.is_none() && (c.every_minutes.is_some() || c.every_steps.is_some()) => u32::MAX,
            Some(c) => c.every_epochs.unwrap_or(1),
            None => 1,
        };
        let resources = stage.resources.as_ref();
        let exec = Exec {
            checkpoint_every_epochs: every_epochs,
            checkpoint_every_steps: ckpt.and_then(|c| c.every_steps),
            keep_weights: ckpt.map(|c| c.keep_weights.clone()).unwrap_or_default(),
            checkpoint_every_ms: every_minutes.map(|m| (m * 60_000.0).round().max(1.0) as u64),
            slots: resources.and_then(|r| r.slots).unwrap_or(1),
            device: resources.and_then(|r| r.device).unwrap_or_default(),
            memory_mib: resources.and_then(|r| r.memory_gb).map(|g| (g * 1024.0).ceil() as u64).unwrap_or(0),
            gpus: resources.and_then(|r| r.gpus).unwrap_or(0),
            retries: stage.retries.unwrap_or(0),
            timeout_ms,
            step_timeout_ms,
            fail_fast: stage.fail_fast.unwrap_or(false),
            priority: stage.priority.unwrap_or(0),
            max_parallel: stage.max_parallel,
        };
        if exec.max_parallel == Some(0) {
            return Err(
                SpecError::new(file, "`max_parallel` must be at least 1").context(format!("{ctx}.max_parallel"))
            );
        }
        if exec.checkpoint_every_epochs == 0 {
            return Err(SpecError::new(file, "`checkpoint.every_epochs` must be at least 1")
                .context(format!("{ctx}.checkpoint"))
                .key("every_epochs"));
        }
        if exec.checkpoint_every_steps == Some(0) {
            return Err(SpecError::new(file, "`checkpoint.every_steps` must be at least 1")
                .context(format!("{ctx}.checkpoint"))
                .key("every_steps"));
        }
        if resources.and_then(|r| r.memory_gb).is_some_and(|g| !(g > 0.0 && g.is_finite())) {
            return Err(SpecError::new(file, "`resources.memory_gb` must be a number > 0")
                .context(format!("{ctx}.resources"))
                .key("memory_gb"));
        }
        if let Some(r) = resources.filter(|r| r.gpus.is_some()) {
            let why = if r.gpus == Some(0) {
                Some("`resources.gpus` must be at least 1")
            } else if r.slots.is_some() {
                Some("`resources` asks for whole GPUs (`gpus`) or slots of one device (`slots`), not both")
            } else if r.device == Some(DeviceKind::Cpu) {
                Some("`resources.gpus` asks for GPUs, but `device` is `cpu`")
            } else {
                None
            };
            if let Some(m) = why {
                return Err(SpecError::new(file, m).context(format!("{ctx}.resources")).key("gpus"));
            }
        }
        if exec.slots == 0 {
            return Err(SpecError::new(file, "`resources.slots` must be at least 1")
                .context(format!("{ctx}.resources"))
                .key("slots"));
        }
        let n_seeds = match &stage.seeds {
            Some(Seeds::Count(n)) => *n,
            Some(Seeds::List(v)) => v.len() as u64,
            None => 1,
        };
        if (points.len() as u64).checked_mul(n_seeds).is_none_or(|n| n > MAX_STAGE_JOBS) {
            return Err(SpecError::new(
                file,
                format!(
                    "{} point(s) × {n_seeds} seed(s) is more than the {MAX_STAGE_JOBS} jobs a stage may run",
                    points.len()
                ),
            )
            .context(format!("{ctx}.seeds"))
            .hint("run fewer seeds or sweep fewer values"));
        }
        let seeds = stage.seeds.as_ref().map(|s| s.list()).unwrap_or_else(|| vec![0]);
        if seeds.is_empty() {
            return Err(SpecError::new(file, "`seeds` is empty")
                .context(ctx)
                .hint("use `seeds: 1` or list at least one seed"));
        }
        if let Some(d) = first_duplicate(&seeds) {
            return Err(SpecError::new(file, format!("seed {d} is listed twice")).context(format!("{ctx}.seeds")));
        }

        let mut jobs = Vec::new();
        for sweep_point in points {
            let mut cfg = base.clone();
            for change in &sweep_point.changes {
                match change {
                    Change::Set(k, v) => {
                        set_dotted(&mut cfg, k, v.clone()).map_err(|m| SpecError::new(file, m).context(ctx.clone()))?
                    }
                    Change::Merge(partial) => deep_merge(&mut cfg, partial),
                }
            }
            let point = sweep_point.label;
            let point_ctx = if point.is_empty() {
                ctx.clone()
            } else {
                let p: Vec<String> = point.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{ctx} [{}]", p.join(", "))
            };
            // (seed, parents, extra label, pick) of each job at this point.
            let instances: Vec<Instance> = match &needs {
                None => seeds.iter().map(|s| (*s, Vec::new(), Vec::new(), None)).collect(),
                Some((parent, Select::Each)) => expanded[parent.as_str()]
                    .iter()
                    .map(|p| {
                        (
                            p.seed,
                            vec![p.id.clone()],
                            p.point.iter().map(|(k, v)| (format!("{parent}.{k}"), v.clone())).collect(),
                            None,
                        )
                    })
                    .collect(),
                Some((parent, Select::All)) => {
                    let ids: Vec<JobId> = expanded[parent.as_str()].iter().map(|p| p.id.clone()).collect();
                    seeds.iter().map(|s| (*s, ids.clone(), Vec::new(), None)).collect()
                }
                Some((parent, Select::Best)) => {
                    let spec = best.as_ref().expect("select: best has its spec");
                    best_instances(file, &ctx, parent, &expanded[parent.as_str()], spec, &seeds)?
                }
            };
            let refers_to_parent = has_parent_ref(&cfg);
            // Without `${parent.…}` every job of the point has the same config, checked once.
            let mut shared: Option<Resolved> = None;
            for (seed, parents, parent_label, pick) in instances {
                let resolved = if refers_to_parent {
                    let parent_jobs: Vec<&Job> = match &needs {
                        Some((parent, _)) => {
                            expanded[parent.as_str()].iter().filter(|j| parents.contains(&j.id)).collect()
                        }
                        None => Vec::new(),
                    };
                    let mut cfg = cfg.clone();
                    let parent_stage = needs.as_ref().map(|(p, _)| p.as_str());
                    resolve_parent_refs(file, &point_ctx, &mut cfg, parent_stage, &parent_jobs, "")?;
                    resolve_job_config(file, &point_ctx, cfg, needs.is_some(), plugins, &extra)?
                } else {
                    match &shared {
                        Some(r) => r.clone(),
                        None => shared
                            .insert(resolve_job_config(
                                file,
                                &point_ctx,
                                cfg.clone(),
                                needs.is_some(),
                                plugins,
                                &extra,
                            )?)
                            .clone(),
                    }
                };
                let Resolved { mut config, mut config_json, used, guides } = resolved;
                let parent_jobs: Vec<&Job> = match &needs {
                    Some((parent, _)) => expanded[parent.as_str()].iter().filter(|j| parents.contains(&j.id)).collect(),
                    None => Vec::new(),
                };
                let parent_stage = needs.as_ref().map(|(p, _)| p.as_str());
                check_sampling(&config, guides, parent_stage, &parent_jobs).map_err(|(key, message, hint)| {
                    key.split('.')
                        .fold(SpecError::new(file, message).context(point_ctx.clone()), |e, k| e.key(k))
                        .hint(hint)
                })?;
                // Kept weights are a diffusion training's, of epochs it trains.
                if !exec.keep_weights.is_empty() {
                    let bad = |m: String, hint: &str| {
                        SpecError::new(file, m)
                            .context(format!("{ctx}.checkpoint"))
                            .key("keep_weights")
                            .hint(hint.to_string())
                    };
                    if config.task != Task::Train || config.diffusion.is_none() {
                        return Err(bad(
                            "`checkpoint.keep_weights` keeps a diffusion training's weights at chosen epochs, and this \
                             stage trains no diffusion model"
                                .into(),
                            "drop `keep_weights`, or use it on a stage with `task: train` and `diffusion:`",
                        ));
                    }
                    if let Some(e) = exec.keep_weights.iter().find(|&&e| e == 0 || e > config.epochs) {
                        return Err(bad(
                            format!(
                                "epoch {e} in `checkpoint.keep_weights`, but the stage trains epochs 1 to {}",
                                config.epochs
                            ),
                            "list epochs the stage trains (its last one's weights are kept anyway)",
                        ));
                    }
                }
                // A sample job records whose weights it draws from: the average when the
                // parent keeps one.
                if let Some(DenoiserConfig::Trained(t)) = &mut config.denoiser {
                    if t.weights.is_none()
                        && !parent_jobs.is_empty()
                        && parent_jobs.iter().all(|j| j.config.ema.is_some())
                    {
                        t.weights = Some(WeightsChoice::Ema);
                        config_json["denoiser"]["weights"] = Value::String("ema".into());
                    }
                }
                let refs: Vec<PluginRef> =
                    used.iter().map(|u| PluginRef { id: u.id.clone(), version: u.version.clone() }).collect();
                let pick_json = pick.as_ref().map(|p| serde_json::to_value(p).expect("picks serialize"));
                let by_content = content_config(&config_json);
                let id = job_id(&IdentityInput {
                    config: &by_content,
                    seed,
                    plugins: &refs,
                    parents: &parents,
                    pick: pick_json.as_ref(),
                });
                // The same job as identified before: absolute paths in the config, and the
                // parents' earlier ids.
                let parent_jobs = needs.as_ref().map(|(p, _)| &expanded[p.as_str()]);
                let earlier_parents: Vec<JobId> = parents
                    .iter()
                    .map(|p| {
                        parent_jobs
                            .and_then(|js| js.iter().find(|j| &j.id == p))
                            .and_then(|j| j.earlier_id.clone())
                            .unwrap_or_else(|| p.clone())
                    })
                    .collect();
                let earlier = job_id(&IdentityInput {
                    config: &config_json,
                    seed,
                    plugins: &refs,
                    parents: &earlier_parents,
                    pick: pick_json.as_ref(),
                });
                let earlier_id = (earlier != id).then_some(earlier);
                if worth_checking(&config) {
                    let what: Map<String, Value> = CHECKED_KEYS
                        .iter()
                        .filter_map(|k| config_json.get(*k).map(|v| (k.to_string(), v.clone())))
                        .chain([("needs".to_string(), Value::Bool(!parents.is_empty()))])
                        .collect();
                    if checked.insert(crate::identity::canonical_json(&Value::Object(what))) {
                        to_check.push((
                            point_ctx.clone(),
                            JobCheck {
                                config: config_json.clone(),
                                seed,
                                has_parents: !parents.is_empty(),
                                plugins: used.clone(),
                            },
                        ));
                    }
                }
                if !seen.insert(id.clone()) {
                    return Err(SpecError::new(
                        file,
                        format!("two jobs resolve to the same config and seed (job {id})"),
                    )
                    .context(point_ctx)
                    .hint("remove the repeated sweep value, variant or stage"));
                }
                jobs.push(Job {
                    id,
                    earlier_id,
                    stage: stage_name.clone(),
                    seed,
                    config,
                    config_json,
                    point: parent_label.into_iter().chain(point.iter().cloned()).collect(),
                    parents,
                    pick,
                    plugins: used,
                    exec: exec.clone(),
                });
            }
        }
        if let Some(order) = stage.order {
            if tpe {
                return Err(SpecError::new(file, "`order` sets the order of a sweep's jobs; TPE proposes its own")
                    .context(ctx.clone())
                    .key("order")
                    .hint("remove `order`"));
            }
            reorder(&mut jobs, order, stage_name);
        }
        let search = match &stage.search {
            Some(s) => Some(check_search(file, &ctx, s, &jobs, stage.random.as_ref())?),
            None => None,
        };
        // A TPE stage's jobs so far are the probes of its space, checked like any job; its
        // trials are made from the template as it proposes them.
        let mut template = None;
        if tpe {
            for j in &jobs {
                seen.remove(&j.id);
            }
            let registry = if jobs.iter().any(|j| !j.plugins.is_empty()) {
                Some(plugins.registry(&extra).map_err(|m| SpecError::new(file, m).context(ctx.clone()))?.clone())
            } else {
                None
            };
            template = Some(TrialTemplate {
                base: base.clone(),
                seed: seeds[0],
                exec: exec.clone(),
                extra: extra.clone(),
                registry,
            });
            jobs.clear();
        }
        expanded.insert(stage_name.clone(), jobs.clone());
        stages.push(StagePlan { name: stage_name.clone(), needs, sweep_keys, jobs, search, template });
    }
    if exp.max_parallel == Some(0) {
        return Err(SpecError::new(file, "`max_parallel` must be at least 1").key("max_parallel"));
    }
    if !to_check.is_empty() {
        let jobs: Vec<JobCheck> = to_check.iter().map(|(_, j)| j.clone()).collect();
        let found = plugins.check_jobs(&jobs).map_err(|m| {
            SpecError::new(file, format!("cannot check the jobs' data and components before running them: {m}"))
                .hint("build the worker with `make build`, or point XLAB_WORKER at it")
        })?;
        if let Some(f) = found.first() {
            let ctx = &to_check.get(f.index).map_or("", |(c, _)| c.as_str());
            let context = if f.key.is_empty() { ctx.to_string() } else { format!("{ctx}: {}", f.key) };
            let hint = match f.key.as_str() {
                "data" => "xlab reads each job's data before running anything; fix the file or the data keys",
                "model" => "xlab builds each job's model before running anything",
                _ => "xlab constructs each component with its parameters (and sets it up with the job's data) before running anything",
            };
            return Err(SpecError::new(file, f.message.clone()).context(context).hint(hint));
        }
    }
    let executor = match exp.executor {
        None => None,
        Some(v) => {
            let e = crate::file::Executor::try_from(v).map_err(|m| match m.strip_prefix("slurm: ") {
                Some(m) => SpecError::new(file, m).under(&["executor", "slurm"]),
                None => SpecError::new(file, m).under(&["executor"]),
            })?;
            if let crate::file::Executor::Slurm(s) = &e {
                for (key, v) in [
                    ("array_parallelism", s.array_parallelism),
                    ("cpus_per_job", s.cpus_per_job),
                    ("max_submit", s.max_submit),
                    ("pack", s.pack),
                    ("pack_at_once", s.pack_at_once),
                ] {
                    if v == Some(0) {
                        return Err(SpecError::new(file, format!("`{key}` must be at least 1"))
                            .key("executor")
                            .key("slurm")
                            .key(key));
                    }
                }
                if s.poll_s.is_some_and(|p| !(p > 0.0 && p <= 600.0)) {
                    return Err(SpecError::new(file, "`poll_s` must be above 0 and at most 600")
                        .key("executor")
                        .key("slurm")
                        .key("poll_s"));
                }
            }
            Some(e)
        }
    };
    Ok(Plan { name: exp.name, file: file.to_path_buf(), source, stages, max_parallel: exp.max_parallel, executor })
}

/// Puts a stage's jobs in the order they start (`order:`): the sweep's (as expanded), a
/// permutation fixed by the stage's name, or a job of each value of the first swept key in turn
/// (its values in first-seen order, each one's jobs in the sweep's order).
fn reorder(jobs: &mut Vec<Job>, order: crate::file::Order, stage: &str) {
    use crate::file::Order;
    match order {
        Order::Plan => {}
        Order::Shuffled => {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let seed =
                stage.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
            jobs.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        }
        Order::Interleave => {
            let mut groups: Vec<(Option<Value>, std::collections::VecDeque<Job>)> = Vec::new();
            for j in jobs.drain(..) {
                let key = j.point.first().map(|(_, v)| v.clone());
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, g)) => g.push_back(j),
                    None => groups.push((key, std::collections::VecDeque::from([j]))),
                }
            }
            while groups.iter().any(|(_, g)| !g.is_empty()) {
                for (_, g) in &mut groups {
                    if let Some(j) = g.pop_front() {
                        jobs.push(j);
                    }
                }
            }
        }
    }
}

/// What a TPE stage cannot have: TPE proposes points from the distributions of `random:`, one
/// job (one seed) per trial, in a stage of its own.
fn check_tpe_stage(file: &Path, ctx: &str, stage: &crate::file::StageFile) -> Result<(), SpecError> {
    let grid_hint = "write the keys under `random:` as distributions (uniform, loguniform, int, choice), or use \
                     `algorithm: asha` over the grid";
    if let Some((key, _)) =
        [("grid", !stage.grid.is_empty()), ("zip", !stage.zip.is_empty()), ("variants", !stage.variants.is_empty())]
            .into_iter()
            .find(|(_, set)| *set)
    {
        return Err(SpecError::new(file, format!("TPE proposes points from distributions, not from a `{key}:`"))
            .context(ctx.to_string())
            .key(key)
            .hint(grid_hint));
    }
    let Some(r) = &stage.random else {
        return Err(SpecError::new(
            file,
            "TPE proposes points from the distributions of `random:`, and this stage has none",
        )
        .context(format!("{ctx}.search"))
        .key("algorithm")
        .hint("add e.g. `random: {optimizer.lr: loguniform(1e-4, 1e-1)}`"));
    };
    if r.samples.is_some() {
        return Err(SpecError::new(
            file,
            "`random.samples` does not apply under TPE: `search.trials` is how many points it tries",
        )
        .context(format!("{ctx}.random"))
        .key("samples")
        .hint("remove `samples`"));
    }
    if stage.needs.is_some() {
        return Err(SpecError::new(file, "a TPE search runs in a stage of its own, without `needs:`")
            .context(format!("{ctx}.needs"))
            .hint("move the search to a stage that trains from scratch"));
    }
    let seeds = match &stage.seeds {
        Some(Seeds::Count(n)) => *n,
        Some(Seeds::List(v)) => v.len() as u64,
        None => 1,
    };
    if seeds != 1 {
        return Err(SpecError::new(file, format!("TPE proposes one job per trial, but `seeds` gives {seeds}"))
            .context(format!("{ctx}.seeds"))
            .hint("use one seed (`seeds: 1` or `seeds: [N]`), and run more seeds of the best trial in a stage of their own"));
    }
    Ok(())
}

impl Plan {
    /// Makes a trial of TPE stage `stage` at `point` (its keys set to the values TPE proposed):
    /// resolved, checked and identified as the same point of a `grid:` would be.
    pub fn make_trial(&self, stage: &str, point: &[(String, Value)]) -> Result<Job, SpecError> {
        let file = self.file.as_path();
        let t = self
            .stages
            .iter()
            .find(|s| s.name == stage)
            .and_then(|s| s.template.as_ref())
            .ok_or_else(|| SpecError::new(file, format!("stage `{stage}` does not propose trials")))?;
        let labels: Vec<String> = point.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let ctx = format!("stages.{stage} [{}]", labels.join(", "));
        let mut cfg = t.base.clone();
        for (k, v) in point {
            set_dotted(&mut cfg, k, v.clone()).map_err(|m| SpecError::new(file, m).context(ctx.clone()))?;
        }
        let mut registry = t.registry.clone();
        let source: &mut dyn PluginSource = match &mut registry {
            Some(r) => r,
            None => &mut NoPlugins,
        };
        let Resolved { config, config_json, used, guides } =
            resolve_job_config(file, &ctx, cfg, false, source, &t.extra)?;
        check_sampling(&config, guides, None, &[]).map_err(|(key, message, hint)| {
            key.split('.').fold(SpecError::new(file, message).context(ctx.clone()), |e, k| e.key(k)).hint(hint)
        })?;
        let refs: Vec<PluginRef> =
            used.iter().map(|u| PluginRef { id: u.id.clone(), version: u.version.clone() }).collect();
        let id = job_id(&IdentityInput {
            config: &content_config(&config_json),
            seed: t.seed,
            plugins: &refs,
            parents: &[],
            pick: None,
        });
        let earlier =
            job_id(&IdentityInput { config: &config_json, seed: t.seed, plugins: &refs, parents: &[], pick: None });
        Ok(Job {
            earlier_id: (earlier != id).then_some(earlier),
            id,
            stage: stage.to_string(),
            seed: t.seed,
            config,
            config_json,
            point: point.to_vec(),
            parents: Vec::new(),
            pick: None,
            plugins: used,
            exec: t.exec.clone(),
        })
    }
}

/// A job's config checked and resolved: typed, canonical JSON, and the plugins it uses.
#[derive(Clone)]
struct Resolved {
    config: JobConfig,
    config_json: Value,
    used: Vec<PluginUse>,
    /// The sampler combines the conditional and unconditional predictions itself.
    guides: bool,
}

fn resolve_job_config(
    file: &Path,
    ctx: &str,
    cfg: Value,
    has_needs: bool,
    plugins: &mut dyn PluginSource,
    extra: &[PathBuf],
) -> Result<Resolved, SpecError> {
    let mut config = validate(file, ctx, cfg)?;
    let (used, guides) = resolve_components(file, ctx, &mut config, plugins, extra)?;
    if config.task == Task::Evaluate && !has_needs {
        return Err(SpecError::new(
            file,
            "`task: evaluate` evaluates a parent stage's jobs, but this stage has no `needs:`",
        )
        .context(ctx.to_string())
        .hint("add e.g. `needs: train`"));
    }
    let config_json = normalize_numbers(&serde_json::to_value(&config).expect("configs serialize"));
    Ok(Resolved { config, config_json, used, guides })
}

/// Checks a sample job against the jobs it samples from, before anything runs: the parent
/// stage trains a diffusion model, guidance has a conditional model with a trained null label,
/// the sampler's steps fit the schedule, and the data rows have the parent's width. Each
/// failure is (config key, message, hint).
fn check_sampling(
    config: &JobConfig,
    guides: bool,
    parent_stage: Option<&str>,
    parents: &[&Job],
) -> Result<(), (String, String, String)> {
    if !matches!(config.task, Task::Sample | Task::Invert) {
        return Ok(());
    }
    let steps = |slot: &'static str, c: &Option<ComponentUse>| {
        c.as_ref().and_then(|s| s.params.get("steps")).and_then(Value::as_u64).map(|n| (slot, n))
    };
    let steps = [steps("sampler", &config.sampler), steps("reconstruct", &config.reconstruct)];
    let too_many = |timesteps: u32, whose: String| {
        let (slot, n) = steps.iter().flatten().find(|(_, n)| *n > u64::from(timesteps))?;
        Some((
            format!("{slot}.steps"),
            format!("{n} steps is more than the {timesteps} timesteps {whose}"),
            format!("use at most {timesteps} steps"),
        ))
    };
    match &config.denoiser {
        Some(DenoiserConfig::Exact(d)) => {
            // The closed-form sampler's steps are Euler steps in continuous time, not timesteps.
            let continuous = config.sampler.as_ref().is_some_and(|s| s.id.ends_with(".closed_form"));
            match too_many(d.timesteps, "of `denoiser`".into()) {
                Some(e) if !continuous => Err(e),
                _ => Ok(()),
            }
        }
        Some(DenoiserConfig::Trained(t)) => {
            let Some(stage) = parent_stage else {
                return Err((
                    "denoiser".into(),
                    "`denoiser: {name: trained}` samples from the model a parent stage trains, but this stage has no `needs:`".into(),
                    "add `needs: STAGE` naming a stage with `task: train` and `diffusion:`".into(),
                ));
            };
            for parent in parents {
                let Some(d) = &parent.config.diffusion else {
                    return Err((
                        "needs".into(),
                        format!("`needs: {stage}` names a stage that trains no diffusion model"),
                        format!(
                            "`denoiser: {{name: trained}}` samples from a stage with `task: train` and `diffusion:`; `{stage}` has {}",
                            if parent.config.task == Task::Train { "no `diffusion:`" } else { "another task" }
                        ),
                    ));
                };
                // A self-guiding sampler (`diffusion.pcg`) needs what guidance needs.
                let (key, what) = if guides {
                    ("sampler", format!("`{}`", config.sampler.as_ref().map_or("the sampler", |s| s.id.as_str())))
                } else {
                    ("guidance", "guidance".to_string())
                };
                if (config.guidance.is_some() || guides) && !d.conditional {
                    return Err((
                        key.into(),
                        format!("{what} needs a class-conditional model, and stage `{stage}` trains without `conditional: true`"),
                        format!("add `diffusion: {{conditional: true, p_uncond: 0.1}}` to `{stage}`, or drop `{key}`"),
                    ));
                }
                if (config.guidance.is_some() || guides) && d.p_uncond == 0.0 {
                    return Err((
                        key.into(),
                        format!("{what} needs the unconditional prediction, and stage `{stage}` never trained the null label (`p_uncond: 0`)"),
                        format!("train `{stage}` with label dropout, e.g. `diffusion: {{conditional: true, p_uncond: 0.1}}`"),
                    ));
                }
                check_conditions(config, guides, stage, parent, d)?;
                if t.weights == Some(WeightsChoice::Ema) && parent.config.ema.is_none() {
                    return Err((
                        "denoiser.weights".into(),
                        format!("`weights: ema` takes the weights' average, and stage `{stage}` trains without `ema:`"),
                        format!("add e.g. `ema: {{decay: 0.999}}` to `{stage}`, or use `weights: raw`"),
                    ));
                }
                if let Some(e) = t.epoch.filter(|e| !parent.exec.keep_weights.contains(e)) {
                    let epochs = parent.config.epochs;
                    return Err(if e == 0 || e > epochs {
                        (
                            "denoiser.epoch".into(),
                            format!("epoch {e}, but stage `{stage}` trains epochs 1 to {epochs}"),
                            format!("pick an epoch from 1 to {epochs} (without `epoch`, the final weights)"),
                        )
                    } else {
                        (
                            "denoiser.epoch".into(),
                            format!("stage `{stage}` keeps no weights of epoch {e}"),
                            format!(
                                "add `checkpoint: {{keep_weights: [{e}]}}` to `{stage}` (it does not change its jobs)"
                            ),
                        )
                    });
                }
                if let Some(e) = too_many(d.timesteps, format!("stage `{stage}` trains with")) {
                    return Err(e);
                }
                if let (Some(mine), Some(theirs)) = (config.data.row_width(), parent.config.data.row_width()) {
                    if mine != theirs {
                        return Err((
                            "data".into(),
                            format!(
                                "rows of {mine} features, but stage `{stage}` trains its model on rows of {theirs}"
                            ),
                            format!("sample with the data `{stage}` trains on"),
                        ));
                    }
                }
            }
            Ok(())
        }
        None => Ok(()),
    }
}

/// Whether a config refers to its parent job (`${parent.config.optimizer.lr}`).
fn has_parent_ref(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("${parent"),
        Value::Array(items) => items.iter().any(has_parent_ref),
        Value::Object(m) => m.values().any(has_parent_ref),
        _ => false,
    }
}

/// Replaces `${parent.config.<key>}` and `${parent.seed}` with the value the child's parent jobs
/// share (one parent with `select: each`; every candidate or parent must agree otherwise).
fn resolve_parent_refs(
    file: &Path,
    ctx: &str,
    v: &mut Value,
    parent_stage: Option<&str>,
    parents: &[&Job],
    at: &str,
) -> Result<(), SpecError> {
    match v {
        Value::String(s) if s.contains("${") => {
            let err = |m: String| {
                let e = SpecError::new(file, m).context(format!("{ctx}: {}", at.trim_start_matches('.')));
                e.hint("a child refers to its parent job as `${parent.config.<key>}` or `${parent.seed}`")
            };
            let lookup = |name: &str| -> Result<Option<Value>, SpecError> {
                let Some(stage) = parent_stage else {
                    return Err(err(format!("`${{{name}}}` refers to the parent job, but this stage has no `needs:`")));
                };
                let mut seen: Option<Value> = None;
                for p in parents {
                    let got = match name.strip_prefix("parent.config.") {
                        _ if name == "parent.seed" => Some(Value::from(p.seed)),
                        Some(key) => get_dotted(&p.config_json, key).cloned(),
                        None => return Err(err(format!("`${{{name}}}` is not a reference to the parent job"))),
                    };
                    let Some(got) = got else {
                        return Err(err(format!("`${{{name}}}`: the jobs of stage `{stage}` have no such config key")));
                    };
                    match &seen {
                        Some(prev) if *prev != got => {
                            return Err(SpecError::new(
                                file,
                                format!("`${{{name}}}`: the parent jobs of stage `{stage}` differ there ({prev} and {got})"),
                            )
                            .context(format!("{ctx}: {}", at.trim_start_matches('.')))
                            .hint("a reference names a value every parent shares: use `select: each`, or add the key to `per:` of `select: best`"))
                        }
                        _ => seen = Some(got),
                    }
                }
                Ok(seen)
            };
            let as_text = |v: &Value| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let unclosed = || err(format!("`{s}`: a `${{` is not closed"));
            *v = match crate::file::splice(s, lookup, as_text, unclosed)? {
                crate::file::Spliced::Value(x) => x,
                crate::file::Spliced::Text(t) => Value::String(t),
            };
        }
        Value::Array(items) => {
            for (i, x) in items.iter_mut().enumerate() {
                resolve_parent_refs(file, ctx, x, parent_stage, parents, &format!("{at}[{i}]"))?;
            }
        }
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                resolve_parent_refs(file, ctx, x, parent_stage, parents, &format!("{at}.{k}"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// One job of a sweep point: its seed, its parents, the parents' sweep values (as labels) and,
/// with `select: best`, which parent it picks.
type Instance = (u64, Vec<JobId>, Vec<(String, Value)>, Option<Pick>);

/// The value at a dotted key of a resolved config, e.g. `objective.use`.
fn get_dotted<'a>(root: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(root, |cur, part| cur.get(part))
}

/// `select: best`: the parent jobs split into groups by their `per` values; each group gets
/// one child per rank 1..=k and own seed, whose candidates are the group's jobs. `seed` in
/// `per` groups by the parents' seed, and each child takes its group's seed.
fn best_instances(
    file: &Path,
    ctx: &str,
    parent: &str,
    parent_jobs: &[Job],
    spec: &BestSpec,
    seeds: &[u64],
) -> Result<Vec<Instance>, SpecError> {
    // (per values as labels, parent seed with `per: [seed]`, candidates)
    type Group = (Vec<(String, Value)>, Option<u64>, Vec<JobId>);
    let mut groups: Vec<Group> = Vec::new();
    let by_seed = spec.per.iter().any(|k| k == "seed");
    // A key some parent jobs lack (plain SGD has no `step_rule.use`) groups those jobs under
    // `null`; a key none of them has is a mistake.
    // A config key, else a label of the parent's sweep point (a named variant's `variant`).
    let value_of = |p: &Job, k: &str| -> Option<Value> {
        get_dotted(&p.config_json, k).or_else(|| p.point.iter().find(|(pk, _)| pk == k).map(|(_, v)| v)).cloned()
    };
    for k in spec.per.iter().filter(|k| *k != "seed") {
        if !parent_jobs.iter().any(|p| value_of(p, k).is_some()) {
            return Err(SpecError::new(
                file,
                format!("`per: {k}`: the jobs of stage `{parent}` have no config key `{k}`"),
            )
            .context(format!("{ctx}.needs.per"))
            .hint("`per` lists config keys of the parent stage, e.g. `objective.use` or `optimizer.lr`"));
        }
    }
    for p in parent_jobs {
        let mut key = Vec::new();
        for k in spec.per.iter().filter(|k| *k != "seed") {
            let v = value_of(p, k).unwrap_or(Value::Null);
            key.push((format!("{parent}.{k}"), v));
        }
        let seed = by_seed.then_some(p.seed);
        match groups.iter_mut().find(|(g, s, _)| *g == key && *s == seed) {
            Some((_, _, ids)) => ids.push(p.id.clone()),
            None => groups.push((key, seed, vec![p.id.clone()])),
        }
    }
    let mut out = Vec::new();
    for (label, seed, ids) in groups {
        if ids.len() < spec.k as usize {
            let which: Vec<String> = label.iter().map(|(k, v)| format!("{k}={v}")).collect();
            return Err(SpecError::new(
                file,
                format!(
                    "`k: {}` but {} has only {} job(s) to rank",
                    spec.k,
                    if which.is_empty() { format!("stage `{parent}`") } else { which.join(", ") },
                    ids.len()
                ),
            )
            .context(format!("{ctx}.needs.k")));
        }
        for rank in 1..=spec.k {
            let mut l = label.clone();
            if spec.k > 1 {
                l.push(("rank".to_string(), Value::from(rank)));
            }
            let pick = Pick { metric: spec.metric.clone(), mode: spec.mode, rank };
            // `per: [seed]` ranks each seed's jobs apart, and the child takes that seed.
            let own: Vec<u64> = match seed {
                Some(s) => vec![s],
                None => seeds.to_vec(),
            };
            for s in own {
                out.push((s, ids.clone(), l.clone(), Some(pick.clone())));
            }
        }
    }
    Ok(out)
}

/// The stages in an order where every stage comes after the one it needs (file order
/// otherwise). Unknown parents, self-dependence and cycles are errors.
fn stage_order(file: &Path, exp: &ExperimentFile) -> Result<Vec<String>, SpecError> {
    for (name, stage) in &exp.stages {
        if let Some(n) = &stage.needs {
            let parent = n.stage();
            if parent == name {
                return Err(SpecError::new(file, format!("stage `{name}` needs itself"))
                    .context(format!("stages.{name}.needs")));
            }
            if !exp.stages.contains_key(parent) {
                let mut e =
                    SpecError::new(file, format!("stage `{name}` needs `{parent}`, which is not a stage of this file"))
                        .context(format!("stages.{name}.needs"));
                e.hint =
                    did_you_mean(parent, exp.stages.keys().map(String::as_str)).map(|c| format!("did you mean `{c}`?"));
                return Err(e);
            }
        }
    }
    let mut order: Vec<String> = Vec::new();
    while order.len() < exp.stages.len() {
        let next = exp.stages.iter().find(|(name, stage)| {
            !order.contains(name) && stage.needs.as_ref().is_none_or(|n| order.iter().any(|o| o == n.stage()))
        });
        match next {
            Some((name, _)) => order.push(name.clone()),
            None => {
                let stuck: Vec<&str> = exp.stages.keys().filter(|k| !order.contains(k)).map(String::as_str).collect();
                return Err(SpecError::new(
                    file,
                    format!("the stages {} need each other in a cycle", stuck.join(", ")),
                )
                .context("stages")
                .hint("a stage can only need a stage that does not need it back"));
            }
        }
    }
    Ok(order)
}

fn validate(file: &Path, ctx: &str, cfg: Value) -> Result<JobConfig, SpecError> {
    let config: JobConfig = serde_path_to_error::deserialize(cfg).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let ctx = if path == "." { ctx.to_string() } else { format!("{ctx}: {path}") };
        let mut err = SpecError::new(file, inner.clone()).context(ctx);
        if inner.starts_with("missing field") && err.hint.is_none() {
            err.hint = Some("set it in `defaults:` or in the stage".into());
        }
        err
    })?;
    config.check().map_err(|(path, msg)| {
        path.split('.').fold(SpecError::new(file, format!("`{path}` {msg}")).context(ctx.to_string()), |e, k| e.key(k))
    })?;
    let mut config = config;
    resolve_files(file, ctx, &mut config)?;
    Ok(config)
}

/// The SHA-256 of a file, or of a folder's files (each name and content, in name order, then
/// each subfolder's name and digest, as an image folder's classes are). Each path is read once
/// per process, however many jobs name it.
fn digest_of(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    thread_local! {
        static SEEN: std::cell::RefCell<HashMap<PathBuf, String>> = Default::default();
    }
    if let Some(d) = SEEN.with(|s| s.borrow().get(path).cloned()) {
        return Ok(d);
    }
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() && !meta.is_file() {
        // A device or a pipe (`/dev/zero`) would be read for ever.
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file or a folder"));
    }
    let digest = if meta.is_dir() {
        let mut names: Vec<PathBuf> =
            std::fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        names.sort();
        let hidden = |p: &Path| p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
        let mut h = Sha256::new();
        for f in names.iter().filter(|p| p.is_file()) {
            h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(Sha256::digest(std::fs::read(f)?));
        }
        // Folders add to the digest only where there are some: a flat folder's is as before.
        for d in names.iter().filter(|p| p.is_dir() && !hidden(p)) {
            h.update(b"/");
            h.update(d.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(digest_of(d)?.as_bytes());
        }
        hex::encode(h.finalize())
    } else {
        hex::encode(Sha256::digest(std::fs::read(path)?))
    };
    SEEN.with(|s| s.borrow_mut().insert(path.to_path_buf(), digest.clone()));
    Ok(digest)
}

/// Makes the job's file paths absolute (relative ones are relative to the experiment file) and
/// records each file's SHA-256, which must equal a `sha256` written in the file.
fn resolve_files(file: &Path, ctx: &str, config: &mut JobConfig) -> Result<(), SpecError> {
    let base = file.parent().unwrap_or(Path::new("."));
    for (key, f) in config.files_mut() {
        let written = base.join(&f.path);
        let path = std::path::absolute(&written).unwrap_or_else(|_| written.clone());
        let digest = digest_of(&path).map_err(|e| {
            SpecError::new(file, format!("`{key}`: cannot read {}: {e}", written.display()))
                .context(ctx.to_string())
                .hint("paths are relative to the experiment file")
        })?;
        if let Some(want) = &f.sha256 {
            if !want.eq_ignore_ascii_case(&digest) {
                return Err(SpecError::new(
                    file,
                    format!("`{key}`: {} has SHA-256 {digest}, not the {want} written here", path.display()),
                )
                .context(ctx.to_string())
                .hint("the file changed since the experiment pinned it; restore it or update `sha256`"));
            }
        }
        f.path = path.display().to_string();
        f.sha256 = Some(digest);
    }
    Ok(())
}

/// Checks a sample job's conditions against the model it samples from: `labels` and `negative`
/// name classes the class-conditional model knows (the null label trained, for `labels: none`),
/// `negative` is used by something, and an `attention` guidance has cross-attention to act in.
fn check_conditions(
    config: &JobConfig,
    guides: bool,
    stage: &str,
    parent: &Job,
    d: &crate::config::Diffusion,
) -> Result<(), (String, String, String)> {
    let conditional_fix = format!("add `diffusion: {{conditional: true, p_uncond: 0.1}}` to `{stage}`");
    for (key, set) in [("labels", config.labels.is_some()), ("negative", config.negative.is_some())] {
        if set && !d.conditional {
            return Err((
                key.into(),
                format!("`{key}` names a class, and stage `{stage}` trains without `conditional: true`"),
                format!("{conditional_fix}, or drop `{key}`"),
            ));
        }
    }
    if config.labels == Some(SampleLabels::Named(LabelsName::None)) && d.p_uncond == 0.0 {
        return Err((
            "labels".into(),
            format!("`labels: none` asks for the null label, and stage `{stage}` never trained it (`p_uncond: 0`)"),
            format!("train `{stage}` with label dropout, e.g. `diffusion: {{conditional: true, p_uncond: 0.1}}`"),
        ));
    }
    if let Some(k) = parent.config.data.class_count() {
        let named = config.labels.as_ref().map_or(&[][..], SampleLabels::classes);
        let bad = named.iter().map(|&c| ("labels", c)).chain(config.negative.map(|c| ("negative", c)));
        for (key, c) in bad {
            if c as usize >= k {
                return Err((
                    key.into(),
                    format!("`{key}` names class {c}, and stage `{stage}`'s model knows classes 0 to {}", k - 1),
                    format!("name a class from 0 to {}", k - 1),
                ));
            }
        }
    }
    if let Some(a) = &config.attention {
        let has_cross = matches!(&parent.config.model, Some(ModelConfig::Unet(u)) if u.cross_attention.is_some());
        if !has_cross {
            return Err((
                "attention".into(),
                format!(
                    "`{}` acts inside the model's cross-attention layers, and stage `{stage}`'s model has none, so it \
                     would change nothing",
                    a.id
                ),
                format!(
                    "train `{stage}` as a `unet` with `cross_attention: {{tokens: 4, heads: 1}}` (the class then enters \
                     through attention over its tokens)"
                ),
            ));
        }
    }
    if config.negative.is_some() && config.guidance.is_none() && config.attention.is_none() && !guides {
        return Err((
            "negative".into(),
            "`negative` is used by guidance (as the unconditional prediction) or an attention guidance, and this job has \
             neither"
                .into(),
            "add e.g. `attention: {use: diffusion.nag}` or `guidance: {use: diffusion.cfg, guidance_scale: 3}`, or drop \
             `negative`"
                .into(),
        ));
    }
    Ok(())
}

/// Checks each component of a job against the plugin registry: the id exists, is of the slot's
/// kind, and its parameters are declared and valid. Fills in defaults; returns the libraries used.
fn resolve_components(
    file: &Path,
    ctx: &str,
    config: &mut JobConfig,
    plugins: &mut dyn PluginSource,
    extra: &[PathBuf],
) -> Result<(Vec<PluginUse>, bool), SpecError> {
    let mut used: Vec<PluginUse> = Vec::new();
    let mut guides = false;
    let diffusion = config.diffusion.is_some();
    let task = config.task;
    let has_guidance = config.guidance.is_some();
    let exact = matches!(config.denoiser, Some(DenoiserConfig::Exact(_)));
    for (slot, comp) in config.components_mut() {
        let here = format!("{ctx}: {slot}");
        let registry = plugins.registry(extra).map_err(|m| {
            SpecError::new(file, format!("cannot list plugins to check `{}`: {m}", comp.id))
                .context(here.clone())
                .hint("build the plugins with `make build`, or check `xlab plugins list`")
        })?;
        let Some((plugin, info)) = registry.component(&comp.id) else {
            let mut e = SpecError::new(file, format!("unknown plugin component `{}`", comp.id)).context(here.clone());
            e.hint = Some(match did_you_mean(&comp.id, registry.component_ids()) {
                Some(c) => format!("did you mean `{c}`?"),
                None if registry.refused.is_empty() => {
                    let ids: Vec<&str> = registry.component_ids().collect();
                    let yours =
                        "a plugin of your own is found through `plugins: [path/to/libxlab_plugin_NAME.so]` in the \
                                 experiment file or its folder in XLAB_PLUGIN_PATH";
                    if ids.is_empty() {
                        format!("no plugins are installed (`xlab plugins list`); {yours}")
                    } else {
                        format!("available: {}; {yours}", ids.join(", "))
                    }
                }
                None => format!(
                    "some plugin files were refused: {}",
                    registry
                        .refused
                        .iter()
                        .map(|r| format!("{} ({})", r.file, r.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
            return Err(e);
        };
        let expected = COMPONENT_SLOTS.iter().find(|(s, _)| *s == slot).map(|(_, k)| *k).unwrap_or(slot);
        if info.kind != expected {
            return Err(SpecError::new(
                file,
                format!("`{}` is a `{}` component; the `{slot}` slot needs a `{expected}`", comp.id, info.kind),
            )
            .context(here)
            .hint(format!("use it under `{}:`", info.kind)));
        }
        // Samplers go one way or the other: noise to data, or (inverters) data to noise.
        if slot == "sampler" && info.inverts != (task == Task::Invert) {
            let (why, hint) = if info.inverts {
                (
                    format!(
                        "`{}` maps data to noise; `task: {}` needs a sampler that maps noise to data",
                        comp.id,
                        task.name()
                    ),
                    "run it in a stage with `task: invert`".to_string(),
                )
            } else {
                (
                    format!("`task: invert` maps data to noise, and `{}` maps noise to data", comp.id),
                    "invert with e.g. `sampler: {use: diffusion.ddim_inverse, steps: 50}`, and name the sampler that maps                      the latents back under `reconstruct:`"
                        .to_string(),
                )
            };
            return Err(SpecError::new(file, why).context(here).hint(hint));
        }
        if slot == "sampler" && info.guides {
            guides = true;
            if has_guidance {
                return Err(SpecError::new(
                    file,
                    format!(
                        "`{}` combines the conditional and unconditional predictions itself; it takes no `guidance:`",
                        comp.id
                    ),
                )
                .context(here)
                .hint("drop `guidance:` (the sampler's own parameters set the guidance strength)"));
            }
            if exact {
                return Err(SpecError::new(
                    file,
                    format!("`{}` needs a class-conditional model, and the exact denoiser has no condition", comp.id),
                )
                .context(here)
                .hint("sample from a trained one: `denoiser: {name: trained}` with `needs:` naming a stage trained with `diffusion: {conditional: true, p_uncond: 0.1}`"));
            }
        }
        if slot == "reconstruct" && info.inverts {
            return Err(SpecError::new(
                file,
                format!("`reconstruct:` maps the latents back to data, and `{}` maps data to noise", comp.id),
            )
            .context(here)
            .hint("use the matching forward sampler, e.g. `{use: diffusion.ddim, steps: 50, clip_sample: false}`"));
        }
        if slot == "batch_transform" && info.noise != diffusion {
            let why = if info.noise {
                format!("`{}` perturbs the noise of diffusion training; this job trains a classifier", comp.id)
            } else {
                format!(
                    "in diffusion training a batch transform perturbs the noise (e.g. `diffusion.ddpm_ip`); `{}` transforms labelled batches",
                    comp.id
                )
            };
            return Err(SpecError::new(file, why).context(here));
        }
        let resolved = resolve_params(info, &comp.params).map_err(|e| match e {
            ParamError::Unknown { name } => {
                let mut err = SpecError::new(file, format!("unknown parameter `{name}` of `{}`", comp.id))
                    .context(here.clone())
                    .key(name.clone());
                // Components of the same kind that do take it (DualFast's options belong to DDIM
                // and DPM-Solver++, not to every sampler).
                let elsewhere: Vec<&str> = registry
                    .plugins
                    .iter()
                    .flat_map(|p| &p.components)
                    .filter(|c| c.kind == info.kind && c.params.iter().any(|p| p.name == name))
                    .map(|c| c.id.as_str())
                    .collect();
                err.hint = Some(match did_you_mean(&name, info.params.iter().map(|p| p.name.as_str())) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None if !elsewhere.is_empty() => format!(
                        "`{name}` is a parameter of {}; `{}` takes: {}",
                        elsewhere.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "),
                        comp.id,
                        info.params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    None if info.params.is_empty() => format!("`{}` takes no parameters", comp.id),
                    None => format!(
                        "`{}` takes: {}",
                        comp.id,
                        info.params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                });
                err
            }
            ParamError::Invalid { name, message } => {
                SpecError::new(file, format!("parameter `{name}` of `{}` {message}", comp.id))
                    .context(here.clone())
                    .key(name)
            }
        })?;
        comp.params = resolved;
        if !used.iter().any(|u| u.id == plugin.id) {
            used.push(PluginUse {
                id: plugin.id.clone(),
                version: plugin.version.clone(),
                file: plugin.file.clone(),
                sha256: plugin.sha256.clone(),
            });
        }
    }
    Ok((used, guides))
}

/// Checks a sweep key and its values; returns the values as JSON.
fn sweep_values(file: &Path, ctx: &str, key: &str, values: &[serde_yaml::Value]) -> Result<Vec<Value>, SpecError> {
    check_key(key).map_err(|h| {
        SpecError::new(file, format!("`{key}` does not name a config key")).context(ctx.to_string()).key(key).hint(h)
    })?;
    if values.is_empty() {
        return Err(SpecError::new(file, format!("`{key}` has no values"))
            .context(ctx.to_string())
            .key(key)
            .hint("list at least one value, or remove the key"));
    }
    values.iter().map(|v| yaml_to_json(file, &format!("{ctx}.{key}"), v)).collect()
}

fn first_duplicate(seeds: &[u64]) -> Option<u64> {
    let mut seen = HashSet::new();
    seeds.iter().copied().find(|s| !seen.insert(*s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::Algorithm;

    fn search(algorithm: Algorithm, rungs: &[u64]) -> Search {
        Search { algorithm, metric: "val.acc".into(), mode: Mode::Max, reduction: 3, rungs: rungs.to_vec(), tpe: None }
    }

    #[test]
    fn hyperband_deals_trials_to_brackets_by_their_weights() {
        // Three rungs, η = 3: weights ⌈3/3·9⌉ = 9, ⌈3/2·3⌉ = 5, ⌈3/1·1⌉ = 3 of 17.
        let s = search(Algorithm::Hyperband, &[1, 3, 9]);
        let b = s.brackets(17);
        let sizes: Vec<(usize, usize)> = b.iter().map(|(k, m)| (*k, m.len())).collect();
        assert_eq!(sizes, [(0, 9), (1, 5), (2, 3)]);
        // Every trial in exactly one bracket, each bracket's first trial among the first four.
        let mut all: Vec<usize> = b.iter().flat_map(|(_, m)| m.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..17).collect::<Vec<_>>());
        assert!(b.iter().all(|(_, m)| m[0] < 4), "{b:?}");
        // ASHA is one bracket with every rung.
        assert_eq!(search(Algorithm::Asha, &[1, 3, 9]).brackets(4), [(0, vec![0, 1, 2, 3])]);
    }

    #[test]
    fn the_budget_of_successive_halving_keeps_at_least_one_trial_to_the_end() {
        let s = search(Algorithm::Asha, &[1, 3, 9]);
        // 9 trials: 9 × 1 + 3 × 2 + 1 × 6 epochs.
        assert_eq!(s.budget(9), (81, 21));
        // 2 trials: ⌊2/3⌋ = 0 would stop them all; one goes on.
        assert_eq!(s.budget(2), (18, 2 + 2 + 6));
        let hb = search(Algorithm::Hyperband, &[1, 3, 9]);
        let (full, spent) = hb.budget(17);
        assert_eq!(full, 153);
        // Brackets of 9 (from epoch 1), 5 (from 3) and 3 (from 9).
        assert_eq!(spent, 21 + (5 * 3 + 6) + 3 * 9);
    }
}
