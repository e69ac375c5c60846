//! Sweeps from real experiment files: grid, zip, random, variants, seeds, and their product.

use std::path::Path;
use xlab_plan::{load_str, Plan};
use xlab_proto::plugins::Registry;

const BASE: &str = "name: s\ndefaults:\n  task: train\n  data: {name: two_moons}\n  model: {name: mlp}\n  optimizer: {name: sgd}\nstages:\n  train:\n";

fn plan(stage_body: &str) -> Plan {
    let text = format!("{BASE}{stage_body}");
    load_str(Path::new("sweep.yaml"), &text, &mut Registry::default()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn labels(p: &Plan) -> Vec<String> {
    p.jobs().map(|j| j.label()).collect()
}

#[test]
fn grid_zip_random_and_seeds_multiply() {
    let p = plan(
        "    grid: {optimizer.lr: [0.1, 0.01]}\n    zip: {epochs: [1, 2, 3], batch_size: [8, 16, 32]}\n    random: {samples: 2, seed: 4, model.hidden: 'choice([[8], [16]])'}\n    seeds: 2\n",
    );
    assert_eq!(p.jobs().count(), 2 * 3 * 2 * 2);
    assert_eq!(p.stages[0].sweep_keys, ["optimizer.lr", "epochs", "batch_size", "model.hidden"]);
    // zip walks together: epochs and batch sizes pair up.
    for j in p.jobs() {
        assert_eq!(j.config.batch_size, 8 << (j.config.epochs - 1), "{}", j.label());
    }
}

#[test]
fn variants_carry_conditional_parameters() {
    let p = plan(
        "    variants:\n      - {optimizer: {name: sgd, momentum: 0.9}, grid: {optimizer.lr: [0.1, 0.01]}}\n      - {optimizer: {name: adam}, grid: {optimizer.lr: [0.001]}}\n",
    );
    assert_eq!(
        labels(&p),
        [
            "optimizer.momentum=0.9 optimizer.name=sgd optimizer.lr=0.1 seed=0",
            "optimizer.momentum=0.9 optimizer.name=sgd optimizer.lr=0.01 seed=0",
            "optimizer.name=adam optimizer.lr=0.001 seed=0"
        ]
    );
    let adam = p.jobs().last().unwrap();
    // The adam variant replaced the sgd default whole: no momentum key leaks into it.
    assert_eq!(
        adam.config_json["optimizer"],
        serde_json::json!({"name": "adam", "lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0})
    );
}

#[test]
fn random_points_are_reproducible_and_seeded_separately() {
    let body =
        |seed: u64| format!("    random: {{samples: 4, seed: {seed}, optimizer.lr: 'loguniform(1e-4, 1e-1)'}}\n");
    let a = plan(&body(0));
    assert_eq!(labels(&a), labels(&plan(&body(0))));
    assert_ne!(labels(&a), labels(&plan(&body(1))));
    for j in a.jobs() {
        let Opt(lr) = lr_of(j);
        assert!((1e-4..=1e-1).contains(&lr));
    }
}

struct Opt(f64);

fn lr_of(j: &xlab_plan::Job) -> Opt {
    Opt(j.config_json["optimizer"]["lr"].as_f64().unwrap())
}

#[test]
fn adding_a_seed_or_grid_value_keeps_the_existing_ids() {
    let before = plan("    grid: {optimizer.lr: [0.1, 0.01]}\n    seeds: 2\n");
    let after = plan("    grid: {optimizer.lr: [0.1, 0.01, 0.001]}\n    seeds: [0, 1, 2]\n");
    let old: Vec<String> = before.jobs().map(|j| j.id.to_string()).collect();
    let new: Vec<String> = after.jobs().map(|j| j.id.to_string()).collect();
    assert!(old.iter().all(|id| new.contains(id)));
    assert_eq!(new.len(), 9);
    // Writing a default out, or reformatting a number, names the same job.
    let explicit =
        plan("    grid: {optimizer.lr: [1e-1, 0.010]}\n    seeds: 2\n    optimizer: {name: sgd, momentum: 0.0}\n");
    let ids: Vec<String> = explicit.jobs().map(|j| j.id.to_string()).collect();
    assert_eq!(ids, old);
}

/// Named variants label their points `variant=NAME` instead of the keys they set; naming some
/// but not all, or two alike, is refused.
#[test]
fn named_variants_label_their_points_by_name() {
    let base = "name: v\ndefaults:\n  task: train\n  data: {name: two_moons}\n  model: {name: mlp}\n  optimizer: {name: sgd}\nstages:\n  a:\n    variants:\n";
    let text = format!("{base}      - {{name: plain}}\n      - {{name: smooth, label_smoothing: 0.1, grid: {{optimizer.lr: [0.1, 0.01]}}}}\n");
    let p = xlab_plan::load_str(std::path::Path::new("v.yaml"), &text, &mut xlab_plan::NoPlugins).unwrap();
    let labels: Vec<String> = p.stages[0].jobs.iter().map(|j| j.label()).collect();
    assert_eq!(
        labels,
        ["variant=plain seed=0", "variant=smooth optimizer.lr=0.1 seed=0", "variant=smooth optimizer.lr=0.01 seed=0"]
    );
    assert_eq!(p.stages[0].sweep_keys, ["variant", "optimizer.lr"]);
    assert_eq!(p.stages[0].jobs[1].config_json["label_smoothing"], 0.1);
    // `select: best` can rank per named variant.
    let per = format!(
        "{text}  pick:\n    task: evaluate\n    needs: {{stage: a, select: best, metric: val.acc, per: [variant]}}\n"
    );
    let p = xlab_plan::load_str(std::path::Path::new("v.yaml"), &per, &mut xlab_plan::NoPlugins).unwrap();
    let picks: Vec<String> = p.stages[1].jobs.iter().map(|j| j.label()).collect();
    assert_eq!(picks, ["a.variant=plain seed=0", "a.variant=smooth seed=0"]);
    for (bad, msg) in [
        (
            format!("{base}      - {{name: plain}}\n      - {{label_smoothing: 0.1}}\n"),
            "some variants have a `name` and this one has none",
        ),
        (
            format!("{base}      - {{name: x}}\n      - {{name: x, label_smoothing: 0.1}}\n"),
            "two variants are named `x`",
        ),
    ] {
        let e = xlab_plan::load_str(std::path::Path::new("v.yaml"), &bad, &mut xlab_plan::NoPlugins).unwrap_err();
        assert!(e.to_string().contains(msg), "{e}");
    }
}

#[test]
fn order_changes_when_jobs_start_not_which_jobs_they_are() {
    let grid = "    grid: {optimizer.name: [sgd, adam], optimizer.lr: [0.1, 0.01, 0.001]}\n    seeds: 2\n";
    let plain = plan(grid);
    let ids = |p: &Plan| {
        let mut v: Vec<String> = p.jobs().map(|j| j.id.to_string()).collect();
        v.sort();
        v
    };
    // Interleave: a job of each value of the first key in turn, each value's jobs in sweep order.
    let inter = plan(&format!("{grid}    order: interleave\n"));
    assert_eq!(ids(&inter), ids(&plain));
    let names: Vec<&str> = inter.jobs().map(|j| j.point[0].1.as_str().unwrap()).collect();
    assert_eq!(names, ["sgd", "adam"].repeat(6));
    let sgd = |p: &Plan| -> Vec<String> { p.jobs().filter(|j| j.point[0].1 == "sgd").map(|j| j.label()).collect() };
    assert_eq!(sgd(&inter), sgd(&plain));
    // Shuffled: a permutation, the same every time the file is planned.
    let shuffled = plan(&format!("{grid}    order: shuffled\n"));
    assert_eq!(ids(&shuffled), ids(&plain));
    assert_ne!(labels(&shuffled), labels(&plain));
    assert_eq!(labels(&shuffled), labels(&plan(&format!("{grid}    order: shuffled\n"))));
    // `plan` is the sweep's own order.
    assert_eq!(labels(&plan(&format!("{grid}    order: plan\n"))), labels(&plain));
}
