"""One training iteration with every loss active, timed by stage (docs/method.md §2-§3, in the order of toco.engine.step):
multi-scale CAM, CTC views, the forward pass, PTC, CTC, PAR, seg and reg (DenseCRF) losses, backward, optimiser.

The stages are the real `train_step` with its helper functions wrapped by timers (monkeypatched in
toco.engine.step), so nothing here re-implements the step; `other` is what the named stages leave out. CPU time
per stage is reported beside wall time: on a machine shared with other work it is the steadier of the two.
"""
import pytest
import torch

import toco.engine.step as step_module
from support import StageTimer, bench_config, bench_device, format_stages, large_enabled
from toco.engine.loop import _to, build_loaders
from toco.engine.optim import build_optimizer
from toco.engine.step import train_step
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
ROUNDS = {"tiny": 5, "vit_b16_448": 2}


class TimedModel:
    """Times the model's forward (main input, second global view, local crops, EMA teacher) as one stage."""

    def __init__(self, model, timer: StageTimer):
        self.module, self.timer = model, timer  # train_step runs the CAMs on `.module`, as under DDP

    def __call__(self, *args, **kwargs):
        with self.timer.stage("forward"):
            return self.module(*args, **kwargs)


@pytest.mark.parametrize("kind", ["tiny", "vit_b16_448"])
def test_train_iteration(benchmark, monkeypatch, kind):
    if kind != "tiny" and not large_enabled():
        pytest.skip("ViT-B/16 at 448 needs a GPU or TOCO_BENCH_LARGE=1")
    cfg, device = bench_config(kind), bench_device(kind)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes).to(device).train()
    par = PAR(cfg.pseudo.par_dilations, cfg.pseudo.par_iters).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_iters)
    batch = _to(next(iter(build_loaders(cfg)[0])), device)
    iteration = max(cfg.loss.seg_start, cfg.loss.ptc_ctc_start)  # every loss active
    timer = StageTimer(device)
    for name, stage in STAGES.items():
        monkeypatch.setattr(step_module, name, timer.wrap(stage, getattr(step_module, name)))
    timed_model = TimedModel(model, timer)

    def one_iteration():
        timer.new_round()
        generator = torch.Generator(device=device).manual_seed(0)
        with timer.stage("total"):
            result = train_step(timed_model, par, batch, cfg, iteration, generator)
            with timer.stage("backward"):
                optimizer.zero_grad(set_to_none=True)
                result.total.backward()
            with timer.stage("optimizer"):
                optimizer.step()
                scheduler.step()
        assert torch.isfinite(result.total)

    benchmark.group = "train iteration"
    warmup = 1
    benchmark.pedantic(one_iteration, rounds=ROUNDS[kind], warmup_rounds=warmup, iterations=1)
    stages, cpu = timer.mean(skip=warmup), timer.mean(skip=warmup, cpu=True)
    b, _, h, w = batch["image"].shape
    benchmark.extra_info.update(backend=kind, device=device.type, shape=f"{b}x3x{h}x{w}",
                                reg_backend=cfg.loss.reg_backend, stages_s=stages, stages_cpu_s=cpu,
                                slowest_stage=max((k for k in stages if k != "total"), key=stages.get))
    print(f"\n{kind} training iteration ({device.type}, batch {b}x{h}x{w}), mean of {ROUNDS[kind]} rounds:")
    print(format_stages(stages, cpu))
