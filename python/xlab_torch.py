"""xlab's built-in models as PyTorch modules that load xlab's weights with ``strict=True``.

A training job of xlab writes ``weights.safetensors`` (and ``weights_ema.safetensors`` when it
keeps a weights average) with PyTorch's ``state_dict`` names. The file's metadata says which model
it is (``xlab.model``: the experiment file's ``model:``), its input (``xlab.input_dim`` features;
``xlab.image``: channels, height, width) and its classes (``xlab.classes``); a diffusion model's
file also carries its noise schedule and prediction type (``xlab.diffusion``), the map of the
data onto [-1, 1] (``xlab.data_scale``) and, when conditional, the null label of
classifier-free guidance (``xlab.null_label``). :func:`load` reads all of that and returns the
model with its weights, in evaluation mode::

    import torch, xlab_torch

    model, about = xlab_torch.load("results/runs/<job>/weights.safetensors")
    logits = model(x)                      # x: rows [B, input_dim] or images [B, C, H, W]

    net, about = xlab_torch.load("results/runs/<diffusion job>/weights_ema.safetensors")
    eps = net(x_t, t, y)                   # x_t: [B, input_dim] in [-1, 1] units; t: [B]; y: [B]
    x = about.to_data(x_model)             # from model space back to the data's units

Inputs are flat rows, as xlab feeds them: an image model reshapes ``[B, C*H*W]`` rows to
``[B, C, H, W]`` itself (an already-shaped batch works too). The outputs equal xlab's for the same
file and inputs (``runner/cli/tests/pytorch_models.rs`` checks every built-in model against
``xlab-worker forward``).

The models, as xlab builds them:

* ``mlp``: ``layers`` = Linear, [norm], activation per hidden width, then a Linear head.
* ``cnn``: ``layers`` = per width a 3×3 convolution (padding 1, bias), [norm], ReLU, 2×2 max
  pooling; then flatten and a Linear head.
* ``resnet18``: the CIFAR ResNet-18 (3×3 stem, no max pooling): ``conv1``, ``bn1``,
  ``layer1``–``layer4`` of two basic blocks (``shortcut.0``/``.1`` where the shape changes),
  global average pooling, ``linear``.
* ``wrn``: WideResNet-depth-k with pre-activation blocks: ``conv1``,
  ``block1``–``block3`` (``layer.N.bn1/conv1/bn2/conv2/convShortcut``), ``bn1``, ``fc``.
* ``time_mlp``: a timestep embedding (sinusoidal, then ``time.0``, SiLU, ``time.2``) plus the
  label's embedding (``label``, classes + 1 rows: the last is the null label), concatenated to
  the input and passed through ``layers`` (SiLU each) and ``out``.
* ``unet``: ``conv_in``, a residual block per width going down (2×2 average pooling between),
  ``mid``, blocks going up on the skip-concatenated maps (nearest upsampling between),
  ``norm_out``, SiLU, ``conv_out``; each block adds the embedding through ``time``. GroupNorm
  groups: the largest count ≤ 8 dividing the channels. With ``cross_attention: {tokens: M,
  heads: H}`` the class enters through ``cross`` after ``mid`` instead of the embedding: its
  tokens ``cross.context`` (classes + 1 rows of M × C, the last the null label) are the keys and
  values of an attention block named as diffusers' ``Attention`` (``cross.attn.norm``, ``to_q``,
  ``to_k``, ``to_v`` without bias, ``to_out.0``) over the GroupNorm-ed pixels, added back to the
  map. Its ``processor`` is swappable as in diffusers: :class:`NAGAttnProcessor` applies
  Normalized Attention Guidance there.

Norms (``norm:`` of mlp, cnn, resnet18, wrn): ``batch`` (eps 1e-5, momentum 0.1), ``layer``
(over the features, or over each channel map's height × width for cnn), ``group`` (the largest
count ≤ 32 dividing the channels). resnet18 and wrn use ``batch`` when none is given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "load",
    "build",
    "About",
    "Mlp",
    "Cnn",
    "ResNet18",
    "WideResNet",
    "TimeMlp",
    "Unet",
    "AttnProcessor",
    "NAGAttnProcessor",
]

EPS = 1e-5


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[name]


def _groups(channels: int, most: int) -> int:
    return next(g for g in range(min(most, channels), 0, -1) if channels % g == 0)


class _LayerNormOver(nn.Module):
    """LayerNorm over the last dimensions ``shape`` (as xlab applies it to image maps)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = list(shape)
        self.weight = nn.Parameter(torch.ones(self.shape))
        self.bias = nn.Parameter(torch.zeros(self.shape))

    def forward(self, x):
        return F.layer_norm(x, self.shape, self.weight, self.bias, EPS)


