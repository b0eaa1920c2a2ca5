"""A tracked run's life, in one place: checks before anything is opened, the MLflow run and its id file, its end
status, and summary.json. `toco train` (in this process or on Ray Train workers, whose rank 0 continues the
driver's run), a sweep, its trials, an ablation and `toco eval` all go through here; the training loop itself only
sees a Logger.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from functools import partial
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
    from toco.checkpoint import check_checkpoint_fits
    from toco.models import build_model

    for split in dict.fromkeys((cfg.data.train_split, cfg.data.val_split, cfg.validation_split)):
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


class RunInterrupted(Exception):
    """Work that stopped early on purpose (Ctrl-C inside a sweep): its run ends KILLED, not FAILED."""


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
    from toco.runtime import NullLogger

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
        error = sys.exc_info()[1]
        logger.end("FAILED" if isinstance(error, Exception) and not isinstance(error, RunInterrupted) else "KILLED")
        raise
    run.summary["wall_s"] = round(time.perf_counter() - start, 1)
    if run.run_id:
        run.summary["mlflow_run_id"] = run.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(run.summary, indent=1, default=str))
    logger.end()


def continue_run(cfg: Config, run_id: str):
    """The logger of a run another process opened (a Ray Train worker's rank 0 logs into the driver's run)."""
    from toco.tracking import MLflowLogger

    return MLflowLogger(cfg, run_id=run_id)


def run_training(cfg: Config, label: str | None = None, resume: str | None = None, workers: int = 1,
                 gpus_per_worker: float = 0.0, address: str | None = None) -> dict:
    """Train `cfg` in a tracked run named after `label` (the config's name; default: the experiment's); with
    workers > 1 as DDP workers under Ray Train (toco.distributed.train). Returns the run's summary."""
    label = label or cfg.tracking.experiment
    check_before_run(cfg, resume, workers)
    split = cfg.validation_split
    final = cfg.train.last_val_limit
    limits = f", first {cfg.train.val_limit}" if cfg.train.val_limit else ""
    if final != cfg.train.val_limit:
        limits += f"; the last validation {f'the first {final}' if final else 'all of it'}"
    subset = split.endswith("_part") or final > 0  # the final val/ numbers on part of a split
    tags = {"validation": split + limits + (" (a subset)" if subset else "")}
    with tracked_run(cfg, cfg.output_dir, run_name(cfg, label), resume=bool(resume), tags=tags) as run:
        if workers > 1:
            from toco.distributed.train import train_on_ray

            make_logger = partial(continue_run, cfg, run.run_id) if run.run_id else None
            outcome = train_on_ray(cfg, workers, gpus_per_worker, address, resume, make_logger)
        else:
            from toco.engine.loop import Trainer

            outcome = Trainer(cfg, run.logger, resume).fit()
        run.summary.update(outcome.metrics, iterations=outcome.iteration, best_miou_seg=outcome.best_miou,
                           output_dir=str(outcome.output_dir))
    return run.summary


def reference_scores(cfg: Config) -> dict[str, float] | None:
    """What trivial predictions score on the validation images (the synthetic benchmark), or None."""
    if cfg.data.name != "synthetic":
        return None
    from toco.data import build_source
    from toco.data.synthetic import trivial_baselines

    # on the images the last validation scored
    return trivial_baselines(build_source(cfg.data, cfg.data.val_split), cfg.train.last_val_limit)


def _shard_scorer(workers: int, gpus_per_worker: float, address: str | None):
    """In this process (Ray never imported) for one worker, else on Ray Data actors."""
    if workers <= 1:
        from toco.evaluation import runner

        return runner.score_in_process
    from toco.distributed.evaluate import ray_shard_scorer

    return ray_shard_scorer(workers, gpus_per_worker, address)


