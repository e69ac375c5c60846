//! What the commands share: exit codes and [`Failure`] (an error with the exit code it
//! deserves), opening the store, finding the experiment or job a command names, and checking a
//! command line's filter, metrics and keys against the experiment's jobs.

use crate::{filter, vocab};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use xlab_store::live::RemoteStore;
use xlab_store::{ResultStore, Store, StoreError};

/// Exit codes by who is at fault.
pub mod exit {
    /// Some jobs failed.
    pub const JOBS_FAILED: u8 = 1;
    /// The user's input is wrong (experiment file, arguments).
    pub const USER: u8 = 2;
    /// The environment is wrong (store in use, missing worker, I/O).
    pub const ENVIRONMENT: u8 = 3;
    /// Stopped by Ctrl-C or SIGTERM before every job ran (the shell's code for SIGINT).
    pub const STOPPED: u8 = 130;
}

/// An error with the exit code it deserves.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

/// Spec errors are the user's; everything else that reaches `?` (store, I/O) is the
/// environment's.
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = if error.downcast_ref::<xlab_plan::SpecError>().is_some() { exit::USER } else { exit::ENVIRONMENT };
        Failure { code, error }
    }
}

/// `1.5 MB`, `312 kB`, `12 B`.
pub(crate) fn human_bytes(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} B"),
        1_000..1_000_000 => format!("{:.0} kB", b as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        _ => format!("{:.2} GB", b as f64 / 1e9),
    }
}

/// `{"optimizer": {"lr": 0.1}}` → `optimizer.lr = 0.1`.
pub(crate) fn flatten_json(v: &serde_json::Value) -> std::collections::BTreeMap<String, serde_json::Value> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut std::collections::BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", v, &mut out);
    out
}

/// How long a command waits for another command that holds the store only to read it (a query
/// takes well under a second) before it says the store is in use.
const READER_PATIENCE: Duration = Duration::from_secs(30);

