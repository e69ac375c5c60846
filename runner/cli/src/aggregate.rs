//! `xlab query --group-by KEYS --agg EXPRS --compare-to FILTER --sort EXPR --limit N`: jobs
//! grouped by any config keys or job fields, with chosen aggregates of their final metrics, and
//! paired comparisons against a baseline over the seeds they share.
//!
//! Aggregates: `mean`, `std` (n − 1), `sem`, `median`, `min`, `max`, `count`, `ci95` (the
//! half-width of Student's t 95% interval of the mean), `iqm` (the interquartile mean) and
//! `bootstrap_ci` (a seeded 95% BCa bootstrap interval of the mean), each over the done jobs of
//! a group that report the metric: `mean(test.acc)`; `count()` counts the group's jobs;
//! `pareto(test.acc, test.worst_group_acc)` marks the groups on the Pareto front of two metrics'
//! means (a leading `-` on a metric: lower is better; `+`: higher; unmarked, losses, errors,
//! FID, NFE and times are lower-is-better).

use crate::filter::{Filter, JobView};
use crate::stats;
use serde_json::Value;
use std::collections::BTreeMap;
use xlab_store::{ExperimentRecord, JobStatus, ResultStore};

#[derive(Debug, Clone, PartialEq)]
pub struct Agg {
    pub func: &'static str,
    /// Empty for `count()`.
    pub metric: String,
    /// `pareto(a, b)`: the second metric, and per metric whether higher is better.
    pub other: String,
    pub higher: (bool, bool),
    /// The column's name as written (`pareto(test.acc, -sample.fid)`).
    label: String,
}

impl Agg {
    pub fn new(func: &'static str, metric: &str) -> Agg {
        Agg {
            func,
            metric: metric.into(),
            other: String::new(),
            higher: (true, true),
            label: format!("{func}({metric})"),
        }
    }

    pub fn label(&self) -> String {
        self.label.clone()
    }

    /// Whether its cells are intervals (two columns in CSV).
    pub fn is_interval(&self) -> bool {
        matches!(self.func, "bootstrap_ci" | "diff_ci95")
    }

    /// The metrics the column reads.
    pub fn metrics(&self) -> impl Iterator<Item = &str> {
        [self.metric.as_str(), self.other.as_str()].into_iter().filter(|m| !m.is_empty())
    }
}

const FUNCS: [&str; 11] =
    ["mean", "std", "sem", "median", "min", "max", "count", "ci95", "iqm", "bootstrap_ci", "pareto"];

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
        if func == "pareto" {
            out.push(parse_pareto(&metric)?);
            continue;
        }
        if metric.contains(',') {
            return Err(format!("`{part}`: `{func}` takes one metric"));
        }
        out.push(Agg::new(func, &metric));
    }
    Ok(out)
}

/// `pareto(test.acc, -sample.fid)`: two metrics, each with its direction.
fn parse_pareto(args: &str) -> Result<Agg, String> {
    let parts: Vec<&str> = args.split(',').map(str::trim).collect();
    let [a, b] = parts[..] else {
        return Err(format!("`pareto({args})` takes two metrics, e.g. `pareto(test.acc, test.worst_group_acc)`"));
    };
    let side = |m: &str| match (m.strip_prefix('-'), m.strip_prefix('+')) {
        (Some(rest), _) => (rest.trim().to_string(), false),
        (_, Some(rest)) => (rest.trim().to_string(), true),
        _ => (m.to_string(), !stats::lower_is_better(m)),
    };
    let ((ma, ha), (mb, hb)) = (side(a), side(b));
    Ok(Agg { func: "pareto", metric: ma, other: mb, higher: (ha, hb), label: format!("pareto({a}, {b})") })
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

/// One cell of a grouped table.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Missing,
    Num(f64),
    Interval(f64, f64),
    Flag(bool),
    /// Why a value is not there (`2 shared seeds`), for people; missing for programs.
    Note(String),
}

impl Cell {
    fn from(x: Option<f64>) -> Cell {
        x.map_or(Cell::Missing, Cell::Num)
    }

    /// The number a sort orders by (an interval by its middle; on the front after off it).
    fn key(&self) -> Option<f64> {
        match self {
            Cell::Num(x) => Some(*x),
            Cell::Interval(lo, hi) => Some((lo + hi) / 2.0),
            Cell::Flag(b) => Some(f64::from(u8::from(*b))),
            Cell::Missing | Cell::Note(_) => None,
        }
    }
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
        "iqm" => stats::iqm(xs),
        "median" => {
            let mut v = xs.to_vec();
            v.sort_by(f64::total_cmp);
            Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
        }
        _ => None,
    }
}

