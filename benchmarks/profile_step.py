"""A training step timed stage by stage, and the data loader's rate: what `bench_train_step.py`, `bench_loader.py`
and the GPU check (`gpu_check.py`) measure.

The stages are the real `train_step` with its helper functions wrapped by timers (patched into toco.engine.step
for the duration), so nothing here re-implements the step; `other` is what the named stages leave out. Each stage
synchronises the device at its edges, which costs a little: `step_ms` is the same step without the timers.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

import toco.engine.step as step_module
from support import PeakMemory, StageTimer, sync
from toco.engine.loop import _to, build_loaders
from toco.engine.optim import build_optimizer
from toco.engine.step import train_step, zero_grads_of_waiting_heads
from toco.models import build_model
from toco.par import PAR

STAGES = {  # function in toco.engine.step -> stage
    "multi_scale_cam": "multi_scale_cam",
    "cam_to_roi_mask": "ctc_views", "crop_from_roi": "ctc_views",
    "cam_to_label": "ptc_loss", "ptc_loss": "ptc_loss",
    "ctc_loss": "ctc_loss",
    "refine_cams_with_bkg": "par",
    "cls_loss": "cls_loss", "seg_loss": "seg_loss", "dense_crf_loss": "reg_loss",
}


class TimedModel:
    """Times the model's forward (main input, second global view, local crops) as one stage and the EMA teacher
    update inside it as another (`forward` excludes it)."""

    def __init__(self, model, timer: StageTimer):
        self.module, self.timer = model, timer  # train_step runs the CAMs on `.module`, as under DDP
        update = model.update_teacher

        def timed_update(momentum):
            with timer.stage("ema"):
                return update(momentum)

        model.update_teacher = timed_update

    def __call__(self, *args, **kwargs):
        with self.timer.stage("forward"):
            return self.module(*args, **kwargs)


@contextmanager
def _patched_stages(timer: StageTimer):
    originals = {name: getattr(step_module, name) for name in STAGES}
    try:
        for name, stage in STAGES.items():
            setattr(step_module, name, timer.wrap(stage, originals[name]))
        yield
    finally:
        for name, fn in originals.items():
            setattr(step_module, name, fn)


def profile_train_step(cfg, device: torch.device, rounds: int = 3, warmup: int = 1) -> dict:
    """One training iteration with every loss active, `rounds` times after `warmup`: mean wall and CPU ms per
    stage, the step's ms without timers, and peak memory (MiB) of one step."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes).to(device).train()
    par = PAR(cfg.pseudo.par_dilations, cfg.pseudo.par_iters).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_iters)
    batch = _to(next(iter(build_loaders(cfg)[0])), device)
    iteration = max(cfg.loss.seg_start, cfg.loss.ptc_ctc_start)  # every loss active

    def step(net, timer: StageTimer | None) -> None:
        generator = torch.Generator(device=device).manual_seed(0)
        result = train_step(net, par, batch, cfg, iteration, generator)
        with timer.stage("backward") if timer else _nothing():
            optimizer.zero_grad(set_to_none=True)
            result.total.backward()
            zero_grads_of_waiting_heads(model, cfg, iteration)
        with timer.stage("optimizer") if timer else _nothing():
            optimizer.step()
            scheduler.step()

    timer = StageTimer(device)
    timed = TimedModel(model, timer)
    with _patched_stages(timer):
        for _ in range(warmup + rounds):
            timer.new_round()
            with timer.stage("total"):
                step(timed, timer)
    del model.update_teacher  # the class's method again: untimed
    wall, cpu = timer.mean(skip=warmup), timer.mean(skip=warmup, cpu=True)
    for stages in (wall, cpu):  # the forward stage includes the EMA update it calls
        stages["forward"] -= stages.get("ema", 0.0)
    plain = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        step(model, None)
        sync(device)
        plain.append(time.perf_counter() - start)
    with PeakMemory(device) as peak:
        step(model, None)
    b, _, h, w = batch["image"].shape
    return dict(stages_ms={k: 1000 * v for k, v in wall.items()}, stages_cpu_ms={k: 1000 * v for k, v in cpu.items()},
                step_ms=1000 * sorted(plain)[len(plain) // 2], peak_mem_mib=peak.mib, batch=f"{b}x3x{h}x{w}",
                precision=cfg.train.precision, device=device.type)


@contextmanager
def _nothing():
    yield


def loader_rate(cfg, images: int = 24, source=None) -> float:
    """Training samples per second one loader process makes: decode (or generate), rescale, flip, crop, and the
    three augmented views (the main input, the second global view, the image the local crops are cut from)."""
    from toco.data import TrainDataset, TrainTransform, build_source

    d = cfg.data
    dataset = TrainDataset(source or build_source(d, d.train_split),
                           TrainTransform(d.crop_size, d.rescale_range, d.local_crop_size, cfg.legacy_bugs))
    torch.manual_seed(0)
    dataset[0]  # warm-up
    start = time.perf_counter()
    for i in range(images):
        dataset[1 + i % (len(dataset) - 1)]
    return images / (time.perf_counter() - start)
