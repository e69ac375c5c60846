//! The denoising network and what it is trained and sampled with, shared by diffusion training
//! (`diffusion`) and sampling (`sample`): the noise schedule ᾱ_t, the data's map onto [-1, 1],
//! the time-conditioned networks (`time_mlp`, `unet`) and the files a training leaves for its
//! sampling jobs.

use crate::data::{self, Dataset};
use crate::Failure;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};
use xlab_plan::config::{BetaSchedule, Diffusion, ExactDenoiser, JobConfig, ModelConfig};
use xlab_proto::FailureCause;

/// ᾱ_t for t = 0..T−1 in float64 (docs/methods.md §3.1). diffusers builds the linear schedules in
/// float32; computing in float64 differs by about 1e-6 relative.
pub fn alphas_cumprod(d: &ExactDenoiser) -> Vec<f64> {
    let t = d.timesteps as usize;
    let lin = |a: f64, b: f64, i: usize| if t == 1 { a } else { a + (b - a) * i as f64 / (t - 1) as f64 };
    let betas: Vec<f64> = match d.schedule {
        BetaSchedule::Linear => (0..t).map(|i| lin(d.beta_start, d.beta_end, i)).collect(),
        BetaSchedule::ScaledLinear => (0..t).map(|i| lin(d.beta_start.sqrt(), d.beta_end.sqrt(), i).powi(2)).collect(),
        BetaSchedule::SquaredcosCapV2 => {
            let f = |u: f64| ((u + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
            (0..t).map(|i| (1.0 - f((i + 1) as f64 / t as f64) / f(i as f64 / t as f64)).min(0.999)).collect()
        }
    };
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// The affine map of the training data onto [-1, 1]: per feature for vectors, one range over
/// all pixels for images. Sampling uses the same map, fitted on the same training split.
pub struct Scale {
    pub(crate) lo: Tensor,
    pub(crate) hi: Tensor,
}

impl Scale {
    pub fn fit(train_x: &Tensor, image: bool) -> Scale {
        let x = train_x.to_kind(Kind::Double);
        if image {
            Scale { lo: x.min(), hi: x.max() }
        } else {
            Scale { lo: x.amin(0, true), hi: x.amax(0, true) }
        }
    }

    /// `x` mapped onto the training data's [-1, 1], in float64.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let (lo, hi) = (self.lo.to_device(x.device()), self.hi.to_device(x.device()));
        (x.to_kind(Kind::Double) - &lo) / (&hi - &lo).clamp_min(1e-12) * 2.0 - 1.0
    }

    /// The inverse map: model space back to the data's own units (float64).
    pub fn invert(&self, x: &Tensor) -> Tensor {
        let (lo, hi) = (self.lo.to_device(x.device()), self.hi.to_device(x.device()));
        // One new tensor the size of `x`, the rest in place (sample sets can be large).
        let mut y = x.to_kind(Kind::Double) + 1.0;
        let _ = y.g_mul_(&((&hi - &lo).clamp_min(1e-12) / 2.0));
        let _ = y.g_add_(&lo);
        y
    }

    /// Clamps rows in the data's units to the training data's range, in place.
    pub fn clamp_(&self, y: &mut Tensor) {
        let (lo, hi) = (self.lo.to_device(y.device()), self.hi.to_device(y.device()));
        let _ = y.clamp_tensor_(Some(&lo), Some(&hi));
    }
}

/// The sinusoidal embedding of (possibly fractional) timesteps `t` `[B]`: `[sin(t·f), cos(t·f)]`
/// with frequencies f_i = 10000^(−i/half).
fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.sin(), args.cos()], 1)
}

/// The largest group count ≤ 8 that divides `channels`.
fn groups_for(channels: i64) -> i64 {
    (1..=8).rev().find(|g| channels % g == 0).unwrap_or(1)
}

struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    skip: Option<nn::Conv2D>,
}

impl ResBlock {
    fn new(p: &nn::Path, cin: i64, cout: i64, tdim: i64) -> ResBlock {
        let same = nn::ConvConfig { padding: 1, ..Default::default() };
        ResBlock {
            norm1: nn::group_norm(p / "norm1", groups_for(cin), cin, Default::default()),
            conv1: nn::conv2d(p / "conv1", cin, cout, 3, same),
            time: nn::linear(p / "time", tdim, cout, Default::default()),
            norm2: nn::group_norm(p / "norm2", groups_for(cout), cout, Default::default()),
            conv2: nn::conv2d(p / "conv2", cout, cout, 3, same),
            skip: (cin != cout).then(|| nn::conv2d(p / "skip", cin, cout, 1, Default::default())),
        }
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = h + self.time.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let skip = match &self.skip {
            Some(s) => s.forward(x),
            None => x.shallow_clone(),
        };
        h + skip
    }
}

