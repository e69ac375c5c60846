"""diffusers' own schedulers as the reference for xlab's samplers (run by
plugins/diffusion/tests/diffusers_reference.rs; diffusers is installed by `make setup`).

For the linear schedule (T=1000, 1e-4..0.02), each case runs diffusers' scheduler loop from the
given noise with the deterministic synthetic model ε̂(x, t) = 0.3·x + 0.1·sin(2x) + 1e-4·t, and
writes the final samples, plus the scheduler's alphas_cumprod (float32, as diffusers computes
them) so the xlab side uses the same schedule.

Stochastic schedulers (Euler ancestral, DPM-Solver++ SDE) draw their noise through
`randn_tensor`; it is replaced by a reader of the request's `stream`, the normals xlab's host
stream gives the plugin, in the order the plugin draws them. An `inverse` case runs
DDIMInverseScheduler from the given data to latents, then DDIMScheduler back, and writes both.
"""
import json
import math
import sys

import torch
import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module
import diffusers.schedulers.scheduling_euler_ancestral_discrete as ancestral_module
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)


class Stream:
    """randn_tensor's stand-in: the next values of a fixed list of normals."""

    def __init__(self, values):
        self.values = values
        self.pos = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, **_):
        n = math.prod(shape)
        chunk = self.values[self.pos : self.pos + n]
        if len(chunk) < n:
            raise SystemExit("the noise stream ran out")
        self.pos += n
        return torch.tensor(chunk, dtype=dtype or torch.float64).reshape(shape)


def model(x, t):
    return 0.3 * x + 0.1 * torch.sin(2 * x) + 1e-4 * float(t)


def make(kind, extra):
    common = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    if kind == "diffusion.ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=0, **common, **extra)
    if kind == "diffusion.dpmpp_2m":
        return DPMSolverMultistepScheduler(**common, **extra)
    if kind == "diffusion.euler":
        return EulerDiscreteScheduler(**common, **extra)
    if kind == "diffusion.heun":
        return HeunDiscreteScheduler(**common, **extra)
    if kind == "diffusion.euler_ancestral":
        return EulerAncestralDiscreteScheduler(**common, **extra)
    if kind == "diffusion.dpmpp_2m_sde":
        return DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **common, **extra)
    if kind == "diffusion.unipc":
        return UniPCMultistepScheduler(**common, **extra)
    if kind == "diffusion.ddim_inverse":
        return DDIMInverseScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=0, **common, **extra)
    raise SystemExit(f"unknown case {kind}")


def run(sched, steps, x):
    """The scheduler loop from x (scaled by init_noise_sigma); the result and the model calls."""
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    calls = 0
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        eps = model(inp, t)
        calls += 1
        x = sched.step(eps, t, x).prev_sample
    return x, calls


def main():
    req = json.load(sys.stdin)
    # One row of features: UniPC's update wants a batch dimension.
    noise = torch.tensor(req["noise"], dtype=torch.float64).reshape(1, -1)
    out = {"cases": []}
    for case in req["cases"]:
        stream = Stream(req.get("stream", []))
        ancestral_module.randn_tensor = stream
        dpm_module.randn_tensor = stream
        sched = make(case["id"], case.get("diffusers", {}))
        x, calls = run(sched, case["steps"], noise)
        result = {"samples": x.double().reshape(-1).tolist(), "nfe": calls}
        if case["id"] == "diffusion.ddim_inverse":
            back, _ = run(make("diffusion.ddim", case.get("diffusers", {})), case["steps"], x)
            result["reconstruction"] = back.double().reshape(-1).tolist()
        out["cases"].append(result)
        out["alphas_cumprod"] = sched.alphas_cumprod.double().tolist()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
