//! Built-in models. Parameter names follow PyTorch's `state_dict` names of the equivalent
//! `nn.Module` (a model is `layers = nn.Sequential(...)`, so `layers.0.weight`,
//! `layers.1.running_mean`), so weights exported as safetensors load into PyTorch unchanged.
//!
//! Normalization layers carry the NORM tag for step rules (SAM-ON), and BatchNorm honours the
//! host's freeze: while frozen (extra passes of SAM-like rules) it normalizes with batch
//! statistics but leaves its running statistics alone (momentum 0, as the references do).

use std::cell::Cell;
use tch::{nn, Tensor};
use xlab_plan::config::{Activation, ModelConfig, Norm};

/// BatchNorm over dimension 1 (features or channels), as `nn.BatchNorm1d/2d`.
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

enum Op {
    Linear(Tensor, Tensor),
    /// Weight, optional bias, stride, padding.
    Conv(Tensor, Option<Tensor>, i64, i64),
    Batch(BatchNorm),
    /// LayerNorm: weight, bias and the normalized shape.
    Norm(Tensor, Tensor, Vec<i64>),
    /// GroupNorm: weight, bias and the number of groups.
    Group(Tensor, Tensor, i64),
    Act(Activation),
    MaxPool,
    /// Average over the spatial dimensions: (N, C, H, W) → (N, C).
    GlobalAvgPool,
    Flatten,
    /// out = body(pre(x)) + shortcut(pre(x) if `shortcut_on_pre` else x), then ReLU if
    /// `post_relu`. An empty shortcut is the identity.
    Residual {
        pre: Vec<Layer>,
        body: Vec<Layer>,
        shortcut: Vec<Layer>,
        shortcut_on_pre: bool,
        post_relu: bool,
    },
}

/// An operation and the `state_dict` prefix of its variables (`layers.3`, `layer1.0.conv1`).
struct Layer {
    name: String,
    op: Op,
}

pub struct Model {
    layers: Vec<Layer>,
    /// A TorchScript module instead of `layers`.
    script: Option<std::cell::RefCell<tch::CModule>>,
    /// (channels, height, width) the flat input rows are reshaped to, for convolutions.
    image: Option<[i64; 3]>,
    frozen: Cell<bool>,
}

const BN_MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

