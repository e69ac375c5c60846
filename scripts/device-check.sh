#!/usr/bin/env bash
# xlab on a CUDA machine: runs from the repository root of a machine that has a CUDA build of
# torch 2.11 in its `python3` and the binaries `make device-bundle` put in .device/bin. Writes what
# it saw under $OUT (default device-out/). DEVICE=cpu runs the same steps without a GPU, to check
# the script itself. STEPS="sweep resume images precision throughput" (default: all five) picks
# steps 2–6; `images` trains ResNet-18 and a WideResNet with crop-and-flip augmentation and SAM on
# a CIFAR-10-format folder of random images, stopped with Ctrl-C (SIGINT) and resumed;
# `precision` trains the digits CNN in fp32, bf16 and fp16 (CUDA autocast, dynamic loss scale),
# and with Co-Mixup (its saliency pass and graph cuts on that device).
#
#   1. `xlab doctor`: libtorch, CUDA, the GPUs nvidia-smi reports;
#   2. experiments/components.yaml on cuda (4 jobs sharing the GPU) and on CPU slots, exported
#      for a side-by-side comparison;
#   3. a sweep killed mid-run and run again, which must resume from its checkpoints on cuda;
#   4. bench/throughput.py --device cuda: xlab's training steps/s against a PyTorch eager loop.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
BIN=$PWD/.device/bin
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XLAB_WORKER=$BIN/xlab-worker
XLAB=$BIN/xlab
# The digits ship with scikit-learn; the worker looks beside torch, else here.
DIGITS=$(python3 -c 'import os, sklearn; print(os.path.join(os.path.dirname(sklearn.__file__), "datasets/data/digits.csv.gz"))' 2>/dev/null)
[ -f "$DIGITS" ] && export XLAB_DIGITS=$DIGITS
WORK=$(mktemp -d)
DEVICE=${DEVICE:-cuda:0}
if [ "$DEVICE" = cpu ]; then SHARE="-j 4"; BENCH=cpu; else SHARE="--jobs-per-device 4"; BENCH=cuda; fi
TIMEFORMAT="wall %R s"
want() { [[ " ${STEPS:-sweep resume images precision throughput} " == *" $1 "* ]]; }
step() { echo; echo "=== $* ($(date -u +%T))"; }

step "machine"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
python3 -c 'import torch; print("python torch", torch.__version__, "cuda", torch.version.cuda)'
step "xlab doctor"
$XLAB --store "$WORK/store-cuda" doctor | tee "$OUT/doctor.txt"

if want sweep; then
step "components.yaml on $DEVICE, 4 jobs at a time"
( while sleep 2; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null; done ) &
SAMPLER=$!
time $XLAB --store "$WORK/store-cuda" run experiments/components.yaml \
  --devices "$DEVICE" $SHARE
kill $SAMPLER 2>/dev/null
$XLAB --store "$WORK/store-cuda" export -e components -o "$OUT/components-cuda.jsonl"
grep -o '"device":"[^"]*"' "$OUT/components-cuda.jsonl" | sort | uniq -c

step "components.yaml on 8 CPU slots"
time $XLAB --store "$WORK/store-cpu" run experiments/components.yaml --devices cpu -j 8
$XLAB --store "$WORK/store-cpu" export -e components -o "$OUT/components-cpu.jsonl"

