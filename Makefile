# xlab: the two commands a new user needs are `make demo` and `make test`.
# Everything here installs what is missing, so both work on a fresh clone.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TORCH_VERSION := 2.11.0
CARGO ?= cargo
RELEASE := --release

.PHONY: setup build demo test lint bench fuzz fmt clean device-bundle slurm-packages browser-packages

# A project-local virtualenv with torch from PyPI; `.venv/torch` points at the installed torch
# package, which holds libtorch (lib/, include/) for tch to build and link against.
# scikit-learn brings the handwritten digits (`data: {name: digits}`) as a file in its package,
# read offline by the worker; diffusers is the reference the sampler tests compare against, and
# gco-wrapper (gco-v3.0's graph cuts, which Co-Mixup's reference code calls) the one the
# Co-Mixup tests compare against; Optuna the one xlab's TPE is checked against. pandas, pyarrow
# and polars read xlab's Parquet and Arrow tables in the tests (and the xlab_results package),
# TensorBoard's event reader its event files; scipy checks its statistics; setuptools (as torch
# allows) builds the pure-Python xlab_results package without fetching anything.
SKLEARN_VERSION := 1.7.2
DIFFUSERS_VERSION := 0.35.2
GCO_VERSION := 3.0.9
OPTUNA_VERSION := 5.1.0
INTEROP_DEPS := pandas==3.1.1 pyarrow==26.0.1 polars==2.1.0 tensorboard==2.21.0 scipy==1.17.1 setuptools==80.9.0
PY_DEPS := $(VENV)/.deps-sklearn-$(SKLEARN_VERSION)-diffusers-$(DIFFUSERS_VERSION)-gco-$(GCO_VERSION)-optuna-$(OPTUNA_VERSION)-interop-2

setup: $(VENV)/torch/lib/libtorch_cpu.so $(PY_DEPS)

$(PY_DEPS): $(VENV)/torch/lib/libtorch_cpu.so
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q \
	  scikit-learn==$(SKLEARN_VERSION) diffusers==$(DIFFUSERS_VERSION) gco-wrapper==$(GCO_VERSION) \
	  optuna==$(OPTUNA_VERSION) $(INTEROP_DEPS)
	@touch $@

$(VENV)/torch/lib/libtorch_cpu.so:
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q torch==$(TORCH_VERSION)
	ln -sfn "$$($(VENV)/bin/python -c 'import os, torch; print(os.path.relpath(os.path.dirname(torch.__file__), "$(VENV)"))')" $(VENV)/torch
	@test -f $@ && echo "libtorch $(TORCH_VERSION) ready in $(VENV)/torch"

build: setup
	$(CARGO) build $(RELEASE) --workspace

demo: build
	./target/release/xlab run experiments/quickstart.yaml

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(RELEASE) --workspace --all-targets -- -D warnings

# The Slurm executor's tests start a single-node cluster from Debian's packages (munged,
# slurmctld, slurmd): installed here when this runs as root with apt. Elsewhere those tests say
# why they skip.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge slurmdbd mariadb-server
slurm-packages:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
	    && command -v munged >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(SLURM_PACKAGES) for the Slurm executor's tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES) >/dev/null \
	    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES) >/dev/null; } \
	    || echo "could not install Slurm: the Slurm executor's tests will be skipped"; \
	else \
	  echo "Slurm is not installed and this is not root with apt: the Slurm executor's tests will be skipped"; \
	fi

# The dashboard's browser test drives Debian's headless Chromium over WebDriver: installed here
# when this runs as root with apt. Elsewhere that test says why it skips.
BROWSER_PACKAGES := chromium chromium-driver
browser-packages:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(BROWSER_PACKAGES) for the dashboard's browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null \
	    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null; } \
	    || echo "could not install Chromium: the dashboard's browser test will be skipped"; \
	else \
	  echo "Chromium is not installed and this is not root with apt: the dashboard's browser test will be skipped"; \
	fi

