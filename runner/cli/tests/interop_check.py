"""Checks xlab's Parquet, Arrow and TensorBoard outputs against its JSONL export and its query
JSON (runner/cli/tests/interop.rs runs it). Usage:

    interop_check.py parquet EXPORT_DIR ALL.jsonl
    interop_check.py query QUERY.json TABLE.parquet TABLE.arrow
    interop_check.py tensorboard TB_DIR ALL.jsonl

Prints what it compared and exits 1 on the first difference."""
import glob
import json
import math
import sys

import numpy as np


def num(v):
    if isinstance(v, str):
        return float(v.replace("Infinity", "inf"))
    return float(v)


def same(a, b, f32=False):
    a, b = float(a), float(b)
    if f32:
        a = float(np.float32(a))
        b = float(np.float32(b))
    return (math.isnan(a) and math.isnan(b)) or a == b


def fail(msg):
    print("MISMATCH:", msg)
    sys.exit(1)


def leaves(v, at, out):
    if isinstance(v, dict) and v:
        for k, x in v.items():
            leaves(x, f"{at}.{k}" if at else k, out)
    else:
        out[at] = v


def load_jsonl(path):
    jobs = {}
    for line in open(path):
        rec = json.loads(line)
        if rec["type"] == "job":
            jobs[rec["job"]["id"]] = rec
    return jobs


def check_parquet(folder, jsonl):
    import pandas as pd
    import polars as pl

    want = load_jsonl(jsonl)
    for reader in ("pandas", "polars"):
        if reader == "pandas":
            jobs = pd.read_parquet(f"{folder}/jobs.parquet")
            points = pd.read_parquet(f"{folder}/metrics.parquet")
            rows = jobs.to_dict("records")
            pts = zip(points["job"].astype(str), points["metric"].astype(str), points["step"], points["value"])
        else:
            jobs = pl.read_parquet(f"{folder}/jobs.parquet")
            points = pl.read_parquet(f"{folder}/metrics.parquet")
            rows = jobs.to_dicts()
            pts = zip(points["job"].cast(pl.Utf8), points["metric"].cast(pl.Utf8), points["step"], points["value"])
        if len(rows) != len(want):
            fail(f"{reader}: {len(rows)} jobs, the JSONL has {len(want)}")
        for row in rows:
            rec = want[row["id"]]["job"]
            for k in ("experiment", "stage", "status"):
                if row[k] != rec[k]:
                    fail(f"{reader} {row['id']} {k}: {row[k]} vs {rec[k]}")
            if row["seed"] != rec["seed"]:
                fail(f"{reader} seed")
            config = {}
            leaves(rec["config"], "", config)
            for k, v in config.items():
                got = row[f"config.{k}"]
                if isinstance(v, (list, dict)):
                    if json.loads(got) != v:
                        fail(f"{reader} {row['id']} config.{k}: {got} vs {v}")
                elif isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and isinstance(got, float)):
                    if not same(got, v):
                        fail(f"{reader} {row['id']} config.{k}: {got} vs {v}")
                elif got != v:
                    fail(f"{reader} {row['id']} config.{k}: {got!r} vs {v!r}")
            for k, v in rec["summary"].items():
                if not same(row[k], num(v)):
                    fail(f"{reader} {row['id']} {k}: {row[k]} vs {v}")
            for k in [c for c in row if "." in c and not c.startswith("config.")]:
                if k not in rec["summary"] and row[k] is not None and not (isinstance(row[k], float) and math.isnan(row[k])):
                    fail(f"{reader} {row['id']} has {k} = {row[k]} the record lacks")
        n = 0
        expected = {(j, m, s): num(v) for j, r in want.items() for m, ser in r["metrics"].items() for s, v in ser}
        for job, metric, step, value in pts:
            key = (job, metric, int(step))
            if key not in expected or not same(value, expected[key]):
                fail(f"{reader} point {key}: {value} vs {expected.get(key)}")
            n += 1
        if n != len(expected):
            fail(f"{reader}: {n} points, the JSONL has {len(expected)}")
        print(f"{reader}: {len(rows)} jobs and {n} points equal")


def check_query(query_json, parquet, arrow):
    import pandas as pd
    import polars as pl
    import pyarrow.ipc

    want = json.load(open(query_json))
    tables = {
        "parquet": pd.read_parquet(parquet),
        "arrow": pyarrow.ipc.open_file(arrow).read_all().to_pandas(),
        "polars": pl.read_ipc(arrow).to_pandas(),
    }
    for name, t in tables.items():
        if len(t) != len(want):
            fail(f"{name}: {len(t)} rows vs {len(want)}")
        for row, w in zip(t.to_dict("records"), want):
            if row["stage"] != w["stage"]:
                fail(f"{name}: stage")
            for k, v in w["point"].items():
                if row[k] != v and not same(row[k], v):
                    fail(f"{name}: {k} {row[k]} vs {v}")
            for m, stat in w["metrics"].items():
                if not same(row[f"{m}.mean"], num(stat["mean"])):
                    fail(f"{name}: {m}.mean {row[f'{m}.mean']} vs {stat['mean']}")
        print(f"{name}: {len(t)} rows equal the JSON")


def check_tensorboard(folder, jsonl):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    want = load_jsonl(jsonl)
    runs = sorted(glob.glob(f"{folder}/*/*/*"))
    if len(runs) != len(want):
        fail(f"{len(runs)} runs vs {len(want)} jobs")
    points = 0
    for run in runs:
        if len(glob.glob(f"{run}/events.out.tfevents.*")) != 1:
            fail(f"{run}: not one event file")
        ea = EventAccumulator(run, size_guidance={"scalars": 0})
        ea.Reload()
        start = plugin_data_pb2.HParamsPluginData.FromString(
            ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        ).session_start_info
        rec = want[start.group_name]
        config = {}
        leaves(rec["job"]["config"], "", config)
        for k, v in config.items():
            hp = start.hparams[k]
            kind = hp.WhichOneof("kind")
            got = {"number_value": hp.number_value, "string_value": hp.string_value, "bool_value": hp.bool_value}.get(kind)
            if isinstance(v, bool):
                ok = got is v
            elif isinstance(v, (int, float)):
                ok = same(got, v)
            elif isinstance(v, str):
                ok = got == v
            else:
                ok = json.loads(got) == v
            if not ok:
                fail(f"{run}: hparam {k} {got!r} vs {v!r}")
        series = rec["metrics"]
        if sorted(ea.Tags()["scalars"]) != sorted(series):
            fail(f"{run}: tags {sorted(ea.Tags()['scalars'])} vs {sorted(series)}")
        for m, ser in series.items():
            got = [(e.step, e.value) for e in ea.Scalars(m)]
            exp = [(s, num(v)) for s, v in ser]
            if len(got) != len(exp) or any(a[0] != b[0] or not same(a[1], b[1], f32=True) for a, b in zip(got, exp)):
                fail(f"{run} {m}: {got} vs {exp}")
            points += len(got)
    print(f"tensorboard: {len(runs)} runs and {points} points equal")


if __name__ == "__main__":
    what = sys.argv[1]
    {"parquet": check_parquet, "query": check_query, "tensorboard": check_tensorboard}[what](*sys.argv[2:])
