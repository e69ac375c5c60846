//! Job identity: a hash of the canonical resolved config, the seed, the plugins and the parents.
//!
//! Canonical JSON sorts object keys and normalizes numbers (`0.1`, `1e-1` and `0.10` are one
//! number; an integral float such as `3.0` is written `3`; `-0.0` is `0`), so reformatting a file
//! never changes an id and changing any value always does.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt;

/// A job's identity: 16 hex digits (64 bits) of a SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JobId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A plugin a job uses, as recorded in its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRef {
    pub id: String,
    pub version: String,
}

/// Everything that makes a job what it is.
pub struct IdentityInput<'a> {
    pub config: &'a Value,
    pub seed: u64,
    pub plugins: &'a [PluginRef],
    pub parents: &'a [JobId],
    /// With `select: best`: which candidate the job consumes.
    pub pick: Option<&'a Value>,
}

/// The config as its identity sees it: each file (`{path, sha256}`) by its content alone, so the
/// same experiment run from another folder (a moved checkout, a colleague's clone, a cluster
/// mount) keeps its jobs.
pub fn content_config(config: &Value) -> Value {
    match config {
        Value::Object(m) if m.len() == 2 && m.contains_key("path") && m.get("sha256").is_some_and(Value::is_string) => {
            serde_json::json!({"sha256": m["sha256"]})
        }
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), content_config(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(content_config).collect()),
        other => other.clone(),
    }
}

/// Computes a job's identity.
pub fn job_id(input: &IdentityInput<'_>) -> JobId {
    let mut parents: Vec<&str> = input.parents.iter().map(JobId::as_str).collect();
    parents.sort_unstable();
    let mut plugins: Vec<(&str, &str)> = input.plugins.iter().map(|p| (p.id.as_str(), p.version.as_str())).collect();
    plugins.sort_unstable();
    let mut doc = serde_json::json!({
        "config": input.config,
        "seed": input.seed,
        "plugins": plugins,
        "parents": parents,
    });
    if let Some(pick) = input.pick {
        doc["pick"] = pick.clone();
    }
    let digest = Sha256::digest(canonical_json(&doc).as_bytes());
    JobId(hex::encode(&digest[..8]))
}

/// Serializes a JSON value canonically: sorted keys, no whitespace, normalized numbers.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

/// Returns the value with numbers normalized (see the module doc); keys are left as they are.
pub fn normalize_numbers(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::Number(normalize_number(n)),
        Value::Array(a) => Value::Array(a.iter().map(normalize_numbers).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), normalize_numbers(v))).collect()),
        other => other.clone(),
    }
}