/// An aggregate's cell over a group's values.
fn cell(func: &str, xs: &[f64]) -> Cell {
    match func {
        "bootstrap_ci" => match stats::bootstrap_ci(xs, stats::RESAMPLES, stats::BOOTSTRAP_SEED) {
            Some((lo, hi)) => Cell::Interval(lo, hi),
            None => Cell::Missing,
        },
        _ => Cell::from(apply(func, xs)),
    }
}

/// The paired test `--compare-to` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PairedTest {
    /// Student's paired t test.
    T,
    /// Wilcoxon's signed-rank test (no normality assumed; with fewer than 6 pairs it cannot
    /// reach p < 0.05).
    Wilcoxon,
}

/// Fewer shared seeds than this give a difference but no interval or p-value.
pub const MIN_PAIRS: usize = 3;

/// `--compare-to FILTER`: the jobs the filter matches are the baseline; each group's jobs are
/// paired with the baseline's by seed (and by every group key whose value varies within the
/// baseline, e.g. the stage or the dataset).
pub struct Compare<'a> {
    pub baseline: &'a Filter,
    pub metrics: Vec<String>,
    pub test: PairedTest,
}

impl Compare<'_> {
    /// The columns it adds per metric.
    pub fn columns(&self) -> Vec<Agg> {
        let p = match self.test {
            PairedTest::T => "p_t",
            PairedTest::Wilcoxon => "p_wilcoxon",
        };
        self.metrics.iter().flat_map(|m| ["diff", "diff_ci95", p, "pairs"].map(|f| Agg::new(f, m))).collect()
    }
}

/// A grouped result: the group keys' values, then one cell per column.
pub struct Grouped {
    pub keys: Vec<String>,
    pub aggs: Vec<Agg>,
    pub rows: Vec<(Vec<Value>, Vec<Cell>)>,
}

/// A job as grouping sees it.
struct Seen {
    key: Vec<Value>,
    done: bool,
    seed: u64,
    baseline: bool,
    values: Vec<Option<f64>>,
}

/// One group: its key, its jobs' count, and per metric the (seed, value) of its done jobs.
struct Group {
    key: Vec<Value>,
    count: usize,
    all_baseline: bool,
    values: Vec<Vec<(u64, f64)>>,
}

/// Groups the experiment's jobs (those `filter` matches) by `keys` and aggregates; with
/// `compare`, adds its paired columns.
pub fn group(
    store: &dyn ResultStore,
    exp: &ExperimentRecord,
    filter: Option<&Filter>,
    keys: &[String],
    aggs: &[Agg],
    compare: Option<&Compare<'_>>,
) -> anyhow::Result<Grouped> {
    let mut metrics: Vec<String> = Vec::new();
    for m in aggs.iter().flat_map(Agg::metrics).chain(compare.iter().flat_map(|c| c.metrics.iter().map(String::as_str)))
    {
        if !metrics.iter().any(|x| x == m) {
            metrics.push(m.to_string());
        }
    }
    let index = |m: &str| metrics.iter().position(|x| x == m).expect("every column's metric is gathered");
    let series = compare.is_some_and(|c| c.baseline.reads_series());
    let seen: Vec<Seen> = crate::scan::matching(store, exp, filter, series, &|_, view| {
        let job = view.record;
        Some(Seen {
            key: keys.iter().map(|k| view.field(k)).collect(),
            done: job.status == JobStatus::Done,
            seed: job.seed,
            baseline: compare.is_some_and(|c| c.baseline.matches(view)),
            values: metrics.iter().map(|m| job.summary.get(m).copied()).collect(),
        })
    })?;
    let mut groups: Vec<Group> = Vec::new();
    for job in &seen {
        let at = match groups.iter().position(|g| g.key == job.key) {
            Some(i) => i,
            None => {
                let values = vec![Vec::new(); metrics.len()];
                groups.push(Group { key: job.key.clone(), count: 0, all_baseline: true, values });
                groups.len() - 1
            }
        };
        let g = &mut groups[at];
        g.count += 1;
        g.all_baseline &= job.baseline;
        if job.done {
            for (xs, v) in g.values.iter_mut().zip(&job.values) {
                xs.extend(v.map(|v| (job.seed, v)));
            }
        }
    }
    let mut columns = aggs.to_vec();
    let mut rows: Vec<(Vec<Value>, Vec<Cell>)> = groups
        .iter()
        .map(|g| {
            let cells = aggs
                .iter()
                .map(|a| match a.func {
                    "count" => Cell::Num(g.count as f64),
                    "pareto" => Cell::Missing, // below, once every row is known
                    f => cell(f, &g.values[index(&a.metric)].iter().map(|(_, v)| *v).collect::<Vec<_>>()),
                })
                .collect();
            (g.key.clone(), cells)
        })
        .collect();
    for (i, a) in aggs.iter().enumerate().filter(|(_, a)| a.func == "pareto") {
        let means = |m: &str, g: &Group| apply("mean", &g.values[index(m)].iter().map(|(_, v)| *v).collect::<Vec<_>>());
        let points: Vec<Option<(f64, f64)>> =
            groups.iter().map(|g| Some((means(&a.metric, g)?, means(&a.other, g)?))).collect();
        for (row, on) in rows.iter_mut().zip(stats::pareto_front(&points, a.higher)) {
            row.1[i] = Cell::Flag(on);
        }
    }
    if let Some(c) = compare {
        let pairing = Pairing::of(&seen, keys)?;
        for ((_, cells), g) in rows.iter_mut().zip(&groups) {
            for m in &c.metrics {
                cells.extend(pairing.compare(g, index(m), c.test));
            }
        }
        columns.extend(c.columns());
    }
    Ok(Grouped { keys: keys.to_vec(), aggs: columns, rows })
}

