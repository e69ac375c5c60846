"""Adaptive search against what it replaces: ASHA against the exhaustive grid, TPE against random
search, and what one TPE proposal costs (xlab and Optuna).

1. ASHA (experiments/search-showcase.yaml): for each family (SAM, mixup, Group DRO), the 27-point
   grid with ASHA and the same grid trained exhaustively, each on a fresh store. The grid's best
   point (by the search metric's final validation value) runs on 4 more seeds for the seed
   standard deviation of its test metric. ASHA's pick is its best trial that trained to the end.
2. TPE against random search: mixup on the handwritten digits (the small CNN, 6 epochs) over
   learning rate and weight decay (log-uniform) and mixup's α (uniform), 32 trials each, sampler
   seeds 0-9, by the best validation loss found.
3. The cost of one proposal with 10², 10³, 10⁴ finished trials: `cargo bench -p xlab-sched
   --bench tpe`, and Optuna's TPESampler (seeded, same defaults) asked about the same number of
   finished trials.

    python bench/search.py --xlab target/release/xlab --out bench/results [--only asha|tpe|cost]
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
SHOWCASE = os.path.join(ROOT, "experiments", "search-showcase.yaml")
TEST_METRIC = {"val.acc": "test.acc", "val.worst_group_acc": "test.worst_group_acc"}


def xlab(exe, store, *args):
    subprocess.run([exe, "--store", store, "-q", *args], check=True, stdout=subprocess.DEVNULL)


def run(exe, store, path, slots=2):
    # A sweep may hold points that diverge; they fail and the run says so, which is no error here.
    subprocess.run([exe, "--store", store, "-q", "run", path, "--devices", "cpu", "-j", str(slots)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def jobs(exe, store, experiment):
    out = subprocess.run([exe, "--store", store, "export", "-e", experiment], check=True, capture_output=True,
                         text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r for r in rows if r["type"] == "job"]


def final(job, metric):
    series = job["metrics"].get(metric) or []
    return series[-1][1] if series else None


def epochs_trained(job, metric):
    return len(job["metrics"].get(metric) or [])


def write(work, name, doc):
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def asha(exe, work):
    with open(SHOWCASE) as f:
        doc = yaml.safe_load(f)
    rows = []
    for stage, body in doc["stages"].items():
        metric = body["search"]["metric"]
        test = TEST_METRIC[metric]
        one = dict(doc, name=f"asha-{stage}", stages={stage: body})
        plain_body = {k: v for k, v in body.items() if k != "search"}
        grid = dict(doc, name=f"grid-{stage}", stages={stage: plain_body})
        t0 = time.time()
        run(exe, os.path.join(work, f"asha-{stage}"), write(work, f"asha-{stage}", one))
        asha_s = time.time() - t0
        t0 = time.time()
        run(exe, os.path.join(work, f"grid-{stage}"), write(work, f"grid-{stage}", grid))
        grid_s = time.time() - t0
        searched = jobs(exe, os.path.join(work, f"asha-{stage}"), f"asha-{stage}")
        full = jobs(exe, os.path.join(work, f"grid-{stage}"), f"grid-{stage}")
        top = doc["defaults"]["epochs"] if "epochs" not in body else body["epochs"]
        done = [j for j in searched if j["job"]["status"] == "done" and final(j, metric) is not None]
        pick = max(done, key=lambda j: final(j, metric))
        ended = [j for j in full if j["job"]["status"] == "done" and final(j, metric) is not None]
        best = max(ended, key=lambda j: final(j, metric))
        # The grid's best point on 4 more seeds.
        seeded = dict(plain_body)
        seeded.pop("grid")
        for key, value in best["job"]["point"]:
            node = seeded
            parts = key.split(".")
            for p in parts[:-1]:
                node[p] = dict(node.get(p) or doc["defaults"].get(p) or {})
                node = node[p]
            node[parts[-1]] = value
        seeded["seeds"] = [1, 2, 3, 4]
        seeds_doc = dict(doc, name=f"seeds-{stage}", stages={stage: seeded})
        run(exe, os.path.join(work, f"grid-{stage}"), write(work, f"seeds-{stage}", seeds_doc))
        more = jobs(exe, os.path.join(work, f"grid-{stage}"), f"seeds-{stage}")
        values = [final(best, test)] + [final(j, test) for j in more if j["job"]["status"] == "done"]
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        used = sum(epochs_trained(j, metric) for j in searched)
        full_epochs = sum(epochs_trained(j, metric) for j in full)
        gap = final(best, test) - final(pick, test)
        rows.append({
            "family": stage, "metric": metric, "test_metric": test, "points": len(full), "epochs": top,
            "asha_epochs": used, "grid_epochs": full_epochs, "epoch_share": used / full_epochs,
            "asha_pick": dict(pick["job"]["point"]),
            "asha_val": final(pick, metric), "asha_test": final(pick, test),
            "grid_best": dict(best["job"]["point"]), "grid_val": final(best, metric), "grid_test": final(best, test),
            "seed_std": std, "seeds": len(values), "gap": gap,
            "within_one_std": gap <= std, "within_budget": used <= 0.35 * full_epochs,
            "asha_s": asha_s, "grid_s": grid_s,
        })
        r = rows[-1]
        print(f"{stage}: ASHA {used}/{full_epochs} epochs ({100 * r['epoch_share']:.0f}%), test {r['asha_test']:.4f} "
              f"vs grid best {r['grid_test']:.4f} (seed std {std:.4f})", file=sys.stderr)
    return rows


TPE_BASE = {
    "task": "train",
    "data": {"name": "digits"},
    "model": {"name": "cnn", "channels": [16, 32], "norm": "batch"},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005},
    "batch_transform": {"use": "mixup.mixup", "alpha": 1.0},
    "epochs": 6,
    "batch_size": 64,
}
SPACE = {"optimizer.lr": "loguniform(0.0005, 1.0)", "optimizer.weight_decay": "loguniform(0.000001, 0.01)",
         "batch_transform.alpha": "uniform(0.05, 4.0)"}
TPE_METRIC, TPE_MODE = "val.loss", "min"
TRIALS, SAMPLER_SEEDS = 32, 10


def tpe(exe, work):
    metric = TPE_METRIC
    best_of = min if TPE_MODE == "min" else max
    rows = []
    for seed in range(SAMPLER_SEEDS):
        found = {}
        for kind in ("tpe", "random"):
            name = f"{kind}-{seed}"
            if kind == "tpe":
                stage = {"random": dict(SPACE), "search": {"algorithm": "tpe", "metric": metric, "mode": TPE_MODE,
                                                           "trials": TRIALS, "seed": seed}}
            else:
                stage = {"random": dict(SPACE, samples=TRIALS, seed=seed)}
            doc = {"name": name, "defaults": TPE_BASE, "stages": {"search": stage}}
            store = os.path.join(work, kind)
            run(exe, store, write(work, name, doc))
            values = [final(j, metric) for j in jobs(exe, store, name) if j["job"]["status"] == "done"]
            found[kind] = (best_of(v for v in values if v is not None and not math.isnan(v)), len(values))
        wins = found["tpe"][0] < found["random"][0] if TPE_MODE == "min" else found["tpe"][0] > found["random"][0]
        rows.append({"seed": seed, "metric": metric, "mode": TPE_MODE, "tpe_best": found["tpe"][0],
                     "random_best": found["random"][0], "tpe_trials": found["tpe"][1],
                     "random_trials": found["random"][1], "tpe_wins": wins})
        print(f"sampler seed {seed}: TPE {found['tpe'][0]:.4f}, random {found['random'][0]:.4f}", file=sys.stderr)
    return rows


def optuna_cost(n, reps):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import create_trial

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    dists = {"p0": FloatDistribution(0.0, 1.0), "p1": FloatDistribution(1e-5, 1e-1, log=True),
             "p2": IntDistribution(1, 64), "p3": CategoricalDistribution([0, 1, 2, 3])}
    import random

    r = random.Random(0)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    trials = []
    for _ in range(n):
        p = {"p0": r.random(), "p1": math.exp(r.uniform(math.log(1e-5), math.log(1e-1))), "p2": r.randint(1, 64),
             "p3": r.randrange(4)}
        trials.append(create_trial(params=p, distributions=dists, value=p["p0"] ** 2 + r.random() * 0.05))
    study.add_trials(trials)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        t = study.ask(dists)
        times.append((time.perf_counter() - t0) * 1e3)
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    return statistics.median(times)


def cost():
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "tpe.json")
        env = dict(os.environ, XLAB_BENCH_JSON=out)
        subprocess.run([os.environ.get("CARGO", "cargo"), "bench", "-q", "-p", "xlab-sched", "--bench", "tpe"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        with open(out) as f:
            rows = json.load(f)
    for r in rows:
        r["optuna_ms"] = optuna_cost(r["trials"], 5 if r["trials"] >= 10_000 else 15)
        print(f"{r['trials']:>6} trials: xlab {r['median_ms']:.2f} ms, Optuna {r['optuna_ms']:.1f} ms", file=sys.stderr)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default=os.path.join(ROOT, "target", "release", "xlab"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--only", choices=["asha", "tpe", "cost"])
    args = ap.parse_args()
    exe = os.path.abspath(args.xlab)
    import optuna

    meta = {"host": platform.node(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "optuna": optuna.__version__}
    os.makedirs(args.out, exist_ok=True)
    for part, measure in (("asha", asha), ("tpe", tpe), ("cost", None)):
        if args.only and args.only != part:
            continue
        if part == "cost":
            rows = cost()
        else:
            with tempfile.TemporaryDirectory() as work:
                rows = measure(exe, work)
        command = f"python bench/search.py --only {part}"
        with open(os.path.join(args.out, f"search-{part}.json"), "w") as f:
            json.dump({"meta": dict(meta, command=command), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
