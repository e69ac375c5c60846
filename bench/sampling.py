"""Sampling throughput: DDIM with a small UNet, xlab against a plain PyTorch loop of the same sampler.

xlab trains a UNet on the offline digits for one epoch (`task: train` with `diffusion:`) and a
later stage samples from it with `diffusion.ddim`; xlab's figure is the sample job's own
`time.nfe_per_s` (denoiser evaluations per second of the sampling loop, model loading excluded).
The peer builds the same UNet in PyTorch, loads xlab's `weights.safetensors` into it with
`strict=True` (so the two networks are the same, name for name and shape for shape), and runs
diffusers' DDIM update (leading spacing, η = 0, x̂₀ clipped to ±1) for the same number of steps on
a batch of the same size, after one warm-up evaluation.

    python bench/sampling.py --xlab target/release/xlab --device cpu --out bench/results
"""

import argparse
import glob
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

CHANNELS = [32, 64]
TIME_DIM = 32
T = 1000


def groups(c):
    return next(g for g in range(8, 0, -1) if c % g == 0)


class ResBlock(torch.nn.Module):
    def __init__(self, cin, cout, tdim):
        super().__init__()
        self.norm1 = torch.nn.GroupNorm(groups(cin), cin)
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.time = torch.nn.Linear(tdim, cout)
        self.norm2 = torch.nn.GroupNorm(groups(cout), cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = torch.nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class UNet(torch.nn.Module):
    """xlab's `unet` model (runner/worker/src/diffusion.rs), unconditional, same parameter names."""

    def __init__(self, image, channels, tdim):
        super().__init__()
        self.image, self.tdim = image, tdim
        self.time = torch.nn.ModuleDict({"0": torch.nn.Linear(tdim, tdim), "2": torch.nn.Linear(tdim, tdim)})
        self.conv_in = torch.nn.Conv2d(image[0], channels[0], 3, padding=1)
        self.down = torch.nn.ModuleList()
        prev = channels[0]
        for c in channels:
            self.down.append(ResBlock(prev, c, tdim))
            prev = c
        self.mid = ResBlock(prev, prev, tdim)
        self.up = torch.nn.ModuleDict()
        for i in reversed(range(len(channels))):
            self.up[str(i)] = ResBlock(prev + channels[i], channels[i], tdim)
            prev = channels[i]
        self.norm_out = torch.nn.GroupNorm(groups(prev), prev)
        self.conv_out = torch.nn.Conv2d(prev, image[0], 3, padding=1)

    def forward(self, x, t):
        half = self.tdim // 2
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * (-math.log(10000.0) / half))
        args = t.float()[:, None] * freqs[None]
        temb = self.time["2"](F.silu(self.time["0"](torch.cat([args.sin(), args.cos()], 1))))
        b = x.shape[0]
        h = self.conv_in(x.reshape(b, *self.image))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, temb)
            skips.append(h)
            if i + 1 < len(self.down):
                h = F.avg_pool2d(h, 2)
        h = self.mid(h, temb)
        for k, block in enumerate(self.up.values()):
            h = block(torch.cat([h, skips.pop()], 1), temb)
            if k + 1 < len(self.up):
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.conv_out(F.silu(self.norm_out(h))).reshape(b, -1)


def ddim_loop(net, noise, steps, ac):
    """diffusers' DDIMScheduler.step with leading spacing, η = 0, clip_sample, set_alpha_to_one."""
    stride = T // steps
    x = noise
    for t in reversed(range(0, steps * stride, stride)):
        eps = net(x, torch.full((x.shape[0],), float(t), device=x.device))
        a, a_prev = ac[t], (ac[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=ac.dtype))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def run_xlab(xlab, device, threads, steps, samples, work):
    exp = {
        "name": "sampling-bench",
        "stages": {
            "train": {"task": "train", "data": {"name": "digits"},
                      "model": {"name": "unet", "channels": CHANNELS, "time_dim": TIME_DIM},
                      "diffusion": {"timesteps": T}, "optimizer": {"name": "adam", "lr": 0.002},
                      "batch_size": 128, "epochs": 1},
            "sample": {"needs": "train", "task": "sample", "data": {"name": "digits"},
                       "denoiser": {"name": "trained"}, "samples": samples,
                       "sampler": {"use": "diffusion.ddim", "steps": steps}},
        },
    }
    path = os.path.join(work, "sampling.yaml")
    with open(path, "w") as f:
        json.dump(exp, f)  # JSON is YAML
    store = os.path.join(work, "store")
    devices = "cpu" if device == "cpu" else "cuda:0"
    subprocess.run([xlab, "--store", store, "-q", "run", path, "--devices", devices, "-j", "1",
                    "--threads", str(threads)], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run([xlab, "--store", store, "export", "-e", "sampling-bench"], check=True,
                         capture_output=True, text=True)
    rate = None
    for line in out.stdout.splitlines():
        series = json.loads(line).get("metrics", {}).get("time.nfe_per_s")
        if series:
            rate = series[-1][1]
    weights = glob.glob(os.path.join(store, "runs", "*", "weights.safetensors"))
    if rate is None or len(weights) != 1:
        raise SystemExit(f"no sampling rate or no single weights file in {store}")
    return rate, weights[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        xl, weights = run_xlab(args.xlab, args.device, args.threads, args.steps, args.samples, work)
        net = UNet((1, 8, 8), CHANNELS, TIME_DIM)
        net.load_state_dict(load_file(weights), strict=True)
        net = net.to(dev).eval()
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        ac = torch.cumprod(1 - betas, 0).float().to(dev)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(args.samples, 64, generator=g).to(dev)
        rates = []
        with torch.no_grad():
            net(noise, torch.zeros(args.samples, device=dev))  # warm-up
            for _ in range(args.repeats):
                start = time.perf_counter()
                x = ddim_loop(net, noise, args.steps, ac)
                float(x.sum())  # waits for the device
                rates.append(args.steps / (time.perf_counter() - start))
        eager = statistics.median(rates)
        rows.append({"case": "ddim-unet-digits", "steps": args.steps, "batch": args.samples,
                     "xlab_nfe_per_s": xl, "eager_nfe_per_s": eager, "ratio": xl / eager})
        print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    meta = {"device": args.device, "gpu": gpu, "threads": args.threads, "torch": torch.__version__,
            "host": platform.node(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"sampling-{args.device}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
