//! The xlab results store.
//!
//! A store is a folder (`results/` by default) holding a sled database (`db/`), a lock file
//! (`lock`) naming the process that holds it, and per-job run folders (`runs/<job>/`). sled
//! allows one process per database; the lock file turns a second opener's failure into a clear
//! "store in use by pid N" message instead of a sled error.
//!
//! Trees: `meta` (format version), `experiments` (name → [`ExperimentRecord`]), `jobs`
//! (id → [`JobRecord`]) and `metrics` (job, metric, step → value; writing a point again
//! replaces it, so replays never duplicate points).

pub mod live;
mod records;

pub use records::*;

use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The on-disk format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {dir} is in use by pid {pid} ({command}, started {started})\n  hint: wait for that run to finish, stop it, or use another store with --store DIR")]
    InUse { dir: PathBuf, pid: u32, command: String, started: String },
    #[error("store {dir} was written by a newer xlab (format {found}, this build reads up to {supported})\n  hint: upgrade xlab, or use another store with --store DIR")]
    NewerFormat { dir: PathBuf, found: u32, supported: u32 },
    #[error("store {dir}: {message}")]
    Corrupt { dir: PathBuf, message: String },
    #[error("store {dir}: {error}")]
    Io { dir: PathBuf, error: std::io::Error },
    #[error("store {dir}: database error: {error}")]
    Db { dir: PathBuf, error: sled::Error },
    #[error(
        "store {dir} cannot be opened: the disk holding it is full ({error})\n  hint: the database writes when it \
         opens a store, even to read it; free some space there and run this again"
    )]
    DiskFull { dir: PathBuf, error: String },
    #[error(
        "store {dir}: {records} job record(s) and {points} metric point(s) could not be written ({error})\n  hint: \
         their jobs are not lost: free the space (or fix the cause) and run the same command again; each resumes \
         from its last checkpoint"
    )]
    Unwritten { dir: PathBuf, error: String, records: usize, points: usize },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[derive(Serialize, serde::Deserialize)]
struct LockInfo {
    pid: u32,
    command: String,
    started_unix: u64,
}

/// An open store; holds the store's lock until dropped.
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    experiments: sled::Tree,
    jobs: sled::Tree,
    metrics: sled::Tree,
    /// Adaptive searches' decisions, by experiment, stage and place in the log.
    decisions: sled::Tree,
    _lock: File,
}

/// The size of sled's log segments for a new store. With sled's default of 512 KiB, a stream of
/// small batches rewriting metric chunks stalled sled 0.34.7 for good within 100,000 points in
/// most runs (every thread waiting on another: its writer for a free segment, its I/O threads for
/// the segment accountant); with 8 MiB segments the same stream never stalled (benches/ingest.rs).
const SEGMENT_SIZE: usize = 8 << 20;

