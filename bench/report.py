"""Writes BENCHMARKS.md from bench/BENCHMARKS.in.md and the figures in bench/results/*.json.

The template holds the prose; each `<!-- bench: NAME -->` line becomes the table of
`bench/results/NAME.json`, with the machine, the date and the command that measured it, so every
table shows figures from one run side by side. `make bench` runs every benchmark, then this.

    python bench/report.py [--results bench/results] [--out BENCHMARKS.md]
"""

import argparse
import json
import os
import re


def num(v, digits=4):
    """Figures to `digits` significant digits, without exponent notation for ordinary sizes."""
    if v is None:
        return "—"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def ratio(v):
    return "—" if v is None else f"{v:.2f}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine(meta):
    parts = [meta.get("host", "?"), f"{meta.get('cpu_count', '?')} CPUs"]
    if meta.get("gpu"):
        parts.append(meta["gpu"])
    if meta.get("torch"):
        parts.append(f"torch {meta['torch']}")
    if meta.get("threads"):
        parts.append(f"{meta['threads']} threads")
    if meta.get("sqlite"):
        parts.append(f"SQLite {meta['sqlite']}")
    return ", ".join(parts)


def footer(meta, extra=""):
    line = f"Measured on {machine(meta)}, {meta.get('date', '?')}{extra}: `{meta.get('command', '?')}`"
    return "\n\n" + line


def throughput(d):
    if d["rows"] and "spread" in d["rows"][0]:
        return throughput_rounds(d)
    m = d["meta"]
    rows = []
    for r in d["rows"]:
        peak = r.get("of_matmul_peak")
        rows.append([r["case"], r["method"], r["batch"], num(r["xlab_steps_per_s"]), num(r["eager_steps_per_s"]),
                     ratio(r["ratio_vs_eager"]), num(r["eager_item_steps_per_s"]), ratio(r["ratio_vs_eager_item"]),
                     num(r.get("step_gflop"), 3), num(r.get("xlab_gflops"), 3),
                     "—" if peak is None else f"{100 * peak:.1f}%"])
    head = ["model", "method", "batch", "xlab steps/s", "PyTorch eager steps/s", "ratio",
            "eager + `.item()` each step", "ratio", "GFLOP a step", "xlab GFLOP/s", "of matmul peak"]
    peak = m.get("matmul_gflops")
    extra = "" if peak is None else f"; fp32 matmul {num(peak, 3)} GFLOP/s"
    return table(head, rows) + footer(m, extra)


def throughput_rounds(d):
    """Cases run in interleaved rounds: medians with their min-max, and a verdict only where
    every round agrees."""
    m = d["meta"]
    rng = lambda v, f=num: f"{f(v['median'])} ({f(v['min'])}–{f(v['max'])})"
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"
    rows = []
    for r in d["rows"]:
        sp, ra, c = r["spread"], r["ratio_spread"], r["cv"]
        rows.append([r["case"], r["method"], r["batch"], rng(sp["xlab"]), rng(sp["eager"]),
                     rng(ra["eager"], ratio), r["verdict_vs_eager"], rng(sp["item"]), rng(ra["item"], ratio),
                     r["verdict_vs_eager_item"], f"{pct(c['xlab'])} / {pct(c['eager'])}",
                     pct(r.get("of_matmul_peak"))])
    head = ["model", "method", "batch", "xlab steps/s", "eager steps/s", "ratio", "verdict",
            "eager + `.item()` steps/s", "ratio", "verdict", "CV of epochs (xlab / eager)", "of matmul peak"]
    peak = m.get("matmul_gflops")
    extra = f"; {m.get('rounds')} interleaved rounds, median (min–max)"
    extra += "" if peak is None else f"; fp32 matmul {num(peak, 3)} GFLOP/s"
    return table(head, rows) + footer(m, extra)


def sampling(d):
    rows = [[r["case"], r["steps"], r["batch"], num(r["xlab_nfe_per_s"], 3), num(r["eager_nfe_per_s"], 3),
             ratio(r["ratio"])] for r in d["rows"]]
    return table(["case", "steps", "batch", "xlab NFE/s", "PyTorch loop NFE/s", "ratio"], rows) + footer(d["meta"])


def memory(d):
    rows = [[r["sampler"], f"{r['samples']:,}", r["image"], num(r["peak_rss_mb"], 4), f"{r['sample_s']:.0f}",
             f"{r['job_s']:.0f}", f"{100 * r['out_of_range']:.1f}%"] for r in d["rows"]]
    head = ["sampler", "samples", "image", "peak memory (MiB)", "sampling (s)", "whole job (s)", "values out of range"]
    return table(head, rows) + footer(d["meta"])


