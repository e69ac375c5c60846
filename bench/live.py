"""Reading a store while a run owns it (README "Read during a run").

1. A store holding an experiment of 10^5 jobs (built by `xlab import`, as bench/query.py does).
2. The query of bench/query.py over those jobs on the idle store (the reader opens it itself).
3. A run in the same store whose noop jobs stream metric points as fast as the coordinator takes
   them (`noop: {log_steps, log_metrics}`): its ingestion rate alone, then again while the same
   query runs over and over through the run's socket: the query's latency then, and the rate.
4. 1,000 small queries from 4 concurrent clients during a run: errors and lock refusals counted.

    python bench/live.py --xlab target/release/xlab --out bench/results
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from query import QUERY, write_export  # noqa: E402

# Each run gets seeds of its own: the same config and seed is the same job, which a store holding
# it done would skip.
INGEST = """name: {name}
defaults:
  data: {{name: two_moons, n_train: 64, n_val: 16, n_test: 16}}
  task: noop
stages:
  stream:
    noop: {{log_steps: {steps}, log_metrics: {metrics}, log_rows_per_s: {rate}}}
    seeds: {seeds}
"""

# A run that outlasts the clients (it is killed when they are done).
WAITING = """name: {name}
defaults:
  data: {{name: two_moons, n_train: 64, n_val: 16, n_test: 16}}
  task: noop
stages:
  wait:
    noop: {{sleep_s: 3600, log_steps: 100, log_metrics: 2}}
"""


def xlab(args, store, **kw):
    return subprocess.run([ARGS.xlab, "--store", store] + args, capture_output=True, text=True, **kw)


def timed_query(store):
    t = time.perf_counter()
    r = xlab(["query", "-e", "big"] + QUERY, store)
    return time.perf_counter() - t, r


def run_ingest(store, tmp, name, first_seed, during=None, text=None):
    """Runs one ingest experiment; returns (points/s, results of `during` run alongside)."""
    path = os.path.join(tmp, f"{name}.yaml")
    seeds = list(range(first_seed, first_seed + ARGS.jobs))
    with open(path, "w") as f:
        f.write(text or INGEST.format(name=name, steps=ARGS.steps, metrics=ARGS.metrics, seeds=seeds,
                                      rate=ARGS.rows_per_s))
    env = dict(os.environ, XLAB_NO_LIVE="1")
    t = time.perf_counter()
    proc = subprocess.Popen([ARGS.xlab, "--store", store, "run", path, "-j", str(ARGS.jobs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = []
    if during is not None:
        # Wait until the run serves, then read through it until it ends.
        sock = os.path.join(store, "xlab.sock")
        while not os.path.exists(sock) and proc.poll() is None:
            time.sleep(0.01)
        out = during(proc)
        if text is not None:
            proc.kill()
            proc.communicate()
            return 0.0, out, time.perf_counter() - t
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"the ingest run failed:\n{err}")
    # The rate the coordinator took the rows at: each job's rows over the time its stream took
    # (the stream runs behind its pace only when the rows are taken slower), summed over jobs.
    r = xlab(["export", "-e", name], store)
    jobs = [json.loads(line)["job"] for line in r.stdout.splitlines() if json.loads(line)["type"] == "job"]
    rate = sum(ARGS.steps * ARGS.metrics / j["summary"]["noop.stream_s"] for j in jobs)
    return rate, out, wall


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--xlab", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--jobs", type=int, default=2)
    # 2 jobs × 100 metrics × 750 rows/s = 150,000 points/s for 40 s.
    p.add_argument("--steps", type=int, default=30_000)
    p.add_argument("--rows-per-s", type=int, default=750)
    p.add_argument("--metrics", type=int, default=100)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--queries", type=int, default=1000)
    ARGS = p.parse_args()
    ARGS.xlab = os.path.abspath(ARGS.xlab)
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_count": os.cpu_count(),
                       "command": "python bench/live.py " + " ".join(sys.argv[1:])},
              "jobs_in_store": ARGS.size,
              "ingest": {"jobs": ARGS.jobs, "steps": ARGS.steps, "metrics": ARGS.metrics}}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "results")
        lines = os.path.join(tmp, "big.jsonl")
        write_export(lines, ARGS.size)
        r = xlab(["import", lines], store)
        if r.returncode != 0:
            sys.exit(r.stderr)

        idle = [timed_query(store)[0] for _ in range(5)]
        result["query_idle_s"] = statistics.median(idle)
        print(f"query over {ARGS.size} jobs, idle store: {result['query_idle_s']:.3f} s", flush=True)

        rate_alone, _, wall = run_ingest(store, tmp, "alone", 0)
        result["ingest_alone_points_per_s"] = rate_alone
        print(f"ingestion alone: {rate_alone:,.0f} points/s ({wall:.1f} s)", flush=True)

        def query_loop(proc):
            times, failures = [], []
            while proc.poll() is None:
                dt, r = timed_query(store)
                if proc.poll() is not None:
                    break
                (times if r.returncode == 0 else failures).append(dt if r.returncode == 0 else r.stderr)
            return times, failures

        rate_read, (times, failures), wall = run_ingest(store, tmp, "read", 100, during=query_loop)
        result["ingest_while_read_points_per_s"] = rate_read
        result["query_during_run_s"] = statistics.median(times) if times else None
        result["queries_during_run"] = len(times)
        result["query_failures_during_run"] = len(failures)
        median = result["query_during_run_s"]
        print(f"ingestion while queried: {rate_read:,.0f} points/s ({wall:.1f} s); {len(times)} queries, median "
              f"{median if median is None else round(median, 3)} s, {len(failures)} failed", flush=True)
        if failures:
            print(failures[0])

        def clients(proc):
            counts = {"ok": 0, "errors": 0, "refusals": 0}
            lock = threading.Lock()
            per = ARGS.queries // ARGS.clients

            def client():
                for _ in range(per):
                    r = xlab(["query", "-e", "alone", "--format", "csv"], store)
                    with lock:
                        if r.returncode == 0:
                            counts["ok"] += 1
                        elif "in use" in r.stderr:
                            counts["refusals"] += 1
                        else:
                            counts["errors"] += 1
            threads = [threading.Thread(target=client) for _ in range(ARGS.clients)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            counts["seconds"] = time.perf_counter() - t
            counts["run_still_going_at_the_end"] = proc.poll() is None
            return counts

        _, counts, _ = run_ingest(store, tmp, "clients", 200, during=clients, text=WAITING.format(name="clients"))
        result["concurrent_clients"] = {"clients": ARGS.clients, **counts}
        print(f"{counts['ok']} queries from {ARGS.clients} clients in {counts['seconds']:.1f} s during a run: "
              f"{counts['errors']} errors, {counts['refusals']} lock refusals", flush=True)

    result["query_slowdown"] = (result["query_during_run_s"] or 0) / result["query_idle_s"]
    result["ingest_drop"] = 1 - result["ingest_while_read_points_per_s"] / result["ingest_alone_points_per_s"]
    os.makedirs(ARGS.out, exist_ok=True)
    with open(os.path.join(ARGS.out, "live.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
