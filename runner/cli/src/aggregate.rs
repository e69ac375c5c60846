//! `xlab query --group-by KEYS --agg EXPRS --sort EXPR --limit N`: jobs grouped by any config
//! keys or job fields, with chosen aggregates of their final metrics.
//!
//! Aggregates: `mean`, `std` (n − 1), `sem`, `median`, `min`, `max`, `count`, and `ci95` (the
//! half-width of Student's t 95% interval of the mean), each over the done jobs of a group that
//! report the metric: `mean(test.acc)`; `count()` counts the group's jobs.

use crate::filter::{Filter, JobView};
use serde_json::Value;
use xlab_store::{ExperimentRecord, JobStatus, ResultStore};

#[derive(Debug, Clone, PartialEq)]
pub struct Agg {
    pub func: &'static str,
    /// Empty for `count()`.
    pub metric: String,
}

impl Agg {
    pub fn label(&self) -> String {
        format!("{}({})", self.func, self.metric)
    }
}

const FUNCS: [&str; 8] = ["mean", "std", "sem", "median", "min", "max", "count", "ci95"];

/// Parses `mean(test.acc),ci95(test.acc),count()`.
pub fn parse_aggs(text: &str) -> Result<Vec<Agg>, String> {
    let mut out = Vec::new();
    for part in split_top(text) {
        let part = part.trim();
        let (func, rest) =
            part.split_once('(').ok_or_else(|| format!("`{part}`: write an aggregate as `mean(test.acc)`"))?;
        let metric = rest.strip_suffix(')').ok_or_else(|| format!("`{part}`: missing `)`"))?.trim().to_string();
        let func = FUNCS
            .into_iter()
            .find(|f| *f == func.trim())
            .ok_or_else(|| format!("`{}` is not an aggregate; use one of {}", func.trim(), FUNCS.join(", ")))?;
        if func != "count" && metric.is_empty() {
            return Err(format!("`{func}()` needs a metric, e.g. `{func}(test.acc)`"));
        }
        out.push(Agg { func, metric });
    }
    Ok(out)
}

