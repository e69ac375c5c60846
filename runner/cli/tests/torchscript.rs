//! A model brought as TorchScript: PyTorch (the setup's venv) scripts a small network and writes
//! the data; xlab trains it with plain SGD over the rows in file order and must end on the weights
//! the same PyTorch loop reaches, name for name. A module with buffers is refused with the reason.

use std::path::Path;
use std::process::Command;

mod common;
use common::{cmd, python};

const SCRIPT: &str = r#"
import sys, json, numpy as np, torch
import torch.nn.functional as F
out = sys.argv[1]
torch.manual_seed(0)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.head = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(8, 3))
    def forward(self, x):
        return self.head(self.fc1(x))

class WithBn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)
    def forward(self, x):
        return self.bn(self.fc(x))

net = Net()
torch.jit.script(net).save(f"{out}/net.pt")
torch.jit.script(WithBn()).save(f"{out}/bn.pt")
# Modules that cannot serve the data: 5 input features where the rows have 4; 2 outputs for 3 classes.
torch.jit.script(torch.nn.Linear(5, 3)).save(f"{out}/wide.pt")
torch.jit.script(torch.nn.Linear(4, 2)).save(f"{out}/narrow.pt")
x = torch.randn(64, 4)
y = torch.randint(0, 3, (64,))
np.savez(f"{out}/rows.npz", x=x.numpy(), y=y.numpy())
# The loop xlab must match: SGD, batches of 16 of the first 56 rows in order, 3 epochs.
opt = torch.optim.SGD(net.parameters(), lr=0.1)
for epoch in range(3):
    for lo in range(0, 56, 16):
        opt.zero_grad()
        hi = min(lo + 16, 56)
        F.cross_entropy(net(x[lo:hi]), y[lo:hi]).backward()
        opt.step()
json.dump({k: v.flatten().tolist() for k, v in net.state_dict().items()}, open(f"{out}/expected.json", "w"))
"#;

/// The float32 tensors of a safetensors file, by name.
fn read_safetensors(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = serde_json::Map::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(info["dtype"], "F32", "{name}");
        let [a, b] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
        let vals: Vec<f32> = data[a..b].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        out.insert(name.clone(), serde_json::json!(vals));
    }
    out
}

#[test]
fn a_torchscript_module_trains_as_pytorch_trains_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `torch.jit.script` reads the classes' source, so the script runs from a file.
    std::fs::write(d.join("export.py"), SCRIPT).unwrap();
    let out = Command::new(python()).arg(d.join("export.py")).arg(d).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = d.join("ts.yaml");
    std::fs::write(
        &file,
        r#"
name: ts
defaults:
  data: {name: npz, path: rows.npz, n_test: 8}
stages:
  train:
    task: train
    model: {name: torchscript, path: net.pt}
    optimizer: {name: sgd, lr: 0.1}
    batch_size: 16
    epochs: 3
    shuffle: false
    deterministic: true
  eval:
    needs: train
    task: evaluate
"#,
    )
    .unwrap();
    let store = d.join("results");
    let run = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("2 done"), "{err}");
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("expected.json")).unwrap()).unwrap();
    let weights = std::fs::read_dir(store.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path().join("weights.safetensors"))
        .find(|p| p.exists())
        .unwrap();
    let got = read_safetensors(&weights);
    let names = |m: &serde_json::Map<String, serde_json::Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(expected.as_object().unwrap()), "PyTorch's state_dict names");
    for (name, want) in expected.as_object().unwrap() {
        for (a, b) in got[name].as_array().unwrap().iter().zip(want.as_array().unwrap()) {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() < 1e-5, "{name}: {a} vs {b}");
        }
    }
    // The evaluation stage scored the trained module on the test rows.
    let q = cmd(&store)
        .args(["query", "-e", "ts", "stage == \"eval\"", "--format", "json", "-m", "test.acc"])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    assert!(rows[0]["metrics"]["test.acc"]["mean"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{rows}");

    // A module with buffers is refused, saying why.
    std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace("net.pt", "bn.pt")).unwrap();
    let run = cmd(&store).arg("run").arg(&file).output().unwrap();
    assert!(!run.status.success());
    let logs: String = std::fs::read_dir(store.join("runs"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("worker.log")).ok())
        .collect();
    let all = format!("{}{logs}", String::from_utf8_lossy(&run.stderr));
    assert!(all.contains("it has buffers (e.g. BatchNorm running statistics)"), "{all}");

    // A module whose forward cannot take the rows, or returns the wrong number of logits, is a
    // mistake in the experiment with what the module said, found when `xlab run` checks the
    // jobs before starting any (not a panic, not a crash, not a failed sweep).
    for (module, said) in [
        ("wide.pt", "the TorchScript module's forward fails on a batch of shape [2, 4]"),
        ("narrow.pt", "the TorchScript module returns shape [2, 2] for a batch of shape [2, 4], not [2, 3]"),
    ] {
        let text = std::fs::read_to_string(&file).unwrap().replace("bn.pt", module).replace("net.pt", module);
        std::fs::write(&file, text).unwrap();
        let run = cmd(&store).arg("run").arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&run.stderr).into_owned();
        assert_eq!(run.status.code(), Some(2), "{err}");
        assert!(err.contains(said) && err.contains("ts.yaml:") && !err.contains("panicked"), "{module}: {err}");
        std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace(module, "bn.pt")).unwrap();
    }
}

