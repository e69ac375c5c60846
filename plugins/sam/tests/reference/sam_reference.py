"""PyTorch references for the SAM family (run by plugins/sam/tests/pytorch_reference.rs).

Each variant is written as its reference optimizer does it (davda54/sam, SamsungLabs/ASAM,
xxgege/GAM, WHU-ZQH/FSAM4PLM, mueller-mp/SAM-ON, hiyouga/AMP-Regularizer; F-GR from its paper),
following docs/methods.md section 1, and trains a tiny network for a few steps with SGD (momentum
0.9). Reads {"init": {...}, "x": [[...]], "y": [...], "steps": n, "lr": a, "cases": [...]} on
stdin and writes the final parameters of every case as JSON. Everything runs in float64.
"""
import json
import sys

import torch

torch.set_default_dtype(torch.float64)


class Tiny(torch.nn.Module):
    """h = tanh(x W1ᵀ + b1) ⊙ norm.weight; logits = h W2ᵀ + b2."""

    def __init__(self, init):
        super().__init__()
        self.fc1 = torch.nn.Linear(2, 4)
        self.norm = torch.nn.Module()
        self.norm.weight = torch.nn.Parameter(torch.ones(4))
        self.fc2 = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(torch.tensor(init[n]).view_as(p))

    def forward(self, x):
        return (torch.tanh(self.fc1(x)) * self.norm.weight) @ self.fc2.weight.t() + self.fc2.bias


def grad_norm(ps, scale=None):
    return torch.norm(torch.stack([((scale(p) if scale else 1.0) * p.grad).norm(p=2) for p in ps if p.grad is not None]), p=2)


