//! Reading an experiment's jobs for a query, a table or a plot: the records are read and parsed
//! on every core (most of a query's time), filtered, and returned in plan order.

use crate::filter::{Filter, StoredJob};
use xlab_store::{ExperimentRecord, ResultStore};

/// Jobs read per request.
const BATCH: usize = 1024;

/// The experiment's jobs that `filter` matches, each mapped by `f` (which may drop one), in plan
/// order: stage by stage, sweep order within a stage. `series`: also read each job's metric
/// series (a filter that needs them gets them either way).
pub fn matching<T: Send>(
    store: &dyn ResultStore,
    exp: &ExperimentRecord,
    filter: Option<&Filter>,
    series: bool,
    f: &(dyn Fn(&str, &StoredJob<'_>) -> Option<T> + Sync),
) -> anyhow::Result<Vec<T>> {
    let jobs: Vec<(&str, &str)> =
        exp.stages.iter().flat_map(|s| s.jobs.iter().map(move |id| (s.name.as_str(), id.as_str()))).collect();
    let read_series = series || filter.is_some_and(|f| f.reads_series());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len().max(1));
    let per = jobs.len().div_ceil(threads).max(1);
    let parts: Vec<anyhow::Result<Vec<T>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || -> anyhow::Result<Vec<T>> {
                    let mut out = Vec::with_capacity(chunk.len());
                    // In batches: a store read through a running owner answers each in one trip.
                    for batch in chunk.chunks(BATCH) {
                        let ids: Vec<&str> = batch.iter().map(|(_, id)| *id).collect();
                        let records = store.jobs_by_id(&ids)?;
                        let mut series =
                            if read_series { store.metrics_of_many(&ids)? } else { Vec::new() }.into_iter();
                        for ((stage, _), job) in batch.iter().zip(records) {
                            let s = series.next();
                            let Some(job) = job else { continue };
                            let view = StoredJob { record: &job, series: s };
                            if filter.is_some_and(|f| !f.matches(&view)) {
                                continue;
                            }
                            out.extend(f(stage, &view));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("scan threads do not panic")).collect()
    });
    // The chunks are consecutive runs of the plan, so joining them keeps its order.
    let mut all = Vec::with_capacity(jobs.len());
    for p in parts {
        all.extend(p?);
    }
    Ok(all)
}
