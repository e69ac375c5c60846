//! The plugin template builds outside the workspace, passes its own tests (the conformance kit
//! among them), loads through the real loader, and runs in an experiment: what the README's
//! "Write a plugin in ten minutes" promises a new author.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "target" {
                copy_dir(&e.path(), &target);
            }
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// As the README's "Write a plugin in ten minutes" says, outside any xlab checkout: copy the
/// template (with its Cargo.lock) to a folder elsewhere, rename the package, point it at the
/// SDK, set `LIBTORCH`, and `cargo build` and `cargo test` (whose binaries find libtorch through
/// the rpath the template's build.rs sets). Its own target folder, under xlab's (so a rerun is
/// quick), since xlab's `.cargo/config.toml` does not apply out there.
#[test]
fn a_plugin_built_from_the_template_loads_and_runs() {
    let root = repo();
    let outside = tempfile::tempdir().unwrap();
    assert!(!outside.path().starts_with(&root), "the copy must lie outside the checkout");
    let copy = outside.path().join("my-plugin");
    copy_dir(&root.join("templates/plugin"), &copy);
    assert!(copy.join("Cargo.lock").exists(), "the template ships its Cargo.lock");
    let manifest = std::fs::read_to_string(copy.join("Cargo.toml")).unwrap();
    let (api, host) = (root.join("runner/plugin-api"), root.join("runner/plugin-host"));
    let manifest = manifest
        .replace("name = \"xlab-plugin-focal\"", "name = \"xlab-template-check\"")
        .replace("path = \"../../runner/plugin-api\"", &format!("path = \"{}\"", api.display()))
        .replace("path = \"../../runner/plugin-host\"", &format!("path = \"{}\"", host.display()));
    std::fs::write(copy.join("Cargo.toml"), manifest).unwrap();
    let target = root.join("target/template-outside");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for step in ["build", "test"] {
        let out = Command::new(&cargo)
            .args([step, "--release", "--offline", "--target-dir"])
            .arg(&target)
            .current_dir(&copy)
            .env("LIBTORCH", root.join(".venv/torch"))
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .expect("cargo runs");
        let log = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "cargo {step} of the template outside the checkout failed:\n{log}");
        if step == "test" {
            assert!(log.contains("test passes_the_conformance_kit ... ok"), "{log}");
        }
    }

    let lib = target.join("release/libxlab_template_check.so");
    assert!(lib.exists(), "{}", lib.display());
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("focal.yaml");
    std::fs::write(
        &exp,
        format!(
            "name: focal\nplugins: [{}]\ndefaults:\n  task: train\n  data: {{name: two_moons, n_train: 256, n_val: 0, n_test: 128}}\n  model: {{name: mlp, hidden: [16]}}\n  optimizer: {{name: sgd, lr: 0.1}}\n  epochs: 2\nstages:\n  focal:\n    objective: {{use: focal.focal, gamma: 2.0}}\n",
            lib.display()
        ),
    )
    .unwrap();
    let xlab = PathBuf::from(env!("CARGO_BIN_EXE_xlab"));
    let out = Command::new(&xlab)
        .arg("--store")
        .arg(dir.path().join("results"))
        .args(["query"])
        .env("XLAB_WORKER", xlab.with_file_name("xlab-worker"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "there is no store yet to show");
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no xlab store at"));
    let out = Command::new(&xlab)
        .arg("--store")
        .arg(dir.path().join("results"))
        .arg("run")
        .arg(&exp)
        .env("XLAB_WORKER", xlab.with_file_name("xlab-worker"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 done"), "{err}");
    let out = Command::new(&xlab)
        .arg("--store")
        .arg(dir.path().join("results"))
        .args(["query", "--format", "json"])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows[0]["metrics"]["focal.mean_ce"]["mean"].as_f64().unwrap() > 0.0, "{rows}");
}
