//! Plugins through the real loader: the workspace's built .so files, broken libraries written by
//! the tests, the fixture plugin whose manifest is wrong on purpose, and jobs whose plugin fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn xlab() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab"))
}

fn release_file(name: &str) -> PathBuf {
    let p = xlab().with_file_name(name);
    assert!(p.exists(), "{} is missing: build the workspace first (`make build`)", p.display());
    p
}

fn cmd(store: &Path) -> Command {
    let mut c = Command::new(xlab());
    c.arg("--store")
        .arg(store)
        .env("XLAB_WORKER", release_file("xlab-worker"))
        .env_remove("XLAB_PLUGIN_PATH")
        .env_remove("RUST_LOG");
    c
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn registry(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn refusal<'a>(reg: &'a serde_json::Value, file_suffix: &str) -> &'a str {
    reg["refused"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["file"].as_str().unwrap().ends_with(file_suffix))
        .unwrap_or_else(|| panic!("{file_suffix} not refused: {reg}"))["reason"]
        .as_str()
        .unwrap()
}

#[test]
fn workspace_plugins_are_listed_with_their_hash() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(&cmd(dir.path()).args(["plugins", "list", "--json"]).output().unwrap());
    let sam = reg["plugins"].as_array().unwrap().iter().find(|p| p["id"] == "sam").expect("sam is built");
    assert_eq!(sam["components"][0]["id"], "sam.sam");
    assert_eq!(sam["components"][0]["params"][0]["name"], "rho");
    let bytes = std::fs::read(sam["file"].as_str().unwrap()).unwrap();
    assert_eq!(sam["sha256"].as_str().unwrap().len(), 64);
    assert!(!bytes.is_empty());
    let out = cmd(dir.path()).args(["plugins", "describe", "sam.sam"]).output().unwrap();
    let s = text(&out.stdout);
    assert!(s.contains("rho") && s.contains("default 0.05") && s.contains("Foret et al."), "{s}");
    let out = cmd(dir.path()).args(["plugins", "describe", "sam.sma"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("did you mean `sam.sam`?"), "{}", text(&out.stderr));
}

