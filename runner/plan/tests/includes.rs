//! `include:` composes experiment files and `${…}` refers to other values of the document.

use std::path::Path;
use xlab_plan::NoPlugins;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn configs(plan: &xlab_plan::Plan, stage: &str) -> Vec<serde_json::Value> {
    plan.stages.iter().find(|s| s.name == stage).unwrap().jobs.iter().map(|j| j.config_json.clone()).collect()
}

#[test]
fn included_files_merge_under_the_including_one() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "common/base.yaml",
        "defaults:\n  task: train\n  data: {name: two_moons, n_train: 100}\n  model: {name: mlp, hidden: [8]}\n  optimizer: {name: sgd, lr: 0.1, momentum: 0.9}\n  epochs: 3\nstages:\n  baseline: {seeds: 2}\n",
    );
    write(dir.path(), "common/adam.yaml", "include: base.yaml\ndefaults:\n  optimizer: {name: adam, lr: 0.001}\n");
    let main = write(
        dir.path(),
        "exp.yaml",
        "name: composed\ninclude: [common/adam.yaml]\ndefaults:\n  epochs: 5\nstages:\n  wider:\n    model: {hidden: [32]}\n    grid: {optimizer.lr: ['${defaults.optimizer.lr}', 0.01]}\n",
    );
    let plan = xlab_plan::load(&main, &mut NoPlugins).unwrap();
    assert_eq!(plan.name, "composed");
    let base = configs(&plan, "baseline");
    assert_eq!(base.len(), 2, "the included stage is there");
    // adam.yaml's optimizer replaces base.yaml's (another `name:`), the main file's epochs win.
    assert_eq!(base[0]["optimizer"]["name"], "adam");
    assert!(base[0]["optimizer"].get("momentum").is_none());
    assert_eq!(base[0]["epochs"], 5);
    assert_eq!(base[0]["data"]["n_train"], 100);
    let wider = configs(&plan, "wider");
    assert_eq!(wider[0]["model"]["hidden"], serde_json::json!([32]));
    // `${defaults.optimizer.lr}` is the merged default: a number, 0.001.
    let lrs: Vec<f64> = wider.iter().map(|c| c["optimizer"]["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs, [0.001, 0.01]);
}

#[test]
fn include_and_reference_mistakes_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let err = |name: &str, text: &str| {
        let p = write(dir.path(), name, text);
        xlab_plan::load(&p, &mut NoPlugins).unwrap_err().to_string()
    };
    let e = err("missing.yaml", "name: x\ninclude: nowhere.yaml\nstages: {a: {}}\n");
    assert!(e.contains("include: cannot read included file") && e.contains("nowhere.yaml"), "{e}");
    assert!(e.contains("relative to the file that includes them"), "{e}");
    write(dir.path(), "a.yaml", "include: b.yaml\n");
    write(dir.path(), "b.yaml", "include: a.yaml\n");
    let e = err("loop.yaml", "name: x\ninclude: a.yaml\nstages: {a: {}}\n");
    assert!(e.contains("`include` goes round in a circle") && e.contains("a.yaml → ") && e.contains("b.yaml"), "{e}");
    let e = err(
        "ref.yaml",
        "name: x\ndefaults:\n  task: train\n  data: {name: two_moons}\n  model: {name: mlp}\n  optimizer: {name: sgd, lr: 0.1}\nstages:\n  a: {epochs: '${defaults.epoch}'}\n",
    );
    assert!(e.contains("stages.a.epochs: `${defaults.epoch}` names nothing in this experiment"), "{e}");
    // A reference inside text is spliced in as text.
    let p = write(
        dir.path(),
        "text.yaml",
        "name: x\ndescription: 'lr ${defaults.optimizer.lr} for ${defaults.epochs} epochs'\ndefaults:\n  task: train\n  data: {name: two_moons}\n  model: {name: mlp}\n  optimizer: {name: sgd, lr: 0.1}\n  epochs: 4\nstages: {a: {}}\n",
    );
    assert!(xlab_plan::load(&p, &mut NoPlugins).is_ok());
}

/// A mistake found after merging still names the file and the line and column where it is
/// written: the including file, or the included one.
#[test]
fn errors_after_merging_point_at_the_file_that_wrote_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        "defaults:\n  task: train\n  data: {name: two_moons}\n  model: {name: mlp}\n  optimizer: {name: sgd, lr: -1}\n",
    );
    let main = write(dir.path(), "exp.yaml", "name: x\ninclude: base.yaml\nstages:\n  a: {epochs: 3}\n");
    let e = xlab_plan::load(&main, &mut NoPlugins).unwrap_err();
    assert_eq!(&*e.file, dir.path().join("base.yaml").as_path());
    assert_eq!(e.location, Some((5, 26)), "{e}");
    assert!(e.to_string().contains("base.yaml:5:26: stages.a: `optimizer.lr` must be a finite number > 0"), "{e}");
    // The same key set again in the including file: that one is reported.
    let main = write(dir.path(), "exp2.yaml", "name: x\ninclude: base.yaml\nstages:\n  a:\n    optimizer: {lr: -2}\n");
    let e = xlab_plan::load(&main, &mut NoPlugins).unwrap_err();
    assert_eq!((e.file.file_name().unwrap().to_str().unwrap(), e.location), ("exp2.yaml", Some((5, 17))), "{e}");
    // An unknown key of the merged document, through a reference.
    let main = write(
        dir.path(),
        "exp3.yaml",
        "name: x\ninclude: base.yaml\nstages:\n  a:\n    epochs: 2\n    batchsize: '${stages.a.epochs}'\n",
    );
    let e = xlab_plan::load(&main, &mut NoPlugins).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:6:5: stages.a.batchsize: unknown field `batchsize`", main.display())), "{e}");
    assert!(e.contains("did you mean `batch_size`?"), "{e}");
}
