//! `sam.sam` through the real plugin boundary: the built .so, loaded by the host's loader.

use xlab_plugin_host::testing::{built_plugin, conformance, instantiate, QuadraticDriver};

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn passes_the_conformance_kit() {
    conformance(&built_plugin("xlab_plugin_sam"));
}

/// docs/methods.md §1.1: L = ½(w₁² + 2w₂²), w = (3, 4): g = (3, 8), ‖g‖ = 8.5440037453.
#[test]
fn sam_matches_the_quadratic_test_vector() {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_sam")).unwrap();
    for (rho, g_sam, w_new) in [
        (0.05, [3.0175561721, 8.0936329178], Some([2.6982443828, 3.1906367082])),
        (0.5, [3.1755617208, 8.9363291776], None),
    ] {
        let mut sam = instantiate(&plugin, "sam.sam", serde_json::json!({ "rho": rho }));
        let mut d = QuadraticDriver::new(&[("w", &[3.0, 4.0], &[1.0, 2.0])], 0.1);
        sam.step(&mut d, 0, 0).unwrap();
        assert_eq!(d.passes, 2, "2F+2B");
        assert_eq!(d.frozen_passes, 1, "normalization statistics frozen in the second pass only");
        assert!(close(&d.grads_seen[0][0], &[3.0, 8.0], 1e-12));
        assert!(close(&d.grads_seen[1][0], &g_sam, 1e-9), "rho {rho}: g_SAM {:?}", d.grads_seen[1][0]);
        if let Some(w) = w_new {
            assert!(close(&d.weights()[0], &w, 1e-9), "{:?}", d.weights());
        }
        let norm = d.logged.iter().find(|(k, _)| k == "sam.grad_norm").unwrap().1;
        assert!((norm - 8.5440037453).abs() < 1e-9);
    }
}

#[test]
fn the_norm_is_global_over_all_parameters() {
    // docs/methods.md §1.1's comparison: tensors a (g = (3,4)) and b (g = (0,1)), ρ = 0.5 gives
    // e_a = (0.2941742, 0.3922323), e_b = (0, 0.0980581).
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_sam")).unwrap();
    let mut sam = instantiate(&plugin, "sam.sam", serde_json::json!({ "rho": 0.5 }));
    let mut d = QuadraticDriver::new(&[("a", &[3.0, 4.0], &[1.0, 1.0]), ("b", &[0.0, 1.0], &[1.0, 1.0])], 0.1);
    sam.step(&mut d, 0, 0).unwrap();
    // With unit curvature the second-pass gradient is w + e, so e = g_SAM − w.
    let e_a: Vec<f64> = d.grads_seen[1][0].iter().zip([3.0, 4.0]).map(|(g, w)| g - w).collect();
    let e_b: Vec<f64> = d.grads_seen[1][1].iter().zip([0.0, 1.0]).map(|(g, w)| g - w).collect();
    assert!(close(&e_a, &[0.2941742, 0.3922323], 1e-7), "{e_a:?}");
    assert!(close(&e_b, &[0.0, 0.0980581], 1e-7), "{e_b:?}");
}
