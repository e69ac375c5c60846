//! Image datasets from their standard files, written by the test: a CIFAR-10 binary folder
//! trains a WideResNet and a ResNet-18 with crop-and-flip augmentation end to end, and the jobs'
//! identity follows the files' content.

use std::path::Path;

mod common;
use common::cmd;

/// A CIFAR-10 folder of `per_file` images per batch file whose class is readable from the
/// image: class k has a bright square at row/column 3k (with noise elsewhere).
fn write_cifar(dir: &Path, per_file: usize, salt: u8) {
    std::fs::create_dir_all(dir).unwrap();
    let mut s = 0x9E37_79B9u32 ^ u32::from(salt);
    let mut noise = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s % 64) as u8
    };
    let files = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (f, name) in files.iter().enumerate() {
        let mut bytes = Vec::new();
        for i in 0..per_file {
            let label = ((f * per_file + i) % 10) as u8;
            bytes.push(label);
            for _c in 0..3 {
                for y in 0..32 {
                    for x in 0..32 {
                        let on = (3 * label as usize..3 * label as usize + 3).contains(&y)
                            && (3 * label as usize..3 * label as usize + 3).contains(&x);
                        bytes.push(if on { 255 } else { noise() });
                    }
                }
            }
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn cifar_folders_train_wideresnet_and_resnet18_with_augmentation() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(&dir.path().join("cifar"), 40, 0);
    let file = dir.path().join("images.yaml");
    std::fs::write(
        &file,
        r#"
name: images
defaults:
  task: train
  data: {name: cifar10, path: cifar, n_val: 20}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  augment: {crop: 4, flip: true}
  batch_size: 32
stages:
  wrn:
    model: {name: wrn, depth: 10, width: 1}
    epochs: 3
  resnet:
    model: {name: resnet18, norm: group}
    epochs: 1
"#,
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 done, 0 skipped"), "{err}");
    let q = cmd(&store)
        .args(["query", "-e", "images", "--format", "json", "-m", "test.acc,train.examples,val.acc"])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    for r in rows.as_array().unwrap() {
        // 5 files × 40 images, 20 of them held out for validation.
        assert_eq!(r["metrics"]["train.examples"]["mean"], 180.0, "{r}");
        let acc = r["metrics"]["test.acc"]["mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r}");
    }

    // The plan hashes the folder: changed images are new jobs, the same images are not.
    let ids = |store: &Path| {
        let out = cmd(store).arg("plan").arg(&file).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = ids(&store);
    assert!(before.contains("stage `wrn`: 1 job(s): 1 done"), "{before}");
    write_cifar(&dir.path().join("cifar"), 40, 1);
    let after = ids(&store);
    assert!(after.contains("stage `wrn`: 1 job(s): 1 new"), "{after}");

    // A model that needs images refuses tabular data before anything runs.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nstages:\n  a:\n    task: train\n    data: {name: two_moons}\n    model: {name: resnet18}\n    optimizer: {name: sgd}\n").unwrap();
    let out = cmd(&store).arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`model` is an image model, which needs image data"));
}
