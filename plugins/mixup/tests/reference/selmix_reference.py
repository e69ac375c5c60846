"""Reference for SelMix (run by plugins/mixup/tests/selmix.rs).

Written after val-iisc/SelMix: MetricOptimisation/base_optimizer.py (mixed prototypes, the
head's softmax on them, the logit change rate), metrics.py (MeanRecall, MinRecall, Gmean, Hmean:
the gain rate dM/dA and the sampling distribution), dataloaders/sampler.py (FastJointSampler with
semi_supervised=False), models/wrapper.py (feature mixing) and finetuning/selmix_ssl.py (the loop:
re-estimate every few steps on the validation split, then CE on the mixed features). Everything
is float64; the reference keeps the logit change rate in float32. Random draws come from the
splitmix64 stream of mixup_reference.py: every weighted draw is one uniform against the running
sum of the weights, where the reference calls torch.multinomial.

Two requests on stdin:
- {"mode": "gains", "cases": [{"cm", "prototypes", "w", "b", "lambdas", "params"}]}: P, G and
  the updated multipliers for a linear head;
- {"mode": "train", ...}: an MLP (features: ReLU of a linear layer; head: a linear layer)
  trained for a few SGD steps with SelMix; writes the final weights.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.special import softmax
from scipy.stats.mstats import gmean

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixup_reference import Rng  # noqa: E402

torch.set_default_dtype(torch.float64)


def gains(cm_raw, prototypes, head, lambdas, p):
    """The reference's MetricOptimizer subclasses, for one estimate."""
    K = cm_raw.shape[0]
    CM = np.clip(cm_raw, 1e-7, 10000)
    lam = (p["lambda_min"] + 1.0) / 2.0
    MP = np.zeros((K, K, prototypes.shape[1]))
    for i in range(K):
        for j in range(K):
            MP[i, j] = lam * prototypes[i] + (1 - lam) * prototypes[j]
    pred = softmax(head(MP.reshape(K * K, -1)), axis=-1).reshape(K, K, K)
    dots = np.zeros((K, K, K))
    for q in range(K):
        dots[:, :, q] = np.sum(MP * prototypes[q], axis=-1)
    LCR = np.zeros((K, K, K, K))
    for q in range(K):
        for l in range(K):
            LCR[:, :, q, l] = -dots[:, :, q] * pred[:, :, l]
    for i in range(K):
        for q in range(K):
            LCR[i, :, q, i] += dots[i, i, q]

    metric = p["metric"]
    D = np.zeros((K, K))
    if metric in ("mean_recall", "min_recall"):
        if metric == "min_recall":
            recall = np.diag(CM) / np.sum(CM, 1)
            new = [(x ** p["beta"]) * np.exp(-p["val_lr"] * r) for x, r in zip(lambdas, recall)]
            lambdas = [x / sum(new) for x in new]
            scale = [l * K for l in lambdas]
        else:
            scale = [1.0] * K
        for i in range(K):
            for j in range(K):
                if i == j:
                    D[i, i] = scale[i] * (CM[i, i] - K * CM[i, i] ** 2)
                else:
                    D[i, j] = scale[i] * (-K * CM[i, j] * CM[i, i])
    else:
        rowsum = np.sum(CM, 1)
        recall = np.diag(cm_raw) / np.sum(cm_raw, 1)
        dM_dC = np.zeros((K, K))
        if metric == "g_mean":
            g = gmean(recall)
            for i in range(K):
                for j in range(K):
                    d = 1 / CM[i, i] - 1 / rowsum[i] if i == j else -1 / rowsum[i]
                    dM_dC[i, j] = g * d / K
        else:
            h = stats.hmean(recall)
            for i in range(K):
                for j in range(K):
                    d = 1 / CM[i, i] - rowsum[i] / CM[i, i] ** 2 if i == j else 1 / CM[i, i]
                    dM_dC[i, j] = -(h ** 2) / K * d
        dC_dA = np.zeros((K, K, K, K))
        for i in range(K):
            for j in range(K):
                for l in range(K):
                    if l == j:
                        dC_dA[i, j, i, l] = CM[i, j] - K * CM[i, j] ** 2
                    else:
                        dC_dA[i, j, i, l] = -K * CM[i, l] * CM[i, j]
        for i in range(K):
            for j in range(K):
                D += dM_dC[i, j] * dC_dA[i, j]
    G = np.zeros((K, K))
    for i in range(K):
        for j in range(K):
            G[i, j] = np.sum(D * LCR[i, j])
    P = softmax(G / p["temperature"]) * (G > 0).astype(float)
    P = (P + 1e-8) / np.sum(P + 1e-8)
    return P, G, lambdas