impl Model {
    /// Logits; `train` selects batch statistics (and their running update) in BatchNorm.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if let Some(m) = &self.script {
            let h = match self.image {
                Some([c, hh, w]) => x.reshape([-1, c, hh, w]),
                None => x.shallow_clone(),
            };
            let mut m = m.borrow_mut();
            if train {
                m.set_train();
            } else {
                m.set_eval();
            }
            return m.forward_ts(&[h]).unwrap_or_else(|e| panic!("the TorchScript module's forward failed: {e}"));
        }
        self.run(x, train, &|_, t| t.shallow_clone())
    }

    /// Runs a TorchScript module once on two rows of zeros, in evaluation mode and without
    /// gradient, so that a module that cannot take the data's inputs or does not return one row
    /// of (at least) `classes` logits per example is refused before training, with what it said.
    fn check_script(&self, path: &str, input_dim: usize, classes: usize, device: tch::Device) -> Result<(), String> {
        let Some(m) = &self.script else { return Ok(()) };
        let x = Tensor::zeros([2, input_dim as i64], (tch::Kind::Float, device));
        let h = match self.image {
            Some([c, hh, w]) => x.f_reshape([-1, c, hh, w]).map_err(|e| e.to_string())?,
            None => x,
        };
        let shown = h.size();
        let mut m = m.borrow_mut();
        m.set_eval();
        let out = tch::no_grad(|| m.forward_ts(&[h]));
        m.set_train();
        let expect = "its forward must take a batch of inputs [B, features] (or [B, C, H, W] with `image:`) and \
                      return logits [B, classes]";
        match out {
            Err(e) => Err(format!(
                "{path}: the TorchScript module's forward fails on a batch of shape {shown:?}: {}; {expect}",
                e.to_string().lines().next().unwrap_or_default()
            )),
            // More logits than classes is a model with room for more classes, which trains.
            Ok(y) if y.dim() != 2 || y.size()[0] != 2 || y.size()[1] < classes as i64 => Err(format!(
                "{path}: the TorchScript module returns shape {:?} for a batch of shape {shown:?}, not [2, {classes}] \
                 ({classes} classes); {expect}",
                y.size()
            )),
            Ok(_) => Ok(()),
        }
    }

    /// Features in evaluation mode: the input of the last layer (the classifier head) for
    /// built-in models, the logits for a TorchScript module.
    pub fn features(&self, x: &Tensor) -> Tensor {
        if self.script.is_some() || self.layers.len() < 2 {
            return self.forward_t(x, false);
        }
        let h = match self.image {
            Some([c, hh, w]) => x.reshape([-1, c, hh, w]),
            None => x.shallow_clone(),
        };
        self.apply(&self.layers[..self.layers.len() - 1], h, false, &|_, t| t.shallow_clone()).flatten(1, -1)
    }

    /// The classifier head's input with `train` as in [`Self::forward_t`], for built-in models
    /// (`None` for a TorchScript module, whose layers are not split).
    pub fn features_t(&self, x: &Tensor, train: bool) -> Option<Tensor> {
        if self.script.is_some() || self.layers.len() < 2 {
            return None;
        }
        let h = match self.image {
            Some([c, hh, w]) => x.reshape([-1, c, hh, w]),
            None => x.shallow_clone(),
        };
        Some(self.apply(&self.layers[..self.layers.len() - 1], h, train, &|_, t| t.shallow_clone()).flatten(1, -1))
    }

    /// The classifier head (the last layer) on features from [`Self::features_t`].
    pub fn head(&self, features: &Tensor) -> Option<Tensor> {
        if self.script.is_some() || self.layers.len() < 2 {
            return None;
        }
        Some(
            self.apply(&self.layers[self.layers.len() - 1..], features.shallow_clone(), false, &|_, t| {
                t.shallow_clone()
            }),
        )
    }

    /// Whether the model is a TorchScript module (whose forward cannot take other weights).
    pub fn is_script(&self) -> bool {
        self.script.is_some()
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
        let h = match self.image {
            Some([c, hh, w]) => x.reshape([-1, c, hh, w]),
            None => x.shallow_clone(),
        };
        self.apply(&self.layers, h, train, var)
    }

    fn apply(&self, layers: &[Layer], mut h: Tensor, train: bool, var: &dyn Fn(&str, &Tensor) -> Tensor) -> Tensor {
        for l in layers {
            let v = |param: &str, own: &Tensor| var(&format!("{}.{param}", l.name), own);
            h = match &l.op {
                Op::Linear(w, b) => h.linear(&v("weight", w), Some(v("bias", b))),
                Op::Conv(w, b, stride, pad) => h.conv2d(
                    &v("weight", w),
                    b.as_ref().map(|b| v("bias", b)),
                    [*stride, *stride],
                    [*pad, *pad],
                    [1, 1],
                    1,
                ),
                Op::Norm(w, b, shape) => {
                    h.layer_norm(shape.as_slice(), Some(v("weight", w)), Some(v("bias", b)), EPS, false)
                }
                Op::Group(w, b, groups) => h.group_norm(*groups, Some(v("weight", w)), Some(v("bias", b)), EPS, true),
                Op::Batch(b) => {
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
                        true,
                    )
                }
                Op::Act(Activation::Relu) => h.relu(),
                Op::Act(Activation::Tanh) => h.tanh(),
                Op::Act(Activation::Gelu) => h.gelu("none"),
                Op::MaxPool => h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
                Op::GlobalAvgPool => h.mean_dim(&[-2i64, -1][..], false, h.kind()),
                Op::Flatten => h.flatten(1, -1),
                Op::Residual { pre, body, shortcut, shortcut_on_pre, post_relu } => {
                    let a = self.apply(pre, h.shallow_clone(), train, var);
                    let from = if *shortcut_on_pre { &a } else { &h };
                    let side = self.apply(shortcut, from.shallow_clone(), train, var);
                    let out = self.apply(body, a.shallow_clone(), train, var) + side;
                    if *post_relu {
                        out.relu()
                    } else {
                        out
                    }
                }
            };
        }
        h
    }

    /// While frozen, BatchNorm keeps its running statistics.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.set(frozen);
    }

    /// Name prefixes (`layers.N.`, `layer1.0.bn1.`) of the normalization layers.
    pub fn norm_prefixes(&self) -> Vec<String> {
        fn walk(layers: &[Layer], out: &mut Vec<String>) {
            for l in layers {
                match &l.op {
                    Op::Batch(_) | Op::Norm(..) | Op::Group(..) => out.push(format!("{}.", l.name)),
                    Op::Residual { pre, body, shortcut, .. } => {
                        walk(pre, out);
                        walk(body, out);
                        walk(shortcut, out);
                    }
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.layers, &mut out);
        out
    }
}

/// The variable store path for a dotted name (`layer1.0.conv1`).
pub(crate) fn path<'a>(root: &nn::Path<'a>, name: &str) -> nn::Path<'a> {
    let mut parts = name.split('.');
    let first = root.sub(parts.next().unwrap_or_default());
    parts.fold(first, |p, part| p.sub(part))
}

