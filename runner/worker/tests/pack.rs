//! `xlab-worker pack`, the supervisor of a Slurm allocation that runs several jobs, run here
//! without Slurm: its lanes, the note it leaves of how each worker ended, a kill request for one
//! job that leaves the others alone, and a SIGTERM that stops the running jobs at a checkpoint
//! and starts none of the rest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use xlab_proto::pack::{kill_request, PackExit};
use xlab_proto::Event;

mod common;

fn worker() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab-worker"))
}

/// A small training job of `epochs` epochs in `dir/<name>`, and its line of the task list.
fn job(dir: &Path, name: &str, epochs: u32) -> (PathBuf, String) {
    let run_dir = dir.join(name);
    std::fs::create_dir_all(&run_dir).unwrap();
    let config = serde_json::json!({
        "task": "train",
        "data": {"name": "spurious", "n_train": 4096, "n_val": 0, "n_test": 256, "correlation": 0.9, "eval_correlation": 0.5,
                 "core_noise": 1.0, "spurious_noise": 0.1, "noise_dims": 0, "seed": 0},
        "model": {"name": "mlp", "hidden": [16], "activation": "relu", "norm": "none"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "nesterov": false},
        "epochs": epochs,
        "batch_size": 32,
    });
    let req = common::cpu_request(run_dir.clone(), "pack", "train", name, 0, config);
    let request = run_dir.join("job.json");
    std::fs::write(&request, serde_json::to_vec(&req).unwrap()).unwrap();
    let events = run_dir.join("events-1.jsonl");
    let line = format!("{}\t{}\t{}\n", request.display(), events.display(), run_dir.join("worker.log").display());
    (events, line)
}

fn events(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| Event::from_line(l).unwrap()).collect()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pack(list: &Path, count: usize, at_once: usize) -> Command {
    let mut c = Command::new(worker());
    c.arg("pack").arg("--tasks").arg(list).args(["--first", "0", "--count", &count.to_string()]);
    c.args(["--at-once", &at_once.to_string()]).env("OMP_NUM_THREADS", "1");
    c
}

#[test]
fn a_pack_runs_its_jobs_in_lanes_and_kills_only_the_one_asked() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Vec<(PathBuf, String)> =
        ["a", "b", "c"].iter().map(|n| job(dir.path(), n, if *n == "a" { 400 } else { 2 })).collect();
    let list = dir.path().join("pack.tasks");
    std::fs::write(&list, jobs.iter().map(|(_, l)| l.as_str()).collect::<String>()).unwrap();
    let mut child = pack(&list, 3, 2).spawn().unwrap();
    // Two lanes: `a` (long) and `b` start; `c` starts once `b` is done, while `a` still runs.
    let (a, b, c) = (&jobs[0].0, &jobs[1].0, &jobs[2].0);
    wait_for("c started after b ended", Duration::from_secs(60), || c.exists());
    assert!(PackExit::read(b).is_some(), "b ended before c started");
    assert!(PackExit::read(a).is_none(), "a still runs");
    std::fs::write(kill_request(a), b"").unwrap();
    assert!(child.wait().unwrap().success());
    let killed = PackExit::read(a).unwrap();
    assert_eq!(killed, PackExit { how: "was killed by signal 9 (SIGKILL)".into(), stopping: false });
    assert!(!events(a).iter().any(|e| matches!(e, Event::Finished { .. } | Event::Failed { .. })));
    for e in [b, c] {
        assert_eq!(PackExit::read(e).unwrap(), PackExit { how: "exited with status 0".into(), stopping: false });
        assert!(matches!(events(e).last(), Some(Event::Finished { .. })), "{:?}", events(e));
    }
}

#[test]
fn a_signalled_pack_stops_its_running_jobs_at_a_checkpoint_and_starts_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Vec<(PathBuf, String)> = ["a", "b", "c"].iter().map(|n| job(dir.path(), n, 400)).collect();
    let list = dir.path().join("pack.tasks");
    std::fs::write(&list, jobs.iter().map(|(_, l)| l.as_str()).collect::<String>()).unwrap();
    let mut child = pack(&list, 3, 2).spawn().unwrap();
    let checkpointed =
        |p: &Path| std::fs::read_to_string(p).unwrap_or_default().lines().any(|l| l.contains("\"checkpoint\""));
    wait_for("both lanes checkpointed", Duration::from_secs(60), || {
        checkpointed(&jobs[0].0) && checkpointed(&jobs[1].0)
    });
    // As `scancel --batch --signal=TERM` (or `--signal=B:TERM@T`) does: only the supervisor.
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    for (e, _) in &jobs[..2] {
        let note = PackExit::read(e).unwrap();
        assert!(note.stopping, "{note:?}");
        let evs = events(e);
        assert!(
            matches!(evs.last(), Some(Event::Failed { cause: xlab_proto::FailureCause::Cancelled, .. })),
            "stopped at a checkpoint, on its own: {:?}",
            evs.last()
        );
    }
    assert!(!jobs[2].0.exists(), "the third job never started");
    assert!(PackExit::read(&jobs[2].0).is_none());
}
