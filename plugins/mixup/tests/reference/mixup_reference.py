"""PyTorch references for the mixup family (run by plugins/mixup/tests/pytorch_reference.rs).

Each transform is written after its reference (facebookresearch/mixup-cifar10,
clovaai/CutMix-PyTorch, timm's Mixup, FrancescoPinto/RegMixup; selective mixup from its paper)
as docs/methods.md section 2 describes it, and trains a linear model on 1×4×4 images for a few SGD
steps. Random draws come from the same splitmix64 stream and the same sampling algorithms as
xlab's host generator (uniform, rejection-sampled integers, Fisher-Yates, Box-Muller,
Marsaglia-Tsang gamma, beta as a gamma ratio), drawn in the same order, so both sides see the
same λ, permutations and boxes. Reads the request on stdin, writes final weights as JSON.
"""
import json
import math
import sys

import torch

torch.set_default_dtype(torch.float64)
M = (1 << 64) - 1


class Rng:
    def __init__(self, seed):
        self.s = seed

    def next_u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    def uniform(self):
        return (self.next_u64() >> 11) / float(1 << 53)

    def below(self, n):
        zone = M - M % n
        while True:
            v = self.next_u64()
            if v < zone:
                return v % n

    def permutation(self, n):
        p = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.below(i + 1)
            p[i], p[j] = p[j], p[i]
        return p

    def normal(self):
        u1 = 1.0 - self.uniform()
        u2 = self.uniform()
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def gamma(self, shape):
        if shape < 1.0:
            u = self.uniform()
            return self.gamma(shape + 1.0) * u ** (1.0 / shape)
        d = shape - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        while True:
            x = self.normal()
            t = 1.0 + c * x
            v = t * t * t
            if v <= 0.0:
                continue
            u = self.uniform()
            if math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
                return d * v

    def beta(self, a, b):
        x = self.gamma(a)
        y = self.gamma(b)
        return x / (x + y)


def onehot(y, c):
    return torch.nn.functional.one_hot(y, c).double()


def mixup(x, y, c, p, rng):
    lam = rng.beta(p["alpha"], p["alpha"]) if p["alpha"] > 0 else 1.0
    perm = torch.tensor(rng.permutation(len(y)))
    return lam * x + (1 - lam) * x[perm], lam * onehot(y, c) + (1 - lam) * onehot(y, c)[perm]