fn batch_norm(p: &nn::Path, name: &str, n: i64) -> Layer {
    let p = path(p, name);
    Layer {
        name: name.into(),
        op: Op::Batch(BatchNorm {
            weight: p.ones("weight", &[n]),
            bias: p.zeros("bias", &[n]),
            running_mean: p.zeros_no_train("running_mean", &[n]),
            running_var: p.ones_no_train("running_var", &[n]),
            // A float here (tch variables are floats); PyTorch's `load_state_dict` converts it.
            num_batches_tracked: p.zeros_no_train("num_batches_tracked", &[]),
        }),
    }
}

fn layer_norm(p: &nn::Path, name: &str, shape: Vec<i64>) -> Layer {
    let q = path(p, name);
    Layer { name: name.into(), op: Op::Norm(q.ones("weight", &shape), q.zeros("bias", &shape), shape) }
}

/// GroupNorm with the largest group count ≤ 32 that divides the channels.
fn group_norm(p: &nn::Path, name: &str, channels: i64) -> Layer {
    let q = path(p, name);
    let groups = (1..=32.min(channels)).rev().find(|g| channels % g == 0).unwrap_or(1);
    Layer { name: name.into(), op: Op::Group(q.ones("weight", &[channels]), q.zeros("bias", &[channels]), groups) }
}

fn linear(p: &nn::Path, name: &str, i: i64, o: i64) -> Layer {
    let l = nn::linear(path(p, name), i, o, Default::default());
    Layer { name: name.into(), op: Op::Linear(l.ws, l.bs.expect("linear layers have a bias")) }
}

/// A k×k convolution, `[k, stride, padding]` (PyTorch's default init, kaiming-uniform).
fn conv(p: &nn::Path, name: &str, cin: i64, cout: i64, [k, stride, padding]: [i64; 3], bias: bool) -> Layer {
    let c = nn::conv2d(path(p, name), cin, cout, k, nn::ConvConfig { stride, padding, bias, ..Default::default() });
    Layer { name: name.into(), op: Op::Conv(c.ws, c.bs, stride, padding) }
}

fn act(a: Activation) -> Layer {
    Layer { name: String::new(), op: Op::Act(a) }
}

fn bare(op: Op) -> Layer {
    Layer { name: String::new(), op }
}

/// The normalization a config asks for, for `channels` features or channel maps of `hw`.
fn norm_layer(p: &nn::Path, name: &str, norm: Norm, channels: i64, hw: Option<[i64; 2]>) -> Option<Layer> {
    match norm {
        Norm::None => None,
        Norm::Batch => Some(batch_norm(p, name, channels)),
        // LayerNorm on images normalizes each channel map's (h, w).
        Norm::Layer => Some(layer_norm(p, name, hw.map_or(vec![channels], |[h, w]| vec![h, w]))),
        Norm::Group => Some(group_norm(p, name, channels)),
    }
}

/// ResNet-18 for small images (the CIFAR stem: a 3×3 convolution, no max-pooling), with the
/// names of the widely used CIFAR implementation: `conv1`, `bn1`, `layer{1-4}.{0,1}.{conv1,
/// bn1,conv2,bn2,shortcut.0,shortcut.1}`, `linear`.
fn resnet18(root: &nn::Path, norm: Norm, cin: i64, classes: i64) -> Vec<Layer> {
    let norm = if norm == Norm::None { Norm::Batch } else { norm };
    let nl = |name: &str, c: i64| norm_layer(root, name, norm, c, None).expect("a norm is set");
    let mut layers = vec![conv(root, "conv1", cin, 64, [3, 1, 1], false), nl("bn1", 64), act(Activation::Relu)];
    let mut width = 64;
    for (stage, out) in [64i64, 128, 256, 512].into_iter().enumerate() {
        for block in 0..2 {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            let at = |part: &str| format!("layer{}.{block}.{part}", stage + 1);
            let body = vec![
                conv(root, &at("conv1"), width, out, [3, stride, 1], false),
                nl(&at("bn1"), out),
                act(Activation::Relu),
                conv(root, &at("conv2"), out, out, [3, 1, 1], false),
                nl(&at("bn2"), out),
            ];
            let shortcut = if stride != 1 || width != out {
                vec![conv(root, &at("shortcut.0"), width, out, [1, stride, 0], false), nl(&at("shortcut.1"), out)]
            } else {
                vec![]
            };
            layers.push(bare(Op::Residual { pre: vec![], body, shortcut, shortcut_on_pre: false, post_relu: true }));
            width = out;
        }
    }
    layers.push(bare(Op::GlobalAvgPool));
    layers.push(linear(root, "linear", 512, classes));
    layers
}

