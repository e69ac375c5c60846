"""PyTorch references for the DRO tests (run by plugins/dro/tests/pytorch_reference.rs).

`LossComputer` follows kohpangwei/group_DRO `loss.py` (robust and btl paths), and
`best_response` follows daniellevy/fast-dro `robust_losses.py` (`RobustLoss.best_response` and
the value functions), written here for the test from docs/methods.md section 4. Reads a JSON request on
stdin and writes the results as JSON on stdout. Everything runs in float64.
"""
import json
import math
import sys

import torch

torch.set_default_dtype(torch.float64)


class LossComputer:
    def __init__(self, group_counts, step_size, gamma, adj, normalize_loss, btl, alpha, min_var_weight):
        self.n_groups = len(group_counts)
        self.group_counts = torch.tensor(group_counts, dtype=torch.float64)
        self.group_frac = self.group_counts / self.group_counts.sum()
        self.step_size = step_size
        self.gamma = gamma
        self.adj = torch.full((self.n_groups,), float(adj))
        self.normalize_loss = normalize_loss
        self.btl = btl
        self.alpha = alpha
        self.min_var_weight = min_var_weight
        self.adv_probs = torch.ones(self.n_groups) / self.n_groups
        self.exp_avg_loss = torch.zeros(self.n_groups)
        self.exp_avg_initialized = torch.zeros(self.n_groups).byte()

    def loss(self, per_sample_losses, group_idx):
        group_loss, group_count = self.compute_group_avg(per_sample_losses, group_idx)
        self.update_exp_avg_loss(group_loss, group_count)
        if self.btl:
            return self.compute_robust_loss_btl(group_loss)
        return self.compute_robust_loss(group_loss)

    def compute_robust_loss(self, group_loss):
        adjusted_loss = group_loss
        if torch.all(self.adj > 0):
            adjusted_loss += self.adj / torch.sqrt(self.group_counts)
        if self.normalize_loss:
            adjusted_loss = adjusted_loss / (adjusted_loss.sum())
        self.adv_probs = self.adv_probs * torch.exp(self.step_size * adjusted_loss.data)
        self.adv_probs = self.adv_probs / (self.adv_probs.sum())
        return group_loss @ self.adv_probs

    def compute_robust_loss_btl(self, group_loss):
        adjusted_loss = self.exp_avg_loss + self.adj / torch.sqrt(self.group_counts)
        sorted_idx = adjusted_loss.sort(descending=True)[1]
        sorted_loss = group_loss[sorted_idx]
        sorted_frac = self.group_frac[sorted_idx]
        mask = torch.cumsum(sorted_frac, dim=0) <= self.alpha
        weights = mask.double() * sorted_frac / self.alpha
        last_idx = mask.sum()
        weights[last_idx] = 1 - weights.sum()
        weights = sorted_frac * self.min_var_weight + weights * (1 - self.min_var_weight)
        return sorted_loss @ weights

    def compute_group_avg(self, losses, group_idx):
        group_map = (group_idx == torch.arange(self.n_groups).unsqueeze(1).long()).double()
        group_count = group_map.sum(1)
        group_denom = group_count + (group_count == 0).double()
        group_loss = (group_map @ losses.view(-1)) / group_denom
        return group_loss, group_count

    def update_exp_avg_loss(self, group_loss, group_count):
        prev_weights = (1 - self.gamma * (group_count > 0).double()) * (self.exp_avg_initialized > 0).double()
        curr_weights = 1 - prev_weights
        self.exp_avg_loss = self.exp_avg_loss * prev_weights + group_loss.detach() * curr_weights
        self.exp_avg_initialized = (self.exp_avg_initialized > 0) + (group_count > 0)


