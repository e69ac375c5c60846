//! The results table: one row per stage and sweep point, with each final metric's mean ± std
//! over the seeds, read from the store.

use crate::filter::Filter;
use comfy_table::{presets, Cell, CellAlignment, Table};
use serde_json::Value;
use std::collections::BTreeMap;
use xlab_store::{ExperimentRecord, JobStatus, ResultStore};

/// One group: the jobs of a stage that differ only in their seed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    pub stage: String,
    pub point: Vec<(String, Value)>,
    /// Final values of each metric over the group's finished jobs.
    pub metrics: BTreeMap<String, Vec<f64>>,
    pub done: usize,
    pub jobs: usize,
    /// Jobs a run holds as running now (or held when it ended without finishing).
    pub running: usize,
    /// Trials a search stopped early (pruned) or holds at a rung (paused).
    pub pruned: usize,
    pub paused: usize,
    /// The group's jobs.
    pub ids: Vec<String>,
}

/// Mean and sample standard deviation (n−1 in the denominator, as pandas and numpy's `ddof=1`).
pub fn mean_std(xs: &[f64]) -> (f64, Option<f64>) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, None);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some(var.sqrt()))
}

/// Groups an experiment's jobs (those the filter matches) by stage and sweep point.
pub fn rows(store: &dyn ResultStore, exp: &ExperimentRecord, filter: Option<&Filter>) -> anyhow::Result<Vec<Row>> {
    type Seen = (String, Vec<(String, Value)>, Option<BTreeMap<String, f64>>, JobStatus, String);
    let seen: Vec<Seen> = crate::scan::matching(store, exp, filter, false, &|stage, view| {
        let job = view.record;
        let done = (job.status == JobStatus::Done).then(|| job.summary.clone());
        Some((stage.to_string(), job.point.clone(), done, job.status, job.id.clone()))
    })?;
    let mut out: Vec<Row> = Vec::new();
    let mut at: std::collections::HashMap<(String, String), usize> = std::collections::HashMap::new();
    for (stage, point, summary, status, id) in seen {
        let key = (stage, serde_json::to_string(&point).expect("points serialize"));
        let i = *at.entry(key).or_insert_with_key(|(stage, _)| {
            out.push(Row { stage: stage.clone(), point, ..Default::default() });
            out.len() - 1
        });
        let row = &mut out[i];
        row.jobs += 1;
        row.ids.push(id);
        row.running += usize::from(status == JobStatus::Running);
        row.pruned += usize::from(status == JobStatus::Pruned);
        row.paused += usize::from(status == JobStatus::Paused);
        if let Some(summary) = summary {
            row.done += 1;
            for (k, v) in summary {
                row.metrics.entry(k).or_default().push(v);
            }
        }
    }
    Ok(out)
}

/// The metrics shown by default, a compact set: of the `test.*` metrics (else `val.*`, else
/// all) accuracy, loss, ECE and the worst group's accuracy, without per-class recalls or
/// per-group breakdowns (`-m test.class_recall.3` asks for one); and the `sample.*` metrics
/// but for the raw samples' figures (`sample.raw.*`).
pub fn default_metrics(rows: &[Row]) -> Vec<String> {
    let mut names: Vec<String> = rows.iter().flat_map(|r| r.metrics.keys().cloned()).collect();
    names.sort();
    names.dedup();
    let compact = |n: &&String| !n.contains(".group_") && !n.contains("class_recall") && !n.starts_with("sample.raw.");
    let pick =
        |prefix: &str| names.iter().filter(|n| n.starts_with(prefix)).filter(compact).cloned().collect::<Vec<_>>();
    let headline: Vec<String> = pick("test.").into_iter().chain(pick("sample.")).collect();
    [headline, pick("val.")].into_iter().find(|m| !m.is_empty()).unwrap_or(names)
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn fmt_stat(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "-".into();
    }
    match mean_std(xs) {
        (m, Some(s)) => format!("{m:.4} ± {s:.4}"),
        (m, None) => format!("{m:.4}"),
    }
}

/// CSV text of `rows` (the header first), written by the `csv` crate: a cell holding a comma,
/// a quote, a carriage return or a newline is quoted, and quotes inside are doubled.
fn csv_text<'a>(rows: impl IntoIterator<Item = &'a [String]>) -> String {
    let mut w = csv::WriterBuilder::new().flexible(true).from_writer(Vec::new());
    for row in rows {
        w.write_record(row).expect("writing CSV to memory");
    }
    String::from_utf8(w.into_inner().expect("writing CSV to memory")).expect("CSV of UTF-8 cells is UTF-8")
}

