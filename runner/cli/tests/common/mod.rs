//! What the integration tests share: the built `xlab`, a command on a store, the setup's Python,
//! the files under a folder, a command's output as text, waiting for a condition and writing a
//! test's files.

#![allow(dead_code)] // each test file uses some of these

pub mod browser;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A command's output as text.
pub fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// Waits (polling every 20 ms) until `ready`, failing the test after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "no {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `text` to `dir/name` and returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    file
}

pub fn xlab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab"))
}

/// `xlab --store STORE`, with the workspace's worker and only its own plugins.
pub fn cmd(store: &Path) -> Command {
    let mut c = Command::new(xlab());
    c.arg("--store").arg(store).env("XLAB_WORKER", xlab().with_file_name("xlab-worker")).env_remove("XLAB_PLUGIN_PATH");
    c
}

/// The Python with torch that `make setup` installs (or `XLAB_PYTHON`).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("XLAB_PYTHON") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run `make setup`", p.display());
    p
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

pub fn job_ids(store: &Path, file: &Path) -> Vec<String> {
    let out = cmd(store).arg("plan").arg(file).output().unwrap();
    let plan = String::from_utf8_lossy(&out.stdout).into_owned();
    plan.lines().filter(|l| l.starts_with("    ")).map(|l| l.split_whitespace().next().unwrap().to_string()).collect()
}

/// The ids of one stage's jobs, as `xlab plan` lists them.
pub fn stage_job_ids(store: &Path, file: &Path, stage: &str) -> Vec<String> {
    let out = cmd(store).arg("plan").arg(file).output().unwrap();
    let plan = String::from_utf8_lossy(&out.stdout).into_owned();
    plan.lines()
        .skip_while(|l| !l.contains(&format!("stage `{stage}`")))
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

/// Every job's record (status and final metrics) and metric series, as stored.
pub fn snapshot(store: &Path, ids: &[String]) -> Vec<serde_json::Value> {
    ids.iter()
        .map(|id| {
            let out = cmd(store).args(["show", id, "--json"]).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            // Wall-clock timings (`time.*`) are the only values two runs do not share.
            let measured = |m: &serde_json::Value| {
                let mut m = m.clone();
                m.as_object_mut().unwrap().retain(|k, _| !k.starts_with("time."));
                m
            };
            serde_json::json!({"id": id, "status": v["status"], "summary": measured(&v["summary"]), "metrics": measured(&v["metrics"])})
        })
        .collect()
}

pub fn attempts(store: &Path, id: &str) -> Vec<String> {
    let out = cmd(store).args(["show", id, "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["attempts"].as_array().unwrap().iter().map(|a| a["outcome"].as_str().unwrap_or("").to_string()).collect()
}

/// The SHA-256 of each job's final weights file.
pub fn weights(store: &Path, ids: &[String]) -> Vec<String> {
    use sha2::Digest;
    ids.iter()
        .map(|id| {
            hex::encode(sha2::Sha256::digest(
                std::fs::read(store.join("runs").join(id).join("weights.safetensors")).unwrap(),
            ))
        })
        .collect()
}

/// A test that cannot run here (a real component is missing) says why, and leaves a note in
/// `target/tmp/skipped/` that `make test` lists on its summary line: a skip is never silent.
#[allow(dead_code)]
pub fn skipped(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(test), why);
}
