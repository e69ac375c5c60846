//! `xlab plot METRIC`: learning curves as SVG or PNG, one line per group of jobs (by default a stage's
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
) -> anyhow::Result<(Vec<Curve>, bool)> {
    // Per matching job: its group key, its points, and whether its steps are epochs (its
    // `epoch` metric equals the step wherever the metric has a point).
    type Seen = (Vec<Value>, Vec<(X, f64)>, bool);
    let seen: Vec<Seen> = crate::scan::matching(store, exp, filter, x.is_none(), &|_, view| {
        let job = view.record;
        let points: Vec<(X, f64)> = match x {
            None => view.series(metric).into_iter().map(|(s, v)| (X(s as f64), v)).collect(),
            // A config key or job field, else another metric's final value (e.g. `sample.nfe`).
            Some(key) => {
                match (view.field(key).as_f64().or_else(|| job.summary.get(key).copied()), job.summary.get(metric)) {
                    (Some(at), Some(v)) if job.status == xlab_store::JobStatus::Done => vec![(X(at), *v)],
                    _ => Vec::new(),
                }
            }
        };
        let epochs: BTreeMap<u64, f64> = view.series("epoch").into_iter().collect();
        let per_epoch = x.is_none()
            && !epochs.is_empty()
            && points.iter().all(|(at, _)| epochs.get(&(at.0 as u64)).is_some_and(|e| *e == at.0));
        (!points.is_empty()).then(|| (keys.iter().map(|k| view.field(k)).collect(), points, per_epoch))
    })?;
    let per_epoch = !seen.is_empty() && seen.iter().all(|s| s.2);
    // A legend names what differs between the curves: a key whose value is the same in every
    // curve (the one stage of a one-stage experiment) is left out.
    let mut values: Vec<std::collections::BTreeSet<String>> = vec![Default::default(); keys.len()];
    for (key, _, _) in &seen {
        for (i, v) in key.iter().enumerate() {
            values[i].insert(v.to_string());
        }
    }
    let shown: Vec<bool> = if values.iter().any(|v| v.len() > 1) {
        values.iter().map(|v| v.len() > 1).collect()
    } else {
        vec![true; keys.len()]
    };
    let mut out: Vec<(Vec<Value>, Curve)> = Vec::new();
    for (key, points, _) in seen {
        let idx = match out.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let label = keys
                    .iter()
                    .zip(&key)
                    .zip(&shown)
                    .filter(|(_, show)| **show)
                    .map(|((k, v), _)| match v {
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
    Ok((out.into_iter().map(|(_, c)| c).collect(), per_epoch))
}

const PALETTE: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// Dash patterns (on, off lengths), taken in turn once the colours run out: 8 solid curves,
/// then 8 dashed, then 8 dotted, so 24 curves stay distinguishable.
const DASHES: [Option<(f64, f64)>; 3] = [None, Some((7.0, 4.0)), Some((2.0, 3.0))];

/// Curve `i`'s colour and dash.
fn style(i: usize) -> (Color, Option<(f64, f64)>) {
    (PALETTE[i % PALETTE.len()], DASHES[(i / PALETTE.len()) % DASHES.len()])
}

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

/// How the axes read: their labels, and whether each is logarithmic.
pub struct XAxis<'a> {
    pub label: &'a str,
    pub log: bool,
    /// The y axis's label (default: the metric).
    pub y_label: Option<&'a str>,
    pub log_y: bool,
}

/// A colour as `#rrggbb`.
pub type Color = &'static str;

/// Where a text's anchor point sits on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

/// What a plot is drawn with: one list, written out as SVG or rasterized to PNG.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Line {
        from: (f64, f64),
        to: (f64, f64),
        color: Color,
        width: f64,
    },
    Polyline {
        points: Vec<(f64, f64)>,
        color: Color,
        width: f64,
        /// Dash pattern (on, off), or a solid line.
        dash: Option<(f64, f64)>,
    },
    Polygon {
        points: Vec<(f64, f64)>,
        color: Color,
        opacity: f64,
    },
    /// `y` is the text's baseline; `vertical` turns it 90° counter-clockwise about (x, y).
    Text {
        at: (f64, f64),
        text: String,
        size: f64,
        anchor: Anchor,
        vertical: bool,
    },
}

/// A laid-out plot: its size and shapes, on a white background.
pub struct Scene {
    pub width: f64,
    pub height: f64,
    pub shapes: Vec<Shape>,
}

