//! Sweeps: grid, zip, random and variants, each a factor of alternatives; a stage's points are
//! the cartesian product of its factors (first factor slowest).

use crate::error::did_you_mean;
use crate::file::{RandomSweep, CONFIG_KEYS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// One change a sweep point makes to a stage's config.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Set a dotted key.
    Set(String, Value),
    /// Deep-merge a partial config (a variant).
    Merge(Value),
}

/// A sweep point: its changes, and how it is labelled (`key=value` pairs).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Point {
    pub changes: Vec<Change>,
    pub label: Vec<(String, Value)>,
}

/// A list of alternatives; the product of factors gives the points.
pub type Factor = Vec<Point>;

/// The most jobs one stage may expand to. Past it a sweep is a slip of the pen (a grid of ten
/// keys with ten values each is 10¹⁰ jobs; `seeds: 4000000000`), and expanding it would only
/// exhaust the memory; an adaptive search explores larger spaces without listing them.
pub const MAX_STAGE_JOBS: u64 = 1_000_000;

/// How many points the product of `factors` has (`None` past `u64`).
pub fn product_size(factors: &[Factor]) -> Option<u64> {
    factors.iter().try_fold(1u64, |n, f| n.checked_mul(f.len() as u64))
}

/// Refuses a product of more than [`MAX_STAGE_JOBS`] points before it is built.
pub fn check_size(factors: &[Factor], what: &str) -> Result<(), String> {
    match product_size(factors) {
        Some(n) if n <= MAX_STAGE_JOBS => Ok(()),
        n => {
            let sizes: Vec<String> = factors.iter().map(|f| f.len().to_string()).collect();
            let count = n.map(|n| n.to_string()).unwrap_or_else(|| "more than 2⁶⁴".into());
            Err(format!(
                "{what} expands to {count} points ({}); a stage runs at most {MAX_STAGE_JOBS} jobs",
                sizes.join(" × ")
            ))
        }
    }
}

pub fn product(factors: &[Factor]) -> Vec<Point> {
    let mut points = vec![Point::default()];
    for f in factors {
        points = points
            .into_iter()
            .flat_map(|p| {
                f.iter().map(move |alt| {
                    let mut q = p.clone();
                    q.changes.extend(alt.changes.iter().cloned());
                    q.label.extend(alt.label.iter().cloned());
                    q
                })
            })
            .collect();
    }
    points
}

/// Checks that a dotted key starts with a config key; returns a hint otherwise.
pub fn check_key(key: &str) -> Result<(), String> {
    let head = key.split('.').next().unwrap_or_default();
    if CONFIG_KEYS.contains(&head) {
        return Ok(());
    }
    Err(match did_you_mean(head, CONFIG_KEYS.iter().copied()) {
        Some(c) => format!("did you mean `{c}{}`?", &key[head.len()..]),
        None => format!("keys start with one of: {}", CONFIG_KEYS.join(", ")),
    })
}

/// A grid key's factor: one alternative per value.
pub fn grid_factor(key: &str, values: &[Value]) -> Factor {
    values
        .iter()
        .map(|v| Point { changes: vec![Change::Set(key.into(), v.clone())], label: vec![(key.into(), v.clone())] })
        .collect()
}

/// The zip factor: row i sets the i-th value of every key. Errors name the mismatch.
pub fn zip_factor(keys: &[(String, Vec<Value>)]) -> Result<Factor, String> {
    let n = keys.first().map(|(_, v)| v.len()).unwrap_or(0);
    if let Some((k, v)) = keys.iter().find(|(_, v)| v.len() != n) {
        return Err(format!(
            "`{k}` has {} values but `{}` has {n}; zip walks lists of equal length",
            v.len(),
            keys[0].0
        ));
    }
    Ok((0..n)
        .map(|i| {
            let set: Vec<(String, Value)> = keys.iter().map(|(k, v)| (k.clone(), v[i].clone())).collect();
            Point { changes: set.iter().map(|(k, v)| Change::Set(k.clone(), v.clone())).collect(), label: set }
        })
        .collect())
}