def bisection(eta_min, eta_max, f, tol, max_iter):
    lower = f(eta_min)
    upper = f(eta_max)
    while lower > 0 or upper < 0:
        length = eta_max - eta_min
        if lower > 0:
            eta_max = eta_min
            eta_min = eta_min - 2 * length
        if upper < 0:
            eta_min = eta_max
            eta_max = eta_max + 2 * length
        lower = f(eta_min)
        upper = f(eta_max)
    for _ in range(max_iter):
        eta = 0.5 * (eta_min + eta_max)
        v = f(eta)
        if torch.abs(v) <= tol:
            return eta
        if v > 0:
            eta_max = eta
        elif v < 0:
            eta_min = eta
    return 0.5 * (eta_min + eta_max)


def best_response(v, geometry, size, reg, tol, max_iter):
    m = v.shape[0]
    if geometry == "cvar":
        if reg > 0:
            if size == 1.0:
                return torch.ones_like(v) / m

            def p(eta):
                x = (v - eta) / reg
                return torch.min(torch.exp(x), torch.tensor([1 / size])) / m

            def target(eta):
                return 1.0 - p(eta).sum()

            eta_min = reg * torch.logsumexp(v / reg - math.log(m), 0)
            eta_max = v.max()
            if torch.abs(target(eta_min)) <= tol:
                return p(eta_min)
        else:
            cutoff = int(size * m)
            surplus = 1.0 - cutoff / (size * m)
            p = torch.zeros_like(v)
            idx = torch.argsort(v, descending=True)
            p[idx[:cutoff]] = 1.0 / (size * m)
            if cutoff < m:
                p[idx[cutoff]] = surplus
            return p
    else:
        if (v.max() - v.min()) / v.max() <= 1e-5:
            return torch.ones_like(v) / m
        if m <= 1 + 2 * size:
            out = (v == v.max()).double()
            return out / out.sum()
        if reg == 0:
            def p(eta):
                pp = torch.relu(v - eta)
                return pp / pp.sum()

            def target(eta):
                w = m * p(eta) - torch.ones(m)
                return 0.5 * torch.mean(w ** 2) - size

            eta_min = -(1.0 / (math.sqrt(2 * size + 1) - 1)) * v.max()
            eta_max = v.max()
        else:
            def p(eta):
                pp = torch.relu(v - eta)
                opt_lam = max(reg, torch.norm(pp) / math.sqrt(m * (1 + 2 * size)))
                return pp / (m * opt_lam)

            def target(eta):
                return 1 - p(eta).sum()

            eta_min = v.min() - 1
            eta_max = v.max()
    eta_star = bisection(eta_min, eta_max, target, tol, max_iter)
    return p(eta_star)


def robust_value(v, geometry, size, reg, tol, max_iter):
    with torch.no_grad():
        p = best_response(v, geometry, size, reg, tol, max_iter)
    m = v.shape[0]
    if geometry == "cvar":
        with torch.no_grad():
            nz = p[p > 0]
            kl = math.log(m) + (nz * torch.log(nz)).sum()
        return torch.dot(p, v) - reg * kl
    with torch.no_grad():
        chi2 = (0.5 / m) * reg * (torch.norm(m * p - torch.ones(m), p=2) ** 2)
    return torch.dot(p, v) - chi2


def main():
    req = json.load(sys.stdin)
    out = {"group_dro": [], "robust": []}
    for cfg in req["group_dro"]:
        lc = LossComputer(req["counts"], cfg["step_size"], cfg["gamma"], cfg["adjustment"], cfg["normalize_loss"],
                          cfg["btl"], cfg["alpha"], cfg["min_var_weight"])
        steps = []
        for b in req["batches"]:
            losses = torch.tensor(b["losses"], dtype=torch.float64, requires_grad=True)
            loss = lc.loss(losses, torch.tensor(b["groups"]))
            loss.backward()
            steps.append({"loss": loss.item(), "grad": losses.grad.tolist(), "q": lc.adv_probs.tolist()})
        out["group_dro"].append(steps)
    for case in req["robust"]:
        v = torch.tensor(case["v"], dtype=torch.float64, requires_grad=True)
        value = robust_value(v, case["geometry"], case["size"], case["reg"], case["tol"], case["max_iter"])
        value.backward()
        out["robust"].append({"loss": value.item(), "grad": v.grad.tolist()})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
