"""Asks Optuna's TPESampler for the next point after fixed histories, for xlab's TPE to match.

Prints one JSON object per line: the space, the history, the direction, the startup count, the
seed, and the point a fresh `TPESampler(seed=seed, n_startup_trials=startup)` suggests. Run by
runner/sched/tests/tpe_optuna.rs with the project's virtualenv.
"""

import json
import random
import sys
import warnings

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

warnings.filterwarnings("ignore")

# numpy's default argsort orders equal values arbitrarily, and differently per CPU (AVX-512
# machines sort with another algorithm), so the bandwidths Optuna gives trials that share a
# parameter's value depend on the machine. xlab keeps such ties in trial order, as Optuna does
# with a stable argsort: the reference runs with one.
_argsort = np.argsort


def _stable_argsort(a, axis=-1, kind=None, order=None, **kw):
    return _argsort(a, axis=axis, kind=kind or "stable", order=order, **kw)


np.argsort = _stable_argsort
optuna.logging.set_verbosity(optuna.logging.ERROR)


def random_space(r):
    space = {}
    for i in range(r.randint(1, 4)):
        kind = r.choice(["float", "log", "int", "choice"])
        name = f"p{i}"
        if kind == "float":
            low = r.uniform(-2, 1)
            space[name] = ("float", low, low + r.uniform(0.1, 3), False)
        elif kind == "log":
            low = 10 ** r.uniform(-5, -1)
            space[name] = ("float", low, low * 10 ** r.uniform(0.5, 3), True)
        elif kind == "int":
            low = r.randint(-5, 5)
            space[name] = ("int", low, low + r.randint(1, 40))
        else:
            space[name] = ("choice", r.randint(2, 5))
    return space


def distribution(d):
    if d[0] == "float":
        return FloatDistribution(d[1], d[2], log=d[3])
    if d[0] == "int":
        return IntDistribution(d[1], d[2])
    return CategoricalDistribution(list(range(d[1])))


def random_value(r, d):
    if d[0] == "float":
        if d[3]:
            import math

            return math.exp(r.uniform(math.log(d[1]), math.log(d[2]) - 1e-12))
        return r.uniform(d[1], d[2] - 1e-12)
    if d[0] == "int":
        return r.randint(d[1], d[2])
    return r.randrange(d[1])


def main():
    cases = int(sys.argv[1])
    r = random.Random(20261204)
    for case in range(cases):
        space = random_space(r)
        dists = {k: distribution(d) for k, d in space.items()}
        startup = r.choice([1, 3, 10])
        n = r.choice([0, 2, startup, 12, 30, 60])
        direction = r.choice(["minimize", "maximize"])
        seed = r.randrange(2**32)
        history = []
        for _ in range(n):
            params = {k: random_value(r, d) for k, d in space.items()}
            kind = r.choices(["complete", "pruned", "running"], weights=[6, 2, 1])[0]
            if kind == "complete":
                value = r.choice([r.gauss(0, 1), round(r.gauss(0, 1), 1)])
                history.append({"params": params, "state": "complete", "value": value})
            elif kind == "pruned":
                step = r.choice([None, 1, 3, 9])
                value = r.gauss(0, 1)
                history.append({"params": params, "state": "pruned", "step": step, "value": value})
            else:
                history.append({"params": params, "state": "running"})
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        study = optuna.create_study(direction=direction, sampler=sampler)
        for h in history:
            if h["state"] == "complete":
                t = create_trial(params=h["params"], distributions=dists, value=h["value"])
            elif h["state"] == "pruned":
                inter = {} if h["step"] is None else {h["step"]: h["value"]}
                t = create_trial(
                    state=TrialState.PRUNED, params=h["params"], distributions=dists, intermediate_values=inter
                )
            else:
                t = create_trial(state=TrialState.RUNNING, params=h["params"], distributions=dists)
            study.add_trial(t)
        asked = study.ask(dists)
        print(
            json.dumps(
                {
                    "space": space,
                    "history": history,
                    "direction": direction,
                    "startup": startup,
                    "seed": seed,
                    "expected": asked.params,
                }
            )
        )


main()
