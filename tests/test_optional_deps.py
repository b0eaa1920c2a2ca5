"""Training, the kernels and the CRF need none of mlflow, ray, optuna and pydensecrf: each is imported only where
it is used (tracking, distributed training and sweeps, the pydensecrf reference CRF)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ["mlflow", "ray", "optuna", "pydensecrf"]
MODULES = ["toco", "toco.config", "toco.data", "toco.models", "toco.engine.step", "toco.engine.loop",
           "toco.evaluation", "toco.crf", "toco.filters", "toco.kernels", "toco.par", "toco.pseudo", "toco.losses",
           "toco.metrics", "toco.viz", "toco.run", "toco.tracking", "toco.checkpoint", "toco.cli"]
SMALL = TINY_RUN + ["data.synth_train=8", "data.synth_val=2", "loss.seg_start=1", "train.eval_every=2",
                    "train.log_every=1", "optim.warmup_iters=1", "tracking.enabled=false"]

# Runs in a fresh interpreter where `import <optional package>` raises ImportError, as where it is not installed.
SCRIPT = """
import json, sys
args = json.loads(sys.argv[1])
for name in args["blocked"]:
    sys.modules[name] = None
import importlib
for module in args["modules"]:
    importlib.import_module(module)

import numpy as np
import torch
from toco import crf
from toco.cli import main
from toco.config import load_config
from toco.engine.loop import build_loaders
from toco.engine.step import train_step
from toco.models import build_model
from toco.par import PAR

cfg = load_config("experiments/synthetic.yaml", args["overrides"] + ["train.device=cpu"])
torch.manual_seed(0)
model = build_model(cfg.model, cfg.data.num_classes)
batch = next(iter(build_loaders(cfg)[0]))
step = train_step(model, PAR(cfg.pseudo.par_dilations, cfg.pseudo.par_iters), batch, cfg, iteration=1)
step.total.backward()
print("step losses:", sorted(step.losses), "finite:", bool(torch.isfinite(step.total)))

rng = np.random.default_rng(0)
image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
probs = rng.dirichlet(np.ones(4), (24, 32)).transpose(2, 0, 1).astype(np.float32)
print("crf labels:", crf.dense_crf(image, probs, backend="cpu").shape)

main(["train", "experiments/synthetic.yaml", *args["overrides"], "train.device=cpu", "train.max_iters=2",
      "output_dir=" + args["out"]])
"""


def test_training_kernels_and_crf_run_without_the_optional_packages(tmp_path):
    args = dict(blocked=OPTIONAL, modules=MODULES, overrides=SMALL, out=str(tmp_path / "run"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)  # the timeout leaves room to compile the CPU kernel
    assert done.returncode == 0, done.stderr[-4000:]
    assert "step losses: ['aux_cls', 'cls', 'ctc', 'ptc', 'reg', 'seg'] finite: True" in done.stdout
    assert "crf labels: (24, 32)" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and "mlflow_run_id" not in summary
    assert (tmp_path / "run" / "last.pt").exists()