def scheduler(d):
    n, s = d["noop"], d["sleep"]
    rows = [
        [f"{n['jobs']} no-op jobs on {n['slots']} CPU slots", f"{num(n['jobs_per_s'], 3)} jobs/s ({n['wall_s']:.0f} s)",
         "—", "—"],
        [f"{s['jobs']} jobs of {s['job_s']:g} s on {s['slots']} slots", f"{s['wall_s']:.1f} s",
         f"{s['ideal_s']:.0f} s (ideal)", f"{100 * s['overhead']:.1f}% overhead"],
        [f"rerunning the {n['jobs']}-job file once all are done", f"{1000 * n['rerun_all_done_s']:.0f} ms", "—", "—"],
    ]
    return table(["measure", "xlab", "reference", "ratio"], rows) + footer(d["meta"])


def store(d):
    rows = [[r["steps_per_batch"], f"{r['points']:,}", num(r["xlab_points_per_s"]), num(r["sqlite_points_per_s"]),
             ratio(r["ratio"]), f"{r['xlab_bytes_per_point']:.1f}", f"{r['sqlite_bytes_per_point']:.1f}"]
            for r in d["ingest"]]
    out = table(["steps per batch", "points", "xlab points/s", "SQLite points/s", "ratio", "xlab bytes/point",
                 "SQLite bytes/point"], rows)
    r = d["resume"]
    out += "\n\n" + table(["resume detection", "xlab"],
                          [[f"`xlab run` on a {r['jobs']:,}-job sweep the store holds as done", f"{r['seconds']:.2f} s"]])
    return out + footer(d["meta"])


def query(d):
    rows = [[f"{r['jobs']:,}", f"{r['query_s']:.2f} s", f"{r['import_s']:.1f} s", f"{r['store_bytes'] / 1e6:,.0f} MB"]
            for r in d["rows"]]
    return table(["jobs", "query", "import", "store on disk"], rows) + footer(d["meta"])


def live(d):
    c = d["concurrent_clients"]
    rows = [
        [f"`xlab query` over {d['jobs_in_store']:,} jobs, idle store (median)", f"{d['query_idle_s']:.2f} s"],
        [f"the same query during a run, through its socket (median of {d['queries_during_run']})",
         f"{d['query_during_run_s']:.2f} s ({d['query_slowdown']:.2f}×; goal ≤ 1.5×)"],
        ["the run's ingestion alone", f"{d['ingest_alone_points_per_s']:,.0f} points/s"],
        ["the run's ingestion while queried", f"{d['ingest_while_read_points_per_s']:,.0f} points/s "
                                               f"({100 * d['ingest_drop']:+.1f}% drop; goal ≤ 5%)"],
        [f"{c['ok'] + c['errors'] + c['refusals']:,} queries from {c['clients']} clients during a run",
         f"{c['errors']} errors, {c['refusals']} lock refusals, {c['seconds']:.1f} s"],
    ]
    return table(["reading during a run", "measured"], rows) + footer(d.get("meta", {}))


def interop(d):
    rows = [[r["what"], f"{r['rows']:,}", f"{r['seconds']:.2f} s", f"{r['bar_s']:.0f} s",
             "yes" if r["seconds"] <= r["bar_s"] else "no"] for r in d["rows"]]
    return table(["from the store to pandas", "rows", "measured", "bar", "met"], rows) + footer(d["meta"])


def dashboard(d):
    rows = [[r["what"], f"{r['ms']:.0f} ms", "–" if r["bar_ms"] is None else f"{r['bar_ms']:.0f} ms",
             "–" if r["bar_ms"] is None else "yes" if r["ms"] <= r["bar_ms"] else "no"] for r in d["rows"]]
    return table(["in headless Chromium", "measured (median of 5)", "bar", "met"], rows) + footer(d["meta"])


def comixup(d):
    rows = [[r["block_num"], r["batch"], r["part"], num(r["xlab_ms"]), num(r["reference_ms"]), ratio(r["speedup"]),
             "yes" if r.get("same_targets") else "no"] for r in d["rows"]]
    header = ["blocks per side", "batch", "partition", "xlab ms/batch", "reference ms/batch", "speed-up",
              "same targets"]
    return table(header, rows) + footer(d["meta"])


def soak(d):
    r = d["row"]
    rows = [[f"{r['points']:,}", f"{r['seconds']:.0f} s", num(r["points_per_s"]), num(r["first_tenth_per_s"]),
             num(r["last_tenth_per_s"]), f"{r['longest_write_ms']:.1f} ms", f"{r['longest_flush_ms']:.1f} ms",
             f"{r['reads']:,}", f"{r['read_points']:,}"]]
    head = ["points", "time", "points/s", "first tenth points/s", "last tenth points/s", "longest write",
            "longest flush", "reads", "points read"]
    return table(head, rows) + footer(d["meta"])


def fuzz(d):
    rows = [[f"`{r['target']}`", f"{r['inputs']:,}", r["panics"], num(r["inputs_per_s"], 3), f"{r['seconds']:.0f} s",
             r["outcomes"], f"{r['corpus_start']} → {r['corpus_end']}"] for r in d["rows"]]
    head = ["target", "inputs", "panics", "inputs/s", "time", "distinct outcomes", "corpus (files → in memory)"]
    return table(head, rows) + footer(d["meta"])


