//! `xlab plot METRIC`: learning curves as SVG, one line per group of jobs (by default a stage's
//! sweep point) with the mean over its seeds and a band of ± one standard deviation; with
//! `--x KEY`, the metric's final value against a swept parameter instead of the step.

use crate::filter::{Filter, JobView};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use xlab_store::{ExperimentRecord, ResultStore};

/// One curve: its label and, per x (a step, or a parameter's value), the values of its jobs.
pub struct Curve {
    pub label: String,
    pub points: BTreeMap<X, Vec<f64>>,
}

/// An x coordinate, ordered (by `f64::total_cmp`).
#[derive(Debug, Clone, Copy)]
pub struct X(pub f64);

impl PartialEq for X {
    fn eq(&self, o: &Self) -> bool {
        self.0.total_cmp(&o.0).is_eq()
    }
}

impl Eq for X {}

impl PartialOrd for X {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for X {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// The curves of `metric`, one per distinct value of `keys` among the matching jobs: against the
/// step, or with `x`, its final value against that config key's value (done jobs with a
/// numeric value there).
pub fn curves(
    store: &dyn ResultStore,
    exp: &ExperimentRecord,
    filter: Option<&Filter>,
    keys: &[String],
    metric: &str,
    x: Option<&str>,
) -> anyhow::Result<Vec<Curve>> {
    // Per matching job: its group key and its points.
    type Seen = (Vec<Value>, Vec<(X, f64)>);
    let seen: Vec<Seen> = crate::scan::matching(store, exp, filter, x.is_none(), &|_, view| {
        let job = view.record;
        let points: Vec<(X, f64)> = match x {
            None => view.series(metric).into_iter().map(|(s, v)| (X(s as f64), v)).collect(),
            Some(key) => match (view.field(key).as_f64(), job.summary.get(metric)) {
                (Some(at), Some(v)) if job.status == xlab_store::JobStatus::Done => vec![(X(at), *v)],
                _ => Vec::new(),
            },
        };
        (!points.is_empty()).then(|| (keys.iter().map(|k| view.field(k)).collect(), points))
    })?;
    let mut out: Vec<(Vec<Value>, Curve)> = Vec::new();
    for (key, points) in seen {
        let idx = match out.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let label = keys
                    .iter()
                    .zip(&key)
                    .map(|(k, v)| match v {
                        Value::String(s) if k == "stage" => s.clone(),
                        Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                out.push((key, Curve { label, points: BTreeMap::new() }));
                out.len() - 1
            }
        };
        for (at, v) in points {
            out[idx].1.points.entry(at).or_default().push(v);
        }
    }
    Ok(out.into_iter().map(|(_, c)| c).collect())
}

const PALETTE: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// Round tick values spanning [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= 6.0).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 * span {
        out.push(t);
        t += step;
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// How the x axis reads: its label, and whether it is logarithmic.
pub struct XAxis<'a> {
    pub label: &'a str,
    pub log: bool,
}

/// The SVG: mean lines with ± std bands, axes with ticks, a legend.
pub fn svg(title: &str, metric: &str, curves: &[Curve], axis: &XAxis<'_>) -> String {
    let tx = |x: f64| if axis.log { x.log10() } else { x };
    let (w, h, left, right, top, bottom) = (720.0, 440.0, 70.0, 200.0, 40.0, 50.0);
    let stats: Vec<Vec<(f64, f64, f64)>> = curves
        .iter()
        .map(|c| {
            c.points
                .iter()
                .map(|(s, xs)| {
                    let (m, sd) = crate::table::mean_std(xs);
                    (tx(s.0), m, sd.unwrap_or(0.0))
                })
                .collect()
        })
        .collect();
    let all = stats.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, m, s) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(m - s);
        y1 = y1.max(m + s);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = 0.05 * (y1 - y0);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{left}" y="24" font-size="15">{}</text>"#, esc(title));
    // Axes and ticks.
    let (ax0, ax1, ay0, ay1) = (left, w - right, top, h - bottom);
    let _ = writeln!(s, r#"<path d="M{ax0},{ay0} V{ay1} H{ax1}" fill="none" stroke="black"/>"#);
    for t in ticks(x0, x1) {
        let x = px(t);
        let shown = if axis.log { format!("1e{}", fmt_tick(t)) } else { fmt_tick(t) };
        let _ = writeln!(s, r#"<line x1="{x:.1}" y1="{ay1}" x2="{x:.1}" y2="{:.1}" stroke="black"/>"#, ay1 + 5.0);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{shown}</text>"#, ay1 + 18.0);
    }
    for t in ticks(y0, y1) {
        let y = py(t);
        let _ = writeln!(s, r##"<line x1="{ax0}" y1="{y:.1}" x2="{ax1}" y2="{y:.1}" stroke="#e0e0e0"/>"##);
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, ax0 - 6.0, y + 4.0, fmt_tick(t));
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (ax0 + ax1) / 2.0,
        h - 12.0,
        esc(&format!("{}{}", axis.label, if axis.log { " (log scale)" } else { "" }))
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (ay0 + ay1) / 2.0,
        esc(metric)
    );
    // Bands, then lines, then the legend.
    for (i, st) in stats.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        if st.iter().any(|p| p.2 > 0.0) {
            let upper: Vec<String> = st.iter().map(|&(x, m, sd)| format!("{:.1},{:.1}", px(x), py(m + sd))).collect();
            let lower: Vec<String> =
                st.iter().rev().map(|&(x, m, sd)| format!("{:.1},{:.1}", px(x), py(m - sd))).collect();
            let _ = writeln!(
                s,
                r#"<polygon points="{} {}" fill="{color}" fill-opacity="0.18" stroke="none"/>"#,
                upper.join(" "),
                lower.join(" ")
            );
        }
        let line: Vec<String> = st.iter().map(|&(x, m, _)| format!("{:.1},{:.1}", px(x), py(m))).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, line.join(" "));
        let ly = top + 10.0 + 18.0 * i as f64;
        let n = curves[i].points.values().map(Vec::len).max().unwrap_or(0);
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} (n={n})</text>"#,
            ax1 + 12.0,
            ax1 + 32.0,
            ax1 + 38.0,
            ly + 4.0,
            esc(&curves[i].label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(t: f64) -> String {
    let s = format!("{t:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0), [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(ticks(1.0, 20.0), [5.0, 10.0, 15.0, 20.0]);
        assert_eq!(fmt_tick(0.6000000000000001), "0.6");
    }

    #[test]
    fn an_svg_has_a_band_and_line_per_curve_and_a_legend() {
        let c = |label: &str, off: f64| Curve {
            label: label.into(),
            points: (1..=5).map(|s| (X(s as f64), vec![off + s as f64 * 0.1, off + s as f64 * 0.1 + 0.02])).collect(),
        };
        let axis = XAxis { label: "step", log: false };
        let svg = svg("experiment `x`", "val.acc", &[c("lr=0.1", 0.0), c("lr=0.01", 0.2)], &axis);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<polygon").count(), 2, "seeds differ, so each curve has a band");
        assert!(svg.contains(">lr=0.1 (n=2)</text>") && svg.contains("experiment `x`") && svg.contains(">val.acc<"));
    }
}
