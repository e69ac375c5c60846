//! `xlab report`: a showcase store (a SAM comparison over three seeds on a CSV file, and a
//! diffusion model's sample grid) written as one HTML page, read by the headless Chromium of the
//! dashboard tests: the page holds every number `xlab query` prints, its figures load from the
//! page itself, and its provenance names the plugin and data file hashes. Markdown says the
//! same with its figures beside it.

mod common;

use common::browser::{browser, Browser};
use common::{cmd, files_under, text};
use std::path::Path;

const SHOWCASE: &str = r#"name: showcase
defaults:
  deterministic: true
stages:
  train:
    task: train
    data: {name: csv, path: points.csv, n_val: 100, n_test: 150}
    model: {name: mlp, hidden: [16]}
    optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
    epochs: 3
    seeds: 3
    variants:
      - {}
      - step_rule: {use: sam.sam, rho: 0.05}
  classifier:
    task: train
    data: {name: digits}
    model: {name: mlp, hidden: [32]}
    optimizer: {name: adam, lr: 0.01}
    epochs: 2
  unet:
    needs: classifier
    task: train
    data: {name: digits}
    model: {name: unet, channels: [8, 16], time_dim: 16}
    diffusion: {timesteps: 100, conditional: true}
    optimizer: {name: adam, lr: 0.002}
    batch_size: 128
    epochs: 1
  sample:
    needs: unet
    task: sample
    data: {name: digits}
    denoiser: {name: trained}
    samples: 16
    sampler: {use: diffusion.ddim, steps: 5}
"#;

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The cells of a Markdown table `xlab query` printed (its numbers as text).
fn cells(markdown: &str) -> Vec<String> {
    markdown
        .lines()
        .skip(2)
        .flat_map(|l| l.split('|').map(|c| c.trim().to_string()).collect::<Vec<_>>())
        .filter(|c| c.chars().any(|ch| ch.is_ascii_digit()))
        .collect()
}

fn showcase(dir: &Path) -> std::path::PathBuf {
    let mut csv = String::from("x,y,label\n");
    for i in 0..400 {
        let (x, y) = ((i as f64 * 0.37).sin() * 2.0, (i as f64 * 0.11).cos());
        // A curved boundary with a quarter of the labels flipped: accuracy differs by seed.
        let flip = (i * 7919) % 4 == 0;
        csv += &format!("{x:.4},{y:.4},{}\n", u8::from((x * y > 0.1 * x) != flip));
    }
    std::fs::write(dir.join("points.csv"), csv).unwrap();
    std::fs::write(dir.join("showcase.yaml"), SHOWCASE).unwrap();
    let store = dir.join("results");
    ok(cmd(&store).arg("run").arg(dir.join("showcase.yaml")).output().unwrap());
    store
}

#[test]
fn the_report_holds_every_number_query_prints_and_renders_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let store = showcase(dir.path());
    let baseline = "stage == \"train\" and step_rule.use == null";
    let query = ok(cmd(&store).args(["query", "--format", "markdown"]).output().unwrap());
    let compare = ok(cmd(&store)
        .args(["query", "stage == \"train\"", "-m", "test.acc", "--compare-to", baseline, "--format", "markdown"])
        .output()
        .unwrap());
    let intervals = ok(cmd(&store)
        .args(["query", "--agg", "mean(test.acc),ci95(test.acc),bootstrap_ci(test.acc),iqm(test.acc),count()"])
        .args(["--format", "markdown"])
        .output()
        .unwrap());
    let mut numbers = cells(&query);
    numbers.extend(cells(&compare));
    numbers.extend(cells(&intervals));
    assert!(numbers.len() > 20, "{query}\n{compare}");
    assert!(compare.contains("baseline") && (compare.contains("+0.") || compare.contains("-0.")), "{compare}");

    let page = dir.path().join("report.html");
    ok(cmd(&store).args(["report", "showcase", "--compare-to", baseline, "-o"]).arg(&page).output().unwrap());
    let html = std::fs::read_to_string(&page).unwrap();
    // Nothing outside the page: no URL to fetch, and a policy that forbids it anyway.
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("src=\"/"),
        "the page fetches nothing"
    );
    assert!(html.contains("default-src 'none'"));

    // Provenance: the SAM plugin's file hash as the job recorded it, and the data file's.
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&ok(cmd(&store)
        .args(["query", "step_rule.use == \"sam.sam\"", "--group-by", "id", "--agg", "count()", "--format", "json"])
        .output()
        .unwrap()))
    .unwrap();
    let id = jobs[0]["id"].as_str().unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&ok(cmd(&store).args(["show", id, "--json"]).output().unwrap())).unwrap();
    let record = if record.get("job").is_some() { record["job"].clone() } else { record };
    let plugin = record["provenance"]["plugins"][0]["sha256"].as_str().unwrap().to_string();
    let data_sha = record["config"]["data"]["path"]["sha256"].as_str().unwrap().to_string();
    let libtorch = record["provenance"]["libtorch"].as_str().unwrap().to_string();

    let Some((chromium, driver)) = browser() else {
        eprintln!(
            "skipped the browser half: no chromium and chromedriver in /usr/bin (`make test` installs them as root)"
        );
        return;
    };
    let b = Browser::start(&chromium, &driver);
    b.open(&format!("file://{}", page.display()));
    let body = b.until("the report", "return document.body && document.body.innerText").as_str().unwrap().to_string();
    for n in &numbers {
        assert!(body.contains(n.as_str()), "`{n}` of xlab query is not in the report:\n{body}");
    }
    for want in
        [plugin.as_str(), data_sha.as_str(), libtorch.as_str(), "Paired comparisons", "Learning curves", "Sample grids"]
    {
        assert!(body.contains(want), "no `{want}` in the report:\n{body}");
    }
    // Every figure decoded from the page itself: the curves and the sample grid.
    let loaded = b.until(
        "the figures",
        "const i = [...document.images]; return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0) && i.length",
    );
    assert!(loaded.as_u64().unwrap() >= 3, "{loaded}");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report.png");
    b.screenshot(&shot);

    // Markdown: the same numbers, its figures in a folder beside it.
    let md = dir.path().join("out").join("showcase.md");
    std::fs::create_dir_all(md.parent().unwrap()).unwrap();
    ok(cmd(&store).args(["report", "--compare-to", baseline, "-o"]).arg(&md).output().unwrap());
    let text_md = std::fs::read_to_string(&md).unwrap();
    for n in &numbers {
        assert!(text_md.contains(n.as_str()), "`{n}` is not in the Markdown report");
    }
    let figures = files_under(&dir.path().join("out/showcase_files"));
    assert!(figures.iter().any(|p| p.extension().is_some_and(|e| e == "png")), "{figures:?}");
    for f in &figures {
        let rel = f.strip_prefix(md.parent().unwrap()).unwrap();
        assert!(text_md.contains(&rel.display().to_string()), "{} is not linked", rel.display());
    }

    // Mistakes name what to do, and write nothing.
    for (args, says) in [
        (vec!["report", "showcas"], "no experiment `showcas`"),
        (vec!["report", "--compare-to", "step_rul.use == null"], "did you mean `step_rule.use`"),
        (vec!["report", "-m", "test.accc"], "did you mean `test.acc`"),
    ] {
        let out = cmd(&store).args(&args).arg("-o").arg(dir.path().join("never.html")).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: {}", text(&out.stderr));
    }
    assert!(!dir.path().join("never.html").exists());
}

#[test]
fn report_mistakes_are_errors_that_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).args(["report"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("there is no xlab store"), "{}", text(&out.stderr));
}
