//! Reading the store while a run owns it: every read command works against the running store
//! (through the owner's socket), sees running jobs with their partial series, and never stops the
//! run; writes wait or are refused with what to do; a garbled request, a reader that keeps
//! querying and an owner killed with SIGKILL are all survived. Real coordinator and worker
//! processes and a real sled store.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{cmd, stage_job_ids, text, wait_for};

/// Two quick jobs, then one that trains far longer than the test waits (it is stopped).
const LIVE: &str = r#"
name: live
defaults:
  data: {name: two_moons, n_train: 2048, n_val: 64, n_test: 64}
stages:
  quick:
    task: noop
    noop: {sleep_s: 0.2}
    seeds: 2
  long:
    task: train
    model: {name: mlp, hidden: [32]}
    optimizer: {name: sgd, lr: 0.05}
    batch_size: 32
    epochs: 100000
"#;

/// A run started by a test: killed if the test ends without stopping it (a failed assertion),
/// so no run outlives its test.
struct Owner(Option<Child>);

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A temporary folder holding `LIVE` as `live.yaml`, and the store path beside it.
fn live_experiment() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("live.yaml");
    std::fs::write(&file, LIVE).unwrap();
    let store = dir.path().join("results");
    (dir, file, store)
}

fn start(store: &Path, file: &Path) -> Owner {
    Owner(Some(
        cmd(store)
            .args(["run"])
            .arg(file)
            .args(["-j", "2"])
            .env("XLAB_NO_LIVE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

fn show(store: &Path, id: &str) -> serde_json::Value {
    let out = cmd(store).args(["show", id, "--json"]).output().unwrap();
    assert!(out.status.success(), "show {id}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The long job's attempts so far (0 before the store exists).
fn attempts(store: &Path, long: &str) -> usize {
    let out = cmd(store).args(["show", long, "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["attempts"].as_array().map_or(0, Vec::len)
}

/// Waits until the long job runs a new attempt (beyond `before`) that has logged an epoch, read
/// through the run.
fn wait_running_with_points(store: &Path, long: &str, before: usize) {
    wait_for("a running job with a newly logged epoch", Duration::from_secs(120), || {
        // Until the run has made the store, there is nothing to show.
        let out = cmd(store).args(["show", long, "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let now = v["attempts"].as_array().map_or(0, Vec::len);
        let epochs = v["metrics"]["val.acc"].as_array().map_or(0, Vec::len);
        v["status"] == "running" && now > before && epochs > 0
    });
}

fn stop(mut owner: Owner) -> std::process::Output {
    let mut child = owner.0.take().expect("a running owner");
    // SAFETY: kill(2) on a child this test started and has not waited for.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the run did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn every_read_command_works_while_a_run_owns_the_store() {
    let (dir, file, store) = live_experiment();
    let quick = stage_job_ids(&store, &file, "quick");
    let long = stage_job_ids(&store, &file, "long").remove(0);
    let before = attempts(&store, &long);
    let run = start(&store, &file);
    wait_running_with_points(&store, &long, before);
    wait_for("the quick jobs done", Duration::from_secs(60), || {
        quick.iter().all(|q| show(&store, q)["status"] == "done")
    });

    // The socket the run serves on is the store owner's alone.
    let socket = store.join("xlab.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let ok = |args: &[&str]| -> String {
        let out = cmd(&store).args(args).output().unwrap();
        assert!(out.status.success(), "xlab {args:?} during a run: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let table = ok(&["query", "-e", "live"]);
    assert!(table.contains("quick") && table.contains("0/1 done, 1 running"), "{table}");
    let listed = ok(&["query", "-e", "live", "--format", "json"]);
    assert!(listed.contains("\"stage\": \"long\""), "{listed}");
    assert!(ok(&["experiments"]).contains("live"));
    let compared = ok(&["compare", &quick[0], &quick[1]]);
    assert!(compared.contains("seed"), "{compared}");
    let export = ok(&["export", "-e", "live"]);
    assert!(export.contains(&long) && export.contains("\"running\""), "the running job is exported as running");
    let planned = ok(&["plan", file.to_str().unwrap()]);
    assert!(planned.contains("2 done"), "{planned}");
    let plot = dir.path().join("acc.svg");
    ok(&["plot", "val.acc", "-e", "live", "-o", plot.to_str().unwrap()]);
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<polyline"), "the running job's partial curve");
    assert!(ok(&["gc", "--dry-run"]).contains("would remove"));

    // A record read through the run matches the stored one field for field once the run ends;
    // here the partial series only grows.
    let before = show(&store, &long)["metrics"]["val.acc"].as_array().unwrap().len();
    wait_for("another epoch", Duration::from_secs(60), || {
        show(&store, &long)["metrics"]["val.acc"].as_array().unwrap().len() > before
    });

    // Writes are the run's: gc would delete checkpoints being written, import would race it.
    let gc = cmd(&store).args(["gc"]).output().unwrap();
    assert_eq!(gc.status.code(), Some(3), "{}", text(&gc.stderr));
    assert!(
        text(&gc.stderr).contains("in use by pid") && text(&gc.stderr).contains("--dry-run"),
        "{}",
        text(&gc.stderr)
    );

    // A garbled request gets an error answer and costs the run nothing.
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(&7u32.to_le_bytes()).unwrap();
        s.write_all(b"garbage").unwrap();
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).unwrap();
        assert_eq!(tag[0], 1, "an error answer");
        // A client that vanishes mid-request.
        let mut half = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        half.write_all(&1000u32.to_le_bytes()).unwrap();
        half.write_all(b"{\"protocol\":").unwrap();
    }
    let after = ok(&["query", "-e", "live"]);
    assert!(after.contains("long"), "{after}");

    // Readers busy while the run ends: each finishes, on the store itself once the run is gone.
    let stop_reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop_reading) = (store.clone(), stop_reading.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut n = 0;
                while !stop_reading.load(std::sync::atomic::Ordering::SeqCst) {
                    let out = cmd(&store).args(["query", "-e", "live", "--format", "json"]).output().unwrap();
                    if !out.status.success() {
                        failures.push(text(&out.stderr));
                    }
                    n += 1;
                }
                (n, failures)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = stop(run);
    std::thread::sleep(Duration::from_millis(500));
    stop_reading.store(true, std::sync::atomic::Ordering::SeqCst);
    for r in readers {
        let (n, failures) = r.join().unwrap();
        assert!(n >= 2 && failures.is_empty(), "{n} queries around the run's end: {failures:?}");
    }
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(!socket.exists(), "the run removes its socket when it ends");
    let v = show(&store, &long);
    assert_eq!(v["status"], "interrupted", "stopped at a checkpoint, resumable");
}

#[test]
fn a_reader_never_stops_a_run_from_starting_and_a_killed_owner_leaves_nothing_in_the_way() {
    let (_dir, file, store) = live_experiment();
    // A first run makes the store; stop it once the long job has started.
    let long = stage_job_ids(&store, &file, "long").remove(0);
    let before = attempts(&store, &long);
    let run = start(&store, &file);
    wait_running_with_points(&store, &long, before);
    stop(run);

    // `watch -n0.1 xlab query`: a reader holding the store again and again.
    let stop_reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop_reading) = (store.clone(), stop_reading.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop_reading.load(std::sync::atomic::Ordering::SeqCst) {
                let out = cmd(&store).args(["query", "-e", "live"]).output().unwrap();
                assert!(out.status.success(), "query {n}: {}", text(&out.stderr));
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = attempts(&store, &long);
    let run = start(&store, &file);
    wait_running_with_points(&store, &long, before);
    stop_reading.store(true, std::sync::atomic::Ordering::SeqCst);
    let queries = reader.join().unwrap();
    assert!(queries >= 2, "{queries} queries");

    // SIGKILL: the socket file stays behind, the lock does not, and the job's worker does not
    // train on as an orphan beside the next attempt.
    let attempt = show(&store, &long)["attempts"].as_array().unwrap().last().cloned().unwrap();
    let worker = attempt["pid"].as_u64().expect("a local attempt records its worker's pid");
    let mut run = run;
    let child = run.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    run.0 = None;
    wait_for("the orphaned worker to exit", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{worker}")).exists()
            || std::fs::read_to_string(format!("/proc/{worker}/stat")).is_ok_and(|s| s.contains(") Z "))
    });
    let socket = store.join("xlab.sock");
    assert!(socket.exists(), "a killed owner cannot remove its socket");
    let out = cmd(&store).args(["query", "-e", "live"]).output().unwrap();
    assert!(out.status.success(), "after a killed run: {}", text(&out.stderr));
    // What it reads is the state the killed run left, and it says so, with its age.
    let err = text(&out.stderr);
    assert!(err.contains("ended without finishing") && err.contains(" ago"), "{err}");
    // The next run takes the store over, socket included, and serves again.
    let before = attempts(&store, &long);
    let run = start(&store, &file);
    wait_running_with_points(&store, &long, before);
    // Running again in a new attempt, with the epochs logged before kept.
    let v = show(&store, &long);
    assert!(v["attempts"].as_array().unwrap().len() >= 2, "{}", v["attempts"]);
    let out = stop(run);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
}

/// A run with nothing to do ends at once, however early it stops serving reads (it used to wait
/// forever when it stopped before its server had made the socket).
#[test]
fn a_run_with_nothing_to_do_ends_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("done.yaml");
    std::fs::write(
        &file,
        "name: done\ndefaults:\n  data: {name: two_moons, n_train: 64, n_val: 16, n_test: 16}\n  task: noop\nstages:\n  a:\n    seeds: 2\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    for i in 0..15 {
        let mut child = cmd(&store).arg("run").arg(&file).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("run {i} of an experiment whose jobs are done did not end");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(child.wait().unwrap().success(), "run {i}");
    }
    assert!(!store.join("xlab.sock").exists());
}
