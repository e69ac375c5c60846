//! Every built-in model, and a TorchScript module, trains on every data format, from real files the test writes: MNIST-style
//! IDX (gzipped and not), CIFAR-10 and CIFAR-100 binaries, NPZ and CSV. Each image's class is
//! readable from it (a bright square whose place depends on the class), and the CSV rows are
//! separable, so the test also checks that training learns.

use flate2::write::GzEncoder;
use std::io::Write;
use std::path::Path;
use std::process::Command;

mod common;
use common::{cmd, files_under, python};

/// Pixel bytes of `n` single-channel or RGB images of side `side` with labels `0..classes` in
/// turn: class k has a bright 2×2 square at row and column 2·(k mod side/2), noise elsewhere.
fn images(n: usize, channels: usize, side: usize, classes: usize, salt: u32) -> (Vec<u8>, Vec<u8>) {
    let mut s = 0x9E37_79B9u32 ^ salt;
    let mut noise = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s % 64) as u8
    };
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let label = i % classes;
        labels.push(label as u8);
        let at = 2 * (label % (side / 2));
        for _ in 0..channels {
            for y in 0..side {
                for x in 0..side {
                    let on = (at..at + 2).contains(&y) && (at..at + 2).contains(&x);
                    pixels.push(if on { 255 } else { noise() });
                }
            }
        }
    }
    (pixels, labels)
}

fn idx(dims: &[usize], bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
    out
}

fn write_idx(dir: &Path, gz: bool) {
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, n, salt) in [("train", 40, 1), ("t10k", 20, 2)] {
        let (x, y) = images(n, 1, 28, 10, salt);
        let files = [
            (format!("{prefix}-images-idx3-ubyte"), idx(&[n, 28, 28], &x)),
            (format!("{prefix}-labels-idx1-ubyte"), idx(&[n], &y)),
        ];
        for (name, bytes) in files {
            if gz {
                let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&bytes).unwrap();
                std::fs::write(dir.join(format!("{name}.gz")), e.finish().unwrap()).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
}

fn cifar_records(n: usize, classes: usize, label_bytes: usize, salt: u32) -> Vec<u8> {
    let (x, y) = images(n, 3, 32, classes, salt);
    let mut out = Vec::new();
    for (i, label) in y.iter().enumerate() {
        // CIFAR-100 records start with the coarse label, then the fine one.
        out.extend(std::iter::repeat_n(*label / 5, label_bytes - 1));
        out.push(*label);
        out.extend_from_slice(&x[i * 3072..(i + 1) * 3072]);
    }
    out
}

fn write_cifar10(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{i}.bin")), cifar_records(8, 10, 1, i)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar_records(10, 10, 1, 9)).unwrap();
}

fn write_cifar100(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("train.bin"), cifar_records(40, 100, 2, 3)).unwrap();
    std::fs::write(dir.join("test.bin"), cifar_records(20, 100, 2, 4)).unwrap();
}

