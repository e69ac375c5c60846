//! `xlab report EXP`: one self-contained page (HTML, or Markdown with its figures beside it) of
//! an experiment as a paper's appendix needs it: the file, the plan, the results with intervals
//! over seeds and paired comparisons, learning curves, sample grids and a provenance manifest.
//!
//! The page is a list of blocks written out by one of two writers, so the two formats say the
//! same thing; every number in its tables is the text `xlab query` prints for it.

use crate::aggregate::{self, Agg, Compare, PairedTest};
use crate::filter::Filter;
use crate::{plot, table};
use base64::Engine;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use xlab_store::{ExperimentRecord, JobRecord, JobStatus, ResultStore};

/// One block of the page.
pub enum Block {
    Heading(String),
    Text(String),
    Table {
        header: Vec<String>,
        body: Vec<Vec<String>>,
    },
    /// A two-column table of names and values (text, left-aligned).
    Pairs {
        header: [&'static str; 2],
        body: Vec<Vec<String>>,
    },
    Code(String),
    /// A figure: a file name (Markdown writes it beside the page), its type, bytes and caption.
    Figure {
        file: String,
        mime: &'static str,
        bytes: Vec<u8>,
        caption: String,
    },
    /// A long part, folded in HTML.
    Folded {
        summary: String,
        blocks: Vec<Block>,
    },
}

/// What a report covers.
pub struct Request<'a> {
    pub metrics: Vec<String>,
    pub compare: Option<(&'a Filter, &'a str, PairedTest)>,
    /// Command line and time, for the header.
    pub generated: String,
}

/// At most this many jobs are listed in the plan, and this many sample grids shown.
const MAX_LISTED_JOBS: usize = 500;
const MAX_GRIDS: usize = 24;

