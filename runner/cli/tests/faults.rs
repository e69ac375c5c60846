//! Fault injection: `xlab run` killed with SIGKILL at random moments, again and again, then run
//! to the end, leaves exactly the store an uninterrupted run leaves: the same jobs, the same
//! final metrics, every metric series complete, nothing duplicated. Likewise for a worker killed
//! mid-job. Real coordinator and worker processes, a real sled store.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{attempts, cmd, job_ids, snapshot, weights};

const SWEEP: &str = r#"
name: faults
defaults:
  task: train
  data: {name: spurious, n_train: 1024, n_val: 0, n_test: 256}
  model: {name: mlp, hidden: [16]}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  epochs: 8
  batch_size: 32
stages:
  erm:
    grid: {optimizer.lr: [0.02, 0.05]}
    seeds: 2
  sam:
    step_rule: {use: sam.sam, rho: 0.05}
    objective: {use: dro.group_dro}
"#;

/// The checkpoint files in a store's run folders.
fn checkpoints(store: &Path) -> std::collections::BTreeSet<PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    for run in std::fs::read_dir(store.join("runs")).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(run.path()).into_iter().flatten().flatten() {
            if f.file_name().to_string_lossy().ends_with(".json")
                && f.file_name().to_string_lossy().starts_with("ckpt-")
            {
                out.insert(f.path());
            }
        }
    }
    out
}

fn run_to_end(store: &Path, file: &Path) {
    let out = cmd(store).arg("run").arg(file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// xorshift, for reproducible "random" kill times.
fn delays(mut s: u64, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            Duration::from_millis(s % 400)
        })
        .collect()
}

#[test]
fn killing_the_coordinator_at_random_moments_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("faults.yaml");
    std::fs::write(&file, SWEEP).unwrap();
    let reference = dir.path().join("reference");
    run_to_end(&reference, &file);
    let ids = job_ids(&reference, &file);
    assert_eq!(ids.len(), 5);
    let expected = snapshot(&reference, &ids);

    let faulty = dir.path().join("faulty");
    // Each round waits until a new checkpoint shows that jobs are training (however slow the
    // machine), then kills the coordinator after a random delay.
    for delay in delays(0x9E3779B97F4A7C15, 6) {
        let before = checkpoints(&faulty);
        let mut run = cmd(&faulty).arg("run").arg(&file).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while checkpoints(&faulty) == before
            && run.try_wait().unwrap().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(delay);
        let _ = run.kill();
        let _ = run.wait();
    }
    run_to_end(&faulty, &file);
    let got = snapshot(&faulty, &ids);
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g["status"], "done", "{}", g["id"]);
        assert_eq!(g["summary"], e["summary"], "job {}: final metrics differ", g["id"]);
        assert_eq!(g["metrics"], e["metrics"], "job {}: metric series differ", g["id"]);
        assert_eq!(g["metrics"]["train.loss"].as_array().unwrap().len(), 8, "one point per epoch, no duplicates");
    }
    // The kills really cut jobs short: some attempts were interrupted, yet nothing differs.
    let interrupted: usize = ids
        .iter()
        .map(|id| {
            let v: serde_json::Value =
                serde_json::from_slice(&cmd(&faulty).args(["show", id, "--json"]).output().unwrap().stdout).unwrap();
            v["attempts"].as_array().unwrap().iter().filter(|a| a["outcome"] == "interrupted").count()
        })
        .sum();
    assert!(interrupted >= 1, "no attempt was interrupted; the kills came too late");
    // Nothing is left to run.
    let out = cmd(&faulty).arg("plan").arg(&file).output().unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("stage `erm`: 4 job(s) over optimizer.lr: 4 done")
            && plan.contains("stage `sam`: 1 job(s): 1 done"),
        "{plan}"
    );
}

