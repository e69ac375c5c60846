"""For runner/cli/tests/pytorch_models.rs: loads each weights file with python/xlab_torch.py
(strict=True), runs it on fixed inputs, asks `xlab-worker forward` for xlab's outputs on the same
inputs, and prints the largest difference per file as JSON.

    python pytorch_models.py WORKER WEIGHTS...
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


def main():
    worker, files = sys.argv[1], sys.argv[2:]
    out = {}
    for path in files:
        model, about = xlab_torch.load(path)
        g = torch.Generator().manual_seed(0)
        b = 7
        inputs = {"x": torch.randn(b, about.input_dim, generator=g)}
        if about.diffusion is not None:
            inputs["t"] = torch.randint(0, about.diffusion["timesteps"], (b,), generator=g).float()
            # Every class and the null label.
            inputs["y"] = torch.arange(b) % (about.classes + 1)
        with tempfile.TemporaryDirectory() as d:
            given, got = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
            save_file(inputs, given)
            subprocess.run([worker, "forward", "--weights", path, "--input", given, "--out", got], check=True)
            theirs = load_file(got)["out"]
        with torch.no_grad():
            if about.diffusion is not None:
                mine = model(inputs["x"], inputs["t"], inputs.get("y") if about.null_label is not None else None)
            else:
                mine = model(inputs["x"])
        assert mine.shape == theirs.shape, (path, mine.shape, theirs.shape)
        out[path] = {"model": about.model["name"], "max_abs_diff": (mine - theirs).abs().max().item(),
                     "scale": theirs.abs().max().item(), "shape": list(mine.shape)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
