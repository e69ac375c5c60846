"""xlab's results as pandas DataFrames.

Every function runs ``xlab export --format parquet`` on the store (a run holding the store
answers it while it runs) into a temporary folder and reads the tables with pandas:

* :func:`jobs` — a row per job: ``id``, ``experiment``, ``stage``, ``seed``, ``status``, every
  config key as a typed ``config.KEY`` column, provenance, and one column per final metric.
* :func:`curves` — one metric's logged points: ``job``, ``step``, ``value``, with the job's
  ``stage``, ``seed``, ``status`` and ``config.*`` columns beside them.
* :func:`read` — both tables of a folder ``xlab export --format parquet -o DIR`` wrote.

Example: a seed-grouped table and a plot::

    import xlab_results as xr

    jobs = xr.jobs("results", experiment="quickstart")
    table = (jobs[jobs.status == "done"]
             .groupby("config.optimizer.lr")["test.acc"]
             .agg(["mean", "std", "count"]))
    print(table)

    curves = xr.curves("results", "val.acc", experiment="quickstart")
    mean = curves.groupby(["config.optimizer.lr", "step"])["value"].mean().unstack(0)
    mean.plot(xlabel="epoch", ylabel="val.acc")   # one line per learning rate, mean over seeds
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

import pandas as pd

__all__ = ["jobs", "curves", "read", "export", "NotAnExport", "XlabError"]
__version__ = "0.1.0"

MANIFEST = "xlab-export.json"


class XlabError(RuntimeError):
    """``xlab`` could not export the store (its message says why)."""


class NotAnExport(ValueError):
    """A folder that ``xlab export --format parquet`` did not write."""


def _xlab(xlab: Optional[str]) -> str:
    found = xlab or os.environ.get("XLAB") or shutil.which("xlab")
    if not found:
        raise XlabError("cannot find the `xlab` executable: put it on PATH, set XLAB, or pass xlab=")
    return str(found)


def export(
    store: str | os.PathLike,
    out: str | os.PathLike,
    experiment: Optional[str] = None,
    metrics: Optional[Sequence[str]] = None,
    xlab: Optional[str] = None,
) -> Path:
    """Runs ``xlab export --format parquet`` of ``store`` into the folder ``out``.

    ``metrics``: only these series in ``metrics.parquet`` (``[]``: none). Returns ``out``.
    """
    cmd = [_xlab(xlab), "--store", str(store), "export", "--format", "parquet", "-o", str(out), "--force"]
    if experiment is not None:
        cmd += ["-e", experiment]
    if metrics is not None:
        cmd += ["-m", ",".join(metrics) if metrics else "none"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise XlabError(done.stderr.strip() or f"xlab exited with {done.returncode}")
    return Path(out)


def read(folder: str | os.PathLike) -> Tuple[pd.DataFrame, Optional[pd.DataFrame]]:
    """The jobs table and the metrics table (``None`` when not exported) of an export folder."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise NotAnExport(
            f"{folder} is not an xlab export (it has no {MANIFEST}); "
            f"write one with `xlab export --format parquet -o {folder}`"
        )
    kind = json.loads(manifest.read_text()).get("format", "parquet")
    if kind != "parquet":
        raise NotAnExport(f"{folder} is an xlab export in {kind} format, not parquet")
    jobs_table = pd.read_parquet(folder / "jobs.parquet")
    metrics_file = folder / "metrics.parquet"
    return jobs_table, (pd.read_parquet(metrics_file) if metrics_file.is_file() else None)


def jobs(store: str | os.PathLike = "results", experiment: Optional[str] = None, xlab: Optional[str] = None) -> pd.DataFrame:
    """A row per job of the store (or of one experiment): identity, status, ``config.*``,
    provenance and final metrics (NaN and infinities as they were logged)."""
    with tempfile.TemporaryDirectory(prefix="xlab-results-") as tmp:
        export(store, tmp, experiment=experiment, metrics=[], xlab=xlab)
        table, _ = read(tmp)
    return table


def curves(
    store: str | os.PathLike,
    metric: str,
    experiment: Optional[str] = None,
    xlab: Optional[str] = None,
) -> pd.DataFrame:
    """The points of one metric series of every job: ``job``, ``step``, ``value``, joined with
    each job's ``stage``, ``seed``, ``status`` and ``config.*`` columns for grouping."""
    with tempfile.TemporaryDirectory(prefix="xlab-results-") as tmp:
        export(store, tmp, experiment=experiment, metrics=[metric], xlab=xlab)
        table, points = read(tmp)
    if points is None or points.empty:
        known = [c for c in table.columns if "." in c and not c.startswith("config.")]
        raise KeyError(f"no job has a `{metric}` series; final metrics of these jobs: {', '.join(known[:12])}")
    points = points[points["metric"] == metric].drop(columns="metric")
    points["job"] = points["job"].astype(str)
    keep = ["id", "stage", "seed", "status"] + [c for c in table.columns if c.startswith("config.")]
    out = points.merge(table[keep], left_on="job", right_on="id", how="left").drop(columns="id")
    return out.reset_index(drop=True)