/// WideResNet-depth-k (pre-activation blocks), with the names of the widely used PyTorch
/// implementation: `conv1`, `block{1-3}.layer.N.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`.
fn wrn(root: &nn::Path, depth: usize, k: usize, norm: Norm, cin: i64, classes: i64) -> Vec<Layer> {
    let norm = if norm == Norm::None { Norm::Batch } else { norm };
    let nl = |name: &str, c: i64| norm_layer(root, name, norm, c, None).expect("a norm is set");
    let n = (depth - 4) / 6;
    let widths = [16i64, 16 * k as i64, 32 * k as i64, 64 * k as i64];
    let mut layers = vec![conv(root, "conv1", cin, widths[0], [3, 1, 1], false)];
    let mut width = widths[0];
    for g in 0..3 {
        let out = widths[g + 1];
        for i in 0..n {
            let stride = if g > 0 && i == 0 { 2 } else { 1 };
            let at = |part: &str| format!("block{}.layer.{i}.{part}", g + 1);
            let equal = width == out;
            let pre = vec![nl(&at("bn1"), width), act(Activation::Relu)];
            let body = vec![
                conv(root, &at("conv1"), width, out, [3, stride, 1], false),
                nl(&at("bn2"), out),
                act(Activation::Relu),
                conv(root, &at("conv2"), out, out, [3, 1, 1], false),
            ];
            let shortcut =
                if equal { vec![] } else { vec![conv(root, &at("convShortcut"), width, out, [1, stride, 0], false)] };
            layers.push(bare(Op::Residual { pre, body, shortcut, shortcut_on_pre: !equal, post_relu: false }));
            width = out;
        }
    }
    layers.extend([
        nl("bn1", width),
        act(Activation::Relu),
        bare(Op::GlobalAvgPool),
        linear(root, "fc", width, classes),
    ]);
    layers
}

/// Builds the model's parameters under `root`; `image` is the input's (c, h, w) for images.
pub fn build(root: &nn::Path, cfg: &ModelConfig, input_dim: usize, image: Option<[i64; 3]>, classes: usize) -> Model {
    let mut layers: Vec<Layer> = Vec::new();
    let at = |layers: &Vec<Layer>| format!("layers.{}", layers.len());
    let classes = classes as i64;
    match cfg {
        ModelConfig::Mlp(m) => {
            let mut width = input_dim as i64;
            for &h in &m.hidden {
                let l = linear(root, &at(&layers), width, h as i64);
                layers.push(l);
                if let Some(n) = norm_layer(root, &at(&layers), m.norm, h as i64, None) {
                    layers.push(n);
                }
                layers.push(act(m.activation));
                width = h as i64;
            }
            let l = linear(root, &at(&layers), width, classes);
            layers.push(l);
            Model { layers, script: None, image: None, frozen: Cell::new(false) }
        }
        ModelConfig::Cnn(c) => {
            let [mut ch, mut h, mut w] = image.expect("image models are checked to have image data");
            for &out in &c.channels {
                let l = conv(root, &at(&layers), ch, out as i64, [3, 1, 1], true);
                layers.push(l);
                if let Some(n) = norm_layer(root, &at(&layers), c.norm, out as i64, Some([h, w])) {
                    layers.push(n);
                }
                layers.push(act(Activation::Relu));
                layers.push(bare(Op::MaxPool));
                ch = out as i64;
                h /= 2;
                w /= 2;
            }
            layers.push(bare(Op::Flatten));
            let l = linear(root, &at(&layers), ch * h * w, classes);
            layers.push(l);
            Model { layers, script: None, image, frozen: Cell::new(false) }
        }
        ModelConfig::Resnet18(r) => {
            let [c, _, _] = image.expect("image models are checked to have image data");
            Model { layers: resnet18(root, r.norm, c, classes), script: None, image, frozen: Cell::new(false) }
        }
        ModelConfig::Wrn(r) => {
            let [c, _, _] = image.expect("image models are checked to have image data");
            Model {
                layers: wrn(root, r.depth, r.width, r.norm, c, classes),
                script: None,
                image,
                frozen: Cell::new(false),
            }
        }
        ModelConfig::Torchscript(_) => unreachable!("TorchScript modules are built by `model::torchscript`"),
        ModelConfig::TimeMlp(_) | ModelConfig::Unet(_) => {
            unreachable!("diffusion models are built by `diffusion::DiffusionNet`; callers check `is_diffusion`")
        }
    }
}

