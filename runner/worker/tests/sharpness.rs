//! The sharpness diagnostics of `task: evaluate` against PyTorch: a real worker trains a small
//! MLP, a second one evaluates it with `sharpness:`, and `tests/reference/sharpness_reference.py`
//! computes the exact Hessian of the same training loss (torch.autograd.functional.hessian), its
//! eigenvalues and the m-sharpness estimate from the saved weights. Needs the project's Python
//! environment (`make setup`), or a Python with torch in `XLAB_PYTHON`.

use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tch::Tensor;
use xlab_proto::{Event, JobRequest, ParentRef};

mod common;

fn worker() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab-worker"))
}

fn run(req: &JobRequest) -> serde_json::Value {
    std::fs::create_dir_all(&req.run_dir).unwrap();
    let file = req.run_dir.join("job.json");
    std::fs::write(&file, serde_json::to_vec(req).unwrap()).unwrap();
    let mut child = Command::new(worker())
        .args(["run", "--job"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut summary = None;
    let mut events = vec![];
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let e = Event::from_line(&line.unwrap()).unwrap();
        if let Event::Finished { summary: s } = &e {
            summary = Some(serde_json::to_value(s).unwrap());
        }
        events.push(e);
    }
    assert!(child.wait().unwrap().success());
    summary.unwrap_or_else(|| panic!("no result: {events:?}"))
}

fn request(dir: &Path, id: &str, config: serde_json::Value, parents: Vec<ParentRef>) -> JobRequest {
    JobRequest { parents, ..common::cpu_request(dir.join(id), "sharpness", id, id, 1, config) }
}

#[test]
fn hessian_top_eigenvalue_and_m_sharpness_match_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let data = json!({"name": "two_moons", "n_train": 96, "n_val": 16, "n_test": 16, "noise": 0.1, "seed": 0});
    let model = json!({"name": "mlp", "hidden": [6], "activation": "relu"});
    let train_cfg = json!({"task": "train", "data": data, "model": model,
        "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.0, "weight_decay": 0.0, "nesterov": false},
        "epochs": 3, "batch_size": 16});
    let train = request(dir.path(), "train", train_cfg.clone(), vec![]);
    run(&train);
    let eval_cfg = json!({"task": "evaluate", "data": data, "epochs": 1, "batch_size": 16,
        "sharpness": {"samples": 80, "power_iterations": 300, "rho": 0.1, "m": 32, "seed": 0}});
    let parent = ParentRef { job_id: "train".into(), run_dir: train.run_dir.clone(), config: train_cfg };
    let got = run(&request(dir.path(), "eval", eval_cfg, vec![parent]));

    // The same weights and the first 80 training examples, for the reference.
    let weights = Tensor::read_safetensors(train.run_dir.join("weights.safetensors")).unwrap();
    let mut params = serde_json::Map::new();
    let mut shapes = serde_json::Map::new();
    for (name, t) in &weights {
        params.insert(name.clone(), json!(Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).flatten(0, -1)).unwrap()));
        shapes.insert(name.clone(), json!(t.size()));
    }
    let cfg: xlab_plan::config::DataConfig = serde_json::from_value(data).unwrap();
    let d = xlab_worker::data::build(&cfg).unwrap();
    let x: Vec<f64> = Vec::try_from(d.train.x.narrow(0, 0, 80).to_kind(tch::Kind::Double).flatten(0, -1)).unwrap();
    let y: Vec<i64> = Vec::try_from(d.train.y.narrow(0, 0, 80)).unwrap();
    let x: Vec<Vec<f64>> = x.chunks(2).map(<[f64]>::to_vec).collect();
    let request = json!({"params": params, "shapes": shapes, "hidden": [6], "x": x, "y": y, "rho": 0.1, "m": 32});
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/sharpness_reference.py");
    let want = xlab_plugin_host::testing::run_python_reference(&script, &request);
    let eig: Vec<f64> = want["eigenvalues"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    // Power iteration finds the eigenvalue of largest magnitude.
    let top = eig.iter().copied().fold(0.0f64, |a, b| if b.abs() > a.abs() { b } else { a });
    let lambda = got["sharpness.hessian_top"].as_f64().unwrap();
    assert!(top > 0.0, "{eig:?}");
    assert!((lambda - top).abs() < 1e-3 * top.abs(), "power iteration {lambda} vs exact {top} ({eig:?})");
    let ms = got["sharpness.m_sharpness"].as_f64().unwrap();
    let want_ms = want["m_sharpness"].as_f64().unwrap();
    assert!(want_ms > 0.0 && (ms - want_ms).abs() < 1e-4 + 1e-3 * want_ms.abs(), "m-sharpness {ms} vs {want_ms}");
}
