//! The query filter: a small expression language over a job's fields, its config and its
//! metrics, e.g. `stage == "train" and step_rule.use in ["sam.sam", "sam.asam"] and
//! last(val.acc) > 0.9`.
//!
//! - Names: `stage`, `status`, `seed`, `id`, `experiment`; any other dotted name is a config
//!   key (`optimizer.lr`, `objective.use`); a key the job's config lacks is `null`.
//! - Metric summaries: `last(k)` (the final value), `max(k)`, `min(k)`, `at(k, step)`.
//! - Operators: `==`, `!=`, `<`, `<=`, `>`, `>=`, `in [...]`, `~ "regex"`, `and`, `or`, `not`,
//!   parentheses. A comparison with `null` (a missing key or metric) is false, except `== null`.
//!
//! Parse errors carry the offending character's position for a caret under the query.

use crate::vocab::Vocab;
use serde_json::Value;
use std::collections::BTreeMap;

/// What an expression reads of a job.
pub trait JobView {
    fn field(&self, name: &str) -> Value;
    /// The metric's (step, value) series; empty when the job has none.
    fn series(&self, metric: &str) -> Vec<(u64, f64)>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// Character offset in the query.
    pub at: usize,
    pub message: String,
}

impl ParseError {
    /// The query, a caret under the offending character, and the message.
    pub fn render(&self, query: &str) -> String {
        format!("{}\n{}^ {}", query, " ".repeat(query[..self.at.min(query.len())].chars().count()), self.message)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Name(String),
    Op(&'static str),
}

fn lex(q: &str) -> Result<Vec<(usize, Tok)>, ParseError> {
    let b = q.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i] as char;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c == '"' || c == '\'' {
            let end = q[i + 1..].find(c).ok_or(ParseError { at: i, message: "this string is not closed".into() })?;
            out.push((start, Tok::Str(q[i + 1..i + 1 + end].to_string())));
            i += end + 2;
        } else if c.is_ascii_digit() || (c == '-' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit() || *d == b'.')) {
            i += 1;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric()
                    || b[i] == b'.'
                    || (b[i - 1] | 0x20 == b'e' && (b[i] == b'-' || b[i] == b'+')))
            {
                i += 1;
            }
            let n = q[start..i]
                .parse()
                .map_err(|_| ParseError { at: start, message: format!("`{}` is not a number", &q[start..i]) })?;
            out.push((start, Tok::Num(n)));
        } else if c.is_ascii_alphabetic() || c == '_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
            out.push((start, Tok::Name(q[start..i].to_string())));
        } else {
            let two = q.get(i..i + 2).unwrap_or("");
            let op = ["==", "!=", "<=", ">="].into_iter().find(|o| *o == two);
            let op = match op {
                Some(o) => o,
                None => match c {
                    '<' => "<",
                    '>' => ">",
                    '~' => "~",
                    '(' => "(",
                    ')' => ")",
                    '[' => "[",
                    ']' => "]",
                    ',' => ",",
                    '=' => return Err(ParseError { at: i, message: "use `==` to compare".into() }),
                    _ => return Err(ParseError { at: i, message: format!("unexpected `{c}`") }),
                },
            };
            i += op.len();
            out.push((start, Tok::Op(op)));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Expr {
    Lit(Value),
    /// A job field or config key (or, once bound, a bare metric name), at its offset.
    Name(usize, String),
    /// A metric summary, with the offset of the metric's name.
    Metric(&'static str, String, Option<u64>, usize),
    List(Vec<Expr>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cmp(&'static str, Box<Expr>, Box<Expr>),
    In(Box<Expr>, Box<Expr>),
    Match(Box<Expr>, regex_lite::Regex),
}

/// A parsed filter.
#[derive(Debug, Clone)]
pub struct Filter(Expr);

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.toks.get(self.pos).map(|(a, _)| *a).unwrap_or(self.len)
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { at: self.at(), message: message.into() })
    }

    fn eat_op(&mut self, op: &'static str) -> bool {
        if self.peek() == Some(&Tok::Op(op)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Name(n)) if n == w) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_op(&mut self, op: &'static str) -> Result<(), ParseError> {
        if self.eat_op(op) {
            Ok(())
        } else {
            self.err(format!("expected `{op}`"))
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.and()?;
        while self.eat_word("or") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.not()?;
        while self.eat_word("and") {
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, ParseError> {
        if self.eat_word("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Expr, ParseError> {
        let left = self.primary()?;
        for op in ["==", "!=", "<=", ">=", "<", ">"] {
            if self.eat_op(op) {
                return Ok(Expr::Cmp(op, Box::new(left), Box::new(self.primary()?)));
            }
        }
        if self.eat_word("in") {
            return Ok(Expr::In(Box::new(left), Box::new(self.primary()?)));
        }
        if self.eat_op("~") {
            let at = self.at();
            let Some(Tok::Str(pattern)) = self.peek().cloned() else {
                return self.err("`~` takes a regular expression in quotes");
            };
            self.pos += 1;
            let re = regex_lite::Regex::new(&pattern)
                .map_err(|e| ParseError { at, message: format!("not a regular expression: {e}") })?;
            return Ok(Expr::Match(Box::new(left), re));
        }
        Ok(left)
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let Some(tok) = self.peek().cloned() else {
            return self.err("the filter ends here; expected a value");
        };
        self.pos += 1;
        match tok {
            Tok::Num(n) => Ok(Expr::Lit(serde_json::json!(n))),
            Tok::Str(s) => Ok(Expr::Lit(Value::String(s))),
            Tok::Op("(") => {
                let e = self.or()?;
                self.expect_op(")")?;
                Ok(e)
            }
            Tok::Op("[") => {
                let mut items = Vec::new();
                if !self.eat_op("]") {
                    loop {
                        items.push(self.primary()?);
                        if self.eat_op("]") {
                            break;
                        }
                        self.expect_op(",")?;
                    }
                }
                Ok(Expr::List(items))
            }
            Tok::Name(n) if n == "true" || n == "false" => Ok(Expr::Lit(Value::Bool(n == "true"))),
            Tok::Name(n) if n == "null" => Ok(Expr::Lit(Value::Null)),
            Tok::Name(n) if self.peek() == Some(&Tok::Op("(")) => {
                let func = match n.as_str() {
                    "last" => "last",
                    "max" => "max",
                    "min" => "min",
                    "at" => "at",
                    _ => {
                        self.pos -= 1;
                        return self.err(format!("unknown function `{n}`; metric summaries are last, max, min and at"));
                    }
                };
                self.pos += 1;
                let Some(Tok::Name(metric)) = self.peek().cloned() else {
                    return self.err(format!("`{func}(…)` takes a metric name, e.g. `{func}(val.acc)`"));
                };
                let metric_at = self.at();
                self.pos += 1;
                let step = if func == "at" {
                    self.expect_op(",")?;
                    match self.peek().cloned() {
                        Some(Tok::Num(s)) if s >= 0.0 && s.fract() == 0.0 => {
                            self.pos += 1;
                            Some(s as u64)
                        }
                        _ => return self.err("`at(metric, step)` takes a whole step number"),
                    }
                } else {
                    None
                };
                self.expect_op(")")?;
                Ok(Expr::Metric(func, metric, step, metric_at))
            }
            Tok::Name(n) if ["and", "or", "not", "in"].contains(&n.as_str()) => {
                self.pos -= 1;
                self.err(format!("expected a value before `{n}`"))
            }
            Tok::Name(n) => {
                self.pos -= 1;
                let at = self.at();
                self.pos += 1;
                Ok(Expr::Name(at, n))
            }
            Tok::Op(o) => {
                self.pos -= 1;
                self.err(format!("expected a value, found `{o}`"))
            }
        }
    }
}

impl Filter {
    pub fn parse(query: &str) -> Result<Filter, ParseError> {
        let toks = lex(query)?;
        let mut p = Parser { toks, pos: 0, len: query.len() };
        let e = p.or()?;
        if p.pos < p.toks.len() {
            return p.err("expected `and`, `or` or the end of the filter");
        }
        Ok(Filter(e))
    }

    /// Checks every name against what the experiment's jobs hold, so a typo is an error (with
    /// a caret and a "did you mean") rather than an empty answer. A bare metric name means its
    /// final value (`val.acc > 0.9` is `last(val.acc) > 0.9`); an unquoted word compared with a
    /// key (`stage == train`) gets a hint to quote it.
    pub fn bind(&mut self, v: &Vocab) -> Result<(), ParseError> {
        bind(&mut self.0, v, None)
    }

    pub fn matches(&self, job: &dyn JobView) -> bool {
        truthy(&eval(&self.0, job))
    }

    /// Whether evaluating reads metric series (so the caller must provide them).
    pub fn reads_series(&self) -> bool {
        fn walk(e: &Expr) -> bool {
            match e {
                Expr::Metric(f, ..) => *f != "last",
                Expr::Lit(_) | Expr::Name(..) => false,
                Expr::List(v) => v.iter().any(walk),
                Expr::Not(a) | Expr::Match(a, _) => walk(a),
                Expr::And(a, b) | Expr::Or(a, b) | Expr::Cmp(_, a, b) | Expr::In(a, b) => walk(a) || walk(b),
            }
        }
        walk(&self.0)
    }
}

fn bind(e: &mut Expr, v: &Vocab, compared_with: Option<&str>) -> Result<(), ParseError> {
    match e {
        Expr::Name(at, n) => {
            if v.is_key(n) {
                return Ok(());
            }
            if v.is_metric(n) {
                *e = Expr::Metric("last", std::mem::take(n), None, *at);
                return Ok(());
            }
            let message = match (compared_with, v.suggest(n)) {
                (Some(key), _) => format!(
                    "`{n}` is not a field, config key or metric of this experiment; to compare `{key}` with the text, quote it: `{key} == \"{n}\"`"
                ),
                (None, Some(c)) => format!("no job of this experiment has a field, config key or metric `{n}`; did you mean `{c}`?"),
                (None, None) => format!(
                    "no job of this experiment has a field, config key or metric `{n}`; names are stage, status, seed, id, config keys (`optimizer.lr`) and metrics (`val.acc`)"
                ),
            };
            Err(ParseError { at: *at, message })
        }
        Expr::Metric(_, m, _, at) => {
            if v.is_metric(m) {
                return Ok(());
            }
            let hint = match v.suggest_metric(m) {
                Some(c) => format!("did you mean `{c}`?"),
                None => "`xlab show JOB` lists a job's metrics".into(),
            };
            Err(ParseError { at: *at, message: format!("no job of this experiment logged a metric `{m}`; {hint}") })
        }
        Expr::Lit(_) => Ok(()),
        Expr::List(items) => items.iter_mut().try_for_each(|i| bind(i, v, compared_with)),
        Expr::Not(a) | Expr::Match(a, _) => bind(a, v, None),
        Expr::And(a, b) | Expr::Or(a, b) => {
            bind(a, v, None)?;
            bind(b, v, None)
        }
        Expr::Cmp(_, a, b) | Expr::In(a, b) => {
            bind(a, v, None)?;
            let key = match &**a {
                Expr::Name(_, k) => Some(k.clone()),
                _ => None,
            };
            bind(b, v, key.as_deref())
        }
    }
}

fn truthy(v: &Value) -> bool {
    matches!(v, Value::Bool(true))
}

fn eval(e: &Expr, job: &dyn JobView) -> Value {
    match e {
        Expr::Lit(v) => v.clone(),
        Expr::Name(_, n) => job.field(n),
        Expr::Metric(f, m, step, _) => {
            let s = job.series(m);
            let v = match *f {
                "last" => s.last().map(|p| p.1),
                "max" => s.iter().map(|p| p.1).reduce(f64::max),
                "min" => s.iter().map(|p| p.1).reduce(f64::min),
                _ => s.iter().find(|p| Some(p.0) == *step).map(|p| p.1),
            };
            v.map(|x| serde_json::json!(x)).unwrap_or(Value::Null)
        }
        Expr::List(items) => Value::Array(items.iter().map(|i| eval(i, job)).collect()),
        Expr::Not(a) => Value::Bool(!truthy(&eval(a, job))),
        Expr::And(a, b) => Value::Bool(truthy(&eval(a, job)) && truthy(&eval(b, job))),
        Expr::Or(a, b) => Value::Bool(truthy(&eval(a, job)) || truthy(&eval(b, job))),
        Expr::Cmp(op, a, b) => Value::Bool(compare(op, &eval(a, job), &eval(b, job))),
        Expr::In(a, b) => {
            let v = eval(a, job);
            Value::Bool(match eval(b, job) {
                Value::Array(items) => items.iter().any(|i| compare("==", &v, i)),
                _ => false,
            })
        }
        Expr::Match(a, re) => Value::Bool(match eval(a, job) {
            Value::String(s) => re.is_match(&s),
            Value::Null => false,
            other => match file_path(&other) {
                Some(p) => re.is_match(p),
                None => re.is_match(&other.to_string()),
            },
        }),
    }
}

/// An order for sorting values: numbers by value, then strings, booleans, and `null` last.
pub fn order(a: &Value, b: &Value) -> std::cmp::Ordering {
    let rank = |v: &Value| match v {
        Value::Number(_) => 0,
        Value::String(_) => 1,
        Value::Bool(_) => 2,
        Value::Null => 4,
        _ => 3,
    };
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_f64().unwrap_or(f64::NAN).total_cmp(&y.as_f64().unwrap_or(f64::NAN))
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)).then_with(|| a.to_string().cmp(&b.to_string())),
    }
}

/// The path of a file reference (`{path, sha256}`), which compares as its path.
fn file_path(v: &Value) -> Option<&str> {
    match v {
        Value::Object(m) if m.contains_key("sha256") => m.get("path").and_then(Value::as_str),
        _ => None,
    }
}

fn compare(op: &str, a: &Value, b: &Value) -> bool {
    use std::cmp::Ordering;
    // `data.path == "x.csv"`: the recorded path is absolute; a written one matches its tail.
    let file = match (file_path(a), file_path(b), a, b) {
        (Some(p), _, _, Value::String(s)) | (_, Some(p), Value::String(s), _) => Some((p, s)),
        _ => None,
    };
    if let Some((p, s)) = file {
        let same = p == s || std::path::Path::new(p).ends_with(s);
        return match op {
            "==" => same,
            "!=" => !same,
            _ => compare(op, &Value::String(p.to_string()), &Value::String(s.clone())),
        };
    }
    if a.is_null() || b.is_null() {
        return match op {
            "==" => a.is_null() && b.is_null(),
            "!=" => a.is_null() != b.is_null(),
            _ => false,
        };
    }
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().partial_cmp(&y.as_f64()),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    };
    match (op, ord) {
        ("==", o) => o == Some(Ordering::Equal),
        ("!=", o) => o != Some(Ordering::Equal),
        ("<", Some(o)) => o == Ordering::Less,
        ("<=", Some(o)) => o != Ordering::Greater,
        (">", Some(o)) => o == Ordering::Greater,
        (">=", Some(o)) => o != Ordering::Less,
        _ => false,
    }
}

/// A job of the store as the filter sees it.
pub struct StoredJob<'a> {
    pub record: &'a xlab_store::JobRecord,
    /// Metric series, when the filter reads more than final values.
    pub series: Option<BTreeMap<String, Vec<(u64, f64)>>>,
}

