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
from toco.report import headline_note

RUN_ID_FILE = "mlflow_run_id"  # beside a run's checkpoints: a resumed run, its evaluations and trials find it


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where a command's work runs: in this process (workers 1), or on `workers` Ray workers with
    `gpus_per_worker` GPUs each, on the cluster at `address` (default: $RAY_ADDRESS, else a local one)."""
    workers: int = 1
    gpus_per_worker: float = 0.0
    address: str | None = None


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
            model = build_model(dataclasses.replace(model_cfg, pretrained=False), cfg.data.num_classes)
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"model.backbone {model_cfg.backbone!r} with {model_cfg.backbone_kwargs}: {err}") from None
    _check_sizes(cfg, model.patch_size)
    if resume:
        check_checkpoint_fits(cfg, resume, resumable=True)
    if cfg.train.batch_size % workers:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be a multiple of "
                          f"the {workers} workers")


CHECKPOINT_FILES = ("last.pt", "best.pt")


def claim_output_dir(cfg: Config, resume: str | Path | None, overwrite: bool) -> None:
    """A training never replaces an earlier run's checkpoints unasked: output_dir holding last.pt or best.pt needs
    --resume (continue that run) or --overwrite (which removes the earlier run's checkpoints and summary first, so
    nothing of it is mistaken for the new run's; its run id goes when the new run opens, in tracked_run)."""
    folder = Path(cfg.output_dir)
    found = [name for name in CHECKPOINT_FILES if (folder / name).is_file()]
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"output_dir {folder} holds an earlier run's checkpoints ({', '.join(found)}): "
                          f"--resume {folder / 'last.pt'} continues it, --overwrite replaces it, "
                          f"output_dir=OTHER trains beside it")
    for name in (*CHECKPOINT_FILES, "summary.json"):
        (folder / name).unlink(missing_ok=True)


def _check_sizes(cfg: Config, patch: int) -> None:
    """Every view the training feeds the network holds at least one patch, and the local crops fit in the crop."""
    data, smallest_scale = cfg.data, min(cfg.pseudo.cam_scales)
    views = {"data.crop_size": data.crop_size, "data.local_crop_size": data.local_crop_size,
             "data.val_size": data.val_size,
             "data.crop_size x min(pseudo.cam_scales)": int(data.crop_size * smallest_scale),
             "data.val_size x min(pseudo.cam_scales)": int(data.val_size * smallest_scale)}
    for what, size in views.items():
        if size < patch:
            raise ConfigError(f"{what} = {size} px is smaller than one {patch}-px patch of the model")
    if data.local_crop_size > data.crop_size:
        raise ConfigError(f"data.local_crop_size={data.local_crop_size} exceeds data.crop_size={data.crop_size}: "
                          f"local crops are cut from the crop")


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
    if not resume:  # an id left by an earlier run in this folder is not this run's
        (out_dir / RUN_ID_FILE).unlink(missing_ok=True)
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


def run_training(cfg: Config, label: str | None = None, resume: str | None = None, launch: Launch = Launch(),
                 overwrite: bool = False) -> dict:
    """Train `cfg` in a tracked run named after `label` (the config's name; default: the experiment's); with
    workers > 1 as DDP workers under Ray Train (toco.distributed.train). An output_dir holding an earlier run's
    checkpoints needs `resume` or `overwrite` (claim_output_dir). Returns the run's summary."""
    label = label or cfg.tracking.experiment
    check_before_run(cfg, resume, launch.workers)
    claim_output_dir(cfg, resume, overwrite)
    split = cfg.validation_split
    final = cfg.train.last_val_limit
    limits = f", first {cfg.train.val_limit}" if cfg.train.val_limit else ""
    if final != cfg.train.val_limit:
        limits += f"; the last validation {f'the first {final}' if final else 'all of it'}"
    subset = split.endswith("_part") or final > 0  # the final val/ numbers on part of a split
    tags = {"validation": split + limits + (" (a subset)" if subset else "")}
    with tracked_run(cfg, cfg.output_dir, run_name(cfg, label), resume=bool(resume), tags=tags) as run:
        if launch.workers > 1:
            from toco.distributed.train import train_on_ray

            make_logger = partial(continue_run, cfg, run.run_id) if run.run_id else None
            outcome = train_on_ray(cfg, launch.workers, launch.gpus_per_worker, launch.address, resume, make_logger)
        else:
            from toco.engine.loop import Trainer

            outcome = Trainer(cfg, run.logger, resume).fit()
        run.summary.update(outcome.metrics, iterations=outcome.iteration, best_miou_seg=outcome.best_miou,
                           output_dir=str(outcome.output_dir))
        note = headline_note(outcome.metrics, "val/", cfg.description)
        if note:
            run.logger.describe(note)
    return run.summary