def run(case, init, x, y, steps, lr):
    model = Tiny(init)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    kind = case["id"]
    a = case.get("params", {})

    def closure(lo=0, hi=None):
        opt.zero_grad()
        hi = len(y) if hi is None else hi
        loss = torch.nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi])
        loss.backward()
        return loss

    fsam_mask = {}
    for step in range(steps):
        if kind == "sam.sam" and a.get("m", 0) and a["m"] < len(y):
            m = a["m"]
            acc = [torch.zeros_like(p) for p in params]
            for lo in range(0, len(y), m):
                hi = min(lo + m, len(y))
                closure(lo, hi)
                scale = a["rho"] / (grad_norm(params) + 1e-12)
                old = [p.data.clone() for p in params]
                with torch.no_grad():
                    for p in params:
                        p.add_(p.grad * scale)
                closure(lo, hi)
                with torch.no_grad():
                    for p, o, s in zip(params, old, acc):
                        p.data = o
                        s.add_(p.grad * ((hi - lo) / len(y)))
            for p, s in zip(params, acc):
                p.grad = s
            opt.step()
        elif kind == "sam.sam":
            closure()
            scale = a["rho"] / (grad_norm(params) + 1e-12)
            old = [p.data.clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad * scale)
            closure()
            for p, o in zip(params, old):
                p.data = o
            opt.step()
        elif kind == "sam.asam" and a.get("variant") == "davda54":
            closure()
            scale = a["rho"] / (grad_norm(params, torch.abs) + 1e-12)
            old = [p.data.clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(torch.pow(p, 2) * p.grad * scale)
            closure()
            for p, o in zip(params, old):
                p.data = o
            opt.step()
        elif kind == "sam.asam":
            closure()
            eta = a.get("eta", 0.01)
            with torch.no_grad():
                wgrads = []
                ts = {}
                for n, p in named:
                    t = torch.ones_like(p)
                    if "weight" in n:
                        t = p.abs() + eta
                        p.grad.mul_(t)
                    ts[n] = t
                    wgrads.append(torch.norm(p.grad, p=2))
                wnorm = torch.norm(torch.stack(wgrads), p=2) + 1.0e-16
                eps = {}
                for n, p in named:
                    if "weight" in n:
                        p.grad.mul_(ts[n])
                    eps[n] = p.grad * (a["rho"] / wnorm)
                    p.add_(eps[n])
            closure()
            with torch.no_grad():
                for n, p in named:
                    p.sub_(eps[n])
            opt.step()
        elif kind == "sam.gam":
            rho_p, rho, b0, b1, gamma = a["grad_rho"], a["grad_norm_rho"], a["beta0"], a["beta1"], a["gamma"]
            b2, b3 = 1 - b0, 1 - b1
            e = 1e-12
            closure()
            g0 = [p.grad.clone() for p in params]
            n0 = torch.norm(torch.stack([g.norm() for g in g0]))
            e0 = [g * (rho_p / (n0 + e)) for g in g0]
            with torch.no_grad():
                for p, d in zip(params, e0):
                    p.add_(d)
            closure()
            g1 = [p.grad.clone() for p in params]
            with torch.no_grad():
                for p, d in zip(params, e0):
                    p.sub_(d)
            dd = [u - v for u, v in zip(g1, g0)]
            nd = torch.norm(torch.stack([g.norm() for g in dd]))
            e12 = [g * (rho / (nd + e)) for g in dd]
            with torch.no_grad():
                for p, d in zip(params, e12):
                    p.add_(d)
            closure()
            g2 = [p.grad.clone() for p in params]
            n2 = torch.norm(torch.stack([g.norm() for g in g2]))
            ep = [g * (rho_p / (n2 + e)) for g in g2]
            with torch.no_grad():
                for p, d in zip(params, ep):
                    p.add_(d)
            closure()
            g3 = [p.grad.clone() for p in params]
            with torch.no_grad():
                for p, d1, d2 in zip(params, e12, ep):
                    p.sub_(d1)
                    p.sub_(d2)
            mm = [u + abs(b2) * v for u, v in zip(g0, g2)]
            uu = [b1 * u + b3 * v for u, v in zip(g1, g3)]
            nm = torch.norm(torch.stack([g.norm() for g in mm]))
            nu = torch.norm(torch.stack([g.norm() for g in uu]))
            c = sum((u * v).sum() for u, v in zip(mm, uu)) / (nu * nm + e)
            for p, m_, u_ in zip(params, mm, uu):
                v = m_ - c * nm * u_ / (nu + e)
                p.grad = u_ - gamma * v
            opt.step()
        elif kind == "sam.fsam":
            closure()
            maskable = [(n, p) for n, p in named if "bias" not in n and "embed" not in n and "norm" not in n]
            if step % a["mask_iter"] == 0:
                fisher = torch.cat([torch.flatten(p.grad ** 2) for _, p in maskable])
                keep = int(len(fisher) * a["keep_ratio"])
                flat = torch.zeros_like(fisher)
                flat[torch.topk(fisher, keep, sorted=True)[1]] = 1.0
                off = 0
                for n, p in maskable:
                    fsam_mask[n] = flat[off:off + p.numel()].view_as(p)
                    off += p.numel()
            scale = a["rho"] / (grad_norm(params) + 1e-7)
            eps = {}
            with torch.no_grad():
                for n, p in named:
                    eps[n] = p.grad * scale * (fsam_mask[n] if n in fsam_mask else 1.0)
                    p.add_(eps[n])
            closure()
            with torch.no_grad():
                for n, p in named:
                    p.sub_(eps[n])
            opt.step()
        elif kind == "sam.sam_on":
            closure()
            only = [(n, p) for n, p in named if "norm" in n or "bn" in n]
            eta = a.get("eta", 0.0)
            if a.get("adaptive", True):
                ts = {n: (p.abs() + eta if "weight" in n else torch.ones_like(p)) for n, p in only}
            else:
                ts = {n: torch.ones_like(p) for n, p in only}
            wn = torch.norm(torch.stack([(ts[n] * p.grad).norm(p=2) for n, p in only]), p=2) + 1e-16
            old = {n: p.data.clone() for n, p in only}
            with torch.no_grad():
                for n, p in only:
                    p.add_(ts[n] ** 2 * p.grad * (a["rho"] / wn))
            closure()
            for n, p in only:
                p.data = old[n]
            opt.step()
        elif kind == "sam.amp":
            eps, inner_lr, iters = a.get("epsilon", 0.5), a.get("inner_lr", 1.0), a.get("inner_iter", 1)

            def clipped():
                loss = closure()
                torch.nn.utils.clip_grad_norm_(params, 50.0)
                return loss

            clipped()
            dev = {}
            for i in range(iters):
                with torch.no_grad():
                    for p in params:
                        if i == 0:
                            dev[p] = torch.zeros_like(p)
                        d = dev[p] + inner_lr * p.grad
                        c = eps / (d.norm() + 1e-12)
                        if c < 1:
                            d = c * d
                        p.sub_(dev[p]).add_(d)
                        dev[p] = d
                clipped()
            with torch.no_grad():
                for p in params:
                    p.sub_(dev[p])
            opt.step()
        elif kind == "sam.fd_gr":
            gamma, eps = a["gamma"], a["epsilon"]
            closure()
            g = [p.grad.clone() for p in params]
            old = [p.data.clone() for p in params]
            sign = 1.0 if a.get("direction", "forward") == "forward" else -1.0
            with torch.no_grad():
                for p, gg in zip(params, g):
                    p.add_(sign * eps * gg)
            closure()
            for p, o in zip(params, old):
                p.data = o
            k = gamma / eps
            for p, gg in zip(params, g):
                h = p.grad.clone()
                p.grad = (1 - k) * gg + k * h if sign > 0 else gg + k * (gg - h)
            opt.step()
        else:
            raise SystemExit(f"unknown case {kind}")
    return {n: p.detach().flatten().tolist() for n, p in named}


def run_saf(case, init, x, y, steps_per_epoch, epochs, lr):
    """SAF (AngusDujw/SAF SAF_train.py) as a loss on top of plain SGD with momentum."""
    model = Tiny(init)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    a = case["params"]
    lam, tau, me, start, end = a["lambda"], a["tau"], a["minus_epoch"], a["kl_start"], a["kl_end"]
    n, c = len(y), 3
    buf = torch.zeros(n, me + 1, c, dtype=torch.float32)
    idx = torch.arange(n)
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            opt.zero_grad()
            z = model(x)
            buf[idx, e % (me + 1)] = z.detach().float()
            ref = buf[idx, (e - me) % (me + 1)].double()
            loss = torch.nn.functional.cross_entropy(z, y, reduction="none")
            if start < e < end:
                p = torch.softmax(ref / tau, dim=-1)
                kl = (p * (torch.log(p) - torch.log(torch.softmax(z / tau, dim=-1)))).sum(-1)
                loss = loss + lam * tau * tau * kl
            loss.mean().backward()
            opt.step()
    return {n_: p.detach().flatten().tolist() for n_, p in named}


def run_mesa(case, init, x, y, steps_per_epoch, epochs, lr):
    """MESA (AngusDujw/SAF MESA_train.py): a KL to an EMA teacher (timm ModelEmaV2)."""
    model = Tiny(init)
    teacher = Tiny(init)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    a = case["params"]
    d, lam, tau, start, end = a["decay"], a["lambda"], a["tau"], a["kl_start"], a["kl_end"]
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            opt.zero_grad()
            z = model(x)
            loss = torch.nn.functional.cross_entropy(z, y, reduction="none")
            if start < e < end:
                teacher.eval()
                with torch.no_grad():
                    ref = teacher(x)
                p = torch.softmax(ref / tau, dim=-1)
                kl = (p * (torch.log(p) - torch.log(torch.softmax(z / tau, dim=-1)))).sum(-1)
                loss = loss + lam * tau * tau * kl
            loss.mean().backward()
            opt.step()
            with torch.no_grad():
                for ema_v, model_v in zip(teacher.state_dict().values(), model.state_dict().values()):
                    ema_v.copy_(ema_v * d + (1.0 - d) * model_v)
    return {n_: p.detach().flatten().tolist() for n_, p in named}


def main():
    req = json.load(sys.stdin)
    x = torch.tensor(req["x"])
    y = torch.tensor(req["y"])
    out = [
        run_saf(c, req["init"], x, y, req["steps"], c["epochs"], req["lr"]) if c["id"] == "sam.saf"
        else run_mesa(c, req["init"], x, y, req["steps"], c["epochs"], req["lr"]) if c["id"] == "sam.mesa"
        else run(c, req["init"], x, y, req["steps"], req["lr"])
        for c in req["cases"]
    ]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