step "cuda vs cpu: test.acc per job"
python3 - "$OUT/components-cuda.jsonl" "$OUT/components-cpu.jsonl" <<'PY'
import json, sys
def final(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("type") == "job":
            m = r["metrics"]
            key = "test.acc" if "test.acc" in m else next((k for k in sorted(m) if k.startswith("sample.")), None)
            if key:
                out[r["job"]["id"]] = (r["job"].get("stage"), key, m[key][-1][1])
    return out
a, b = final(sys.argv[1]), final(sys.argv[2])
for j in sorted(a):
    s, k, va = a[j]
    vb = b.get(j, (None, None, float("nan")))[2]
    print(f"{j} {s:10} {k:24} cuda {va:.6f} cpu {vb:.6f} diff {va - vb:+.2e}")
PY

fi

if want resume; then
step "a sweep killed after 6 s resumes on $DEVICE"
timeout -s KILL 6 $XLAB --store "$WORK/store-resume" run experiments/sam-family.yaml --devices "$DEVICE" $SHARE
echo "killed (exit $?)"
$XLAB --store "$WORK/store-resume" plan experiments/sam-family.yaml | head -3
time $XLAB --store "$WORK/store-resume" run experiments/sam-family.yaml \
  --devices "$DEVICE" $SHARE 2>&1 | grep -E 'resumed|done,|FAILED|wall' | head -40
$XLAB --store "$WORK/store-resume" export -e sam-family -o "$OUT/sam-family-cuda.jsonl"

fi

if want images; then
step "ResNet-18 and WRN-16-4 with augmentation and SAM on $DEVICE, stopped and resumed"
python3 - "$WORK/cifar" <<'PY'
import os, sys, numpy as np
d = sys.argv[1]; os.makedirs(d, exist_ok=True); rng = np.random.default_rng(0)
for name, n in [(f"data_batch_{i}.bin", 1000) for i in range(1, 6)] + [("test_batch.bin", 500)]:
    rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8); rec[:, 0] = rng.integers(0, 10, n)
    rec.tofile(os.path.join(d, name))
PY
cat > "$WORK/images.yaml" <<YAML
name: images
defaults:
  task: train
  data: {name: cifar10, path: $WORK/cifar, n_val: 500}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}
  schedule: {name: cosine}
  augment: {crop: 4, flip: true}
  epochs: 6
  batch_size: 128
stages:
  train:
    variants:
      - model: {name: resnet18}
      - model: {name: wrn, depth: 16, width: 4}
      - model: {name: resnet18}
        step_rule: {use: sam.sam, rho: 0.05}
YAML
$XLAB --store "$WORK/store-images" run "$WORK/images.yaml" --devices "$DEVICE" $SHARE > /dev/null 2>&1 &
RUN=$!
for i in $(seq 1 120); do ls "$WORK"/store-images/runs/*/ckpt-000002.json > /dev/null 2>&1 && break; sleep 0.5; done
kill -INT $RUN; wait $RUN; echo "stopped with exit $?"
$XLAB --store "$WORK/store-images" status
time $XLAB --store "$WORK/store-images" run "$WORK/images.yaml" --devices "$DEVICE" $SHARE 2>&1 | grep -E 'resumed|done,|FAILED'
$XLAB --store "$WORK/store-images" query -e images -m test.acc,train.examples,time.steps_per_s,train.lr
fi

if want precision; then
step "fp32, bf16, fp16 and Co-Mixup on the digits on $DEVICE"
cat > "$WORK/precision.yaml" <<YAML
name: precision
defaults:
  task: train
  data: {name: digits}
  model: {name: cnn, channels: [16, 32], norm: batch}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  epochs: 5
  batch_size: 64
stages:
  train:
    variants:
      - {}
      - precision: bf16
      - precision: fp16
      - precision: fp16
        loss_scale: {init: 16777216, growth_interval: 20}
      - batch_transform: {use: mixup.comixup, omega: 0}
      - batch_transform: {use: mixup.comixup, omega: 0}
        precision: fp16
YAML
time $XLAB --store "$WORK/store-precision" run "$WORK/precision.yaml" --devices "$DEVICE" $SHARE 2>&1 | grep -E 'done,|FAILED'
$XLAB --store "$WORK/store-precision" query -e precision \
  -m test.acc,amp.loss_scale,amp.skipped,cost.passes_per_step,time.steps_per_s
$XLAB --store "$WORK/store-precision" export -e precision -o "$OUT/precision.jsonl"
fi

if want throughput; then
step "training throughput, xlab vs PyTorch eager on $BENCH"
python3 bench/throughput.py --xlab "$XLAB" --device $BENCH --threads ${BENCH_THREADS:-4} --epochs 4 --out "$OUT" ${BENCH_CASES:+--cases $BENCH_CASES}
fi
step "done"
