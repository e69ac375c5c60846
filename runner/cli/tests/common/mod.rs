//! What the integration tests share: the built `xlab`, a command on a store, the setup's Python,
//! and the files under a folder.

#![allow(dead_code)] // each test file uses some of these

use std::path::{Path, PathBuf};
use std::process::Command;

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
