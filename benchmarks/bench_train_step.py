"""One training iteration with every loss active, timed by stage (docs/method.md §2-§3, in the order of
toco.engine.step): multi-scale CAM, CTC views, the forward pass, EMA, PTC, CTC, PAR, seg and reg (DenseCRF) losses,
backward, optimiser. The benchmark's time is one plain iteration; `profile_step.profile_train_step` (the GPU check
uses it too) adds the stages, wall and CPU time (on a machine shared with other work CPU time is the steadier).
"""
import pytest

from profile_step import TrainingIteration, profile_train_step
from support import bench_config, bench_device, format_stages, large_enabled

ROUNDS = {"tiny": 5, "vit_b16_448": 2}


@pytest.mark.parametrize("kind, precision", [("tiny", "fp32"), ("vit_b16_448", "fp32"), ("vit_b16_448", "bf16")])
def test_train_iteration(benchmark, kind, precision):
    if kind != "tiny" and not large_enabled():
        pytest.skip("ViT-B/16 at 448 needs a GPU or TOCO_BENCH_LARGE=1")
    cfg, device = bench_config(kind), bench_device(kind)
    cfg.train.precision = precision
    iteration = TrainingIteration(cfg, device)
    benchmark.group = "train iteration"
    benchmark.pedantic(iteration.timed, rounds=ROUNDS[kind], warmup_rounds=1, iterations=1)
    profile = profile_train_step(cfg, device, ROUNDS[kind], warmup=0, iteration=iteration)  # warmed up above
    stages = {k: v / 1000 for k, v in profile["stages_ms"].items()}
    cpu = {k: v / 1000 for k, v in profile["stages_cpu_ms"].items()}
    benchmark.extra_info.update(backend=kind, precision=precision, device=device.type, shape=profile["batch"],
                                reg_backend=cfg.loss.reg_backend, stages_s=stages, stages_cpu_s=cpu,
                                step_ms=profile["step_ms"], peak_mem_mib=profile["peak_mem_mib"],
                                slowest_stage=max((k for k in stages if k != "total"), key=stages.get))
    print(f"\n{kind} training iteration ({device.type}, {precision}, batch {profile['batch']}), mean of {ROUNDS[kind]} "
          f"rounds; {profile['step_ms']:.0f} ms without timers, peak {profile['peak_mem_mib']:.0f} MiB:")
    print(format_stages(stages, cpu))
