//! DDIM inversion end to end (`task: invert`): a class-conditional model trained on a 2-D
//! mixture maps held-out rows to latents that look standard normal, and DDIM maps them back to
//! the rows, closer with more steps; the latents file holds rows, latents and reconstruction.
//! The ways to wire it wrong are refused when the file is read, at their line.

use std::path::Path;

mod common;
use common::cmd;

fn query(store: &Path, metrics: &str) -> Vec<serde_json::Value> {
    let out = cmd(store).args(["query", "-e", "inversion", "--format", "json", "-m", metrics]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn metric(row: &serde_json::Value, name: &str) -> f64 {
    row["metrics"][name]["mean"].as_f64().unwrap_or_else(|| panic!("no {name}: {row}"))
}

const INVERSION: &str = r#"
name: inversion
defaults:
  data: {name: blobs, n_train: 1000, n_val: 100, n_test: 300, classes: 3, dim: 2, spread: 0.6}
stages:
  train:
    task: train
    model: {name: time_mlp, hidden: [64, 64]}
    optimizer: {name: adam, lr: 0.003}
    batch_size: 100
    epochs: 60
    diffusion: {timesteps: 200, conditional: true, p_uncond: 0.1}
  invert:
    needs: train
    task: invert
    denoiser: {name: trained}
    sampler: {use: diffusion.ddim_inverse, steps: 10}
    reconstruct: {use: diffusion.ddim, steps: 10, clip_sample: false}
    zip:
      sampler.steps: [10, 50]
      reconstruct.steps: [10, 50]
"#;

#[test]
fn held_out_rows_invert_to_normal_latents_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("inversion.yaml");
    std::fs::write(&file, INVERSION).unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("3 done, 0 skipped"), "{err}");
    let rows = query(
        &store,
        "invert.rows,invert.nfe,reconstruct.nfe,invert.latent_mean,invert.latent_std,invert.latent_ks,invert.recon_rmse,invert.recon_max_abs",
    );
    let by_steps = |n: f64| {
        rows.iter()
            .find(|r| r["stage"] == "invert" && metric(r, "invert.nfe") == n)
            .unwrap_or_else(|| panic!("no inversion with {n} steps: {rows:?}"))
    };
    let (coarse, fine) = (by_steps(10.0), by_steps(50.0));
    for r in [coarse, fine] {
        assert_eq!(metric(r, "invert.rows"), 300.0, "every held-out row: {r}");
        assert_eq!(metric(r, "reconstruct.nfe"), metric(r, "invert.nfe"), "{r}");
    }
    // The latents of rows the model fits are close to N(0, 1).
    assert!(metric(fine, "invert.latent_mean").abs() < 0.2, "{fine}");
    assert!((metric(fine, "invert.latent_std") - 1.0).abs() < 0.25, "{fine}");
    assert!(metric(fine, "invert.latent_ks") < 0.15, "{fine}");
    // And come back: the error is a small share of the data's spread, shrinking with the steps.
    let (e10, e50) = (metric(coarse, "invert.recon_rmse"), metric(fine, "invert.recon_rmse"));
    // (Measured: RMSE 0.349 at 10 steps, 0.094 at 50, against blobs of spread 0.6.)
    assert!(e50 < 0.15, "round-trip RMSE at 50 steps: {e50}");
    assert!(e50 < 0.5 * e10, "more steps, a closer round trip: {e10} at 10, {e50} at 50");
    assert!(metric(fine, "invert.recon_max_abs") >= e50);

    // The file: rows (data units), latents, reconstruction, one row each.
    let shown = common::stage_job_ids(&store, &file, "invert")
        .into_iter()
        .map(|id| {
            serde_json::from_slice::<serde_json::Value>(
                &cmd(&store).args(["show", &id, "--json"]).output().unwrap().stdout,
            )
            .unwrap()
        })
        .find(|j| j["config"]["sampler"]["steps"] == 50)
        .unwrap();
    assert_eq!(shown["config"]["task"], "invert");
    assert!(shown["artifacts"].to_string().contains("latents.safetensors"), "{}", shown["artifacts"]);
    let path = store.join("runs").join(shown["id"].as_str().unwrap()).join("latents.safetensors");
    let out = std::process::Command::new(common::python())
        .arg("-c")
        .arg(
            "import json, sys\nfrom safetensors.torch import load_file\nt = load_file(sys.argv[1])\n\
             print(json.dumps({k: list(v.shape) for k, v in t.items()} | \
             {'rmse': float(((t['reconstruction'] - t['rows']) ** 2).mean().sqrt())}))",
        )
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["rows", "latents", "reconstruction"] {
        assert_eq!(file[k], serde_json::json!([300, 2]), "{file}");
    }
    assert!((file["rmse"].as_f64().unwrap() - e50).abs() < 1e-4 * e50.max(1e-3) + 1e-6, "{file} vs {e50}");
}

