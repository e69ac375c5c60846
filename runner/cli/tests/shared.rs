//! Several experiments at once on one store and one device pool: a second `xlab run` on a store
//! that a run owns joins it. Its jobs take turns with the owner's on one pool (never more jobs
//! than slots), each run prints its own progress, Ctrl-C in one stops only its own jobs, `xlab
//! status` lists every run, the same file run twice runs each job once, and killing the owner
//! with SIGKILL at any moment loses nothing. Real coordinator and worker processes, a real sled
//! store.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{attempts, cmd, job_ids, snapshot, text, wait_for, weights, write_file};

/// A run started by a test, killed if the test ends first (a failed assertion).
struct Run(Option<Child>);

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Run {
    fn start(store: &Path, file: &Path) -> Run {
        Run(Some(
            cmd(store)
                .arg("run")
                .arg(file)
                .args(["-j", "2"])
                .env("XLAB_NO_LIVE", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child this test started and has not waited for.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    fn exited(&mut self) -> bool {
        self.0.as_mut().unwrap().try_wait().unwrap().is_some()
    }

    fn wait(mut self, limit: Duration) -> std::process::Output {
        let deadline = Instant::now() + limit;
        while !self.exited() {
            assert!(Instant::now() < deadline, "the run did not end within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

/// Jobs that each hold a slot for a while without training.
fn sleepers(name: &str, seeds: u32, sleep_s: f64) -> String {
    format!(
        "name: {name}\ndefaults:\n  data: {{name: two_moons, n_train: 64, n_val: 16, n_test: 16}}\nstages:\n  nap:\n    \
         task: noop\n    noop: {{sleep_s: {sleep_s}}}\n    seeds: {seeds}\n"
    )
}

/// Short deterministic training jobs (checkpointed every epoch).
fn trainers(name: &str, lr: f64, epochs: u32) -> String {
    format!(
        "name: {name}\ndefaults:\n  task: train\n  deterministic: true\n  data: {{name: two_moons, n_train: 4000, n_val: \
         200, n_test: 200}}\n  model: {{name: mlp, hidden: [32]}}\n  optimizer: {{name: sgd, lr: {lr}, momentum: 0.9}}\n  \
         batch_size: 32\n  epochs: {epochs}\nstages:\n  train:\n    seeds: 2\n"
    )
}

/// What each run's status file says is running: (experiment, jobs running).
fn running_now(store: &Path) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(store).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("status") && name.ends_with(".json")) {
            continue;
        }
        let Ok(v) =
            std::fs::read(e.path()).map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap_or_default())
        else {
            continue;
        };
        if v["finished"] == false {
            let n = v["running"].as_array().map_or(0, Vec::len);
            out.push((v["experiment"].as_str().unwrap_or("").to_string(), n));
        }
    }
    out
}

/// A second experiment joins the run that owns the store: both go on together on its two slots
/// and never more, `xlab status` lists both, each prints its own progress, and both end with all
/// their jobs done.
#[test]
fn a_second_experiment_joins_the_owners_pool_and_both_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    // Different naps: a job's identity is its config and seed, not its experiment's name.
    let a = write_file(dir.path(), "a.yaml", &sleepers("a", 5, 1.0));
    let b = write_file(dir.path(), "b.yaml", &sleepers("b", 4, 0.9));
    let mut owner = Run::start(&store, &a);
    wait_for("the owner's socket", Duration::from_secs(60), || store.join("xlab.sock").exists());
    let mut guest = Run::start(&store, &b);

    // Sample what runs: at most 2 jobs at once over both runs (a change of hands between the
    // two status files may show one job too many for a moment, never for 300 ms), and both runs
    // with jobs running at the same time at some point.
    let mut over_since: Option<Instant> = None;
    let mut together = false;
    let mut listed_both = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(owner.exited() && guest.exited()) {
        assert!(Instant::now() < deadline, "the two runs did not end");
        let now = running_now(&store);
        let total: usize = now.iter().map(|(_, n)| n).sum();
        if total > 2 {
            let since = *over_since.get_or_insert_with(Instant::now);
            assert!(since.elapsed() < Duration::from_millis(300), "more jobs than slots: {now:?}");
        } else {
            over_since = None;
        }
        together |= now.iter().filter(|(_, n)| *n > 0).count() == 2;
        if !listed_both && now.len() == 2 {
            let status = cmd(&store).arg("status").output().unwrap();
            let said = text(&status.stdout);
            listed_both = said.contains("2 runs in progress")
                && said.contains("experiment `a`")
                && said.contains("experiment `b`");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(together, "the joined run's jobs ran beside the owner's");
    assert!(listed_both, "`xlab status` listed both runs");
    let (a_out, b_out) = (owner.wait(Duration::from_secs(5)), guest.wait(Duration::from_secs(5)));
    assert!(a_out.status.success(), "{}", text(&a_out.stderr));
    assert!(b_out.status.success(), "{}", text(&b_out.stderr));
    let b_err = text(&b_out.stderr);
    assert!(b_err.contains("shared with the run(s) of `a`"), "{b_err}");
    assert!(b_err.contains("[4/4] done nap"), "the joined run prints its own progress: {b_err}");
    assert!(!b_err.contains("seed=4"), "and only its own jobs: {b_err}");
    assert!(text(&b_out.stdout).contains("experiment `b`"), "and its own table");
    for (file, n) in [(&a, 5), (&b, 4)] {
        let ids = job_ids(&store, file);
        assert_eq!(ids.len(), n);
        for id in &ids {
            assert_eq!(attempts(&store, id), ["done"], "{id}");
        }
    }
    assert!(!store.join("xlab.sock").exists(), "the owner let go of the store");
}

/// Ctrl-C in the joined run stops its own jobs (at a checkpoint) and none of the owner's; run
/// again, it resumes them. The same file run a second time while it runs waits for its jobs
/// instead of running them twice, and reports them.
#[test]
fn ctrl_c_stops_only_its_own_run_and_the_same_file_twice_runs_each_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let a = write_file(dir.path(), "a.yaml", &trainers("a", 0.05, 150));
    let b = write_file(dir.path(), "b.yaml", &trainers("b", 0.02, 150));
    let owner = Run::start(&store, &a);
    wait_for("the owner's socket", Duration::from_secs(60), || store.join("xlab.sock").exists());

    // The same file again: it holds none of the jobs and waits for all of them.
    let twin = Run::start(&store, &a);
    let guest = Run::start(&store, &b);
    wait_for("the joined run's jobs running", Duration::from_secs(60), || {
        running_now(&store).iter().any(|(e, n)| e == "b" && *n > 0)
    });
    guest.signal(libc::SIGINT);
    let b_out = guest.wait(Duration::from_secs(60));
    assert_eq!(b_out.status.code(), Some(130), "{}", text(&b_out.stderr));
    for id in job_ids(&store, &b) {
        let tried = attempts(&store, &id);
        assert!(tried.is_empty() || tried == ["cancelled"], "{id}: stopped at a checkpoint, {tried:?}");
    }

    let a_out = owner.wait(Duration::from_secs(120));
    assert!(a_out.status.success(), "the owner's jobs went on: {}", text(&a_out.stderr));
    let twin_out = twin.wait(Duration::from_secs(60));
    let twin_err = text(&twin_out.stderr);
    assert!(twin_out.status.success(), "{twin_err}");
    assert!(twin_err.contains("is running in another run on this store; waiting for it"), "{twin_err}");
    assert!(twin_err.contains("[2/2] done train"), "it reports the jobs it waited for: {twin_err}");
    assert!(twin_err.contains("2 done by another run on this store"), "{twin_err}");
    for id in job_ids(&store, &a) {
        assert_eq!(attempts(&store, &id), ["done"], "{id}: run once, by the owner");
    }

    // Run again (owning the store now), the stopped experiment resumes.
    let again = cmd(&store).arg("run").arg(&b).env("XLAB_NO_LIVE", "1").output().unwrap();
    let err = text(&again.stderr);
    assert!(again.status.success(), "{err}");
    for id in job_ids(&store, &b) {
        assert_eq!(attempts(&store, &id).last().map(String::as_str), Some("done"), "{id}");
    }
}

/// The owner is killed with SIGKILL at 20 random moments of a two-experiment run (the joined run
/// stops its workers and ends when it loses the owner); both commands run again each time. At
/// the end every job is done once, and every metric series and final weights equal those of an
/// uninterrupted run.
#[test]
fn the_owner_killed_at_random_moments_loses_nothing_of_either_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(dir.path(), "a.yaml", &trainers("a", 0.05, 400));
    let b = write_file(dir.path(), "b.yaml", &trainers("b", 0.02, 400));
    let reference = dir.path().join("reference");
    for f in [&a, &b] {
        let out = cmd(&reference).arg("run").arg(f).arg("-j2").env("XLAB_NO_LIVE", "1").output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    let store = dir.path().join("results");
    // A fixed seed: the moments differ from kill to kill, and from run to run of the test only
    // if this changes.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut kills = 0;
    let mut finished = false;
    while kills < 20 {
        let owner = Run::start(&store, &a);
        wait_for("the owner's socket", Duration::from_secs(60), || store.join("xlab.sock").exists());
        let guest = Run::start(&store, &b);
        let after = Duration::from_millis(300 + next() % 1500);
        std::thread::sleep(after);
        let lock: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.join("lock")).unwrap()).unwrap_or_default();
        let owner_pid = lock["pid"].as_u64().unwrap_or(0) as u32;
        let mut runs = [owner, guest];
        if runs.iter_mut().all(|r| r.exited()) {
            finished = true;
            break;
        }
        let Some(held) = runs.iter().find(|r| r.pid() == owner_pid) else {
            panic!("the store's lock names pid {owner_pid}, which is neither run");
        };
        held.signal(libc::SIGKILL);
        kills += 1;
        let [o, g] = runs;
        let _ = o.wait(Duration::from_secs(30));
        // The joined run ends by itself once its owner is gone.
        let g = g.wait(Duration::from_secs(30));
        assert!(
            g.status.code() != Some(0) || text(&g.stderr).contains("done"),
            "the joined run said what happened: {}",
            text(&g.stderr)
        );
    }
    assert!(kills >= 15, "the owner was killed {kills} times before the runs ended (finished: {finished})");
    // Run both to the end.
    for f in [&a, &b] {
        let out = cmd(&store).arg("run").arg(f).arg("-j2").env("XLAB_NO_LIVE", "1").output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    for f in [&a, &b] {
        let ids = job_ids(&store, f);
        for id in &ids {
            let tried = attempts(&store, id);
            assert_eq!(tried.iter().filter(|t| *t == "done").count(), 1, "{id}: done once ({tried:?})");
            assert_eq!(tried.last().map(String::as_str), Some("done"), "{id}: {tried:?}");
        }
        assert_eq!(snapshot(&store, &ids), snapshot(&reference, &ids), "every point as an uninterrupted run has it");
        assert_eq!(weights(&store, &ids), weights(&reference, &ids));
    }
}

/// A joined run killed with SIGKILL gives its slots back at once (the owner's remaining jobs run
/// on them); run again, its jobs resume.
#[test]
fn a_killed_joined_run_frees_its_slots_and_resumes_when_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let a = write_file(dir.path(), "a.yaml", &sleepers("a", 3, 2.0));
    let b = write_file(dir.path(), "b.yaml", &trainers("b", 0.02, 300));
    let b_ids = job_ids(&store, &b);
    let owner = Run::start(&store, &a);
    wait_for("the owner's socket", Duration::from_secs(60), || store.join("xlab.sock").exists());
    let guest = Run::start(&store, &b);
    wait_for("the joined run's jobs running", Duration::from_secs(60), || {
        running_now(&store).iter().any(|(e, n)| e == "b" && *n > 0)
    });
    // And their attempts in the store (a busy machine may show the one before the other).
    wait_for("an attempt of the joined run's in the store", Duration::from_secs(60), || {
        b_ids.iter().any(|id| {
            let out = cmd(&store).args(["show", id, "--json"]).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["attempts"].as_array().is_some_and(|a| !a.is_empty())
        })
    });
    guest.signal(libc::SIGKILL);
    let _ = guest.wait(Duration::from_secs(10));
    let out = owner.wait(Duration::from_secs(60));
    let err = text(&out.stderr);
    assert!(out.status.success(), "the owner went on: {err}");
    assert!(err.contains("the run of `b`") && err.contains("slot lease(s) are free again"), "{err}");
    for id in job_ids(&store, &a) {
        assert_eq!(attempts(&store, &id), ["done"], "{id}");
    }
    let again = cmd(&store).arg("run").arg(&b).env("XLAB_NO_LIVE", "1").output().unwrap();
    assert!(again.status.success(), "{}", text(&again.stderr));
    let mut resumed = 0;
    for id in job_ids(&store, &b) {
        let tried = attempts(&store, &id);
        assert_eq!(tried.last().map(String::as_str), Some("done"), "{id}: {tried:?}");
        resumed += usize::from(tried.first().map(String::as_str) == Some("interrupted"));
    }
    assert!(resumed >= 1, "the killed run's jobs were taken up again");
}
