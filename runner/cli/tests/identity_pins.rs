//! Job identities of shipped experiments, pinned by hand. A store finds its done jobs by these
//! ids, so a change to how a config is resolved, canonicalised or hashed would silently rerun
//! every finished sweep. The `plan` snapshots pin the same ids but are re-blessed for any change
//! to `xlab plan`'s output; these are not: a change here is a migration, and needs one.

mod common;

use std::path::Path;

/// (experiment file, stage, the id of its first job), as xlab has given them since stores hold
/// data files by content (the first-hour change).
const PINS: &[(&str, &str, &str)] = &[
    ("quickstart", "train", "d37275a035bc65c1"),
    ("sam-family", "train", "711bc29a202d9055"),
    ("sam-family", "sharpness", "d4966ea745987102"),
    ("mixup-family", "digits", "711bc29a202d9055"),
    ("mixup-family", "spurious", "c8a16aa81500cddf"),
    ("dro-family", "erm", "2b7abd6947581bfe"),
    ("dro-family", "group_dro_selected", "593fad3a96718c1b"),
    ("dro-family", "jtt", "870a475294c5d31e"),
    ("diffusion-samplers", "mixture", "70826bb5fd2b2eed"),
    ("diffusion-samplers", "mixture_guided", "f0c8866435d4a011"),
    ("diffusion-samplers", "digits_classifier", "943247d275297a8b"),
    ("components", "sam", "d5b2bddff81cb6df"),
    ("components", "group_dro", "90d0794eb5d3b8fd"),
    ("components", "ddim", "71292a8089125f66"),
];

#[test]
fn shipped_experiments_keep_their_job_identities() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let store = tempfile::tempdir().unwrap();
    let mut wrong = Vec::new();
    for (file, stage, pinned) in PINS {
        let path = root.join("experiments").join(format!("{file}.yaml"));
        let ids = common::stage_job_ids(store.path(), &path, stage);
        if ids.first().map(String::as_str) != Some(*pinned) {
            wrong.push(format!("{file}.yaml stage `{stage}`: first job {:?}, pinned {pinned}", ids.first()));
        }
    }
    assert!(wrong.is_empty(), "job identities changed:\n{}", wrong.join("\n"));
}
