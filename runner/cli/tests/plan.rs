//! `xlab plan` output, pinned word for word: every shipped experiment against an empty store,
//! and an experiment against a store holding done, failed and interrupted jobs, before and after
//! the file gains seeds. The snapshots are insta's: `cargo insta review` (or `INSTA_UPDATE=always`)
//! accepts an intended change.

use std::path::{Path, PathBuf};
use std::process::Command;

fn xlab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cmd(store: &Path) -> Command {
    let mut c = Command::new(xlab());
    c.arg("--store")
        .arg(store)
        .current_dir(root())
        .env("XLAB_WORKER", xlab().with_file_name("xlab-worker"))
        .env("XLAB_NO_LIVE", "1")
        .env_remove("XLAB_PLUGIN_PATH");
    c
}

/// Compares `got` with the snapshot `tests/snapshots/plan/NAME.snap` (insta: `cargo insta
/// review`, or `INSTA_UPDATE=always`, accepts a change).
fn snapshot(name: &str, got: &str) {
    insta::with_settings!({snapshot_path => "snapshots/plan", prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!(name, got);
    });
}

fn plan(store: &Path, file: &Path) -> String {
    let out = cmd(store).arg("plan").arg(file).output().unwrap();
    assert!(out.status.success(), "{}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_shipped_experiment_plans_as_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for e in std::fs::read_dir(root().join("experiments")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            names.push(p.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        let got = plan(&dir.path().join("results"), Path::new(&format!("experiments/{name}.yaml")));
        snapshot(&name, &got);
    }
}

#[test]
fn the_plan_counts_what_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("states.yaml");
    let text = "name: states\ndefaults:\n  task: noop\n  data: {name: two_moons}\nstages:\n  work:\n    grid: {noop.fail: [none, error]}\n    seeds: SEEDS\n  after:\n    needs: work\n";
    std::fs::write(&file, text.replace("SEEDS", "1")).unwrap();
    let before = plan(&store, &file).replace(&file.display().to_string(), "states.yaml");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let after = plan(&store, &file).replace(&file.display().to_string(), "states.yaml");
    // Two more seeds: only their jobs are new.
    std::fs::write(&file, text.replace("SEEDS", "3")).unwrap();
    let more = plan(&store, &file).replace(&file.display().to_string(), "states.yaml");
    snapshot("states", &format!("# empty store\n{before}# after a run\n{after}# with seeds: 3\n{more}"));
}