/// 60 rows of 8×8 images in 4 classes, with a group column (class parity) and names as labels.
fn write_csv(path: &Path) {
    let names = ["ant", "bee", "cat", "dog"];
    let (x, y) = images(60, 1, 8, 4, 5);
    let mut text = String::from("label,group");
    for p in 0..64 {
        text.push_str(&format!(",p{p}"));
    }
    text.push('\n');
    for (i, label) in y.iter().enumerate() {
        text.push_str(&format!("{},{}", names[*label as usize], label % 2));
        for p in &x[i * 64..(i + 1) * 64] {
            text.push_str(&format!(",{}", f32::from(*p) / 255.0));
        }
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

fn write_npz(path: &Path) {
    let (x, y) = images(60, 1, 8, 4, 6);
    let script = format!(
        "import numpy as np\nx = np.array({x:?}, dtype=np.uint8).reshape(60, 8, 8) / 255.0\n\
         y = np.array({y:?}, dtype=np.int64)\nnp.savez({:?}, x=x.astype(np.float32), y=y, group=y % 2)\n",
        path.to_str().unwrap()
    );
    let out = Command::new(python()).arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A TorchScript model for any of the test's images: channels averaged, one convolution, pooled
/// to 2×2, and 100 logits (as many as CIFAR-100 has classes; fewer classes leave some unused).
const TORCHSCRIPT: &str = r#"
import sys, torch
import torch.nn.functional as F
class AnyImage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(32, 100)
    def forward(self, x):
        h = F.relu(self.conv(x.mean(1, keepdim=True)))
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))
torch.manual_seed(0)
torch.jit.script(AnyImage()).save(sys.argv[1])
"#;

fn write_torchscript(dir: &Path) {
    // `torch.jit.script` reads the class's source, so the script runs from a file.
    std::fs::write(dir.join("export.py"), TORCHSCRIPT).unwrap();
    let out = Command::new(python()).arg(dir.join("export.py")).arg(dir.join("any.pt")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_model_trains_on_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_idx(&d.join("idx"), false);
    write_idx(&d.join("idx-gz"), true);
    write_cifar10(&d.join("cifar10"));
    write_cifar100(&d.join("cifar100"));
    write_csv(&d.join("rows.csv"));
    write_npz(&d.join("rows.npz"));
    write_torchscript(d);
    let file = d.join("formats.yaml");
    std::fs::write(
        &file,
        r#"
name: formats
defaults:
  task: train
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  batch_size: 16
  epochs: 1
stages:
  matrix:
    grid:
      data:
        - {name: idx, path: idx, n_val: 10}
        - {name: idx, path: idx-gz}
        - {name: cifar10, path: cifar10, n_val: 4}
        - {name: cifar100, path: cifar100}
        - {name: npz, path: rows.npz, n_val: 10, n_test: 10, image: [1, 8, 8]}
        - {name: csv, path: rows.csv, group: group, n_val: 10, n_test: 10, image: [1, 8, 8]}
      model:
        - {name: mlp, hidden: [16]}
        - {name: cnn, channels: [4, 8]}
        - {name: resnet18, norm: group}
        - {name: wrn, depth: 10, width: 1}
        - {name: torchscript, path: any.pt}
  learns:
    data: {name: csv, path: rows.csv, group: group, n_val: 10, n_test: 10}
    model: {name: mlp, hidden: [32]}
    epochs: 30
"#,
    )
    .unwrap();
    let store = d.join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("31 done, 0 skipped"), "{err}");
    let q = cmd(&store)
        .args(["query", "-e", "formats", "--format", "json", "-m", "train.examples,test.acc,test.worst_class_recall"])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 31);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for r in rows {
        let examples = r["metrics"]["train.examples"]["mean"].as_f64().unwrap();
        let acc = r["metrics"]["test.acc"]["mean"].as_f64().unwrap();
        let worst = r["metrics"]["test.worst_class_recall"]["mean"].as_f64().unwrap();
        if r["stage"] == "learns" {
            // The CSV classes are separable: 30 epochs of an MLP get every test row right.
            assert_eq!((examples, acc, worst), (40.0, 1.0, 1.0), "{r}");
            continue;
        }
        // The sweep point is the grid's data and model.
        let point = &r["point"];
        let name = |v: &serde_json::Value| v.as_str().unwrap_or_else(|| panic!("{r}")).to_string();
        let (data, model) = (name(&point["data"]["name"]), name(&point["model"]["name"]));
        let (data, model) = (data.as_str(), model.as_str());
        *seen.entry(format!("{data}/{}/{model}", name(&point["data"]["path"]))).or_default() += 1;
        let expected = match (data, name(&point["data"]["path"]).as_str()) {
            ("idx", "idx") => 30.0,
            ("idx", _) | ("cifar100", _) | ("npz", _) | ("csv", _) => 40.0,
            ("cifar10", _) => 36.0,
            other => panic!("unexpected data {other:?}"),
        };
        assert_eq!(examples, expected, "{data}/{model}: {r}");
        assert!((0.0..=1.0).contains(&acc) && worst <= acc, "{data}/{model}: {r}");
    }
    // 6 formats × 5 models, once each.
    assert_eq!(seen.len(), 30, "{seen:?}");

    // The CSV's group column gives group metrics, and each class its recall.
    let show =
        cmd(&store).args(["query", "-e", "formats", "stage == \"learns\"", "--format", "json"]).output().unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    for key in ["test.group_acc.1", "test.worst_group_acc", "test.class_recall.3", "train.class_recall.0"] {
        assert!(text.contains(key), "{key} missing: {text}");
    }
}

#[test]
fn csv_mistakes_name_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("bad.csv"), "label,a,b\n0,1.0,2.0\n1,3.0,x\n0,1.0,2.0\n1,1.0,2.0\n").unwrap();
    std::fs::write(d.join("nolabel.csv"), "y,a\n0,1.0\n1,2.0\n").unwrap();
    let store = d.join("results");
    for (file, expect) in [
        ("bad.csv", "bad.csv:3: column `b` holds `x`, which is not a number"),
        ("nolabel.csv", "has no label column `label`; its columns are y, a"),
    ] {
        let yaml = d.join("e.yaml");
        std::fs::write(
            &yaml,
            format!(
                "name: e\nstages:\n  a:\n    task: train\n    data: {{name: csv, path: {file}, n_test: 1}}\n    \
                 model: {{name: mlp}}\n    optimizer: {{name: sgd}}\n"
            ),
        )
        .unwrap();
        let out = cmd(&store).arg("run").arg(&yaml).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        let log = walk_logs(&store);
        assert!(err.contains(expect) || log.contains(expect), "{expect}:\n{err}\n{log}");
    }
}

/// Every job log under the store, concatenated.
fn walk_logs(store: &Path) -> String {
    let logs = files_under(store).into_iter().filter(|p| p.extension().is_some_and(|x| x == "log"));
    logs.map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
}