impl JobView for StoredJob<'_> {
    fn field(&self, name: &str) -> Value {
        let r = self.record;
        match name {
            "stage" => Value::String(r.stage.clone()),
            "status" => serde_json::to_value(r.status).unwrap_or(Value::Null),
            "seed" => serde_json::json!(r.seed),
            "id" => Value::String(r.id.clone()),
            "experiment" => Value::String(r.experiment.clone()),
            // A config key, else a label of the job's sweep point (a named variant's `variant`).
            key => key
                .split('.')
                .try_fold(&r.config, |v, k| v.get(k))
                .or_else(|| r.point.iter().find(|(k, _)| k == key).map(|(_, v)| v))
                .cloned()
                .unwrap_or(Value::Null),
        }
    }

    fn series(&self, metric: &str) -> Vec<(u64, f64)> {
        match &self.series {
            Some(s) => s.get(metric).cloned().unwrap_or_default(),
            None => self.record.summary.get(metric).map(|v| vec![(0, *v)]).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(serde_json::Value, BTreeMap<String, Vec<(u64, f64)>>);

    impl JobView for Fake {
        fn field(&self, name: &str) -> Value {
            name.split('.').try_fold(&self.0, |v, k| v.get(k)).cloned().unwrap_or(Value::Null)
        }
        fn series(&self, metric: &str) -> Vec<(u64, f64)> {
            self.1.get(metric).cloned().unwrap_or_default()
        }
    }

    fn job() -> Fake {
        let cfg = serde_json::json!({"stage": "train", "seed": 2, "optimizer": {"name": "sgd", "lr": 0.05},
                                     "step_rule": {"use": "sam.asam", "rho": 0.5}});
        let series = BTreeMap::from([("val.acc".to_string(), vec![(1, 0.8), (2, 0.95), (3, 0.93)])]);
        Fake(cfg, series)
    }

    fn eval_str(q: &str) -> bool {
        Filter::parse(q).unwrap_or_else(|e| panic!("{}", e.render(q))).matches(&job())
    }

    #[test]
    fn filters_evaluate_on_fields_config_and_metrics() {
        assert!(eval_str(r#"stage == "train" and step_rule.use in ["sam.sam", "sam.asam"] and last(val.acc) > 0.9"#));
        assert!(eval_str("max(val.acc) == 0.95 and min(val.acc) < 0.81 and at(val.acc, 2) >= 0.95"));
        assert!(eval_str(r#"optimizer.lr <= 5e-2 and not (seed != 2 or optimizer.name ~ "^adam")"#));
        assert!(eval_str(r#"step_rule.use ~ "asam$" and objective.use == null"#));
        assert!(!eval_str("objective.use != null"));
        assert!(!eval_str("last(test.acc) > 0"), "a missing metric compares false");
        assert!(!eval_str(r#"optimizer.lr > "a""#), "mixed types compare false");
        assert!(eval_str("seed in [1, 2, 3] or false"));
    }

    /// The filter language never panics: parsing, rendering the caret, evaluating on a job
    /// (`make fuzz` runs it for longer; see the xlab-fuzz crate).
    #[test]
    fn fuzz_filters() {
        let dict: &[&[u8]] = &[
            b"last(",
            b"max(",
            b"min(",
            b"at(",
            b"val.acc",
            b"seed",
            b"stage",
            b" == ",
            b" != ",
            b" <= ",
            b" >= ",
            b" < ",
            b" > ",
            b" ~ ",
            b" in ",
            b" and ",
            b" or ",
            b"not ",
            b"null",
            b"true",
            b"[",
            b"]",
            b"(",
            b")",
            b",",
            b"\"",
            b"1e-3",
            b"-0.5",
            b"\"^a.*$\"",
            b"optimizer.lr",
        ];
        let j = job();
        xlab_fuzz::check("filter", dict, 20_000, |bytes| {
            let q = String::from_utf8_lossy(bytes);
            match Filter::parse(&q) {
                Ok(f) => {
                    let _ = f.matches(&j);
                    let _ = f.reads_series();
                    Ok(())
                }
                Err(e) => {
                    let _ = e.render(&q);
                    Err(e.message)
                }
            }
        });
    }

    fn vocab() -> Vocab {
        let keys = ["stage", "seed", "optimizer", "optimizer.lr", "optimizer.name", "data", "data.path"];
        Vocab {
            keys: keys.into_iter().map(String::from).collect(),
            metrics: ["val.acc", "test.acc"].into_iter().map(String::from).collect(),
        }
    }

    fn bind_err(q: &str) -> ParseError {
        let mut f = Filter::parse(q).unwrap();
        f.bind(&vocab()).expect_err(q)
    }

    #[test]
    fn binding_refuses_unknown_names_and_reads_bare_metrics_as_final_values() {
        let e = bind_err("last(val.accuracy) > 0.9");
        assert_eq!((e.at, e.message.contains("did you mean `val.acc`?")), (5, true), "{e:?}");
        let e = bind_err("optimizr.lr < 0.1");
        assert_eq!((e.at, e.message.contains("did you mean `optimizer.lr`?")), (0, true), "{e:?}");
        let e = bind_err("seed == 1 and stage == train");
        assert_eq!(e.at, 23);
        assert!(e.message.contains(r#"quote it: `stage == "train"`"#), "{e:?}");
        let e = bind_err(r#"stage in ["train", tune]"#);
        assert!(e.message.contains("to compare `stage` with the text"), "{e:?}");
        // A bare metric is its final value.
        let mut f = Filter::parse("val.acc > 0.9 and val.acc < 0.94").unwrap();
        f.bind(&vocab()).unwrap();
        assert!(f.matches(&job()), "last(val.acc) is 0.93");
        let mut f = Filter::parse("val.acc > 0.94").unwrap();
        f.bind(&vocab()).unwrap();
        assert!(!f.matches(&job()), "the final value, not the best one");
    }

    #[test]
    fn a_file_reference_compares_by_its_path() {
        let cfg = serde_json::json!({"data": {"name": "csv", "path": {"path": "/home/ann/exp/data/bc.csv", "sha256": "ab12"}}});
        let j = Fake(cfg, BTreeMap::new());
        for (q, want) in [
            (r#"data.path == "bc.csv""#, true),
            (r#"data.path == "data/bc.csv""#, true),
            (r#"data.path == "/home/ann/exp/data/bc.csv""#, true),
            (r#"data.path == "c.csv""#, false),
            (r#"data.path != "other.csv""#, true),
            (r#"data.path ~ "bc\.csv$""#, true),
        ] {
            assert_eq!(Filter::parse(q).unwrap().matches(&j), want, "{q}");
        }
    }

    #[test]
    fn errors_point_at_the_character() {
        let cases = [
            ("seed = 2", 5, "use `==` to compare"),
            ("seed == 2 and", 13, "the filter ends here; expected a value"),
            ("avg(val.acc) > 1", 0, "unknown function `avg`; metric summaries are last, max, min and at"),
            ("seed == 2 seed", 10, "expected `and`, `or` or the end of the filter"),
            (r#"stage ~ "(""#, 8, "not a regular expression"),
            (r#"stage == "train"#, 9, "this string is not closed"),
            ("at(val.acc, x) > 1", 12, "`at(metric, step)` takes a whole step number"),
        ];
        for (q, at, msg) in cases {
            let e = Filter::parse(q).unwrap_err();
            assert_eq!(e.at, at, "{q}: {}", e.render(q));
            assert!(e.message.starts_with(msg), "{q}: {}", e.message);
        }
        assert_eq!(Filter::parse("seed = 2").unwrap_err().render("seed = 2"), "seed = 2\n     ^ use `==` to compare");
    }
}
