//! Every plugin runs the conformance kit on its built library, plus its own exact checks.

use xlab_plugin_api::tch::Tensor;
use xlab_plugin_host::testing::{built_plugin, conformance, instantiate};

/// This package's library, `lib<package name>.so`, wherever cargo built it.
fn library() -> std::path::PathBuf {
    built_plugin(&env!("CARGO_PKG_NAME").replace('-', "_"))
}

#[test]
fn passes_the_conformance_kit() {
    conformance(&library());
}

#[test]
fn focal_loss_matches_its_definition() {
    let plugin = xlab_plugin_host::load(&library()).unwrap();
    let mut focal = instantiate(&plugin, "focal.focal", serde_json::json!({"gamma": 2.0}));
    // CE = ln 2 → p_t = 0.5 → weight 0.25; CE = 0 → weight 0.
    let ce = Tensor::from_slice(&[std::f32::consts::LN_2, 0.0]);
    let idx = Tensor::from_slice(&[0i64, 1]);
    let loss = focal.objective(&ce, &ce, None, &idx, true, &mut |_, _| {}).unwrap();
    let v = f64::try_from(loss).unwrap();
    assert!((v - 0.25 * std::f64::consts::LN_2 / 2.0).abs() < 1e-6, "{v}");
}