fn normalize_number(n: &serde_json::Number) -> serde_json::Number {
    if n.is_i64() || n.is_u64() {
        return n.clone();
    }
    let f = n.as_f64().expect("a JSON number that is not an integer is an f64");
    // 2^53: beyond it not every integer is a float, so integral floats stay floats there.
    if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
        return serde_json::Number::from(f as i64);
    }
    serde_json::Number::from_f64(f).expect("finite")
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null | Value::Bool(_) | Value::String(_) => out.push_str(&v.to_string()),
        Value::Number(n) => out.push_str(&normalize_number(n).to_string()),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&o[k], out);
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(config: &Value, seed: u64) -> JobId {
        job_id(&IdentityInput { config, seed, plugins: &[], parents: &[], pick: None })
    }

    #[test]
    fn key_order_and_number_spelling_do_not_change_the_id() {
        let a: Value = serde_json::from_str(r#"{"lr": 0.1, "epochs": 3, "m": {"x": 1.0, "y": -0.0}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"m": {"y": 0, "x": 1}, "epochs": 3.0, "lr": 1e-1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(id(&a, 0), id(&b, 0));
    }

    #[test]
    fn any_changed_value_changes_the_id() {
        let base = json!({"lr": 0.1, "epochs": 3, "hidden": [64, 64], "name": "sgd", "nesterov": false});
        let variants = [
            json!({"lr": 0.10000001, "epochs": 3, "hidden": [64, 64], "name": "sgd", "nesterov": false}),
            json!({"lr": 0.1, "epochs": 4, "hidden": [64, 64], "name": "sgd", "nesterov": false}),
            json!({"lr": 0.1, "epochs": 3, "hidden": [64, 32], "name": "sgd", "nesterov": false}),
            json!({"lr": 0.1, "epochs": 3, "hidden": [64], "name": "sgd", "nesterov": false}),
            json!({"lr": 0.1, "epochs": 3, "hidden": [64, 64], "name": "adam", "nesterov": false}),
            json!({"lr": 0.1, "epochs": 3, "hidden": [64, 64], "name": "sgd", "nesterov": true}),
            json!({"lr": 0.1, "epochs": "3", "hidden": [64, 64], "name": "sgd", "nesterov": false}),
        ];
        let base_id = id(&base, 0);
        assert_ne!(base_id, id(&base, 1), "the seed is part of the identity");
        for v in variants {
            assert_ne!(base_id, id(&v, 0), "{v}");
        }
        let parent = JobId("0123456789abcdef".into());
        let with_parent =
            job_id(&IdentityInput { config: &base, seed: 0, plugins: &[], parents: &[parent], pick: None });
        assert_ne!(base_id, with_parent);
        let plugin = [PluginRef { id: "sam.sam".into(), version: "0.1.0".into() }];
        let with_plugin = job_id(&IdentityInput { config: &base, seed: 0, plugins: &plugin, parents: &[], pick: None });
        assert_ne!(base_id, with_plugin);
    }

    #[test]
    fn files_are_identified_by_content_alone() {
        let here =
            json!({"data": {"name": "csv", "path": {"path": "/home/ann/exp/bc.csv", "sha256": "ab12"}}, "epochs": 3});
        let there =
            json!({"data": {"name": "csv", "path": {"path": "/scratch/bob/x/bc.csv", "sha256": "ab12"}}, "epochs": 3});
        let changed =
            json!({"data": {"name": "csv", "path": {"path": "/home/ann/exp/bc.csv", "sha256": "cd34"}}, "epochs": 3});
        let key = |c: &Value| id(&content_config(c), 0);
        assert_eq!(key(&here), key(&there), "the same content in another folder is the same job");
        assert_ne!(key(&here), key(&changed), "other content is another job");
        assert_eq!(content_config(&here)["data"]["path"], json!({"sha256": "ab12"}));
    }

    #[test]
    fn ids_are_stable_across_releases() {
        // Pinned: changing the hashing scheme would orphan every stored result.
        let c = json!({"b": [1, 2.5], "a": "x"});
        assert_eq!(canonical_json(&c), r#"{"a":"x","b":[1,2.5]}"#);
        assert_eq!(id(&c, 3).0.len(), 16);
        assert_eq!(id(&c, 3), id(&json!({"a": "x", "b": [1.0, 2.50]}), 3));
    }

    /// Property: for many random configs, shuffling key order and respelling numbers keeps the id.
    #[test]
    fn property_reformatting_keeps_ids() {
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let n = 1 + next() % 6;
            let mut pairs: Vec<(String, f64)> =
                (0..n).map(|i| (format!("k{i}_{}", next() % 100), (next() % 10_000) as f64 / 64.0)).collect();
            let fwd: String = pairs.iter().map(|(k, v)| format!("\"{k}\": {v:?}")).collect::<Vec<_>>().join(", ");
            pairs.reverse();
            let rev: String = pairs.iter().map(|(k, v)| format!("\"{k}\": {:e}", v)).collect::<Vec<_>>().join(", ");
            let a: Value = serde_json::from_str(&format!("{{{fwd}}}")).unwrap();
            let b: Value = serde_json::from_str(&format!("{{{rev}}}")).unwrap();
            assert_eq!(id(&a, 1), id(&b, 1), "{fwd} vs {rev}");
        }
    }
}