def reference_scores(cfg: Config) -> dict[str, float] | None:
    """What trivial predictions score on the validation images (the synthetic benchmark), or None."""
    if cfg.data.name != "synthetic":
        return None
    from toco.data import build_source
    from toco.data.synthetic import trivial_baselines

    # on the images the last validation scored
    return trivial_baselines(build_source(cfg.data, cfg.data.val_split), cfg.train.last_val_limit)


def _shard_scorer(launch: Launch):
    """In this process (Ray never imported) for one worker, else on Ray Data actors."""
    if launch.workers <= 1:
        from toco.evaluation import runner

        return runner.score_in_process
    from toco.distributed.evaluate import ray_shard_scorer

    return ray_shard_scorer(launch.workers, launch.gpus_per_worker, launch.address)


def evaluate_checkpoint(cfg: Config, checkpoint: str, split: str, settings, out_dir: str | Path, pseudo_split=None,
                        limit: int = 0, save_pred: bool = False, save_probs: bool = False, shard_size: int = 32,
                        launch: Launch = Launch(), resume: bool = False) -> tuple[list, str | None]:
    """`toco eval`: score a checkpoint on `split` (and its pseudo labels on `pseudo_split`), write each result
    folder, all inside one MLflow run nested under the training that made the checkpoint (its duration is the
    evaluation's). Returns ([(job, folder, outcome, summary)], the run id)."""
    from toco.checkpoint import check_checkpoint_fits
    from toco.evaluation import PSEUDO_LABELS, EvalJob, run_evaluation, subset_note, write_results

    out_dir = Path(out_dir)
    check_checkpoint_fits(cfg, checkpoint)
    held = sorted(out_dir.iterdir()) if out_dir.is_dir() and not (out_dir / "shards").is_dir() else []
    if held:  # a user's folder, or a training's: an evaluation writes summary.json, samples.png, ... there
        raise ConfigError(f"--out {out_dir} holds files of its own ({held[0].name}"
                          + (f" and {len(held) - 1} more" if len(held) > 1 else "")
                          + "): an evaluation writes into a new folder or an earlier evaluation's")
    jobs = [EvalJob(cfg, checkpoint, split, ("seg",), settings, str(out_dir), name=split, limit=limit,
                    save_pred=save_pred, save_probs=save_probs, shard_size=shard_size)]
    if pseudo_split:
        jobs.append(EvalJob(cfg, checkpoint, pseudo_split, PSEUDO_LABELS, settings, str(out_dir),
                            name=f"pseudo_{pseudo_split}", limit=limit, shard_size=shard_size))
    sizes = [len(job.source()) for job in jobs]  # opens every split: a missing one fails before any image is scored
    total = sizes[0]
    subset = subset_note(cfg, split, min(total, limit) if limit else total, total)
    score_shards = _shard_scorer(launch)
    parent = read_run_id(Path(checkpoint).parent)
    if cfg.tracking.enabled and not parent:
        print(f"toco eval: no training run is recorded beside {checkpoint} ({RUN_ID_FILE}): this evaluation is a "
              f"top-level run", file=sys.stderr)
    name = f"eval {split} {settings.name} · {checkpoint_label(checkpoint)}" + (" [subset]" if subset else "")
    tags = {"kind": "evaluation", "checkpoint": str(Path(checkpoint).resolve()), "split": split,
            "subset": subset or "no"}
    with tracked_run(cfg, out_dir, name, tags=tags, parent_run_id=parent, log_config=False) as run:
        results = []
        for job in jobs:
            outcome = run_evaluation(job, resume, desc=job.name, score_shards=score_shards)
            folder = out_dir if job is jobs[0] else out_dir / job.name
            info = dict(split=job.split, subset=outcome.subset, checkpoint=tags["checkpoint"],
                        dataset=cfg.data.name, backbone=cfg.model.backbone, test_time=dataclasses.asdict(settings),
                        workers=launch.workers, images_per_s=round(outcome.images_per_s, 3),
                        worker_peak_rss_mib=round(outcome.worker_peak_rss_mib, 1))
            if save_probs:
                info["probs_bytes_per_image"] = round(outcome.probs_bytes / max(outcome.scores.images, 1))
            results.append((job, folder, outcome, write_results(folder, outcome.scores, outcome.samples,
                                                                outcome.class_names, info)))
        _log_evaluation(run.logger, out_dir, results)
        run.summary = dict(results[0][3])
    return results, run.run_id


