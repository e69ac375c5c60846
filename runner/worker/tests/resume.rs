//! Resume, with the real worker process: a worker killed with SIGKILL mid-run and started again
//! finishes with bit-identical weights and metrics; a truncated checkpoint falls back to the one
//! before it. Uses the workspace's plugin libraries (SAM, mixup, DRO and SAM-family objectives)
//! and a BatchNorm MLP, so that optimizer momentum, running statistics, plugin state and the
//! plugins' random stream all have to survive.

use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use xlab_proto::plugins::PluginUse;
use xlab_proto::{Event, JobRequest};

mod common;

fn worker() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xlab-worker"))
}

fn plugin(id: &str) -> PluginUse {
    let file = worker().with_file_name(format!("libxlab_plugin_{id}.so"));
    assert!(file.exists(), "{} is missing: build the workspace first (`make build`)", file.display());
    let sha256 = hex::encode(Sha256::digest(std::fs::read(&file).unwrap()));
    PluginUse { id: id.into(), version: "0.1.0".into(), file: file.display().to_string(), sha256 }
}

fn group_dro() -> serde_json::Value {
    serde_json::json!({"use": "dro.group_dro", "step_size": 0.01, "gamma": 0.1, "adjustment": 0.0,
                       "normalize_loss": false, "btl": false, "alpha": 0.2, "min_var_weight": 0.0})
}

fn sam() -> serde_json::Value {
    serde_json::json!({"use": "sam.sam", "rho": 0.05, "m": 0})
}

fn request(run_dir: &Path, epochs: u32) -> JobRequest {
    request_with(run_dir, epochs, group_dro(), sam())
}

fn request_with(run_dir: &Path, epochs: u32, objective: serde_json::Value, step_rule: serde_json::Value) -> JobRequest {
    let config = serde_json::json!({
        "task": "train",
        "data": {"name": "spurious", "n_train": 512, "n_val": 0, "n_test": 256, "correlation": 0.9, "eval_correlation": 0.5,
                 "core_noise": 1.0, "spurious_noise": 0.1, "noise_dims": 0, "seed": 0},
        "model": {"name": "mlp", "hidden": [16], "activation": "relu", "norm": "batch"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "nesterov": false},
        "epochs": epochs,
        "batch_size": 32,
        "step_rule": step_rule,
        "batch_transform": {"use": "mixup.mixup", "alpha": 0.4},
        "objective": objective,
    });
    JobRequest {
        plugins: vec![plugin("sam"), plugin("mixup"), plugin("dro")],
        ..common::cpu_request(run_dir.to_path_buf(), "resume", "train", "resume-test", 3, config)
    }
}

