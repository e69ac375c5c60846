"""Co-Mixup's per-batch cost: xlab's transform against the PyTorch + gco version of the
reference algorithm.

Both mix the same batch (100 images of 3x32x32, 10 classes, a saliency gradient from the same
formulas) in partitions of 20 with the reference's defaults, at 4, 8 and 16 blocks per side.
- xlab: `cargo bench -p xlab-plugin-mixup --bench comixup`, the plugin through its real boundary.
- the peer: `plugins/mixup/tests/reference/comixup_reference.py`, the reference's loops
  (snu-mllab/Co-Mixup match.py) in PyTorch, each graph cut by gco-wrapper as there, float64 on
  the CPU; the same code the tests check xlab against.

    python bench/comixup.py --out bench/results
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "plugins", "mixup", "tests", "reference"))

import torch  # noqa: E402
from comixup_reference import Rng, co_mixup  # noqa: E402

B, SIDE, CLASSES, PART = 100, 32, 10, 20


def inputs():
    """The batch and its saliency gradient, as plugins/mixup/benches/comixup.rs builds them."""
    torch.set_default_dtype(torch.float64)
    i = torch.arange(B * 3 * SIDE * SIDE, dtype=torch.float64)
    x = torch.sin(i * 0.013).reshape(B, 3, SIDE, SIDE)
    pix = torch.arange(SIDE * SIDE, dtype=torch.float64)
    r, c = torch.div(pix, SIDE, rounding_mode="floor"), torch.remainder(pix, SIDE)
    b = torch.arange(B, dtype=torch.float64).unsqueeze(1)
    cr, cc = torch.remainder(b * 7.0, SIDE), torch.remainder(b * 13.0, SIDE)
    bump = torch.exp(-((r.unsqueeze(0) - cr) ** 2 + (c.unsqueeze(0) - cc) ** 2) / 40.0)
    g = (bump.unsqueeze(1) * torch.cos(i * 0.031).reshape(B, 3, SIDE * SIDE)).reshape(B, 3, SIDE, SIDE)
    y = torch.remainder(torch.arange(B), CLASSES)
    return x, y, g


def reference_ms(blocks, reps):
    x, y, g = inputs()
    p = {"block_num": blocks, "part": PART, "beta": 0.32, "gamma": 1.0, "thres": 0.83, "thres_type": "hard",
         "eta": 0.05, "alpha": 2.0, "omega": 0.001, "set_resolve": True, "niter": 4, "clean_lam": 0.0}
    rng = Rng(7)
    _, t = co_mixup(x, y, g, CLASSES, p, rng)
    checksum = float((t**2 * (torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape) + 1)).sum())
    t0 = time.perf_counter()
    for _ in range(reps):
        co_mixup(x, y, g, CLASSES, p, rng)
    return (time.perf_counter() - t0) * 1e3 / reps, checksum


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "comixup.json")
        env = dict(os.environ, XLAB_BENCH_JSON=out)
        subprocess.run([os.environ.get("CARGO", "cargo"), "bench", "-q", "-p", "xlab-plugin-mixup", "--bench", "comixup"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        with open(out) as f:
            rows = json.load(f)
    for r in rows:
        r["reference_ms"], checksum = reference_ms(r["block_num"], max(1, r["reps"] // 2))
        r["speedup"] = r["reference_ms"] / r["xlab_ms"]
        # The first batch's Σ (k + 1)·t_k² on both sides: the same masks give the same sum.
        r["same_targets"] = abs(checksum - r["checksum"]) <= 1e-9 * abs(checksum)
        print(f"block_num {r['block_num']:>2}: xlab {r['xlab_ms']:8.1f} ms, reference {r['reference_ms']:8.1f} ms")
    meta = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/comixup.py"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "comixup.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