const DENOISERS: &str = r#"
import sys, torch
import torch.nn.functional as F
out = sys.argv[1]
torch.manual_seed(0)

class Conditional(torch.nn.Module):
    """eps(x, t, y) for 2-d rows of 2 classes (label 2 is the null label)."""
    def __init__(self):
        super().__init__()
        self.time = torch.nn.Linear(1, 16)
        self.label = torch.nn.Embedding(3, 16)
        self.body = torch.nn.Sequential(torch.nn.Linear(2 + 16, 64), torch.nn.SiLU(), torch.nn.Dropout(0.1),
                                        torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
    def forward(self, x, t, y):
        e = F.silu(self.time(t[:, None] / 100.0)) + self.label(y)
        return self.body(torch.cat([x, e], dim=1))

class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
    def forward(self, x, t):
        return self.body(torch.cat([x, t[:, None] / 100.0], dim=1))

class Wrong(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(3, 3)
    def forward(self, x, t):
        return self.out(torch.cat([x, t[:, None]], dim=1))

torch.jit.script(Conditional()).save(f"{out}/conditional.pt")
torch.jit.script(Plain()).save(f"{out}/plain.pt")
torch.jit.script(Wrong()).save(f"{out}/wrong.pt")
"#;

/// A denoiser of the user's as TorchScript: trained with `diffusion:` (conditional, with label
/// dropout, and unconditional), sampled by a stage that `needs:` it (with guidance), its
/// weights written and reloaded; one that answers in the wrong shape is refused before anything
/// runs.
#[test]
fn a_torchscript_denoiser_trains_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("export.py"), DENOISERS).unwrap();
    let out = Command::new(python()).arg(d.join("export.py")).arg(d).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let experiment = |model: &str, conditional: bool| {
        format!(
            "name: own\ndefaults:\n  data: {{name: two_moons, n_train: 512, n_val: 128, n_test: 256}}\nstages:\n  \
             train:\n    task: train\n    model: {{name: torchscript, path: {model}}}\n    \
             diffusion: {{timesteps: 100, conditional: {conditional}{}}}\n    \
             optimizer: {{name: adam, lr: 0.003}}\n    batch_size: 64\n    epochs: 6\n  sample:\n    needs: train\n    \
             task: sample\n    denoiser: {{name: trained}}\n    samples: 256\n    \
             sampler: {{use: diffusion.ddim, steps: 20}}\n{}",
            if conditional { ", p_uncond: 0.2" } else { "" },
            if conditional { "    guidance: {use: diffusion.cfg, guidance_scale: 1.5}\n" } else { "" }
        )
    };
    for (model, conditional) in [("conditional.pt", true), ("plain.pt", false)] {
        let store = d.join(format!("results-{model}"));
        let file = d.join(format!("{model}.yaml"));
        std::fs::write(&file, experiment(model, conditional)).unwrap();
        let out = cmd(&store).arg("run").arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{model}: {err}");
        let q = cmd(&store).args(["query", "--format", "json"]).output().unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
        let rows = rows.as_array().unwrap();
        let train = rows.iter().find(|r| r["stage"] == "train").unwrap();
        let sample = rows.iter().find(|r| r["stage"] == "sample").unwrap();
        assert!(train["metrics"]["val.loss"]["mean"].as_f64().unwrap() < 0.9, "{model}: {train}");
        // Samples of two moons scored against held-out rows: close, not noise.
        let swd = sample["metrics"]["sample.swd"]["mean"].as_f64().unwrap();
        eprintln!("{model}: val.loss {}, sample.swd {swd}", train["metrics"]["val.loss"]["mean"]);
        assert!(swd.is_finite() && swd < 0.3, "{model}: {sample}");
        // The weights file holds the module's parameters by their PyTorch names.
        let ids = cmd(&store)
            .args(["query", "stage == \"train\"", "--group-by", "id", "--agg", "count()", "--format", "csv"])
            .output()
            .unwrap();
        let id = String::from_utf8_lossy(&ids.stdout).lines().nth(1).unwrap().split(',').next().unwrap().to_string();
        let weights = read_safetensors(&store.join("runs").join(&id).join("weights.safetensors"));
        let names: Vec<&String> = weights.keys().collect();
        assert!(names.iter().any(|n| n.starts_with("body.0.")), "{model}: {names:?}");
        assert_eq!(names.iter().any(|n| n.starts_with("label.")), conditional, "{model}: {names:?}");
    }
    // A denoiser that answers 3 values per row of 2: refused by `xlab validate`, at its line.
    let file = d.join("wrong.yaml");
    std::fs::write(&file, experiment("wrong.pt", false)).unwrap();
    let out = cmd(&d.join("results-wrong")).arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("returns 3 values per row for x [2, 2], not 2") && err.contains("forward takes (x, t)"),
        "{err}"
    );
}