/// Runs the worker; with `kill_after`, kills it with SIGKILL once the checkpoint after that
/// epoch is reported. Returns the events seen.
fn run(req: &JobRequest, kill_after: Option<u64>) -> Vec<Event> {
    std::fs::create_dir_all(&req.run_dir).unwrap();
    let file = req.run_dir.join("job.json");
    std::fs::write(&file, serde_json::to_vec(req).unwrap()).unwrap();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(req.run_dir.join("worker.log")).unwrap();
    let mut child = Command::new(worker())
        .args(["run", "--job"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut events = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let e = Event::from_line(&line.unwrap()).unwrap();
        let stop = matches!(e, Event::Checkpoint { epoch, .. } if Some(epoch) == kill_after);
        events.push(e);
        if stop {
            child.kill().unwrap();
            break;
        }
    }
    let status = child.wait().unwrap();
    if kill_after.is_none() {
        assert!(status.success(), "worker failed: {events:?}");
    }
    events
}

/// Metric values without the wall-clock timings (`time.*`), which no two runs share.
fn measured(values: &std::collections::BTreeMap<String, f64>) -> serde_json::Value {
    let kept: std::collections::BTreeMap<&String, &f64> =
        values.iter().filter(|(k, _)| !k.starts_with("time.")).collect();
    assert!(kept.len() < values.len(), "the worker reports its timings");
    serde_json::to_value(kept).unwrap()
}

fn finished(events: &[Event]) -> serde_json::Value {
    events
        .iter()
        .find_map(|e| match e {
            Event::Finished { summary } => Some(measured(summary)),
            _ => None,
        })
        .expect("a finished event")
}

fn series(events: &[Event]) -> Vec<(u64, serde_json::Value)> {
    let mut s: Vec<(u64, serde_json::Value)> = events
        .iter()
        .filter_map(|e| if let Event::Metrics { step, values } = e { Some((*step, measured(values))) } else { None })
        .collect();
    s.dedup();
    s
}

#[test]
fn a_killed_worker_resumes_with_identical_results() {
    // Group DRO's q and EMA, the dual χ² objective's learned η (with its pending gradient) and
    // SAF's logit buffer are plugin state; each runs under SAM (two passes) with mixup.
    let chi2 = serde_json::json!({"use": "dro.chi2", "rho": 1.0, "reg": 0.0, "dual": true, "eta_init": 0.0,
                                  "eta_lr": 0.05, "tol": 1e-4, "max_iter": 1000});
    // SAF's logit buffer is state too.
    let saf = serde_json::json!({"use": "sam.saf", "lambda": 0.3, "tau": 2.0, "minus_epoch": 1, "kl_start": 0,
                                 "kl_end": 300});
    // MESA's EMA teacher covers the BatchNorm buffers as well.
    let mesa = serde_json::json!({"use": "sam.mesa", "decay": 0.9, "lambda": 0.3, "tau": 2.0, "kl_start": 0,
                                  "kl_end": 360});
    // FSAM's Fisher mask is step-rule state (recomputed every 5 steps, so a resume lands
    // between two recomputations).
    let fsam = serde_json::json!({"use": "sam.fsam", "rho": 0.05, "keep_ratio": 0.2, "mask_iter": 5});
    for (name, objective, step_rule) in [
        ("group_dro", group_dro(), sam()),
        ("chi2", chi2, sam()),
        ("saf", saf, sam()),
        ("mesa", mesa, sam()),
        ("fsam", group_dro(), fsam),
        // fp16's dynamic loss scale (backed off from 2^24, grown every 7 finite steps) is
        // checkpointed with the run.
        ("fp16", group_dro(), sam()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let precision = |mut r: JobRequest| {
            if name == "fp16" {
                r.config["precision"] = serde_json::json!("fp16");
                r.config["loss_scale"] = serde_json::json!({"init": 16777216.0, "growth_interval": 7});
            }
            // The weights' average (with batch-norm statistics copied) and its update count.
            if name == "mesa" {
                r.config["ema"] = serde_json::json!({"decay": 0.95, "every": 2});
            }
            r
        };
        let reference = precision(request_with(&dir.path().join("a"), 6, objective.clone(), step_rule.clone()));
        let straight = run(&reference, None);
        let weights_a = std::fs::read(reference.run_dir.join("weights.safetensors")).unwrap();

        let interrupted = precision(request_with(&dir.path().join("b"), 6, objective, step_rule));
        let first = run(&interrupted, Some(3));
        assert!(!first.iter().any(|e| matches!(e, Event::Finished { .. })));
        assert!(!interrupted.run_dir.join("weights.safetensors").exists());
        let second = run(&interrupted, None);
        let resumed =
            second.iter().find_map(|e| if let Event::Resumed { epoch, .. } = e { Some(*epoch) } else { None });
        assert!(resumed.is_some_and(|e| e >= 3), "{name}: {second:?}");
        let weights_b = std::fs::read(interrupted.run_dir.join("weights.safetensors")).unwrap();
        assert!(weights_a == weights_b, "{name}: final weights differ after resume");
        if name == "mesa" {
            let average = |r: &JobRequest| std::fs::read(r.run_dir.join("weights_ema.safetensors")).unwrap();
            assert!(average(&reference) == average(&interrupted), "{name}: the weights' average differs after resume");
            assert!(average(&reference) != weights_a, "{name}: the average is not the weights");
        }
        assert_eq!(finished(&straight), finished(&second), "{name}");
        // The resumed worker reports every epoch again, identical to the uninterrupted run.
        assert_eq!(series(&straight), series(&second), "{name}");
        if name == "chi2" {
            assert!(finished(&straight)["dro.eta"].as_f64().is_some_and(|e| e != 0.0), "η was learned");
        }
        if name == "fp16" {
            let s = series(&straight);
            assert!(s[0].1["amp.skipped"].as_f64().is_some_and(|f| f > 0.0), "steps were skipped at 2^24");
            let scales: Vec<f64> = s.iter().map(|(_, v)| v["amp.loss_scale"].as_f64().unwrap()).collect();
            assert!(scales.windows(2).any(|w| w[1] > w[0]), "the scale grew again within the run: {scales:?}");
        }
        if name == "saf" || name == "mesa" {
            let key = format!("{name}.kl");
            assert!(finished(&straight)[key.as_str()].as_f64().is_some_and(|k| k > 0.0), "the KL term was on");
        }
    }
}

#[test]
fn a_truncated_checkpoint_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(&dir.path().join("c"), 4);
    let straight = run(&req, None);
    let weights = std::fs::read(req.run_dir.join("weights.safetensors")).unwrap();
    let last = req.run_dir.join("ckpt-000004.safetensors");
    let bytes = std::fs::read(&last).unwrap();
    std::fs::write(&last, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(req.run_dir.join("weights.safetensors")).unwrap();
    let again = run(&req, None);
    assert!(again.contains(&Event::Resumed { epoch: 3, step_in_epoch: 0, from_job: None }), "{again:?}");
    assert_eq!(std::fs::read(req.run_dir.join("weights.safetensors")).unwrap(), weights);
    assert_eq!(finished(&straight), finished(&again));
    let log = std::fs::read_to_string(req.run_dir.join("worker.log")).unwrap();
    assert!(log.contains("skipping checkpoint ckpt-000004: ckpt-000004.safetensors is truncated or corrupt"), "{log}");
}

/// Diffusion training resumes exactly too: a class-conditional UNet with label dropout and
/// DDPM-IP (a plugin noise transform drawing from the host's stream), Adam's moments, killed
/// after epoch 2 of 4.
#[test]
fn a_killed_diffusion_training_resumes_with_identical_results() {
    let request = |dir: &Path| {
        let mut r = request(dir, 4);
        r.config = serde_json::json!({
            "task": "train",
            "data": {"name": "digits", "n_val": 100, "n_test": 1597, "seed": 0},
            "model": {"name": "unet", "channels": [8, 16], "time_dim": 16},
            "diffusion": {"schedule": "linear", "timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02,
                          "prediction": "v", "conditional": true, "p_uncond": 0.2},
            "optimizer": {"name": "adam", "lr": 0.002, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
            "epochs": 4,
            "batch_size": 25,
            "batch_transform": {"use": "diffusion.ddpm_ip", "gamma": 0.1},
            "ema": {"decay": 0.99, "warmup": true},
        });
        r.plugins = vec![plugin("diffusion")];
        r
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = request(&dir.path().join("a"));
    let straight = run(&reference, None);
    let interrupted = request(&dir.path().join("b"));
    let first = run(&interrupted, Some(2));
    assert!(!first.iter().any(|e| matches!(e, Event::Finished { .. })));
    let second = run(&interrupted, None);
    assert!(second.contains(&Event::Resumed { epoch: 2, step_in_epoch: 0, from_job: None }), "{second:?}");
    let weights = |r: &JobRequest| std::fs::read(r.run_dir.join("weights.safetensors")).unwrap();
    assert!(weights(&reference) == weights(&interrupted), "final weights differ after resume");
    // The weights' average is checkpointed with its update count: the same after resuming.
    let average = |r: &JobRequest| std::fs::read(r.run_dir.join("weights_ema.safetensors")).unwrap();
    assert!(average(&reference) == average(&interrupted), "the weights' average differs after resume");
    assert!(average(&reference) != weights(&reference));
    assert_eq!(finished(&straight), finished(&second));
    assert_eq!(series(&straight), series(&second));
    assert!(series(&straight).iter().all(|(_, v)| v["val.ema.loss"].as_f64().is_some_and(f64::is_finite)));
    let losses: Vec<f64> = series(&straight).iter().map(|(_, v)| v["train.loss"].as_f64().unwrap()).collect();
    assert!(losses.len() == 4 && losses[3] < losses[0], "the loss went down: {losses:?}");
}
