//! Built-in models. Parameter names follow PyTorch's `state_dict` names of the equivalent
//! `nn.Module` (an MLP is `layers = nn.Sequential(...)`, so `layers.0.weight`, `layers.2.bias`),
//! so weights exported as safetensors load into PyTorch unchanged.

use tch::nn;
use xlab_spec::config::{Activation, ModelConfig};

/// Builds the model's parameters under `root` and returns it as a module.
pub fn build(root: &nn::Path, cfg: &ModelConfig, input_dim: usize, classes: usize) -> nn::Sequential {
    match cfg {
        ModelConfig::Mlp(m) => {
            let layers = root / "layers";
            let mut seq = nn::seq();
            let mut width = input_dim as i64;
            let mut index = 0usize;
            for &h in &m.hidden {
                seq = seq.add(nn::linear(&layers / index, width, h as i64, Default::default()));
                seq = match m.activation {
                    Activation::Relu => seq.add_fn(|x| x.relu()),
                    Activation::Tanh => seq.add_fn(|x| x.tanh()),
                    Activation::Gelu => seq.add_fn(|x| x.gelu("none")),
                };
                index += 2;
                width = h as i64;
            }
            seq.add(nn::linear(&layers / index, width, classes as i64, Default::default()))
        }
    }
}

/// Number of scalar parameters.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::Module;
    use xlab_spec::config::Mlp;

    #[test]
    fn mlp_uses_pytorch_sequential_names_and_shapes() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let m = build(&vs.root(), &ModelConfig::Mlp(Mlp { hidden: vec![8, 4], activation: Activation::Relu }), 2, 3);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
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
        let out = m.forward(&tch::Tensor::zeros([5, 2], (tch::Kind::Float, tch::Device::Cpu)));
        assert_eq!(out.size(), vec![5, 3]);
    }
}
