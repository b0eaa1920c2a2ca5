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
from typing import Callable, Iterator

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from toco.config import Config, save_config
from toco.data import TrainDataset, TrainTransform, build_source, seed_worker
from toco.checkpoint import CheckpointError, check_compatible, check_resumable, load_checkpoint, save_checkpoint
from toco.engine.optim import build_optimizer
from toco.engine.step import train_step, zero_grads_of_waiting_heads
from toco.models import build_model
from toco.par import PAR
from toco.runtime import Logger, NullLogger, resolve_device


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


def check_finite(totals: list[torch.Tensor], iteration: int) -> None:
    """Stop loudly on a non-finite loss. Checked at log and checkpoint steps only, so the host waits for the
    device there and nowhere else; a NaN never reaches a checkpoint."""
    values = torch.stack(totals)
    bad = ~torch.isfinite(values)
    if bad.any():
        first = iteration - len(totals) + int(bad.nonzero()[0])
        raise FloatingPointError(f"the loss is {float(values[bad][0])} at iteration {first}")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_loaders(cfg: Config, start_iter: int = 0, rank: int = 0, world: int = 1):
    """(training batches from iteration `start_iter` on, for this rank; the validation source)."""
    train_source = build_source(cfg.data, cfg.data.train_split)
    val_source = build_source(cfg.data, cfg.validation_split)
    d = cfg.data
    train_set = SeededSamples(TrainDataset(train_source, TrainTransform(
        d.crop_size, d.rescale_range, d.local_crop_size, legacy_bugs=cfg.legacy_bugs)), cfg.train.seed_of("augment"))
    sampler = EpochBatches(len(train_set), cfg.train.batch_size, cfg.train.seed_of("order"), start_iter, rank, world)
    train_loader = DataLoader(train_set, batch_sampler=sampler, num_workers=d.num_workers,
                              worker_init_fn=seed_worker, persistent_workers=d.num_workers > 0)
    return train_loader, val_source


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
        torch.manual_seed(cfg.train.seed_of("init"))
        self.device = device or resolve_device(cfg.train.device)
        self.out_dir = Path(cfg.output_dir)
        self.model = build_model(cfg.model, cfg.data.num_classes).to(self.device)
        self.par = PAR(cfg.pseudo.par_dilations, cfg.pseudo.par_iters).to(self.device)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.max_iters,
                                                          cfg.loss.seg_start)
        # the weights validated and kept in best.pt: the EMA of the weights when train.ema_decay > 0 (the loop still
        # trains and resumes the raw weights)
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
                    if cfg.train.ema_decay else None)
        self.iteration, self.best_miou = 0, -1.0
        if resume:
            self._restore(resume)
        if cfg.train.compile:  # the encoder's forward as ToCoNet calls it; one graph per input size
            self.model.encoder.forward_intermediates = torch.compile(self.model.encoder.forward_intermediates)
        # DDP (or another wrapper) goes around the model only for the backward pass
        self.train_model = wrap_model(self.model) if wrap_model else self.model

    def _restore(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        check_resumable(state, path)
        check_compatible(self.model, state["model"], path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.best_miou = int(state["iteration"]), float(state["best_miou"])
        torch.set_rng_state(state["rng"].cpu())
        if self.ema is not None:
            if "ema_model" not in state:
                raise CheckpointError(f"checkpoint {path} holds no weight average: train.ema_decay was 0 in its run")
            self.ema.module.load_state_dict(state["ema_model"])
            self.ema.n_averaged.fill_(int(state["ema_updates"]))

    @property
    def validated_model(self) -> torch.nn.Module:
        return self.model if self.ema is None else self.ema.module

    def state(self) -> dict:
        state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), iteration=self.iteration,
                     best_miou=self.best_miou, rng=torch.get_rng_state())
        if self.ema is not None:
            state.update(ema_model=self.ema.module.state_dict(), ema_updates=int(self.ema.n_averaged))
        return state

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def fit(self, until: int | None = None) -> TrainOutcome:
        """Train to `train.max_iters`, or stop after iteration `until` (a later call goes on from there, as a
        resumed run would: the sweep steps several seeds of one trial in turn)."""
        cfg, train_cfg = self.cfg, self.cfg.train
        stop = min(until, train_cfg.max_iters) if until is not None else train_cfg.max_iters
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        train_loader, val_source = build_loaders(cfg, self.iteration, self.rank, self.world)
        self.model.train()
        window: dict[str, list[torch.Tensor]] = {}  # the losses since the last log step, still on the device
        metrics: dict[str, float] = {}
        latest: dict[str, float] = {}  # the last logged value of every metric, for on_checkpoint
        progress = tqdm(total=train_cfg.max_iters, initial=self.iteration, desc="train", unit="it",
                        disable=not self.is_main, dynamic_ncols=True, mininterval=2.0)
        tick, tick_iter = time.perf_counter(), self.iteration
        batches = iter(train_loader)
        while self.iteration < stop:
            batch = _to(next(batches), self.device)
            generator = torch.Generator(device=self.device).manual_seed(
                _seed_of(train_cfg.seed_of("crop"), self.iteration, self.rank))
            result = train_step(self.train_model, self.par, batch, cfg, self.iteration, generator)
            self.optimizer.zero_grad(set_to_none=True)
            result.total.backward()
            zero_grads_of_waiting_heads(self.model, cfg, self.iteration)  # as the original's zero-weighted losses
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.iteration += 1
            window.setdefault("total", []).append(result.total.detach())
            for k, v in result.losses.items():
                window.setdefault(k, []).append(v)
            progress.update(1)

            log_step = self.iteration % train_cfg.log_every == 0 or self.iteration == train_cfg.max_iters
            if log_step or self.iteration % train_cfg.ckpt_every == 0:
                check_finite(window["total"], self.iteration)  # before a checkpoint could keep a NaN
            if log_step:
                rate = (self.iteration - tick_iter) / (time.perf_counter() - tick)
                logged = {f"train/{k}": float(torch.stack(v).mean()) for k, v in window.items() if k != "total"}
                logged.update({f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups})
                logged["train/iters_per_s"] = rate
                shown = {"loss": f"{float(torch.stack(window['total']).mean()):.3f}"}
                if self.device.type == "cuda":  # the peak so far: what a larger batch or crop would have to fit in
                    logged["train/gpu_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
                    shown["gpu"] = f"{logged['train/gpu_peak_mib']:.0f}MiB"
                progress.set_postfix(shown, refresh=False)
                if self.is_main:
                    self.logger.log_metrics(logged, self.iteration)
                latest.update(logged)
                window, tick, tick_iter = {}, time.perf_counter(), self.iteration
            if self.iteration % train_cfg.eval_every == 0 or self.iteration == train_cfg.max_iters:
                metrics = self._evaluate(val_source)
                latest.update(metrics)
            if self.iteration % train_cfg.ckpt_every == 0 or self.iteration == train_cfg.max_iters:
                path = self.out_dir / "last.pt" if self.is_main else None
                if path:
                    save_checkpoint(path, self.state())
                if self.on_checkpoint:
                    self.on_checkpoint(path, dict(latest, best_miou_seg=self.best_miou), self.iteration)
        progress.close()
        if self.is_main and self.iteration == train_cfg.max_iters:  # what a user needs: the resumable last state and the best weights (docs/tracking.md)
            self.logger.log_artifact(self.out_dir / "last.pt", "checkpoints")
            if (self.out_dir / "best.pt").exists():
                self.logger.log_artifact(self.out_dir / "best.pt", "checkpoints")
        return TrainOutcome(self.iteration, metrics, self.best_miou, self.out_dir)

    def _evaluate(self, val_source) -> dict[str, float]:
        """In-training validation (docs/method.md §5.1) into out_dir/eval/iter_<N>/ and the logger."""
        from toco.evaluation import evaluate_model, subset_note, write_results

        if not self.is_main:
            return {}
        cfg = self.cfg
        split = cfg.validation_split
        model = self.validated_model
        limit = cfg.train.last_val_limit if self.iteration == cfg.train.max_iters else cfg.train.val_limit
        scores, samples = evaluate_model(model, cfg, val_source, cfg.train.val_metrics, limit=limit,
                                         num_workers=min(cfg.data.num_workers, 1))
        subset = subset_note(cfg, split, scores.images, len(val_source))
        folder = self.out_dir / "eval" / f"iter_{self.iteration:06d}"
        summary = write_results(folder, scores, samples, val_source.class_names,
                                dict(iteration=self.iteration, split=split, subset=subset))
        metrics = {f"val/{k}": v for k, v in summary["metrics"].items()}
        if metrics["val/miou_seg"] > self.best_miou:  # the best weights only: a third of a resumable checkpoint
            self.best_miou = metrics["val/miou_seg"]
            save_checkpoint(self.out_dir / "best.pt", dict(model=model.state_dict(), iteration=self.iteration,
                                                           miou_seg=self.best_miou))
        self.logger.log_evaluation(folder, summary["metrics"], {"seg": summary["per_class_iou"]["seg"]}, self.iteration,
                                   prefix="val/", artifact_path=f"eval/iter_{self.iteration:06d}")
        tqdm.write(f"[iter {self.iteration}] " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                   + (f"  (SUBSET: {subset})" if subset else ""))
        return metrics


__all__ = ["Trainer", "TrainOutcome", "EpochBatches", "SeededSamples"]