/// A row as `xlab query --format json` gives it: the stage, the point, each metric's mean, std,
/// count and values over the finished seeds, and how many of its jobs are done.
pub fn row_json(r: &Row) -> Value {
    let point: serde_json::Map<String, Value> = r.point.iter().cloned().collect();
    let stats: serde_json::Map<String, Value> = r
        .metrics
        .iter()
        .map(|(k, xs)| {
            let (mean, std) = mean_std(xs);
            let f = xlab_proto::floats::to_json;
            let values: Vec<Value> = xs.iter().copied().map(f).collect();
            (k.clone(), serde_json::json!({"mean": f(mean), "std": std.map(f), "n": xs.len(), "values": values}))
        })
        .collect();
    serde_json::json!({"stage": r.stage, "point": point, "metrics": stats, "done": r.done, "jobs": r.jobs})
}

/// The sweep keys of the rows, in the order they first appear.
pub fn columns(rows: &[Row]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for r in rows {
        for (k, _) in &r.point {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    keys
}

fn point_value(r: &Row, key: &str) -> String {
    r.point.iter().find(|(k, _)| k == key).map(|(_, v)| fmt_value(v)).unwrap_or_else(|| "-".into())
}

/// Above this many sweep keys the terminal table shows one `point` column of `key=value`
/// pairs instead of a column per key (CSV and JSON keep a column per key).
const MAX_POINT_COLUMNS: usize = 4;

/// A row's sweep values as `key=value` pairs, e.g. `step_rule.use=sam.sam step_rule.rho=0.05`.
fn compact_point(r: &Row) -> String {
    let parts: Vec<String> = r.point.iter().map(|(k, v)| format!("{k}={}", fmt_value(v))).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// Renders the rows as a terminal table.
pub fn render(rows: &[Row], metrics: &[String]) -> String {
    let keys = columns(rows);
    let compact = keys.len() > MAX_POINT_COLUMNS;
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED);
    let mut header = vec![Cell::new("stage")];
    if compact {
        header.push(Cell::new("point"));
    } else {
        header.extend(keys.iter().map(Cell::new));
    }
    header.extend(metrics.iter().map(|m| Cell::new(format!("{m} (mean ± std)"))));
    header.push(Cell::new("seeds"));
    t.set_header(header);
    for r in rows {
        let mut cells = vec![Cell::new(&r.stage)];
        if compact {
            cells.push(Cell::new(compact_point(r)));
        } else {
            cells.extend(keys.iter().map(|k| Cell::new(point_value(r, k)).set_alignment(CellAlignment::Right)));
        }
        for m in metrics {
            let xs = r.metrics.get(m).map(Vec::as_slice).unwrap_or(&[]);
            cells.push(Cell::new(fmt_stat(xs)).set_alignment(CellAlignment::Right));
        }
        let mut seeds = match (r.done == r.jobs, r.running) {
            (true, _) => r.done.to_string(),
            (false, 0) => format!("{}/{} done", r.done, r.jobs),
            (false, n) => format!("{}/{} done, {n} running", r.done, r.jobs),
        };
        // A search's trials stopped early say so, rather than look unfinished.
        for (n, what) in [(r.pruned, "pruned"), (r.paused, "paused")] {
            if n == r.jobs {
                seeds = what.to_string();
            } else if n > 0 {
                seeds += &format!(", {n} {what}");
            }
        }
        cells.push(Cell::new(seeds).set_alignment(CellAlignment::Right));
        t.add_row(cells);
    }
    t.to_string()
}

/// Rows as text cells: the header, then per row the stage, each sweep key's value and each
/// metric's `mean ± std` (`mean` alone for one seed), and the number of seeds.
pub(crate) fn text_cells(rows: &[Row], metrics: &[String], pm: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let keys = columns(rows);
    let mut header = vec!["stage".to_string()];
    header.extend(keys.iter().cloned());
    header.extend(metrics.iter().cloned());
    header.push("n".into());
    let body = rows
        .iter()
        .map(|r| {
            let mut cells = vec![r.stage.clone()];
            cells.extend(keys.iter().map(|k| point_value(r, k)));
            for m in metrics {
                let xs = r.metrics.get(m).map(Vec::as_slice).unwrap_or(&[]);
                cells.push(match (xs.is_empty(), mean_std(xs)) {
                    (true, _) => "-".into(),
                    (false, (m, Some(s))) => format!("{m:.4} {pm} {s:.4}"),
                    (false, (m, None)) => format!("{m:.4}"),
                });
            }
            cells.push(r.done.to_string());
            cells
        })
        .collect();
    (header, body)
}

/// Renders the rows as a Markdown table (`mean ± std` over seeds).
pub fn render_markdown(rows: &[Row], metrics: &[String]) -> String {
    let (header, body) = text_cells(rows, metrics, "±");
    markdown(&header, &body)
}

/// A GitHub-flavoured Markdown table.
pub fn markdown(header: &[String], body: &[Vec<String>]) -> String {
    let line = |cells: &[String]| {
        format!("| {} |\n", cells.iter().map(|c| c.replace('|', "\\|")).collect::<Vec<_>>().join(" | "))
    };
    let mut out = line(header);
    out += &format!("|{}\n", ["---|"].repeat(header.len()).concat());
    for r in body {
        out += &line(r);
    }
    out
}

/// Renders the rows as a LaTeX booktabs table (`mean $\pm$ std` over seeds).
pub fn render_latex(rows: &[Row], metrics: &[String]) -> String {
    let (header, body) = text_cells(rows, metrics, "±");
    latex(&header, &body)
}

/// A LaTeX booktabs table; the first column left-aligned, the rest right-aligned.
pub fn latex(header: &[String], body: &[Vec<String>]) -> String {
    let esc = |s: &String| {
        s.replace('\\', "\\textbackslash{}")
            .replace('_', "\\_")
            .replace('&', "\\&")
            .replace('%', "\\%")
            .replace('#', "\\#")
            .replace('$', "\\$")
            .replace('±', "$\\pm$")
    };
    let line = |cells: &[String]| cells.iter().map(esc).collect::<Vec<_>>().join(" & ") + " \\\\\n";
    let mut out = format!("\\begin{{tabular}}{{l{}}}\n\\toprule\n", "r".repeat(header.len().saturating_sub(1)));
    out += &line(header);
    out += "\\midrule\n";
    for r in body {
        out += &line(r);
    }
    out += "\\bottomrule\n\\end{tabular}\n";
    out
}

/// A CSV table.
pub fn csv(header: &[String], body: &[Vec<String>]) -> String {
    csv_text(std::iter::once(header).chain(body.iter().map(Vec::as_slice)))
}

/// A terminal table; columns after the first `left` are right-aligned.
pub fn terminal(header: &[String], body: &[Vec<String>], left: usize) -> String {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED);
    t.set_header(header.iter().map(Cell::new).collect::<Vec<_>>());
    for r in body {
        t.add_row(
            r.iter()
                .enumerate()
                .map(|(i, c)| if i < left { Cell::new(c) } else { Cell::new(c).set_alignment(CellAlignment::Right) })
                .collect::<Vec<_>>(),
        );
    }
    t.to_string()
}

/// Renders the rows as CSV: one column per sweep key, then mean, std and n for each metric.
pub fn render_csv(rows: &[Row], metrics: &[String]) -> String {
    let keys = columns(rows);
    let mut header = vec!["stage".to_string()];
    header.extend(keys.iter().cloned());
    for m in metrics {
        header.extend([format!("{m}.mean"), format!("{m}.std"), format!("{m}.n")]);
    }
    let mut out = vec![header];
    for r in rows {
        let mut cells = vec![r.stage.clone()];
        cells.extend(keys.iter().map(|k| point_value(r, k)));
        for m in metrics {
            let xs = r.metrics.get(m).map(Vec::as_slice).unwrap_or(&[]);
            if xs.is_empty() {
                cells.extend([String::new(), String::new(), "0".into()]);
            } else {
                let (mean, std) = mean_std(xs);
                cells.extend([mean.to_string(), std.map(|s| s.to_string()).unwrap_or_default(), xs.len().to_string()]);
            }
        }
        out.push(cells);
    }
    csv_text(out.iter().map(Vec::as_slice))
}

/// One CSV row per exported job: identity, experiment, stage, seed, status, swept values and
/// final metrics (columns are the union over jobs).
pub fn jobs_csv(lines: &[xlab_store::ExportLine]) -> String {
    let jobs: Vec<&xlab_store::JobRecord> = lines
        .iter()
        .filter_map(|l| if let xlab_store::ExportLine::Job { job, .. } = l { Some(&**job) } else { None })
        .collect();
    let mut points: Vec<String> = Vec::new();
    let mut metrics: Vec<String> = Vec::new();
    for j in &jobs {
        for (k, _) in &j.point {
            if !points.contains(k) {
                points.push(k.clone());
            }
        }
        for k in j.summary.keys() {
            if !metrics.contains(k) {
                metrics.push(k.clone());
            }
        }
    }
    metrics.sort();
    let mut header = vec!["job".to_string(), "experiment".into(), "stage".into(), "seed".into(), "status".into()];
    header.extend(points.iter().cloned());
    header.extend(metrics.iter().cloned());
    let mut out = vec![header];
    for j in jobs {
        let mut row = vec![
            j.id.clone(),
            j.experiment.clone(),
            j.stage.clone(),
            j.seed.to_string(),
            j.status.as_str().to_string(),
        ];
        row.extend(
            points.iter().map(|k| j.point.iter().find(|(p, _)| p == k).map(|(_, v)| fmt_value(v)).unwrap_or_default()),
        );
        row.extend(metrics.iter().map(|k| j.summary.get(k).map(|v| v.to_string()).unwrap_or_default()));
        out.push(row);
    }
    csv_text(out.iter().map(Vec::as_slice))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 10-class run with groups shows accuracy, ECE, loss and the worst group's accuracy by
    /// default; per-class recalls and per-group values only when asked for.
    #[test]
    fn the_default_metrics_are_compact() {
        let mut metrics: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for split in ["train", "val", "test"] {
            for m in ["acc", "loss", "ece", "worst_class_recall", "worst_group_acc"] {
                metrics.insert(format!("{split}.{m}"), vec![0.5]);
            }
            for c in 0..10 {
                metrics.insert(format!("{split}.class_recall.{c}"), vec![0.5]);
            }
            for g in 0..4 {
                metrics.insert(format!("{split}.group_acc.{g}"), vec![0.5]);
            }
        }
        let row = Row { stage: "s".into(), metrics, done: 1, jobs: 1, ..Default::default() };
        assert_eq!(default_metrics(&[row]), ["test.acc", "test.ece", "test.loss", "test.worst_group_acc"]);
    }

    /// A sample job shows its figures on the delivered samples, not the raw ones'.
    #[test]
    fn the_default_sample_metrics_leave_out_the_raw_figures() {
        let metrics: BTreeMap<String, Vec<f64>> =
            ["sample.swd", "sample.out_of_range", "sample.raw.swd", "sample.raw.abs_max", "sys.peak_rss_mb"]
                .into_iter()
                .map(|m| (m.to_string(), vec![0.5]))
                .collect();
        let row = Row { stage: "s".into(), metrics, done: 1, jobs: 1, ..Default::default() };
        assert_eq!(default_metrics(&[row]), ["sample.out_of_range", "sample.swd"]);
    }

    #[test]
    fn sample_std_matches_numpy_ddof1() {
        // numpy: np.std([0.9, 0.95, 0.97], ddof=1) = 0.036055512754639925
        let (m, s) = mean_std(&[0.9, 0.95, 0.97]);
        assert!((m - 0.94).abs() < 1e-12);
        assert!((s.unwrap() - 0.036055512754639925).abs() < 1e-12);
        assert_eq!(mean_std(&[0.5]), (0.5, None));
    }

    fn two_seeds() -> Vec<Row> {
        let metrics = BTreeMap::from([("test.acc".to_string(), vec![0.5, 0.7])]);
        vec![Row {
            stage: "train_a".into(),
            point: vec![("optimizer.lr".into(), serde_json::json!(0.1))],
            metrics,
            done: 2,
            jobs: 2,
            ..Default::default()
        }]
    }

    #[test]
    fn markdown_and_latex_tables() {
        assert_eq!(
            render_markdown(&two_seeds(), &["test.acc".into()]),
            "| stage | optimizer.lr | test.acc | n |\n|---|---|---|---|\n| train_a | 0.1 | 0.6000 ± 0.1414 | 2 |\n"
        );
        assert_eq!(
            render_latex(&two_seeds(), &["test.acc".into()]),
            "\\begin{tabular}{lrrr}\n\\toprule\nstage & optimizer.lr & test.acc & n \\\\\n\\midrule\n\
             train\\_a & 0.1 & 0.6000 $\\pm$ 0.1414 & 2 \\\\\n\\bottomrule\n\\end{tabular}\n"
        );
    }

    #[test]
    fn csv_quotes_and_counts() {
        let mut metrics = BTreeMap::new();
        metrics.insert("test.acc".to_string(), vec![0.5, 0.7]);
        let rows = vec![Row {
            stage: "a,b".into(),
            point: vec![("optimizer.lr".into(), serde_json::json!(0.1))],
            metrics,
            done: 2,
            jobs: 2,
            ..Default::default()
        }];
        let csv = render_csv(&rows, &["test.acc".into()]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "stage,optimizer.lr,test.acc.mean,test.acc.std,test.acc.n");
        assert!(lines[1].starts_with("\"a,b\",0.1,0.6,0.1414213562373"), "{}", lines[1]);
        assert!(lines[1].ends_with(",2"));
    }

    #[test]
    fn csv_cells_with_line_breaks_or_quotes_read_back_whole() {
        let header = vec!["note".to_string(), "x".to_string()];
        let body = vec![vec!["a\rb".to_string(), "1".into()], vec!["say \"hi\"\nthere".to_string(), "".into()]];
        let text = csv(&header, &body);
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let back: Vec<Vec<String>> = r.records().map(|rec| rec.unwrap().iter().map(str::to_string).collect()).collect();
        assert_eq!(back, body);
        assert!(text.contains("\"a\rb\""), "a carriage return is quoted: {text:?}");
    }
}
