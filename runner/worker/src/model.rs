//! Built-in models. Parameter names follow PyTorch's `state_dict` names of the equivalent
//! `nn.Module` (a model is `layers = nn.Sequential(...)`, so `layers.0.weight`,
//! `layers.1.running_mean`), so weights exported as safetensors load into PyTorch unchanged.
//!
//! Normalization layers carry the NORM tag for step rules (SAM-ON), and BatchNorm honours the
//! host's freeze: while frozen (extra passes of SAM-like rules) it normalizes with batch
//! statistics but leaves its running statistics alone (momentum 0, as the references do).

use std::cell::Cell;
use tch::{nn, Tensor};
use xlab_spec::config::{Activation, ModelConfig, Norm};

/// BatchNorm over dimension 1 (features or channels), as `nn.BatchNorm1d/2d`.
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

enum Layer {
    /// Weight and bias (convolutions: 3×3, stride 1, padding 1).
    Linear(Tensor, Tensor),
    Conv(Tensor, Tensor),
    Batch(BatchNorm),
    /// LayerNorm: weight, bias and the normalized shape.
    Norm(Tensor, Tensor, Vec<i64>),
    Act(Activation),
    MaxPool,
    Flatten,
}

pub struct Model {
    layers: Vec<Layer>,
    /// (channels, height, width) the flat input rows are reshaped to, for convolutions.
    image: Option<[i64; 3]>,
    frozen: Cell<bool>,
}

const BN_MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

impl Model {
    /// Logits; `train` selects batch statistics (and their running update) in BatchNorm.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.run(x, train, &|_, t| t.shallow_clone())
    }

    /// Logits in evaluation mode with other values for the model's variables: `vars` maps a
    /// variable's name (`layers.N.weight`, `layers.N.running_mean`, ...) to the tensor to use.
    /// The model's own variables are not touched.
    pub fn forward_with(&self, x: &Tensor, vars: &std::collections::HashMap<String, Tensor>) -> Tensor {
        self.run(x, false, &|name: &str, own: &Tensor| {
            vars.get(name).map_or_else(|| own.shallow_clone(), |t| t.shallow_clone())
        })
    }

    fn run(&self, x: &Tensor, train: bool, var: &dyn Fn(&str, &Tensor) -> Tensor) -> Tensor {
        let mut h = match self.image {
            Some([c, hh, w]) => x.reshape([-1, c, hh, w]),
            None => x.shallow_clone(),
        };
        for (i, l) in self.layers.iter().enumerate() {
            let v = |name: &str, own: &Tensor| var(&format!("layers.{i}.{name}"), own);
            h = match l {
                Layer::Linear(w, b) => h.linear(&v("weight", w), Some(v("bias", b))),
                Layer::Conv(w, b) => h.conv2d(&v("weight", w), Some(v("bias", b)), [1, 1], [1, 1], [1, 1], 1),
                Layer::Norm(w, b, shape) => {
                    h.layer_norm(shape.as_slice(), Some(v("weight", w)), Some(v("bias", b)), EPS, false)
                }
                Layer::Batch(b) => {
                    if train {
                        tch::no_grad(|| {
                            let mut n = b.num_batches_tracked.shallow_clone();
                            let _ = n.g_add_scalar_(1);
                        });
                    }
                    let momentum = if self.frozen.get() { 0.0 } else { BN_MOMENTUM };
                    Tensor::batch_norm(
                        &h,
                        Some(&v("weight", &b.weight)),
                        Some(&v("bias", &b.bias)),
                        Some(&v("running_mean", &b.running_mean)),
                        Some(&v("running_var", &b.running_var)),
                        train,
                        momentum,
                        EPS,
                        false,
                    )
                }
                Layer::Act(Activation::Relu) => h.relu(),
                Layer::Act(Activation::Tanh) => h.tanh(),
                Layer::Act(Activation::Gelu) => h.gelu("none"),
                Layer::MaxPool => h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
                Layer::Flatten => h.flatten(1, -1),
            };
        }
        h
    }

    /// While frozen, BatchNorm keeps its running statistics.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.set(frozen);
    }
}

