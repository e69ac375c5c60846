//! `needs:` with `select: best`: expansion into candidate sets, identity, and the ranking the
//! scheduler applies once the candidates have finished.

use std::collections::BTreeMap;
use std::path::Path;
use xlab_proto::plugins::Registry;
use xlab_spec::{load_str, Plan};

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
    let min = xlab_spec::Pick { metric: "val.acc".into(), mode: xlab_spec::file::Mode::Min, rank: 1 };
    assert_eq!(min.choose(&cands).unwrap(), "aaa");
    let err = p.stages[1].jobs[2].pick.as_ref().unwrap().choose(&cands[..2]).unwrap_err();
    assert!(err.contains("needs 3 finished parent jobs, 2 finished"), "{err}");
    let other = BTreeMap::from([("test.acc".to_string(), 1.0)]);
    let err = min.choose(&[("ddd", &other)]).unwrap_err();
    assert!(err.contains("has no metric `val.acc`") && err.contains("test.acc"), "{err}");
}
