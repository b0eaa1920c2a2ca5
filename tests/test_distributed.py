"""The training loop under Ray Train: DDP over gloo equals one process, and a killed worker costs nothing."""
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from toco.distributed.train import fit_distributed  # noqa: E402
from toco.checkpoint import load_checkpoint  # noqa: E402
from toco.engine.loop import Trainer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # the session's Ray cluster (conftest)


def _use_store(cfg, tmp_path):
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg.tracking.artifact_root = str(tmp_path / "mlruns" / "artifacts")


def test_two_gloo_workers_take_the_step_of_one_process_on_the_same_global_batch(ray_cluster, tiny_cfg, tmp_path):
    cfg = tiny_cfg
    # the terms that are means over images (cls, aux-cls), so the DDP average of the two half-batch gradients is
    # the global batch's gradient; PTC and the seg loss pool their counts over a rank's batch, and CTC's local
    # crops are drawn per rank, so those differ between 1 and 2 workers by design (as in the original's DDP)
    cfg.loss.use_ptc = cfg.loss.use_ctc = False
    cfg.train.max_iters, cfg.train.threads, cfg.optim.warmup_iters = 1, 1, 0
    cfg.output_dir = str(tmp_path / "one")
    Trainer(cfg).fit()
    cfg.output_dir = str(tmp_path / "two")
    result = fit_distributed(cfg, workers=2)
    assert result.metrics["iteration"] == 1

    one, two = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    names = list(one["model"])
    for key in names:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    # AdamW's first moment after one step is (1 - beta1) x the gradient: compare the gradients themselves
    moments = [(one["optimizer"]["state"][i]["exp_avg"], two["optimizer"]["state"][i]["exp_avg"])
               for i in one["optimizer"]["state"]]
    assert len(moments) > 10 and set(one["optimizer"]["state"]) == set(two["optimizer"]["state"])
    for single, ddp in moments:
        torch.testing.assert_close(ddp, single, rtol=1e-4, atol=1e-8)
    assert sum(float(m.abs().sum()) for m, _ in moments) > 0


class CrashingLogger:
    """Rank 0's logger that kills its worker process right after logging `step`, once (the marker file
    remembers): a worker lost between two checkpoints."""

    def __init__(self, logger, step: int, marker: str):
        self.logger, self.step, self.marker = logger, step, Path(marker)

    def log_metrics(self, metrics, step):
        self.logger.log_metrics(metrics, step)
        if step == self.step and not self.marker.exists():
            self.marker.touch()
            os._exit(1)

    def __getattr__(self, name):
        return getattr(self.logger, name)


def crashing_logger(cfg, run_id: str, step: int, marker: str) -> CrashingLogger:
    from toco.run import continue_run

    return CrashingLogger(continue_run(cfg, run_id), step, marker)


def test_a_worker_killed_mid_run_resumes_and_every_step_is_logged_once(ray_cluster, tiny_cfg, tmp_path):
    import mlflow

    from toco.tracking import MLflowLogger

    cfg = tiny_cfg
    cfg.train.log_every, cfg.train.ckpt_every, cfg.train.threads = 1, 2, 1
    cfg.output_dir = str(tmp_path / "run")
    _use_store(cfg, tmp_path)
    logger = MLflowLogger(cfg)
    # rank 0's process exits right after logging step 3, after the checkpoint of step 2: the restarted group
    # resumes from 2 and repeats step 3, which MLflow must not hold twice
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the factory runs in the worker
    make_logger = partial(crashing_logger, cfg, logger.run_id, 3, str(tmp_path / "crashed"))
    result = fit_distributed(cfg, workers=2, make_logger=make_logger, max_failures=1)
    logger.end()
    assert (tmp_path / "crashed").exists(), "the worker was not killed"
    assert result.metrics["iteration"] == cfg.train.max_iters
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == cfg.train.max_iters

    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    for key in ("train/cls", "train/ptc", "train/seg", "lr/encoder"):
        steps = [m.step for m in client.get_metric_history(logger.run_id, key)]
        if key == "train/seg":  # seg joins at iteration 2
            assert sorted(steps) == [3, 4], (key, steps)
        else:
            assert sorted(steps) == [1, 2, 3, 4], (key, steps)
    assert [m.step for m in client.get_metric_history(logger.run_id, "val/miou_seg")] == [4]
