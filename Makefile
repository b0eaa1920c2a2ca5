# Every target sets up .venv on its own (`make help` lists them); the `toco` console script does the work.
PY := .venv/bin/python
TOCO := .venv/bin/toco
BASE_STAMP := .venv/.installed-base  # what training and evaluation need
STAMP := .venv/.installed            # + tests, benchmarks, Ray and Optuna
# CUDA kernels compile with the toolkit here even without a GPU (torch needs CUDA_HOME set explicitly)
export CUDA_HOME ?= $(wildcard /usr/local/cuda)

.PHONY: help demo test test-fast gpu-check ui ablation pretext venv synth clean bench bench-check bench-baseline sweep submit

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 18

$(BASE_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e '.[test,ray]'
	touch $(STAMP)

venv: $(STAMP)  ## set up .venv with everything (make demo installs only what training needs)

demo: $(BASE_STAMP)  ## train ToCo on the embedded synthetic benchmark, evaluate, log to MLflow
	$(TOCO) train experiments/synthetic.yaml

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest -q tests

test-fast: $(STAMP)  ## the test suite without the slow Ray tests, for quick iterations
	$(PY) -m pytest -q -m "not slow" tests

ablation: $(STAMP)  ## baseline, +PTC, +PTC+CTC on the synthetic benchmark
	$(TOCO) ablation experiments/ablation/baseline.yaml experiments/ablation/ptc.yaml experiments/ablation/toco.yaml

# the synthetic default's backbone (experiments/pretext/synthetic.yaml): trains the pretext stage, then writes the
# encoder the default loads; commit the file to change what `make demo` starts from
PRETRAINED = experiments/pretrained/synthetic_tiny.pt
pretext: $(STAMP)  ## classification pre-training on separately generated images -> experiments/pretrained
	$(TOCO) train experiments/pretext/synthetic.yaml $(ARGS)
	$(TOCO) export-encoder runs/pretext/synthetic/last.pt $(PRETRAINED)

ui: $(BASE_STAMP)  ## MLflow UI on 127.0.0.1:5000
	.venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts --host 127.0.0.1 --port 5000

# Benchmarks (benchmarks/bench_*.py; never collected by `make test`). Baselines live per machine class in
# benchmarks/baselines/<class>/ (speed.json from pytest-benchmark, accuracy.json); see docs/evaluation.md.
MACHINE = $(shell python3 benchmarks/machine.py)
BASELINE = benchmarks/baselines/$(MACHINE)
# what bench-check compares: CPU time on a CPU machine class (other work on a shared machine stretches wall time
# 10-50x, CPU time 10-40%), wall time on a GPU machine; and how much slower (the fastest round) fails it, in %
BENCH_TIMER ?= $(if $(filter cpu-%,$(MACHINE)),time.process_time,time.perf_counter)
BENCH_TOL ?= $(if $(filter cpu-%,$(MACHINE)),50,15)
BENCH := $(PY) -m pytest benchmarks -o python_files='bench_*.py' -p no:cacheprovider -q

bench: $(STAMP)  ## measure speed and accuracy, save JSON under .benchmarks/, log every result to MLflow
	$(BENCH) --benchmark-timer=$(BENCH_TIMER) --benchmark-autosave --benchmark-storage=file://.benchmarks

bench-check: $(STAMP)  ## fail on a slowdown beyond BENCH_TOL% or an mIoU drop beyond the baseline's tolerance
	@test -f $(BASELINE)/speed.json || { echo "no baseline for machine class $(MACHINE): make bench-baseline"; exit 1; }
	$(BENCH) --benchmark-timer=$(BENCH_TIMER) --benchmark-compare=$(BASELINE)/speed.json \
		--benchmark-compare-fail=min:$(BENCH_TOL)% --benchmark-json=.benchmarks/check-$(MACHINE).json

bench-baseline: $(STAMP)  ## re-measure this machine class's baselines (then commit benchmarks/baselines/)
	mkdir -p $(BASELINE)
	TOCO_BENCH_WRITE_BASELINE=1 $(BENCH) --benchmark-timer=$(BENCH_TIMER) --benchmark-json=$(BASELINE)/speed.json

sweep: $(STAMP)  ## Ray Tune + Optuna + ASHA over loss weights and thresholds (ARGS=--resume / --restart)
	$(TOCO) sweep experiments/sweeps/synthetic.yaml $(ARGS)

# `ray job submit` to a running cluster (docs/distributed.md). Token auth (Ray 2.60's default): the token file the
# head node was started with must be readable here as ~/.ray/auth_token or $$RAY_AUTH_TOKEN_PATH.
ADDRESS ?= http://127.0.0.1:8265
SUBMIT_CONFIG ?= experiments/synthetic.yaml
WORKERS ?= 2
submit: $(STAMP)  ## train SUBMIT_CONFIG on WORKERS Ray Train workers as a job on the cluster at ADDRESS
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} .venv/bin/ray job submit --address $(ADDRESS) --working-dir . \
		--runtime-env-json '{"excludes": ["data/", ".git/", ".benchmarks/"]}' -- \
		toco train $(SUBMIT_CONFIG) --workers $(WORKERS) $(ARGS) \
		tracking.tracking_uri=sqlite:///$(CURDIR)/mlruns/mlflow.db tracking.artifact_root=$(CURDIR)/mlruns/artifacts \
		output_dir=$(CURDIR)/runs/submitted

# The GPU check (benchmarks/gpu_check.py, docs/gpu.md): on the GPU machine it runs with that image's python3 and
# packages (no .venv there: PYTHONPATH=.); here it runs its CPU part with .venv's. GPU_CHECK_OUT=$$OUT on the device.
GPU_CHECK_OUT ?= runs/gpu_check
GPU_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
gpu-check:  ## build and test the CUDA kernels, measure them, inference, the training step, 100 iterations
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONPATH=. \
		$(GPU_PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

synth: $(BASE_STAMP)  ## write the synthetic benchmark in the VOC layout to data/synthetic
	$(TOCO) data synth --out data/synthetic

clean:  ## remove runs/ (checkpoints and evaluations) and pytest's cache
	rm -rf runs .pytest_cache