/// The report's blocks.
pub fn build(store: &dyn ResultStore, exp: &ExperimentRecord, req: &Request<'_>) -> anyhow::Result<Vec<Block>> {
    let records: Vec<JobRecord> = crate::scan::matching(store, exp, None, false, &|_, v| Some(v.record.clone()))?;
    let mut out = vec![Block::Text(format!(
        "Experiment `{}`, version {} of {}; {} job(s). {}",
        exp.name,
        exp.version(),
        exp.file,
        records.len(),
        req.generated
    ))];
    out.push(Block::Heading("Results".into()));
    let rows = table::rows(store, exp, None)?;
    let metrics = if req.metrics.is_empty() { table::default_metrics(&rows) } else { req.metrics.clone() };
    let (header, body) = table::text_cells(&rows, &metrics, "±");
    out.push(Block::Text(
        "Final metrics per sweep point: mean ± sample standard deviation over seeds; n: done seeds.".into(),
    ));
    out.push(Block::Table { header, body });
    let keys = crate::common::default_group_keys(exp);
    out.push(Block::Heading("Intervals over seeds".into()));
    out.push(Block::Text(
        "ci95: half-width of Student's t 95% interval of the mean; bootstrap_ci: seeded 95% BCa bootstrap interval \
         (10,000 resamples); iqm: interquartile mean. With 3 to 5 seeds a bootstrap interval is too narrow; prefer ci95."
            .into(),
    ));
    for m in &metrics {
        let aggs: Vec<Agg> = ["mean", "ci95", "bootstrap_ci", "iqm", "count"]
            .iter()
            .map(|f| Agg::new(f, if *f == "count" { "" } else { m }))
            .collect();
        let g = aggregate::group(store, exp, None, &keys, &aggs, None)?;
        out.push(Block::Table { header: g.header(), body: g.cells() });
    }
    if let Some((baseline, text, test)) = req.compare {
        out.push(Block::Heading(format!("Paired comparisons against `{text}`")));
        out.push(Block::Text(format!(
            "diff: mean paired difference (row − baseline) over the seeds both have; diff_ci95: its 95% BCa bootstrap \
             interval; {}: two-sided {}; pairs: shared seeds. Rows with fewer than {} shared seeds give no interval or \
             p-value.",
            if test == PairedTest::T { "p_t" } else { "p_wilcoxon" },
            if test == PairedTest::T { "paired t test" } else { "Wilcoxon signed-rank test" },
            aggregate::MIN_PAIRS
        )));
        for m in &metrics {
            let c = Compare { baseline, metrics: vec![m.clone()], test };
            let g = aggregate::group(store, exp, None, &keys, &[Agg::new("mean", m)], Some(&c))?;
            out.push(Block::Table { header: g.header(), body: g.cells() });
        }
    }
    curves(store, exp, &keys, &mut out)?;
    grids(store, &records, &mut out);
    out.push(Block::Heading("Provenance".into()));
    out.push(Block::Pairs { header: ["what", "value"], body: provenance(exp, &records) });
    out.push(Block::Heading("Experiment file".into()));
    out.push(Block::Text(format!("{} (sha256 {})", exp.file, sha256(exp.source.as_bytes()))));
    out.push(Block::Code(exp.source.clone()));
    out.push(Block::Heading("Plan".into()));
    out.extend(plan(exp, &records));
    Ok(out)
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Learning curves of the main series metrics (validation accuracy, training loss, …), a line
/// per sweep point with a ± std band.
fn curves(
    store: &dyn ResultStore,
    exp: &ExperimentRecord,
    keys: &[String],
    out: &mut Vec<Block>,
) -> anyhow::Result<()> {
    let vocab = crate::vocab::Vocab::of(store, exp)?;
    let preferred = ["val.acc", "train.loss", "val.loss", "sample.swd", "val.worst_group_acc"];
    let mut picked: Vec<&str> = preferred.iter().copied().filter(|m| vocab.metrics.contains(*m)).take(3).collect();
    if picked.is_empty() {
        picked.extend(vocab.metrics.iter().map(String::as_str).filter(|m| !m.starts_with("test.")).take(2));
    }
    let mut figures = Vec::new();
    for m in picked {
        let (curves, per_epoch) = plot::curves(store, exp, None, keys, m, None)?;
        if curves.is_empty() || curves.iter().all(|c| c.points.len() < 2) {
            continue;
        }
        let axis =
            plot::XAxis { label: if per_epoch { "epoch" } else { "step" }, log: false, y_label: None, log_y: false };
        let scene = plot::layout(&format!("experiment `{}`", exp.name), m, &curves, &axis);
        figures.push(Block::Figure {
            file: format!("curve-{m}.svg"),
            mime: "image/svg+xml",
            bytes: plot::svg(&scene).into_bytes(),
            caption: format!("{m}: mean over seeds per sweep point, ± one standard deviation shaded"),
        });
    }
    if !figures.is_empty() {
        out.push(Block::Heading("Learning curves".into()));
        out.extend(figures);
    }
    Ok(())
}

/// The sample grids diffusion jobs wrote (`samples.png`), one per sweep point (its first seed).
fn grids(store: &dyn ResultStore, records: &[JobRecord], out: &mut Vec<Block>) {
    let mut seen_points = BTreeSet::new();
    let mut figures = Vec::new();
    for r in records.iter().filter(|r| r.status == JobStatus::Done) {
        let Some(a) = r.artifacts.iter().find(|a| a.kind == "image") else { continue };
        if !seen_points.insert((r.stage.clone(), point_text(r))) || figures.len() == MAX_GRIDS {
            continue;
        }
        let Ok(bytes) = std::fs::read(store.dir().join(&a.path)) else { continue };
        figures.push(Block::Figure {
            file: format!("samples-{}.png", &r.id[..r.id.len().min(12)]),
            mime: "image/png",
            bytes,
            caption: format!("{} {} (seed {}, job {})", r.stage, point_text(r), r.seed, &r.id[..r.id.len().min(12)]),
        });
    }
    if !figures.is_empty() {
        out.push(Block::Heading("Sample grids".into()));
        out.extend(figures);
    }
}

fn point_text(r: &JobRecord) -> String {
    let parts: Vec<String> = r
        .point
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), String::from)))
        .collect();
    if parts.is_empty() {
        "(one point)".into()
    } else {
        parts.join(" ")
    }
}

