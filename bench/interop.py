"""From a store to pandas: 10^5 job summaries into a DataFrame (`xlab_results.jobs`: export to
Parquet, then read), and 10^7 curve points (`xlab export --format parquet` of every series, then
`pandas.read_parquet`), in stores built by `xlab import` from generated export lines. Bars: 1 s
and 3 s.

    python bench/interop.py --xlab target/release/xlab --out bench/results
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "xlab_results"))
import pandas as pd  # noqa: E402
import xlab_results as xr  # noqa: E402


def write_jobs(path, n_jobs, metrics, steps):
    rng = random.Random(0)
    lrs = [0.001, 0.003, 0.01, 0.03, 0.1]
    ids = [f"{i:016x}" for i in range(n_jobs)]
    with open(path, "w") as f:
        f.write(json.dumps({"type": "experiment", "name": "big", "file": "big.yaml", "source": "", "updated_unix": 0,
                            "stages": [{"name": "train", "sweep_keys": ["optimizer.lr"], "jobs": ids}]}) + "\n")
        for i, jid in enumerate(ids):
            lr = lrs[i % len(lrs)]
            summary = {f"m{k}": rng.random() for k in range(metrics)}
            series = {k: [[s, v * s / steps] for s in range(1, steps + 1)] for k, v in summary.items()}
            job = {"id": jid, "experiment": "big", "stage": "train", "seed": i // len(lrs) % 10,
                   "config": {"task": "train", "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
                              "model": {"name": "mlp", "hidden": [64, 64]}, "epochs": steps},
                   "point": [["optimizer.lr", lr]], "parents": [], "status": "done", "attempts": [],
                   "summary": summary, "provenance": {"xlab_version": "bench", "libtorch": None, "host": None,
                                                      "device": None},
                   "artifacts": []}
            f.write(json.dumps({"type": "job", "job": job, "metrics": series}) + "\n")


def store_of(work, xlab, n_jobs, metrics, steps):
    lines = os.path.join(work, "in.jsonl")
    write_jobs(lines, n_jobs, metrics, steps)
    store = os.path.join(work, "store")
    subprocess.run([xlab, "--store", store, "import", lines], check=True, stdout=subprocess.DEVNULL)
    os.remove(lines)
    return store


def best_of(n, f):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    xlab = os.path.abspath(args.xlab)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        store = store_of(work, xlab, 100_000, 10, 1)
        secs, df = best_of(3, lambda: xr.jobs(store, xlab=xlab))
        rows.append({"what": "10^5 job summaries into a DataFrame (xlab_results.jobs)", "rows": len(df),
                     "columns": len(df.columns), "seconds": secs, "bar_s": 1.0})
        print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as work:
        store = store_of(work, xlab, 1000, 10, 1000)
        out = os.path.join(work, "export")

        def export_and_read():
            xr.export(store, out, xlab=xlab)
            return pd.read_parquet(os.path.join(out, "metrics.parquet"))

        secs, df = best_of(3, export_and_read)
        size = os.path.getsize(os.path.join(out, "metrics.parquet"))
        rows.append({"what": "10^7 curve points: export to Parquet and read into pandas", "rows": len(df),
                     "file_bytes": size, "seconds": secs, "bar_s": 3.0})
        print(json.dumps(rows[-1]), flush=True)
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_count": os.cpu_count(),
                       "pandas": pd.__version__, "command": " ".join([os.path.basename(sys.executable)] + sys.argv)},
              "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "interop.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
