//! xlab's TPE against Optuna's `TPESampler` itself: for 300 fixed histories (random spaces of
//! floats, log floats, integers and choices; complete, pruned and running trials; both
//! directions; during and after the startup), a fresh `TPESampler(seed=s)` and
//! `xlab_sched::tpe::suggest(…, s)` suggest the same point.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use xlab_sched::tpe::{suggest, Dim, Direction, State, Trial};

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join(".venv/bin/python")
}

fn dim(d: &Value) -> Dim {
    match d[0].as_str().unwrap() {
        "float" => {
            Dim::Float { low: d[1].as_f64().unwrap(), high: d[2].as_f64().unwrap(), log: d[3].as_bool().unwrap() }
        }
        "int" => Dim::Int { low: d[1].as_i64().unwrap(), high: d[2].as_i64().unwrap() },
        _ => Dim::Choice(d[1].as_u64().unwrap() as usize),
    }
}

#[test]
fn suggestions_match_optunas_tpe_sampler() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tpe_optuna.py");
    let out = Command::new(python()).arg(&script).arg("300").output().expect("the project's Python runs (make setup)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut checked = 0;
    let mut tpe_phase = 0;
    for (n, line) in text.lines().enumerate() {
        let case: Value = serde_json::from_str(line).unwrap();
        let names: Vec<&String> = case["space"].as_object().unwrap().keys().collect();
        let space: Vec<Dim> = names.iter().map(|k| dim(&case["space"][k.as_str()])).collect();
        let history: Vec<Trial> = case["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| Trial {
                params: names.iter().map(|k| h["params"][k.as_str()].as_f64().unwrap()).collect(),
                state: match h["state"].as_str().unwrap() {
                    "complete" => State::Complete(h["value"].as_f64().unwrap()),
                    "pruned" => State::Pruned(h["step"].as_u64().map(|s| (s, h["value"].as_f64().unwrap()))),
                    _ => State::Running,
                },
            })
            .collect();
        let direction = if case["direction"] == "maximize" { Direction::Maximize } else { Direction::Minimize };
        let startup = case["startup"].as_u64().unwrap() as usize;
        let finished = history.iter().filter(|t| t.state != State::Running).count();
        if finished >= startup {
            tpe_phase += 1;
        }
        let got = suggest(&space, &history, direction, startup, case["seed"].as_u64().unwrap() as u32);
        for (j, k) in names.iter().enumerate() {
            let want = case["expected"][k.as_str()].as_f64().unwrap();
            let ok = match space[j] {
                Dim::Float { .. } => (got[j] - want).abs() <= 1e-9 * want.abs().max(1e-12),
                _ => got[j] == want,
            };
            assert!(ok, "case {n}, {k}: xlab {} Optuna {want}\n{line}", got[j]);
        }
        checked += 1;
    }
    assert_eq!(checked, 300);
    // Most cases exercise TPE itself, not only the random startup.
    assert!(tpe_phase > 150, "{tpe_phase} cases past the startup");
}