enum Body {
    Mlp { layers: Vec<nn::Linear>, out: nn::Linear },
    Unet(Box<UnetBody>),
}

/// The cross-attention block of a `unet` with `cross_attention` (after the middle residual
/// block): the class's tokens, a learned table `context` of (classes + 1) × tokens × C, give the
/// keys and values; the normalized feature map's pixels the queries. Names as diffusers'
/// `Attention` (`to_q`, `to_k`, `to_v`, `to_out.0`), so a PyTorch transcription loads the
/// weights with `strict=True`.
struct CrossAttn {
    heads: i64,
    tokens: i64,
    context: nn::Embedding,
    norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

/// Attention guidance inside the cross-attention layers: the first `negative.size()[0]` rows
/// also attend over the `negative` labels' tokens, and `combine(Z⁺, Z⁻)` gives their output
/// (`None` keeps Z⁺).
pub struct AttnGuide<'a> {
    pub negative: Tensor,
    pub combine: &'a mut Combine<'a>,
}

/// An attention guidance's combination of Z⁺ and Z⁻ (`None` keeps Z⁺).
pub type Combine<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<Option<Tensor>, String> + 'a;

impl CrossAttn {
    fn new(p: &nn::Path, channels: i64, tokens: i64, heads: i64, classes: i64) -> CrossAttn {
        let plain = nn::LinearConfig { bias: false, ..Default::default() };
        let a = p / "attn";
        CrossAttn {
            heads,
            tokens,
            context: nn::embedding(p / "context", classes + 1, tokens * channels, Default::default()),
            norm: nn::group_norm(&a / "norm", groups_for(channels), channels, Default::default()),
            to_q: nn::linear(&a / "to_q", channels, channels, plain),
            to_k: nn::linear(&a / "to_k", channels, channels, plain),
            to_v: nn::linear(&a / "to_v", channels, channels, plain),
            to_out: nn::linear(&a / "to_out" / "0", channels, channels, Default::default()),
        }
    }

    /// `[B, len, C]` split into heads: `[B, H, len, C/H]`.
    fn heads(&self, t: Tensor) -> Tensor {
        let (b, len, c) = (t.size()[0], t.size()[1], t.size()[2]);
        t.reshape([b, len, self.heads, c / self.heads]).transpose(1, 2)
    }

    /// softmax(QKᵀ/√d_h)V for queries `q` `[B, H, N, d_h]` over the tokens of `labels`, heads
    /// concatenated: `[B, N, C]`.
    fn attend(&self, q: &Tensor, labels: &Tensor) -> Tensor {
        let (b, n) = (q.size()[0], q.size()[2]);
        let c = q.size()[1] * q.size()[3];
        let ctx = self.context.forward(labels).reshape([b, self.tokens, c]);
        let k = self.heads(self.to_k.forward(&ctx));
        let v = self.heads(self.to_v.forward(&ctx));
        Tensor::scaled_dot_product_attention(q, &k, &v, None::<Tensor>, 0.0, false, None, false)
            .transpose(1, 2)
            .reshape([b, n, c])
    }

    fn forward(&self, h: &Tensor, labels: &Tensor, guide: Option<&mut AttnGuide<'_>>) -> Result<Tensor, String> {
        let (b, c, hh, ww) = h.size4().map_err(|e| e.to_string())?;
        let q_in = self.norm.forward(h).reshape([b, c, hh * ww]).transpose(1, 2);
        // The queries once: the guided rows attend over the negative's tokens with the same ones.
        let q = self.heads(self.to_q.forward(&q_in));
        let mut z = self.attend(&q, labels);
        if let Some(g) = guide {
            let rows = g.negative.size()[0];
            let pos = z.narrow(0, 0, rows);
            let neg = self.attend(&q.narrow(0, 0, rows), &g.negative);
            if let Some(out) = (g.combine)(&pos, &neg)? {
                if out.size() != pos.size() {
                    return Err(format!(
                        "the attention guidance returned {:?} for an attention output of {:?}",
                        out.size(),
                        pos.size()
                    ));
                }
                let out = out.to_kind(z.kind());
                z = if rows == b { out } else { Tensor::cat(&[out, z.narrow(0, rows, b - rows)], 0) };
            }
        }
        let out = self.to_out.forward(&z).transpose(1, 2).reshape([b, c, hh, ww]);
        Ok(h + out)
    }
}

