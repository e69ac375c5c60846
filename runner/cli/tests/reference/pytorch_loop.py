"""The PyTorch loop xlab's training must reproduce (runner/cli/tests/pytorch_equivalence.rs).

Reads a JSON request on stdin, writes into request["dir"]:
- data.npz: x (float32), y (int64); the last n_test rows are the test split;
- init.safetensors: the initial weights of `layers = Sequential(Linear, ReLU, Linear)`;
- torch_final.safetensors: the weights after training with torch.optim.SGD, label smoothing,
  clip_grad_norm_ and CosineAnnealingLR stepped per optimizer step, rows in file order;
and prints {"train_loss": [per-epoch mean training loss]} on stdout.
With "clean_weight" w in the request, each step also adds the gradient of w · CE (no label
smoothing) of the same batch at the same weights, as a batch transform that keeps the clean
loss's gradient asks xlab's worker to; the reported loss stays the smoothed CE.
With "precision": "fp16", the forward pass runs under CPU fp16 autocast and the loss is scaled by
torch.amp.GradScaler("cpu") with request["loss_scale"] (init, growth_interval), unscaled before
clipping (the documented recipe); the output then also has "skipped" (steps skipped per epoch)
and "loss_scale" (the final scale). With "feature_mix" μ, each row's logits are
head(μ·f(x) + (1−μ)·f(x')) with x' the row's mirror in the batch (f: Linear and ReLU; head: the last
Linear), as fixture.feature_mix asks xlab's worker to do.
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

req = json.load(sys.stdin)
out = req["dir"]
torch.manual_seed(req["seed"])
n, n_test, dim, classes = req["n_train"] + req["n_test"], req["n_test"], req["dim"], req["classes"]
g = torch.Generator().manual_seed(req["seed"])
y = torch.randint(0, classes, (n,), generator=g)
x = torch.randn(n, dim, generator=g) + 2.0 * F.one_hot(y, classes).float() @ torch.randn(classes, dim, generator=g)
np.savez(os.path.join(out, "data.npz"), x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, req["hidden"]), torch.nn.ReLU(), torch.nn.Linear(req["hidden"], classes))

    def forward(self, x):
        return self.layers(x)


net = Net()
save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(out, "init.safetensors"))
opt = torch.optim.SGD(net.parameters(), lr=req["lr"], momentum=req["momentum"], weight_decay=req["weight_decay"],
                      nesterov=req["nesterov"])
xt, yt = x[: req["n_train"]], y[: req["n_train"]]
bs = req["batch_size"]
steps_per_epoch = (len(xt) + bs - 1) // bs
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_per_epoch * req["epochs"], eta_min=req["min_lr"])
precision = req.get("precision")
half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.bfloat16)
scaler = None
if precision == "fp16":
    ls = req["loss_scale"]
    scaler = torch.amp.GradScaler("cpu", init_scale=ls["init"], growth_interval=ls["growth_interval"])
losses, skipped = [], []
for epoch in range(req["epochs"]):
    total, skips = 0.0, 0
    for lo in range(0, len(xt), bs):
        xb, yb = xt[lo:lo + bs], yt[lo:lo + bs]
        opt.zero_grad()
        # `precision: bf16 | fp16`: the forward pass under CPU autocast, the loss on fp32 logits.
        with torch.autocast("cpu", dtype=half, enabled=precision in ("bf16", "fp16")):
            if req.get("feature_mix"):
                mu = req["feature_mix"]
                feats = lambda t: net.layers[1](net.layers[0](t))  # noqa: E731
                logits = net.layers[2](feats(xb) * mu + feats(xb.flip(0)) * (1 - mu))
            else:
                logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=req["label_smoothing"])
        (scaler.scale(loss) if scaler else loss).backward()
        if req.get("clean_weight"):
            with torch.autocast("cpu", dtype=half, enabled=precision in ("bf16", "fp16")):
                clean_logits = net(xb)
            clean = F.cross_entropy(clean_logits.float(), yb) * req["clean_weight"]
            (scaler.scale(clean) if scaler else clean).backward()
        if scaler:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), req["clip_grad_norm"])
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skips += scaler.get_scale() < before
        else:
            torch.nn.utils.clip_grad_norm_(net.parameters(), req["clip_grad_norm"])
            opt.step()
        sched.step()
        total += loss.item() * len(xb)
    losses.append(total / len(xt))
    skipped.append(skips)
save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(out, "torch_final.safetensors"))
print(json.dumps({"train_loss": losses, "skipped": skipped, "loss_scale": scaler.get_scale() if scaler else None}))