def evaluate_checkpoint(cfg: Config, checkpoint: str, split: str, settings, out_dir: str | Path, pseudo_split=None,
                        limit: int = 0, save_pred: bool = False, save_probs: bool = False, shard_size: int = 32,
                        workers: int = 1, gpus_per_worker: float = 0.0, address: str | None = None,
                        resume: bool = False) -> tuple[list, str | None]:
    """`toco eval`: score a checkpoint on `split` (and its pseudo labels on `pseudo_split`), write each result
    folder, and log one MLflow run nested under the training that made the checkpoint. Returns ([(job, folder,
    outcome, summary)], the run id)."""
    import dataclasses

    from toco.checkpoint import check_checkpoint_fits
    from toco.evaluation import PSEUDO_LABELS, EvalJob, run_evaluation, write_results

    out_dir = Path(out_dir)
    check_checkpoint_fits(cfg, checkpoint)
    jobs = [EvalJob(cfg, checkpoint, split, ("seg",), settings, str(out_dir), name=split, limit=limit,
                    save_pred=save_pred, save_probs=save_probs, shard_size=shard_size)]
    if pseudo_split:
        jobs.append(EvalJob(cfg, checkpoint, pseudo_split, PSEUDO_LABELS, settings, str(out_dir),
                            name=f"pseudo_{pseudo_split}", limit=limit, shard_size=shard_size))
    for job in jobs:
        job.source()  # every split exists and fits the config before the first image is scored
    score_shards = _shard_scorer(workers, gpus_per_worker, address)
    results = []
    for job in jobs:
        outcome = run_evaluation(job, resume, desc=job.name, score_shards=score_shards)
        folder = out_dir if job is jobs[0] else out_dir / job.name
        info = dict(split=job.split, subset=outcome.subset, checkpoint=str(Path(checkpoint).resolve()),
                    dataset=cfg.data.name, backbone=cfg.model.backbone, test_time=dataclasses.asdict(settings),
                    workers=workers, images_per_s=round(outcome.images_per_s, 3),
                    worker_peak_rss_mib=round(outcome.worker_peak_rss_mib, 1))
        if save_probs:
            info["probs_bytes_per_image"] = round(outcome.probs_bytes / max(outcome.scores.images, 1))
        results.append((job, folder, outcome, write_results(folder, outcome.scores, outcome.samples,
                                                            outcome.class_names, info)))
    run_id = _log_evaluation(cfg, checkpoint, out_dir, results) if cfg.tracking.enabled else None
    return results, run_id


def _log_evaluation(cfg: Config, checkpoint: str, out_dir: Path, results) -> str:
    """One MLflow run per evaluation, nested under the training run that made the checkpoint."""
    job, folder, outcome, summary = results[0]
    name = f"eval {job.split} {job.settings.name}" + (" [subset]" if outcome.subset else "")
    prefix = "eval_subset/" if outcome.subset else "eval/"
    tags = {"kind": "evaluation", "checkpoint": summary["checkpoint"], "split": job.split,
            "subset": outcome.subset or "no"}
    with tracked_run(cfg, out_dir, name, tags=tags, parent_run_id=read_run_id(Path(checkpoint).parent),
                     log_config=False) as run:
        run.logger.log_params(dict(split=job.split, images=outcome.scores.images, workers=summary["workers"],
                                   **summary["test_time"]))
        for job, folder, outcome, summary in results:
            scope = prefix if job.metrics == ("seg",) else f"pseudo_{job.split}/"
            metrics = dict(summary["metrics"], images_per_s=summary["images_per_s"])
            run.logger.log_evaluation(folder, metrics, summary["per_class_iou"], 0, scope,
                                      artifact_path=None if folder == out_dir else folder.name)
        run.summary = results[0][3]
    return run.run_id


def predict_files(cfg: Config, checkpoint: str, paths: list[str], settings, out_dir: str | Path,
                  shard_size: int = 32, workers: int = 1, gpus_per_worker: float = 0.0, address: str | None = None,
                  resume: bool = False):
    """`toco predict`: segment image files into palette PNGs and overlays in out_dir, with class_shares.json;
    unreadable files are skipped (outcome.skipped names them)."""
    from toco.checkpoint import check_checkpoint_fits
    from toco.data import class_names
    from toco.evaluation import EvalJob, run_evaluation

    check_checkpoint_fits(cfg, checkpoint)
    job = EvalJob(cfg, checkpoint, None, (), settings, str(out_dir), name="predict", files=paths,
                  class_names=class_names(cfg.data), save_pred=True, keep=0, shard_size=shard_size)
    outcome = run_evaluation(job, resume, desc="predict", score_shards=_shard_scorer(workers, gpus_per_worker, address))
    (Path(out_dir) / "class_shares.json").write_text(json.dumps(outcome.shares, indent=1))
    return outcome