def _norm(kind: str, channels: int, image: bool, hw=None) -> Optional[nn.Module]:
    if kind in (None, "none"):
        return None
    if kind == "batch":
        return nn.BatchNorm2d(channels) if image else nn.BatchNorm1d(channels)
    if kind == "layer":
        return _LayerNormOver(hw if hw is not None else [channels])
    if kind == "group":
        return nn.GroupNorm(_groups(channels, 32), channels, eps=EPS)
    raise ValueError(f"unknown norm {kind!r}")


class _Flat(nn.Module):
    """Reshapes flat rows to images when the model takes images."""

    def __init__(self, image):
        super().__init__()
        self.image = list(image) if image else None

    def shape(self, x):
        if self.image is not None and x.dim() == 2:
            return x.reshape(-1, *self.image)
        return x


class Mlp(nn.Module):
    def __init__(self, input_dim: int, hidden, classes: int, norm: str = "none", activation: str = "relu"):
        super().__init__()
        layers, width = [], input_dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            n = _norm(norm, h, image=False)
            if n is not None:
                layers.append(n)
            layers.append(_act(activation))
            width = h
        layers.append(nn.Linear(width, classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Cnn(nn.Module):
    def __init__(self, image, channels, classes: int, norm: str = "none"):
        super().__init__()
        self.flat = _Flat(image)
        ch, h, w = image
        layers = []
        for out in channels:
            layers.append(nn.Conv2d(ch, out, 3, padding=1, bias=True))
            n = _norm(norm, out, image=True, hw=[h, w])
            if n is not None:
                layers.append(n)
            layers += [nn.ReLU(), nn.MaxPool2d(2, 2)]
            ch, h, w = out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(ch * h * w, classes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(self.flat.shape(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, cout, image=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout, image=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), _norm(norm, cout, image=True))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, image, classes: int, norm: str = "batch"):
        super().__init__()
        norm = "batch" if norm in (None, "none") else norm
        self.flat = _Flat(image)
        self.conv1 = nn.Conv2d(image[0], 64, 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, 64, image=True)
        width = 64
        for stage, out in enumerate([64, 128, 256, 512]):
            blocks = []
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(_BasicBlock(width, out, stride, norm))
                width = out
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(512, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(self.flat.shape(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.linear(h.mean(dim=(-2, -1)))


class _WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.bn1 = _norm(norm, cin, image=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, cout, image=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        if not self.equal:
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        side = x if self.equal else self.convShortcut(a)
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + side


class _Group(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layer = nn.Sequential(*blocks)

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, image, classes: int, depth: int = 28, width: int = 10, norm: str = "batch"):
        super().__init__()
        norm = "batch" if norm in (None, "none") else norm
        self.flat = _Flat(image)
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(image[0], widths[0], 3, 1, 1, bias=False)
        cin = widths[0]
        for g in range(3):
            blocks = []
            for i in range(n):
                blocks.append(_WideBlock(cin, widths[g + 1], 2 if g > 0 and i == 0 else 1, norm))
                cin = widths[g + 1]
            setattr(self, f"block{g + 1}", _Group(blocks))
        self.bn1 = _norm(norm, cin, image=True)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        h = self.block3(self.block2(self.block1(self.conv1(self.flat.shape(x)))))
        return self.fc(F.relu(self.bn1(h)).mean(dim=(-2, -1)))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[sin(t·f), cos(t·f)]`` with frequencies f_i = 10000^(−i/half), in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=1)


class _Denoiser(nn.Module):
    """What the two diffusion networks share: the timestep and label embedding."""

    def __init__(self, time_dim: int, classes: Optional[int]):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        # The last row is the null label of classifier-free guidance.
        self.label = nn.Embedding(classes + 1, time_dim) if classes is not None else None

    def embed(self, t, y):
        temb = self.time(timestep_embedding(t, self.time_dim))
        if self.label is not None and y is not None:
            temb = temb + self.label(y.long())
        return temb


class TimeMlp(_Denoiser):
    def __init__(self, input_dim: int, hidden, time_dim: int = 64, classes: Optional[int] = None):
        super().__init__(time_dim, classes)
        layers, width = [], input_dim + time_dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            width = h
        self.layers = nn.ModuleList(layers)
        self.out = nn.Linear(width, input_dim)

    def forward(self, x, t, y=None):
        h = torch.cat([x, self.embed(t, y)], dim=1)
        for layer in self.layers:
            h = F.silu(layer(h))
        return self.out(h)


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, tdim):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, 8), cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, 8), cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


def _sdpa_heads(attn, hidden_states, encoder_hidden_states):
    """softmax(QKᵀ/√d_h)V per head, heads concatenated: ``[B, N, C]``."""
    b, n, c = hidden_states.shape
    h = attn.heads
    q = attn.to_q(hidden_states).view(b, n, h, c // h).transpose(1, 2)
    k = attn.to_k(encoder_hidden_states).view(b, -1, h, c // h).transpose(1, 2)
    v = attn.to_v(encoder_hidden_states).view(b, -1, h, c // h).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class AttnProcessor:
    """Plain cross-attention: queries from the pixels, keys and values from the class's tokens."""

    def __call__(self, attn, hidden_states, encoder_hidden_states):
        return attn.to_out[0](_sdpa_heads(attn, hidden_states, encoder_hidden_states))


class NAGAttnProcessor:
    """Normalized Attention Guidance in a cross-attention layer, with the batch layouts of the
    reference ``NAGAttnProcessor2_0``: the context batch holds the negative's tokens after the
    image batch's own. 2B contexts for B images ([positive, negative]); 3B contexts for 2B images
    under classifier-free guidance ([uncond, cond] images, [uncond, cond, negative] contexts),
    where only the cond rows are guided. Z̃ = s·Z⁺ − (s − 1)·Z⁻, per token r = ‖Z̃‖₁/‖Z⁺‖₁ (each at
    least 1e-6), Ẑ = Z̃·min(r, τ)/r, output α·Ẑ + (1 − α)·Z⁺ (docs/methods.md §3.11)."""

    def __init__(self, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, p=1):
        self.nag_scale, self.nag_tau, self.nag_alpha, self.p = nag_scale, nag_tau, nag_alpha, p

    def __call__(self, attn, hidden_states, encoder_hidden_states):
        images, contexts = len(hidden_states), len(encoder_hidden_states)
        if self.nag_scale <= 1 or contexts == images:
            return attn.to_out[0](_sdpa_heads(attn, hidden_states, encoder_hidden_states[:images]))
        origin = contexts - images
        layout = contexts // origin
        assert layout in (2, 3), f"{contexts} contexts for {images} images"
        # The negative attends with the guided rows' queries: all of them, or the cond half.
        guided = hidden_states if layout == 2 else hidden_states[-origin:]
        z = _sdpa_heads(attn, torch.cat([hidden_states, guided]), encoder_hidden_states)
        z_neg = z[-origin:]
        z_pos = z[:origin] if layout == 2 else z[origin : 2 * origin]
        z_guided = z_pos * self.nag_scale - z_neg * (self.nag_scale - 1)
        n_pos = torch.norm(z_pos, p=self.p, dim=-1, keepdim=True).clamp_min(1e-6)
        n_guided = torch.norm(z_guided, p=self.p, dim=-1, keepdim=True).clamp_min(1e-6)
        r = n_guided / n_pos
        z_guided = z_guided * torch.minimum(r, r.new_ones(1) * self.nag_tau) / r
        z_guided = z_guided * self.nag_alpha + z_pos * (1 - self.nag_alpha)
        out = z_guided if layout == 2 else torch.cat([z[:origin], z_guided])
        return attn.to_out[0](out)


class _Attention(nn.Module):
    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels, 8), channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.processor = AttnProcessor()

    def forward(self, x, context):
        b, c, h, w = x.shape
        q_in = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        out = self.processor(self, q_in, context)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class _CrossAttention(nn.Module):
    def __init__(self, channels, tokens, heads, classes):
        super().__init__()
        self.tokens, self.channels = tokens, channels
        self.context = nn.Embedding(classes + 1, tokens * channels)
        self.attn = _Attention(channels, heads)


class Unet(_Denoiser):
    def __init__(
        self, image, channels, time_dim: int = 64, classes: Optional[int] = None, cross_attention=None
    ):
        super().__init__(time_dim, classes if cross_attention is None else None)
        self.image = list(image)
        ch = list(channels)
        self.conv_in = nn.Conv2d(image[0], ch[0], 3, padding=1)
        down, prev = [], ch[0]
        for c in ch:
            down.append(_ResBlock(prev, c, time_dim))
            prev = c
        self.down = nn.ModuleList(down)
        self.mid = _ResBlock(prev, prev, time_dim)
        self.cross = None
        if cross_attention is not None:
            a = cross_attention
            self.cross = _CrossAttention(prev, a.get("tokens", 4), a.get("heads", 1), classes)
        # `up.i` works at width ch[i]; they run from the deepest (up.{n-1}) to up.0.
        up = [None] * len(ch)
        for i in reversed(range(len(ch))):
            up[i] = _ResBlock(prev + ch[i], ch[i], time_dim)
            prev = ch[i]
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(_groups(prev, 8), prev, eps=EPS)
        self.conv_out = nn.Conv2d(prev, image[0], 3, padding=1)

    def forward(self, x, t, y=None, y_negative=None):
        """``y_negative``: the negative condition's labels for NAG, appended to the context batch
        as the reference pipelines append the negative prompt's embeddings."""
        b = x.shape[0]
        temb = self.embed(t, y)
        h = self.conv_in(x.reshape(b, *self.image))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, temb)
            skips.append(h)
            if i + 1 < len(self.down):
                h = F.avg_pool2d(h, 2, 2)
        h = self.mid(h, temb)
        if self.cross is not None:
            labels = y if y_negative is None else torch.cat([y, y_negative])
            ctx = self.cross.context(labels.long()).reshape(len(labels), self.cross.tokens, self.cross.channels)
            h = self.cross.attn(h, ctx)
        for k, block in enumerate(reversed(self.up)):
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if k + 1 < len(self.up):
                h = F.interpolate(h, size=(h.shape[2] * 2, h.shape[3] * 2), mode="nearest")
        return self.conv_out(F.silu(self.norm_out(h))).reshape(b, -1)


@dataclass
class About:
    """What a weights file's metadata says: the model config and data, and for a diffusion model
    its schedule, prediction type, data scaling and null label."""

    model: dict
    input_dim: int
    classes: int
    image: Optional[list] = None
    diffusion: Optional[dict] = None
    data_scale: Optional[dict] = None
    null_label: Optional[int] = None
    metadata: dict = field(default_factory=dict)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Rows in the data's units onto the model's [-1, 1] (a diffusion model's input)."""
        lo, hi = self._range(x)
        return 2 * (x.double() - lo) / (hi - lo).clamp_min(1e-12) - 1

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        """The model's [-1, 1] back to the data's units."""
        lo, hi = self._range(x)
        return (x.double() + 1) * (hi - lo).clamp_min(1e-12) / 2 + lo

    def _range(self, x):
        if self.data_scale is None:
            raise ValueError("only a diffusion model's weights carry the data's scaling")
        lo = torch.tensor(self.data_scale["lo"], dtype=torch.float64, device=x.device)
        hi = torch.tensor(self.data_scale["hi"], dtype=torch.float64, device=x.device)
        return lo, hi


def read_about(path) -> About:
    """The metadata of an xlab weights file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "xlab.model" not in meta:
        raise ValueError(f"{path}: no `xlab.model` in its metadata; is it a weights file of an xlab training job?")
    opt = lambda k: json.loads(meta[k]) if k in meta else None  # noqa: E731
    return About(
        model=json.loads(meta["xlab.model"]),
        input_dim=int(meta["xlab.input_dim"]),
        classes=int(meta["xlab.classes"]),
        image=opt("xlab.image"),
        diffusion=opt("xlab.diffusion"),
        data_scale=opt("xlab.data_scale"),
        null_label=int(meta["xlab.null_label"]) if "xlab.null_label" in meta else None,
        metadata=dict(meta),
    )


def build(about: About) -> nn.Module:
    """The PyTorch module of a model as xlab builds it (untrained)."""
    m, name = about.model, about.model["name"]
    norm = m.get("norm", "none")
    if name == "mlp":
        return Mlp(about.input_dim, m.get("hidden", []), about.classes, norm, m.get("activation", "relu"))
    if name in ("cnn", "resnet18", "wrn", "unet") and about.image is None:
        raise ValueError(f"`{name}` takes images, and this file's metadata has no `xlab.image`")
    if name == "cnn":
        return Cnn(about.image, m["channels"], about.classes, norm)
    if name == "resnet18":
        return ResNet18(about.image, about.classes, norm)
    if name == "wrn":
        return WideResNet(about.image, about.classes, m["depth"], m["width"], norm)
    conditional = bool((about.diffusion or {}).get("conditional"))
    classes = about.classes if conditional else None
    if name == "time_mlp":
        return TimeMlp(about.input_dim, m.get("hidden", []), m["time_dim"], classes)
    if name == "unet":
        return Unet(about.image, m["channels"], m["time_dim"], classes, m.get("cross_attention"))
    raise ValueError(f"`{name}` is not a built-in model of xlab (a TorchScript model loads with torch.jit.load)")


def load(path, device="cpu"):
    """The model of an xlab weights file with its weights (``strict=True``), in evaluation mode,
    and what the file's metadata says (:class:`About`)."""
    from safetensors.torch import load_file

    about = read_about(path)
    model = build(about)
    state = load_file(str(path), device=str(device))
    # xlab keeps BatchNorm's batch count as a float; PyTorch's is an integer.
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            state[k] = v.long()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), about