/// The keys of `random:` and their distributions, in file order.
pub fn random_space(r: &RandomSweep) -> Result<Vec<(String, Dist)>, (String, String)> {
    let mut dists = Vec::new();
    for (k, text) in &r.params {
        check_key(k).map_err(|h| (format!("`{k}` does not name a config key"), h))?;
        dists.push((
            k.clone(),
            parse_dist(text).map_err(|m| (m, "see the `random:` section of the README".to_string()))?,
        ));
    }
    if dists.is_empty() {
        return Err(("`random` has no keys to draw".into(), "add e.g. `optimizer.lr: loguniform(1e-4, 1e-1)`".into()));
    }
    Ok(dists)
}

/// Points that stand for a space a search proposes from as it runs (TPE), for checking its
/// configs before anything runs: every numeric key at its middle (the geometric middle of a
/// `loguniform`), every `choice` value at least once.
pub fn probe_factor(space: &[(String, Dist)]) -> Factor {
    let n = space.iter().map(|(_, d)| if let Dist::Choice(v) = d { v.len() } else { 1 }).max().unwrap_or(1);
    (0..n)
        .map(|i| {
            let set: Vec<(String, Value)> = space
                .iter()
                .map(|(k, d)| {
                    let v = match d {
                        Dist::Uniform(a, b) => Value::from((a + b) / 2.0),
                        Dist::LogUniform(a, b) => Value::from((a * b).sqrt()),
                        Dist::Int(a, b) => Value::from(a + (b - a) / 2),
                        Dist::Choice(items) => items[i % items.len()].clone(),
                    };
                    (k.clone(), v)
                })
                .collect();
            Point { changes: set.iter().map(|(k, v)| Change::Set(k.clone(), v.clone())).collect(), label: set }
        })
        .collect()
}

/// A parsed distribution of a random sweep.
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    Uniform(f64, f64),
    LogUniform(f64, f64),
    Int(i64, i64),
    Choice(Vec<Value>),
}

/// Parses `uniform(a, b)`, `loguniform(a, b)`, `int(a, b)` or `choice([...])`.
pub fn parse_dist(text: &str) -> Result<Dist, String> {
    let t = text.trim();
    let (name, rest) =
        t.split_once('(').ok_or_else(|| format!("`{t}` is not a distribution; write e.g. `loguniform(1e-4, 1e-1)`"))?;
    let inner = rest.strip_suffix(')').ok_or_else(|| format!("`{t}`: missing `)`"))?;
    let name = name.trim();
    let two = |what: &str| -> Result<(f64, f64), String> {
        let parts: Vec<&str> = inner.split(',').map(str::trim).collect();
        let [a, b] = parts[..] else { return Err(format!("`{t}`: {what} takes two numbers, (low, high)")) };
        let a: f64 = a.parse().map_err(|_| format!("`{t}`: `{a}` is not a number"))?;
        let b: f64 = b.parse().map_err(|_| format!("`{t}`: `{b}` is not a number"))?;
        if a >= b || a.is_nan() || b.is_nan() {
            return Err(format!("`{t}`: the low end must be below the high end"));
        }
        Ok((a, b))
    };
    match name {
        "uniform" => two("uniform").map(|(a, b)| Dist::Uniform(a, b)),
        "loguniform" => {
            let (a, b) = two("loguniform")?;
            if a <= 0.0 {
                return Err(format!("`{t}`: loguniform needs a positive low end"));
            }
            Ok(Dist::LogUniform(a, b))
        }
        "int" => {
            let (a, b) = two("int")?;
            if a.fract() != 0.0 || b.fract() != 0.0 {
                return Err(format!("`{t}`: int takes integer ends"));
            }
            Ok(Dist::Int(a as i64, b as i64))
        }
        "choice" => {
            let items: Vec<serde_yaml::Value> = serde_yaml::from_str(inner)
                .map_err(|_| format!("`{t}`: choice takes a list, e.g. `choice([16, 32, 64])`"))?;
            if items.is_empty() {
                return Err(format!("`{t}`: choice needs at least one value"));
            }
            let items = items
                .iter()
                .map(|v| serde_json::to_value(v).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Dist::Choice(items))
        }
        other => Err(match did_you_mean(other, ["uniform", "loguniform", "int", "choice"]) {
            Some(c) => format!("unknown distribution `{other}`; did you mean `{c}`?"),
            None => format!("unknown distribution `{other}`; use uniform, loguniform, int or choice"),
        }),
    }
}

