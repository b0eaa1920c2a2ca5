"""A tracked run's life, in one place: checks before anything is opened, the MLflow run and its id file, its end
status, and summary.json. `toco train`, a sweep trial and `toco eval` all go through here; the training loop
itself only sees a Logger.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from toco.config import Config, ConfigError

RUN_ID_FILE = "mlflow_run_id"  # beside a run's checkpoints: a resumed run, its evaluations and trials find it


def read_run_id(folder: str | Path) -> str | None:
    path = Path(folder) / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


def check_before_run(cfg: Config, resume: str | Path | None = None, workers: int = 1) -> None:
    """Every mistake a config can hold, found before a run is opened or a worker started (a typo leaves no
    FAILED run behind): the datasets and their class count, the model and its weights file, a checkpoint to
    resume that does not fit, a batch that does not split over the workers."""
    import torch

    from toco.data import build_source
    from toco.engine.checkpoint import check_checkpoint_fits
    from toco.models import build_model

    for split in dict.fromkeys((cfg.data.train_split, cfg.data.val_split, cfg.train.val_split or cfg.data.val_split)):
        build_source(cfg.data, split)
    model_cfg = cfg.model
    if model_cfg.pretrained and model_cfg.pretrained_file and not Path(model_cfg.pretrained_file).is_file():
        raise ConfigError(f"model.pretrained_file {model_cfg.pretrained_file!r} does not exist")
    try:
        with torch.device("meta"):
            build_model(dataclasses.replace(model_cfg, pretrained=False), cfg.data.num_classes)
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"model.backbone {model_cfg.backbone!r} with {model_cfg.backbone_kwargs}: {err}") from None
    if resume:
        check_checkpoint_fits(cfg, resume, resumable=True)
    if cfg.train.batch_size % workers:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be a multiple of "
                          f"the {workers} workers")


def run_name(cfg: Config, label: str) -> str:
    """tracking.run_name, else '<label> <date time>' (the config's name and when it started)."""
    return cfg.tracking.run_name or f"{label} {time.strftime('%Y-%m-%d %H:%M')}"


class TrackedRun:
    """What `tracked_run` yields: the logger and, to fill in, the summary written at the end."""

    def __init__(self, logger, out_dir: Path):
        self.logger, self.out_dir, self.summary = logger, out_dir, {}

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id


@contextmanager
def tracked_run(cfg: Config, out_dir: str | Path, name: str, resume: bool = False, tags: dict | None = None,
                parent_run_id: str | None = None, log_config: bool = True) -> Iterator[TrackedRun]:
    """The MLflow run of a training, trial or evaluation (a NullLogger with tracking.enabled false): its id is
    kept in out_dir/mlflow_run_id, so `resume` continues that run; it ends FINISHED, FAILED (an error) or KILLED
    (Ctrl-C, a stopped process), and out_dir/summary.json gets `run.summary` with the run id and wall time."""
    from toco.engine.loop import NullLogger

    out_dir = Path(out_dir)
    logger = NullLogger()
    if cfg.tracking.enabled:
        from toco.tracking import MLflowLogger

        logger = MLflowLogger(cfg, run_id=read_run_id(out_dir) if resume else None, tags=tags,
                              parent_run_id=parent_run_id, run_name=name, log_config=log_config)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUN_ID_FILE).write_text(logger.run_id)
    run = TrackedRun(logger, out_dir)
    start = time.perf_counter()
    try:
        yield run
    except BaseException:
        logger.end("FAILED" if isinstance(sys.exc_info()[1], Exception) else "KILLED")
        raise
    run.summary["wall_s"] = round(time.perf_counter() - start, 1)
    if run.run_id:
        run.summary["mlflow_run_id"] = run.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(run.summary, indent=1, default=str))
    logger.end()
