"""PyTorch reference for Co-Mixup (run by plugins/mixup/tests/comixup.rs).

Written after snu-mllab/Co-Mixup (main.py's training step; mixup.py's mixup_process; match.py's
get_onehot_matrix, graphcut_wrapper, resolve_label, mix_input, obj_fn; utils.py's distance),
with the graph cuts done by gco-wrapper's cut_grid_graph(..., algorithm="swap") as there. The
reference's numpy/torch random draws are replaced by the splitmix64 stream and samplers of
mixup_reference.py, drawn in the order xlab's transform draws them. Everything is float64.

Two requests, read as JSON on stdin:
- {"mode": "cuts", "cases": [{"unary": [h][w][L], "pairwise": [L][L], "beta": b}]}: the labels
  gco gives each energy;
- {"mode": "train", ...}: a linear model on C×W×W images trained for a few SGD steps on
  Co-Mixup batches (soft-target cross-entropy, the clean loss's gradient added when
  clean_lam > 0); writes the final weights and the first step's mixed batch.
"""
import json
import os
import sys

import gco
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixup_reference import Rng  # noqa: E402

torch.set_default_dtype(torch.float64)


def cut(unary, pairwise, beta):
    h, w, _ = unary.shape
    cost_v = beta * np.ones((h - 1, w), dtype=np.float32)
    cost_h = beta * np.ones((h, w - 1), dtype=np.float32)
    return gco.cut_grid_graph(np.ascontiguousarray(unary), pairwise, cost_v, cost_h, algorithm="swap")


def onehot_labels(idx, n):
    return F.one_hot(torch.as_tensor(idx, dtype=torch.long), n).double()