#[test]
fn samplers_in_the_wrong_direction_or_with_options_they_lack_are_refused_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results");
    let train = "  train:\n    task: train\n    data: {name: two_moons}\n    model: {name: time_mlp}\n    \
                 optimizer: {name: adam}\n    diffusion: {timesteps: 100}\n";
    let stage = |task: &str, body: &str| {
        format!("  s:\n    needs: train\n    task: {task}\n    data: {{name: two_moons}}\n    denoiser: {{name: trained}}\n{body}")
    };
    let cases = [
        (
            stage("sample", "    samples: 4\n    sampler: {use: diffusion.ddim_inverse}\n"),
            "x.yaml:15:5: stages.s: sampler: `diffusion.ddim_inverse` maps data to noise; `task: sample` needs a sampler that maps noise to data",
            "run it in a stage with `task: invert`",
        ),
        (
            stage("invert", "    sampler: {use: diffusion.ddim, steps: 10}\n"),
            "x.yaml:14:5: stages.s: sampler: `task: invert` maps data to noise, and `diffusion.ddim` maps noise to data",
            "`sampler: {use: diffusion.ddim_inverse, steps: 50}`",
        ),
        (
            stage("invert", "    sampler: {use: diffusion.ddim_inverse}\n    reconstruct: {use: diffusion.ddim_inverse}\n"),
            "`reconstruct:` maps the latents back to data, and `diffusion.ddim_inverse` maps data to noise",
            "{use: diffusion.ddim, steps: 50, clip_sample: false}",
        ),
        (
            stage("sample", "    samples: 4\n    sampler: {use: diffusion.ddim}\n    reconstruct: {use: diffusion.ddim}\n"),
            "x.yaml:16:5: stages.s: `reconstruct` maps inverted latents back to data; it belongs to `task: invert`",
            "",
        ),
        (
            stage("invert", "    sampler: {use: diffusion.ddim_inverse}\n    guidance: {use: diffusion.cfg}\n"),
            "`guidance` belongs to `task: sample`; an inversion queries a conditional model with each row's own label",
            "",
        ),
        (
            // DualFast's options belong to the samplers it composes with.
            stage("sample", "    samples: 4\n    sampler: {use: diffusion.euler, dualfast_c_max: 0.5}\n"),
            "x.yaml:15:37: stages.s: sampler: unknown parameter `dualfast_c_max` of `diffusion.euler`",
            "`dualfast_c_max` is a parameter of `diffusion.ddim`, `diffusion.dpmpp_2m`, `diffusion.dpmpp_2m_sde`; `diffusion.euler` takes: steps,",
        ),
        (
            stage("invert", "    sampler: {use: diffusion.ddim_inverse, steps: 500}\n"),
            "500 steps is more than the 100 timesteps stage `train` trains with",
            "",
        ),
        (
            stage("invert", "    sampler: {use: diffusion.ddim_inverse, steps: 20}\n    reconstruct: {use: diffusion.ddim, steps: 300}\n"),
            "x.yaml:15:40: stages.s: 300 steps is more than the 100 timesteps",
            "",
        ),
    ];
    let file = dir.path().join("x.yaml");
    for (stages, want, hint) in cases {
        std::fs::write(&file, format!("name: x\nstages:\n{train}{stages}")).unwrap();
        let out = cmd(&store).arg("run").arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stages}\n{err}");
        assert!(err.contains(want), "{stages}\nwanted: {want}\ngot: {err}");
        assert!(err.contains(hint), "{stages}\nwanted hint: {hint}\ngot: {err}");
        assert!(!store.join("runs").exists(), "nothing ran: {err}");
    }
}
