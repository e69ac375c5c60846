"""Fuzzing: every parser target of the xlab-fuzz crate for a fixed number of inputs.

Each target runs as its crate's fuzz test with a budget from the environment, starting from its
corpus in fuzz/corpus/<target>/ and adding the inputs that reached a new outcome there
(XLAB_FUZZ_SAVE). A panic fails the run and leaves its input in fuzz/crashes/<target>/.
Writes bench/results/fuzz.json for BENCHMARKS.md.

    python bench/fuzz.py [--inputs 1000000 | --seconds N] [--seed 1] --out bench/results
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# (target, the cargo test that runs it)
TARGETS = [
    ("spec", ["-p", "xlab-plan", "--test", "fuzz"]),
    ("filter", ["-p", "xlab-cli", "--bin", "xlab", "fuzz_filters"]),
    ("events", ["-p", "xlab-proto", "--test", "fuzz"]),
    ("npz", ["-p", "xlab-worker", "--lib", "fuzz_npz"]),
    ("csv", ["-p", "xlab-worker", "--lib", "fuzz_csv"]),
    ("idx", ["-p", "xlab-worker", "--lib", "fuzz_idx"]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=int, default=None, help="run each target this long instead of --inputs inputs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated targets")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    cargo = os.environ.get("CARGO", "cargo")
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as work:
        report = os.path.join(work, "fuzz.jsonl")
        for name, test in TARGETS:
            if args.only and name not in args.only.split(","):
                continue
            env = dict(os.environ, XLAB_FUZZ_SEED=str(args.seed), XLAB_FUZZ_SAVE="1", XLAB_FUZZ_REPORT=report)
            if args.seconds:
                env["XLAB_FUZZ_SECONDS"] = str(args.seconds)
                env.pop("XLAB_FUZZ_INPUTS", None)
                print(f"fuzz {name}: {args.seconds} s", flush=True)
            else:
                env["XLAB_FUZZ_INPUTS"] = str(args.inputs)
                print(f"fuzz {name}: {args.inputs} inputs", flush=True)
            r = subprocess.run([cargo, "test", "--release", "-q", *test, "--", "--nocapture"], env=env)
            if r.returncode != 0:
                failed.append(name)
        with open(report) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_count": os.cpu_count(),
                       "command": "make fuzz (python bench/fuzz.py " + (f"--seconds {args.seconds}" if args.seconds else
                                                                       f"--inputs {args.inputs}") + f" --seed {args.seed})"},
              "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fuzz.json"), "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        print(f"{r['target']}: {r['inputs']} inputs, {r['panics']} panics, {r['inputs_per_s']:.0f}/s")
    if failed:
        sys.exit(f"fuzz targets with panics: {', '.join(failed)} (inputs in fuzz/crashes/)")


if __name__ == "__main__":
    main()