/// What produced the results: xlab, libtorch, CUDA and the driver, the machines, the plugins
/// with their sha256, and the data files with theirs, each distinct value once.
fn provenance(exp: &ExperimentRecord, records: &[JobRecord]) -> Vec<Vec<String>> {
    let mut seen: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut add = |what: &'static str, v: Option<String>| {
        if let Some(v) = v {
            seen.entry(what).or_default().insert(v);
        }
    };
    let mut files = BTreeSet::new();
    for r in records.iter().filter(|r| !r.provenance.xlab_version.is_empty()) {
        let p = &r.provenance;
        add("1 xlab", Some(p.xlab_version.clone()));
        add("2 git commit", p.git_commit.clone());
        add("3 libtorch", p.libtorch.clone());
        add("4 CUDA (libtorch's build)", p.machine.cuda.clone());
        add("5 NVIDIA driver", p.machine.driver.clone());
        add("6 GPU", p.machine.gpu.clone());
        add("7 CPU", p.machine.cpu.clone());
        add("8 host", p.host.clone());
        add("9 device", p.device.clone());
        add("9 threads per job", p.threads.map(|t| t.to_string()));
        for u in &p.plugins {
            add("plugin", Some(format!("{} {} — {} — sha256 {}", u.id, u.version, u.file, u.sha256)));
        }
        data_files(&r.config, "", &mut files);
    }
    let mut rows: Vec<Vec<String>> = vec![vec!["experiment file sha256".into(), sha256(exp.source.as_bytes())]];
    for (what, values) in seen {
        let name = what.split_once(' ').filter(|(n, _)| n.len() == 1).map_or(what, |(_, rest)| rest);
        rows.extend(values.into_iter().map(|v| vec![name.to_string(), v]));
    }
    rows.extend(
        files.into_iter().map(|(key, path, sha)| vec![format!("data file `{key}`"), format!("{path} — sha256 {sha}")]),
    );
    if rows.len() == 1 {
        rows.push(vec!["jobs".into(), "none has run yet".into()]);
    }
    rows
}

/// The files a config names (`{path, sha256}`), by key.
fn data_files(v: &Value, at: &str, out: &mut BTreeSet<(String, String, String)>) {
    let Value::Object(m) = v else { return };
    if let (Some(Value::String(path)), Some(Value::String(sha)), 2) = (m.get("path"), m.get("sha256"), m.len()) {
        out.insert((at.to_string(), path.clone(), sha.clone()));
        return;
    }
    for (k, v) in m {
        data_files(v, &if at.is_empty() { k.clone() } else { format!("{at}.{k}") }, out);
    }
}

