"""Bilateral filter and DenseCRF benchmarks (docs/results.md lists the measured numbers).

- the DenseCRF-loss filter at the training setting: batch 4, 21 channels, 224x224 (448 at scale 0.5),
  sigma_xy 50, sigma_rgb 15; and at full resolution 448x448 (sigma_xy 100); per backend (cpu, cuda if present);
- the regularised DenseCRF loss, forward and backward, as training runs it: batch 4, 21 classes, 448x448 crops at
  scale 0.5 (the training setting) and at full scale; per backend;
- the exact O(N^2) filter against the lattice on 64x64 images (the exact one is far too slow at 224);
- CRF inference on a 500x375 image with 21 labels, 10 iterations: ours (cpu, cuda) against pydensecrf;
- the CRF's bilateral filter (sxy 121, srgb 5) on a photo with a large flat region, 500x375x21 (VOC) and
  640x480x81 (COCO): the lattice's hot vertices (tens of thousands of pixels on one), per backend; on the GPU
  also with one splat chunk per vertex, the splat before it was chunked.

Each filter call builds the lattice and filters (what the loss does every step).
Run with the others (`make bench`) or alone: `pytest benchmarks/bench_filters.py -p no:cacheprovider`.
"""
import json
import os
import statistics

import numpy as np
import pytest
import torch

from inputs import flat_photo, photo, photo_batch, probability_maps
from machine import machine_class
from support import BASELINES
from toco import crf, kernels
from toco.filters import bilateral_filter, lattice_features
from toco.losses import dense_crf_loss


def gpu_sync() -> None:
    """Called after GPU work inside a timed function, so the timing covers the kernels, not their launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
BACKENDS = ["cpu", pytest.param("cuda", marks=needs_gpu)]


def _native(backend: str):
    try:
        (kernels.load_cuda if backend == "cuda" else kernels.load_cpu)()
    except kernels.KernelBuildError as err:
        pytest.skip(f"{backend} extension unavailable: {err}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,sigma_xy", [(224, 50.0), (448, 100.0)], ids=["224-training", "448-full"])
def test_bilateral_filter(benchmark, backend, size, sigma_xy):
    _native(backend)
    device = "cuda" if backend == "cuda" else "cpu"
    image, probs = photo_batch(size).to(device), probability_maps(4, 21, (size, size)).to(device)

    def run():
        out = bilateral_filter(image, probs, sigma_xy, 15.0, backend)
        gpu_sync()
        return out

    run()  # warm-up: builds the extension, allocator
    out = benchmark.pedantic(run, rounds=10, iterations=1)
    benchmark.extra_info.update(backend=backend, device=device, shape=f"4x21x{size}x{size}")
    assert out.shape == probs.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.5, 1.0], ids=["448-at-0.5-training", "448-full"])
def test_dense_crf_loss(benchmark, backend, scale):
    """Forward and backward of the loss on a 448-px batch, with a pseudo label that ignores the unsure pixels."""
    _native(backend)
    device = "cuda" if backend == "cuda" else "cpu"
    image, probs = photo_batch(448).to(device), probability_maps(4, 21, (448, 448)).to(device)
    label = probs.argmax(dim=1).masked_fill(probs.max(dim=1).values < 0.5, 255)
    roi = torch.ones(4, 448, 448, device=device)
    probs.requires_grad_(True)

    def run():
        probs.grad = None
        loss = dense_crf_loss(image, probs, roi, label, sigma_xy=100.0, downscale=scale, backend=backend)
        loss.backward()
        gpu_sync()
        return loss

    run()
    loss = benchmark.pedantic(run, rounds=10, iterations=1)
    benchmark.extra_info.update(backend=backend, device=device, shape="4x21x448x448", scale=str(scale))
    assert torch.isfinite(loss) and torch.isfinite(probs.grad).all()


@pytest.mark.parametrize("backend", ["exact", "cpu"])
def test_bilateral_filter_small_exact_vs_lattice(benchmark, backend):
    if backend == "cpu":
        _native("cpu")
    image, probs = photo_batch(64), probability_maps(4, 21, (64, 64))
    out = benchmark.pedantic(bilateral_filter, args=(image, probs, 64 * 50 / 224, 15.0, backend), rounds=3,
                             iterations=1)
    assert out.shape == probs.shape


@pytest.fixture(scope="module")
def crf_case():
    return photo("astronaut", (375, 500)), probability_maps(1, 21, (375, 500))[0].numpy()


@pytest.mark.parametrize("impl", ["pydensecrf", "toco-cpu", "toco-cpu-lattice-spatial",
                                  pytest.param("toco-cuda", marks=needs_gpu)])
def test_crf_inference(benchmark, crf_case, impl):
    """One image, numpy in and labels out: on the GPU the timing includes the copies both ways."""
    pytest.importorskip("pydensecrf.densecrf")
    image, probs = crf_case
    if impl == "pydensecrf":
        fn = lambda: crf.pydensecrf_crf(image, probs)
    elif impl == "toco-cuda":
        _native("cuda")
        fn = lambda: crf.dense_crf(torch.from_numpy(image).cuda(), torch.from_numpy(probs).cuda(),
                                   backend="cuda").cpu().numpy()
    else:
        _native("cpu")
        fn = lambda: crf.dense_crf(image, probs, backend="cpu", exact_spatial=impl == "toco-cpu")
    labels = benchmark.pedantic(fn, rounds=20 if impl == "toco-cuda" else 5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(backend=impl, device="cuda" if impl == "toco-cuda" else "cpu", shape="21x375x500")
    assert labels.shape == (375, 500)
    assert np.mean(labels == crf.pydensecrf_crf(image, probs)) >= 0.99
    if impl == "pydensecrf" and os.environ.get("TOCO_BENCH_WRITE_BASELINE") == "1":
        # the reference the GPU check compares the CUDA CRF with where pydensecrf is not installed (single-threaded:
        # CPU time, the stored baselines' timer, is its wall time)
        path = BASELINES / machine_class() / "pydensecrf.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(ms=round(1000 * statistics.median(benchmark.stats.stats.data), 1),
                                        shape="21x375x500", n_iter=10), indent=1) + "\n")


@pytest.mark.parametrize("backend,max_chunk", [("cpu", None), pytest.param("cuda", 0, marks=needs_gpu),
                                               pytest.param("cuda", 1 << 30, marks=needs_gpu)],
                         ids=["cpu", "cuda-chunked", "cuda-one-chunk-per-vertex"])
@pytest.mark.parametrize("height,width,classes", [(375, 500, 21), (480, 640, 81)], ids=["voc", "coco"])
def test_bilateral_filter_on_a_flat_region(benchmark, backend, max_chunk, height, width, classes):
    """Build the lattice of the CRF's bilateral kernel over a photo whose top 60 % is one grey, then filter."""
    _native(backend)
    device = "cuda" if backend == "cuda" else "cpu"
    image = torch.from_numpy(flat_photo((height, width))).permute(2, 0, 1)[None].float()
    features = lattice_features(image, 121.0, 5.0).to(device)
    values = probability_maps(1, classes, (height, width))[0].reshape(1, classes, -1).to(device)
    module = kernels.load(backend)

    def run():
        lattice = module.build(features) if max_chunk is None else module.build(features, max_chunk)
        out = lattice.filter(values, 0)
        gpu_sync()
        return out

    out = benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(backend=backend if max_chunk is None else f"{backend} max_chunk={max_chunk}",
                                device=device, shape=f"{classes}x{height}x{width}")
    assert out.shape == values.shape and torch.isfinite(out).all()
