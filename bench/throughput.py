"""Training throughput: xlab against a plain PyTorch eager loop, same model, data, batch, threads.

For each case (model × method) this runs one xlab job (`xlab run` on a generated experiment file)
and the same training in PyTorch eager, then reports steps/s side by side. xlab's figure is its
own `time.steps_per_s` metric (the training pass of an epoch, evaluation excluded); the PyTorch
figure times the same pass. The first epoch of both is a warm-up and is not counted.

    python bench/throughput.py --xlab target/release/xlab --device cpu --out bench/out

Peers, both in Python with the same torch: `eager` keeps the running loss on the device and reads
it once per epoch (the fastest idiomatic loop); `eager+item` reads `loss.item()` every step, as
most training scripts do for logging. xlab reads its per-example statistics every step.

How close a step comes to the machine: the FLOPs of one training step are counted by PyTorch's
`FlopCounterMode` on the eager step (matrix products and convolutions, forward and backward,
both passes for SAM), and the machine's matmul throughput is a square fp32 `torch.mm` on the same
device and threads (the median of 10). xlab's GFLOP/s is its steps/s times the step's FLOPs.

On a shared machine one run proves little, so each case runs `--rounds` times, xlab and both
peers interleaved within each round. A case reports the median of the rounds with the min-max,
the ratio of each round's xlab figure to the same round's eager figure (median, min-max), and a
verdict: "faster" or "slower" only where every round agrees (the ratios' spread excludes 1.0).
How steady a loop is: the coefficient of variation (std / mean) of its per-epoch steps/s after
the first epoch, the median over rounds.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

# (name, data, model, batch). Data and widths are larger on a GPU, where the small CPU cases
# would measure only launch latency.
CASES = {
    "cpu": [
        ("mlp", {"name": "blobs", "n_train": 8192, "n_val": 256, "n_test": 256, "classes": 10, "dim": 128},
         {"name": "mlp", "hidden": [256, 256]}, 128),
        ("cnn", {"name": "digits"}, {"name": "cnn", "channels": [16, 32]}, 64),
        # Per-step overhead dominates: small batches of a wide MLP.
        ("mlp-b8", {"name": "blobs", "n_train": 2048, "n_val": 256, "n_test": 256, "classes": 10, "dim": 64},
         {"name": "mlp", "hidden": [512, 512]}, 8),
        ("mlp-b32", {"name": "blobs", "n_train": 4096, "n_val": 256, "n_test": 256, "classes": 10, "dim": 64},
         {"name": "mlp", "hidden": [512, 512]}, 32),
        # Compute-bound: MNIST-sized rows through 512-wide layers.
        ("mlp784-b128", {"name": "blobs", "n_train": 8192, "n_val": 256, "n_test": 256, "classes": 10, "dim": 784},
         {"name": "mlp", "hidden": [512, 512]}, 128),
        ("mlp784-b512", {"name": "blobs", "n_train": 8192, "n_val": 256, "n_test": 256, "classes": 10, "dim": 784},
         {"name": "mlp", "hidden": [512, 512]}, 512),
        # The two-conv CNN on 28x28 images (an IDX folder of random images written here).
        ("cnn28", {"name": "idx", "path": "IDX", "n_val": 0}, {"name": "cnn", "channels": [16, 32]}, 64),
        # CIFAR-shaped networks on a small CIFAR-10-format folder: few steps, as CPUs allow.
        ("resnet18-cpu", {"name": "cifar10", "path": "CIFAR-SMALL", "n_val": 0}, {"name": "resnet18"}, 32),
        ("wrn16-4-cpu", {"name": "cifar10", "path": "CIFAR-SMALL", "n_val": 0},
         {"name": "wrn", "depth": 16, "width": 4}, 32),
    ],
    "cuda": [
        ("mlp", {"name": "blobs", "n_train": 65536, "n_val": 256, "n_test": 256, "classes": 10, "dim": 512},
         {"name": "mlp", "hidden": [2048, 2048]}, 512),
        ("mlp-small", {"name": "blobs", "n_train": 16384, "n_val": 256, "n_test": 256, "classes": 10, "dim": 128},
         {"name": "mlp", "hidden": [256, 256]}, 128),
        ("cnn", {"name": "digits"}, {"name": "cnn", "channels": [64, 128]}, 128),
        # A CIFAR-10-format folder of random images written by this script (10,000 training
        # images): the compute-bound case.
        ("resnet18", {"name": "cifar10", "path": "CIFAR", "n_val": 0}, {"name": "resnet18"}, 128),
        ("wrn16-4", {"name": "cifar10", "path": "CIFAR", "n_val": 0}, {"name": "wrn", "depth": 16, "width": 4}, 128),
    ],
}
CIFAR_PER_FILE = 2000
# The small folder's images per file (5 files): 320 training images, 10 steps of 32.
SMALL_PER_FILE = 64
IDX_IMAGES = 2048


def write_idx(folder):
    """Random 28x28 images and labels in MNIST's IDX format."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in [("train", IDX_IMAGES), ("t10k", 256)]:
        px = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + px.numpy().tobytes())
        with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.numpy().tobytes())