/// The segment size of the database in `db` (sled refuses to reopen one with another), or
/// [`SEGMENT_SIZE`] for a new one.
fn segment_size(db: &Path) -> usize {
    let conf = std::fs::read(db.join("conf")).unwrap_or_default();
    String::from_utf8_lossy(&conf)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size:").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(SEGMENT_SIZE)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, taking its lock.
    pub fn open(dir: &Path) -> Result<Store> {
        let io = |source| StoreError::Io { dir: dir.to_path_buf(), error: source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = take_lock(dir)?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            // The coordinator's writer flushes (when a job ends, and at least every second while
            // points arrive); sled's own background flusher, racing a stream of chunk rewrites,
            // slowed ingestion by orders of magnitude (see benches/ingest.rs).
            .flush_every_ms(None)
            .segment_size(segment_size(&dir.join("db")))
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(e) if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) => {
                    StoreError::DiskFull { dir: dir.to_path_buf(), error: source.to_string() }
                }
                _ => StoreError::Db { dir: dir.to_path_buf(), error: source },
            })?;
        let store = Self::from_db(dir, db, lock)?;
        store.check_format()?;
        Ok(store)
    }

    fn from_db(dir: &Path, db: sled::Db, lock: File) -> Result<Store> {
        let tree =
            |name: &str| db.open_tree(name).map_err(|source| StoreError::Db { dir: dir.to_path_buf(), error: source });
        Ok(Store {
            dir: dir.to_path_buf(),
            experiments: tree("experiments")?,
            jobs: tree("jobs")?,
            metrics: tree("series")?,
            decisions: tree("decisions")?,
            db,
            _lock: lock,
        })
    }

    fn db_err(&self, source: sled::Error) -> StoreError {
        StoreError::Db { dir: self.dir.clone(), error: source }
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt { dir: self.dir.clone(), message }
    }

    fn check_format(&self) -> Result<()> {
        let meta = self.db.open_tree("meta").map_err(|e| self.db_err(e))?;
        match meta.get("format_version").map_err(|e| self.db_err(e))? {
            None => {
                meta.insert("format_version", &FORMAT_VERSION.to_be_bytes()).map_err(|e| self.db_err(e))?;
                Ok(())
            }
            Some(v) => {
                let bytes: [u8; 4] =
                    v.as_ref().try_into().map_err(|_| self.corrupt("format_version is not a u32".into()))?;
                let found = u32::from_be_bytes(bytes);
                if found > FORMAT_VERSION {
                    return Err(StoreError::NewerFormat { dir: self.dir.clone(), found, supported: FORMAT_VERSION });
                }
                Ok(())
            }
        }
    }

    /// Overwrites the stored format version (for tests of format refusal and for migrations).
    pub fn set_format_version(&self, v: u32) -> Result<()> {
        let meta = self.db.open_tree("meta").map_err(|e| self.db_err(e))?;
        meta.insert("format_version", &v.to_be_bytes()).map_err(|e| self.db_err(e))?;
        self.flush()
    }

    fn get<T: DeserializeOwned>(&self, tree: &sled::Tree, key: &str) -> Result<Option<T>> {
        match tree.get(key).map_err(|e| self.db_err(e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| self.corrupt(format!("record `{key}`: {e}"))),
        }
    }

    fn put<T: Serialize>(&self, tree: &sled::Tree, key: &str, v: &T) -> Result<()> {
        let bytes = serde_json::to_vec(v).expect("records serialize");
        tree.insert(key, bytes).map(|_| ()).map_err(|e| self.db_err(e))
    }

    fn all<T: DeserializeOwned>(&self, tree: &sled::Tree) -> Result<Vec<T>> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.db_err(e))?;
                serde_json::from_slice(&v)
                    .map_err(|e| self.corrupt(format!("record `{}`: {e}", String::from_utf8_lossy(&k))))
            })
            .collect()
    }
}