fn batch_norm(p: &nn::Path, n: i64) -> BatchNorm {
    BatchNorm {
        weight: p.ones("weight", &[n]),
        bias: p.zeros("bias", &[n]),
        running_mean: p.zeros_no_train("running_mean", &[n]),
        running_var: p.ones_no_train("running_var", &[n]),
        // A float here (tch variables are floats); PyTorch's `load_state_dict` converts it.
        num_batches_tracked: p.zeros_no_train("num_batches_tracked", &[]),
    }
}

fn layer_norm(p: &nn::Path, shape: Vec<i64>) -> Layer {
    Layer::Norm(p.ones("weight", &shape), p.zeros("bias", &shape), shape)
}

fn linear(p: &nn::Path, i: i64, o: i64) -> Layer {
    let l = nn::linear(p, i, o, Default::default());
    Layer::Linear(l.ws, l.bs.expect("linear layers have a bias"))
}

fn norm_layer(p: &nn::Path, norm: Norm, n: i64) -> Option<Layer> {
    match norm {
        Norm::None => None,
        Norm::Batch => Some(Layer::Batch(batch_norm(p, n))),
        Norm::Layer => Some(layer_norm(p, vec![n])),
    }
}

/// Builds the model's parameters under `root`; `image` is the input's (c, h, w) for images.
pub fn build(root: &nn::Path, cfg: &ModelConfig, input_dim: usize, image: Option<[i64; 3]>, classes: usize) -> Model {
    let layers_path = root / "layers";
    let mut layers = Vec::new();
    let at = |layers: &Vec<Layer>| &layers_path / layers.len();
    match cfg {
        ModelConfig::Mlp(m) => {
            let mut width = input_dim as i64;
            for &h in &m.hidden {
                let l = linear(&at(&layers), width, h as i64);
                layers.push(l);
                if let Some(n) = norm_layer(&at(&layers), m.norm, h as i64) {
                    layers.push(n);
                }
                layers.push(Layer::Act(m.activation));
                width = h as i64;
            }
            let l = linear(&at(&layers), width, classes as i64);
            layers.push(l);
            Model { layers, image: None, frozen: Cell::new(false) }
        }
        ModelConfig::Cnn(c) => {
            let [mut ch, mut h, mut w] = image.expect("cnn configs are checked to have image data");
            for &out in &c.channels {
                let conv =
                    nn::conv2d(at(&layers), ch, out as i64, 3, nn::ConvConfig { padding: 1, ..Default::default() });
                layers.push(Layer::Conv(conv.ws, conv.bs.expect("convolutions have a bias")));
                if let Some(n) = norm_layer(&at(&layers), c.norm, out as i64) {
                    // LayerNorm on images normalizes each channel map's (h, w).
                    let n = match n {
                        Layer::Norm(..) => layer_norm(&at(&layers), vec![h, w]),
                        other => other,
                    };
                    layers.push(n);
                }
                layers.push(Layer::Act(Activation::Relu));
                layers.push(Layer::MaxPool);
                ch = out as i64;
                h /= 2;
                w /= 2;
            }
            layers.push(Layer::Flatten);
            let l = linear(&at(&layers), ch * h * w, classes as i64);
            layers.push(l);
            Model { layers, image, frozen: Cell::new(false) }
        }
    }
}

/// Number of trainable scalar parameters.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

/// The tag a step rule sees for a named parameter.
pub fn tags_of(name: &str, norm_prefixes: &[String]) -> u32 {
    use xlab_plugin_api::abi::tags;
    if norm_prefixes.iter().any(|p| name.starts_with(p.as_str())) {
        tags::NORM
    } else if name.ends_with(".bias") {
        tags::BIAS
    } else {
        tags::WEIGHT
    }
}