def write_cifar(folder, per_file=None):
    """Random images in the CIFAR-10 binary format (label byte + 3072 pixel bytes)."""
    per_file = per_file or CIFAR_PER_FILE
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        n = per_file if name != "test_batch.bin" else 256
        rec = torch.randint(0, 256, (n, 3073), generator=g, dtype=torch.uint8)
        rec[:, 0] = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(rec.numpy().tobytes())
METHODS = {
    "sgd": {},
    "sam": {"step_rule": {"use": "sam.sam", "rho": 0.05}},
    "mixup": {"batch_transform": {"use": "mixup.mixup", "alpha": 1.0}},
}
LR, MOMENTUM = 0.002, 0.9


def xlab_steps_per_s(xlab, device, threads, epochs, case, method, workdir):
    name, data, model, batch = case
    exp = f"throughput-{name}-{method}"
    stage = {"task": "train", "data": data, "model": model, "epochs": epochs, "batch_size": batch,
             "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM}}
    stage.update(METHODS[method])
    path = os.path.join(workdir, f"{exp}.yaml")
    with open(path, "w") as f:
        json.dump({"name": exp, "stages": {"train": stage}}, f)  # JSON is YAML
    store = os.path.join(workdir, f"store-{time.monotonic_ns()}")
    devices = "cpu" if device == "cpu" else "cuda:0"
    subprocess.run([xlab, "--store", store, "-q", "run", path, "--devices", devices, "-j", "1",
                    "--threads", str(threads)], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run([xlab, "--store", store, "export", "-e", exp], check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        series = rec.get("metrics", {}).get("time.steps_per_s")
        if series:
            return [v for _, v in series][1:]  # the first epoch warms up
    raise SystemExit(f"no time.steps_per_s recorded for {exp}")


class Block(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(classes):
    layers = [torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU()]
    cin = 64
    for i, c in enumerate([64, 128, 256, 512]):
        layers += [Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)]
        cin = c
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, classes)]
    return torch.nn.Sequential(*layers)


class WideBlock(torch.nn.Module):
    """A pre-activation wide residual block, as xlab's `wrn` builds it."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm2d(cin)
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else torch.nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wrn(depth, k, classes):
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    layers, width = [torch.nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)], widths[0]
    for g in range(3):
        for i in range(n):
            layers.append(WideBlock(width, widths[g + 1], 2 if g > 0 and i == 0 else 1))
            width = widths[g + 1]
    layers += [torch.nn.BatchNorm2d(width), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
               torch.nn.Linear(width, classes)]
    return torch.nn.Sequential(*layers)


def build_model(data, model, dev):
    layers = []
    if model["name"] == "resnet18":
        return resnet18(data["classes"]).to(dev)
    if model["name"] == "wrn":
        return wrn(model["depth"], model["width"], data["classes"]).to(dev)
    if model["name"] == "mlp":
        width = data["dim"]
        for h in model["hidden"]:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        layers.append(torch.nn.Linear(width, data["classes"]))
    else:
        ch, hw = 1, data.get("hw", 8)
        for out in model["channels"]:
            layers += [torch.nn.Conv2d(ch, out, 3, padding=1), torch.nn.BatchNorm2d(out), torch.nn.ReLU(),
                       torch.nn.MaxPool2d(2)]
            ch, hw = out, hw // 2
        layers += [torch.nn.Flatten(), torch.nn.Linear(ch * hw * hw, 10)]
    return torch.nn.Sequential(*layers).to(dev)


def matmul_gflops(device, n):
    """fp32 matrix-multiply throughput of the device: the median of 10 products of n x n."""
    dev = torch.device(device)
    a, b = torch.rand((n, n), device=dev), torch.rand((n, n), device=dev)
    times = []
    for _ in range(12):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        c = a @ b
        float(c[0, 0])
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[2:]) / 1e9


def eager_steps_per_s(device, epochs, case, method, item_every_step):
    """The eager loop's steps/s, and the FLOPs of one of its steps."""
    name, data, model, batch = case
    dev = torch.device(device)
    torch.manual_seed(0)
    if data["name"] == "digits":
        n, shape, classes = 1000, (1, 8, 8), 10
    elif data["name"] == "idx":
        n, shape, classes = IDX_IMAGES, (1, 28, 28), 10
    elif data["name"] == "cifar10":
        n, shape, classes = 5 * data.get("per_file", CIFAR_PER_FILE), (3, 32, 32), 10
    else:
        n, shape, classes = data["n_train"], (data["dim"],), data["classes"]
        data = dict(data)
    x = torch.rand((n, *shape), device=dev)
    y = torch.randint(0, classes, (n,), device=dev)
    net = build_model({"dim": shape[0], "classes": classes, "hw": shape[-1]}, model, dev)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    params = [p for p in net.parameters()]

    def step(xb, yb):
        if method == "mixup":
            lam = float(torch.distributions.Beta(1.0, 1.0).sample())
            perm = torch.randperm(xb.shape[0], device=dev)
            xb = lam * xb + (1 - lam) * xb[perm]
            target = lam * F.one_hot(yb, classes).float() + (1 - lam) * F.one_hot(yb[perm], classes).float()
            loss = torch.sum(-target * F.log_softmax(net(xb), dim=1), dim=1).mean()
        else:
            loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if method == "sam":
            with torch.no_grad():
                norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
                scale = 0.05 / (norm + 1e-12)
                eps = [p.grad * scale for p in params]
                for p, e in zip(params, eps):
                    p.add_(e)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
        opt.step()
        return loss

    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step(x[:batch], y[:batch])
    flops = counter.get_total_flops()

    rates = []
    for epoch in range(epochs):
        order = torch.randperm(n, device=dev)
        total = torch.zeros((), device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps = 0
        for lo in range(0, n, batch):
            idx = order[lo:lo + batch]
            loss = step(x.index_select(0, idx), y.index_select(0, idx))
            if item_every_step:
                total += loss.item()
            else:
                total += loss.detach()
            steps += 1
        float(total)  # waits for the device
        if epoch > 0:
            rates.append(steps / (time.perf_counter() - t0))
    return rates, flops


def spread(values):
    """The median of repeated figures with their min-max and how many there were."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": len(values)}


def cv(rates):
    """Coefficient of variation of one run's per-epoch steps/s."""
    return statistics.pstdev(rates) / statistics.mean(rates) if len(rates) > 1 else None


def summarize(case, method, runs, flops, peak):
    """One case: each loop's median steps/s per round, their median and min-max over rounds, the
    per-round ratios to each peer, a verdict only where every round agrees, and steadiness."""
    per_round = {k: [statistics.median(r) for r in v] for k, v in runs.items()}
    ratio = {k: [x / e for x, e in zip(per_round["xlab"], per_round[k])] for k in ("eager", "item")}

    def verdict(rs):
        return "faster" if min(rs) > 1.0 else "slower" if max(rs) < 1.0 else "within noise"

    xl = statistics.median(per_round["xlab"])
    steadiness = {k: [c for c in (cv(r) for r in v) if c is not None] for k, v in runs.items()}
    return {
        "case": case[0], "method": method, "batch": case[3], "rounds": len(runs["xlab"]),
        "xlab_steps_per_s": xl, "eager_steps_per_s": statistics.median(per_round["eager"]),
        "eager_item_steps_per_s": statistics.median(per_round["item"]),
        "spread": {k: spread(v) for k, v in per_round.items()},
        "ratio_vs_eager": statistics.median(ratio["eager"]), "ratio_vs_eager_item": statistics.median(ratio["item"]),
        "ratio_spread": {k: spread(v) for k, v in ratio.items()},
        "verdict_vs_eager": verdict(ratio["eager"]), "verdict_vs_eager_item": verdict(ratio["item"]),
        "cv": {k: statistics.median(v) if v else None for k, v in steadiness.items()},
        "step_gflop": flops / 1e9, "xlab_gflops": xl * flops / 1e9, "of_matmul_peak": xl * flops / 1e9 / peak,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--cases", help="comma-separated case names (default: the device's list)")
    ap.add_argument("--cifar-per-file", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of each case")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    args = ap.parse_args()
    global CIFAR_PER_FILE
    CIFAR_PER_FILE = args.cifar_per_file
    every = {c[0]: c for cases in CASES.values() for c in cases}
    cases = [every[n] for n in args.cases.split(",")] if args.cases else CASES[args.device]
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    peak = matmul_gflops(args.device, 8192 if args.device == "cuda" else 2048)
    print(f"matmul: {peak:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as work:
        folders = {"CIFAR": lambda p: write_cifar(p), "CIFAR-SMALL": lambda p: write_cifar(p, SMALL_PER_FILE),
                   "IDX": write_idx}
        for case in cases:
            where = case[1].get("path")
            if where in folders:
                path = os.path.join(work, where.lower())
                if not os.path.exists(path):
                    folders[where](path)
                data = dict(case[1], path=path)
                if where == "CIFAR-SMALL":
                    data_eager = dict(data, per_file=SMALL_PER_FILE)
                case = (case[0], data, *case[2:])
            eager_case = case if where != "CIFAR-SMALL" else (case[0], data_eager, *case[2:])
            for method in args.methods.split(","):
                runs = {"xlab": [], "eager": [], "item": []}
                flops = None
                for _ in range(args.rounds):
                    runs["xlab"].append(xlab_steps_per_s(args.xlab, args.device, args.threads, args.epochs, case,
                                                         method, work))
                    rates, flops = eager_steps_per_s(args.device, args.epochs, eager_case, method, False)
                    runs["eager"].append(rates)
                    runs["item"].append(eager_steps_per_s(args.device, args.epochs, eager_case, method, True)[0])
                row = summarize(case, method, runs, flops, peak)
                rows.append(row)
                print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    meta = {"device": args.device, "gpu": gpu, "threads": args.threads, "epochs": args.epochs, "rounds": args.rounds,
            "matmul_gflops": peak,
            "torch": torch.__version__, "host": platform.node(), "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    with open(os.path.join(args.out, f"throughput-{args.device}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}/throughput-{args.device}.json; `bench/report.py` puts it into BENCHMARKS.md")

if __name__ == "__main__":
    main()