impl ResultStore for Store {
    fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(|e| self.db_err(e))
    }

    fn put_experiment(&self, e: &ExperimentRecord) -> Result<()> {
        self.put(&self.experiments, &e.name, e)
    }

    fn experiment(&self, name: &str) -> Result<Option<ExperimentRecord>> {
        self.get(&self.experiments, name)
    }

    fn experiments(&self) -> Result<Vec<ExperimentRecord>> {
        self.all(&self.experiments)
    }

    fn put_job(&self, j: &JobRecord) -> Result<()> {
        self.put(&self.jobs, &j.id, j)
    }

    fn job(&self, id: &str) -> Result<Option<JobRecord>> {
        self.get(&self.jobs, id)
    }

    fn put_decision(&self, d: &Decision) -> Result<()> {
        let key = decision_key(&d.experiment, &d.stage, Some(d.seq));
        let bytes = serde_json::to_vec(d).map_err(|e| self.corrupt(format!("a decision: {e}")))?;
        self.decisions.insert(key, bytes).map_err(|e| self.db_err(e))?;
        Ok(())
    }

    fn decisions(&self, experiment: &str, stage: &str) -> Result<Vec<Decision>> {
        let mut out = Vec::new();
        for kv in self.decisions.scan_prefix(decision_key(experiment, stage, None)) {
            let (_, v) = kv.map_err(|e| self.db_err(e))?;
            out.push(serde_json::from_slice(&v).map_err(|e| self.corrupt(format!("a decision: {e}")))?);
        }
        Ok(out)
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        self.all(&self.jobs)
    }

    fn job_ids_with_prefix(&self, prefix: &str, at_most: usize) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for kv in self.jobs.scan_prefix(prefix.as_bytes()).take(at_most) {
            let (k, _) = kv.map_err(|e| self.db_err(e))?;
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    /// Writes metric points of one job at several steps. Points are kept in chunks of
    /// [`CHUNK_STEPS`] steps per metric (16 bytes a point); each touched chunk is read, merged
    /// (a rewritten point replaces the old one) and written back in one sled batch.
    fn put_metrics_batch(&self, job: &str, points: &[(u64, BTreeMap<String, f64>)]) -> Result<()> {
        let mut chunks: BTreeMap<Vec<u8>, BTreeMap<u64, f64>> = BTreeMap::new();
        for (step, values) in points {
            for (name, v) in values {
                chunks.entry(chunk_key(job, name, step / CHUNK_STEPS)).or_default().insert(*step, *v);
            }
        }
        let mut batch = sled::Batch::default();
        for (key, new) in chunks {
            let mut merged = match self.metrics.get(&key).map_err(|e| self.db_err(e))? {
                Some(old) => decode_chunk(&self.dir, &old)?,
                None => BTreeMap::new(),
            };
            merged.extend(new);
            batch.insert(key, encode_chunk(&merged));
        }
        self.metrics.apply_batch(batch).map_err(|e| self.db_err(e))
    }

    /// The points of one metric of one job, by step.
    fn metric_series(&self, job: &str, name: &str) -> Result<Vec<(u64, f64)>> {
        let mut prefix = metric_prefix(job);
        prefix.extend_from_slice(name.as_bytes());
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.metrics.scan_prefix(&prefix) {
            let (_, v) = kv.map_err(|e| self.db_err(e))?;
            out.extend(decode_chunk(&self.dir, &v)?);
        }
        Ok(out)
    }

    /// Every metric series of one job.
    fn metrics_of(&self, job: &str) -> Result<BTreeMap<String, Vec<(u64, f64)>>> {
        let prefix = metric_prefix(job);
        let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
        for kv in self.metrics.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let rest = &k[prefix.len()..];
            let name_end =
                rest.iter().position(|&b| b == 0).ok_or_else(|| self.corrupt("metric key without a chunk".into()))?;
            let name = String::from_utf8_lossy(&rest[..name_end]).into_owned();
            out.entry(name).or_default().extend(decode_chunk(&self.dir, &v)?);
        }
        Ok(out)
    }
}

/// What xlab needs of a results store: experiment and job records, metric series, and a folder
/// for each job's files. The scheduler and every command go through it; [`Store`] (sled) is
/// the implementation, and export and import are written once here for any implementation.
/// Every metric series of one job, by metric name: (step, value) points in step order.
pub type Series = BTreeMap<String, Vec<(u64, f64)>>;

pub trait ResultStore: Send + Sync {
    /// The store's folder.
    fn dir(&self) -> &Path;

    /// The run folder of a job, where its artifacts and logs live.
    fn run_dir(&self, job: &str) -> PathBuf {
        self.dir().join("runs").join(job)
    }

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;

    fn put_experiment(&self, e: &ExperimentRecord) -> Result<()>;

    fn experiment(&self, name: &str) -> Result<Option<ExperimentRecord>>;

    fn experiments(&self) -> Result<Vec<ExperimentRecord>>;

    fn put_job(&self, j: &JobRecord) -> Result<()>;

    fn job(&self, id: &str) -> Result<Option<JobRecord>>;

    fn jobs(&self) -> Result<Vec<JobRecord>>;

    /// Writes one decision of an adaptive search (see [`Decision`]).
    fn put_decision(&self, d: &Decision) -> Result<()>;

    /// The decisions of the search of one stage of an experiment, in order.
    fn decisions(&self, experiment: &str, stage: &str) -> Result<Vec<Decision>>;

    /// Up to `at_most` ids of jobs that start with `prefix`, in order.
    fn job_ids_with_prefix(&self, prefix: &str, at_most: usize) -> Result<Vec<String>>;

