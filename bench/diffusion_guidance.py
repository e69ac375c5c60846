"""The showcase of experiments/diffusion-guidance.yaml, measured: runs it into its own store and
prints two markdown tables.

- DualFast against its base sampler: for DDIM and DPM-Solver++(2M) at 5, 8 and 10 steps, with
  `dualfast_c_max` 0 (the base) and 0.5, the RMS distance of each sample to the same sample of the
  1000-step DDIM reference (every job of the file draws the same initial noise from its seed),
  and the sliced Wasserstein distance to held-out data.
- PCG against CFG-DDPM and CFG-DDIM at γ = 2 (γ' = 3) as the step count grows: NFE, SWD and the
  samples' mean per-class spread (the powered distribution is sharper).
- The same two on the digits UNet: the pixel RMS to the 1000-step samples and the Fréchet
  distance for DualFast; NFE, Fréchet distance and the classifier's accuracy on the asked-for
  classes for PCG and CFG.
- DDIM's `clip_sample` against the step count on the digits (DDPM beside it).
- NAG's negative-class suppression on the digits against unguided and CFG-with-negative sampling.

    python bench/diffusion_guidance.py --xlab target/release/xlab [--store DIR]
"""

import argparse
import json
import os
import subprocess
import tempfile

import torch
from safetensors.torch import load_file

FILE = os.path.join(os.path.dirname(__file__), "..", "experiments", "diffusion-guidance.yaml")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", required=True)
    ap.add_argument("--store")
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="xlab-guidance-")
    env = dict(os.environ, XLAB_STORE=store)
    subprocess.run([args.xlab, "run", FILE], check=True, env=env, stdout=subprocess.DEVNULL)
    plan = subprocess.run([args.xlab, "plan", FILE], check=True, env=env, capture_output=True, text=True).stdout
    jobs, stage = [], None
    for line in plan.splitlines():
        if line.startswith("  stage `"):
            stage = line.split("`")[1]
        elif line.startswith("    "):
            jobs.append((stage, line.split()[0]))

    def show(job):
        out = subprocess.run([args.xlab, "show", job, "--json"], check=True, env=env, capture_output=True, text=True)
        return json.loads(out.stdout)

    def raw(job):
        return load_file(os.path.join(store, "runs", job, "samples.safetensors"))["raw"].double()

    records = {job: show(job) for _, job in jobs}

    def dualfast(prefix, metric, name, digits):
        ref = raw(next(job for s, job in jobs if s == prefix + "reference")).flatten(1)
        print(f"| sampler | steps | RMS to the 1000-step reference: base | DualFast 0.5 | {name}: base | DualFast 0.5 |")
        print("|---|---|---|---|---|---|")
        rows = {}
        for s, job in jobs:
            if s != prefix + "dualfast":
                continue
            cfg = records[job]["config"]["sampler"]
            rms = ((raw(job).flatten(1) - ref) ** 2).sum(1).mean().sqrt().item()
            if digits:
                # Per pixel, so that the figure reads on the data's [-1, 1] scale.
                rms /= ref.shape[1] ** 0.5
            value = records[job]["summary"][metric]
            rows.setdefault((cfg["use"], cfg["steps"]), {})[cfg.get("dualfast_c_max", 0.0)] = (rms, value)
        for (use, steps), by_c in sorted(rows.items()):
            (r0, s0), (r5, s5) = by_c[0.0], by_c[0.5]
            print(f"| `{use}` | {steps} | {r0:.4f} | {r5:.4f} | {s0:.4f} | {s5:.4f} |")
        print()

    def sampler_name(s, rec):
        if s.endswith("pcg"):
            return "PCG"
        return "CFG-DDPM" if rec["config"]["sampler"]["use"] == "diffusion.ddpm" else "CFG-DDIM"

    dualfast("", "sample.swd", "SWD", False)
    print("| sampler | steps | NFE | SWD | mean per-class std |")
    print("|---|---|---|---|---|")
    for s, job in jobs:
        if s not in ("pcg", "cfg"):
            continue
        rec = records[job]
        x = load_file(os.path.join(store, "runs", job, "samples.safetensors"))["samples"].double()
        # Sample i asks for class i mod 8.
        labels = torch.arange(x.shape[0]) % 8
        spread = torch.stack([x[labels == k].std(0).mean() for k in range(8)]).mean().item()
        name = sampler_name(s, rec)
        summ = rec["summary"]
        print(f"| {name} | {rec['config']['sampler']['steps']} | {summ['sample.nfe']:.0f} | {summ['sample.swd']:.4f} | {spread:.4f} |")
    print()
    print("Digits UNet (pixel RMS per pixel; FD in the classifier's features):")
    print()
    dualfast("digits_", "sample.fd", "FD", True)
    print("| sampler | steps | NFE | FD | class accuracy |")
    print("|---|---|---|---|---|")
    for s, job in jobs:
        if s not in ("digits_pcg", "digits_cfg"):
            continue
        rec = records[job]
        summ = rec["summary"]
        print(
            f"| {sampler_name(s, rec)} | {rec['config']['sampler']['steps']} | {summ['sample.nfe']:.0f} "
            f"| {summ['sample.fd']:.1f} | {summ['sample.class_acc']:.3f} |"
        )
    print()
    print("| sampler | steps | clip_sample | class accuracy | FD |")
    print("|---|---|---|---|---|")
    for s, job in jobs:
        if s == "digits_clip":
            cfg, summ = records[job]["config"]["sampler"], records[job]["summary"]
            print(
                f"| `{cfg['use']}` | {cfg['steps']} | {str(cfg['clip_sample']).lower()} | {summ['sample.class_acc']:.3f} "
                f"| {summ['sample.fd']:.1f} |"
            )
    print()
    print("| steps | negative | unguided share | NAG share | CFG-neg share | FD unguided | FD NAG | FD CFG-neg |")
    print("|---|---|---|---|---|---|---|---|")
    by = {}
    for s, job in jobs:
        if s in ("digits_unguided", "digits_nag", "digits_cfg_negative"):
            rec = records[job]
            by[(s, rec["config"]["sampler"]["steps"], rec["config"].get("negative"))] = rec["summary"]
    for (s, steps, negative), nag in sorted((k, v) for k, v in by.items() if k[0] == "digits_nag"):
        base = by[("digits_unguided", steps, None)]
        cfg = by[("digits_cfg_negative", steps, negative)]
        print(
            f"| {steps} | {negative} | {base[f'sample.class_share.{negative}']:.3f} | {nag['sample.negative_share']:.3f} "
            f"| {cfg['sample.negative_share']:.3f} | {base['sample.fd']:.1f} | {nag['sample.fd']:.1f} | {cfg['sample.fd']:.1f} |"
        )


if __name__ == "__main__":
    main()
