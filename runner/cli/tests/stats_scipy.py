"""scipy's answers for xlab's seed statistics (runner/cli/src/stats.rs checks itself against them).

Prints JSON: per case the differences, scipy.stats.wilcoxon and ttest_rel on them, and the BCa
bootstrap interval of their mean with many resamples (xlab's own resamples differ, so the
intervals agree to Monte Carlo error only)."""
import json
import sys

import numpy as np
from scipy import stats

rng = np.random.default_rng(20261204)
cases = []


def case(name, d):
    d = np.asarray(d, dtype=float)
    w = stats.wilcoxon(d)
    t = stats.ttest_rel(d, np.zeros_like(d))
    b = stats.bootstrap((d,), np.mean, n_resamples=100_000, method="BCa", rng=np.random.default_rng(0))
    cases.append({
        "name": name,
        "d": d.tolist(),
        "wilcoxon": [float(w.statistic), float(w.pvalue)],
        "t": [float(t.statistic), float(t.pvalue)],
        "bca": [float(b.confidence_interval.low), float(b.confidence_interval.high)],
        "iqm": float(stats.trim_mean(d, 0.25)),
    })


case("exact n=5", rng.normal(0.01, 0.02, 5))
case("exact n=8", rng.normal(0.02, 0.01, 8))
case("exact n=20", rng.normal(0.005, 0.02, 20))
case("exact n=50", rng.normal(0.003, 0.02, 50))
case("normal n=60", rng.normal(0.003, 0.02, 60))
case("ties n=6 (permutation)", [0.01, 0.02, 0.02, -0.01, 0.03, 0.01])
case("zeros n=9 (permutation)", [0.0, 0.01, -0.02, 0.03, 0.0, 0.04, 0.05, -0.01, 0.02])
case("ties and zeros n=30 (normal, tie correction)", np.round(rng.normal(0.01, 0.02, 30), 2))
case("skewed n=12", rng.exponential(0.02, 12) - 0.01)
json.dump(cases, sys.stdout)