def cutmix(x, y, c, p, rng):
    r = rng.uniform()
    if not (p["beta"] > 0 and r < p["prob"]):
        return x, onehot(y, c)
    lam = rng.beta(p["beta"], p["beta"])
    perm = torch.tensor(rng.permutation(len(y)))
    W, H = x.size(2), x.size(3)  # the reference's names: size[2] is "W"
    cx, cy = rng.below(W), rng.below(H)
    cut_rat = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    bbx1, bby1 = min(max(cx - cut_w // 2, 0), W), min(max(cy - cut_h // 2, 0), H)
    bbx2, bby2 = min(max(cx + cut_w // 2, 0), W), min(max(cy + cut_h // 2, 0), H)
    x = x.clone()
    x[:, :, bbx1:bbx2, bby1:bby2] = x[perm, :, bbx1:bbx2, bby1:bby2]
    lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (W * H))
    return x, lam * onehot(y, c) + (1 - lam) * onehot(y, c)[perm]


def timm_draw(p, rng):
    if rng.uniform() >= p["prob"]:
        return 1.0, False
    ma, ca = p["mixup_alpha"], p["cutmix_alpha"]
    if ma > 0 and ca > 0:
        cut = rng.uniform() < p["switch_prob"]
        a = ca if cut else ma
        return rng.beta(a, a), cut
    if ma > 0:
        return rng.beta(ma, ma), False
    if ca > 0:
        return rng.beta(ca, ca), True
    return 1.0, False


def timm_box(h, w, lam, rng, correct):
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = rng.below(h), rng.below(w)
    yl, yh = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
    xl, xh = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
    if correct:
        lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
    return (yl, yh, xl, xh), lam


def timm(x, y, c, p, rng):
    h, w = x.size(2), x.size(3)
    b = len(y)
    if p["mode"] == "batch":
        lam, cut = timm_draw(p, rng)
        if lam == 1.0:
            pass
        elif cut:
            (yl, yh, xl, xh), lam = timm_box(h, w, lam, rng, p["correct_lam"])
            x = x.clone()
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        else:
            x = x * lam + x.flip(0) * (1.0 - lam)
        lam_t = torch.tensor([lam])
    else:
        # timm's _params_per_elem, then _mix_elem / _mix_pair.
        pair = p["mode"] == "pair"
        n = b // 2 if pair else b
        lam_batch, use_cutmix = [], []
        for _ in range(n):
            lam, cut = timm_draw(p, rng)
            lam_batch.append(float(torch.tensor(lam, dtype=torch.float32)))
            use_cutmix.append(cut)
        x_orig = x.clone()
        x = x.clone()
        for i in range(n):
            j = b - i - 1
            lam = lam_batch[i]
            if lam != 1.0:
                if use_cutmix[i]:
                    (yl, yh, xl, xh), lam = timm_box(h, w, lam, rng, p["correct_lam"])
                    x[i][:, yl:yh, xl:xh] = x_orig[j][:, yl:yh, xl:xh]
                    if pair:
                        x[j][:, yl:yh, xl:xh] = x_orig[i][:, yl:yh, xl:xh]
                    lam_batch[i] = float(torch.tensor(lam, dtype=torch.float32))
                else:
                    x[i] = x[i] * lam + x_orig[j] * (1 - lam)
                    if pair:
                        x[j] = x[j] * lam + x_orig[i] * (1 - lam)
        if pair:
            mid = [1.0] * (b - 2 * n)  # an odd batch's middle example is its own partner
            lam_batch = lam_batch + mid + lam_batch[::-1]
        lam_t = torch.tensor(lam_batch).unsqueeze(1)
    s = p["label_smoothing"]
    off, on = s / c, 1.0 - s + s / c
    y1 = torch.full((b, c), off).scatter_(1, y.view(-1, 1), on)
    y2 = torch.full((b, c), off).scatter_(1, y.flip(0).view(-1, 1), on)
    return x, y1 * lam_t + y2 * (1.0 - lam_t)


def regmixup(x, y, c, p, rng):
    lam = rng.beta(p["alpha"], p["alpha"])
    perm = torch.tensor(rng.permutation(len(y)))
    xm = lam * x + (1 - lam) * x[perm]
    tm = lam * onehot(y, c) + (1 - lam) * onehot(y, c)[perm]
    return torch.cat([x, xm]), torch.cat([onehot(y, c), tm])


def selective(x, y_t, c, p, rng, d):
    y = y_t.tolist()
    lam = rng.beta(p["alpha"], p["alpha"]) if p["alpha"] > 0 else 1.0

    def admits(rule, a, b):
        return a == b if rule == "same" else (a != b if rule == "different" else True)

    partners = []
    for i in range(len(y)):
        ok = [j for j in range(len(y)) if j != i and admits(p["class"], y[i], y[j])
              and (p["domain"] == "any" or admits(p["domain"], d[i], d[j]))]
        partners.append(ok[rng.below(len(ok))] if ok else i)
    perm = torch.tensor(partners)
    return lam * x + (1 - lam) * x[perm], lam * onehot(y_t, c) + (1 - lam) * onehot(y_t, c)[perm]


def main():
    req = json.load(sys.stdin)
    x0 = torch.tensor(req["x"]).view(-1, 1, 4, 4)
    y = torch.tensor(req["y"])
    d = req["domain"]
    c = req["classes"]
    out = []
    for case in req["cases"]:
        rng = Rng(req["seed"])
        w = torch.tensor(req["w"]).view(16, c).clone().requires_grad_(True)
        b = torch.zeros(c, requires_grad=True)
        for _ in range(req["steps"]):
            kind, p = case["id"], case["params"]
            if kind == "mixup.mixup":
                xt, t = mixup(x0, y, c, p, rng)
            elif kind == "mixup.cutmix":
                xt, t = cutmix(x0, y, c, p, rng)
            elif kind == "mixup.timm":
                xt, t = timm(x0, y, c, p, rng)
            elif kind == "mixup.regmixup":
                xt, t = regmixup(x0, y, c, p, rng)
            elif kind == "mixup.selective":
                xt, t = selective(x0, y, c, p, rng, d)
            else:
                raise SystemExit(f"unknown case {kind}")
            logits = xt.reshape(len(xt), 16) @ w + b
            loss = (-(t * torch.log_softmax(logits, -1)).sum(-1)).mean()
            gw, gb = torch.autograd.grad(loss, [w, b])
            with torch.no_grad():
                w -= req["lr"] * gw
                b -= req["lr"] * gb
        out.append({"w": w.detach().flatten().tolist(), "b": b.detach().tolist()})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
