"""Inference throughput (images/s) and peak memory: single scale, MS + flip, MS + flip + CRF (docs/method.md §5.2),
for the tiny synthetic model on the CPU and for ViT-B/16 at 448 (GPU when present).

images/s is wall-clock (median round); the statistics pytest-benchmark keeps and compares use its timer."""
import statistics
import time

import numpy as np
import pytest
import torch

from support import PeakMemory, bench_config, bench_device, large_enabled
from toco.data.synthetic import generate_sample
from toco.evaluation import MS_SCALES, InferenceSettings, predict_image
from toco.models import build_model

MODES = {
    "ss": InferenceSettings(),
    "ms_flip": InferenceSettings(scales=MS_SCALES, flip=True),
    "ms_flip_crf": InferenceSettings(scales=MS_SCALES, flip=True, crf=True),
}
# images per round, rounds: the tiny model sees 8 synthetic val images at 96 px; ViT-B one 448-px image
SETUP = {"tiny": dict(images=8, rounds=5), "vit_b16_448": dict(images=1, rounds=2)}


@pytest.fixture(scope="module", params=["tiny", "vit_b16_448"])
def model_under_test(request):
    kind = request.param
    if kind != "tiny" and not large_enabled():
        pytest.skip("ViT-B/16 at 448 needs a GPU or TOCO_BENCH_LARGE=1")
    cfg, device = bench_config(kind), bench_device(kind)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes).to(device).eval()
    size = cfg.data.synth_size
    images = [generate_sample(0, i, size, min(cfg.data.num_classes, 5), "val")[0] for i in range(SETUP[kind]["images"])]
    return kind, model, images, device


@pytest.mark.parametrize("mode", list(MODES))
def test_inference(benchmark, model_under_test, mode):
    kind, model, images, device = model_under_test
    settings = MODES[mode]

    wall = []  # wall-clock seconds per round, whatever timer pytest-benchmark uses (make bench-check: CPU time)

    def run():
        start = time.perf_counter()
        for image in images:
            predict_image(model, image, settings, device)  # returns a CPU array: the GPU is synchronised
        wall.append(time.perf_counter() - start)
    rounds = SETUP[kind]["rounds"] * (5 if device.type == "cuda" else 1)
    benchmark.group = f"inference {kind}"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    with PeakMemory(device) as peak:
        run()
    h, w = images[0].shape[:2]
    benchmark.extra_info.update(backend=kind, mode=mode, device=device.type, shape=f"{len(images)}x3x{h}x{w}",
                                images_per_s=len(images) / statistics.median(wall[1:-1]), peak_mem_mib=peak.mib)
    assert np.isfinite(benchmark.extra_info["images_per_s"])
