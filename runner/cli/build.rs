//! Records the git commit xlab was built from, for every job's provenance: with uncommitted
//! changes to tracked files, `-dirty+` and the first 12 hex digits of the SHA-256 of
//! `git diff HEAD`, so two builds from different uncommitted states never look the same.

use sha2::{Digest, Sha256};

fn git(args: &[&str]) -> Option<Vec<u8>> {
    std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success()).map(|o| o.stdout)
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])
        .map(|o| String::from_utf8_lossy(&o).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = match git(&["diff", "HEAD", "--binary"]) {
        Some(diff) if !diff.is_empty() => format!("-dirty+{}", &hex::encode(Sha256::digest(&diff))[..12]),
        _ => String::new(),
    };
    println!("cargo:rustc-env=XLAB_GIT_COMMIT={commit}{dirty}");
    // A new commit appends to .git/logs/HEAD; staging changes the index; an edit changes a
    // source folder (cargo watches a folder's files recursively).
    for path in [
        "../../.git/logs/HEAD",
        "../../.git/HEAD",
        "../../.git/index",
        "../../runner",
        "../../plugins",
        "../../Cargo.toml",
        "../../Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
}
