//! A store on a disk that fills up: at the start of a run, in the middle of one (workers cannot
//! write checkpoints), and just before the final store flush (the coordinator cannot write the
//! job records). Each time xlab stops starting jobs, says what is full and how much it needs,
//! exits 3, and the same command finishes the sweep once there is room, with the metrics an
//! uninterrupted run records. The disk is a size-limited tmpfs the test mounts, so these tests
//! need root; elsewhere they say why they skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{attempts, cmd, job_ids, snapshot, text};

/// A 64 MiB tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small tmpfs to fill needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?)");
            return None;
        }
        Some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Writes a file of `bytes` zeros, or until the disk is full when `None`.
    fn fill(&self, bytes: Option<u64>) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.filler()).unwrap();
        let block = vec![0u8; 1 << 20];
        let mut left = bytes.unwrap_or(u64::MAX);
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            match f.write(&block[..n]) {
                Ok(0) | Err(_) => break,
                Ok(w) => left -= w as u64,
            }
        }
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(Instant::now() < deadline, "no {what} within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const TRAIN: &str = r#"
name: full
defaults:
  task: train
  data: {name: two_moons, n_train: 2048, n_val: 64, n_test: 128}
  model: {name: mlp, hidden: [512, 512]}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  epochs: 24
stages:
  train: {seeds: 4}
"#;

/// The disk is nearly full before the run: nothing starts, the message says what is full and
/// how much is needed, and the run goes through once there is room.
#[test]
fn a_full_disk_at_the_start_starts_nothing_and_says_what_it_needs() {
    let Some(disk) = SmallDisk::mount() else { return };
    let file = disk.path().join("full.yaml");
    std::fs::write(&file, TRAIN.replace("epochs: 24", "epochs: 2")).unwrap();
    disk.fill(Some(40 << 20));
    let store = disk.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).stdout(Stdio::null()).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains(&format!("the disk holding the store {} is full", store.display())), "{err}");
    assert!(err.contains("MiB free, and xlab needs 32.0 MiB to go on"), "{err}");
    assert!(err.contains("0 job(s) stopped") && err.contains("4 not started"), "{err}");
    assert!(!err.contains("build it with"), "{err}");
    disk.free();
    let out = cmd(&store).arg("run").arg(&file).stdout(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The disk fills while jobs train: their next checkpoint cannot be written, so they stop as
/// `interrupted` (resumable), no further job starts, and the rerun after freeing space ends with
/// every metric series an uninterrupted run has.
#[test]
fn a_disk_that_fills_mid_run_loses_nothing() {
    let Some(disk) = SmallDisk::mount() else { return };
    let file = disk.path().join("full.yaml");
    std::fs::write(&file, TRAIN).unwrap();
    let reference = tempfile::tempdir().unwrap();
    let out = cmd(reference.path()).arg("run").arg(&file).stdout(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let store = disk.path().join("results");
    let ids = job_ids(&store, &file);
    let run = cmd(&store).arg("run").arg(&file).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("first checkpoint", || ids.iter().any(|id| store.join("runs").join(id).join("ckpt-000001.json").exists()));
    disk.fill(None);
    let out = run.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("is full: ") && err.contains("starting no more jobs until there is room"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    // A store on a disk with no room at all cannot be opened (sled writes when it opens one):
    // even reading it waits for room.
    let out = cmd(&store).arg("query").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("the disk holding it is full"), "{}", text(&out.stderr));
    disk.free();
    // No job failed: each is `interrupted`, or still `running` with no outcome when the store
    // could not record even that (the next run takes it as interrupted); jobs that never
    // started have no record yet.
    let outcomes: Vec<Vec<String>> = ids
        .iter()
        .filter(|id| cmd(&store).args(["show", id]).output().unwrap().status.success())
        .map(|id| attempts(&store, id))
        .collect();
    assert!(outcomes.iter().any(|a| a == &["interrupted"] || a == &[""]), "{outcomes:?}\n{err}");
    assert!(
        outcomes.iter().flatten().all(|a| ["interrupted", "", "done"].contains(&a.as_str())),
        "{outcomes:?}\n{err}"
    );

    let out = cmd(&store).arg("run").arg(&file).stdout(Stdio::null()).output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("from its checkpoint after epoch"), "{err}");
    assert_eq!(
        snapshot(&store, &ids),
        snapshot(reference.path(), &ids),
        "the resumed results equal an uninterrupted run"
    );
}

/// The disk fills while the last jobs run and write nothing themselves: the coordinator cannot
/// write their final records. It keeps them queued, says how many could not be written, exits
/// 3, and the rerun records them.
#[test]
fn a_disk_that_fills_before_the_final_flush_loses_nothing() {
    let Some(disk) = SmallDisk::mount() else { return };
    let file = disk.path().join("wait.yaml");
    let body = "name: wait\ndefaults:\n  task: noop\n  data: {name: two_moons}\nstages:\n  wait: {noop: {sleep_s: 3}, seeds: 8}\n";
    std::fs::write(&file, body).unwrap();
    let store = disk.path().join("results");
    let ids = job_ids(&store, &file);
    // Eight at once, so that their final records take more than the database's last page.
    let run =
        cmd(&store).args(["run", "-j", "8"]).arg(&file).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("both workers", || ids.iter().all(|id| store.join("runs").join(id).join("progress").exists()));
    disk.fill(None);
    let out = run.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("could not be written") && err.contains("run the same command again"), "{err}");
    disk.free();
    let out = cmd(&store).arg("run").arg(&file).stdout(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for id in &ids {
        assert_eq!(attempts(&store, id).last().map(String::as_str), Some("done"));
    }
}
