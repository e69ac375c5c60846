//! The network a job trains (`model:`): MLPs, CNNs, ResNet-18, wide ResNets, TorchScript
//! modules and the time-conditioned diffusion networks; and their checks, which depend on the data.

use super::{defaults, DataConfig, FileRef};
use serde::{Deserialize, Serialize};

/// A model architecture.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum ModelConfig {
    /// A multilayer perceptron: linear layers of the given widths with an activation between.
    Mlp(Mlp),
    /// A small convolutional network for images: per entry of `channels`, a 3×3 convolution
    /// (padding 1), normalization, ReLU and 2×2 max-pooling; then a linear classifier.
    Cnn(Cnn),
    /// ResNet-18 with the CIFAR stem (3×3 first convolution, no max-pooling), global average
    /// pooling and a linear classifier; `norm: batch` (default) or `group`/`layer`.
    Resnet18(ResNet),
    /// WideResNet-depth-width (pre-activation blocks, e.g. WRN-16-4), `norm: batch` (default) or
    /// `group`.
    Wrn(Wrn),
    /// A TorchScript module exported from PyTorch (`torch.jit.script(model).save(path)`): your own
    /// architecture, trained or evaluated as it is. It gets each batch's inputs (images as
    /// `[B, C, H, W]`, other rows as `[B, D]`) and returns logits `[B, classes]`. Its parameters
    /// keep their PyTorch names in checkpoints and in `weights.safetensors`.
    Torchscript(TorchScript),
    /// A diffusion model for vectors: the input and a sinusoidal embedding of t (and a label
    /// embedding when conditional) through an MLP with SiLU; predicts ε (or v).
    TimeMlp(TimeMlp),
    /// A small UNet for images: per entry of `channels` a residual block (GroupNorm, SiLU, 3×3
    /// convolutions, the time and label embedding added), downsampling between levels, the
    /// mirror path up with skip connections; predicts ε (or v). With `cross_attention`, a
    /// conditional UNet takes its class through a cross-attention block over the class's tokens
    /// at the lowest resolution instead (what attention guidance, `diffusion.nag`, acts on).
    Unet(Unet),
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TorchScript {
    pub path: FileRef,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimeMlp {
    #[serde(default = "defaults::time_mlp_hidden")]
    pub hidden: Vec<usize>,
    /// Width of the time (and label) embedding.
    #[serde(default = "defaults::time_dim")]
    pub time_dim: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Unet {
    /// Channels of each resolution level; the image is halved between levels.
    #[serde(default = "defaults::unet_channels")]
    pub channels: Vec<usize>,
    #[serde(default = "defaults::time_dim")]
    pub time_dim: usize,
    /// A cross-attention block at the lowest resolution whose keys and values come from the
    /// class's tokens (a learned table of (classes + 1 null) × `tokens` embeddings): the
    /// condition enters through it alone, as a text encoder's tokens enter an image model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attention: Option<CrossAttention>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CrossAttention {
    /// Tokens per class (at least 2: over one token the attention weights are constant).
    #[serde(default = "defaults::cross_attention_tokens")]
    pub tokens: usize,
    /// Attention heads; they divide the lowest level's channels.
    #[serde(default = "defaults::cross_attention_heads")]
    pub heads: usize,
}

impl ModelConfig {
    /// Whether this is a diffusion model (trained with `diffusion:`).
    pub fn is_diffusion(&self) -> bool {
        matches!(self, ModelConfig::TimeMlp(_) | ModelConfig::Unet(_))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResNet {
    #[serde(default = "defaults::cnn_norm")]
    pub norm: Norm,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Wrn {
    /// 6n + 4 layers (16, 22, 28, …).
    #[serde(default = "defaults::wrn_depth")]
    pub depth: usize,
    /// The widening factor k.
    #[serde(default = "defaults::wrn_width")]
    pub width: usize,
    #[serde(default = "defaults::cnn_norm")]
    pub norm: Norm,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cnn {
    #[serde(default = "defaults::channels")]
    pub channels: Vec<usize>,
    #[serde(default = "defaults::cnn_norm")]
    pub norm: Norm,
}

/// A normalization layer after each hidden linear layer or convolution.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    #[default]
    None,
    /// BatchNorm (momentum 0.1, eps 1e-5): batch statistics in training, running ones in
    /// evaluation.
    Batch,
    /// LayerNorm over the features (eps 1e-5); on images, over each channel map.
    Layer,
    /// GroupNorm (eps 1e-5) with the largest group count ≤ 32 that divides the channels.
    Group,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mlp {
    #[serde(default = "defaults::hidden")]
    pub hidden: Vec<usize>,
    #[serde(default)]
    pub activation: Activation,
    #[serde(default, skip_serializing_if = "is_no_norm")]
    pub norm: Norm,
}

fn is_no_norm(n: &Norm) -> bool {
    *n == Norm::None
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Relu,
    Tanh,
    Gelu,
}

impl ModelConfig {
    /// The checks of the model's settings, some against the data it trains on (image models
    /// need images, a U-Net's levels must divide the image).
    pub(crate) fn check(&self, data: &DataConfig) -> Result<(), (String, String)> {
        let err = |p: &str, m: String| Err((p.to_string(), m));
        match self {
            ModelConfig::Mlp(m) => {
                if let Some(i) = m.hidden.iter().position(|&w| w == 0) {
                    return err(&format!("model.hidden[{i}]"), "a layer needs at least 1 unit".into());
                }
                if m.norm != Norm::None && m.hidden.is_empty() {
                    return err("model.norm", "normalizes hidden layers, and this MLP has none".into());
                }
            }
            ModelConfig::Resnet18(_) | ModelConfig::Wrn(_) if !data.is_image() => {
                return err(
                    "model",
                    "is an image model, which needs image data (digits, cifar10, cifar100, idx, or npz or csv with `image`)"
                        .into(),
                );
            }
            ModelConfig::Wrn(w) => {
                if w.depth < 10 || (w.depth - 4) % 6 != 0 {
                    return err("model.depth", format!("must be 6n + 4 (10, 16, 22, 28, …), got {}", w.depth));
                }
                if w.width == 0 {
                    return err("model.width", "must be at least 1".into());
                }
            }
            ModelConfig::Resnet18(_) => {}
            ModelConfig::TimeMlp(m)
                if m.hidden.is_empty() || m.hidden.contains(&0) || m.time_dim < 2 || m.time_dim % 2 != 0 =>
            {
                return err(
                    "model",
                    "`time_mlp` needs at least one hidden layer, none of width 0, and an even time_dim ≥ 2".into(),
                );
            }
            ModelConfig::TimeMlp(_) => {}
            ModelConfig::Torchscript(_) => {}
            ModelConfig::Unet(u) => {
                let Some(image) = data.image_shape() else {
                    return err(
                        "model",
                        "is `unet`, which needs image data (digits, cifar10, cifar100, idx, or npz or csv with `image`)"
                            .into(),
                    );
                };
                let levels = u.channels.len();
                let step = 1usize << levels.saturating_sub(1);
                if levels == 0 || u.channels.contains(&0) || levels > 4 {
                    return err("model.channels", "lists 1 to 4 level widths, none 0".into());
                }
                if let Some([_, h, w]) = image {
                    if h % step != 0 || w % step != 0 {
                        return err(
                            "model.channels",
                            format!(
                                "{levels} levels halve the image {} times; {h}×{w} is not divisible by {step}",
                                levels - 1
                            ),
                        );
                    }
                }
                if u.time_dim < 2 || u.time_dim % 2 != 0 {
                    return err("model.time_dim", "must be even and at least 2".into());
                }
                if let Some(a) = &u.cross_attention {
                    if a.tokens < 2 {
                        return err(
                            "model.cross_attention.tokens",
                            format!(
                                "is {}; over a single token the attention weights are constant and the block ignores \
                                 its queries (attention guidance would do nothing): use at least 2",
                                a.tokens
                            ),
                        );
                    }
                    let lowest = *u.channels.last().expect("checked above");
                    if a.heads == 0 || lowest % a.heads != 0 {
                        return err(
                            "model.cross_attention.heads",
                            format!("is {}; the heads split the lowest level's {lowest} channels evenly", a.heads),
                        );
                    }
                }
            }
            ModelConfig::Cnn(c) => {
                if !data.is_image() {
                    return err(
                        "model",
                        "is `cnn`, which needs image data (digits, cifar10, cifar100, idx, or npz or csv with `image`)"
                            .into(),
                    );
                }
                if c.channels.is_empty() || c.channels.len() > 3 {
                    return err(
                        "model.channels",
                        "lists 1 to 3 convolution widths (8×8 images halve each time)".into(),
                    );
                }
                if let Some(i) = c.channels.iter().position(|&w| w == 0) {
                    return err(&format!("model.channels[{i}]"), "a convolution needs at least 1 channel".into());
                }
            }
        }
        Ok(())
    }
}
