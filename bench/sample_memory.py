"""Peak memory of a large sample job: 50,000 samples of 28×28 images, scored in full.

The script writes a small dataset of its own (28×28 grey images of 10 classes, each a bright
spot at its class's place with jitter and pixel noise) as an NPZ file, then runs one xlab
experiment on it: a CNN classifier, a class-conditional UNet trained for one epoch with that
classifier as its scorer, and a sample job that draws `--samples` images with Euler in 2 steps
(the step count does not change the memory; Euler leaves values outside the data's range, so
the raw values are scored as well as the delivered ones). The job scores everything it draws:
nearest-neighbour distance to the training images, SWD, MMD, the classifier's accuracy and the
Fréchet distance in its features. A sample job records its worker's peak resident memory
(`sys.peak_rss_mb`); the figure is that, read back from the store, with the job's sampling time
and its whole run time.

    python bench/sample_memory.py --xlab target/release/xlab --out bench/results
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

SIDE = 28
CLASSES = 10


def write_images(path, n, seed=0):
    """n images of SIDE×SIDE in [0, 1]: class k is a Gaussian spot at its own place."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    centres = np.array([(6 + 8 * (k % 3), 5 + 6 * (k // 3)) for k in range(CLASSES)], dtype=float)
    grid = np.stack(np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="xy"), -1).reshape(-1, 2)
    c = centres[y] + rng.normal(0, 1.0, (n, 2))
    d2 = ((grid[None, :, :] - c[:, None, :]) ** 2).sum(-1)
    x = np.exp(-d2 / (2 * 2.5**2)) + rng.normal(0, 0.05, (n, SIDE * SIDE))
    np.savez(path, x=np.clip(x, 0, 1).astype(np.float32), y=y.astype(np.int64))


def run(xlab, samples, work):
    data = os.path.join(work, "spots.npz")
    write_images(data, 3000)
    spots = {"name": "npz", "path": data, "n_val": 200, "n_test": 500, "image": [1, SIDE, SIDE]}
    exp = {
        "name": "sample-memory",
        "defaults": {"data": spots},
        "stages": {
            "classifier": {"task": "train", "model": {"name": "cnn", "channels": [8, 16]},
                           "optimizer": {"name": "adam", "lr": 0.003}, "batch_size": 128, "epochs": 2},
            "train": {"needs": "classifier", "task": "train",
                      "model": {"name": "unet", "channels": [8, 16], "time_dim": 16},
                      "diffusion": {"timesteps": 1000, "conditional": True},
                      "optimizer": {"name": "adam", "lr": 0.002}, "batch_size": 128, "epochs": 1},
            "sample": {"needs": "train", "task": "sample", "denoiser": {"name": "trained"}, "samples": samples,
                       "sampler": {"use": "diffusion.euler", "steps": 2}},
        },
    }
    path = os.path.join(work, "sample-memory.yaml")
    with open(path, "w") as f:
        json.dump(exp, f)  # JSON is YAML
    store = os.path.join(work, "store")
    subprocess.run([xlab, "--store", store, "-q", "run", path, "--devices", "cpu", "-j", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    out = subprocess.run([xlab, "--store", store, "export", "-e", "sample-memory"], check=True,
                         capture_output=True, text=True)
    rows = []
    for line in out.stdout.splitlines():
        item = json.loads(line)
        job = item.get("job")
        if item.get("type") != "job" or job["stage"] != "sample":
            continue
        last = {k: v[-1][1] for k, v in item["metrics"].items()}
        attempt = job["attempts"][-1]
        rows.append({"sampler": job["config"]["sampler"]["use"], "samples": samples, "image": f"1×{SIDE}×{SIDE}",
                     "peak_rss_mb": last["sys.peak_rss_mb"], "sample_s": last["time.sample_s"],
                     "job_s": attempt["ended_unix"] - attempt["started_unix"],
                     "out_of_range": last["sample.out_of_range"]})
    if len(rows) != 1:
        raise SystemExit(f"expected 1 sample job in {store}, found {len(rows)}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = run(args.xlab, args.samples, work)
    for r in rows:
        print(json.dumps(r), flush=True)
    meta = {"device": "cpu", "host": platform.node(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory-sampling.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