/// The random factor: `samples` points drawn from a ChaCha8 stream seeded with `seed`, keys in
/// file order, so a file always expands to the same points.
pub fn random_factor(r: &RandomSweep) -> Result<Factor, (String, String)> {
    let dists = random_space(r)?;
    let Some(samples) = r.samples else {
        return Err((
            "`random` has no `samples`: how many points to draw".into(),
            "add e.g. `samples: 16`, or a `search:` that proposes the points (`algorithm: tpe`)".into(),
        ));
    };
    if samples == 0 {
        return Err(("`random.samples` must be at least 1".into(), "draw at least one point".into()));
    }
    if u64::from(samples) > MAX_STAGE_JOBS {
        return Err((
            format!("`random.samples` is {samples}; a stage runs at most {MAX_STAGE_JOBS} jobs"),
            "draw fewer points".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(r.seed);
    Ok((0..samples)
        .map(|_| {
            let set: Vec<(String, Value)> = dists
                .iter()
                .map(|(k, d)| {
                    let v = match d {
                        Dist::Uniform(a, b) => Value::from(a + (b - a) * rng.gen::<f64>()),
                        Dist::LogUniform(a, b) => Value::from((a.ln() + (b.ln() - a.ln()) * rng.gen::<f64>()).exp()),
                        Dist::Int(a, b) => Value::from(rng.gen_range(*a..=*b)),
                        Dist::Choice(items) => items[rng.gen_range(0..items.len())].clone(),
                    };
                    (k.clone(), v)
                })
                .collect();
            Point { changes: set.iter().map(|(k, v)| Change::Set(k.clone(), v.clone())).collect(), label: set }
        })
        .collect())
}

/// Flattens a partial config into dotted leaves, for labels.
pub fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaves(&key, x, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn distributions_parse_and_refuse_clearly() {
        assert_eq!(parse_dist("loguniform(1e-4, 1e-1)"), Ok(Dist::LogUniform(1e-4, 1e-1)));
        assert_eq!(parse_dist(" int(1, 4) "), Ok(Dist::Int(1, 4)));
        assert_eq!(parse_dist("choice([16, 32])"), Ok(Dist::Choice(vec![json!(16), json!(32)])));
        assert_eq!(
            parse_dist("uniform(0.9, 0.8)").unwrap_err(),
            "`uniform(0.9, 0.8)`: the low end must be below the high end"
        );
        assert_eq!(
            parse_dist("logunifrom(1, 2)").unwrap_err(),
            "unknown distribution `logunifrom`; did you mean `loguniform`?"
        );
        assert_eq!(
            parse_dist("loguniform(0, 1)").unwrap_err(),
            "`loguniform(0, 1)`: loguniform needs a positive low end"
        );
        assert!(parse_dist("0.1").unwrap_err().contains("is not a distribution"));
        assert!(parse_dist("choice(3)").unwrap_err().contains("choice takes a list"));
    }

    #[test]
    fn random_points_stay_in_range_and_depend_only_on_the_seed() {
        let mut params = indexmap::IndexMap::new();
        params.insert("optimizer.lr".to_string(), "loguniform(1e-4, 1e-1)".to_string());
        params.insert("batch_size".to_string(), "int(16, 64)".to_string());
        let r = RandomSweep { samples: Some(50), seed: 7, params };
        let a = random_factor(&r).unwrap();
        assert_eq!(a, random_factor(&r).unwrap());
        assert_eq!(a.len(), 50);
        for p in &a {
            let lr = p.label[0].1.as_f64().unwrap();
            let bs = p.label[1].1.as_i64().unwrap();
            assert!((1e-4..=1e-1).contains(&lr) && (16..=64).contains(&bs), "{p:?}");
        }
        let other = random_factor(&RandomSweep { seed: 8, ..r }).unwrap();
        assert_ne!(a, other);
    }

    #[test]
    fn zip_needs_equal_lengths_and_product_multiplies() {
        let z = zip_factor(&[("a".into(), vec![json!(1), json!(2)]), ("b".into(), vec![json!(3), json!(4)])]).unwrap();
        assert_eq!(z.len(), 2);
        assert_eq!(z[1].label, vec![("a".to_string(), json!(2)), ("b".to_string(), json!(4))]);
        let err = zip_factor(&[("a".into(), vec![json!(1), json!(2)]), ("b".into(), vec![json!(3)])]).unwrap_err();
        assert_eq!(err, "`b` has 1 values but `a` has 2; zip walks lists of equal length");
        let g = grid_factor("c", &[json!(5), json!(6), json!(7)]);
        assert_eq!(product(&[g, z]).len(), 6);
    }
}
