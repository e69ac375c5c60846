"""The image-folder loader (`data: {name: image_folder}`), alone and feeding training.

A folder of 4,000 training and 500 test images in 10 classes (36 to 72 pixels a side, half JPEG
and half PNG, written here with PIL) is read at 32x32:

1. The loader alone: xlab's decoding, conversion and resizing of the training images
   (`cargo bench -p xlab-worker --bench loader`, 1 and 2 threads, the median of 3 passes)
   against PIL in this process (`Image.open(f).convert("RGB").resize((32, 32), BILINEAR)`,
   what torchvision's `ImageFolder` with `Resize` does in each DataLoader worker).
2. Training fed by it: one xlab CNN job with the folder decoded into memory before training, and
   the same job with `stream: true` (each batch decoded ahead of its step); `time.steps_per_s`
   (the training pass), the median of the epochs after the first. The same for PyTorch: the same
   CNN from tensors in memory, and from a `DataLoader` with one worker over the files. Rounds
   are interleaved (xlab in memory, xlab streamed, PyTorch in memory, PyTorch from files), and
   each figure is the median over rounds with its min-max.

    python bench/image_folder.py --xlab target/release/xlab --out bench/results
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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from throughput import spread

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE, BATCH = 10, 400, 50, 32, 64


def write_folder(root):
    rng = np.random.default_rng(0)
    files = []
    for split, per in [("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)]:
        for k in range(CLASSES):
            d = os.path.join(root, split, f"c{k}")
            os.makedirs(d)
            for i in range(per):
                h, w = (int(v) for v in rng.integers(36, 73, 2))
                px = rng.integers(0, 160, (h, w, 3))
                px[:, :, k % 3] += 40 + 8 * k
                im = Image.fromarray(px.clip(0, 255).astype(np.uint8), "RGB")
                path = os.path.join(d, f"{i:04d}." + ("jpg" if i % 2 else "png"))
                im.save(path, **({"quality": 90} if path.endswith("jpg") else {}))
                if split == "train":
                    files.append(path)
    return files


def loader_alone(files, work):
    listing = os.path.join(work, "files.txt")
    with open(listing, "w") as f:
        f.write("\n".join(files) + "\n")
    out = os.path.join(work, "loader.json")
    env = dict(os.environ, XLAB_BENCH_FOLDER=listing, XLAB_BENCH_SIZE=f"{SIZE}x{SIZE}", XLAB_BENCH_JSON=out)
    subprocess.run([os.environ.get("CARGO", "cargo"), "bench", "-q", "-p", "xlab-worker", "--bench", "loader"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    with open(out) as f:
        xlab = json.load(f)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for p in files:
            np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
        times.append(time.perf_counter() - t0)
    pil = len(files) / statistics.median(times)
    return {"xlab_images_per_s": {str(r["threads"]): r["images_per_s"] for r in xlab}, "pil_images_per_s": pil}


def xlab_run(xlab, root, stream, epochs, work, tag):
    data = {"name": "image_folder", "path": root, "size": [SIZE, SIZE], "stream": stream}
    exp = f"folder-{tag}"
    stage = {"task": "train", "data": data, "model": {"name": "cnn", "channels": [16, 32]}, "epochs": epochs,
             "batch_size": BATCH, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}
    path = os.path.join(work, f"{exp}.yaml")
    with open(path, "w") as f:
        json.dump({"name": exp, "stages": {"train": stage}}, f)
    store = os.path.join(work, f"store-{tag}")
    subprocess.run([xlab, "--store", store, "-q", "run", path, "-j", "1", "--threads", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    out = subprocess.run([xlab, "--store", store, "export", "-e", exp], check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        series = json.loads(line).get("metrics", {}).get("time.steps_per_s")
        if series:
            return statistics.median([v for _, v in series][1:])
    raise SystemExit(f"no time.steps_per_s for {exp}")


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (SIZE // 4) ** 2, CLASSES))


class Files(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        p = self.files[i]
        a = np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
        x = torch.from_numpy(a.transpose(2, 0, 1).copy()).float() / 255.0
        return x, int(os.path.basename(os.path.dirname(p))[1:])


def torch_run(files, from_files, epochs):
    torch.manual_seed(0)
    net = cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    data = Files(files)
    if from_files:
        batches = lambda: torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=1,
                                                      persistent_workers=False)
    else:
        xs = torch.stack([data[i][0] for i in range(len(data))])
        ys = torch.tensor([data[i][1] for i in range(len(data))])

        def batches():
            order = torch.randperm(len(ys))
            for lo in range(0, len(ys), BATCH):
                idx = order[lo:lo + BATCH]
                yield xs.index_select(0, idx), ys.index_select(0, idx)
    rates = []
    for epoch in range(epochs):
        t0, steps, total = time.perf_counter(), 0, torch.zeros(())
        for xb, yb in batches():
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        float(total)
        if epoch > 0:
            rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlab", default="target/release/xlab")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        root = os.path.join(work, "folder")
        files = write_folder(root)
        loader = loader_alone(files, work)
        print(json.dumps(loader), flush=True)
        runs = {"xlab_memory": [], "xlab_stream": [], "torch_memory": [], "torch_files": []}
        for r in range(args.rounds):
            runs["xlab_memory"].append(xlab_run(args.xlab, root, False, args.epochs, work, f"m{r}"))
            runs["xlab_stream"].append(xlab_run(args.xlab, root, True, args.epochs, work, f"s{r}"))
            runs["torch_memory"].append(torch_run(files, False, args.epochs))
            runs["torch_files"].append(torch_run(files, True, args.epochs))
            print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    ratios = {
        "xlab_stream_over_memory": [s / m for s, m in zip(runs["xlab_stream"], runs["xlab_memory"])],
        "torch_files_over_memory": [s / m for s, m in zip(runs["torch_files"], runs["torch_memory"])],
        "xlab_stream_over_torch_files": [s / m for s, m in zip(runs["xlab_stream"], runs["torch_files"])],
    }
    result = {
        "meta": {"images": len(files), "size": SIZE, "batch": BATCH, "epochs": args.epochs, "threads": 1,
                 "torch": torch.__version__, "host": platform.node(), "cpu_count": os.cpu_count(),
                 "date": time.strftime("%Y-%m-%d"),
                 "command": " ".join([os.path.basename(sys.executable)] + sys.argv)},
        "loader": loader,
        "steps_per_s": {k: spread(v) for k, v in runs.items()},
        "ratios": {k: spread(v) for k, v in ratios.items()},
    }
    with open(os.path.join(args.out, "image-folder.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
