//! `xlab serve`: the dashboard over a real store, read by a real headless Chromium (Debian's
//! `chromium` and `chromium-driver`, driven over WebDriver), and its guards checked over plain
//! HTTP. Without Chromium the browser test says why it skips.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::browser::{browser, get_json, http, Browser};
use common::{cmd, text, write_file};

/// Three learning rates × two seeds on two moons.
const SWEEP: &str = r#"name: dash
defaults:
  task: train
  deterministic: true
  data: {name: two_moons, n_train: 400, n_val: 200, n_test: 200, noise: 0.3}
  model: {name: mlp, hidden: [16]}
  optimizer: {name: sgd, momentum: 0.9}
  epochs: 12
stages:
  train:
    seeds: 2
    grid:
      optimizer.lr: [0.01, 0.03, 0.1]
"#;

/// A dashboard on `store`: the process and the URL it printed.
struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(store: &Path, extra: &[&str]) -> Serve {
    let mut child = cmd(store)
        .args(["serve", "--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.split(" at ").nth(1).unwrap_or_else(|| panic!("no URL in {line:?}")).trim().to_string();
    Serve { child, url }
}

/// The test.acc means of `xlab query --format json` (for the rows the filter keeps), in order.
fn query_means(store: &Path, filter: Option<&str>) -> Vec<f64> {
    let mut c = cmd(store);
    c.args(["query", "--format", "json", "-e", "dash", "-m", "test.acc"]);
    if let Some(f) = filter {
        c.arg(f);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter().map(|r| r["metrics"]["test.acc"]["mean"].as_f64().unwrap()).collect()
}

const MEANS: &str =
    "return [...document.querySelectorAll('#table td[data-metric=\"test.acc\"]')].map(td => td.dataset.mean)";

fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().parse().unwrap()).collect()
}

#[test]
fn the_dashboard_shows_the_stores_results_in_a_real_browser() {
    let Some((chromium, driver)) = browser() else {
        common::skipped(
            "the_dashboard_shows_the_stores_results_in_a_real_browser",
            "no chromium and chromedriver in /usr/bin (Debian: apt install chromium chromium-driver; `make test` \
             installs them as root)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = write_file(dir.path(), "dash.yaml", SWEEP);
    let out = cmd(&store).arg("run").arg(&file).env("XLAB_NO_LIVE", "1").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dash = serve(&store, &[]);
    let b = Browser::start(&chromium, &driver);

    // The experiments page lists it with its jobs.
    b.open(&dash.url);
    let card =
        b.until("the experiment's card", "const c = document.querySelector('.experiment'); return c && c.textContent");
    assert!(card.as_str().unwrap().contains("dash") && card.as_str().unwrap().contains("6 done"), "{card}");

    // The table: the same numbers as `xlab query --format json`, curves drawn with seed bands.
    b.open(&format!("{}#/exp/dash?metrics=test.acc", dash.url));
    let shown = numbers(&b.until("the table", MEANS));
    assert_eq!(shown, query_means(&store, None));
    assert_eq!(shown.len(), 3);
    let drawn = b.until("the curves", "return document.querySelectorAll('svg.chart polyline.curve').length");
    assert_eq!(drawn, 3);
    assert_eq!(
        b.js("return document.querySelectorAll('svg.chart polygon.band').length"),
        3,
        "a band per point over 2 seeds"
    );
    // A scatter of two metrics with the Pareto front: the rows no other beats on both (higher
    // accuracy, lower loss), as computed here from `xlab query`.
    b.open(&format!("{}#/exp/dash?metrics=test.acc&sx=test.acc&sy=test.loss", dash.url));
    let marked = b.until("the scatter", "return document.querySelectorAll('#scatter circle.point').length === 3 && document.querySelectorAll('#scatter circle.pareto').length");
    let out =
        cmd(&store).args(["query", "--format", "json", "-e", "dash", "-m", "test.acc,test.loss"]).output().unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| {
            (r["metrics"]["test.acc"]["mean"].as_f64().unwrap(), r["metrics"]["test.loss"]["mean"].as_f64().unwrap())
        })
        .collect();
    let front =
        pts.iter().filter(|p| !pts.iter().any(|q| q.0 >= p.0 && q.1 <= p.1 && (q.0 > p.0 || q.1 < p.1))).count();
    assert_eq!(marked, front as u64, "{pts:?}");
    // Brushing the top of the learning rate's axis in the parallel coordinates keeps the rows
    // there (lr = 0.1) in the table.
    let kept = b.js(
        "const hit = document.querySelector('#parallel rect.axis[data-axis=\"optimizer.lr\"]');
         const r = hit.getBoundingClientRect(); const x = r.left + r.width / 2;
         hit.dispatchEvent(new MouseEvent('mousedown', {clientX: x, clientY: r.top - 5, bubbles: true}));
         window.dispatchEvent(new MouseEvent('mousemove', {clientX: x, clientY: r.top + r.height * 0.2}));
         window.dispatchEvent(new MouseEvent('mouseup', {clientX: x, clientY: r.top + r.height * 0.2}));
         return [...document.querySelectorAll('#table tr.row')].filter(t => !t.hidden).map(t => t.children[1].textContent)",
    );
    assert_eq!(kept, serde_json::json!(["0.1"]));
    let said = b.until("the brush's count", "const c = document.getElementById('brushed'); return c && c.textContent");
    assert_eq!(said, "1 of 3 rows in the brushed ranges");
    std::fs::create_dir_all(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    b.screenshot(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"));
    // A click on the axis clears its brush: every row is back.
    let back = b.js("const hit = document.querySelector('#parallel rect.axis[data-axis=\"optimizer.lr\"]');
         const r = hit.getBoundingClientRect(); const x = r.left + r.width / 2, y = r.top + r.height / 2;
         hit.dispatchEvent(new MouseEvent('mousedown', {clientX: x, clientY: y, bubbles: true}));
         window.dispatchEvent(new MouseEvent('mouseup', {clientX: x, clientY: y}));
         return [document.querySelectorAll('#table tr.row').length, document.getElementById('brushed').textContent]");
    assert_eq!(back, serde_json::json!([3, ""]));

    // Typing a filter changes the rows, to those `xlab query` keeps.
    b.type_into("#filter", "optimizer.lr < 0.05\u{E007}");
    let filtered =
        b.until("the filtered table", &format!("const m = (() => {{ {MEANS} }})(); return m.length === 2 && m"));
    assert_eq!(numbers(&filtered), query_means(&store, Some("optimizer.lr < 0.05")));
    // The filter is in the URL: the view can be shared.
    let url = b.js("return location.href");
    assert!(url.as_str().unwrap().contains("filter=optimizer.lr"), "{url}");
    // A mistake gets the same caret message as the command line.
    b.type_into("#filter", "optimizer.lr <\u{E007}");
    let error = b.until("the filter's error", "const e = document.getElementById('error'); return e && e.textContent");
    assert!(error.as_str().unwrap().contains("the filter ends here"), "{error}");

    // Grouped, aggregated and compared with a baseline: the cells `xlab query` prints.
    let agg = "mean(test.acc),ci95(test.acc),iqm(test.acc),bootstrap_ci(test.acc),count()";
    let (base, by_seed) = ("optimizer.lr == 0.01", "seed");
    let cli = cmd(&store)
        .args(["query", "-e", "dash", "--group-by", by_seed, "--agg", agg, "--compare-to", base, "-m", "test.acc"])
        .args(["--format", "markdown"])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", text(&cli.stderr));
    let want: Vec<Vec<String>> = text(&cli.stdout)
        .lines()
        .skip(2)
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    let q =
        |v: &str| v.replace(' ', "%20").replace('(', "%28").replace(')', "%29").replace(',', "%2C").replace('=', "%3D");
    b.open(&format!(
        "{}#/exp/dash?metrics=test.acc&group_by={by_seed}&agg={}&compare_to={}",
        dash.url,
        q(agg),
        q(base)
    ));
    let cells = b.until(
        "the grouped table",
        "const t = document.getElementById('grouped-table'); return t && [...t.querySelectorAll('tbody tr')].map(r => [...r.children].map(c => c.textContent))",
    );
    let got: Vec<Vec<String>> = serde_json::from_value(cells).unwrap();
    assert_eq!(got, want, "the dashboard's grouped table is `xlab query`'s");
    b.screenshot(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-grouped.png"));
    b.type_into("#agg", "avg(test.acc)\u{E007}");
    let error = b.until(
        "the aggregate's error",
        "const e = document.getElementById('grouped-error'); return e && e.textContent",
    );
    assert!(error.as_str().unwrap().contains("`avg` is not an aggregate"), "{error}");
    assert!(b.js("return !!document.getElementById('chart')") == true, "the rest of the page stays");

    // Smoothing changes the curves, not their number; the plot downloads as SVG and PNG.
    b.open(&format!("{}#/exp/dash?metric=val.loss", dash.url));
    let plain = b.until("the curves", "const c = [...document.querySelectorAll('#chart polyline.curve')]; return c.length && c.map(p => p.getAttribute('points'))");
    b.open(&format!("{}#/exp/dash?metric=val.loss&smooth=0.9", dash.url));
    let smooth = b.until("the smoothed curves", &format!(
        "const c = [...document.querySelectorAll('#chart polyline.curve')].map(p => p.getAttribute('points')); return c.length && JSON.stringify(c) !== {} && c",
        serde_json::to_string(&plain.to_string()).unwrap()
    ));
    assert_eq!(smooth.as_array().unwrap().len(), plain.as_array().unwrap().len());
    // Colour and dash by a key: one colour and one dash pattern per learning rate.
    b.open(&format!("{}#/exp/dash?metric=val.loss&color=optimizer.lr&dash=optimizer.lr", dash.url));
    let styles = b.until(
        "the styled curves",
        "const c = [...document.querySelectorAll('#chart polyline.curve')]; return c.length === 3 && c.some(p => p.hasAttribute('stroke-dasharray')) && c.map(p => [p.getAttribute('stroke'), p.getAttribute('stroke-dasharray') || ''])",
    );
    let styles: Vec<(String, String)> = serde_json::from_value(styles).unwrap();
    let colours: std::collections::BTreeSet<&String> = styles.iter().map(|s| &s.0).collect();
    let dashes: std::collections::BTreeSet<&String> = styles.iter().map(|s| &s.1).collect();
    assert_eq!((colours.len(), dashes.len()), (3, 3), "{styles:?}");
    // The legend shows each curve's colour and dashes.
    let swatches = b.js("return [...document.querySelectorAll('#chart .legend svg.swatch line')].map(l => [l.getAttribute('stroke'), l.getAttribute('stroke-dasharray') || ''])");
    let swatches: Vec<(String, String)> = serde_json::from_value(swatches).unwrap();
    assert_eq!(swatches, styles);
    // The final value against the learning rate (as `xlab plot --x`): one line through 3 points,
    // left to right.
    b.open(&format!("{}#/exp/dash?metric=val.loss&x=optimizer.lr", dash.url));
    let line = b.until(
        "the curve against the key",
        "const c = [...document.querySelectorAll('#chart polyline.curve')]; return c.length === 1 && document.querySelector('#chart .xlabel') && c[0].getAttribute('points')",
    );
    let xs = xs_of(&line);
    assert!(xs.len() == 3 && xs.windows(2).all(|w| w[0] < w[1]), "{line}");
    // A log x axis: 0.03 sits at log10(3) ≈ 0.477 of the way from 0.01 to 0.1.
    b.open(&format!("{}#/exp/dash?metric=val.loss&x=optimizer.lr&logx=1", dash.url));
    let line = b.until(
        "the curve on a log x axis",
        "const c = [...document.querySelectorAll('#chart polyline.curve')]; return c.length === 1 && document.getElementById('logx').checked && c[0].getAttribute('points')",
    );
    let xs = xs_of(&line);
    let at = (xs[1] - xs[0]) / (xs[2] - xs[0]);
    assert!((at - 3f64.log10()).abs() < 1e-3, "{line}");
    b.open(&format!("{}#/exp/dash?metric=val.loss&smooth=0.9", dash.url));
    b.until("the smoothed curves again", "return document.querySelectorAll('#chart polyline.curve').length === 3");
    let svg_text = b.js("return chartSvgText()");
    assert!(svg_text.as_str().unwrap().starts_with("<svg") && svg_text.as_str().unwrap().contains("polyline"));
    b.js("window.download = (name, blob, type) => { window.got = [name, blob.size, blob.type || type]; }; chartPng('dash.png'); return 1");
    let png = b.until("the PNG", "return window.got");
    assert_eq!(png[0], "dash.png");
    assert_eq!(png[2], "image/png");
    assert!(png[1].as_u64().unwrap() > 2000, "{png}");

    // A job's page: its files with their size and sha256.
    let id = query_job_id(&store);
    b.open(&format!("{}#/job/{id}", dash.url));
    let status =
        b.until("the job's status", "const s = document.getElementById('job-status'); return s && s.textContent");
    assert_eq!(status, "done");
    // Its provenance, as stored.
    let record: serde_json::Value = text(&cmd(&store).args(["export", "-e", "dash"]).output().unwrap().stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["job"]["id"] == id.as_str())
        .unwrap();
    let shown = b.js(
        "const d = {}; const dl = document.querySelector('#provenance dl'); const c = [...dl.children]; for (let i = 0; i < c.length; i += 2) d[c[i].textContent] = c[i + 1].textContent; return d",
    );
    assert_eq!(shown["xlab_version"], record["job"]["provenance"]["xlab_version"], "{shown}");
    assert_eq!(shown["host"], record["job"]["provenance"]["host"], "{shown}");
    let weights = store.join("runs").join(&id).join("weights.safetensors");
    let sum = std::process::Command::new("sha256sum").arg(&weights).output().unwrap();
    let sum = text(&sum.stdout).split_whitespace().next().unwrap().to_string();
    let shown = b.until(
        "the weights' hash",
        "const f = [...document.querySelectorAll('li.file')].find(l => l.textContent.startsWith('weights.safetensors')); return f && f.querySelector('.sha').title",
    );
    assert_eq!(shown, sum.as_str());
    // "Compare with…" another job: only the keys and final metrics that differ.
    let jobs: Vec<serde_json::Value> = text(&cmd(&store).args(["export", "-e", "dash"]).output().unwrap().stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "job")
        .map(|v| v["job"].clone())
        .collect();
    let lr = |id: &str| jobs.iter().find(|j| j["id"] == id).unwrap()["config"]["optimizer"]["lr"].clone();
    let other =
        jobs.iter().find(|j| j["config"]["optimizer"]["lr"] != lr(&id)).unwrap()["id"].as_str().unwrap().to_string();
    b.type_into("#compare-with", &format!("{}\u{E007}", &other[..10]));
    let keys = b.until(
        "the differing keys",
        "const t = document.getElementById('compare-config'); return t && [...t.querySelectorAll('tbody tr')].map(r => r.children[0].textContent)",
    );
    let keys: Vec<String> = serde_json::from_value(keys).unwrap();
    assert!(keys.contains(&"optimizer.lr".to_string()) && !keys.contains(&"epochs".to_string()), "{keys:?}");
    let metrics = b.js("return [...document.querySelectorAll('#compare-metrics tbody tr')].map(r => [...r.children].map(c => c.textContent))");
    let metrics: Vec<Vec<String>> = serde_json::from_value(metrics).unwrap();
    assert!(!metrics.is_empty() && metrics.iter().all(|r| r[1] != r[2] || r[3] != "+0.0000"), "{metrics:?}");

    // Live: a run of another experiment while the page is open; its jobs appear as they finish.
    b.open(&dash.url);
    b.until("the experiments page", "return document.querySelector('.experiment')");
    let later = write_file(
        dir.path(),
        "later.yaml",
        &SWEEP.replace("name: dash", "name: later").replace("epochs: 12", "epochs: 150"),
    );
    let mut run = cmd(&store)
        .arg("run")
        .arg(&later)
        .env("XLAB_NO_LIVE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seen_running = b.until(
        "the running experiment",
        "return [...document.querySelectorAll('.experiment')].map(c => c.textContent).find(t => t.includes('later') && /[0-9]+ (running|pending|done)/.test(t))",
    );
    assert!(seen_running.as_str().unwrap().contains("later"));
    // The jobs running now, with their device and epoch.
    let now = b.until("a running job", "const r = document.querySelector('.running-job'); return r && r.textContent");
    assert!(now.as_str().unwrap().contains("later / train") && now.as_str().unwrap().contains("/150"), "{now}");
    let status = run.wait().unwrap();
    assert!(status.success());
    let ended = Instant::now();
    b.until(
        "the finished jobs",
        "return [...document.querySelectorAll('.experiment')].map(c => c.textContent).find(t => t.includes('later') && t.includes('6 done'))",
    );
    assert!(ended.elapsed() < Duration::from_secs(5), "finished jobs showed after {:?}", ended.elapsed());

    // Two experiments in one view: their rows in one table, their curves in one plot, coloured
    // by experiment.
    b.open(&format!("{}#/exp/dash?with=later&metric=val.loss&color=experiment", dash.url));
    let colours = b.until(
        "the overlaid curves",
        "const c = [...document.querySelectorAll('#chart polyline.curve')]; return c.length === 6 && c.map(p => p.getAttribute('stroke'))",
    );
    let colours: Vec<String> = serde_json::from_value(colours).unwrap();
    assert_eq!(colours.iter().collect::<std::collections::BTreeSet<_>>().len(), 2, "{colours:?}");
    assert!(
        colours[..3].iter().all(|c| *c == colours[0]) && colours[3..].iter().all(|c| *c == colours[3]),
        "{colours:?}"
    );
    let shown = b.js("return [...document.querySelectorAll('#table td.experiment')].map(t => t.textContent)");
    assert_eq!(shown, serde_json::json!(["dash", "dash", "dash", "later", "later", "later"]));
    // The other experiment's numbers are its `xlab query` numbers.
    let later = cmd(&store).args(["query", "-e", "later", "-m", "test.acc", "--format", "json"]).output().unwrap();
    let later: serde_json::Value = serde_json::from_slice(&later.stdout).unwrap();
    let want: Vec<String> =
        later.as_array().unwrap().iter().map(|r| r["metrics"]["test.acc"]["mean"].to_string()).collect();
    let got = b.js(
        "return [...document.querySelectorAll('#table tr.row')].filter(t => t.querySelector('td.experiment').textContent === 'later').map(t => t.querySelector('td[data-metric=\"test.acc\"]').dataset.mean)",
    );
    let got: Vec<String> = serde_json::from_value(got).unwrap();
    assert_eq!(got, want);
    // A name that is not an experiment: said, with what it may have meant.
    b.open(&format!("{}#/exp/dash?with=latr", dash.url));
    let said = b.until("the error", "const e = document.getElementById('error'); return e && e.textContent");
    assert!(said.as_str().unwrap().contains("with `latr`") && said.as_str().unwrap().contains("later"), "{said}");

    // An experiment whose only job failed: its page says what happened and what to do.
    let broken = write_file(
        dir.path(),
        "broken.yaml",
        "name: broken\ndefaults:\n  task: train\n  data: {name: two_moons, n_train: 100, n_val: 0, n_test: 50}\n  \
         model: {name: mlp, hidden: [8]}\n  optimizer: {name: sgd, lr: 1.0e+30}\n  epochs: 2\nstages:\n  train: {}\n",
    );
    let out = cmd(&store).arg("run").arg(&broken).env("XLAB_NO_LIVE", "1").output().unwrap();
    assert!(!out.status.success(), "{}", text(&out.stderr));
    b.open(&format!("{}#/exp/broken", dash.url));
    let note = b.until("the note", "const e = document.getElementById('unfinished'); return e && e.textContent");
    assert!(note.as_str().unwrap().starts_with("No job has finished: 1 of 1 did not"), "{note}");
    let page = b.until(
        "the rest of the page",
        "return performance.getEntriesByName('xlab:view').length && document.getElementById('chart').textContent",
    );
    assert_eq!(page, "No job has logged a metric yet.");
    assert!(b.js("return document.getElementById('error') === null").as_bool().unwrap());
}

/// The x coordinates of an SVG polyline's `points`.
fn xs_of(points: &serde_json::Value) -> Vec<f64> {
    points.as_str().unwrap().split(' ').map(|p| p.split(',').next().unwrap().parse().unwrap()).collect()
}

fn query_job_id(store: &Path) -> String {
    let out = cmd(store).args(["export", "-e", "dash"]).output().unwrap();
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["type"] == "job")
        .map(|v| v["job"]["id"].as_str().unwrap().to_string())
        .unwrap()
}

#[test]
fn the_dashboard_guards_its_store_and_its_users() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    // No store yet: the page says so and what to do.
    let dash = serve(&store, &[]);
    let (status, body) = http("GET", &format!("{}api/experiments", dash.url), &[], None);
    assert_eq!(status, 404);
    assert!(body.contains("xlab run FILE --store"), "{body}");
    drop(dash);

    let name = "<img src=x onerror=alert(1)>";
    let file = write_file(
        dir.path(),
        "x.yaml",
        &SWEEP.replace("name: dash", &format!("name: \"{name}\"")).replace("seeds: 2", "seeds: 1"),
    );
    let out = cmd(&store).arg("run").arg(&file).env("XLAB_NO_LIVE", "1").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dash = serve(&store, &[]);
    let base = dash.url.clone();

    // Every response forbids inline script and framing.
    let raw = {
        let authority = base.trim_start_matches("http://").trim_end_matches('/');
        let mut s = TcpStream::connect(authority).unwrap();
        write!(s, "GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    assert!(raw.contains("Content-Security-Policy: default-src 'none'; script-src 'self'"), "{raw}");
    assert!(!raw.contains("<script>") && raw.contains("<script src=\"app.js\""), "no inline script: {raw}");

    // Names from the store are data, served as JSON; the page sets them as text.
    let v = get_json(&format!("{base}api/experiments"));
    assert_eq!(v["experiments"][0]["name"], name);
    let js = http("GET", &format!("{base}app.js"), &[], None).1;
    assert!(!js.contains("innerHTML") && !js.contains("insertAdjacentHTML") && !js.contains("document.write"));

    // What the dashboard read is kept while nobody else opens the store (the page's version
    // stays), and read again once another process has written it.
    let version = |b: &str| get_json(&format!("{b}api/running"))["version"].clone();
    let v1 = version(&base);
    assert!(v1.is_u64(), "{v1}");
    assert_eq!(version(&base), v1);
    let table = get_json(&format!(
        "{base}api/table?exp={}",
        name.replace('<', "%3C").replace('>', "%3E").replace(' ', "%20").replace('=', "%3D")
    ));
    assert_eq!(table["rows"].as_array().unwrap().len(), 3);
    let second = write_file(
        dir.path(),
        "second.yaml",
        &SWEEP.replace("name: dash", "name: second").replace("epochs: 12", "epochs: 1"),
    );
    let out = cmd(&store).arg("run").arg(&second).env("XLAB_NO_LIVE", "1").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(version(&base), v1);
    let names: Vec<String> = get_json(&format!("{base}api/experiments"))["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"second".to_string()) && names.contains(&name.to_string()), "{names:?}");

    // Requests addressed elsewhere (DNS rebinding) are refused.
    let (status, _) = http("GET", &format!("{base}api/experiments"), &[("Host", "attacker.example:80")], None);
    assert_eq!(status, 403);
    // Read-only.
    let (status, _) = http("POST", &format!("{base}api/experiments"), &[], Some("{}"));
    assert_eq!(status, 405);

    // Artifacts come from a job's run folder only.
    let id = {
        let out = cmd(&store).args(["export"]).output().unwrap();
        let line = text(&out.stdout).lines().find(|l| l.contains("\"type\":\"job\"")).unwrap().to_string();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["job"]["id"].as_str().unwrap().to_string()
    };
    let run_dir = store.join("runs").join(&id);
    std::fs::write(run_dir.join("note.txt"), "hello").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), run_dir.join("out.txt")).unwrap();
    let art = |path: &str| http("GET", &format!("{base}api/artifact?id={id}&path={path}"), &[], None);
    assert_eq!(art("note.txt"), (200, "hello".to_string()));
    for bad in ["../../x.yaml", "%2e%2e/%2e%2e/x.yaml", "..%2F..%2Fx.yaml", "/etc/passwd", "%2Fetc%2Fpasswd", "out.txt"]
    {
        let (status, body) = art(bad);
        assert_eq!(status, 403, "{bad}: {body}");
        assert!(!body.contains("secret") && !body.contains("root:"), "{bad}: {body}");
    }
    let (status, _) = http("GET", &format!("{base}api/artifact?id=../..&path=x"), &[], None);
    assert_eq!(status, 403);
    drop(dash);

    // Off loopback a token is required: made up and printed when not given.
    let open = serve(&store, &["--bind", "0.0.0.0"]);
    let token = open.url.split("token=").nth(1).expect("a token in the URL").to_string();
    assert!(token.len() >= 32, "{token}");
    let plain = open.url.split('?').next().unwrap().to_string();
    let (status, body) = http("GET", &format!("{plain}api/experiments"), &[], None);
    assert_eq!(status, 401, "{body}");
    let (status, _) = http("GET", &format!("{plain}api/experiments?token=wrong{}", &token[5..]), &[], None);
    assert_eq!(status, 401);
    assert_eq!(http("GET", &format!("{plain}api/experiments?token={token}"), &[], None).0, 200);
    let bearer = format!("Bearer {token}");
    assert_eq!(http("GET", &format!("{plain}api/experiments"), &[("Authorization", &bearer)], None).0, 200);
    drop(open);

    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = cmd(&store).args(["serve", "--port", &port]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("cannot listen on 127.0.0.1:{port}")) && err.contains("--port"), "{err}");
}