#[test]
fn a_killed_worker_fails_its_job_as_crashed_and_the_rerun_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("faults.yaml");
    std::fs::write(&file, SWEEP.replace("epochs: 8", "epochs: 40")).unwrap();
    let store = dir.path().join("results");
    let run = cmd(&store)
        .arg("run")
        .arg(&file)
        .arg("-j")
        .arg("1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first job's second checkpoint, then kill its worker.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let victim = loop {
        assert!(std::time::Instant::now() < deadline, "no worker reached its second checkpoint");
        let found = std::fs::read_dir(store.join("runs")).ok().and_then(|rd| {
            rd.filter_map(|e| e.ok()).find(|e| e.path().join("ckpt-000002.json").exists()).map(|e| e.path())
        });
        if let Some(run_dir) = found {
            break run_dir;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let job = victim.file_name().unwrap().to_string_lossy().into_owned();
    // The worker running a job writes its pid into the job's lock file.
    let pid: u32 = std::fs::read_to_string(victim.join("worker.lock")).unwrap().trim().parse().unwrap();
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let out = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("FAILED (crashed)") && err.contains("killed by signal 9"), "{err}");

    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed") && err.contains("from its checkpoint after epoch"), "{err}");
    let out = cmd(&store).args(["show", &job, "--json"]).output().unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["status"], "done");
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["outcome"], "crashed");
    assert_eq!(attempts[1]["outcome"], "done");
    assert_eq!(rec["metrics"]["train.loss"].as_array().unwrap().len(), 40);
}

/// A stage that trains long enough to be stopped, timed out or interrupted mid-run.
const LONG: &str = r#"
name: long
defaults:
  task: train
  data: {name: blobs, n_train: 8192, n_val: 0, n_test: 128, dim: 32}
  model: {name: mlp, hidden: [128, 128]}
  optimizer: {name: sgd, lr: 0.001}
  epochs: EPOCHS
  batch_size: 32
stages:
  train:
    seeds: 2
    STAGE_EXTRA
"#;

fn long_file(dir: &Path, epochs: u32, extra: &str) -> PathBuf {
    let f = dir.join("long.yaml");
    std::fs::write(&f, LONG.replace("EPOCHS", &epochs.to_string()).replace("STAGE_EXTRA", extra)).unwrap();
    f
}

