//! The built-in image models against PyTorch definitions of the same architectures
//! (`tests/reference/torch_models.py`, run with the project's torch): the weights PyTorch saves
//! load into xlab's models by `state_dict` name with nothing missing or left over, the parameter
//! counts agree, and the logits agree in evaluation mode and in training mode.

use serde_json::json;
use std::path::Path;
use tch::{nn, Kind, Tensor};
use xlab_plan::config::{ModelConfig, Norm, ResNet, Wrn};

fn reference(dir: &Path, norm: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/torch_models.py");
    xlab_plugin_host::testing::run_python_reference(
        &script,
        &json!({"dir": dir, "seed": 0, "classes": 10, "norm": norm}),
    )
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn resnet18_and_wrn_match_pytorch() {
    for (norm, norm_name) in [(Norm::Batch, "batch"), (Norm::Group, "group")] {
        let dir = tempfile::tempdir().unwrap();
        let r = reference(dir.path(), norm_name);
        let x = Tensor::from_slice(&floats(&r["input"])).reshape([4, 3 * 32 * 32]);
        let models = [
            ("resnet18", ModelConfig::Resnet18(ResNet { norm })),
            ("wrn", ModelConfig::Wrn(Wrn { depth: 16, width: 2, norm })),
        ];
        for (name, cfg) in models {
            let mut vs = nn::VarStore::new(tch::Device::Cpu);
            let model = xlab_worker::model::build(&vs.root(), &cfg, 3 * 32 * 32, Some([3, 32, 32]), 10);
            let file = dir.path().join(format!("{name}.safetensors"));
            let theirs: Vec<String> = Tensor::read_safetensors(&file).unwrap().into_iter().map(|(n, _)| n).collect();
            let mut ours: Vec<String> = vs.variables().into_keys().collect();
            let mut theirs_sorted = theirs.clone();
            ours.sort();
            theirs_sorted.sort();
            assert_eq!(ours, theirs_sorted, "{name} ({norm_name}): state_dict names");
            vs.load(&file).unwrap();
            assert_eq!(
                xlab_worker::model::parameter_count(&vs),
                r[name]["params"].as_i64().unwrap(),
                "{name} ({norm_name}): parameters"
            );
            for (mode, train) in [("eval", false), ("train", true)] {
                let got = tch::no_grad(|| model.forward_t(&x, train)).to_kind(Kind::Float).flatten(0, -1);
                let want = Tensor::from_slice(&floats(&r[name][mode]));
                let diff = f64::try_from((&got - &want).abs().max()).unwrap();
                let scale = f64::try_from(want.abs().max()).unwrap();
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "{name} ({norm_name}, {mode}): logits differ by {diff} (scale {scale})"
                );
            }
        }
    }
}
