//! The experiment-file front end never panics, whatever the text: YAML parsing, includes,
//! merging, sweeps, validation and job identity (`make fuzz` runs it for longer; see the
//! xlab-fuzz crate).

use std::path::Path;
use xlab_proto::plugins::Registry;

#[test]
fn fuzz_experiment_files() {
    let dict: &[&[u8]] = &[
        b"name: ",
        b"stages:",
        b"defaults:",
        b"\n  ",
        b"\n    ",
        b"task: train",
        b"task: evaluate",
        b"task: sample",
        b"data: {name: two_moons}",
        b"model: {name: mlp, hidden: [8]}",
        b"optimizer: {name: sgd, lr: 0.1}",
        b"epochs: ",
        b"seeds: ",
        b"grid: {optimizer.lr: [0.1, 0.2]}",
        b"zip: {epochs: [1, 2]}",
        b"random: {samples: 3, optimizer.lr: loguniform(1e-4, 1e-1)}",
        b"variants: [{optimizer: {name: adam}}]",
        b"needs: {stage: a, select: best, metric: val.acc}",
        b"needs: a",
        b"${defaults.epochs}",
        b"${parent.seed}",
        b"include: [x.yaml]",
        b"null",
        b"~",
        b"&a ",
        b"*a",
        b"<<: *a",
        b"!!binary",
        b"{",
        b"}",
        b"[",
        b"]",
        b": ",
        b"- ",
        b"#",
        b"\t",
        b"step_timeout: 2s",
        b"timeout: 30m",
        b"resources: {slots: 2}",
        b"checkpoint: {every_epochs: 2}",
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.yaml");
    xlab_fuzz::check("spec", dict, 3_000, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        xlab_plan::load_str(Path::new(&path), &text, &mut Registry::default()).map(|_| ()).map_err(|e| e.to_string())
    });
}
