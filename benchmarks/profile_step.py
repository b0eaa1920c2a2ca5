"""A training step timed stage by stage, its FLOPs, and the data loader's rate: what `bench_train_step.py`,
`bench_loader.py` and the GPU check (`gpu_check.py`) measure. Run as a script it profiles the paper's VOC
setting (experiments/smoke/voc_shape.yaml: ViT-B/16, 448, batch 4, 21 classes) on this machine's device:
`PYTHONPATH=. python benchmarks/profile_step.py [--precision bf16] [--rounds N] [--flops]`.

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


class TrainingIteration:
    """One training iteration of `cfg` with every loss active, on a fixed batch: `run()` is train_step, backward
    and the optimizer step, as the loop runs them."""

    def __init__(self, cfg, device: torch.device):
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg.model, cfg.data.num_classes).to(device).train()
        self.par = PAR(cfg.pseudo.par_dilations, cfg.pseudo.par_iters).to(device)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.max_iters)
        self.batch = _to(next(iter(build_loaders(cfg)[0])), device)
        self.iteration = max(cfg.loss.seg_start, cfg.loss.ptc_ctc_start)  # every loss active

    def run(self, net=None, timer: StageTimer | None = None) -> None:
        generator = torch.Generator(device=self.device).manual_seed(0)
        result = train_step(net or self.model, self.par, self.batch, self.cfg, self.iteration, generator)
        with timer.stage("backward") if timer else _nothing():
            self.optimizer.zero_grad(set_to_none=True)
            result.total.backward()
            zero_grads_of_waiting_heads(self.model, self.cfg, self.iteration)
        with timer.stage("optimizer") if timer else _nothing():
            self.optimizer.step()
            self.scheduler.step()

    def timed(self) -> float:
        """Seconds of one plain iteration, the device synchronised at both ends."""
        sync(self.device)
        start = time.perf_counter()
        self.run()
        sync(self.device)
        return time.perf_counter() - start

    def flops(self) -> dict[str, float]:
        """FLOPs of one iteration (torch.utils.flop_counter: matrix products and convolutions, forward and
        backward), and of the multi-scale CAM alone."""
        from torch.utils.flop_counter import FlopCounterMode

        cam = {}
        original = step_module.multi_scale_cam

        def counted(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                out = original(*args, **kwargs)
            cam["flops"] = counter.get_total_flops()
            return out

        step_module.multi_scale_cam = counted
        try:
            with FlopCounterMode(display=False) as total:
                self.run()
        finally:
            step_module.multi_scale_cam = original
        return dict(step_tflop=total.get_total_flops() / 1e12, multi_scale_cam_tflop=cam.get("flops", 0) / 1e12)


def profile_train_step(cfg, device: torch.device, rounds: int = 3, warmup: int = 1,
                       iteration: TrainingIteration | None = None) -> dict:
    """One training iteration with every loss active, `rounds` times after `warmup`: mean wall and CPU ms per
    stage, the iteration's ms without timers (median of `rounds`), and peak memory (MiB) of one iteration."""
    it = iteration or TrainingIteration(cfg, device)
    timer = StageTimer(device)
    timed = TimedModel(it.model, timer)
    with _patched_stages(timer):
        for _ in range(warmup + rounds):
            timer.new_round()
            with timer.stage("total"):
                it.run(timed, timer)
    del it.model.update_teacher  # the class's method again: untimed
    nested = {"ema": "forward"}  # the forward stage includes the EMA update it calls
    wall, cpu = timer.mean(skip=warmup, nested=nested), timer.mean(skip=warmup, cpu=True, nested=nested)
    plain = sorted(it.timed() for _ in range(rounds))
    with PeakMemory(device) as peak:
        it.run()
    b, _, h, w = it.batch["image"].shape
    return dict(stages_ms={k: 1000 * v for k, v in wall.items()}, stages_cpu_ms={k: 1000 * v for k, v in cpu.items()},
                step_ms=1000 * plain[len(plain) // 2], peak_mem_mib=peak.mib, batch=f"{b}x3x{h}x{w}",
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


def main(argv=None) -> int:
    import argparse

    from support import bench_config, format_stages

    parser = argparse.ArgumentParser(description="the paper-size training step by stage")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flops", action="store_true", help="also count the iteration's FLOPs")
    args = parser.parse_args(argv)
    cfg = bench_config("vit_b16_448")
    cfg.train.precision = args.precision
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    it = TrainingIteration(cfg, device)
    if args.flops:
        print(", ".join(f"{k} {v:.2f}" for k, v in it.flops().items()))
    profile = profile_train_step(cfg, device, args.rounds, iteration=it)
    print(f"{profile['batch']} {args.precision} on {device.type}: {profile['step_ms']:.0f} ms per iteration, "
          f"peak {profile['peak_mem_mib']:.0f} MiB")
    print(format_stages({k: v / 1000 for k, v in profile["stages_ms"].items()},
                        {k: v / 1000 for k, v in profile["stages_cpu_ms"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