fn send(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

fn wait_for_checkpoint(store: &Path) {
    wait_for_checkpoints_of(store, 1);
}

/// Waits until `jobs` jobs each have a checkpoint.
fn wait_for_checkpoints_of(store: &Path, jobs: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let with = || {
        checkpoints(store)
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    while with() < jobs {
        assert!(std::time::Instant::now() < deadline, "not {jobs} job(s) with a checkpoint within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With `deterministic: true`, a sweep stopped by Ctrl-C and resumed (on slots of one thread)
/// ends with the same metrics and bit-identical final weights as an uninterrupted run (on a
/// slot of two threads).
#[test]
fn ctrl_c_stops_at_a_checkpoint_and_the_rerun_finishes_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let file = long_file(dir.path(), 6, "deterministic: true");
    let reference = dir.path().join("reference");
    let out = cmd(&reference).args(["run", "-j", "1", "--threads", "2"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let store = dir.path().join("results");
    let child =
        cmd(&store).args(["run", "-j", "2"]).arg(&file).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    wait_for_checkpoint(&store);
    send(child.id(), "-INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("stopped after epoch") && err.contains("Run the same command again to resume"), "{err}");
    let ids = job_ids(&store, &file);
    for id in &ids {
        assert_eq!(attempts(&store, id), ["cancelled"], "each worker stopped itself at a checkpoint");
    }
    let plan = cmd(&store).arg("plan").arg(&file).output().unwrap();
    assert!(String::from_utf8_lossy(&plan.stdout).contains("2 interrupted"));

    let again = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && err.matches("from its checkpoint after epoch").count() == 2, "{err}");
    assert_eq!(snapshot(&store, &ids), snapshot(&reference, &ids), "the resumed results equal an uninterrupted run");
    assert_eq!(weights(&store, &ids), weights(&reference, &ids), "and so do the final weights, bit for bit");
    let show: serde_json::Value =
        serde_json::from_slice(&cmd(&reference).args(["show", &ids[0], "--json"]).output().unwrap().stdout).unwrap();
    assert_eq!(show["provenance"]["threads"], 1, "a deterministic job runs on one thread");
}

#[test]
fn a_second_ctrl_c_kills_the_workers_and_keeps_the_jobs_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let file = long_file(dir.path(), 40, "");
    let store = dir.path().join("results");
    let child =
        cmd(&store).args(["run", "-j", "2"]).arg(&file).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    wait_for_checkpoint(&store);
    send(child.id(), "-INT");
    std::thread::sleep(Duration::from_millis(10));
    send(child.id(), "-INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    // Workers that have not reached their epoch end 10 ms later are killed (in practice both).
    assert!(err.contains("killing ") && err.contains(" running worker(s)"), "{err}");
    for id in job_ids(&store, &file) {
        let a = attempts(&store, &id);
        assert!(a == ["interrupted"] || a == ["cancelled"], "{id}: {a:?}");
    }
}

#[test]
fn a_job_past_its_timeout_is_killed_and_retried_then_fails_as_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let file = long_file(dir.path(), 500, "timeout: 1s\n    retries: 1");
    let store = dir.path().join("results");
    let out = cmd(&store).args(["run", "-j", "2"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("failed (timeout): ran past its timeout of 1 s and was killed; trying again in 1 s").count(),
        2,
        "{err}"
    );
    for id in job_ids(&store, &file) {
        assert_eq!(attempts(&store, &id), ["timeout", "timeout"], "one retry, then failed");
    }
}

#[test]
fn fail_fast_stops_starting_jobs_after_a_deterministic_failure() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ff.yaml");
    std::fs::write(
        &file,
        "name: ff\ndefaults:\n  task: train\n  data: {name: two_moons, n_train: 256, n_test: 64}\n  model: {name: mlp, hidden: [8]}\n  epochs: 2\nstages:\n  train:\n    fail_fast: true\n    grid: {optimizer: [{name: sgd, lr: 1.0e+30}, {name: sgd, lr: 0.1}, {name: sgd, lr: 0.01}]}\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).args(["run", "-j", "1"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("FAILED (diverged)") && err.contains("fail_fast: job"), "{err}");
    assert!(err.contains("0 job(s) stopped (each resumes from its last checkpoint), 2 not started"), "{err}");
}

#[test]
fn status_follows_a_run_in_progress_and_reads_the_store_after() {
    let dir = tempfile::tempdir().unwrap();
    let file = long_file(dir.path(), 40, "");
    let store = dir.path().join("results");
    let child =
        cmd(&store).args(["run", "-j", "1"]).arg(&file).stderr(Stdio::null()).stdout(Stdio::null()).spawn().unwrap();
    wait_for_checkpoint(&store);
    std::thread::sleep(Duration::from_millis(600));
    let live = cmd(&store).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&live.stdout).into_owned();
    assert!(live.status.success(), "{}", String::from_utf8_lossy(&live.stderr));
    assert!(text.starts_with("running (updated"), "{text}");
    assert!(text.contains("experiment `long`: 0 done, 1 running, 1 queued, 0 failed of 2"), "{text}");
    assert!(text.contains("train seed=0 on cpu") && text.contains("/40") && text.contains("train.loss="), "{text}");
    send(child.id(), "-INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let after = cmd(&store).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&after.stdout).into_owned();
    assert!(
        text.contains("experiment `long` (no run in progress)")
            && text.contains("stage `train`: 1 interrupted, 1 pending"),
        "{text}"
    );
}

/// Each failure class, from `task: noop` jobs that fail on purpose: a crash (SIGABRT), running
/// out of memory (retried once), divergence, a worker error and a timeout, beside jobs that
/// succeed. Each is recorded with its cause, and the sweep goes on.
#[test]
fn every_failure_class_is_recorded_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("noop.yaml");
    std::fs::write(
        &file,
        "name: noop\ndefaults:\n  task: noop\n  data: {name: two_moons}\nstages:\n  ok: {noop: {sleep_s: 0.1}, seeds: 2}\n  crash: {noop: {fail: crash}}\n  oom: {noop: {fail: out_of_memory}, retries: 1}\n  diverge: {noop: {fail: diverge}}\n  error: {noop: {fail: error}}\n  slow: {noop: {sleep_s: 30}, timeout: 1}\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2 done, 0 skipped (already done), 5 failed"), "{err}");
    let ids = job_ids(&store, &file);
    let outcomes: Vec<Vec<String>> = ids.iter().map(|id| attempts(&store, id)).collect();
    assert_eq!(
        outcomes,
        [
            vec!["done"],
            vec!["done"],
            vec!["crashed"],
            vec!["out_of_memory", "out_of_memory"],
            vec!["diverged"],
            vec!["error"],
            vec!["timeout"]
        ]
    );
    assert!(err.contains("worker killed by signal 6"), "{err}");
}

/// Ready jobs start by stage priority, then stage order; `max_parallel` caps a stage.
#[test]
fn priority_orders_ready_jobs_and_max_parallel_caps_a_stage() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prio.yaml");
    std::fs::write(
        &file,
        "name: prio\ndefaults:\n  task: noop\n  data: {name: two_moons}\n  noop: {sleep_s: 0.2}\nstages:\n  low: {seeds: 2}\n  high: {seeds: 2, priority: 5, noop: {sleep_s: 0.21}}\n  capped: {seeds: 3, max_parallel: 1, priority: -1, noop: {sleep_s: 0.22}}\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).args(["run", "-j", "1"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let started: Vec<&str> =
        err.lines().filter_map(|l| l.split("started ").nth(1)).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(started, ["high", "high", "low", "low", "capped", "capped", "capped"], "{err}");

    // With 3 slots, the capped stage still runs one job at a time: each of its starts follows
    // the end of the one before.
    let store = dir.path().join("results-3");
    let out = cmd(&store).args(["run", "-j", "3"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert_eq!(most_at_once(&err, "started capped", "done capped"), 1, "two capped jobs at once:\n{err}");
}

/// The most jobs running at once in a run's log: lines with `started` begin one, lines with
/// `done` end one.
fn most_at_once(log: &str, started: &str, done: &str) -> i32 {
    let (mut now, mut most) = (0, 0);
    for l in log.lines() {
        if l.contains(started) {
            now += 1;
            most = most.max(now);
        } else if l.contains(done) {
            now -= 1;
        }
    }
    most
}

/// `max_parallel:` at the top of a file caps the whole run, and `--max-parallel` overrides it.
#[test]
fn max_parallel_caps_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cap.yaml");
    let text = "name: cap\nmax_parallel: 1\ndefaults:\n  task: noop\n  data: {name: two_moons}\n  noop: {sleep_s: 0.2}\nstages:\n  a: {seeds: 2}\n  b: {seeds: 2, noop: {sleep_s: 0.21}}\n";
    std::fs::write(&file, text).unwrap();
    let most_at_once = |store: &str, args: &[&str]| {
        let out = cmd(&dir.path().join(store)).args(["run", "-j", "2"]).args(args).arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        most_at_once(&err, " started ", "] done ")
    };
    assert_eq!(most_at_once("file-cap", &[]), 1);
    assert_eq!(most_at_once("flag-cap", &["--max-parallel", "2"]), 2);
}

/// `resources: {slots: 2}` takes two slots of one device: the job runs alone on a 2-slot pool,
/// with the threads of both; a stage that asks for more than the pool has is refused before
/// anything runs.
#[test]
fn a_job_takes_the_slots_its_stage_asks_for() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("res.yaml");
    let text = "name: res\ndefaults:\n  task: noop\n  data: {name: two_moons}\n  noop: {sleep_s: 0.3}\nstages:\n  small: {seeds: 3}\n  big: {seeds: 2, noop: {sleep_s: 0.31}, resources: {slots: 2, device: cpu}}\n";
    std::fs::write(&file, text).unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).args(["run", "-j", "2", "--threads", "1"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    // While a big job runs, nothing else does.
    let (mut small, mut big) = (0i32, 0i32);
    for l in err.lines() {
        if l.contains("started small") {
            small += 1;
        } else if l.contains("done small") {
            small -= 1;
        } else if l.contains("started big") {
            big += 1;
        } else if l.contains("done big") {
            big -= 1;
        }
        assert!(big == 0 || (big == 1 && small == 0), "a big job shares the pool:\n{err}");
    }
    let ids = job_ids(&store, &file);
    let threads: Vec<u64> = ids
        .iter()
        .map(|id| {
            let v: serde_json::Value =
                serde_json::from_slice(&cmd(&store).args(["show", id, "--json"]).output().unwrap().stdout).unwrap();
            v["provenance"]["threads"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(threads, [1, 1, 1, 2, 2], "the big jobs get both slots' threads");

    // More slots than a device has, or a GPU on a CPU-only pool: refused, nothing runs.
    for (resources, says) in [
        ("{slots: 3}", "stage `big` asks for 3 slot(s) of any device (`resources:`), but the pool (2 × cpu) has at most 2 per device"),
        ("{device: cuda}", "stage `big` asks for 1 slot(s) of a GPU (`resources:`), but the pool (2 × cpu) has none"),
        ("{gpus: 1}", "stage `big` asks for 1 whole GPU(s) (`resources:`), but the pool (2 × cpu) has 0 GPU(s)"),
    ] {
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, text.replace("{slots: 2, device: cpu}", resources)).unwrap();
        let store = dir.path().join("refused");
        let out = cmd(&store).args(["run", "-j", "2", "--devices", "cpu"]).arg(&bad).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says) && err.contains("hint: run with more `--jobs-per-device`"), "{err}");
        assert!(!store.exists(), "nothing ran");
    }

    // Memory estimates: two jobs that each need 60% of the machine's memory never run together
    // on its 2 CPU slots; one that needs more than it has is refused.
    let total_gb = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1024.0
        / 1024.0;
    let mem = dir.path().join("mem.yaml");
    let text = format!("name: mem\ndefaults:\n  task: noop\n  data: {{name: two_moons}}\n  noop: {{sleep_s: 0.3}}\nstages:\n  big: {{seeds: 3, resources: {{memory_gb: {:.1}}}}}\n", total_gb * 0.6);
    std::fs::write(&mem, &text).unwrap();
    let store = dir.path().join("mem-results");
    let out = cmd(&store).args(["run", "-j", "2", "--devices", "cpu"]).arg(&mem).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert_eq!(most_at_once(&err, "started big", "done big"), 1, "two 60% jobs at once:\n{err}");
    std::fs::write(&mem, text.replace("memory_gb: ", "memory_gb: 1000")).unwrap();
    let out = cmd(&dir.path().join("mem-refused")).args(["run", "--devices", "cpu"]).arg(&mem).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("(`resources:`), but the pool (2 × cpu) has no device with 1")
            && err.contains("GB of memory (cpu "),
        "{err}"
    );
}

/// `checkpoint: {every_minutes: M}` checkpoints at the end of an epoch once M minutes have
/// passed since the last checkpoint; alone, it leaves epochs without one until then.
#[test]
fn checkpoints_follow_the_time_cadence() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = |policy: &str| {
        // The cadence is not part of the identity: each run gets its own store.
        let store = dir.path().join(format!("results-{}", policy.len()));
        let file = dir.path().join("ckpt.yaml");
        std::fs::write(
            &file,
            format!("name: ckpt\ndefaults:\n  task: train\n  data: {{name: two_moons, n_train: 256, n_val: 0, n_test: 64}}\n  model: {{name: mlp, hidden: [8]}}\n  optimizer: {{name: sgd}}\n  epochs: 4\nstages:\n  a: {{checkpoint: {policy}}}\n"),
        )
        .unwrap();
        let out = cmd(&store).arg("run").arg(&file).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id = job_ids(&store, &file).remove(0);
        checkpoint_files(&store, &id).into_iter().filter(|n| n.ends_with(".json")).collect::<Vec<_>>()
    };
    // An hour never passes: only the final epoch's checkpoint.
    assert_eq!(checkpoints("{every_minutes: 60}"), ["ckpt-000004.json"]);
    // A millisecond always does, so every epoch checkpoints though `every_epochs` says 100
    // (the newest two are kept).
    assert_eq!(checkpoints("{every_epochs: 100, every_minutes: 0.00001}"), ["ckpt-000003.json", "ckpt-000004.json"]);
    assert_eq!(checkpoints("{every_epochs: 2}"), ["ckpt-000002.json", "ckpt-000004.json"]);
}

/// A job's checkpoint files and leftover temporary files, by name, sorted.
fn checkpoint_files(store: &Path, id: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.join("runs").join(id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt-") || n.ends_with(".tmp"))
        .collect();
    names.sort();
    names
}

/// `xlab gc` refuses a store in use; removes a done job's checkpoints (its weights stay, and
/// the sweep stays done); keeps an interrupted job's newest checkpoint, which the rerun resumes
/// from; removes leftovers of killed writes; `--dry-run` removes nothing.
#[test]
fn gc_removes_the_checkpoints_no_job_needs() {
    let dir = tempfile::tempdir().unwrap();
    let file = long_file(dir.path(), 40, "");
    let store = dir.path().join("results");
    let ids = job_ids(&store, &file);
    let child =
        cmd(&store).args(["run", "-j", "2"]).arg(&file).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    wait_for_checkpoint(&store);
    let busy = cmd(&store).arg("gc").output().unwrap();
    assert_eq!(busy.status.code(), Some(3), "{}", String::from_utf8_lossy(&busy.stderr));
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use by pid"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    // Let each job write at least two checkpoints, then stop the run at the next one.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ids.iter().any(|id| checkpoint_files(&store, id).len() < 4) {
        assert!(std::time::Instant::now() < deadline, "no second checkpoint within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    send(child.id(), "-INT");
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(130));
    let stray = store.join("runs").join(&ids[0]).join("ckpt-000099.safetensors.tmp");
    std::fs::write(&stray, b"half a checkpoint").unwrap();

    let dry = cmd(&store).args(["gc", "--dry-run"]).output().unwrap();
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(
        text.contains("would remove 5 file(s)") && text.contains("2 unfinished job(s) keep their newest"),
        "{text}"
    );
    assert_eq!(checkpoint_files(&store, &ids[0]).len(), 5, "a dry run removes nothing");

    let out = cmd(&store).arg("gc").output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed 5 file(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for id in &ids {
        let left = checkpoint_files(&store, id);
        assert_eq!(left.len(), 2, "the newest checkpoint, json and tensors: {left:?}");
    }
    let again = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && err.matches("from its checkpoint after epoch").count() == 2, "{err}");

    let keep = cmd(&store).args(["gc", "--keep-last", "--dry-run"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&keep.stdout).contains("would remove 4 file(s)"),
        "{}",
        String::from_utf8_lossy(&keep.stdout)
    );
    // Done: the checkpoints go (the newest two of each job), the weights and the results stay.
    let out = cmd(&store).args(["gc", "-e", "long"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed 8 file(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for id in &ids {
        assert!(checkpoint_files(&store, id).is_empty());
        assert!(store.join("runs").join(id).join("weights.safetensors").exists());
        let v: serde_json::Value =
            serde_json::from_slice(&cmd(&store).args(["show", id, "--json"]).output().unwrap().stdout).unwrap();
        let names: Vec<&str> = v["artifacts"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
        assert!(!names.contains(&"checkpoint") && names.contains(&"weights"), "{names:?}");
    }
    let rerun = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(
        String::from_utf8_lossy(&rerun.stderr).contains("0 done, 2 skipped"),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    let unknown = cmd(&store).args(["gc", "-e", "lng"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

/// `checkpoint: {every_steps: N}` checkpoints inside epochs; Ctrl-C stops at the next such step,
/// and the rerun resumes in the middle of the epoch (its order, statistics, plugin and random
/// state) and ends with an uninterrupted run's metrics and final weights, bit for bit.
#[test]
fn a_run_stopped_inside_an_epoch_resumes_there() {
    let dir = tempfile::tempdir().unwrap();
    // 256 batches an epoch, a checkpoint every 10 steps of the run: a stop request lands inside
    // an epoch unless it comes in an epoch's last 6 batches.
    let extra = "checkpoint: {every_steps: 10}\n    data: {name: spurious, n_train: 8192, n_val: 0, n_test: 128}\n    batch_transform: {use: mixup.mixup, alpha: 0.4}\n    objective: {use: dro.group_dro}";
    let file = long_file(dir.path(), 3, extra);
    let reference = dir.path().join("reference");
    let out = cmd(&reference).arg("run").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let store = dir.path().join("results");
    let ids = job_ids(&store, &file);
    let child =
        cmd(&store).args(["run", "-j", "2"]).arg(&file).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let first = store.join("runs").join(&ids[0]).join("ckpt-000000-s00000030.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !first.exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint inside the first epoch within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    send(child.id(), "-INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("stopped in epoch ") && err.contains(" batches, at a checkpoint"), "{err}");
    // (A job whose worker was still starting stops without a checkpoint.)
    let kinds: Vec<String> = ids
        .iter()
        .filter_map(|id| {
            let show: serde_json::Value =
                serde_json::from_slice(&cmd(&store).args(["show", id, "--json"]).output().unwrap().stdout).unwrap();
            show["artifacts"][0]["kind"].as_str().map(str::to_string)
        })
        .collect();
    assert!(kinds.iter().any(|k| k.starts_with("checkpoint in epoch ") && k.ends_with("0 batches")), "{kinds:?}");

    let again = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("from its checkpoint in epoch ") && err.contains("0 batches"), "{err}");
    assert_eq!(snapshot(&store, &ids), snapshot(&reference, &ids), "the resumed results equal an uninterrupted run");
    assert_eq!(weights(&store, &ids), weights(&reference, &ids), "and so do the final weights, bit for bit");
}

/// `xlab resume NAME` runs a stored experiment again as it last ran, from the text kept in the
/// store, even after its file was edited or removed.
#[test]
fn resume_by_name_finishes_a_stopped_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let file = long_file(dir.path(), 6, "");
    let store = dir.path().join("results");
    let ids = job_ids(&store, &file);
    let child =
        cmd(&store).args(["run", "-j", "2"]).arg(&file).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    // Both jobs, each from its checkpoint (a worker still starting when Ctrl-C comes has none).
    wait_for_checkpoints_of(&store, 2);
    send(child.id(), "-INT");
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(130));
    // The file now says something else; `resume` runs what ran.
    std::fs::write(&file, "name: long\nstages: {}\n").unwrap();
    let out = cmd(&store).args(["resume", "long"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("changed since `long` last ran; resuming the experiment as it was then"), "{err}");
    assert!(err.matches("from its checkpoint after epoch").count() == 2, "{err}");
    for id in &ids {
        assert_eq!(attempts(&store, id).last().map(String::as_str), Some("done"));
    }
    let out = cmd(&store).args(["resume", "lnog"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no experiment `lnog`")
            && String::from_utf8_lossy(&out.stderr).contains("did you mean `long`?")
    );
}
