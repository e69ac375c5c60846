//! An experiment on a folder of image files, as a new user would write it from the README: it
//! trains a CNN with crop-and-flip augmentation and learns the classes, in memory and streamed
//! batch by batch to the same bytes, and the folder's content is part of the jobs' identity (an
//! edited image makes the jobs new again).

use std::path::Path;

mod common;
use common::{cmd, python, snapshot, stage_job_ids, weights};

/// Two classes told apart by which colour dominates, as PNG and JPEG files of several sizes.
const MAKE: &str = r#"
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(0)
for split, per in [("train", 40), ("test", 12)]:
    for k, cls in enumerate(["blue", "red"]):
        d = os.path.join(root, split, cls)
        os.makedirs(d)
        for i in range(per):
            h, w = (int(v) for v in rng.integers(12, 30, 2))
            px = rng.integers(0, 100, (h, w, 3))
            px[:, :, 2 * (1 - k)] += 150
            im = Image.fromarray(px.astype(np.uint8), "RGB")
            im.save(os.path.join(d, f"{i:03d}." + ("png" if i % 2 else "jpg")))
"#;

#[test]
fn a_cnn_trains_on_an_image_folder_and_the_folder_is_part_of_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("shapes");
    let made = std::process::Command::new(python()).arg("-c").arg(MAKE).arg(&images).status().unwrap();
    assert!(made.success());
    let file = dir.path().join("folder.yaml");
    std::fs::write(
        &file,
        "name: folder\ndefaults:\n  task: train\n  data: {name: image_folder, path: shapes, size: [16, 16], n_val: 8}\n  \
         model: {name: cnn, channels: [8, 16]}\n  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}\n  epochs: 4\n  \
         batch_size: 16\n  augment: {crop: 2, flip: true}\nstages:\n  cnn: {}\n  streamed: {data: {stream: true}}\n",
    )
    .unwrap();
    let store = dir.path().join("results");
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let q = cmd(&store).args(["query", "-e", "folder", "--format", "json"]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    let metric = |name: &str| rows[0]["metrics"][name]["mean"].as_f64().unwrap_or_else(|| panic!("{name}: {rows}"));
    assert!(metric("test.acc") >= 0.9, "the colours are easy to tell apart: {rows}");
    assert_eq!(metric("train.examples"), 72.0, "80 training images less the 8 drawn for validation");
    let plan = |store: &Path| {
        let o = cmd(store).arg("plan").arg(&file).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(plan(&store).matches(": 1 done").count(), 2, "{}", plan(&store));
    // Read batch by batch (`stream: true`), training computes the same bytes.
    let (memory, streamed) = (stage_job_ids(&store, &file, "cnn"), stage_job_ids(&store, &file, "streamed"));
    let same = |mut v: Vec<serde_json::Value>| {
        v.iter_mut().for_each(|j| j["id"] = serde_json::Value::Null);
        v
    };
    assert_eq!(same(snapshot(&store, &memory)), same(snapshot(&store, &streamed)), "every metric series");
    assert_eq!(weights(&store, &memory), weights(&store, &streamed), "the final weights");
    // An edited image: the job is another one.
    let one = images.join("train/red/001.png");
    let mut bytes = std::fs::read(&one).unwrap();
    bytes.push(0);
    std::fs::write(&one, bytes).unwrap();
    let now = plan(&store);
    assert!(now.matches("1 new").count() == 2 && !now.contains("done"), "{now}");
    // A corrupt image stops the run before anything runs, naming the file.
    std::fs::write(&one, b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let out = cmd(&store).arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("train/red/001.png") && err.contains("not a valid PNG"), "{err}");
}
