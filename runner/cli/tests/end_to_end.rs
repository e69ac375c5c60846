//! End-to-end tests of `xlab`: real experiment files, real `xlab-worker` processes training on
//! libtorch, a real sled store on disk. Run `make build` first (the Makefile's `test` does).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn xlab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab"))
}

fn worker() -> PathBuf {
    let w = xlab().with_file_name("xlab-worker");
    assert!(w.exists(), "{} is missing: build the workspace first (`make build`)", w.display());
    w
}

fn cmd(store: &Path) -> Command {
    let mut c = Command::new(xlab());
    c.arg("--store").arg(store).env("XLAB_WORKER", worker()).env_remove("RUST_LOG").env_remove("XLAB_STORE");
    c
}

fn run_ok(c: &mut Command) -> Output {
    let out = c.output().expect("xlab starts");
    assert!(
        out.status.success(),
        "xlab failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const TINY: &str = r#"
name: tiny
defaults:
  task: train
  data: {name: two_moons, n_train: 256, n_val: 64, n_test: 128, noise: 0.2}
  model: {name: mlp, hidden: [16]}
  optimizer: {name: sgd, momentum: 0.9}
  epochs: 3
  batch_size: 32
stages:
  train:
    grid:
      optimizer.lr: [0.01, 0.1]
    seeds: SEEDS
"#;

fn write_experiment(dir: &Path, seeds: &str) -> PathBuf {
    let f = dir.join("tiny.yaml");
    std::fs::write(&f, TINY.replace("SEEDS", seeds)).unwrap();
    f
}

#[test]
fn a_sweep_runs_is_stored_and_is_not_run_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = write_experiment(dir.path(), "2");

    let out = run_ok(cmd(&store).arg("run").arg(&file));
    let table = text(&out.stdout);
    assert!(table.contains("optimizer.lr") && table.contains("test.acc (mean ± std)"), "{table}");
    assert!(text(&out.stderr).contains("4 done, 0 skipped"), "{}", text(&out.stderr));

    // The numbers come from the store, read by a separate process.
    let out = run_ok(cmd(&store).args(["query", "--experiment", "tiny", "--format", "json"]));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let acc = &r["metrics"]["test.acc"];
        assert_eq!(acc["n"], 2, "{r}");
        let values: Vec<f64> = acc["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(values.iter().all(|v| (0.0..=1.0).contains(v)), "{values:?}");
        let mean = acc["mean"].as_f64().unwrap();
        assert!((mean - (values[0] + values[1]) / 2.0).abs() < 1e-12);
        assert_eq!(r["metrics"]["epoch"]["values"][0], 3.0);
    }
    // lr 0.1 learns two moons in 3 epochs well above chance.
    let best = rows.iter().map(|r| r["metrics"]["test.acc"]["mean"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(best > 0.8, "best mean test accuracy {best}");

    // A filter picks jobs by config, seed and metric before grouping; metric summaries read the
    // stored series.
    let filtered = |q: &str| {
        let out = run_ok(cmd(&store).args(["query", q, "--experiment", "tiny", "--format", "json"]));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
    };
    let low = filtered("optimizer.lr < 0.05 and seed == 1");
    assert_eq!(low.len(), 1);
    assert_eq!(low[0]["point"]["optimizer.lr"], 0.01);
    assert_eq!(low[0]["metrics"]["test.acc"]["n"], 1);
    let n_all =
        |rows: &[serde_json::Value]| rows.iter().map(|r| r["metrics"]["test.acc"]["n"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(n_all(&filtered("max(train.acc) >= min(train.acc) and at(epoch, 3) == 3")), 4);
    assert_eq!(n_all(&filtered(r#"stage ~ "^tr" and not status != "done""#)), 4);
    assert!(filtered("last(test.acc) > 2").is_empty());
    let md = run_ok(cmd(&store).args(["query", "-e", "tiny", "--format", "markdown", "-m", "test.acc"]));
    assert!(
        text(&md.stdout).starts_with("| stage | optimizer.lr | test.acc | n |\n|---|---|---|---|\n| train | 0.01 | 0.")
    );
    // Group by any key, aggregate, sort and cut.
    let out = run_ok(cmd(&store).args([
        "query",
        "-e",
        "tiny",
        "--group-by",
        "seed",
        "--agg",
        "mean(test.acc),min(test.acc),max(test.acc),count()",
        "--sort",
        "-max(test.acc)",
        "--format",
        "json",
    ]));
    let groups: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(groups.len(), 2);
    for g in &groups {
        assert_eq!(g["count()"], 2.0);
        let (lo, mean, hi) = (
            g["min(test.acc)"].as_f64().unwrap(),
            g["mean(test.acc)"].as_f64().unwrap(),
            g["max(test.acc)"].as_f64().unwrap(),
        );
        assert!(lo <= mean && mean <= hi, "{g}");
    }
    assert!(groups[0]["max(test.acc)"].as_f64() >= groups[1]["max(test.acc)"].as_f64(), "sorted descending");
    let one = run_ok(cmd(&store).args(["query", "-e", "tiny", "--limit", "1", "--format", "csv", "-m", "test.acc"]));
    assert_eq!(
        text(&one.stdout).lines().collect::<Vec<_>>()[0],
        "stage,optimizer.lr,mean(test.acc),std(test.acc),count()"
    );
    assert_eq!(text(&one.stdout).lines().count(), 2);
    let bad = cmd(&store).args(["query", "--agg", "avg(test.acc)"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("`avg` is not an aggregate"), "{}", text(&bad.stderr));
    let bad = cmd(&store).args(["query", "optimizer.lr => 1"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("optimizer.lr => 1\n             ^ use `==` to compare"),
        "{}",
        text(&bad.stderr)
    );

    // Two jobs side by side: the config keys that differ and every metric with b − a.
    let out = run_ok(cmd(&store).args(["plan"]).arg(&file));
    let ids: Vec<String> = text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("    "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    let a_b = run_ok(cmd(&store).args(["compare", &ids[0], &ids[3]]));
    let cmp = text(&a_b.stdout);
    assert!(
        cmp.contains("optimizer.lr") && cmp.contains("seed") && cmp.contains("b − a") && cmp.contains("test.acc"),
        "{cmp}"
    );
    let same = run_ok(cmd(&store).args(["compare", &ids[0], &ids[0]]));
    assert!(text(&same.stdout).contains("same config") && text(&same.stdout).contains("+0.0000"));

    // Learning curves: a line (mean over the 2 seeds) and a band per learning rate.
    let svg_path = dir.path().join("curves.svg");
    run_ok(cmd(&store).args(["plot", "val.acc", "-e", "tiny", "-o"]).arg(&svg_path));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
    assert!(svg.contains("optimizer.lr=0.01 (n=2)") && svg.contains("optimizer.lr=0.1 (n=2)"), "{svg}");
    assert!(svg.contains(">epoch<") && svg.contains(">val.acc<"), "per-epoch series say so: {svg}");
    // Titles, axis labels and a log y axis on request.
    let titled = dir.path().join("titled.svg");
    run_ok(
        cmd(&store)
            .args(["plot", "train.loss", "-e", "tiny", "--title", "Tiny sweep", "--ylabel", "training loss", "--log-y"])
            .args(["--xlabel", "pass over the data", "-o"])
            .arg(&titled),
    );
    let svg = std::fs::read_to_string(&titled).unwrap();
    for want in [">Tiny sweep<", ">training loss (log scale)<", ">pass over the data<"] {
        assert!(svg.contains(want), "{want}: {svg}");
    }
    // The final value against the learning rate: one line (the stage) through both rates.
    let vs_path = dir.path().join("vs.svg");
    run_ok(cmd(&store).args(["plot", "test.acc", "-e", "tiny", "--x", "optimizer.lr", "--log-x", "-o"]).arg(&vs_path));
    let svg = std::fs::read_to_string(&vs_path).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
    assert!(
        svg.contains(">optimizer.lr (log scale)<") && svg.contains(">train (n=2)<") && svg.contains(">1e-1<"),
        "{svg}"
    );
    let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
    assert_eq!(line.split("points=\"").nth(1).unwrap().split('"').next().unwrap().split(' ').count(), 2, "{line}");
    // The same plot as PNG: the SVG's scene rasterized at twice its size, with the curves'
    // colours in it.
    let png_path = dir.path().join("curves.png");
    run_ok(cmd(&store).args(["plot", "val.acc", "-e", "tiny", "-o"]).arg(&png_path));
    let png = std::fs::read(&png_path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let size = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    let width_svg: f64 = svg_width(&std::fs::read_to_string(&svg_path).unwrap());
    assert_eq!((f64::from(size(16)), size(20)), (2.0 * width_svg, 880), "width and height");
    let jpg = cmd(&store).args(["plot", "val.acc", "-e", "tiny", "-o", "x.jpg"]).output().unwrap();
    assert_eq!(jpg.status.code(), Some(2));
    assert!(text(&jpg.stderr).contains("name the file .svg or .png"), "{}", text(&jpg.stderr));
    let bad = cmd(&store).args(["plot", "val.acu", "-e", "tiny"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("no metric `val.acu` in experiment `tiny`"), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("did you mean `val.acc`?"), "{}", text(&bad.stderr));

    // Final weights are an artifact with PyTorch names.
    let runs: Vec<PathBuf> = std::fs::read_dir(store.join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 4);
    for run in &runs {
        let bytes = std::fs::read(run.join("weights.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
        assert!(header.contains("\"layers.0.weight\"") && header.contains("\"layers.2.bias\""), "{header}");
        assert!(run.join("worker.log").exists() && run.join("job.json").exists());
    }

    // Export, then import into an empty store: the same table comes back; importing twice
    // changes nothing.
    let export = dir.path().join("tiny.jsonl");
    run_ok(cmd(&store).args(["export", "--experiment", "tiny", "-o"]).arg(&export));
    let other = dir.path().join("other");
    let out = run_ok(cmd(&other).arg("import").arg(&export));
    assert!(
        text(&out.stdout).contains("4 new job(s), 0 updated, 0 already here; 1 new experiment(s)"),
        "{}",
        text(&out.stdout)
    );
    let out = run_ok(cmd(&other).arg("import").arg(&export));
    assert!(text(&out.stdout).contains("0 new job(s), 0 updated, 4 already here"), "{}", text(&out.stdout));
    let theirs = run_ok(cmd(&other).args(["query", "--experiment", "tiny", "--format", "json"]));
    let ours = run_ok(cmd(&store).args(["query", "--experiment", "tiny", "--format", "json"]));
    assert_eq!(text(&theirs.stdout), text(&ours.stdout));
    let csv = text(&run_ok(cmd(&store).args(["export", "--format", "csv"])).stdout);
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(csv.starts_with("job,experiment,stage,seed,status,optimizer.lr,"), "{csv}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"type\":\"job\"}\n").unwrap();
    let out = cmd(&other).arg("import").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("bad.jsonl:1: not an xlab export line"), "{}", text(&out.stderr));

    // Running the same file again runs nothing.
    let out = run_ok(cmd(&store).arg("run").arg(&file));
    let err = text(&out.stderr);
    assert!(err.contains("0 done, 4 skipped"), "{err}");
    assert_eq!(err.matches(" already done (job").count(), 4, "{err}");

    // Adding a seed runs only the new jobs, and the plan says so first.
    let file = write_experiment(dir.path(), "3");
    let out = run_ok(cmd(&store).arg("plan").arg(&file));
    assert!(
        text(&out.stdout).contains("stage `train`: 6 job(s) over optimizer.lr: 4 done, 2 new"),
        "{}",
        text(&out.stdout)
    );
    let out = run_ok(cmd(&store).arg("run").arg(&file));
    assert!(text(&out.stderr).contains("2 done, 4 skipped"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("┆     3 │"), "{}", text(&out.stdout));
}

#[test]
fn a_diverging_job_fails_with_its_cause_and_the_sweep_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("diverge.yaml");
    std::fs::write(
        &file,
        TINY.replace("name: tiny", "name: diverge").replace("[0.01, 0.1]", "[0.1, 1.0e30]").replace("SEEDS", "1"),
    )
    .unwrap();
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("FAILED (diverged)") && err.contains("optimizer.lr=1e+30"), "{err}");
    assert!(err.contains("1 done, 0 skipped (already done), 1 failed"), "{err}");
    let out = run_ok(cmd(&store).arg("plan").arg(&file));
    assert!(text(&out.stdout).contains("1 done, 1 failed"), "{}", text(&out.stdout));
    // Machine-readable logs: every line on stderr is a JSON object.
    let out = cmd(&store).args(["--log-format", "json", "run"]).arg(&file).output().unwrap();
    let err = text(&out.stderr);
    let logs: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!logs.is_empty(), "{err}");
    for l in &logs {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{l}");
    }
    assert!(err.lines().all(|l| l.starts_with('{') || l.starts_with("error:") || l.contains("job(s) failed")), "{err}");
}

/// A query of a store a run holds reads it through the run (see `live.rs`); a second run joins
/// it (see `shared.rs`), and one that cannot (it submits to Slurm) is told who holds the store,
/// with what to do.
#[test]
fn a_busy_store_answers_queries_and_a_second_run_joins_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("long.yaml");
    std::fs::write(
        &file,
        TINY.replace("name: tiny", "name: long")
            .replace("epochs: 3", "epochs: 100000")
            .replace("[0.01, 0.1]", "[0.1]")
            .replace("SEEDS", "1"),
    )
    .unwrap();
    let mut long = cmd(&store)
        .arg("run")
        .arg(&file)
        .args(["-j", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !store.join("xlab.sock").exists() {
        assert!(Instant::now() < deadline, "the run never served the store");
        std::thread::sleep(Duration::from_millis(20));
    }
    let query = cmd(&store).args(["query"]).output().unwrap();
    let other = dir.path().join("other.yaml");
    std::fs::write(&other, TINY.replace("name: tiny", "name: other").replace("SEEDS", "1")).unwrap();
    let slurm = cmd(&store).args(["run", "--executor", "slurm"]).arg(&other).output().unwrap();
    let second = cmd(&store).arg("run").arg(&other).output().unwrap();
    assert!(long.try_wait().unwrap().is_none(), "the first run still owned the store");
    let _ = long.kill();
    let _ = long.wait();
    assert!(query.status.success(), "{}", text(&query.stderr));
    assert!(text(&query.stdout).contains("experiment `long`"), "{}", text(&query.stdout));
    let err = text(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(err.contains("shared with the run(s) of `long`"), "{err}");
    assert!(text(&second.stdout).contains("experiment `other`"), "{}", text(&second.stdout));
    assert_eq!(slurm.status.code(), Some(3));
    let err = text(&slurm.stderr);
    assert!(err.contains(&format!("is in use by pid {} (", long.id())) && err.contains(" run "), "{err}");
    assert!(err.contains("cannot join it") && err.contains("hint:"), "{err}");
}

#[test]
fn invalid_files_are_refused_with_position_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let cases = [
        (
            "typo.yaml",
            TINY.replace("epochs: 3", "epocs: 3").replace("SEEDS", "1"),
            "typo.yaml:8:3: defaults: unknown field `epocs`",
            "did you mean `epochs`?",
        ),
        (
            "param.yaml",
            TINY.replace("momentum: 0.9", "momentum: 0.9, lrr: 1").replace("SEEDS", "1"),
            "optimizer: unknown field `lrr`",
            "did you mean `lr`?",
        ),
        ("empty.yaml", String::new(), "empty.yaml: the file is empty", "hint:"),
    ];
    for (name, body, message, hint) in cases {
        let f = dir.path().join(name);
        std::fs::write(&f, body).unwrap();
        let out = cmd(&store).arg("validate").arg(&f).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = text(&out.stderr);
        assert!(err.contains(message) && err.contains(hint), "{name}: {err}");
    }
    assert!(!store.exists(), "validation must not create a store");
}

#[test]
fn doctor_reports_libtorch_and_devices() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(cmd(&dir.path().join("results")).arg("doctor"));
    let s = text(&out.stdout);
    assert!(s.contains("libtorch:     2.11.0"), "{s}");
    assert!(s.contains("CUDA usable:"), "{s}");
    assert!(s.contains("store:") && s.contains("plugin path:"), "{s}");
}

#[test]
fn the_worker_finds_libtorch_without_ld_library_path() {
    let out = Command::new("ldd").arg(worker()).env_remove("LD_LIBRARY_PATH").output().expect("ldd runs");
    let s = text(&out.stdout);
    assert!(!s.contains("not found"), "{s}");
    assert!(s.contains("libtorch_cpu.so => ") && s.contains(".venv/torch/lib"), "{s}");
}

/// `xlab … | head` must end quietly when the pipe closes, not panic.
#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = write_experiment(dir.path(), "1");
    run_ok(cmd(&store).arg("run").arg(&file));
    for args in [vec!["export"], vec!["query"], vec!["plan", file.to_str().unwrap()]] {
        let mut child = cmd(&store).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        assert!(!text(&out.stderr).contains("panicked"), "{args:?}: {}", text(&out.stderr));
    }
}

/// A missing worker is an environment problem, said once, with what to do.
#[test]
fn a_missing_worker_is_reported_once_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_experiment(dir.path(), "1");
    let out = Command::new(xlab())
        .arg("--store")
        .arg(dir.path().join("results"))
        .arg("run")
        .arg(&file)
        .env("XLAB_WORKER", dir.path().join("no-such-worker"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(err.contains("cannot start the worker") && err.contains("hint: build it with `make build`"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // Nothing ran, so the jobs are still new.
    let out = run_ok(cmd(&dir.path().join("results")).arg("plan").arg(&file));
    assert!(text(&out.stdout).contains("2 job(s) over optimizer.lr: 2 new"), "{}", text(&out.stdout));
}

/// On a terminal `xlab run` draws a live view: an overall bar with counts and ETA and a bar per
/// running job, with log lines above. The test gives it a pseudo-terminal through `script`.
#[test]
fn a_terminal_gets_the_live_view() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = write_experiment(dir.path(), "1");
    let line = format!(
        "XLAB_WORKER={} {} --store {} run {}",
        worker().display(),
        xlab().display(),
        store.display(),
        file.display()
    );
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .output()
        .expect("`script` (util-linux) runs");
    let tty = text(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("2/2 jobs (0 running, 0 queued)") && tty.contains("ETA"), "{tty}");
    assert!(tty.contains("2 done, 0 skipped"), "{tty}");
}

/// The `width` attribute of an SVG document.
fn svg_width(svg: &str) -> f64 {
    svg.split("width=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|w| w.parse().ok()).unwrap()
}

/// A read command pointed at a folder that holds no store (a mistyped `--store`) is a user
/// error that says so, and creates nothing there; it used to make an empty store and answer
/// "holds no experiments yet".
#[test]
fn a_read_command_on_a_folder_without_a_store_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("resluts");
    for args in [
        vec!["query"],
        vec!["show", "0123456789abcdef"],
        vec!["export"],
        vec!["plot", "test.acc"],
        vec!["status"],
        vec!["gc", "--dry-run"],
        vec!["compare", "a", "b"],
        vec!["resume", "x"],
    ] {
        let out =
            Command::new(xlab()).arg("--store").arg(&typo).args(&args).env("XLAB_WORKER", worker()).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("there is no xlab store at {} (no such folder)", typo.display())), "{err}");
        assert!(err.contains("hint: check `--store`"), "{err}");
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
    std::fs::create_dir(&typo).unwrap();
    let out = Command::new(xlab()).arg("--store").arg(&typo).arg("query").output().unwrap();
    assert!(text(&out.stderr).contains("(the folder has no `db/`)"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_dir(&typo).unwrap().count(), 0);
}