def draw(rng, weights):
    cum = np.cumsum(weights)
    u = rng.uniform() * cum[-1]
    return min(int(np.searchsorted(cum, u, side="right")), len(cum) - 1)


def train(req):
    K, p = req["classes"], req["params"]
    x = torch.tensor(req["x"])
    y = req["y"]
    xv, yv = torch.tensor(req["x_val"]), req["y_val"]
    w1 = torch.tensor(req["w1"]).requires_grad_(True)
    w2 = torch.tensor(req["w2"]).requires_grad_(True)
    b1 = torch.zeros(w1.shape[1], requires_grad=True)
    b2 = torch.zeros(K, requires_grad=True)
    feats = lambda t: torch.relu(t @ w1 + b1)  # noqa: E731
    head = lambda f: f @ w2 + b2  # noqa: E731
    prior = np.bincount(y, minlength=K) / len(y)
    rng = Rng(req["seed"])
    lambdas = [1.0 / K] * K
    P = None
    for step in range(req["steps"]):
        if step % p["every"] == 0:
            with torch.no_grad():
                fv = feats(xv)
                pred = head(fv).argmax(-1).numpy()
            fv = fv.numpy()
            cm = np.zeros((K, K))
            for t, q in zip(yv, pred):
                cm[t, q] += 1
            cm /= len(yv)
            protos = np.stack([fv[np.array(yv) == k].mean(0) for k in range(K)])
            with torch.no_grad():
                hd = lambda m: head(torch.tensor(m)).numpy()  # noqa: E731
                P, _, lambdas = gains(cm, protos, hd, lambdas, p)
        eps = 1.0 / K**3
        p1 = np.sum(P + eps, axis=1)
        p2 = ((P.T + eps) / (p1 + eps)).T
        first = [p1[t] / prior[t] for t in y]
        a = [draw(rng, first) for _ in range(req["batch"])]
        c = [draw(rng, [p2[y[n], t] / prior[t] for t in y]) for n in a]
        mu = torch.tensor([np.float32(p["mix_min"] + (1 - p["mix_min"]) * rng.uniform()) for _ in a]).unsqueeze(1)
        f = feats(x[a]) * mu + feats(x[c]) * (1 - mu)
        loss = F.cross_entropy(head(f), torch.tensor([y[n] for n in a]))
        grads = torch.autograd.grad(loss, [w1, b1, w2, b2])
        with torch.no_grad():
            for t, g in zip([w1, b1, w2, b2], grads):
                t -= req["lr"] * g
    return {"w1": w1.detach().flatten().tolist(), "w2": w2.detach().flatten().tolist(),
            "b1": b1.detach().tolist(), "b2": b2.detach().tolist(), "lambdas": lambdas}


def main():
    req = json.load(sys.stdin)
    if req["mode"] == "gains":
        out = []
        for c in req["cases"]:
            w, b = np.array(c["w"]), np.array(c["b"])
            P, G, lambdas = gains(np.array(c["cm"]), np.array(c["prototypes"]), lambda m: m @ w + b,
                                  c["lambdas"], c["params"])
            out.append({"P": P.flatten().tolist(), "G": G.flatten().tolist(), "lambdas": list(lambdas)})
        json.dump(out, sys.stdout)
    else:
        json.dump(train(req), sys.stdout)


if __name__ == "__main__":
    main()
