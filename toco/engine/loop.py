"""The training loop: data, optimiser, schedule, evaluation, checkpoints and resume.

Tracking is injected (`logger`), so the loop runs the same with MLflow, under Ray, or with nothing.
Every random choice is a function of (seed, iteration) or (seed, epoch, sample), so a resumed run
repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from toco.config import Config, save_config
from toco.data import EvalDataset, TrainDataset, TrainTransform, build_source, seed_worker
from toco.engine.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from toco.engine.evaluate import EvalResult, evaluate
from toco.engine.optim import build_optimizer
from toco.engine.step import train_step, zero_grads_of_waiting_heads
from toco.models import build_model
from toco.par import PAR


class Logger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_evaluation(self, result: EvalResult, class_names: list[str], step: int, out_dir: Path) -> None: ...


class NullLogger:
    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_evaluation(self, result, class_names, step, out_dir):
        pass


def _seed_of(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class SeededSamples(Dataset):
    """Seeds every RNG from (seed, epoch, index) before a sample is augmented."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = _seed_of(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        return self.dataset[index]


class EpochBatches(Sampler):
    """Endless global batches of (epoch, index); epoch e is a permutation seeded by (seed, e).
    Starts at `start` batches in, which is how a resumed run picks up where it stopped."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if n < batch_size:
            raise ValueError(f"the training split has {n} images, fewer than the batch size {batch_size}")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world
        self.per_epoch = n // batch_size  # drop_last, as the original

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            g = torch.Generator().manual_seed(_seed_of(self.seed, epoch))
            order = torch.randperm(self.n, generator=g).tolist()
            for i in range(offset, self.per_epoch):
                batch = order[i * self.batch_size:(i + 1) * self.batch_size]
                yield [(epoch, idx) for idx in batch[self.rank::self.world]]  # this rank's share
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return 2 ** 62


@dataclass
class TrainOutcome:
    iteration: int
    metrics: dict[str, float]
    best_miou: float
    output_dir: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_loaders(cfg: Config, start_iter: int = 0, rank: int = 0, world: int = 1):
    train_source = build_source(cfg.data, cfg.data.train_split)
    val_source = build_source(cfg.data, cfg.data.val_split)
    d = cfg.data
    train_set = SeededSamples(TrainDataset(train_source, TrainTransform(
        d.crop_size, d.rescale_range, d.local_crop_size, legacy_bugs=cfg.legacy_bugs)), cfg.train.seed)
    sampler = EpochBatches(len(train_set), cfg.train.batch_size, cfg.train.seed, start_iter, rank, world)
    train_loader = DataLoader(train_set, batch_sampler=sampler, num_workers=d.num_workers,
                              worker_init_fn=seed_worker, persistent_workers=d.num_workers > 0)
    val_set = EvalDataset(val_source, d.val_size)
    val_loader = DataLoader(val_set, batch_size=1, num_workers=min(d.num_workers, 1))
    return train_loader, val_loader, train_source.class_names


class Trainer:
    """Holds model, optimiser and data; `fit` runs to cfg.train.max_iters."""

    def __init__(self, cfg: Config, logger: Logger | None = None, resume: str | Path | None = None,
                 rank: int = 0, world: int = 1, wrap_model=None, device: torch.device | None = None,
                 on_checkpoint: Callable[[Path | None, dict[str, float], int], None] | None = None):
        self.cfg, self.logger = cfg, logger or NullLogger()
        # called on every rank after each checkpoint with (rank 0's checkpoint file or None, the latest logged
        # metrics, iteration); Ray Train's report is a barrier that every rank must reach
        self.on_checkpoint = on_checkpoint
        self.rank, self.world = rank, world
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.device = device or resolve_device(cfg.train.device)
        self.out_dir = Path(cfg.output_dir)
        self.model = build_model(cfg.model, cfg.data.num_classes).to(self.device)
        self.par = PAR(cfg.pseudo.par_dilations, cfg.pseudo.par_iters).to(self.device)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.max_iters)
        self.iteration, self.best_miou = 0, -1.0
        if resume:
            self._restore(resume)
        # DDP (or another wrapper) goes around the model only for the backward pass
        self.train_model = wrap_model(self.model) if wrap_model else self.model

    def _restore(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        check_compatible(self.model, state["model"], path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.best_miou = int(state["iteration"]), float(state["best_miou"])
        torch.set_rng_state(state["rng"].cpu())

    def state(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), iteration=self.iteration,
                    best_miou=self.best_miou, rng=torch.get_rng_state())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def fit(self) -> TrainOutcome:
        cfg, train_cfg = self.cfg, self.cfg.train
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        train_loader, val_loader, class_names = build_loaders(cfg, self.iteration, self.rank, self.world)
        self.model.train()
        window: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        latest: dict[str, float] = {}  # the last logged value of every metric, for on_checkpoint
        progress = tqdm(total=train_cfg.max_iters, initial=self.iteration, desc="train", unit="it",
                        disable=not self.is_main, dynamic_ncols=True, mininterval=2.0)
        tick, tick_iter = time.perf_counter(), self.iteration
        batches = iter(train_loader)
        while self.iteration < train_cfg.max_iters:
            batch = _to(next(batches), self.device)
            generator = torch.Generator(device=self.device).manual_seed(
                _seed_of(train_cfg.seed, self.iteration, self.rank))
            result = train_step(self.train_model, self.par, batch, cfg, self.iteration, generator)
            if not torch.isfinite(result.total):
                raise FloatingPointError(f"loss is {result.total.item()} at iteration {self.iteration}: "
                                         f"{result.losses}")
            self.optimizer.zero_grad(set_to_none=True)
            result.total.backward()
            zero_grads_of_waiting_heads(self.model, cfg, self.iteration)  # as the original's zero-weighted losses
            self.optimizer.step()
            self.scheduler.step()
            self.iteration += 1
            for k, v in result.losses.items():
                window.setdefault(k, []).append(v)
            progress.update(1)
            progress.set_postfix(loss=f"{result.total.item():.3f}", refresh=False)

            if self.iteration % train_cfg.log_every == 0 or self.iteration == train_cfg.max_iters:
                rate = (self.iteration - tick_iter) / (time.perf_counter() - tick)
                logged = {f"train/{k}": float(np.mean(v)) for k, v in window.items()}
                logged.update({f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups})
                logged["train/iters_per_s"] = rate
                if self.is_main:
                    self.logger.log_metrics(logged, self.iteration)
                latest.update(logged)
                window, tick, tick_iter = {}, time.perf_counter(), self.iteration
            if self.iteration % train_cfg.eval_every == 0 or self.iteration == train_cfg.max_iters:
                metrics = self._evaluate(val_loader, class_names)
                latest.update(metrics)
            if self.iteration % train_cfg.ckpt_every == 0 or self.iteration == train_cfg.max_iters:
                path = self.out_dir / "last.pt" if self.is_main else None
                if path:
                    save_checkpoint(path, self.state())
                if self.on_checkpoint:
                    self.on_checkpoint(path, dict(latest, best_miou_seg=self.best_miou), self.iteration)
        progress.close()
        if self.is_main:
            self.logger.log_artifact(self.out_dir / "last.pt", "checkpoints")
            if (self.out_dir / "best.pt").exists():
                self.logger.log_artifact(self.out_dir / "best.pt", "checkpoints")
        return TrainOutcome(self.iteration, metrics, self.best_miou, self.out_dir)

    def _evaluate(self, val_loader, class_names) -> dict[str, float]:
        if not self.is_main:
            return {}
        result = evaluate(self.model, val_loader, self.cfg.data.num_classes, self.cfg.pseudo, self.device,
                          limit=self.cfg.train.val_limit, keep=6)
        miou = result.metrics["val/miou_seg"]
        if miou > self.best_miou:
            self.best_miou = miou
            save_checkpoint(self.out_dir / "best.pt", self.state())
        self.logger.log_metrics(result.metrics, self.iteration)
        self.logger.log_evaluation(result, class_names, self.iteration, self.out_dir)
        tqdm.write(f"[iter {self.iteration}] " + "  ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
        return result.metrics


__all__ = ["Trainer", "TrainOutcome", "NullLogger", "EpochBatches", "SeededSamples"]