/// Builds any classification model: a built-in one, or a TorchScript module from its file.
pub fn build_checked(
    root: &nn::Path,
    cfg: &ModelConfig,
    input_dim: usize,
    image: Option<[i64; 3]>,
    classes: usize,
) -> Result<Model, String> {
    match cfg {
        ModelConfig::Torchscript(t) => {
            let m = torchscript(root, &t.path.path, image)?;
            m.check_script(&t.path.path, input_dim, classes, root.device())?;
            Ok(m)
        }
        _ => Ok(build(root, cfg, input_dim, image, classes)),
    }
}

/// Loads a TorchScript module onto `root`'s device and registers its parameters under their
/// PyTorch names, so that the optimizer, step rules, checkpoints and `weights.safetensors` see
/// them as any model's. Modules with buffers (BatchNorm running statistics) are refused: libtorch's
/// C API that xlab links gives no access to a scripted module's buffers, so they could be neither
/// checkpointed nor restored.
pub fn torchscript(root: &nn::Path, path: &str, image: Option<[i64; 3]>) -> Result<Model, String> {
    let module = load_script(root, path)?;
    Ok(Model { layers: vec![], script: Some(std::cell::RefCell::new(module)), image, frozen: Cell::new(false) })
}

/// Loads a TorchScript module and puts its parameters under `root` by their names (so the
/// optimizer trains them and checkpoints and weights files hold them); a module with buffers is
/// refused (see [`torchscript`]).
pub fn load_script(root: &nn::Path, path: &str) -> Result<tch::CModule, String> {
    let module = tch::CModule::load_on_device(path, root.device()).map_err(|e| {
        format!("cannot load {path} as a TorchScript module: {}", e.to_string().lines().next().unwrap_or(""))
    })?;
    let params = module.named_parameters().map_err(|e| format!("{path}: {e}"))?;
    let stored = stored_tensors(path)?;
    if stored > params.len() {
        return Err(format!(
            "{path} holds {stored} tensors but {} parameters: it has buffers (e.g. BatchNorm running statistics), \
             which xlab cannot checkpoint in a TorchScript module; export it with GroupNorm or LayerNorm, or use a built-in model",
            params.len()
        ));
    }
    for (name, t) in params {
        let (parent, last) = match name.rsplit_once('.') {
            Some((p, l)) => (crate::model::path(root, p), l.to_string()),
            None => (root.clone(), name.clone()),
        };
        let trainable = t.requires_grad();
        let _ = parent.add(&last, t, trainable);
    }
    Ok(module)
}

/// The number of tensor storages in a TorchScript archive (a zip whose `data/N` entries are the
/// parameters and buffers), read from the zip's central directory.
fn stored_tensors(path: &str) -> Result<usize, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut count = 0;
    let mut i = 0;
    while i + 46 <= bytes.len() {
        if bytes[i..i + 4] == [0x50, 0x4b, 0x01, 0x02] {
            let le16 = |at: usize| usize::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
            let (n, extra, comment) = (le16(i + 28), le16(i + 30), le16(i + 32));
            let name = bytes.get(i + 46..i + 46 + n).unwrap_or_default();
            let name = String::from_utf8_lossy(name);
            if let Some((_, rest)) = name.split_once("/data/") {
                if !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()) {
                    count += 1;
                }
            }
            i += 46 + n + extra + comment;
        } else {
            i += 1;
        }
    }
    Ok(count)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;
    use xlab_plan::config::{Cnn, Mlp};

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