impl Model {
    /// Name prefixes (`layers.N.`) of the normalization layers.
    pub fn norm_prefixes(&self) -> Vec<String> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l, Layer::Batch(_) | Layer::Norm(..)))
            .map(|(i, _)| format!("layers.{i}."))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;
    use xlab_spec::config::{Cnn, Mlp};

    fn names(vs: &nn::VarStore) -> Vec<String> {
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        names
    }

    #[test]
    fn mlp_uses_pytorch_sequential_names_and_shapes() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = ModelConfig::Mlp(Mlp { hidden: vec![8, 4], activation: Activation::Relu, norm: Norm::None });
        let m = build(&vs.root(), &cfg, 2, None, 3);
        assert_eq!(
            names(&vs),
            [
                "layers.0.bias",
                "layers.0.weight",
                "layers.2.bias",
                "layers.2.weight",
                "layers.4.bias",
                "layers.4.weight"
            ]
        );
        assert_eq!(vs.variables()["layers.2.weight"].size(), vec![4, 8]);
        assert_eq!(parameter_count(&vs), 2 * 8 + 8 + 8 * 4 + 4 + 4 * 3 + 3);
        let out = m.forward_t(&Tensor::zeros([5, 2], (Kind::Float, tch::Device::Cpu)), true);
        assert_eq!(out.size(), vec![5, 3]);
    }

    #[test]
    fn batch_norm_updates_running_statistics_unless_frozen_or_evaluating() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = ModelConfig::Mlp(Mlp { hidden: vec![4], activation: Activation::Relu, norm: Norm::Batch });
        let m = build(&vs.root(), &cfg, 2, None, 3);
        assert_eq!(m.norm_prefixes(), vec!["layers.1.".to_string()]);
        let x = Tensor::from_slice(&[1.0f32, 2.0, -3.0, 0.5, 2.0, 2.0, 0.0, -1.0]).reshape([4, 2]);
        let mean = || vs.variables()["layers.1.running_mean"].copy();
        let before = mean();
        m.set_frozen(true);
        let _ = m.forward_t(&x, true);
        assert!(mean().equal(&before), "frozen: running statistics unchanged");
        m.set_frozen(false);
        let _ = m.forward_t(&x, false);
        assert!(mean().equal(&before), "evaluation: running statistics unchanged");
        let _ = m.forward_t(&x, true);
        assert!(!mean().equal(&before), "training: running statistics move");
        assert_eq!(f64::try_from(&vs.variables()["layers.1.num_batches_tracked"]).unwrap(), 2.0);
        assert!(!vs.variables()["layers.1.running_mean"].requires_grad());
    }

    #[test]
    fn forward_with_uses_other_values_and_leaves_the_model_alone() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = ModelConfig::Mlp(Mlp { hidden: vec![4], activation: Activation::Tanh, norm: Norm::Batch });
        let m = build(&vs.root(), &cfg, 2, None, 3);
        let x = Tensor::from_slice(&[1.0f32, 2.0, -3.0, 0.5, 2.0, 2.0]).reshape([3, 2]);
        let vars = vs.variables();
        let doubled: std::collections::HashMap<String, Tensor> =
            vars.iter().map(|(n, t)| (n.clone(), t.detach() * 2.0 + 0.1)).collect();
        let before: Vec<(String, Tensor)> = vars.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
        let other = tch::no_grad(|| m.forward_with(&x, &doubled));
        for (n, t) in &before {
            assert!(vars[n].equal(t), "{n} changed");
        }
        // The same as a model that holds those values.
        tch::no_grad(|| {
            for (n, t) in &vars {
                t.shallow_clone().copy_(&doubled[n]);
            }
        });
        assert!(other.allclose(&m.forward_t(&x, false), 1e-6, 1e-6, false));
    }

    #[test]
    fn cnn_on_8x8_images() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = ModelConfig::Cnn(Cnn { channels: vec![8, 16], norm: Norm::Batch });
        let m = build(&vs.root(), &cfg, 64, Some([1, 8, 8]), 10);
        let n = names(&vs);
        assert!(n.contains(&"layers.0.weight".to_string()) && n.contains(&"layers.1.running_var".to_string()));
        assert!(n.contains(&"layers.9.weight".to_string()), "{n:?}");
        assert_eq!(vs.variables()["layers.9.weight"].size(), vec![10, 16 * 2 * 2]);
        let out = m.forward_t(&Tensor::zeros([3, 64], (Kind::Float, tch::Device::Cpu)), true);
        assert_eq!(out.size(), vec![3, 10]);
    }
}