/// The baseline's done jobs, by the values of the group keys that vary within it and by seed.
struct Pairing {
    varying: Vec<usize>,
    by: BTreeMap<(String, u64), Vec<Option<f64>>>,
}

impl Pairing {
    fn of(seen: &[Seen], keys: &[String]) -> anyhow::Result<Pairing> {
        let base: Vec<&Seen> = seen.iter().filter(|j| j.baseline && j.done).collect();
        if base.is_empty() {
            let any = seen.iter().any(|j| j.baseline);
            anyhow::bail!(
                "--compare-to matched {} of the {} job(s){}: the baseline needs done jobs\n  hint: `xlab query` lists the jobs and their config keys",
                if any { "no done job" } else { "none" },
                seen.len(),
                if any { " (it matched unfinished ones)" } else { "" }
            );
        }
        let varying: Vec<usize> =
            (0..keys.len()).filter(|&k| base.iter().any(|j| j.key[k] != base[0].key[k])).collect();
        let mut by: BTreeMap<(String, u64), Vec<Option<f64>>> = BTreeMap::new();
        for j in &base {
            let at = (Self::tag(&varying, &j.key), j.seed);
            if by.insert(at.clone(), j.values.clone()).is_some() {
                let sel: Vec<String> = varying.iter().map(|&k| format!("{} = {}", keys[k], j.key[k])).collect();
                let within = if sel.is_empty() { String::new() } else { format!(" with {}", sel.join(", ")) };
                anyhow::bail!(
                    "--compare-to matches more than one done job of seed {}{within}, so the baseline is ambiguous\n  hint: narrow the filter to one job per seed (add the config key that tells them apart, e.g. `and optimizer.lr == 0.1`), or group by that key too",
                    j.seed
                );
            }
        }
        Ok(Pairing { varying, by })
    }

    fn tag(varying: &[usize], key: &[Value]) -> String {
        varying.iter().map(|&k| key[k].to_string()).collect::<Vec<_>>().join("\u{1f}")
    }

    /// The difference, its interval, the test's p-value and the number of pairs, for one metric.
    fn compare(&self, g: &Group, metric: usize, test: PairedTest) -> [Cell; 4] {
        if g.all_baseline {
            let blank = || Cell::Note(String::new());
            return [Cell::Note("baseline".into()), blank(), blank(), blank()];
        }
        let tag = Self::tag(&self.varying, &g.key);
        // A seed's value: the mean of the group's jobs with that seed (usually one).
        let mut per_seed: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
        for (seed, v) in &g.values[metric] {
            let e = per_seed.entry(*seed).or_default();
            *e = (e.0 + v, e.1 + 1);
        }
        let d: Vec<f64> = per_seed
            .iter()
            .filter_map(|(seed, (sum, n))| {
                let base = self.by.get(&(tag.clone(), *seed))?[metric]?;
                Some(sum / *n as f64 - base)
            })
            .collect();
        let n = d.len();
        let pairs = Cell::Num(n as f64);
        if n == 0 {
            return [Cell::Note("no shared seeds".into()), Cell::Missing, Cell::Missing, pairs];
        }
        let diff = Cell::Num(d.iter().sum::<f64>() / n as f64);
        if n < MIN_PAIRS {
            let few = || Cell::Note(format!("{n} shared seed{}", if n == 1 { "" } else { "s" }));
            return [diff, few(), few(), pairs];
        }
        let ci = match stats::bootstrap_ci(&d, stats::RESAMPLES, stats::BOOTSTRAP_SEED) {
            Some((lo, hi)) => Cell::Interval(lo, hi),
            None => Cell::Missing,
        };
        let result = match test {
            PairedTest::T => stats::paired_t(&d),
            PairedTest::Wilcoxon => stats::wilcoxon(&d),
        };
        let p = match result {
            Some(r) => Cell::Num(r.p),
            None => Cell::Note("no spread".into()),
        };
        [diff, ci, p, pairs]
    }
}

