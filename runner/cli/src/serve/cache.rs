//! What the dashboard keeps of a store between requests, and how it knows when that is stale.
//!
//! Opening a store of 10^5 jobs and reading its records takes about a second; a page that polls
//! once a second cannot pay that each time. So the dashboard keeps the records it has read (and
//! the answers it has given) while nobody else touches the store. It knows that from the
//! store's lock file: every process that opens the store writes its pid, command and start time
//! there, so while the file reads as this dashboard last left it, no run, import or other reader
//! has opened the store since, and what it read is what the store holds.
//!
//! A store that a run holds is read through the run's socket (see `xlab_store::live`), and
//! nothing of it is kept: it changes as the run writes.

use crate::common::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use xlab_store::{Decision, ExperimentRecord, JobRecord, ResultStore, Series, StoreError};

/// At most this many job records are kept (about 5 KB each in memory: 570 MB for a store of
/// 10^5 jobs, measured, its rows and answers included); past it, reads go to the
/// store (a store of 10^6 jobs is served, only without the speed).
const MAX_RECORDS: usize = 200_000;
/// At most this many metric points are kept.
const MAX_POINTS: usize = 50_000_000;
/// At most this many bytes of answers are kept.
const MAX_REPLY_BYTES: usize = 512 << 20;

#[derive(Default)]
pub(super) struct Cache {
    /// The lock file as this dashboard left it; `None`: nothing known.
    seal: Option<Vec<u8>>,
    /// Bumped each time what is kept is dropped: the page re-reads a view when it changes.
    generation: u64,
    experiments: Option<Vec<ExperimentRecord>>,
    jobs: HashMap<String, Option<JobRecord>>,
    series: HashMap<String, Arc<Series>>,
    points: usize,
    replies: HashMap<String, super::Reply>,
    reply_bytes: usize,
    /// Values worked out from the store (an experiment's vocabulary, a filter's rows), by what.
    derived: HashMap<String, Arc<dyn std::any::Any + Send + Sync>>,
}

impl Cache {
    /// Drops what is kept unless the store's lock file still reads as this dashboard left it.
    pub(super) fn check(&mut self, dir: &Path) {
        let now = std::fs::read(dir.join("lock")).ok();
        if self.seal.is_none() || now != self.seal {
            self.forget();
        }
    }

    fn forget(&mut self) {
        let generation = self.generation + 1;
        *self = Cache { generation, ..Cache::default() };
    }

    pub(super) fn reply(&self, key: &str) -> Option<super::Reply> {
        self.replies.get(key).cloned()
    }

    pub(super) fn keep_reply(&mut self, key: String, reply: super::Reply) {
        if self.reply_bytes + reply.body.len() > MAX_REPLY_BYTES {
            self.replies.clear();
            self.reply_bytes = 0;
        }
        self.reply_bytes += reply.body.len();
        self.replies.insert(key, reply);
    }
}

/// The store as one request reads it: from what the dashboard kept where it can, else from the
/// store, opened on the first read that needs it (and closed when the request ends).
pub(super) struct Reader<'a> {
    dir: &'a Path,
    cache: Mutex<&'a mut Cache>,
    open: Mutex<Option<Opened>>,
}