struct UnetBody {
    image: [i64; 3],
    conv_in: nn::Conv2D,
    down: Vec<ResBlock>,
    mid: ResBlock,
    cross: Option<CrossAttn>,
    up: Vec<ResBlock>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

/// A network that predicts ε (or v) from x_t, t and, when conditional, the class label; the
/// label `classes` is the null label of classifier-free guidance. A built-in one (`time_mlp`,
/// `unet`), or a TorchScript module of the user's.
pub struct DiffusionNet {
    net: Net,
}

enum Net {
    Own(OwnNet),
    /// `forward(x, t, y)` (conditional) or `forward(x, t)`: x `[B, D]` (or `[B, C, H, W]` for
    /// images), t `[B]` float, y `[B]` int64; returns the prediction shaped as x.
    Script {
        module: std::cell::RefCell<tch::CModule>,
        image: Option<[i64; 3]>,
        conditional: bool,
    },
}

struct OwnNet {
    time_dim: i64,
    time1: nn::Linear,
    time2: nn::Linear,
    label: Option<nn::Embedding>,
    body: Body,
}

impl DiffusionNet {
    pub fn build(
        root: &nn::Path,
        cfg: &ModelConfig,
        input_dim: usize,
        image: Option<[i64; 3]>,
        classes: Option<usize>,
    ) -> Result<DiffusionNet, String> {
        let (time_dim, body_dim) = match cfg {
            ModelConfig::TimeMlp(m) => (m.time_dim as i64, m.time_dim as i64),
            ModelConfig::Unet(u) => (u.time_dim as i64, u.time_dim as i64),
            ModelConfig::Torchscript(t) => {
                let module = crate::model::load_script(root, &t.path.path)?;
                return Ok(DiffusionNet {
                    net: Net::Script { module: std::cell::RefCell::new(module), image, conditional: classes.is_some() },
                });
            }
            _ => {
                return Err(
                    "a diffusion job needs a diffusion model (`time_mlp`, `unet` or a `torchscript` denoiser)".into()
                )
            }
        };
        let time1 = nn::linear(root / "time" / "0", time_dim, body_dim, Default::default());
        let time2 = nn::linear(root / "time" / "2", body_dim, body_dim, Default::default());
        // A UNet with cross-attention takes its class through attention alone.
        let cross_attention = match cfg {
            ModelConfig::Unet(u) => u.cross_attention.as_ref(),
            _ => None,
        };
        if cross_attention.is_some() && classes.is_none() {
            return Err("`cross_attention` attends over the class's tokens; it needs a conditional model".into());
        }
        let label = classes
            .filter(|_| cross_attention.is_none())
            .map(|k| nn::embedding(root / "label", k as i64 + 1, body_dim, Default::default()));
        let body = match cfg {
            ModelConfig::TimeMlp(m) => {
                let mut width = input_dim as i64 + body_dim;
                let mut layers = Vec::new();
                for (i, &h) in m.hidden.iter().enumerate() {
                    layers.push(nn::linear(root / "layers" / i, width, h as i64, Default::default()));
                    width = h as i64;
                }
                let out = nn::linear(root / "out", width, input_dim as i64, Default::default());
                Body::Mlp { layers, out }
            }
            ModelConfig::Unet(u) => {
                let image = image.ok_or("`unet` needs image data")?;
                let ch: Vec<i64> = u.channels.iter().map(|&c| c as i64).collect();
                let same = nn::ConvConfig { padding: 1, ..Default::default() };
                let conv_in = nn::conv2d(root / "conv_in", image[0], ch[0], 3, same);
                let mut down = Vec::new();
                let mut prev = ch[0];
                for (i, &c) in ch.iter().enumerate() {
                    down.push(ResBlock::new(&(root / "down" / i), prev, c, body_dim));
                    prev = c;
                }
                let mid = ResBlock::new(&(root / "mid"), prev, prev, body_dim);
                let cross = cross_attention.map(|a| {
                    let k = classes.expect("checked above") as i64;
                    CrossAttn::new(&(root / "cross"), prev, a.tokens as i64, a.heads as i64, k)
                });
                let mut up = Vec::new();
                for (i, &c) in ch.iter().enumerate().rev() {
                    up.push(ResBlock::new(&(root / "up" / i), prev + c, c, body_dim));
                    prev = c;
                }
                let norm_out = nn::group_norm(root / "norm_out", groups_for(prev), prev, Default::default());
                let conv_out = nn::conv2d(root / "conv_out", prev, image[0], 3, same);
                Body::Unet(Box::new(UnetBody { image, conv_in, down, mid, cross, up, norm_out, conv_out }))
            }
            _ => unreachable!("checked above"),
        };
        Ok(DiffusionNet { net: Net::Own(OwnNet { time_dim, time1, time2, label, body }) })
    }