impl Grouped {
    /// Sorts by a column's label (`mean(test.acc)`, descending with a leading `-`) or a key.
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
        let squeeze = |s: &str| s.replace(' ', "");
        if let Some(i) = self.aggs.iter().position(|a| squeeze(&a.label()) == squeeze(name)) {
            self.rows.sort_by(|a, b| {
                let (x, y) = (a.1[i].key(), b.1[i].key());
                let o = cmp_opt(&x, &y);
                if desc && x.is_some() && y.is_some() {
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

    /// The header for programs (CSV): an interval column becomes two, `label.lo` and `label.hi`.
    pub fn exact_header(&self) -> Vec<String> {
        let mut h = self.keys.clone();
        for a in &self.aggs {
            if a.is_interval() {
                h.push(format!("{}.lo", a.label()));
                h.push(format!("{}.hi", a.label()));
            } else {
                h.push(a.label());
            }
        }
        h
    }

    /// The rows as text for people: 4 decimals (differences signed, small p-values in
    /// scientific notation), `-` where there is no value, notes as they are.
    pub fn cells(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .map(|(k, v)| {
                k.iter()
                    .map(|x| key_text(x, "-"))
                    .chain(self.aggs.iter().zip(v).map(|(a, x)| {
                        let signed = a.func.starts_with("diff");
                        let num = |x: f64| {
                            if a.func == "count" || a.func == "pairs" {
                                format!("{x}")
                            } else if a.func.starts_with("p_") && x < 1e-4 {
                                format!("{x:.1e}")
                            } else if signed {
                                format!("{x:+.4}")
                            } else {
                                format!("{x:.4}")
                            }
                        };
                        match x {
                            Cell::Missing => "-".into(),
                            Cell::Num(x) => num(*x),
                            Cell::Interval(lo, hi) => format!("[{}, {}]", num(*lo), num(*hi)),
                            Cell::Flag(b) => (if *b { "front" } else { "" }).into(),
                            Cell::Note(n) => n.clone(),
                        }
                    }))
                    .collect()
            })
            .collect()
    }

    /// The rows as text for programs (CSV, under `exact_header`): every digit, empty where there
    /// is no value.
    pub fn exact_cells(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .map(|(k, v)| {
                let mut out: Vec<String> = k.iter().map(|x| key_text(x, "")).collect();
                for (a, x) in self.aggs.iter().zip(v) {
                    match (x, a.is_interval()) {
                        (Cell::Interval(lo, hi), _) => out.extend([format!("{lo}"), format!("{hi}")]),
                        (_, true) => out.extend([String::new(), String::new()]),
                        (Cell::Num(x), _) => out.push(format!("{x}")),
                        (Cell::Flag(b), _) => out.push(format!("{b}")),
                        (Cell::Missing | Cell::Note(_), _) => out.push(String::new()),
                    }
                }
                out
            })
            .collect()
    }

    pub fn json(&self) -> Value {
        let num = |x: f64| xlab_proto::floats::to_json(x);
        Value::Array(
            self.rows
                .iter()
                .map(|(k, v)| {
                    let mut m = serde_json::Map::new();
                    for (name, x) in self.keys.iter().zip(k) {
                        m.insert(name.clone(), x.clone());
                    }
                    for (a, x) in self.aggs.iter().zip(v) {
                        let value = match x {
                            Cell::Num(x) => num(*x),
                            Cell::Interval(lo, hi) => Value::Array(vec![num(*lo), num(*hi)]),
                            Cell::Flag(b) => Value::Bool(*b),
                            Cell::Missing | Cell::Note(_) => Value::Null,
                        };
                        m.insert(a.label(), value);
                    }
                    Value::Object(m)
                })
                .collect(),
        )
    }
}

fn key_text(x: &Value, missing: &str) -> String {
    match x {
        Value::String(s) => s.clone(),
        Value::Null => missing.into(),
        other => other.to_string(),
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
