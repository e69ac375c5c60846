"""diffusers' own schedulers as the reference for xlab's samplers (run by
plugins/diffusion/tests/diffusers_reference.rs; diffusers is installed by `make setup`).

For the linear schedule (T=1000, 1e-4..0.02), each case runs diffusers' scheduler loop from the
given noise with the deterministic synthetic model ε̂(x, t) = 0.3·x + 0.1·sin(2x) + 1e-4·t, and
writes the final samples, plus the scheduler's alphas_cumprod (float32, as diffusers computes
them) so the xlab side uses the same schedule.
"""
import json
import sys

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler


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
    raise SystemExit(f"unknown case {kind}")


def main():
    req = json.load(sys.stdin)
    noise = torch.tensor(req["noise"], dtype=torch.float64)
    out = {"cases": []}
    for case in req["cases"]:
        sched = make(case["id"], case.get("diffusers", {}))
        sched.set_timesteps(case["steps"])
        x = noise * sched.init_noise_sigma
        calls = 0
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            eps = model(inp, t)
            calls += 1
            x = sched.step(eps, t, x).prev_sample
        out["cases"].append({"samples": x.double().tolist(), "nfe": calls})
        out["alphas_cumprod"] = sched.alphas_cumprod.double().tolist()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