def relabel(cost, label_count, n, h, w, beta, it):
    """One output's labels from its costs [h, w, n] (graphcut_wrapper)."""
    assigned = label_count > 0
    n_label = int(assigned.sum()) if it > 0 else 0
    base = np.ones((n, n), dtype=np.float32) - np.eye(n, dtype=np.float32)
    if n_label == 2:
        extra = cost[:, :, assigned].mean(-1, keepdim=True) - 5e-4
        pairwise = np.ones((n + 1, n + 1), dtype=np.float32) - np.eye(n + 1, dtype=np.float32)
        idx = assigned.numpy()
        pairwise[-1, :-1][idx] = 0.25
        pairwise[:-1, -1][idx] = 0.25
        lab = cut(torch.cat([cost, extra], -1).numpy(), pairwise, beta)
        oh = onehot_labels(lab, n + 1).reshape(h, w, n + 1)
        half = torch.zeros(1, 1, n)
        half[:, :, assigned] = 0.5
        return oh[:, :, :n] + oh[:, :, n:] * half
    if n_label >= 3:
        soft = torch.tensor([[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
        _, top = torch.topk(label_count, k=3)
        assigned = torch.zeros_like(assigned)
        assigned[top] = True
        extra = cost[:, :, assigned] @ soft - 5e-4
        pattern = np.array([[0.25, 0.25, 1], [0.25, 1, 0.25], [1, 0.25, 0.25]], dtype=np.float32)
        pairwise = np.ones((n + 3, n + 3), dtype=np.float32) - np.eye(n + 3, dtype=np.float32)
        idx = assigned.numpy()
        sub = pairwise[-3:, :-3]
        sub[:, idx] = pattern
        sub = pairwise[:-3, -3:]
        sub[idx, :] = pattern
        lab = cut(torch.cat([cost, extra], -1).numpy(), pairwise, beta)
        oh = onehot_labels(lab, n + 3).reshape(h, w, n + 3)
        shares = torch.zeros(3, n)
        shares[:, assigned] = soft
        return oh[:, :, :n] + oh[:, :, n:] @ shares
    lab = cut(cost.numpy(), base, beta)
    return onehot_labels(lab, n).reshape(h, w, n)


def objective(cost, mask, beta, gamma):
    n_out, h, w, n = mask.shape
    per = mask.reshape(n_out, h * w, n).sum(1)
    loss = torch.sum(cost.permute(1, 2, 0).unsqueeze(0) * mask)
    loss += beta / 2 * (((mask[:, :-1] - mask[:, 1:]) ** 2).sum() + ((mask[:, :, :-1] - mask[:, :, 1:]) ** 2).sum())
    loss += gamma * (torch.sum(per.sum(0) ** 2) - torch.sum(per**2))
    return loss


def repeated_sets(masks):
    n_out, n = masks.shape[0], masks.shape[-1]
    sets = (masks.reshape(n_out, -1, n).sum(1) > 0).double()
    add = torch.zeros_like(sets)
    dist = torch.clamp((sets.unsqueeze(1) - sets.unsqueeze(0)).abs().sum(-1), max=1.0)
    for i1, i2 in torch.triu(1.0 - dist, diagonal=1).nonzero():
        used = sets[i1].nonzero()
        if len(used) > 1:
            add[i1][used[0]] = 1.0
            add[i2][used[1]] = 1.0
    return add


def search(cost, A, p, rng):
    """The n outputs' masks [n, h, w, n] for costs [n, h, w] (get_onehot_matrix)."""
    n, h, w = cost.shape
    thres = p["thres"] * h * w
    beta, gamma, eta = p["beta"] / h / w, p["gamma"] / h / w, p["eta"] / h / w
    draws = torch.tensor([rng.gamma(p["alpha"]) for _ in range(n)])
    prior = (draws / draws.sum()).reshape(n, 1, 1)
    cost = cost - eta * torch.log(prior + 1e-8)
    init = torch.tensor([[rng.below(n) for _ in range(h * w)] for _ in range(n)])
    masks = onehot_labels(init.reshape(-1), n).reshape(n, h, w, n)
    loss_prev = objective(cost, masks, beta, gamma)
    penalty = onehot_labels(init.reshape(-1), n).sum(0)
    add = None
    for it in range(p["niter"]):
        for i in range(n):
            count = masks[i].reshape(h * w, n).sum(0)
            penalty -= count
            ap = A @ penalty
            if p["thres_type"] == "hard":
                modular = 2 * gamma * ((ap > thres).double() * ap)
            else:
                modular = 2 * gamma * ((ap > thres).double() * (ap - thres))
            c = cost + modular.reshape(-1, 1, 1)
            if add is not None:
                c = c + gamma * add[i].reshape(-1, 1, 1)
            masks[i] = relabel(c.permute(1, 2, 0), count, n, h, w, beta, it)
            penalty += masks[i].reshape(h * w, n).sum(0)
        if it == p["niter"] - 2 and p["set_resolve"]:
            add = repeated_sets(masks)
        loss = objective(cost, masks, beta, gamma)
        if (loss_prev - loss).abs() / loss.abs() < 1e-6:
            break
        loss_prev = loss
    return masks


def co_mixup(x, y, grad, classes, p, rng):
    """One Co-Mixup batch from the clean batch and its input gradient (mixup_process)."""
    b, _, _, width = x.shape
    sc = torch.sqrt(torch.mean(grad**2, dim=1))
    a_dist = None
    if p["omega"] > 0:
        z = F.avg_pool2d(sc, kernel_size=8, stride=1)
        idx = torch.argmax(z.reshape(b, -1), dim=1)
        pos = torch.stack([idx // z.shape[-1], idx % z.shape[-1]], 1).double()
        a_dist = (pos.unsqueeze(1) - pos.unsqueeze(0)).abs().sum(-1)
    blocks = p["block_num"] if p["block_num"] != -1 else 2 ** (1 + rng.below(4))
    sc = F.avg_pool2d(sc, width // blocks)
    target = onehot_labels(y, classes)
    outs, targets = [], []
    for lo in range(0, b, p["part"]):
        xs, ts = x[lo : lo + p["part"]], target[lo : lo + p["part"]]
        n = len(xs)
        scp = sc[lo : lo + n]
        cost = -scp / scp.reshape(n, -1).sum(1).reshape(n, 1, 1)
        A = torch.eye(n)
        if a_dist is not None:
            d = a_dist[lo : lo + n, lo : lo + n]
            # Where every salient position coincides (d.sum() == 0) the reference divides by
            # zero; xlab drops the term there (a documented deviation), and so does this.
            shared = d / d.sum() * n if d.sum() > 0 else torch.zeros_like(d)
            A = (1 - p["omega"]) * A + p["omega"] * shared
        masks = search(cost, A, p, rng)
        im = F.interpolate(masks.permute(0, 3, 1, 2), size=width, mode="nearest")
        outs.append(torch.sum(im.unsqueeze(2) * xs.unsqueeze(0), dim=1))
        t = torch.matmul(masks, ts).reshape(n, -1, classes).sum(-2)
        targets.append(t / t.sum(-1, keepdim=True))
    return torch.cat(outs), torch.cat(targets)


def train(req):
    ch, side, c = req["channels"], req["side"], req["classes"]
    x = torch.tensor(req["x"]).view(-1, ch, side, side)
    y = torch.tensor(req["y"])
    d = ch * side * side
    out = []
    for p in req["cases"]:
        rng = Rng(req["seed"])
        w = torch.tensor(req["w"]).view(d, c).clone().requires_grad_(True)
        b = torch.zeros(c, requires_grad=True)
        first = None
        for _ in range(req["steps"]):
            # The clean pass: saliency, and with clean_lam > 0 a gradient kept for the update.
            xv = x.clone().requires_grad_(True)
            scale = 2 * p["clean_lam"] / c if p["clean_lam"] > 0 else 1.0
            clean = F.cross_entropy(xv.reshape(len(y), d) @ w + b, y) * scale
            gx, gw0, gb0 = torch.autograd.grad(clean, [xv, w, b])
            xm, t = co_mixup(x, y, gx, c, p, rng)
            if first is None:
                first = (xm, t)
            logits = xm.reshape(len(xm), d) @ w + b
            loss = (-(t * torch.log_softmax(logits, -1)).sum(-1)).mean()
            gw, gb = torch.autograd.grad(loss, [w, b])
            if p["clean_lam"] > 0:
                gw, gb = gw + gw0, gb + gb0
            with torch.no_grad():
                w -= req["lr"] * gw
                b -= req["lr"] * gb
        out.append(
            {
                "w": w.detach().flatten().tolist(),
                "b": b.detach().tolist(),
                "x_first": first[0].flatten().tolist(),
                "t_first": first[1].flatten().tolist(),
            }
        )
    return out


def cuts(req):
    labels = []
    for case in req["cases"]:
        unary = np.array(case["unary"], dtype=np.float64)
        pairwise = np.array(case["pairwise"], dtype=np.float32)
        labels.append(cut(unary, pairwise, case["beta"]).tolist())
    return labels


def main():
    req = json.load(sys.stdin)
    json.dump(cuts(req) if req["mode"] == "cuts" else train(req), sys.stdout)


if __name__ == "__main__":
    main()
