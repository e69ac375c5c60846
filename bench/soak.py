"""A soak of the store: `cargo bench -p xlab-store --bench soak` writes 10,000,000 metric points in
mixed batch sizes through the coordinator's write path while two threads read the same store, and
reports throughput (overall, first and last tenth), the longest single write and flush, and the
reads made. Writes bench/results/soak.json for BENCHMARKS.md.

    python bench/soak.py [--points 10000000] --out bench/results
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=10_000_000)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "soak.json")
        env = dict(os.environ, XLAB_BENCH_JSON=out, XLAB_SOAK_POINTS=str(args.points))
        subprocess.run([os.environ.get("CARGO", "cargo"), "bench", "-q", "-p", "xlab-store", "--bench", "soak"],
                       check=True, env=env)
        with open(out) as f:
            row = json.load(f)
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_count": os.cpu_count(),
                       "command": " ".join([os.path.basename(sys.executable)] + sys.argv)},
              "row": row}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
