"""The results store: metric ingestion and resume detection.

1. Ingestion: `cargo bench -p xlab-store --bench ingest` writes 1,000,000 points (100 jobs x 10
   metrics x 1,000 steps) into a real sled store through the coordinator's batched write path,
   with 64, 16 and 1 step(s) per batch. The peer writes the same points, in the same batches,
   into SQLite from Python, the way Python experiment trackers keep metrics (MLflow's default
   backend is a SQLite file with one row per point): a (job, metric, step) primary key, one
   transaction per batch, WAL journal with synchronous=NORMAL, which like sled's log syncs in
   the background rather than at every write.
2. Resume detection: a 10,000-job sweep (100 grid points x 100 seeds of `task: noop`) whose jobs
   the store holds as done; `xlab run` on it reads the file, expands and identifies every job,
   finds each done, and prints the results table.

    python bench/store.py --xlab target/release/xlab --out bench/results
"""

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time

JOBS, METRICS, STEPS = 100, 10, 1000


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def xlab_ingest(work):
    out = os.path.join(work, "ingest.json")
    env = dict(os.environ, XLAB_BENCH_JSON=out)
    subprocess.run([os.environ.get("CARGO", "cargo"), "bench", "-q", "-p", "xlab-store", "--bench", "ingest"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    with open(out) as f:
        return {r["steps_per_batch"]: r for r in json.load(f)}


def sqlite_ingest(work, per_batch):
    path = os.path.join(work, f"metrics-{per_batch}.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE metrics (job TEXT, name TEXT, step INTEGER, value REAL, PRIMARY KEY (job, name, step))")
    names = [f"train.metric_{i}" for i in range(METRICS)]
    points = 0
    t0 = time.perf_counter()
    for j in range(JOBS):
        job = f"{j:016x}"
        for start in range(0, STEPS, per_batch):
            rows = [(job, n, s, (s * 31 + i) * 1e-3) for s in range(start, min(start + per_batch, STEPS))
                    for i, n in enumerate(names)]
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", rows)
            db.execute("COMMIT")
            points += len(rows)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds = time.perf_counter() - t0
    db.close()
    size = sum(os.path.getsize(p) for p in [path, path + "-wal"] if os.path.exists(p))
    return {"steps_per_batch": per_batch, "points": points, "seconds": seconds, "points_per_s": points / seconds,
            "bytes": size, "bytes_per_point": size / points}


def resume_detection(xlab, work, grid=100, seeds=100):
    exp = os.path.join(work, "sweep.yaml")
    values = [round(i * 1e-4, 6) for i in range(grid)]
    with open(exp, "w") as f:
        json.dump({"name": "sweep10k", "defaults": {"task": "noop", "data": {"name": "two_moons"}},
                   "stages": {"jobs": {"grid": {"noop.sleep_s": values}, "seeds": seeds}}}, f)
    store = os.path.join(work, "store")
    plan = subprocess.run([xlab, "--store", store, "plan", exp], check=True, capture_output=True, text=True).stdout
    ids = [line.split()[0] for line in plan.splitlines() if line.startswith("    ")]
    assert len(ids) == grid * seeds, len(ids)
    # The store as a finished run leaves it: every job done, with a final metric.
    lines = os.path.join(work, "done.jsonl")
    with open(lines, "w") as f:
        f.write(json.dumps({"type": "experiment", "name": "sweep10k", "file": exp, "source": "", "updated_unix": 0,
                            "stages": [{"name": "jobs", "sweep_keys": ["noop.sleep_s"], "jobs": ids}]}) + "\n")
        for k, jid in enumerate(ids):
            lr = values[k // seeds]
            job = {"id": jid, "experiment": "sweep10k", "stage": "jobs", "seed": k % seeds,
                   "config": {"task": "noop", "noop": {"sleep_s": lr}}, "point": [["noop.sleep_s", lr]],
                   "parents": [], "status": "done", "attempts": [], "summary": {"noop.sleep_s": lr},
                   "provenance": {"xlab_version": "bench", "libtorch": None, "host": None, "device": None},
                   "artifacts": []}
            f.write(json.dumps({"type": "job", "job": job, "metrics": {}}) + "\n")
    subprocess.run([xlab, "--store", store, "import", lines], check=True, stdout=subprocess.DEVNULL)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run([xlab, "--store", store, "run", exp, "--devices", "cpu"], check=True, capture_output=True,
                             text=True, env=dict(os.environ, XLAB_NO_LIVE="1"))
        times.append(time.perf_counter() - t0)
    assert f"0 done, {len(ids)} skipped" in out.stderr, out.stderr[-500:]
    return {"jobs": len(ids), "seconds": min(times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        ours = xlab_ingest(work)
        for per_batch in (64, 16, 1):
            peer = sqlite_ingest(work, per_batch)
            x = ours[per_batch]
            rows.append({"steps_per_batch": per_batch, "points": x["points"], "xlab_points_per_s": x["points_per_s"],
                         "xlab_bytes_per_point": x["bytes_per_point"], "sqlite_points_per_s": peer["points_per_s"],
                         "sqlite_bytes_per_point": peer["bytes_per_point"],
                         "ratio": x["points_per_s"] / peer["points_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
        resume = resume_detection(args.xlab, work)
        print(json.dumps(resume), flush=True)
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_count": os.cpu_count(),
                       "sqlite": sqlite3.sqlite_version,
                       "command": " ".join([os.path.basename(sys.executable)] + sys.argv)},
              "ingest": rows, "resume": resume}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "store.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