/// Every built-in component names its section of docs/methods.md, and that section exists there
/// under the title `describe` gives.
#[test]
fn every_builtin_component_points_to_its_specification() {
    let dir = tempfile::tempdir().unwrap();
    let out = cmd(dir.path()).args(["plugins", "list", "--json"]).output().unwrap();
    let reg = registry(&out);
    let spec = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/methods.md")).unwrap();
    let mut checked = 0;
    for plugin in reg["plugins"].as_array().unwrap() {
        for c in plugin["components"].as_array().unwrap() {
            let id = c["id"].as_str().unwrap();
            let out = cmd(dir.path()).args(["plugins", "describe", id]).output().unwrap();
            let said = text(&out.stdout);
            let line = said
                .lines()
                .find_map(|l| l.trim().strip_prefix("specification: docs/methods.md §"))
                .unwrap_or_else(|| panic!("{id} names no section:\n{said}"));
            let (section, title) = line.split_once(" (").unwrap();
            let title = title.strip_suffix(')').unwrap();
            let heading = format!("### {section} {title}");
            assert!(
                spec.lines().any(|l| l.starts_with(&heading) && l.contains(&format!("`{id}`"))),
                "{id}: docs/methods.md has no heading `{heading} ...` naming `{id}`"
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} built-in components");
}

#[test]
fn broken_libraries_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let plugdir = dir.path().join("plugins");
    std::fs::create_dir(&plugdir).unwrap();
    let sam = std::fs::read(release_file("libxlab_plugin_sam.so")).unwrap();
    std::fs::write(plugdir.join("libxlab_plugin_text.so"), "this is not a library\n").unwrap();
    std::fs::write(plugdir.join("libxlab_plugin_truncated.so"), &sam[..4096]).unwrap();
    std::fs::write(plugdir.join("libxlab_plugin_copy.so"), &sam).unwrap();
    let libm = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if let Some(libm) = libm {
        std::fs::copy(libm, plugdir.join("libxlab_plugin_notaplugin.so")).unwrap();
    }
    let out = cmd(dir.path()).env("XLAB_PLUGIN_PATH", &plugdir).args(["plugins", "list", "--json"]).output().unwrap();
    let reg = registry(&out);
    assert!(refusal(&reg, "libxlab_plugin_text.so").contains("no ELF header"));
    assert!(refusal(&reg, "libxlab_plugin_truncated.so").contains("truncated or corrupt shared library"));
    assert!(refusal(&reg, "libxlab_plugin_copy.so").contains("duplicate plugin id `sam`"));
    assert!(refusal(&reg, "libxlab_plugin_copy.so").contains("libxlab_plugin_sam.so provides it too"));
    if libm.is_some() {
        assert!(refusal(&reg, "libxlab_plugin_notaplugin.so").contains("does not export `xlab_plugin_manifest_v1`"));
    }
    // The good plugin is still there, once.
    assert_eq!(reg["plugins"].as_array().unwrap().iter().filter(|p| p["id"] == "sam").count(), 1);
    // The human listing shows refusals too.
    let out = cmd(dir.path()).env("XLAB_PLUGIN_PATH", &plugdir).args(["plugins", "list"]).output().unwrap();
    assert!(text(&out.stdout).contains("refused ") && text(&out.stdout).contains("no ELF header"));
}

/// The plugin ABI this xlab speaks (`xlab_plugin_api::abi::ABI_VERSION`; this crate has no
/// libtorch, so it cannot import it).
const ABI: u32 = 7;

#[test]
fn wrong_manifests_are_refused() {
    let fixture = release_file("libxlab_fixture_plugin.so");
    for (mode, reason) in [
        ("abi", format!("plugin `fixture` was built for plugin ABI v{}, but this xlab speaks v{}", ABI + 998, ABI)),
        (
            "layout",
            format!(
                "plugin `fixture` was built against another layout of plugin ABI v{ABI} (layout 0x5eed000000000004"
            ),
        ),
        ("torch", "built against libtorch 1.0.0, but this worker runs libtorch 2.11.0".into()),
        ("panic", "entry point panicked".into()),
    ] {
        let out = Command::new(release_file("xlab-worker"))
            .args(["plugins", "--file"])
            .arg(&fixture)
            .env("XLAB_FIXTURE_MANIFEST", mode)
            .env_remove("XLAB_PLUGIN_PATH")
            .output()
            .unwrap();
        let reg = registry(&out);
        let r = refusal(&reg, "libxlab_fixture_plugin.so");
        assert!(r.contains(&reason), "{mode}: {r}");
    }
}

const EXPERIMENT: &str = r#"
name: plugged
plugins: [FIXTURE]
defaults:
  task: train
  data: {name: two_moons, n_train: 256, n_val: 0, n_test: 128}
  model: {name: mlp, hidden: [16]}
  optimizer: {name: sgd, lr: 0.1}
  epochs: 2
stages:
  erm: {}
  sam:
    step_rule: {use: sam.sam, rho: 0.1}
  broken:
    step_rule: {use: fixture.panics}
  refusing:
    step_rule: {use: fixture.fails}
"#;

#[test]
fn plugin_jobs_record_provenance_and_a_failing_plugin_fails_only_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("plugged.yaml");
    std::fs::copy(release_file("libxlab_fixture_plugin.so"), dir.path().join("fixture.so")).unwrap();
    std::fs::write(&file, EXPERIMENT.replace("FIXTURE", "fixture.so")).unwrap();
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2 done, 0 skipped (already done), 2 failed"), "{err}");
    assert!(err.contains("`fixture.panics` step panicked: panicked: fixture.panics was asked to step"), "{err}");
    assert!(err.contains("`fixture.fails` step: fixture.fails refuses to step"), "{err}");

    let out = cmd(&store).args(["query", "--format", "json"]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stage = |name: &str| rows.as_array().unwrap().iter().find(|r| r["stage"] == name).unwrap().clone();
    assert_eq!(stage("erm")["metrics"]["cost.passes_per_step"]["mean"], 1.0);
    assert_eq!(stage("sam")["metrics"]["cost.passes_per_step"]["mean"], 2.0);
    assert!(stage("sam")["metrics"]["sam.grad_norm"]["mean"].as_f64().unwrap() > 0.0);
    assert_eq!(stage("broken")["done"], 0);

    // The SAM job's record names the plugin library and its hash, and its resolved parameters.
    let sam_job = common::stage_job_ids(&store, &file, "sam")[0].clone();
    let out = cmd(&store).args(["show", &sam_job, "--json"]).output().unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The resolved config: defaults filled in.
    assert_eq!(rec["config"]["step_rule"], serde_json::json!({"use": "sam.sam", "rho": 0.1, "m": 0}));
    let used = &rec["provenance"]["plugins"][0];
    assert_eq!(used["id"], "sam");
    assert!(used["file"].as_str().unwrap().ends_with("libxlab_plugin_sam.so"));
    assert_eq!(used["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(rec["status"], "done");
    assert_eq!(rec["provenance"]["libtorch"], "2.11.0+cu130");
}

#[test]
fn component_mistakes_are_caught_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let base = EXPERIMENT.replace("plugins: [FIXTURE]\n", "");
    let cases = [
        ("sam.samm", "step_rule: {use: sam.samm}", "unknown plugin component `sam.samm`", "did you mean `sam.sam`?"),
        ("rh0", "step_rule: {use: sam.sam, rh0: 0.1}", "unknown parameter `rh0` of `sam.sam`", "did you mean `rho`?"),
        ("negative", "step_rule: {use: sam.sam, rho: -1}", "parameter `rho` of `sam.sam` must be ≥ 0, got -1", ""),
        (
            "kind",
            "objective: {use: sam.sam}",
            "`sam.sam` is a `step_rule` component; the `objective` slot needs a `objective`",
            "use it under `step_rule:`",
        ),
    ];
    for (name, line, message, hint) in cases {
        let f = dir.path().join(format!("{name}.yaml"));
        let body = base.replace("step_rule: {use: sam.sam, rho: 0.1}", line);
        let body = body.split("  broken:").next().unwrap().to_string();
        std::fs::write(&f, &body).unwrap();
        let out = cmd(&store).arg("validate").arg(&f).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains(message) && err.contains(hint), "{name}: {err}");
        assert!(err.contains("stages.sam: "), "{name}: {err}");
        // The message points at the line of the component, and at the parameter itself.
        let (l, text_line) = body.lines().enumerate().find(|(_, t)| t.contains(line)).unwrap();
        let at = match name {
            "rh0" | "negative" => {
                let key = if name == "rh0" { "rh0" } else { "rho" };
                format!("{name}.yaml:{}:{}: ", l + 1, text_line.find(key).unwrap() + 1)
            }
            _ => format!("{name}.yaml:{}:", l + 1),
        };
        assert!(err.contains(&at), "{name}: {at} in {err}");
    }
    assert!(!store.exists());
}

/// A plugin edited and rebuilt without a version bump: its done jobs are kept (the identity
/// holds the plugin's id and version), but the run says which plugin and how many jobs; `--rerun
/// FILTER` runs them again as new attempts, keeping the first attempt in the record and its
/// files in `runs/JOB/attempt-1/`.
#[test]
fn a_rebuilt_plugin_is_named_and_rerun_runs_selected_jobs_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let file = dir.path().join("rebuilt.yaml");
    let so = dir.path().join("fixture.so");
    std::fs::copy(release_file("libxlab_fixture_plugin.so"), &so).unwrap();
    std::fs::write(
        &file,
        "name: rebuilt\nplugins: [fixture.so]\ndefaults:\n  task: train\n  data: {name: two_moons, n_train: 128, n_val: 0, n_test: 64}\n  model: {name: mlp, hidden: [8]}\n  optimizer: {name: sgd, lr: 0.1}\n  epochs: 1\nstages:\n  plain: {}\n  fx:\n    batch_transform: {use: fixture.clean_loss}\n",
    )
    .unwrap();
    let ok = |out: Output| {
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    let err = ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    assert!(!err.contains("another build"), "nothing changed yet: {err}");

    // "Rebuild" the plugin: same id and version, different bytes.
    let mut bytes = std::fs::read(&so).unwrap();
    bytes.extend_from_slice(b"rebuilt");
    std::fs::write(&so, bytes).unwrap();
    let err = ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    assert!(err.contains("1 done job(s) of `rebuilt` were produced by another build of plugin `fixture`"), "{err}");
    assert!(err.contains("--rerun"), "{err}");
    assert!(err.contains("0 done, 2 skipped"), "{err}");

    let fx = common::stage_job_ids(&store, &file, "fx")[0].clone();
    let err = ok(cmd(&store).arg("run").arg(&file).args(["--rerun", "stage == \"fx\""]).output().unwrap());
    assert!(err.contains("--rerun matched 1 of the 2 done job(s)"), "{err}");
    assert!(err.contains("1 done, 1 skipped"), "{err}");
    assert!(!err.contains("another build"), "the rerun job is this build's now: {err}");
    let rec: serde_json::Value =
        serde_json::from_slice(&cmd(&store).args(["show", &fx, "--json"]).output().unwrap().stdout).unwrap();
    assert_eq!(rec["status"], "done");
    assert_eq!(rec["attempts"].as_array().unwrap().len(), 2, "{rec}");
    assert!(
        store.join("runs").join(&fx).join("attempt-1").read_dir().unwrap().next().is_some(),
        "first attempt's files kept"
    );
    // Now nothing differs: a plain run keeps everything without a warning.
    let err = ok(cmd(&store).arg("run").arg(&file).output().unwrap());
    assert!(!err.contains("another build") && err.contains("0 done, 2 skipped"), "{err}");
    // A filter mistake is caught before anything runs.
    let out = cmd(&store).arg("run").arg(&file).args(["--rerun", "stagee == \"fx\""]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("did you mean `stage`?"), "{}", text(&out.stderr));
}