/// The stages (sweep keys, jobs by status) and, folded, the jobs themselves.
fn plan(exp: &ExperimentRecord, records: &[JobRecord]) -> Vec<Block> {
    let by_id: BTreeMap<&str, &JobRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut stages = Vec::new();
    let mut jobs = Vec::new();
    for s in &exp.stages {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for id in &s.jobs {
            let status = by_id.get(id.as_str()).map_or("not run".into(), |r| format!("{:?}", r.status).to_lowercase());
            *counts.entry(status).or_default() += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let keys = if s.sweep_keys.is_empty() { "-".into() } else { s.sweep_keys.join(", ") };
        stages.push(vec![s.name.clone(), keys, s.jobs.len().to_string(), counts.join(", ")]);
        for id in &s.jobs {
            if jobs.len() == MAX_LISTED_JOBS {
                break;
            }
            let (point, seed, status) = match by_id.get(id.as_str()) {
                Some(r) => (point_text(r), r.seed.to_string(), format!("{:?}", r.status).to_lowercase()),
                None => ("-".into(), "-".into(), "not run".into()),
            };
            jobs.push(vec![id.clone(), s.name.clone(), point, seed, status]);
        }
    }
    let total: usize = exp.stages.iter().map(|s| s.jobs.len()).sum();
    let listed =
        if total > jobs.len() { format!("the first {} of {total} jobs", jobs.len()) } else { format!("{total} jobs") };
    vec![
        Block::Table { header: ["stage", "sweep keys", "jobs", "status"].map(String::from).to_vec(), body: stages },
        Block::Folded {
            summary: format!("Jobs ({listed}; `xlab show ID` tells one's whole story)"),
            blocks: vec![Block::Table {
                header: ["id", "stage", "sweep point", "seed", "status"].map(String::from).to_vec(),
                body: jobs,
            }],
        },
    ]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `code` spans of Markdown-ish text as HTML.
fn inline(s: &str) -> String {
    esc(s)
        .split('`')
        .enumerate()
        .map(|(i, p)| if i % 2 == 1 { format!("<code>{p}</code>") } else { p.to_string() })
        .collect()
}

const STYLE: &str =
    "body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#111}\
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}\
.wide{overflow-x:auto;margin:.6em 0}table{border-collapse:collapse;font-variant-numeric:tabular-nums}\
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;white-space:nowrap}td.num{text-align:right}\
td.long{white-space:normal;overflow-wrap:anywhere;min-width:30em}\
th{background:#f4f4f5}pre{background:#f7f7f8;padding:1em;overflow:auto;font-size:13px}\
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}img{max-width:100%}code{font-size:.92em}";

/// A number, an interval or a `mean ± std` cell (right-aligned, so digits line up).
fn looks_numeric(c: &str) -> bool {
    let c = c.trim_start_matches(['[', '+', '-']);
    c.starts_with(|ch: char| ch.is_ascii_digit()) && !c.contains(char::is_alphabetic) || c == "-" || c.is_empty()
}

/// The blocks as one HTML page that fetches nothing (its figures are data URIs, and its
/// policy forbids any other source).
pub fn html(title: &str, blocks: &[Block]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(title),
        inline(title)
    );
    html_blocks(blocks, &mut o);
    o += "</body></html>\n";
    o
}

fn html_blocks(blocks: &[Block], o: &mut String) {
    for b in blocks {
        match b {
            Block::Heading(h) => {
                let _ = writeln!(o, "<h2>{}</h2>", inline(h));
            }
            Block::Text(t) => {
                let _ = writeln!(o, "<p>{}</p>", inline(t));
            }
            Block::Code(c) => {
                let _ = writeln!(o, "<pre>{}</pre>", esc(c));
            }
            Block::Pairs { header, body } => {
                o.push_str("<div class=\"wide\"><table><thead><tr>");
                for h in header {
                    let _ = write!(o, "<th>{}</th>", esc(h));
                }
                o.push_str("</tr></thead><tbody>\n");
                for row in body {
                    let _ = writeln!(o, "<tr><td>{}</td><td class=\"long\">{}</td></tr>", esc(&row[0]), esc(&row[1]));
                }
                o.push_str("</tbody></table></div>\n");
            }
            Block::Table { header, body } => {
                o.push_str("<div class=\"wide\"><table><thead><tr>");
                for h in header {
                    let _ = write!(o, "<th>{}</th>", esc(h));
                }
                o.push_str("</tr></thead><tbody>\n");
                for row in body {
                    o.push_str("<tr>");
                    for c in row {
                        let class = if c.len() > 60 {
                            " class=\"long\""
                        } else if looks_numeric(c) {
                            " class=\"num\""
                        } else {
                            ""
                        };
                        let _ = write!(o, "<td{class}>{}</td>", esc(c));
                    }
                    o.push_str("</tr>\n");
                }
                o.push_str("</tbody></table></div>\n");
            }
            Block::Figure { mime, bytes, caption, .. } => {
                let data = base64::engine::general_purpose::STANDARD.encode(bytes);
                let _ = writeln!(
                    o,
                    "<figure><img alt=\"{}\" src=\"data:{mime};base64,{data}\"><figcaption>{}</figcaption></figure>",
                    esc(caption),
                    inline(caption)
                );
            }
            Block::Folded { summary, blocks } => {
                let _ = writeln!(o, "<details><summary>{}</summary>", inline(summary));
                html_blocks(blocks, o);
                o.push_str("</details>\n");
            }
        }
    }
}

/// The blocks as GitHub-flavoured Markdown, and the figure files it links (relative to the
/// page: `FOLDER/NAME`), for the caller to write beside it.
pub fn markdown(title: &str, blocks: &[Block], folder: &str) -> (String, Vec<(String, Vec<u8>)>) {
    let mut o = format!("# {title}\n\n");
    let mut files = Vec::new();
    markdown_blocks(blocks, folder, &mut o, &mut files);
    (o, files)
}

fn markdown_blocks(blocks: &[Block], folder: &str, o: &mut String, files: &mut Vec<(String, Vec<u8>)>) {
    for b in blocks {
        match b {
            Block::Heading(h) => {
                let _ = writeln!(o, "## {h}\n");
            }
            Block::Text(t) => {
                let _ = writeln!(o, "{t}\n");
            }
            Block::Code(c) => {
                let fence = if c.contains("```") { "~~~~" } else { "```" };
                let _ = writeln!(o, "{fence}yaml\n{}\n{fence}\n", c.trim_end());
            }
            Block::Pairs { header, body } => {
                o.push_str(&table::markdown(&header.map(String::from), body));
                o.push('\n');
            }
            Block::Table { header, body } => {
                o.push_str(&table::markdown(header, body));
                o.push('\n');
            }
            Block::Figure { file, bytes, caption, .. } => {
                let path = format!("{folder}/{file}");
                let _ = writeln!(o, "![{caption}]({path})\n\n*{caption}*\n");
                files.push((path, bytes.clone()));
            }
            Block::Folded { summary, blocks } => {
                let _ = writeln!(o, "<details><summary>{summary}</summary>\n");
                markdown_blocks(blocks, folder, o, files);
                o.push_str("</details>\n\n");
            }
        }
    }
}
