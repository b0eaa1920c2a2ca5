"""The training loop as DDP workers under Ray Train (`ray.train.torch.TorchTrainer`): gloo on CPU, nccl on GPU.

`train.batch_size` stays the global batch: rank r of `world` trains on samples r, r+world, ... of every global
batch (`EpochBatches`) and DDP averages the gradients, so the effective batch is workers x per-worker batch.
Rank 0 alone evaluates, logs to MLflow and writes checkpoints. At every checkpoint each rank calls
`ray.train.report` (a barrier), rank 0 with the checkpoint. When a worker dies the group restarts from the last
reported checkpoint (`FailureConfig(max_failures)`); the resumed MLflow run skips the steps it already holds, so
every metric step is logged once.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

from toco.config import Config, absolute_paths
from toco.distributed.cluster import init_ray
from toco.engine.loop import TrainOutcome, Trainer
from toco.runtime import Logger

CHECKPOINT_FILE = "last.pt"


@contextmanager
def checkpoint_folder(files: Path | dict[Path, Path]):
    """A folder holding just `files` ({name in the folder: file}; one path: as CHECKPOINT_FILE), for
    `Checkpoint.from_directory`. A hard link costs nothing, and the atomic save replaces a file by a rename, so
    the linked name keeps the bytes that were reported."""
    if not isinstance(files, dict):
        files = {Path(CHECKPOINT_FILE): files}
    anchor = next(iter(files.values())).parent
    with tempfile.TemporaryDirectory(dir=anchor, prefix=".report-") as folder:
        for name, path in files.items():
            target = Path(folder) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:  # a file system without hard links
                shutil.copy2(path, target)
        yield folder


def report_to_ray_train(path: Path | None, metrics: dict[str, float], iteration: int) -> None:
    """The loop's on_checkpoint hook under Ray Train: every rank reports (a barrier), rank 0 with the checkpoint."""
    import ray.train

    metrics = dict(metrics, iteration=iteration)
    if path is None:
        ray.train.report(metrics)
        return
    with checkpoint_folder(path) as folder:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: the loop with DDP around the model, resumed from Ray's last checkpoint."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    cfg: Config = config["cfg"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    def ddp(model):
        # terms join by schedule (seg and reg after seg_start, CTC's heads only with CTC on): parameters
        # without a gradient in a step are expected
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)

    # rank 0 logs to the driver's run (toco.run.continue_run, or what a caller injects)
    logger = config["make_logger"]() if rank == 0 and config.get("make_logger") else None
    restored = ray.train.get_checkpoint()  # set after a worker failure (or when Ray restores the run)
    with restored.as_directory() if restored else nullcontext(None) as folder:
        resume = Path(folder) / CHECKPOINT_FILE if folder else config.get("resume")
        trainer = Trainer(cfg, logger, resume, rank, world, wrap_model=ddp, device=device,
                          on_checkpoint=report_to_ray_train)
    trainer.fit()


def fit_distributed(cfg: Config, workers: int, gpus_per_worker: float = 0.0,
                    make_logger: Callable[[], Logger] | None = None, resume: str | Path | None = None,
                    max_failures: int = 2, storage_path: str | Path | None = None, name: str = "train",
                    fresh: bool = True, callbacks: list | None = None):
    """Run `cfg` on `workers` Ray Train workers; returns Ray's `Result` (metrics of rank 0's last report).
    `make_logger` (picklable: it runs in rank 0's process) gives rank 0 its logger; None logs nothing.

    Ray Train keeps its checkpoints under storage_path/name (default output_dir/ray/train) and restores a run it
    finds there; `fresh=True` removes an old one first, as a new in-process run starts from iteration 0.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    storage = Path(storage_path or Path(cfg.output_dir) / "ray").resolve()
    if fresh:
        shutil.rmtree(storage / name, ignore_errors=True)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": gpus_per_worker} if use_gpu else {})}
    loop_config = dict(cfg=cfg, resume=str(resume) if resume else None, make_logger=make_logger)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=callbacks or [],
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    return trainer.fit()


def train_on_ray(cfg: Config, workers: int, gpus_per_worker: float = 0.0, address: str | None = None,
                 resume: str | Path | None = None, make_logger: Callable[[], Logger] | None = None,
                 max_failures: int = 2) -> TrainOutcome:
    """`toco train --workers N`: join or start a cluster, train, and answer like the in-process `Trainer.fit`."""
    started = init_ray(address)
    try:
        result = fit_distributed(cfg, workers, gpus_per_worker, make_logger, resume, max_failures)
    finally:
        if started:
            import ray

            ray.shutdown()
    metrics = dict(result.metrics or {})
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    return TrainOutcome(int(metrics.get("iteration", 0)), val, float(metrics.get("best_miou_seg", -1.0)),
                        Path(cfg.output_dir))
