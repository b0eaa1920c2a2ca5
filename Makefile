# Every target sets up .venv on its own; the `toco` console script does the work.
PY := .venv/bin/python
TOCO := .venv/bin/toco
STAMP := .venv/.installed
# CUDA kernels compile with the toolkit here even without a GPU (torch needs CUDA_HOME set explicitly)
export CUDA_HOME ?= $(wildcard /usr/local/cuda)

.PHONY: demo test ui ablation venv synth clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ray]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)  ## train ToCo on the embedded synthetic benchmark, evaluate, log to MLflow
	$(TOCO) train experiments/synthetic.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

ablation: $(STAMP)  ## baseline, +PTC, +PTC+CTC on the synthetic benchmark
	$(TOCO) ablation experiments/ablation/baseline.yaml experiments/ablation/ptc.yaml experiments/ablation/toco.yaml

ui: $(STAMP)  ## MLflow UI on 127.0.0.1:5000
	.venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts --host 127.0.0.1 --port 5000

synth: $(STAMP)  ## write the synthetic benchmark in the VOC layout to data/synthetic
	$(TOCO) data synth --out data/synthetic

clean:
	rm -rf runs .pytest_cache
