# Every target sets up .venv on its own (`make help` lists them); the `toco` console script does the work.
PY := .venv/bin/python
TOCO := .venv/bin/toco
BASE_STAMP := .venv/.installed-base  # what training and evaluation need
STAMP := .venv/.installed            # + tests, benchmarks, Ray and Optuna
# CUDA kernels compile with the toolkit here even without a GPU (torch needs CUDA_HOME set explicitly)
export CUDA_HOME ?= $(wildcard /usr/local/cuda)

.PHONY: help demo test test-fast gpu-check ui ablation pretext venv synth clean bench bench-check \
	bench-check-baseline bench-baseline bench-seed-spread bench-mutants sweep submit

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
	$(TOCO) train experiments/synthetic.yaml $(ARGS)

# two test processes (pytest-xdist), one torch thread each; the Ray tests share one process and its cluster
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup --durations=20 tests

test: $(STAMP)  ## the whole test suite (CUDA tests run on a GPU machine: make gpu-check)
	$(PYTEST)

test-fast: $(STAMP)  ## the test suite without the slow Ray, sweep and compile tests, for quick iterations
	$(PYTEST) -m "not slow"

# the ablation's seeds (every row trains from each) and how many trainings run at once
SEEDS ?= 0 1 2 3 4
JOBS ?= 2
ablation: $(STAMP)  ## baseline, +PTC, +PTC+CTC from SEEDS: mean ± std per row, a paired t-test against the row above
	$(TOCO) ablation $(sort $(wildcard experiments/ablation/*.yaml)) \
		--seeds $(SEEDS) --jobs $(JOBS)

# the synthetic default's backbone (experiments/pretext/synthetic.yaml): trains the pretext stage, then writes the
# encoder the default loads; commit the file to change what `make demo` starts from
PRETRAINED = experiments/pretrained/synthetic_tiny.pt
pretext: $(STAMP)  ## classification pre-training on separately generated images -> experiments/pretrained
	$(TOCO) train experiments/pretext/synthetic.yaml $(ARGS)
	$(TOCO) export-encoder runs/pretext/synthetic/last.pt $(PRETRAINED)

ui: $(BASE_STAMP)  ## MLflow UI on 127.0.0.1:5000
	.venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts --host 127.0.0.1 --port 5000

# Benchmarks (benchmarks/, docs/benchmarks.md; never collected by `make test`). `bench` measures this tree;
# `bench-check` times it against the merge base of REF and HEAD on this machine, in one interleaved run, with a
# tolerance per case taken from the noise of that run; `bench-check-baseline` compares with the speed stored for
# this machine class (benchmarks/baselines/<class>/speed.json, `bench-baseline`) and the stored mIoU.
MACHINE = $(shell python3 benchmarks/machine.py)
BASELINE = benchmarks/baselines/$(MACHINE)
# the stored-baseline comparison's timer and tolerance (%): CPU time on a CPU class, wall time on a GPU class
BENCH_TIMER ?= $(if $(filter cpu-%,$(MACHINE)),time.process_time,time.perf_counter)
BENCH_TOL ?= $(if $(filter cpu-%,$(MACHINE)),50,15)
BENCH := $(PY) -m pytest benchmarks -o python_files='bench_*.py' -p no:cacheprovider -q
# bench-check: REF (origin/main when there is one), rounds per case, torch threads per worker, the timer the
# verdict reads (cpu | wall), the smallest slowdown that fails (FLOOR, a fraction), CASES (comma-separated
# subset), ACCURACY=1 for the accuracy gate too (the head trained from seeds 0 and 1, then 2 and 3 if that is
# inconclusive, against the ref's stored seeds), REF_PYTHON for a ref whose dependencies differ from this tree's
REF ?= $(if $(shell git rev-parse -q --verify origin/main 2>/dev/null),origin/main,main)
ROUNDS ?= 15
THREADS ?= 1
TIMER ?= cpu
FLOOR ?= 0.2
ACCURACY ?= 0
SPREAD_SEEDS ?= 5

bench: $(STAMP)  ## measure speed and accuracy, save JSON under .benchmarks/, log every result to MLflow
	$(BENCH) --benchmark-timer=$(BENCH_TIMER) --benchmark-autosave --benchmark-storage=file://.benchmarks

bench-check: $(STAMP)  ## A/B against REF, interleaved on this machine: fail on a slowdown beyond the measured noise
	$(PY) benchmarks/check.py --ref $(REF) --rounds $(ROUNDS) --threads $(THREADS) --timer $(TIMER) --floor $(FLOOR) \
		$(if $(CASES),--cases $(CASES)) $(if $(REF_PYTHON),--ref-python $(REF_PYTHON)) \
		$(if $(filter 1,$(ACCURACY)),--accuracy)

bench-check-baseline: $(STAMP)  ## fail on a slowdown beyond BENCH_TOL% against this machine class's stored speed, or an mIoU drop
	@test -f $(BASELINE)/speed.json || { echo "no baseline for machine class $(MACHINE): make bench-baseline"; exit 1; }
	$(BENCH) --benchmark-timer=$(BENCH_TIMER) --benchmark-compare=$(BASELINE)/speed.json \
		--benchmark-compare-fail=min:$(BENCH_TOL)% --benchmark-json=.benchmarks/check-$(MACHINE).json

bench-baseline: $(STAMP)  ## re-measure this machine class's speed and the stored mIoU (then commit benchmarks/baselines/)
	mkdir -p $(BASELINE)
	TOCO_BENCH_WRITE_BASELINE=1 $(BENCH) --benchmark-timer=$(BENCH_TIMER) --benchmark-json=$(BASELINE)/speed.json

bench-seed-spread: $(STAMP)  ## train the accuracy recipe from SPREAD_SEEDS seeds on 1 and 2 threads: the per-seed mIoU and noise both gates read
	$(PY) benchmarks/seed_spread.py $(SPREAD_SEEDS) --reuse runs/ablation

# the mutation matrix: MUTANTS (default: every one of benchmarks/mutants/mutants.yaml) and the unmutated tree, each
# from SEEDS, JOBS at a time; resumes from runs/mutants
bench-mutants: $(STAMP)  ## break each part of ToCo on purpose: its effect on seg, CAM and pseudo labels, and whether the gate sees it
	$(PY) benchmarks/mutants.py $(MUTANTS) --seeds $(SEEDS) --jobs $(JOBS) --reuse runs/ablation

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
# packages (no .venv there: PYTHONPATH=.); here it runs its CPU part with .venv's. GPU_CHECK_OUT: where results go.
GPU_CHECK_OUT ?= runs/gpu_check
GPU_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
gpu-check:  ## build and test the CUDA kernels, measure them, inference, the training step, 100 iterations
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONPATH=. \
		$(GPU_PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

synth: $(BASE_STAMP)  ## write the synthetic benchmark in the VOC layout to data/synthetic
	$(TOCO) data synth --out data/synthetic

clean:  ## remove runs/ (checkpoints and evaluations) and pytest's cache
	rm -rf runs .pytest_cache