impl<'a> Reader<'a> {
    /// A reader over `cache`, which [`Cache::check`] has checked against the store.
    pub(super) fn new(dir: &'a Path, cache: &'a mut Cache) -> Reader<'a> {
        Reader { dir, cache: Mutex::new(cache), open: Mutex::new(None) }
    }

    /// Whether a running `xlab run` owns the store (so jobs marked running are running).
    pub(super) fn is_live(&self) -> bool {
        // Sealed: nobody has opened the store since this dashboard did, so no run holds it.
        if self.kept().seal.is_some() && self.open.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return false;
        }
        self.opened().map(|o| o.as_ref().is_some_and(Opened::is_live)).unwrap_or(false)
    }

    /// Which state of the store what is kept describes.
    pub(super) fn generation(&self) -> u64 {
        self.kept().generation
    }

    /// Opens the store for this request; it may turn out to be a run's, read live.
    fn open_now(&self) -> Result<(), Failure> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.is_none() {
            let opened = read_store(self.dir)?;
            if opened.is_live() {
                self.kept().forget();
            }
            *open = Some(opened);
        }
        Ok(())
    }

    /// Ends the request: what the store's lock file says now is the seal of what was kept.
    pub(super) fn finish(self) {
        let cache = self.cache.into_inner().unwrap_or_else(|e| e.into_inner());
        match self.open.into_inner().unwrap_or_else(|e| e.into_inner()) {
            // Read while the store is still open here: nobody else can have written it.
            Some(Opened::Local(store)) => {
                cache.seal = std::fs::read(self.dir.join("lock")).ok();
                drop(store);
            }
            Some(Opened::Live(_)) => cache.forget(),
            None => {}
        }
    }

    fn kept(&self) -> MutexGuard<'_, &'a mut Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn opened(&self) -> xlab_store::Result<MutexGuard<'_, Option<Opened>>> {
        self.open_now().map_err(|f| match f.error.downcast::<StoreError>() {
            Ok(e) => e,
            Err(e) => StoreError::Corrupt { dir: self.dir.to_path_buf(), message: format!("{e:#}") },
        })?;
        Ok(self.open.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `f` on the open store.
    fn with<T>(&self, f: impl FnOnce(&dyn ResultStore) -> xlab_store::Result<T>) -> xlab_store::Result<T> {
        let open = self.opened()?;
        f(&**open.as_ref().expect("opened"))
    }

    /// The value `make` works out from the store, kept under `key` while the store is unchanged.
    pub(super) fn derived<T: std::any::Any + Send + Sync>(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<T, Failure>,
    ) -> Result<Arc<T>, Failure> {
        if let Some(v) = self.kept().derived.get(key).cloned().and_then(|v| v.downcast::<T>().ok()) {
            return Ok(v);
        }
        let v = Arc::new(make()?);
        if !self.live() {
            let mut kept = self.kept();
            if kept.derived.len() >= 256 {
                kept.derived.clear();
            }
            kept.derived.insert(key.to_string(), v.clone());
        }
        Ok(v)
    }

    /// Whether this request read a run's store, live (its answers are not kept).
    pub(super) fn live(&self) -> bool {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(Opened::is_live)
    }

    fn refuse(&self) -> StoreError {
        StoreError::Corrupt { dir: self.dir.to_path_buf(), message: "the dashboard only reads the store".into() }
    }
}

