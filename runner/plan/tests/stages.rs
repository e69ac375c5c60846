//! `needs:` with `select: best`: expansion into candidate sets, identity, and the ranking the
//! scheduler applies once the candidates have finished.

use std::collections::BTreeMap;
use std::path::Path;
use xlab_plan::{load_str, Plan};
use xlab_proto::plugins::Registry;

const BASE: &str = "name: s\ndefaults:\n  task: train\n  data: {name: two_moons}\n  model: {name: mlp}\n  optimizer: {name: sgd}\nstages:\n  train:\n    seeds: 2\n    grid:\n      optimizer.lr: [0.1, 0.01]\n      optimizer.momentum: [0.0, 0.9]\n";

fn plan(child: &str) -> Plan {
    let text = format!("{BASE}{child}");
    load_str(Path::new("stages.yaml"), &text, &mut Registry::default()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn best_over_the_whole_stage_gives_one_child_per_rank_and_seed() {
    let p = plan("  pick:\n    task: evaluate\n    needs: {stage: train, select: best, metric: val.acc, k: 2}\n");
    let train: Vec<&str> = p.stages[0].jobs.iter().map(|j| j.id.as_str()).collect();
    let pick = &p.stages[1].jobs;
    assert_eq!(pick.len(), 2);
    for (r, j) in pick.iter().enumerate() {
        let mut parents: Vec<&str> = j.parents.iter().map(|p| p.as_str()).collect();
        parents.sort();
        let mut all = train.clone();
        all.sort();
        assert_eq!(parents, all, "every train job is a candidate");
        let pk = j.pick.as_ref().unwrap();
        assert_eq!((pk.metric.as_str(), pk.rank), ("val.acc", r as u32 + 1));
        assert_eq!(j.label(), format!("rank={} seed=0", r + 1));
    }
    assert_ne!(pick[0].id, pick[1].id, "the rank is part of the identity");
}

#[test]
fn best_per_key_and_seed_groups_the_candidates() {
    let p = plan("  pick:\n    task: evaluate\n    needs: {stage: train, select: best, metric: val.loss, mode: min, per: [optimizer.lr, seed]}\n");
    let pick = &p.stages[1].jobs;
    // 2 learning rates × 2 seeds, each ranking the 2 momentum values.
    assert_eq!(pick.len(), 4);
    for j in pick {
        assert_eq!(j.parents.len(), 2);
        let lr = &j.point.iter().find(|(k, _)| k == "train.optimizer.lr").unwrap().1;
        for parent in &j.parents {
            let pj = p.stages[0].jobs.iter().find(|t| &t.id == parent).unwrap();
            assert_eq!(pj.seed, j.seed, "a `per: [seed]` child takes its candidates' seed");
            assert_eq!(&pj.config_json["optimizer"]["lr"], lr);
        }
    }
    let seeds: Vec<u64> = pick.iter().map(|j| j.seed).collect();
    assert_eq!(seeds, vec![0, 1, 0, 1]);
}

#[test]
fn choose_ranks_by_the_metric_with_ties_by_id() {
    let p = plan("  pick:\n    task: evaluate\n    needs: {stage: train, select: best, metric: val.acc, k: 3}\n");
    let m = |v: f64| BTreeMap::from([("val.acc".to_string(), v)]);
    let (a, b, c) = (m(0.9), m(0.7), m(0.9));
    let cands = [("bbb", &a), ("aaa", &b), ("ccc", &c)];
    let picks: Vec<&str> = p.stages[1].jobs.iter().map(|j| j.pick.as_ref().unwrap().choose(&cands).unwrap()).collect();
    assert_eq!(picks, vec!["bbb", "ccc", "aaa"]);
    let min = xlab_plan::Pick { metric: "val.acc".into(), mode: xlab_plan::file::Mode::Min, rank: 1 };
    assert_eq!(min.choose(&cands).unwrap(), "aaa");
    let err = p.stages[1].jobs[2].pick.as_ref().unwrap().choose(&cands[..2]).unwrap_err();
    assert!(err.contains("needs 3 finished parent jobs, 2 finished"), "{err}");
    let other = BTreeMap::from([("test.acc".to_string(), 1.0)]);
    let err = min.choose(&[("ddd", &other)]).unwrap_err();
    assert!(err.contains("has no metric `val.acc`") && err.contains("test.acc"), "{err}");
}

/// A diverged candidate (its metric NaN) ranks last in either mode instead of failing the whole
/// selection; infinities rank as the numbers they are.
#[test]
fn a_nan_candidate_ranks_last() {
    let m = |v: f64| BTreeMap::from([("val.loss".to_string(), v)]);
    let (nan, low, inf) = (m(f64::NAN), m(0.25), m(f64::INFINITY));
    let cands = [("aaa", &nan), ("bbb", &low), ("ccc", &inf)];
    let pick = |mode, rank| xlab_plan::Pick { metric: "val.loss".into(), mode, rank }.choose(&cands).unwrap();
    use xlab_plan::file::Mode::{Max, Min};
    assert_eq!([pick(Min, 1), pick(Min, 2), pick(Min, 3)], ["bbb", "ccc", "aaa"]);
    assert_eq!([pick(Max, 1), pick(Max, 2), pick(Max, 3)], ["ccc", "bbb", "aaa"]);
}

#[test]
fn an_empty_metric_name_is_refused_at_its_line() {
    let err = error("  pick:\n    task: evaluate\n    needs: {stage: train, select: best, metric: \"\"}\n");
    assert!(err.contains("stages.yaml:") && err.contains("`metric:` is empty"), "{err}");
}

fn error(child: &str) -> String {
    let text = format!("{BASE}{child}");
    match load_str(Path::new("stages.yaml"), &text, &mut Registry::default()) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_child_refers_to_its_parents_config() {
    // One child per parent: each takes its own parent's learning rate and seed.
    let p = plan("  tune:\n    needs: train\n    label_smoothing: '${parent.config.optimizer.momentum}'\n    optimizer: {name: sgd, lr: '${parent.config.optimizer.lr}', momentum: 0.5}\n    data: {name: two_moons, noise: '${parent.seed}'}\n");
    let (train, tune) = (&p.stages[0].jobs, &p.stages[1].jobs);
    assert_eq!(tune.len(), 8);
    for (c, parent) in tune.iter().zip(train) {
        assert_eq!(c.parents, vec![parent.id.clone()]);
        assert_eq!(c.config_json["optimizer"]["lr"], parent.config_json["optimizer"]["lr"]);
        assert_eq!(c.config_json["optimizer"]["momentum"], 0.5);
        // (0 is the default, which the canonical config leaves out.)
        let smoothing = c.config_json["label_smoothing"].as_f64().unwrap_or(0.0);
        assert_eq!(smoothing, parent.config_json["optimizer"]["momentum"].as_f64().unwrap());
        assert_eq!(c.config_json["data"]["noise"], parent.seed);
    }
    let mut ids: Vec<&str> = tune.iter().map(|j| j.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 8);

    // `select: all` and `select: best` take a value every parent shares.
    let p = plan("  ens:\n    needs: {stage: train, select: all}\n    task: evaluate\n    data: {name: '${parent.config.data.name}', n_test: 50}\n");
    assert_eq!(p.stages[1].jobs[0].config_json["data"]["name"], "two_moons");
    let p = plan("  pick:\n    needs: {stage: train, select: best, metric: val.acc, per: [optimizer.lr]}\n    task: evaluate\n    data: {name: two_moons, noise: '${parent.config.optimizer.lr}'}\n")
        .stages
        .remove(1);
    let noise: Vec<f64> = p.jobs.iter().map(|j| j.config_json["data"]["noise"].as_f64().unwrap()).collect();
    assert_eq!(noise, [0.1, 0.01]);
}

#[test]
fn parent_reference_mistakes_are_clear() {
    let e = error("  ens:\n    needs: {stage: train, select: all}\n    task: evaluate\n    data: {name: two_moons, noise: '${parent.config.optimizer.lr}'}\n");
    assert!(
        e.contains("stages.ens: data.noise: `${parent.config.optimizer.lr}`: the parent jobs of stage `train` differ there (0.1 and 0.01)"),
        "{e}"
    );
    assert!(e.contains("hint: a reference names a value every parent shares"), "{e}");
    assert!(e.starts_with("stages.yaml:16:29: "), "{e}");
    let e = error("  lone:\n    epochs: '${parent.seed}'\n");
    assert!(
        e.contains("stages.lone: epochs: `${parent.seed}` refers to the parent job, but this stage has no `needs:`"),
        "{e}"
    );
    assert!(e.starts_with("stages.yaml:14:5: "), "{e}");
    let e = error("  tune:\n    needs: train\n    epochs: '${parent.config.epoch}'\n");
    assert!(e.contains("`${parent.config.epoch}`: the jobs of stage `train` have no such config key"), "{e}");
    let e = error("  tune:\n    needs: train\n    epochs: '${parent.id}'\n");
    assert!(e.contains("`${parent.id}` is not a reference to the parent job"), "{e}");
    assert!(e.contains("${parent.config.<key>}` or `${parent.seed}`"), "{e}");
}

/// `per:` with a key only some parent jobs have (plain SGD has no `step_rule.use`; here only one
/// variant sets `clip_grad_norm`) ranks the jobs without it as their own group, `null`; a key
/// none of them has is still a mistake.
#[test]
fn best_per_a_key_some_parents_lack_groups_them_under_null() {
    let text = "name: s\ndefaults:\n  task: train\n  data: {name: two_moons}\n  model: {name: mlp}\n  optimizer: {name: sgd}\nstages:\n  train:\n    seeds: 2\n    variants: [{}, {clip_grad_norm: 1.0}]\n  pick:\n    task: evaluate\n    needs: {stage: train, select: best, metric: val.acc, per: [clip_grad_norm]}\n";
    let p = load_str(Path::new("stages.yaml"), text, &mut Registry::default()).unwrap();
    let pick = &p.stages[1].jobs;
    assert_eq!(pick.len(), 2, "two groups, null and 1.0");
    let groups: Vec<String> = pick.iter().map(|j| j.label()).collect();
    assert!(groups.contains(&"train.clip_grad_norm=null seed=0".to_string()), "{groups:?}");
    assert!(groups.contains(&"train.clip_grad_norm=1 seed=0".to_string()), "{groups:?}");
    for j in pick {
        assert_eq!(j.parents.len(), 2, "each group ranks its variant's two seeds");
    }
    let typo = text.replace("per: [clip_grad_norm]", "per: [clip_grad_nrom]");
    let e = load_str(Path::new("stages.yaml"), &typo, &mut Registry::default()).unwrap_err();
    assert!(e.to_string().contains("have no config key `clip_grad_nrom`"), "{e}");
}
