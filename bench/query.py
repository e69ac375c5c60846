"""Query speed over large stores: a filter, a group-by and aggregates over 10^4 and 10^5 jobs
(10^6 with `--sizes 1000000 --name query-large`) with 10 metrics each, in stores built by `xlab import` from generated
export lines.

    python bench/query.py --xlab target/release/xlab --out bench/results
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

QUERY = ['stage == "train" and optimizer.lr < 0.05 and last(m0) > 0.1', "--group-by", "optimizer.lr,seed",
         "--agg", "mean(m0),ci95(m0),max(m1),count()", "--sort", "-mean(m0)", "--format", "csv"]


def write_export(path, n):
    rng = random.Random(0)
    lrs = [0.001, 0.003, 0.01, 0.03, 0.1]
    ids = [f"{i:016x}" for i in range(n)]
    with open(path, "w") as f:
        f.write(json.dumps({"type": "experiment", "name": "big", "file": "big.yaml", "source": "", "updated_unix": 0,
                            "stages": [{"name": "train", "sweep_keys": ["optimizer.lr"], "jobs": ids}]}) + "\n")
        for i, jid in enumerate(ids):
            lr = lrs[i % len(lrs)]
            summary = {f"m{k}": rng.random() for k in range(10)}
            job = {"id": jid, "experiment": "big", "stage": "train", "seed": i // len(lrs) % 10,
                   "config": {"task": "train", "optimizer": {"name": "sgd", "lr": lr}},
                   "point": [["optimizer.lr", lr]], "parents": [], "status": "done", "attempts": [],
                   "summary": summary, "provenance": {"xlab_version": "bench", "libtorch": None, "host": None,
                                                      "device": None},
                   "artifacts": []}
            f.write(json.dumps({"type": "job", "job": job, "metrics": {k: [[1, v]] for k, v in summary.items()}}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="query", help="the result file's name (query-large for 10^6 jobs)")
    args = ap.parse_args()
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as work:
            lines = os.path.join(work, "big.jsonl")
            write_export(lines, n)
            store = os.path.join(work, "store")
            t0 = time.perf_counter()
            subprocess.run([args.xlab, "--store", store, "import", lines], check=True, stdout=subprocess.DEVNULL)
            import_s = time.perf_counter() - t0
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                out = subprocess.run([args.xlab, "--store", store, "query", "-e", "big", *QUERY], check=True,
                                     capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
            groups = len(out.stdout.splitlines()) - 1
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)
            rows.append({"jobs": n, "import_s": import_s, "query_s": min(times), "groups": groups,
                         "store_bytes": size})
            print(json.dumps(rows[-1]), flush=True)
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_count": os.cpu_count(),
                       "query": "xlab query " + " ".join(QUERY),
                       "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