    pub fn is_conditional(&self) -> bool {
        match &self.net {
            Net::Own(n) => n.label.is_some() || n.has_cross_attention(),
            Net::Script { conditional, .. } => *conditional,
        }
    }

    /// Training mode (dropout on) or evaluation mode, for a TorchScript module; built-in
    /// networks have no layer that tells the two apart.
    pub fn set_train(&self, train: bool) {
        if let Net::Script { module, .. } = &self.net {
            if train {
                module.borrow_mut().set_train();
            } else {
                module.borrow_mut().set_eval();
            }
        }
    }

    /// The prediction for flat rows `x` `[B, D]` at timesteps `t` `[B]` (float) with labels `[B]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Tensor {
        match &self.net {
            Net::Own(n) => n.forward(x, t, labels, None).unwrap_or_else(|e| panic!("{e}")),
            Net::Script { .. } => self
                .script_forward(x, t, labels)
                .unwrap_or_else(|e| panic!("the TorchScript denoiser's forward failed: {e}")),
        }
    }

    /// Whether the network has cross-attention layers for an attention guidance to act in.
    pub fn has_cross_attention(&self) -> bool {
        matches!(&self.net, Net::Own(n) if n.has_cross_attention())
    }

    /// As [`forward`](Self::forward), with an attention guidance in the cross-attention layers
    /// (for the first rows, see [`AttnGuide`]).
    pub fn forward_guided(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        guide: Option<&mut AttnGuide<'_>>,
    ) -> Result<Tensor, String> {
        match (&self.net, guide) {
            (_, None) => Ok(self.forward(x, t, labels)),
            (Net::Own(n), Some(g)) if n.has_cross_attention() => n.forward(x, t, labels, Some(g)),
            _ => Err("an attention guidance needs a `unet` with `cross_attention`".into()),
        }
    }