    /// Writes metric points of one job at one step. Rewriting a point replaces it.
    fn put_metrics(&self, job: &str, step: u64, values: &BTreeMap<String, f64>) -> Result<()> {
        self.put_metrics_batch(job, &[(step, values.clone())])
    }

    /// Writes metric points of one job at several steps; a rewritten point replaces the old one.
    fn put_metrics_batch(&self, job: &str, points: &[(u64, BTreeMap<String, f64>)]) -> Result<()>;

    /// The points of one metric of one job, by step.
    fn metric_series(&self, job: &str, name: &str) -> Result<Vec<(u64, f64)>>;

    /// Every metric series of one job.
    fn metrics_of(&self, job: &str) -> Result<BTreeMap<String, Vec<(u64, f64)>>>;

    /// Several jobs' records at once, in the order asked (`None`: no such job). A store read
    /// through a running owner's socket answers a batch in one round trip.
    fn jobs_by_id(&self, ids: &[&str]) -> Result<Vec<Option<JobRecord>>> {
        ids.iter().map(|id| self.job(id)).collect()
    }

    /// Every metric series of several jobs at once, in the order asked.
    fn metrics_of_many(&self, ids: &[&str]) -> Result<Vec<Series>> {
        ids.iter().map(|id| self.metrics_of(id)).collect()
    }

    /// Every experiment (or just `only`) and its jobs with their metric series, as export lines.
    fn export(&self, only: Option<&str>) -> Result<Vec<ExportLine>> {
        let mut lines = Vec::new();
        let mut wanted = std::collections::BTreeSet::new();
        for e in self.experiments()? {
            if only.is_some_and(|n| n != e.name) {
                continue;
            }
            wanted.extend(e.with_all_versions().stages.iter().flat_map(|s| s.jobs.iter().cloned()));
            lines.push(ExportLine::Experiment(e));
        }
        for id in wanted {
            if let Some(job) = self.job(&id)? {
                let metrics = self.metrics_of(&id)?;
                lines.push(ExportLine::Job { job: Box::new(job), metrics });
            }
        }
        Ok(lines)
    }

    /// Merges exported lines into this store, by job identity: a job already done here is kept;
    /// a job that is done in the import replaces one that is not; metric points are written by
    /// key, so importing the same file twice changes nothing.
    fn import(&self, lines: Vec<ExportLine>) -> Result<ImportReport> {
        let mut report = ImportReport::default();
        for line in lines {
            match line {
                ExportLine::Experiment(e) => match self.experiment(&e.name)? {
                    None => {
                        self.put_experiment(&e)?;
                        report.experiments_new += 1;
                    }
                    Some(mut mine) => {
                        let changed = records::merge_stages(&mut mine.stages, e.stages);
                        if changed {
                            self.put_experiment(&mine)?;
                        }
                        report.experiments_merged += 1;
                    }
                },
                ExportLine::Job { job, metrics } => {
                    let take = match self.job(&job.id)? {
                        None => {
                            report.jobs_new += 1;
                            true
                        }
                        Some(mine) if mine.status != JobStatus::Done && job.status == JobStatus::Done => {
                            report.jobs_updated += 1;
                            true
                        }
                        Some(_) => {
                            report.jobs_kept += 1;
                            false
                        }
                    };
                    if take {
                        // One batch per job: every point of every series, by step.
                        let mut by_step: BTreeMap<u64, BTreeMap<String, f64>> = BTreeMap::new();
                        for (name, points) in &metrics {
                            for (step, v) in points {
                                by_step.entry(*step).or_default().insert(name.clone(), *v);
                            }
                        }
                        let batch: Vec<(u64, BTreeMap<String, f64>)> = by_step.into_iter().collect();
                        self.put_metrics_batch(&job.id, &batch)?;
                        self.put_job(&job)?;
                    }
                }
            }
        }
        self.flush()?;
        Ok(report)
    }
}

/// `experiment \0 stage \0 seq` (seq big-endian, so keys sort in log order); without `seq`,
/// the prefix of a stage's decisions.
pub(crate) fn decision_key(experiment: &str, stage: &str, seq: Option<u64>) -> Vec<u8> {
    let mut k = Vec::with_capacity(experiment.len() + stage.len() + 10);
    k.extend_from_slice(experiment.as_bytes());
    k.push(0);
    k.extend_from_slice(stage.as_bytes());
    k.push(0);
    if let Some(s) = seq {
        k.extend_from_slice(&s.to_be_bytes());
    }
    k
}

