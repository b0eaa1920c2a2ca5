"""DenseCRF inference (toco/crf.py) against pydensecrf, the original's post-processing."""
import numpy as np
import pytest
import torch

from toco import crf, kernels

pytest.importorskip("pydensecrf.densecrf")


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """skimage photograph resized to size: (H,W,3) uint8."""
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    return (resize(getattr(skimage_data, name)(), size, anti_aliasing=True) * 255).round().astype(np.uint8)


def noisy_probs(k: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """A blocky class layout (what a segmentation network gives) plus per-pixel noise, softmaxed: (k,H,W)."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    h, w = size
    coarse = rng.normal(size=(k, max(2, h // 30), max(2, w // 30))) * 2.5
    logits = np.stack([resize(c, size, order=1) for c in coarse]) + rng.normal(size=(k, h, w)) * 1.5
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def cpu_ext():
    try:
        return kernels.load_cpu()
    except kernels.KernelBuildError as err:  # pragma: no cover
        pytest.skip(f"CPU extension unavailable: {err}")


CASES = [("astronaut", (90, 120), 0), ("chelsea", (100, 150), 1), ("coffee", (80, 120), 2)]


# Measured agreement with pydensecrf: 100.0% with its lattice spatial kernel, 99.80-99.87% with the exact one.
@pytest.mark.parametrize("name,size,seed", CASES)
def test_dense_crf_agrees_with_pydensecrf(name, size, seed):
    image, probs = photo(name, size), noisy_probs(21, size, seed)
    reference = crf.pydensecrf_crf(image, probs)
    assert np.mean(reference != probs.argmax(0)) > 0.05  # the CRF does change the labels: a meaningful check
    ours = crf.dense_crf(image, probs, backend="cpu")
    assert ours.shape == size and ours.dtype == np.int64
    assert np.mean(ours == reference) >= 0.99
    lattice_spatial = crf.dense_crf(image, probs, backend="cpu", exact_spatial=False)
    assert np.mean(lattice_spatial == reference) >= 0.999


def test_dense_crf_parameters_are_honoured():
    image, probs = photo("astronaut", (60, 80)), noisy_probs(5, (60, 80), 3)
    for kwargs in [dict(n_iter=3, bil_compat=10.0, bil_srgb=13.0), dict(n_iter=0), dict(gauss_sxy=3.0, gauss_compat=3.0)]:
        reference = crf.pydensecrf_crf(image, probs, **kwargs)
        assert np.mean(crf.dense_crf(image, probs, backend="cpu", **kwargs) == reference) >= 0.99, kwargs
    assert np.array_equal(crf.dense_crf(image, probs, n_iter=0, backend="cpu"), probs.argmax(0))


def test_dense_crf_input_forms():
    image, probs = photo("chelsea", (40, 50)), noisy_probs(4, (40, 50), 4)
    labels = crf.dense_crf(image, probs)
    as_tensor = crf.dense_crf(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(probs))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.int64
    assert np.array_equal(as_tensor.numpy(), labels)
    q = crf.dense_crf_probs(image, probs, backend="cpu")
    assert q.shape == (4, 40, 50) and torch.allclose(q.sum(0), torch.ones(40, 50), atol=1e-5)
    with pytest.raises(ValueError, match="differ in size"):
        crf.dense_crf(image[:-1], probs)


def test_exact_backend_and_pydensecrf_backend():
    image, probs = photo("coffee", (24, 32), ), noisy_probs(4, (24, 32), 5)
    reference = crf.pydensecrf_crf(image, probs)
    assert np.array_equal(crf.dense_crf(image, probs, backend="pydensecrf"), reference)
    # the exact bilateral kernel differs from the lattice's approximation, but not by much
    assert np.mean(crf.dense_crf(image, probs, backend="exact") == reference) >= 0.95


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dense_crf_on_gpu_agrees_with_cpu():
    image, probs = photo("astronaut", (90, 120)), noisy_probs(21, (90, 120), 0)
    on_gpu = crf.dense_crf(torch.from_numpy(image).cuda(), torch.from_numpy(probs).cuda(), backend="auto")
    assert on_gpu.is_cuda
    assert np.mean(on_gpu.cpu().numpy() == crf.dense_crf(image, probs, backend="cpu")) >= 0.999