def checkpoint_label(checkpoint: str | Path) -> str:
    """'last.pt @1500': the file and the iteration it holds, for run names."""
    from toco.checkpoint import load_checkpoint

    iteration = load_checkpoint(checkpoint, mmap=True).get("iteration")
    return Path(checkpoint).name + (f" @{iteration}" if iteration is not None else "")


def _log_evaluation(logger, out_dir: Path, results) -> None:
    """The evaluation's params, metrics, per-class IoU and pictures into its run."""
    job, folder, outcome, summary = results[0]
    prefix = "eval_subset/" if outcome.subset else "eval/"
    logger.log_params(dict(split=job.split, images=outcome.scores.images, workers=summary["workers"],
                           **summary["test_time"]))
    for job, folder, outcome, summary in results:
        scope = prefix if job.metrics == ("seg",) else f"pseudo_{job.split}/"
        metrics = dict(summary["metrics"], images_per_s=summary["images_per_s"])
        logger.log_evaluation(folder, metrics, summary["per_class_iou"], 0, scope,
                              artifact_path=None if folder == out_dir else folder.name)
    note = headline_note({f"{prefix}{k}": v for k, v in results[0][3]["metrics"].items()}, prefix)
    if note:
        logger.describe(note)


def _refuse_to_replace(out: Path, inputs: list[str], names: list[str], resume: bool) -> None:
    """`toco predict` writes <name>.png and <name>_overlay.png into `out`: never over an input image, and over
    files already there only when continuing a prediction (--resume)."""
    folder = out.resolve()
    inside = [p for p in inputs if folder == Path(p).resolve().parent or folder in Path(p).resolve().parents]
    if inside:
        raise ConfigError(f"--out {out} holds the input image {inside[0]}"
                          + (f" and {len(inside) - 1} more" if len(inside) > 1 else "")
                          + ": predictions are written there; choose a folder apart from the inputs")
    if resume:
        return
    taken = [f for name in names for f in (f"{name}.png", f"{name}_overlay.png") if (out / f).exists()]
    if taken or (out / "class_shares.json").exists():
        raise ConfigError(f"--out {out} already holds {(taken or ['class_shares.json'])[0]}, which this prediction "
                          f"would replace: --resume continues a prediction there, or choose an empty folder")


def predict_files(cfg: Config, checkpoint: str, paths: list[str], settings, out_dir: str | Path,
                  shard_size: int = 32, launch: Launch = Launch(),
                  resume: bool = False):
    """`toco predict`: segment image files into palette PNGs and overlays in out_dir, with class_shares.json;
    unreadable files are skipped (outcome.skipped names them)."""
    from toco.checkpoint import check_checkpoint_fits
    from toco.data import class_names
    from toco.evaluation import EvalJob, run_evaluation

    check_checkpoint_fits(cfg, checkpoint)
    job = EvalJob(cfg, checkpoint, None, (), settings, str(out_dir), name="predict", files=paths,
                  class_names=class_names(cfg.data), save_pred=True, keep=0, shard_size=shard_size)
    _refuse_to_replace(Path(out_dir), paths, job.source().names, resume)
    outcome = run_evaluation(job, resume, desc="predict", score_shards=_shard_scorer(launch))
    (Path(out_dir) / "class_shares.json").write_text(json.dumps(outcome.shares, indent=1))
    return outcome
