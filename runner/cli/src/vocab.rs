//! What an experiment's jobs can be asked about: their fields, config keys and metrics. Every
//! name a query, table or plot is given is checked against it, so a typo is an error with a
//! "did you mean" instead of an empty or one-group answer.

use std::collections::BTreeSet;
use xlab_store::{ExperimentRecord, JobRecord, ResultStore};

/// Job fields every job has, besides its config keys.
pub const FIELDS: [&str; 5] = ["stage", "status", "seed", "id", "experiment"];

pub struct Vocab {
    /// Job fields and every dotted config key (maps included: `data`, `data.path`) of at
    /// least one job.
    pub keys: BTreeSet<String>,
    /// Every metric at least one job has logged.
    pub metrics: BTreeSet<String>,
}

impl Vocab {
    pub fn of(store: &dyn ResultStore, exp: &ExperimentRecord) -> anyhow::Result<Vocab> {
        let ids: Vec<&str> = exp.stages.iter().flat_map(|s| s.jobs.iter().map(String::as_str)).collect();
        let mut records = Vec::with_capacity(ids.len());
        for batch in ids.chunks(1024) {
            records.extend(store.jobs_by_id(batch)?.into_iter().flatten());
        }
        let mut vocab = Vocab::of_records(records.iter());
        // A job that has not finished (running now, or stopped) has no final metrics yet; the
        // series it has logged so far are what can be asked of it.
        let unfinished: Vec<&str> = records.iter().filter(|r| r.summary.is_empty()).map(|r| r.id.as_str()).collect();
        for batch in unfinished.chunks(1024) {
            for series in store.metrics_of_many(batch)? {
                vocab.metrics.extend(series.into_keys());
            }
        }
        Ok(vocab)
    }

    pub fn of_records<'a>(records: impl Iterator<Item = &'a JobRecord>) -> Vocab {
        fn paths(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
            if let serde_json::Value::Object(m) = v {
                for (k, v) in m {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    paths(&p, v, out);
                    out.insert(p);
                }
            }
        }
        let mut keys: BTreeSet<String> = FIELDS.into_iter().map(String::from).collect();
        let mut metrics = BTreeSet::new();
        for j in records {
            paths("", &j.config, &mut keys);
            keys.extend(j.point.iter().map(|(k, _)| k.clone()));
            metrics.extend(j.summary.keys().cloned());
        }
        Vocab { keys, metrics }
    }

    pub fn is_key(&self, name: &str) -> bool {
        self.keys.contains(name)
    }

    pub fn is_metric(&self, name: &str) -> bool {
        self.metrics.contains(name)
    }

    /// The closest key or metric to a mistyped name.
    pub fn suggest(&self, name: &str) -> Option<String> {
        xlab_plan::did_you_mean(name, self.keys.iter().chain(&self.metrics).map(String::as_str)).map(str::to_string)
    }

    pub fn suggest_metric(&self, name: &str) -> Option<String> {
        xlab_plan::did_you_mean(name, self.metrics.iter().map(String::as_str)).map(str::to_string)
    }

    pub fn suggest_key(&self, name: &str) -> Option<String> {
        xlab_plan::did_you_mean(name, self.keys.iter().map(String::as_str)).map(str::to_string)
    }
}
