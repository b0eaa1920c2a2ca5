"""Bilateral filter and DenseCRF benchmarks (docs/kernels.md lists the measured numbers).

- the DenseCRF-loss filter at the training setting: batch 4, 21 channels, 224x224 (448 at scale 0.5),
  sigma_xy 50, sigma_rgb 15; and at full resolution 448x448 (sigma_xy 100); per backend (cpu, cuda if present);
- the exact O(N^2) filter against the lattice on 64x64 images (the exact one is far too slow at 224);
- CRF inference on a 500x375 image with 21 labels, 10 iterations: ours against pydensecrf.

Each filter call builds the lattice and filters (what the loss does every step).
Run with the others (`make bench`) or alone: `pytest benchmarks/bench_filters.py -p no:cacheprovider`.
"""
import numpy as np
import pytest
import torch

from toco import crf, kernels
from toco.filters import bilateral_filter

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """(H,W,3) uint8 skimage photograph resized to size."""
    from skimage import data
    from skimage.transform import resize

    return (resize(getattr(data, name)(), size, anti_aliasing=True) * 255).round().astype(np.uint8)


def photo_batch(size: int) -> torch.Tensor:
    """(4,3,size,size) float 0-255: the four PHOTOS."""
    return torch.stack([torch.from_numpy(photo(n, (size, size))).permute(2, 0, 1).float() for n in PHOTOS])


def probability_maps(batch: int, k: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Softmax of smooth random logits plus noise (what a segmentation head produces): (batch,k,H,W)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k, max(2, size[0] // 16), max(2, size[1] // 16), generator=g) * 3
    logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return torch.softmax(logits + torch.randn(batch, k, *size, generator=g), dim=1)


def gpu_sync() -> None:
    """Called after GPU work inside a timed function, so the timing covers the kernels, not their launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


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
    assert out.shape == probs.shape


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


@pytest.mark.parametrize("impl", ["pydensecrf", "toco-cpu", "toco-cpu-lattice-spatial"])
def test_crf_inference(benchmark, crf_case, impl):
    pytest.importorskip("pydensecrf.densecrf")
    image, probs = crf_case
    if impl == "pydensecrf":
        fn = lambda: crf.pydensecrf_crf(image, probs)
    else:
        _native("cpu")
        fn = lambda: crf.dense_crf(image, probs, backend="cpu", exact_spatial=impl == "toco-cpu")
    labels = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    assert labels.shape == (375, 500)
    assert np.mean(labels == crf.pydensecrf_crf(image, probs)) >= 0.99
