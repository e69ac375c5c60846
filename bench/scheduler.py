"""Scheduler overhead with the built-in no-op task (`task: noop`).

1. N no-op jobs (default 1,000) on the machine's CPU slots: jobs per second, from `xlab run`'s
   start to its end (each job is a real `xlab-worker` process, started, reported and recorded).
2. M jobs of 1 s each (default 200) on 2 slots: wall time over the ideal M/2 seconds.

    python bench/scheduler.py --xlab target/release/xlab --out bench/results
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def run(xlab, store, path, slots):
    t0 = time.perf_counter()
    subprocess.run([xlab, "--store", store, "-q", "run", path, "--devices", "cpu", "-j", str(slots)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def experiment(work, name, jobs, sleep_s):
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump({"name": name, "defaults": {"task": "noop", "data": {"name": "two_moons"}},
                   "stages": {"jobs": {"noop": {"sleep_s": sleep_s}, "seeds": jobs}}}, f)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--noop-jobs", type=int, default=1000)
    ap.add_argument("--sleep-jobs", type=int, default=200)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    slots = os.cpu_count()
    with tempfile.TemporaryDirectory() as work:
        noop_s = run(args.xlab, os.path.join(work, "a"), experiment(work, "noop", args.noop_jobs, 0.0), slots)
        # A second run of the same file finds every job done: resume detection.
        skip_s = run(args.xlab, os.path.join(work, "a"), experiment(work, "noop", args.noop_jobs, 0.0), slots)
        sleep_s = run(args.xlab, os.path.join(work, "b"), experiment(work, "sleep", args.sleep_jobs, 1.0), 2)
    ideal = args.sleep_jobs / 2
    result = {
        "meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_count": slots,
                 "command": " ".join([os.path.basename(sys.executable)] + sys.argv)},
        "noop": {"jobs": args.noop_jobs, "slots": slots, "wall_s": noop_s, "jobs_per_s": args.noop_jobs / noop_s,
                 "rerun_all_done_s": skip_s},
        "sleep": {"jobs": args.sleep_jobs, "slots": 2, "job_s": 1.0, "wall_s": sleep_s, "ideal_s": ideal,
                  "overhead": sleep_s / ideal - 1.0},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scheduler.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
