"""For runner/cli/tests/pytorch_models.rs: Normalized Attention Guidance in a UNet with
cross-attention, xlab (`xlab-worker forward --attention`, the real diffusion.nag plugin) against
python/xlab_torch.py's transcription of the reference processor (NAGAttnProcessor), on the same
weights (loaded with strict=True) and fixed inputs, in both batch layouts of the reference: 2B
contexts for B images (no CFG) and 3B contexts for 2B images (CFG: [uncond, cond] images, only
the cond rows guided). xlab's CFG batch is [cond; uncond], so rows are matched by name.
Prints the largest differences as JSON.

    python pytorch_nag.py WORKER WEIGHTS
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "python"))
import xlab_torch  # noqa: E402


def xlab(worker, path, inputs, attention):
    with tempfile.TemporaryDirectory() as d:
        given, got = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        save_file(inputs, given)
        cmd = [worker, "forward", "--weights", path, "--input", given, "--out", got]
        if attention is not None:
            cmd += ["--attention", json.dumps(attention)]
        subprocess.run(cmd, check=True)
        return load_file(got)["out"]


def main():
    worker, path = sys.argv[1], sys.argv[2]
    model, about = xlab_torch.load(path)
    attn = model.cross.attn
    k, null, T = about.classes, about.null_label, about.diffusion["timesteps"]
    g = torch.Generator().manual_seed(0)
    b = 6
    x = torch.randn(b, about.input_dim, generator=g)
    y = torch.arange(b) % k
    neg = (y + 3) % k
    out = {}
    for name, params, t in [
        ("defaults", {}, 0.8 * (T - 1)),
        ("alpha_0.5_l2", {"alpha": 0.5, "norm": "l2", "scale": 3.0, "tau": 1.5}, 0.3 * (T - 1)),
        ("outside_window", {"end": 0.5}, 0.2 * (T - 1)),
    ]:
        ts = torch.full((b,), float(t))
        spec = {"use": "diffusion.nag", **params}
        scale, tau, alpha = params.get("scale", 5.0), params.get("tau", 2.5), params.get("alpha", 0.25)
        p = 2 if params.get("norm") == "l2" else 1
        inside = t >= (1 - params.get("end", 1.0)) * (T - 1)
        nag = xlab_torch.NAGAttnProcessor(scale, tau, alpha, p)
        with torch.no_grad():
            attn.processor = xlab_torch.AttnProcessor()
            plain = model(x, ts, y)
            attn.processor = nag if inside else xlab_torch.AttnProcessor()
            # 2B: B images, contexts [positive, negative].
            torch_2b = model(x, ts, y, y_negative=neg if inside else None)
            # 3B: [uncond, cond] images, contexts [uncond, cond, negative].
            torch_3b = model(torch.cat([x, x]), ts.repeat(2), torch.cat([torch.full_like(y, null), y]),
                             y_negative=neg if inside else None)
        xlab_2b = xlab(worker, path, {"x": x, "t": ts, "y": y, "y_neg": neg}, spec)
        xlab_3b = xlab(worker, path, {"x": torch.cat([x, x]), "t": ts.repeat(2),
                                      "y": torch.cat([y, torch.full_like(y, null)]), "y_neg": neg}, spec)
        xlab_plain = xlab(worker, path, {"x": x, "t": ts, "y": y}, None)
        out[name] = {
            "inside_window": bool(inside),
            "diff_2b": (xlab_2b - torch_2b).abs().max().item(),
            "diff_3b_cond": (xlab_3b[:b] - torch_3b[b:]).abs().max().item(),
            "diff_3b_uncond": (xlab_3b[b:] - torch_3b[:b]).abs().max().item(),
            "diff_plain": (xlab_plain - plain).abs().max().item(),
            # How much the guidance moved the prediction (0 outside its window).
            "nag_effect": (xlab_2b - xlab_plain).abs().max().item(),
            "cond_rows_3b_vs_2b": (xlab_3b[:b] - xlab_2b).abs().max().item(),
            "scale": xlab_2b.abs().max().item(),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
