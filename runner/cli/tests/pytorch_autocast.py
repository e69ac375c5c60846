"""For runner/cli/tests/pytorch_models.rs: one training step of each diffusion weights file in
PyTorch, with `torch.autocast("cpu", dtype)` as a mixed-precision PyTorch loop runs it, against
`xlab-worker forward --precision P` on the same inputs: the prediction, the training loss
(`F.mse_loss(pred.float(), target)`) and every parameter's gradient. Prints, per file and
precision, the largest differences (relative to the largest value) as JSON.

    python pytorch_autocast.py WORKER WEIGHTS...
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def step(model, inputs, precision, conditional):
    model.zero_grad()
    y = inputs["y"] if conditional else None
    if precision == "fp32":
        pred = model(inputs["x"], inputs["t"], y)
    else:
        with torch.autocast("cpu", dtype=DTYPES[precision]):
            pred = model(inputs["x"], inputs["t"], y)
    loss = torch.nn.functional.mse_loss(pred.float(), inputs["target"])
    loss.backward()
    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    return pred.detach().float(), loss.detach().reshape(1), grads


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def main():
    worker, files = sys.argv[1], sys.argv[2:]
    out = {}
    for path in files:
        model, about = xlab_torch.load(path)
        model.eval()
        g = torch.Generator().manual_seed(1)
        b = 16
        inputs = {
            "x": torch.randn(b, about.input_dim, generator=g),
            "t": torch.randint(0, about.diffusion["timesteps"], (b,), generator=g).float(),
            "y": torch.arange(b) % (about.classes + 1),
            "target": torch.randn(b, about.input_dim, generator=g),
        }
        conditional = about.null_label is not None
        results = {}
        for precision in ["fp32", "bf16", "fp16"]:
            pred, loss, grads = step(model, inputs, precision, conditional)
            with tempfile.TemporaryDirectory() as d:
                given, got = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
                save_file(inputs, given)
                subprocess.run(
                    [worker, "forward", "--weights", path, "--input", given, "--out", got, "--precision", precision],
                    check=True,
                )
                theirs = load_file(got)
            missing = sorted(set(grads) ^ {k for k in theirs if k.startswith("grad.")})
            assert not missing, (path, missing)
            results[precision] = {
                "out": rel(theirs["out"], pred),
                "loss": rel(theirs["loss"], loss),
                # Against the largest gradient of any parameter (a bias before a GroupNorm
                # has a gradient near 0, so per-tensor ratios would mean nothing).
                "grad": max((theirs[k] - v).abs().max().item() for k, v in grads.items())
                / max(v.abs().max().item() for v in grads.values()),
                "pred": pred,
            }
        fp32 = results["fp32"].pop("pred")
        for precision in ["bf16", "fp16"]:
            # How far the half-precision prediction is from fp32's: autocast took effect.
            results[precision]["from_fp32"] = rel(results[precision].pop("pred"), fp32)
        out[path] = {"model": about.model["name"], **results}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
