//! `diffusion.nag` (docs/methods.md §3.11) through the real plugin boundary: the spec's vectors
//! for the combination of Z⁺ and Z⁻ (capped, below the cap, α = 0.5, the L2 variant), the time
//! window, s ≤ 1, and the mini cross-attention example (Z⁺ and Z⁻ formed from Q, K, V as the
//! host's attention forms them, then combined by the plugin).

use serde_json::json;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_host::testing::{built_plugin, instantiate, to_vec};

fn attend(params: serde_json::Value, pos: &[f64], neg: &[f64], rows: i64, t: f64) -> Option<Vec<f64>> {
    let plugin = xlab_plugin_host::load(&built_plugin("xlab_plugin_diffusion")).unwrap();
    let mut inst = instantiate(&plugin, "diffusion.nag", params);
    let shape = [1, rows, pos.len() as i64 / rows];
    let (p, n) = (Tensor::from_slice(pos).reshape(shape), Tensor::from_slice(neg).reshape(shape));
    let out = inst.attend(&p, &n, t, 999.0).unwrap_or_else(|e| panic!("attend: {e}"));
    out.map(|z| {
        assert_eq!(z.size(), shape.to_vec());
        to_vec(&z)
    })
}

fn close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < tol, "got {got:?}, want {want:?}");
    }
}

const POS: [f64; 4] = [1.0, -2.0, 0.5, 3.0];
const NEG: [f64; 4] = [0.5, -1.0, 1.5, 2.0];

#[test]
fn the_specs_capped_vector_with_each_alpha_and_norm() {
    let got = attend(json!({}), &POS, &NEG, 1, 999.0).unwrap();
    close(&got, &[1.375, -2.75, -0.354167, 3.70833], 1e-5);
    let got = attend(json!({"alpha": 0.5}), &POS, &NEG, 1, 999.0).unwrap();
    close(&got, &[1.75, -3.5, -1.20833, 4.41667], 1e-5);
    let got = attend(json!({"norm": "l2"}), &POS, &NEG, 1, 999.0).unwrap();
    close(&got, &[1.43666, -2.87333, -0.426108, 3.85222], 1e-5);
    // Exactly: Z̃ = [3, −6, −3.5, 7], r = 19.5/6.5 = 3 capped to 2.5.
    let want: Vec<f64> = [3.0, -6.0, -3.5, 7.0].iter().zip(POS).map(|(g, p)| 0.25 * g * 2.5 / 3.0 + 0.75 * p).collect();
    close(&attend(json!({}), &POS, &NEG, 1, 999.0).unwrap(), &want, 1e-12);
}

#[test]
fn the_specs_vector_below_the_cap() {
    let got = attend(json!({}), &[2.0, 1.0, -1.0, 0.5], &[1.8, 1.1, -0.9, 0.6], 1, 999.0).unwrap();
    close(&got, &[2.2, 0.9, -1.1, 0.4], 1e-12);
}

#[test]
fn every_token_is_normalized_on_its_own() {
    // Two tokens: the capped vector and the one below the cap, in one call.
    let pos = [POS, [2.0, 1.0, -1.0, 0.5]].concat();
    let neg = [NEG, [1.8, 1.1, -0.9, 0.6]].concat();
    let got = attend(json!({}), &pos, &neg, 2, 999.0).unwrap();
    close(&got, &[1.375, -2.75, -0.354167, 3.70833, 2.2, 0.9, -1.1, 0.4], 1e-5);
}

#[test]
fn the_time_window_and_a_scale_of_one_keep_the_positive_output() {
    // end = 0.5: on while t ≥ 0.5·999 = 499.5.
    assert!(attend(json!({"end": 0.5}), &POS, &NEG, 1, 600.0).is_some());
    assert!(attend(json!({"end": 0.5}), &POS, &NEG, 1, 499.0).is_none());
    assert!(attend(json!({"end": 1.0}), &POS, &NEG, 1, 0.0).is_some());
    assert!(attend(json!({"end": 0.0}), &POS, &NEG, 1, 998.0).is_none());
    assert!(attend(json!({"end": 0.0}), &POS, &NEG, 1, 999.0).is_some());
    assert!(attend(json!({"scale": 1.0}), &POS, &NEG, 1, 999.0).is_none());
}

/// softmax(QKᵀ/√d)V, as the host's cross-attention computes it (one head).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let q = q.unsqueeze(0).unsqueeze(0);
    let (k, v) = (k.unsqueeze(0).unsqueeze(0), v.unsqueeze(0).unsqueeze(0));
    Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false).squeeze_dim(0)
}

#[test]
fn the_specs_mini_cross_attention() {
    let m = |v: &[f64], r: i64| Tensor::from_slice(v).reshape([r, 2]).to_kind(Kind::Double);
    let q = m(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3);
    let zp = attention(&q, &m(&[1.0, 0.5, -0.5, 1.0], 2), &m(&[1.0, 2.0, 3.0, -1.0], 2));
    let zn = attention(&q, &m(&[0.2, -1.0, 1.0, 1.0], 2), &m(&[0.0, 1.0, 2.0, 2.0], 2));
    close(&to_vec(&zp), &[1.51437, 1.22845, 2.17496, 0.237563, 1.66048, 1.00928], 1e-5);
    close(&to_vec(&zn), &[1.27553, 1.63777, 1.60886, 1.80443, 1.75734, 1.87867], 1e-5);
    let got = attend(json!({}), &to_vec(&zp), &to_vec(&zn), 3, 999.0).unwrap();
    close(&got, &[1.75320, 0.819133, 2.27059, -0.690279, 1.56361, 0.139899], 1e-5);
}
