"""PyTorch reference for the sharpness diagnostics (run by runner/worker/tests/sharpness.rs).

Reads {"params": {name: [..]}, "shapes": {name: [..]}, "hidden": [..], "x": [[..]], "y": [..],
"rho": r, "m": m} on stdin: an MLP (`layers.N` as nn.Sequential, ReLU) with those weights. Writes
the Hessian of the mean cross-entropy over all (x, y) with respect to every parameter, computed
exactly with torch.autograd.functional.hessian; its eigenvalues; and the m-sharpness estimate
(mean over chunks of m rows of L(w + ρ g/‖g‖) − L(w)). Runs in float64.
"""
import json
import sys

import torch

torch.set_default_dtype(torch.float64)


def main():
    req = json.load(sys.stdin)
    names = sorted(req["params"])
    shapes = [req["shapes"][n] for n in names]
    flat = torch.cat([torch.tensor(req["params"][n]) for n in names])
    x = torch.tensor(req["x"])
    y = torch.tensor(req["y"])
    depth = len(req["hidden"]) + 1

    def unflatten(v):
        out, off = {}, 0
        for n, s in zip(names, shapes):
            k = 1
            for d in s:
                k *= d
            out[n] = v[off:off + k].view(*s)
            off += k
        return out

    def loss(v, lo=0, hi=None):
        p = unflatten(v)
        h = x[lo:hi]
        for i in range(depth):
            h = h @ p[f"layers.{2 * i}.weight"].t() + p[f"layers.{2 * i}.bias"]
            if i + 1 < depth:
                h = torch.relu(h)
        return torch.nn.functional.cross_entropy(h, y[lo:hi])

    hess = torch.autograd.functional.hessian(loss, flat)
    eig = torch.linalg.eigvalsh(hess).tolist()
    m, rho, total, chunks = req["m"], req["rho"], 0.0, 0
    for lo in range(0, len(y), m):
        hi = min(lo + m, len(y))
        v = flat.clone().requires_grad_(True)
        before = loss(v, lo, hi)
        (g,) = torch.autograd.grad(before, v)
        after = loss(flat + rho * g / (g.norm() + 1e-12), lo, hi)
        total += (after - before).item()
        chunks += 1
    json.dump({"eigenvalues": eig, "m_sharpness": total / chunks}, sys.stdout)


if __name__ == "__main__":
    main()
