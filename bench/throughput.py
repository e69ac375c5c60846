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
    ],
}
CIFAR_PER_FILE = 2000


def write_cifar(folder):
    """Random images in the CIFAR-10 binary format (label byte + 3072 pixel bytes)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        n = CIFAR_PER_FILE if name != "test_batch.bin" else 256
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
    store = os.path.join(workdir, "store")
    devices = "cpu" if device == "cpu" else "cuda:0"
    subprocess.run([xlab, "--store", store, "-q", "run", path, "--devices", devices, "-j", "1",
                    "--threads", str(threads)], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run([xlab, "--store", store, "export", "-e", exp], check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        series = rec.get("metrics", {}).get("time.steps_per_s")
        if series:
            values = [v for _, v in series][1:]  # the first epoch warms up
            return statistics.median(values)
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


def build_model(data, model, dev):
    layers = []
    if model["name"] == "resnet18":
        return resnet18(data["classes"]).to(dev)
    if model["name"] == "mlp":
        width = data["dim"]
        for h in model["hidden"]:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        layers.append(torch.nn.Linear(width, data["classes"]))
    else:
        ch, hw = 1, 8
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
    elif data["name"] == "cifar10":
        n, shape, classes = 5 * CIFAR_PER_FILE, (3, 32, 32), 10
    else:
        n, shape, classes = data["n_train"], (data["dim"],), data["classes"]
        data = dict(data)
    x = torch.rand((n, *shape), device=dev)
    y = torch.randint(0, classes, (n,), device=dev)
    net = build_model({"dim": shape[0], "classes": classes}, model, dev)
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
    return statistics.median(rates), flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--cases", help="comma-separated case names (default: the device's list)")
    ap.add_argument("--cifar-per-file", type=int, default=2000)
    args = ap.parse_args()
    global CIFAR_PER_FILE
    CIFAR_PER_FILE = args.cifar_per_file
    every = {c[0]: c for cases in CASES.values() for c in cases}
    cases = [every[n] for n in args.cases.split(",")] if args.cases else CASES[args.device]
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    peak = matmul_gflops(args.device, 8192 if args.device == "cuda" else 2048)
    print(f"matmul: {peak:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for case in cases:
            if case[1].get("path") == "CIFAR":
                write_cifar(os.path.join(work, "cifar"))
                case = (case[0], dict(case[1], path=os.path.join(work, "cifar")), *case[2:])
            for method in METHODS:
                xl = xlab_steps_per_s(args.xlab, args.device, args.threads, args.epochs, case, method, work)
                eager, flops = eager_steps_per_s(args.device, args.epochs, case, method, False)
                item, _ = eager_steps_per_s(args.device, args.epochs, case, method, True)
                row = {"case": case[0], "method": method, "batch": case[3], "xlab_steps_per_s": xl,
                       "eager_steps_per_s": eager, "eager_item_steps_per_s": item,
                       "ratio_vs_eager": xl / eager, "ratio_vs_eager_item": xl / item,
                       "step_gflop": flops / 1e9, "xlab_gflops": xl * flops / 1e9,
                       "of_matmul_peak": xl * flops / 1e9 / peak}
                rows.append(row)
                print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    meta = {"device": args.device, "gpu": gpu, "threads": args.threads, "epochs": args.epochs,
            "matmul_gflops": peak,
            "torch": torch.__version__, "host": platform.node(), "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    with open(os.path.join(args.out, f"throughput-{args.device}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}/throughput-{args.device}.json; `bench/report.py` puts it into BENCHMARKS.md")

if __name__ == "__main__":
    main()