/// Opens the store in `dir` to run experiments in it (creating it if needed). A reader holding
/// it briefly (`xlab query`, even under `watch -n1`) is waited for; a run that owns it is not.
pub(crate) fn open_store(dir: &Path) -> Result<Store, Failure> {
    let deadline = Instant::now() + READER_PATIENCE;
    let mut said = false;
    loop {
        match Store::open(dir) {
            Err(StoreError::InUse { pid, command, .. })
                if Instant::now() < deadline && RemoteStore::connect(dir, (pid, command.clone())).is_err() =>
            {
                if !said {
                    tracing::info!(
                        "waiting for pid {pid} ({command}), which holds the store, to let go of it or to serve it"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

/// A store opened to read: this process's own, or a run's, read through the socket of the
/// process that owns it (see `xlab_store::live`).
pub(crate) enum Opened {
    Local(Store),
    Live(RemoteStore),
}

impl std::ops::Deref for Opened {
    type Target = dyn ResultStore;

    fn deref(&self) -> &Self::Target {
        match self {
            Opened::Local(s) => s,
            Opened::Live(s) => s,
        }
    }
}

/// Every read goes to the store as opened; writes to a run's store are refused by it.
impl ResultStore for Opened {
    fn dir(&self) -> &Path {
        (**self).dir()
    }
    fn flush(&self) -> xlab_store::Result<()> {
        (**self).flush()
    }
    fn put_experiment(&self, e: &xlab_store::ExperimentRecord) -> xlab_store::Result<()> {
        (**self).put_experiment(e)
    }
    fn experiment(&self, name: &str) -> xlab_store::Result<Option<xlab_store::ExperimentRecord>> {
        (**self).experiment(name)
    }
    fn experiments(&self) -> xlab_store::Result<Vec<xlab_store::ExperimentRecord>> {
        (**self).experiments()
    }
    fn put_job(&self, j: &xlab_store::JobRecord) -> xlab_store::Result<()> {
        (**self).put_job(j)
    }
    fn job(&self, id: &str) -> xlab_store::Result<Option<xlab_store::JobRecord>> {
        (**self).job(id)
    }
    fn jobs(&self) -> xlab_store::Result<Vec<xlab_store::JobRecord>> {
        (**self).jobs()
    }
    fn put_decision(&self, d: &xlab_store::Decision) -> xlab_store::Result<()> {
        (**self).put_decision(d)
    }
    fn decisions(&self, experiment: &str, stage: &str) -> xlab_store::Result<Vec<xlab_store::Decision>> {
        (**self).decisions(experiment, stage)
    }
    fn jobs_by_id(&self, ids: &[&str]) -> xlab_store::Result<Vec<Option<xlab_store::JobRecord>>> {
        (**self).jobs_by_id(ids)
    }
    fn job_ids_with_prefix(&self, prefix: &str, at_most: usize) -> xlab_store::Result<Vec<String>> {
        (**self).job_ids_with_prefix(prefix, at_most)
    }
    fn put_metrics_batch(&self, job: &str, points: &[(u64, StepValues)]) -> xlab_store::Result<()> {
        (**self).put_metrics_batch(job, points)
    }
    fn metric_series(&self, job: &str, name: &str) -> xlab_store::Result<Vec<(u64, f64)>> {
        (**self).metric_series(job, name)
    }
    fn metrics_of(&self, job: &str) -> xlab_store::Result<BTreeMap<String, Vec<(u64, f64)>>> {
        (**self).metrics_of(job)
    }
    fn metrics_of_many(&self, ids: &[&str]) -> xlab_store::Result<Vec<xlab_store::Series>> {
        (**self).metrics_of_many(ids)
    }
}

/// One step's metric values.
type StepValues = BTreeMap<String, f64>;

impl Opened {
    /// Whether a running `xlab run` owns the store (so jobs marked running are running).
    pub(crate) fn is_live(&self) -> bool {
        matches!(self, Opened::Live(_))
    }
}

/// Opens the store in `dir` to read it, whoever holds it: directly when no process does (or
/// after a reader that holds it lets go), else through the socket of the run that owns it.
pub(crate) fn read_store(dir: &Path) -> Result<Opened, Failure> {
    let deadline = Instant::now() + READER_PATIENCE;
    loop {
        match Store::open(dir) {
            Ok(s) => return Ok(Opened::Local(s)),
            Err(StoreError::InUse { pid, command, started, dir: d }) => {
                match RemoteStore::connect(dir, (pid, command.clone())) {
                    Ok(remote) => return Ok(Opened::Live(remote)),
                    // Another reader, or a run still starting its server: wait for either.
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    Err(_) => return Err(StoreError::InUse { dir: d, pid, command, started }.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Says (on stderr) when what a reader sees is the state a run left: the last run of `experiment`
/// ended without finishing (killed, or its machine went down), so jobs it was running show as
/// `running` although nothing runs them. How old that state is comes from the run's status file.
pub(crate) fn note_unfinished_run(store_dir: &Path, store: &Opened, experiment: &str) {
    if store.is_live() {
        return;
    }
    let snap: Option<crate::status::Snapshot> =
        std::fs::read(crate::status::path(store_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(s) = snap.filter(|s| !s.finished && s.experiment == experiment && !s.running.is_empty()) {
        let age = crate::status::ago(xlab_store::now_unix().saturating_sub(s.updated_unix));
        eprintln!(
            "note: the last run of `{experiment}` (pid {}) ended without finishing, {age} ago; the {} job(s) it was running \
             show as running but are not, and resume from their checkpoints when you run the experiment again",
            s.pid,
            s.running.len()
        );
    }
}

/// Opens the store a read command reads: a folder without one (a mistyped `--store`) is an
/// error, and nothing is created there.
pub(crate) fn existing_store(dir: &Path) -> Result<Opened, Failure> {
    if !dir.join("db").is_dir() {
        return Err(Failure {
            code: exit::USER,
            error: anyhow::anyhow!(
                "there is no xlab store at {}{}\n  hint: check `--store` (or `XLAB_STORE`); `xlab run FILE` makes a \
                 store where it is told to",
                dir.display(),
                if dir.exists() { " (the folder has no `db/`)" } else { " (no such folder)" }
            ),
        });
    }
    read_store(dir)
}

/// The `xlab-worker` executable: `XLAB_WORKER`, or the one beside this `xlab`.
pub(crate) fn worker_path() -> PathBuf {
    if let Some(p) = std::env::var_os("XLAB_WORKER") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().ok();
    exe.and_then(|e| e.parent().map(|d| d.join("xlab-worker"))).unwrap_or_else(|| PathBuf::from("xlab-worker"))
}

/// The experiment a query names, or the most recently run one.
pub(crate) fn pick_experiment(
    store: &dyn ResultStore,
    experiment: Option<&str>,
) -> Result<xlab_store::ExperimentRecord, Failure> {
    Ok(match experiment {
        Some(name) => named_experiment(store, name)?,
        None => {
            let mut all = store.experiments()?;
            all.sort_by_key(|e| e.updated_unix);
            all.pop().with_context(|| {
                format!("store {} holds no experiments yet; run one with `xlab run FILE`", store.dir().display())
            })?
        }
    })
}

/// The experiment with the jobs of its earlier versions (`--all-versions`), or as last run,
/// with a note when earlier versions hold jobs it does not show.
pub(crate) fn versions_of(exp: xlab_store::ExperimentRecord, all: bool) -> xlab_store::ExperimentRecord {
    if all {
        return exp.with_all_versions();
    }
    let hidden = exp.hidden_jobs().len();
    if hidden > 0 {
        eprintln!(
            "note: {hidden} job(s) of earlier versions of `{}`'s file are not shown (this is version {}); --all-versions shows them",
            exp.name,
            exp.version()
        );
    }
    exp
}

/// The experiment a command names; a name the store lacks is the user's mistake, with the
/// closest stored name or the names it holds.
pub(crate) fn named_experiment(store: &dyn ResultStore, name: &str) -> Result<xlab_store::ExperimentRecord, Failure> {
    if let Some(e) = store.experiment(name)? {
        return Ok(e);
    }
    let known: Vec<String> = store.experiments()?.into_iter().map(|e| e.name).collect();
    let hint = match xlab_plan::did_you_mean(name, known.iter().map(String::as_str)) {
        Some(c) => format!("did you mean `{c}`?"),
        None if known.is_empty() => "the store holds no experiments yet".to_string(),
        None => format!("it holds: {}", known.join(", ")),
    };
    Err(Failure {
        code: exit::USER,
        error: anyhow::anyhow!("no experiment `{name}` in store {}\n  hint: {hint}", store.dir().display()),
    })
}

/// The job a command names by its id or a unique prefix of it (`xlab show 3f2a`).
pub(crate) fn find_job(store: &dyn ResultStore, id: &str) -> Result<xlab_store::JobRecord, Failure> {
    if let Some(rec) = store.job(id)? {
        return Ok(rec);
    }
    let found = if id.is_empty() { Vec::new() } else { store.job_ids_with_prefix(id, 6)? };
    match found.as_slice() {
        [one] => Ok(store.job(one)?.with_context(|| format!("job {one} vanished from the store"))?),
        [] => Err(user_error(format!(
            "no job `{id}` in store {}\n  hint: `xlab query --format json` and `xlab plan FILE` list job ids",
            store.dir().display()
        ))),
        many => Err(user_error(format!(
            "`{id}` is the start of {} job ids ({}{}); give more of it",
            if many.len() > 5 { "more than 5".to_string() } else { many.len().to_string() },
            many.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if many.len() > 5 { ", …" } else { "" }
        ))),
    }
}

/// A filter given on the command line; a mistake is the user's, with a caret under it.
pub(crate) fn parse_filter(text: Option<&str>) -> Result<Option<(filter::Filter, &str)>, Failure> {
    text.map(|q| {
        filter::Filter::parse(q)
            .map(|f| (f, q))
            .map_err(|e| Failure { code: exit::USER, error: anyhow::anyhow!("bad filter:\n{}", e.render(q)) })
    })
    .transpose()
}

pub(crate) fn user_error(message: String) -> Failure {
    Failure { code: exit::USER, error: anyhow::anyhow!(message) }
}

/// What the experiment's jobs hold, and the filter checked against it (a name no job has is
/// the user's mistake, with a caret under it).
pub(crate) fn bind_filter(
    store: &dyn ResultStore,
    exp: &xlab_store::ExperimentRecord,
    filter: Option<(filter::Filter, &str)>,
) -> Result<(vocab::Vocab, Option<filter::Filter>), Failure> {
    let vocab = vocab::Vocab::of(store, exp)?;
    let filter = bind_to(&vocab, filter)?;
    Ok((vocab, filter))
}

/// Binds a parsed filter to the keys and metrics of `vocab`.
pub(crate) fn bind_to(
    vocab: &vocab::Vocab,
    filter: Option<(filter::Filter, &str)>,
) -> Result<Option<filter::Filter>, Failure> {
    match filter {
        Some((mut f, q)) => {
            f.bind(vocab).map_err(|e| user_error(format!("bad filter:\n{}", e.render(q))))?;
            Ok(Some(f))
        }
        None => Ok(None),
    }
}

/// Refuses metric names no job of the experiment has logged, with a "did you mean".
pub(crate) fn check_metrics(
    vocab: &vocab::Vocab,
    exp: &xlab_store::ExperimentRecord,
    metrics: &[String],
    what: &str,
) -> Result<(), Failure> {
    for m in metrics {
        if !vocab.is_metric(m) {
            let hint = match vocab.suggest_metric(m) {
                Some(c) => format!("did you mean `{c}`?"),
                None if vocab.metrics.is_empty() => "no job of it has logged a metric yet".into(),
                None => "`xlab show JOB` lists a job's metrics".into(),
            };
            return Err(user_error(format!("{what}: no metric `{m}` in experiment `{}`\n  hint: {hint}", exp.name)));
        }
    }
    Ok(())
}

/// Stage and every sweep key: the groups of the default results table.
pub(crate) fn default_group_keys(exp: &xlab_store::ExperimentRecord) -> Vec<String> {
    let mut k = vec!["stage".to_string()];
    for s in &exp.stages {
        k.extend(s.sweep_keys.iter().filter(|x| !k.contains(x)).cloned().collect::<Vec<_>>());
    }
    k
}

/// Refuses a key to group by that no job of the experiment has (`--group-by stagee` used to put
/// every job in one group with an empty key): a job field (stage, status, seed, id, experiment)
/// or a dotted config key of at least one job, with a "did you mean".
pub(crate) fn check_group_keys(
    vocab: &vocab::Vocab,
    exp: &xlab_store::ExperimentRecord,
    keys: &[String],
    flag: &str,
) -> Result<(), Failure> {
    for k in keys {
        if !vocab.is_key(k) {
            let hint = match vocab.suggest_key(k) {
                Some(c) => format!("did you mean `{c}`?"),
                None => "group by a job field (stage, status, seed, id) or a config key, e.g. `optimizer.lr`".into(),
            };
            return Err(user_error(format!(
                "{flag} `{k}`: no job of experiment `{}` has this field or config key\n  hint: {hint}",
                exp.name
            )));
        }
    }
    Ok(())
}

/// A valid filter that matched no job says so (on stderr; the empty table still prints).
pub(crate) fn say_matched_none(exp: &xlab_store::ExperimentRecord) {
    let n: usize = exp.stages.iter().map(|s| s.jobs.len()).sum();
    eprintln!("the filter matched 0 of the {n} job(s) of experiment `{}`", exp.name);
}