    /// A TorchScript denoiser's prediction, or what libtorch said when its forward failed.
    fn script_forward(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor, tch::TchError> {
        let Net::Script { module, image, conditional } = &self.net else { unreachable!("only for a script") };
        let b = x.size()[0];
        let shaped = match image {
            Some([c, h, w]) => x.f_reshape([b, *c, *h, *w])?,
            None => x.shallow_clone(),
        };
        let mut args = vec![shaped, t.to_kind(Kind::Float)];
        if *conditional {
            let l = labels.expect("a conditional denoiser is given labels");
            args.push(l.to_kind(Kind::Int64));
        }
        module.borrow_mut().forward_ts(&args)?.f_reshape([b, -1])
    }

    /// Runs a TorchScript denoiser once on two rows of zeros, so that one that cannot take the
    /// job's inputs, or does not answer in their shape, is refused before training.
    pub fn check_script(&self, input_dim: usize, path: &str) -> Result<(), String> {
        let Net::Script { image, conditional, .. } = &self.net else { return Ok(()) };
        let x = Tensor::zeros([2, input_dim as i64], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::from_slice(&[0f32, 1.0]);
        let y = Tensor::zeros([2], (Kind::Int64, tch::Device::Cpu));
        let shown = match image {
            Some([c, h, w]) => format!("x [2, {c}, {h}, {w}]"),
            None => format!("x [2, {input_dim}]"),
        };
        let expect = if *conditional {
            "a conditional denoiser's forward takes (x, t, y): x a batch of rows [B, D] (images [B, C, H, W]), t [B] \
             float timesteps, y [B] int64 labels (the class count is the null label), and returns the prediction \
             shaped as x"
        } else {
            "an unconditional denoiser's forward takes (x, t): x a batch of rows [B, D] (images [B, C, H, W]) and t \
             [B] float timesteps, and returns the prediction shaped as x"
        };
        match tch::no_grad(|| self.script_forward(&x, &t, Some(&y))) {
            Err(e) => {
                let why = e.to_string();
                let why = why.lines().next().unwrap_or_default();
                Err(format!("{path}: the TorchScript denoiser fails on {shown}, t [2]: {why}; {expect}"))
            }
            Ok(y) if y.size() != [2, input_dim as i64] => Err(format!(
                "{path}: the TorchScript denoiser returns {} values per row for {shown}, not {input_dim}; {expect}",
                y.size().iter().skip(1).product::<i64>()
            )),
            Ok(_) => Ok(()),
        }
    }
}

impl OwnNet {
    fn has_cross_attention(&self) -> bool {
        matches!(&self.body, Body::Unet(u) if u.cross.is_some())
    }

    fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        guide: Option<&mut AttnGuide<'_>>,
    ) -> Result<Tensor, String> {
        let time = self.time2.forward(&self.time1.forward(&timestep_embedding(t, self.time_dim)).silu());
        // Out of place, as PyTorch code writes it: under autocast the time embedding is in the
        // half type and the label's in fp32, and the sum is fp32 (in place would round it back
        // to the half type).
        let temb = match (&self.label, labels) {
            (Some(e), Some(l)) => time + e.forward(l),
            _ => time,
        };
        match &self.body {
            Body::Mlp { layers, out } => {
                let mut h = Tensor::cat(&[x.shallow_clone(), temb], 1);
                for l in layers {
                    h = l.forward(&h).silu();
                }
                Ok(out.forward(&h))
            }
            Body::Unet(u) => {
                let UnetBody { image, conv_in, down, mid, cross, up, norm_out, conv_out } = &**u;
                let b = x.size()[0];
                let mut h = conv_in.forward(&x.reshape([b, image[0], image[1], image[2]]));
                let mut skips = Vec::new();
                for (i, block) in down.iter().enumerate() {
                    h = block.forward(&h, &temb);
                    skips.push(h.shallow_clone());
                    if i + 1 < down.len() {
                        h = h.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
                    }
                }
                h = mid.forward(&h, &temb);
                if let Some(cross) = cross {
                    let labels = labels.ok_or("a UNet with cross-attention needs the labels")?;
                    h = cross.forward(&h, labels, guide)?;
                }
                for (k, block) in up.iter().enumerate() {
                    let skip = skips.pop().expect("one skip per level");
                    h = block.forward(&Tensor::cat(&[h, skip], 1), &temb);
                    if k + 1 < up.len() {
                        h = h.upsample_nearest2d([h.size()[2] * 2, h.size()[3] * 2], None, None);
                    }
                }
                Ok(conv_out.forward(&norm_out.forward(&h).silu()).reshape([b, -1]))
            }
        }
    }
}

/// The data and schedule a diffusion job (and the sampling jobs after it) work with.
pub struct Prepared {
    pub data: Dataset,
    pub scale: Scale,
    /// ᾱ_t, float64 on the host.
    pub alphas: Vec<f64>,
}

pub fn prepare(cfg: &JobConfig, d: &Diffusion) -> Result<Prepared, Failure> {
    let data = data::build(&cfg.data).map_err(|m| Failure::new(FailureCause::Error, m))?;
    let scale = Scale::fit(&data.train.x, data.image.is_some());
    Ok(Prepared { scale, alphas: alphas_cumprod(&d.noise()), data })
}

/// Builds the job's network under `vs`.
pub fn network(vs: &nn::VarStore, cfg: &JobConfig, d: &Diffusion, data: &Dataset) -> Result<DiffusionNet, Failure> {
    let model =
        cfg.model.as_ref().ok_or_else(|| Failure::new(FailureCause::Config, "a diffusion job needs `model`"))?;
    DiffusionNet::build(&vs.root(), model, data.input_dim, data.image, d.conditional.then_some(data.classes))
        .map_err(|m| Failure::new(FailureCause::Config, m))
}

/// The classifier a diffusion training keeps for scoring its samples: its config, and its final
/// weights beside it.
pub const SCORER_CONFIG: &str = "scorer.json";
pub const SCORER_WEIGHTS: &str = "scorer.safetensors";

#[cfg(test)]
mod tests {
    use super::*;

    fn den(schedule: BetaSchedule) -> ExactDenoiser {
        ExactDenoiser { schedule, timesteps: 1000, beta_start: 1e-4, beta_end: 0.02 }
    }

    /// docs/methods.md §3.1 (float64 values).
    #[test]
    fn schedules_match_the_known_values() {
        let a = alphas_cumprod(&den(BetaSchedule::Linear));
        assert!((a[0] - 0.9999).abs() < 1e-12);
        assert!((a[499] - 0.0785872429).abs() < 1e-9, "{}", a[499]);
        assert!((a[999] - 4.03582977e-5).abs() < 1e-12, "{}", a[999]);
        let c = alphas_cumprod(&den(BetaSchedule::SquaredcosCapV2));
        assert!((1.0 - c[0] - 4.1284225e-5).abs() < 1e-12, "{}", 1.0 - c[0]);
        assert!((c[499] - 0.4938435904).abs() < 1e-9, "{}", c[499]);
        assert!((c[999] - 2.4287669e-9).abs() < 1e-15, "{}", c[999]);
    }
}