# Tests that could not use a real component here (Slurm, Chromium) leave a note in
# target/tmp/skipped/; the run ends by listing them, so a skip is never silent.
test: build lint slurm-packages browser-packages
	@rm -rf target/tmp/skipped; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run $(RELEASE) --workspace --no-fail-fast; \
	else \
	  $(CARGO) test $(RELEASE) --workspace --no-fail-fast; \
	fi; status=$$?; \
	if [ -n "$$(ls -A target/tmp/skipped 2>/dev/null)" ]; then \
	  echo "SKIPPED $$(ls target/tmp/skipped | wc -l) test(s) that need what this machine lacks:"; \
	  for f in target/tmp/skipped/*; do echo "  $$(basename $$f): $$(cat $$f)"; done; \
	else \
	  echo "no test skipped: Slurm's and the browser's tests ran against the real programs"; \
	fi; exit $$status

# Benchmarks (never timed assertions in tests): training throughput, the image-folder loader and
# DDIM sampling against PyTorch loops, the peak memory of a 50,000-sample job, scheduler overhead with no-op jobs,
# store ingestion against SQLite and resume detection, a soak of the store (10^7 points with concurrent readers), query speed, Co-Mixup's
# mixing cost against its reference algorithm. Each writes bench/results/*.json; bench/report.py
# then writes BENCHMARKS.md from bench/BENCHMARKS.in.md and those files.
bench: build browser-packages
	$(VENV)/bin/python bench/throughput.py --xlab target/release/xlab --device cpu --epochs 6 --out bench/results
	CARGO="$(CARGO)" $(VENV)/bin/python bench/image_folder.py --xlab target/release/xlab --out bench/results
	$(VENV)/bin/python bench/sampling.py --xlab target/release/xlab --device cpu --out bench/results
	$(VENV)/bin/python bench/sample_memory.py --xlab target/release/xlab --out bench/results
	$(VENV)/bin/python bench/diffusion_guidance.py --xlab target/release/xlab
	$(VENV)/bin/python bench/scheduler.py --xlab target/release/xlab --out bench/results
	CARGO="$(CARGO)" $(VENV)/bin/python bench/store.py --xlab target/release/xlab --out bench/results
	CARGO="$(CARGO)" $(VENV)/bin/python bench/soak.py --out bench/results
	$(VENV)/bin/python bench/query.py --xlab target/release/xlab --out bench/results
	$(VENV)/bin/python bench/interop.py --xlab target/release/xlab --out bench/results
	$(VENV)/bin/python bench/dashboard.py --xlab target/release/xlab --out bench/results
	$(VENV)/bin/python bench/live.py --xlab target/release/xlab --out bench/results
	CARGO="$(CARGO)" $(VENV)/bin/python bench/comixup.py --out bench/results
	CARGO="$(CARGO)" $(VENV)/bin/python bench/search.py --xlab target/release/xlab --out bench/results
	$(VENV)/bin/python bench/report.py

# Fuzzing (see runner/fuzz): each parser target (experiment files, query filters, worker event
# lines, NPZ, CSV, IDX) for FUZZ_INPUTS inputs from its corpus in fuzz/corpus/, which keeps the
# inputs that reached new outcomes; a panic fails and leaves its input in fuzz/crashes/.
# `make fuzz FUZZ_SECONDS=600` runs each target for that long instead.
FUZZ_INPUTS ?= 1000000
FUZZ_SECONDS ?=
fuzz: setup
	CARGO="$(CARGO)" $(VENV)/bin/python bench/fuzz.py --inputs $(FUZZ_INPUTS) $(if $(FUZZ_SECONDS),--seconds $(FUZZ_SECONDS)) \
	  --out bench/results
	$(VENV)/bin/python bench/report.py

# The binaries and plugins scripts/device-check.sh runs on a CUDA machine (against that machine's
# own torch 2.11; they carry no libtorch).
device-bundle: build
	rm -rf .device && mkdir -p .device/bin
	cp target/release/xlab target/release/xlab-worker target/release/libxlab_plugin_*.so .device/bin/

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