def image_folder(d):
    m, lo = d["meta"], d["loader"]
    spread = lambda v: f"{num(v['median'], 3)} ({num(v['min'], 3)}–{num(v['max'], 3)}, {v['rounds']} rounds)"
    xl = lo["xlab_images_per_s"]
    loader = table(["loader alone", "images/s"], [
        ["xlab, 1 thread", num(xl["1"], 3)], ["xlab, 2 threads", num(xl["2"], 3)],
        ["PIL open + convert + resize, 1 process", num(lo["pil_images_per_s"], 3)],
    ])
    sp, ra = d["steps_per_s"], d["ratios"]
    training = table(["training (CNN, batch 64)", "steps/s", "ratio"], [
        ["xlab, folder in memory", spread(sp["xlab_memory"]), ""],
        ["xlab, `stream: true`", spread(sp["xlab_stream"]), "streamed / in memory: " + spread(ra["xlab_stream_over_memory"])],
        ["PyTorch, tensors in memory", spread(sp["torch_memory"]), ""],
        ["PyTorch, DataLoader (1 worker) over the files", spread(sp["torch_files"]),
         "from files / in memory: " + spread(ra["torch_files_over_memory"])],
        ["", "", "xlab streamed / PyTorch from files: " + spread(ra["xlab_stream_over_torch_files"])],
    ])
    return loader + "\n\n" + training + footer(m, f"; {m['images']} images at {m['size']}×{m['size']}")


def point(p):
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def search_asha(d):
    rows = [[r["family"], f"{r['points']} × {r['epochs']}", f"{r['asha_epochs']} of {r['grid_epochs']}",
             f"{100 * r['epoch_share']:.0f}%", point(r["asha_pick"]), num(r["asha_test"]), point(r["grid_best"]),
             num(r["grid_test"]), f"{r['seed_std']:.4f} ({r['seeds']} seeds)", f"{r['gap']:+.4f}",
             "yes" if r["within_one_std"] and r["within_budget"] else "no"] for r in d["rows"]]
    head = ["family", "points × epochs", "ASHA epochs of the grid's", "share", "ASHA's pick", "its test metric",
            "grid's best", "its test metric", "seed std of the best", "gap", "within 1 std and 35%"]
    metrics = "; ".join(f"{r['family']}: {r['metric']} → {r['test_metric']}" for r in d["rows"])
    return table(head, rows) + f"\n\n(Ranked by → reported: {metrics}.)" + footer(d["meta"])


def search_tpe(d):
    rows = [[r["seed"], num(r["tpe_best"]), num(r["random_best"]), "TPE" if r["tpe_wins"] else "random or tie"]
            for r in d["rows"]]
    wins = sum(r["tpe_wins"] for r in d["rows"])
    m = d["rows"][0]
    head = ["sampler seed", f"TPE best {m['metric']} ({m['mode']})", f"random best {m['metric']}", "better"]
    return table(head, rows) + f"\n\nTPE found the better point in {wins} of {len(d['rows'])} seeds." + footer(d["meta"])


def search_cost(d):
    rows = [[f"{r['trials']:,}", r["dims"], f"{r['median_ms']:.2f} ms", f"{r['optuna_ms']:.1f} ms",
             ratio(r["optuna_ms"] / r["median_ms"])] for r in d["rows"]]
    head = ["finished trials", "dimensions", "xlab per proposal (median)", "Optuna TPESampler", "Optuna / xlab"]
    return table(head, rows) + footer(d["meta"], f", Optuna {d['meta'].get('optuna', '?')}")


RENDER = {"image-folder": image_folder, "search-asha": search_asha, "search-tpe": search_tpe, "search-cost": search_cost, "fuzz": fuzz, "soak": soak, "throughput": throughput, "sampling": sampling, "memory": memory, "scheduler": scheduler, "store": store, "query": query,
          "comixup": comixup, "live": live, "interop": interop,
          "dashboard": dashboard}


def render(name, results):
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return f"_Not measured yet: there is no `bench/results/{name}.json`._"
    with open(path) as f:
        data = json.load(f)
    return RENDER[name](data) if name in RENDER else RENDER[name.split("-")[0]](data)


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--template", default=os.path.join(here, "BENCHMARKS.in.md"))
    ap.add_argument("--results", default=os.path.join(here, "results"))
    ap.add_argument("--out", default=os.path.join(here, "..", "BENCHMARKS.md"))
    args = ap.parse_args()
    with open(args.template) as f:
        text = f.read()
    text = re.sub(r"^<!-- bench: ([\w-]+) -->$", lambda m: render(m.group(1), args.results), text, flags=re.M)
    note = "<!-- Written by bench/report.py from bench/BENCHMARKS.in.md and bench/results/; edit those. -->\n"
    with open(args.out, "w") as f:
        f.write(note + text)
    print(f"wrote {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