impl ResultStore for Reader<'_> {
    fn dir(&self) -> &Path {
        self.dir
    }

    fn flush(&self) -> xlab_store::Result<()> {
        Ok(())
    }

    fn put_experiment(&self, _: &ExperimentRecord) -> xlab_store::Result<()> {
        Err(self.refuse())
    }

    fn experiment(&self, name: &str) -> xlab_store::Result<Option<ExperimentRecord>> {
        Ok(self.experiments()?.into_iter().find(|e| e.name == name))
    }

    fn experiments(&self) -> xlab_store::Result<Vec<ExperimentRecord>> {
        if let Some(all) = &self.kept().experiments {
            return Ok(all.clone());
        }
        let all = self.with(|s| s.experiments())?;
        if !self.live() {
            self.kept().experiments = Some(all.clone());
        }
        Ok(all)
    }

    fn put_job(&self, _: &JobRecord) -> xlab_store::Result<()> {
        Err(self.refuse())
    }

    fn job(&self, id: &str) -> xlab_store::Result<Option<JobRecord>> {
        Ok(self.jobs_by_id(&[id])?.pop().flatten())
    }

    fn jobs(&self) -> xlab_store::Result<Vec<JobRecord>> {
        self.with(|s| s.jobs())
    }

    fn jobs_by_id(&self, ids: &[&str]) -> xlab_store::Result<Vec<Option<JobRecord>>> {
        self.through(ids, |c| &mut c.jobs, |s, ids| s.jobs_by_id(ids), |c, _| c.jobs.len() < MAX_RECORDS)
    }

    fn put_decision(&self, _: &Decision) -> xlab_store::Result<()> {
        Err(self.refuse())
    }

    fn decisions(&self, experiment: &str, stage: &str) -> xlab_store::Result<Vec<Decision>> {
        self.with(|s| s.decisions(experiment, stage))
    }

    fn job_ids_with_prefix(&self, prefix: &str, at_most: usize) -> xlab_store::Result<Vec<String>> {
        self.with(|s| s.job_ids_with_prefix(prefix, at_most))
    }

    fn put_metrics_batch(&self, _: &str, _: &[(u64, BTreeMap<String, f64>)]) -> xlab_store::Result<()> {
        Err(self.refuse())
    }

    fn metric_series(&self, job: &str, name: &str) -> xlab_store::Result<Vec<(u64, f64)>> {
        Ok(self.series_of(&[job])?.pop().expect("one job").get(name).cloned().unwrap_or_default())
    }

    fn metrics_of(&self, job: &str) -> xlab_store::Result<Series> {
        Ok((*self.series_of(&[job])?.pop().expect("one job")).clone())
    }

    fn metrics_of_many(&self, ids: &[&str]) -> xlab_store::Result<Vec<Series>> {
        Ok(self.series_of(ids)?.into_iter().map(|s| (*s).clone()).collect())
    }
}

impl Reader<'_> {
    /// Every series of each job in `ids`, from what is kept where it can.
    fn series_of(&self, ids: &[&str]) -> xlab_store::Result<Vec<Arc<Series>>> {
        let read = |s: &dyn ResultStore, ids: &[&str]| Ok(s.metrics_of_many(ids)?.into_iter().map(Arc::new).collect());
        let admit = |c: &mut Cache, series: &Arc<Series>| {
            let points: usize = series.values().map(Vec::len).sum();
            let room = c.points + points <= MAX_POINTS;
            if room {
                c.points += points;
            }
            room
        };
        self.through(ids, |c| &mut c.series, read, admit)
    }

    /// What `read` gives for each of `ids`: from the kept map `slot` where it can, the rest read
    /// in one batch and kept while `admit` has room. A store a run has taken since it was last
    /// read here is read whole, and nothing of it kept.
    fn through<T: Clone + Default>(
        &self,
        ids: &[&str],
        slot: fn(&mut Cache) -> &mut HashMap<String, T>,
        read: impl Fn(&dyn ResultStore, &[&str]) -> xlab_store::Result<Vec<T>>,
        admit: impl Fn(&mut Cache, &T) -> bool,
    ) -> xlab_store::Result<Vec<T>> {
        let missing: Vec<&str> = {
            let mut kept = self.kept();
            let map = slot(&mut kept);
            ids.iter().copied().filter(|id| !map.contains_key(*id)).collect()
        };
        let got = if missing.is_empty() { Vec::new() } else { self.with(|s| read(s, &missing))? };
        if self.live() {
            return if missing.len() == ids.len() { Ok(got) } else { self.with(|s| read(s, ids)) };
        }
        let mut kept = self.kept();
        let mut fresh: HashMap<&str, T> = HashMap::new();
        for (id, v) in missing.iter().zip(got) {
            if admit(&mut kept, &v) {
                slot(&mut kept).insert(id.to_string(), v.clone());
            }
            fresh.insert(id, v);
        }
        let map = slot(&mut kept);
        Ok(ids.iter().map(|id| fresh.remove(id).unwrap_or_else(|| map.get(*id).cloned().unwrap_or_default())).collect())
    }
}