/// The plot: mean lines with ± std bands, axes with ticks, a legend.
pub fn layout(title: &str, metric: &str, curves: &[Curve], axis: &XAxis<'_>) -> Scene {
    let tx = |x: f64| if axis.log { x.log10() } else { x };
    let ty = |y: f64| if axis.log_y { y.log10() } else { y };
    // The legend's column is as wide as its longest label (about 6.5 units a character).
    let longest = curves.iter().map(|c| c.label.chars().count() + 8).max().unwrap_or(0) as f64;
    let right = (50.0 + 6.5 * longest).clamp(200.0, 900.0);
    let (w, h, left, top, bottom) = (520.0 + right, 440.0, 70.0, 40.0, 50.0);
    let stats: Vec<Vec<(f64, f64, f64)>> = curves
        .iter()
        .map(|c| {
            c.points
                .iter()
                .map(|(s, xs)| {
                    if axis.log_y {
                        // The band of a log axis: the spread of the logs (a geometric ± std).
                        let logs: Vec<f64> = xs.iter().map(|v| ty(*v)).collect();
                        let (m, sd) = crate::table::mean_std(&logs);
                        return (tx(s.0), m, sd.unwrap_or(0.0));
                    }
                    let (m, sd) = crate::table::mean_std(xs);
                    (tx(s.0), m, sd.unwrap_or(0.0))
                })
                .collect()
        })
        .collect();
    // A point whose mean is NaN or infinite (a metric that diverged) is not drawn: the line
    // breaks there and the legend counts it.
    let finite = |p: &&(f64, f64, f64)| p.0.is_finite() && p.1.is_finite() && p.2.is_finite();
    let all = stats.iter().flatten().filter(finite);
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
    let text =
        |at: (f64, f64), text: String, anchor: Anchor| Shape::Text { at, text, size: 12.0, anchor, vertical: false };
    let mut out = vec![Shape::Text {
        at: (left, 24.0),
        text: title.to_string(),
        size: 15.0,
        anchor: Anchor::Start,
        vertical: false,
    }];
    // Axes and ticks.
    let (ax0, ax1, ay0, ay1) = (left, w - right, top, h - bottom);
    out.push(Shape::Line { from: (ax0, ay0), to: (ax0, ay1), color: "#000000", width: 1.0 });
    out.push(Shape::Line { from: (ax0, ay1), to: (ax1, ay1), color: "#000000", width: 1.0 });
    for t in ticks(x0, x1) {
        let x = px(t);
        let shown = if axis.log { fmt_log_tick(t) } else { fmt_tick(t) };
        out.push(Shape::Line { from: (x, ay1), to: (x, ay1 + 5.0), color: "#000000", width: 1.0 });
        out.push(text((x, ay1 + 18.0), shown, Anchor::Middle));
    }
    for t in ticks(y0, y1) {
        let y = py(t);
        let shown = if axis.log_y { fmt_log_tick(t) } else { fmt_tick(t) };
        out.push(Shape::Line { from: (ax0, y), to: (ax1, y), color: "#e0e0e0", width: 1.0 });
        out.push(text((ax0 - 6.0, y + 4.0), shown, Anchor::End));
    }
    let x_label = format!("{}{}", axis.label, if axis.log { " (log scale)" } else { "" });
    out.push(text(((ax0 + ax1) / 2.0, h - 12.0), x_label, Anchor::Middle));
    out.push(Shape::Text {
        at: (16.0, (ay0 + ay1) / 2.0),
        text: format!("{}{}", axis.y_label.unwrap_or(metric), if axis.log_y { " (log scale)" } else { "" }),
        size: 12.0,
        anchor: Anchor::Middle,
        vertical: true,
    });
    // Bands, then lines, then the legend.
    for (i, st) in stats.iter().enumerate() {
        let (color, dash) = style(i);
        let runs = st.split(|p| !finite(&p)).filter(|r| !r.is_empty());
        for run in runs {
            if run.iter().any(|p| p.2 > 0.0) {
                let upper = run.iter().map(|&(x, m, sd)| (px(x), py(m + sd)));
                let lower = run.iter().rev().map(|&(x, m, sd)| (px(x), py(m - sd)));
                out.push(Shape::Polygon { points: upper.chain(lower).collect(), color, opacity: 0.18 });
            }
            out.push(Shape::Polyline {
                points: run.iter().map(|&(x, m, _)| (px(x), py(m))).collect(),
                color,
                width: 2.0,
                dash,
            });
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let n = curves[i].points.values().map(Vec::len).max().unwrap_or(0);
        let skipped = st.iter().filter(|p| !finite(p)).count();
        let note = match skipped {
            0 => String::new(),
            k => format!(", {k} NaN/inf not drawn"),
        };
        let (from, to) = ((ax1 + 12.0, ly), (ax1 + 32.0, ly));
        out.push(match dash {
            None => Shape::Line { from, to, color, width: 3.0 },
            Some(_) => Shape::Polyline { points: vec![from, to], color, width: 3.0, dash },
        });
        out.push(text((ax1 + 38.0, ly + 4.0), format!("{} (n={n}{note})", curves[i].label), Anchor::Start));
    }
    Scene { width: w, height: h, shapes: out }
}

/// The scene as an SVG document.
pub fn svg(scene: &Scene) -> String {
    let (w, h) = (scene.width, scene.height);
    let pts = |ps: &[(f64, f64)]| ps.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect::<Vec<_>>().join(" ");
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    for shape in &scene.shapes {
        let _ = match shape {
            Shape::Line { from, to, color, width } => writeln!(
                s,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="{width}"/>"#,
                from.0, from.1, to.0, to.1
            ),
            Shape::Polyline { points, color, width, dash } => {
                let dash = dash.map_or(String::new(), |(on, off)| format!(r#" stroke-dasharray="{on} {off}""#));
                writeln!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="{width}"{dash}/>"#,
                    pts(points)
                )
            }
            Shape::Polygon { points, color, opacity } => writeln!(
                s,
                r#"<polygon points="{}" fill="{color}" fill-opacity="{opacity}" stroke="none"/>"#,
                pts(points)
            ),
            Shape::Text { at, text, size, anchor, vertical } => {
                let anchor = match anchor {
                    Anchor::Start => "start",
                    Anchor::Middle => "middle",
                    Anchor::End => "end",
                };
                let place = if *vertical {
                    format!(r#"transform="translate({:.1},{:.1}) rotate(-90)""#, at.0, at.1)
                } else {
                    format!(r#"x="{:.1}" y="{:.1}""#, at.0, at.1)
                };
                writeln!(s, r#"<text {place} font-size="{size}" text-anchor="{anchor}">{}</text>"#, esc(text))
            }
        };
    }
    s.push_str("</svg>\n");
    s
}

/// A tick of a log axis at 10^t: `1e-2` at whole powers, else the value itself.
fn fmt_log_tick(t: f64) -> String {
    if (t - t.round()).abs() < 1e-9 {
        format!("1e{}", fmt_tick(t.round()))
    } else {
        let v = 10f64.powf(t);
        let digits = (2 - v.log10().floor() as i32).clamp(0, 8) as usize;
        format!("{v:.digits$}")
    }
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
        let axis = XAxis { label: "step", log: false, y_label: None, log_y: false };
        let svg = svg(&layout("experiment `x`", "val.acc", &[c("lr=0.1", 0.0), c("lr=0.01", 0.2)], &axis));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<polygon").count(), 2, "seeds differ, so each curve has a band");
        assert!(svg.contains(">lr=0.1 (n=2)</text>") && svg.contains("experiment `x`") && svg.contains(">val.acc<"));
    }

    /// Twelve curves (and more) stay distinguishable: no two share a colour and a dash.
    #[test]
    fn many_curves_differ_in_colour_or_dash() {
        let styles: Vec<_> = (0..24).map(style).collect();
        for (i, a) in styles.iter().enumerate() {
            assert!(styles[..i].iter().all(|b| b != a), "curve {i} repeats a style");
        }
        let c = |i: usize| Curve {
            label: format!("c{i}"),
            points: (1..=3).map(|s| (X(s as f64), vec![i as f64 + s as f64])).collect(),
        };
        let curves: Vec<Curve> = (0..12).map(c).collect();
        let axis = XAxis { label: "epoch", log: false, y_label: Some("accuracy"), log_y: true };
        let svg = svg(&layout("t", "val.acc", &curves, &axis));
        assert_eq!(svg.matches("stroke-dasharray=\"7 4\"").count(), 2 * 4, "curves 8..11 are dashed, legend too");
        assert!(svg.contains(">accuracy (log scale)<") && svg.contains(">epoch<"));
    }
}