/// Splits at commas outside parentheses.
fn split_top(text: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// The half-width factor of a two-sided 95% confidence interval of a mean over `n` values:
/// Student's t's 97.5% quantile at `n - 1` degrees of freedom, exact at every `n` (it nears
/// the normal's 1.96 only slowly: 2.01 at 50 values, 1.98 at 100).
fn t975(n: usize) -> f64 {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    StudentsT::new(0.0, 1.0, (n - 1) as f64).expect("n > 1 gives a valid t distribution").inverse_cdf(0.975)
}

pub fn apply(func: &str, xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    if func == "count" {
        return Some(n as f64);
    }
    if n == 0 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let std = || (n > 1).then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    match func {
        "mean" => Some(mean),
        "std" => std(),
        "sem" => std().map(|s| s / (n as f64).sqrt()),
        "ci95" => std().map(|s| t975(n) * s / (n as f64).sqrt()),
        "min" => xs.iter().copied().reduce(f64::min),
        "max" => xs.iter().copied().reduce(f64::max),
        "median" => {
            let mut v = xs.to_vec();
            v.sort_by(f64::total_cmp);
            Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
        }
        _ => None,
    }
}

/// A grouped result: the group keys' values, then one value per aggregate.
pub struct Grouped {
    pub keys: Vec<String>,
    pub aggs: Vec<Agg>,
    pub rows: Vec<(Vec<Value>, Vec<Option<f64>>)>,
}

/// Groups the experiment's jobs (those `filter` matches) by `keys` and aggregates.
pub fn group(
    store: &dyn ResultStore,
    exp: &ExperimentRecord,
    filter: Option<&Filter>,
    keys: &[String],
    aggs: &[Agg],
) -> anyhow::Result<Grouped> {
    type Seen = (Vec<Value>, bool, Vec<Option<f64>>);
    let seen: Vec<Seen> = crate::scan::matching(store, exp, filter, false, &|_, view| {
        let job = view.record;
        let key: Vec<Value> = keys.iter().map(|k| view.field(k)).collect();
        let values = aggs.iter().map(|a| job.summary.get(&a.metric).copied()).collect();
        Some((key, job.status == JobStatus::Done, values))
    })?;
    // Per group: the number of jobs and, per aggregate, the values of its done jobs.
    let mut groups: Vec<(Vec<Value>, usize, Vec<Vec<f64>>)> = Vec::new();
    {
        for (key, done, values) in seen {
            let at = match groups.iter().position(|(k, _, _)| *k == key) {
                Some(i) => i,
                None => {
                    groups.push((key, 0, vec![Vec::new(); aggs.len()]));
                    groups.len() - 1
                }
            };
            let g = &mut groups[at];
            g.1 += 1;
            if done {
                for (xs, v) in g.2.iter_mut().zip(values) {
                    xs.extend(v);
                }
            }
        }
    }
    let rows = groups
        .into_iter()
        .map(|(key, count, values)| {
            let out = aggs
                .iter()
                .zip(&values)
                .map(|(a, xs)| if a.func == "count" { Some(count as f64) } else { apply(a.func, xs) })
                .collect();
            (key, out)
        })
        .collect();
    Ok(Grouped { keys: keys.to_vec(), aggs: aggs.to_vec(), rows })
}

impl Grouped {
    /// Sorts by an aggregate's label (`mean(test.acc)`, descending with a leading `-`) or a key.
    pub fn sort(&mut self, by: &str) -> Result<(), String> {
        let (desc, name) = match by.strip_prefix('-') {
            Some(n) => (true, n.trim()),
            None => (false, by.trim()),
        };
        let cmp_opt = |a: &Option<f64>, b: &Option<f64>| match (a, b) {
            (Some(x), Some(y)) => x.total_cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        if let Some(i) = self.aggs.iter().position(|a| a.label() == name) {
            self.rows.sort_by(|a, b| {
                let o = cmp_opt(&a.1[i], &b.1[i]);
                if desc && a.1[i].is_some() && b.1[i].is_some() {
                    o.reverse()
                } else {
                    o
                }
            });
        } else if let Some(i) = self.keys.iter().position(|k| k == name) {
            self.rows.sort_by(|a, b| {
                let o = crate::filter::order(&a.0[i], &b.0[i]);
                if desc {
                    o.reverse()
                } else {
                    o
                }
            });
        } else {
            let known: Vec<String> = self.aggs.iter().map(Agg::label).chain(self.keys.iter().cloned()).collect();
            let hint = match xlab_plan::did_you_mean(name, known.iter().map(String::as_str)) {
                Some(c) => format!("did you mean `{c}`?"),
                None => format!("the columns are {}", known.join(", ")),
            };
            return Err(format!("cannot sort by `{name}`: it is not a column of this table\n  hint: {hint}"));
        }
        Ok(())
    }

    pub fn header(&self) -> Vec<String> {
        self.keys.iter().cloned().chain(self.aggs.iter().map(Agg::label)).collect()
    }

    /// Display cells: keys as written, aggregates to 4 decimals (`count` whole), `-` when empty.
    /// The rows as text for people: 4 decimals, `-` where there is no value.
    pub fn cells(&self) -> Vec<Vec<String>> {
        self.text(false)
    }

    /// The rows as text for programs (CSV): every digit, empty where there is no value.
    pub fn exact_cells(&self) -> Vec<Vec<String>> {
        self.text(true)
    }

    fn text(&self, exact: bool) -> Vec<Vec<String>> {
        let missing = if exact { "" } else { "-" };
        self.rows
            .iter()
            .map(|(k, v)| {
                k.iter()
                    .map(|x| match x {
                        Value::String(s) => s.clone(),
                        Value::Null => missing.into(),
                        other => other.to_string(),
                    })
                    .chain(self.aggs.iter().zip(v).map(|(a, x)| match x {
                        None => missing.into(),
                        Some(x) if a.func == "count" || exact => format!("{x}"),
                        Some(x) => format!("{x:.4}"),
                    }))
                    .collect()
            })
            .collect()
    }

    pub fn json(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .map(|(k, v)| {
                    let mut m = serde_json::Map::new();
                    for (name, x) in self.keys.iter().zip(k) {
                        m.insert(name.clone(), x.clone());
                    }
                    for (a, x) in self.aggs.iter().zip(v) {
                        m.insert(a.label(), x.map(xlab_proto::floats::to_json).unwrap_or(Value::Null));
                    }
                    Value::Object(m)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_scipy_at_every_degree_of_freedom() {
        // scipy.stats.t.ppf(0.975, df)
        let scipy = [
            (1, 12.706204736174694),
            (3, 3.1824463052837078),
            (29, 2.045229642132703),
            (30, 2.0422724563012378),
            (40, 2.021075390306273),
            (99, 1.9842169515864174),
        ];
        for (df, q) in scipy {
            assert!((t975(df + 1) - q).abs() < 1e-9, "df {df}: {} vs scipy {q}", t975(df + 1));
        }
    }

    #[test]
    fn aggregates_match_numpy_and_scipy() {
        let xs = [0.91, 0.95, 0.97, 0.90];
        // numpy: mean 0.9325, std(ddof=1) 0.0330403793359983, median 0.93; scipy t.ppf(0.975, 3) = 3.182446
        assert!((apply("mean", &xs).unwrap() - 0.9325).abs() < 1e-12);
        assert!((apply("std", &xs).unwrap() - 0.03304037933599835).abs() < 1e-12);
        assert!((apply("sem", &xs).unwrap() - 0.03304037933599835 / 2.0).abs() < 1e-12);
        assert!((apply("ci95", &xs).unwrap() - 3.1824463052837078 * 0.03304037933599835 / 2.0).abs() < 1e-12);
        assert!((apply("median", &xs).unwrap() - 0.93).abs() < 1e-12);
        assert_eq!((apply("min", &xs), apply("max", &xs), apply("count", &xs)), (Some(0.90), Some(0.97), Some(4.0)));
        assert_eq!(apply("std", &[0.5]), None, "one value has no spread");
        assert_eq!(apply("mean", &[]), None);
    }

    #[test]
    fn aggregate_lists_parse_with_clear_errors() {
        let a = parse_aggs("mean(test.acc), ci95(test.acc),count()").unwrap();
        assert_eq!(a.iter().map(Agg::label).collect::<Vec<_>>(), ["mean(test.acc)", "ci95(test.acc)", "count()"]);
        assert!(parse_aggs("avg(test.acc)").unwrap_err().contains("`avg` is not an aggregate; use one of mean, std"));
        assert!(parse_aggs("mean()").unwrap_err().contains("`mean()` needs a metric"));
        assert!(parse_aggs("test.acc").unwrap_err().contains("write an aggregate as `mean(test.acc)`"));
    }
}