/// Steps per stored chunk of a metric series.
pub const CHUNK_STEPS: u64 = 64;

fn metric_prefix(job: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(job.len() + 32);
    k.extend_from_slice(job.as_bytes());
    k.push(0);
    k
}

fn chunk_key(job: &str, name: &str, chunk: u64) -> Vec<u8> {
    let mut k = metric_prefix(job);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

fn encode_chunk(points: &BTreeMap<u64, f64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(points.len() * 16);
    for (s, v) in points {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode_chunk(dir: &Path, bytes: &[u8]) -> Result<BTreeMap<u64, f64>> {
    if !bytes.len().is_multiple_of(16) {
        return Err(StoreError::Corrupt {
            dir: dir.to_path_buf(),
            message: "a metric chunk is not a whole number of points".into(),
        });
    }
    Ok(bytes
        .chunks_exact(16)
        .map(|c| {
            let s = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
            let v = f64::from_le_bytes(c[8..].try_into().expect("8 bytes"));
            (s, v)
        })
        .collect())
}

fn take_lock(dir: &Path) -> Result<File> {
    let io = |source| StoreError::Io { dir: dir.to_path_buf(), error: source };
    let mut f =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("lock")).map_err(io)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            let info: Option<LockInfo> = serde_json::from_str(&s).ok();
            return Err(match info {
                Some(i) => StoreError::InUse {
                    dir: dir.to_path_buf(),
                    pid: i.pid,
                    command: i.command,
                    started: format!("{} s ago", now_unix().saturating_sub(i.started_unix)),
                },
                None => StoreError::InUse {
                    dir: dir.to_path_buf(),
                    pid: 0,
                    command: "unknown command".into(),
                    started: "at an unknown time".into(),
                },
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    let command: Vec<String> = std::env::args().collect();
    let info = LockInfo { pid: std::process::id(), command: command.join(" "), started_unix: now_unix() };
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    f.write_all(serde_json::to_string(&info).expect("lock info serializes").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_store_gets_large_segments_and_an_older_store_keeps_its_own() {
        let new = tempfile::tempdir().unwrap();
        drop(Store::open(new.path()).unwrap());
        assert_eq!(segment_size(&new.path().join("db")), SEGMENT_SIZE);
        assert!(Store::open(new.path()).is_ok());
        // A store written before the change has sled's default segments, which sled refuses to
        // reopen with any other size.
        let old = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(old.path().join("db")).open().unwrap();
        db.open_tree("jobs").unwrap();
        db.flush().unwrap();
        drop(db);
        assert_eq!(segment_size(&old.path().join("db")), 512 * 1024);
        let s = Store::open(old.path()).unwrap();
        s.put_metrics("aaaa", 1, &[("m".to_string(), 1.0)].into()).unwrap();
    }

    #[test]
    fn metric_points_are_replaced_not_duplicated() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut v = BTreeMap::new();
        v.insert("train.loss".to_string(), 1.5);
        s.put_metrics("aaaa", 1, &v).unwrap();
        s.put_metrics("aaaa", 1, &v).unwrap();
        v.insert("train.loss".to_string(), 0.5);
        s.put_metrics("aaaa", 2, &v).unwrap();
        s.put_metrics("aaaab", 1, &v).unwrap();
        assert_eq!(s.metric_series("aaaa", "train.loss").unwrap(), vec![(1, 1.5), (2, 0.5)]);
        assert_eq!(s.metrics_of("aaaa").unwrap()["train.loss"].len(), 2);
        assert_eq!(s.metrics_of("aaaab").unwrap()["train.loss"], vec![(1, 0.5)]);
    }

    #[test]
    fn store_reopens_with_its_data() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            s.put_experiment(&ExperimentRecord {
                name: "e".into(),
                file: "e.yaml".into(),
                source: "name: e".into(),
                updated_unix: 1,
                stages: vec![],
                earlier: Vec::new(),
            })
            .unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.experiment("e").unwrap().unwrap().source, "name: e");
        assert!(s.experiment("f").unwrap().is_none());
    }

    fn job(id: &str, status: JobStatus, loss: f64) -> JobRecord {
        let mut summary = BTreeMap::new();
        summary.insert("test.loss".to_string(), loss);
        JobRecord {
            id: id.into(),
            experiment: "e".into(),
            stage: "s".into(),
            seed: 0,
            config: serde_json::json!({"lr": 0.1}),
            point: vec![],
            parents: vec![],
            selected: None,
            status,
            attempts: vec![],
            summary,
            provenance: Provenance::default(),
            artifacts: vec![],
            warnings: vec![],
        }
    }

    #[test]
    fn export_import_round_trips_and_is_idempotent() {
        let a = tempfile::tempdir().unwrap();
        let src = Store::open(a.path()).unwrap();
        src.put_experiment(&ExperimentRecord {
            name: "e".into(),
            file: "e.yaml".into(),
            source: "name: e".into(),
            updated_unix: 5,
            stages: vec![StageRecord { name: "s".into(), sweep_keys: vec![], jobs: vec!["j1".into(), "j2".into()] }],
            earlier: Vec::new(),
        })
        .unwrap();
        src.put_job(&job("j1", JobStatus::Done, 0.5)).unwrap();
        src.put_job(&job("j2", JobStatus::Failed, 9.0)).unwrap();
        let mut m = BTreeMap::new();
        m.insert("train.loss".to_string(), 1.25);
        src.put_metrics("j1", 1, &m).unwrap();
        src.put_metrics("j1", 2, &m).unwrap();
        let lines = src.export(Some("e")).unwrap();
        assert_eq!(lines.len(), 3);
        // Through text, as `xlab export`/`xlab import` do.
        let text: String = lines.iter().map(|l| serde_json::to_string(l).unwrap() + "\n").collect();
        let parsed: Vec<ExportLine> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(parsed, lines);

        let b = tempfile::tempdir().unwrap();
        let dst = Store::open(b.path()).unwrap();
        // The destination already has j2 done elsewhere: it must keep it.
        dst.put_job(&job("j2", JobStatus::Done, 0.25)).unwrap();
        let r = dst.import(parsed.clone()).unwrap();
        assert_eq!(
            r,
            ImportReport { experiments_new: 1, experiments_merged: 0, jobs_new: 1, jobs_updated: 0, jobs_kept: 1 }
        );
        assert_eq!(dst.job("j1").unwrap().unwrap(), job("j1", JobStatus::Done, 0.5));
        assert_eq!(dst.job("j2").unwrap().unwrap().summary["test.loss"], 0.25);
        assert_eq!(dst.metric_series("j1", "train.loss").unwrap(), vec![(1, 1.25), (2, 1.25)]);
        let again = dst.import(parsed).unwrap();
        assert_eq!(again.jobs_new + again.jobs_updated, 0);
        assert_eq!(dst.metric_series("j1", "train.loss").unwrap().len(), 2);
        assert_eq!(dst.experiment("e").unwrap().unwrap().stages[0].jobs, vec!["j1", "j2"]);
    }

    #[test]
    fn newer_format_is_refused() {
        let d = tempfile::tempdir().unwrap();
        Store::open(d.path()).unwrap().set_format_version(FORMAT_VERSION + 1).unwrap();
        let err = Store::open(d.path()).err().expect("refused");
        assert!(matches!(err, StoreError::NewerFormat { found, .. } if found == FORMAT_VERSION + 1), "{err}");
        assert!(err.to_string().contains("newer xlab"), "{err}");
    }
}

/// One line of an export: an experiment, or a job with its metric series.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExportLine {
    Experiment(ExperimentRecord),
    Job {
        job: Box<JobRecord>,
        #[serde(with = "xlab_proto::floats::json")]
        metrics: BTreeMap<String, Vec<(u64, f64)>>,
    },
}

/// What an import changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub experiments_new: usize,
    pub experiments_merged: usize,
    pub jobs_new: usize,
    pub jobs_updated: usize,
    pub jobs_kept: usize,
}
