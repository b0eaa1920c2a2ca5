"""DenseCRF inference (toco/crf.py): against pydensecrf, the original's post-processing (where it is installed),
and on the GPU against the CPU lattice CRF, the same algorithm (no pydensecrf needed)."""
import importlib

import numpy as np
import pytest
import torch

from toco import crf, kernels


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


def needs_pydensecrf():
    pytest.importorskip("pydensecrf.densecrf")


def broken(reason: str):
    """A stand-in for kernels.load_cpu / load_cuda whose build failed."""
    def load():
        raise kernels.KernelBuildError(reason)
    return load


@pytest.fixture(scope="module")
def cpu_ext():
    try:
        return kernels.load_cpu()
    except kernels.KernelBuildError as err:  # pragma: no cover
        pytest.skip(f"CPU extension unavailable: {err}")


CASES = [("astronaut", (90, 120), 0), ("chelsea", (100, 150), 1), ("coffee", (80, 120), 2)]


# Measured agreement with pydensecrf: 100.0% with its lattice spatial kernel, 99.80-99.87% with the exact one.
@pytest.mark.parametrize("name,size,seed", CASES)
def test_dense_crf_agrees_with_pydensecrf(cpu_ext, name, size, seed):
    needs_pydensecrf()
    image, probs = photo(name, size), noisy_probs(21, size, seed)
    reference = crf.pydensecrf_crf(image, probs)
    assert np.mean(reference != probs.argmax(0)) > 0.05  # the CRF does change the labels: a meaningful check
    ours = crf.dense_crf(image, probs, backend="cpu")
    assert ours.shape == size and ours.dtype == np.int64
    assert np.mean(ours == reference) >= 0.99
    lattice_spatial = crf.dense_crf(image, probs, backend="cpu", exact_spatial=False)
    assert np.mean(lattice_spatial == reference) >= 0.999


def test_dense_crf_parameters_are_honoured(cpu_ext):
    needs_pydensecrf()
    image, probs = photo("astronaut", (60, 80)), noisy_probs(5, (60, 80), 3)
    for kwargs in [dict(n_iter=3, bil_compat=10.0, bil_srgb=13.0), dict(n_iter=0), dict(gauss_sxy=3.0, gauss_compat=3.0)]:
        reference = crf.pydensecrf_crf(image, probs, **kwargs)
        assert np.mean(crf.dense_crf(image, probs, backend="cpu", **kwargs) == reference) >= 0.99, kwargs
    assert np.array_equal(crf.dense_crf(image, probs, n_iter=0, backend="cpu"), probs.argmax(0))


def test_dense_crf_input_forms(cpu_ext):
    image, probs = photo("chelsea", (40, 50)), noisy_probs(4, (40, 50), 4)
    labels = crf.dense_crf(image, probs)
    as_tensor = crf.dense_crf(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(probs))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.int64
    assert np.array_equal(as_tensor.numpy(), labels)
    q = crf.dense_crf_probs(image, probs, backend="cpu")
    assert q.shape == (4, 40, 50) and torch.allclose(q.sum(0), torch.ones(40, 50), atol=1e-5)
    with pytest.raises(ValueError, match="differ in size"):
        crf.dense_crf(image[:-1], probs)
    transposed = np.ascontiguousarray(probs.transpose(1, 2, 0)).transpose(2, 0, 1)  # (K,H,W), channels last
    assert not transposed.flags.c_contiguous
    assert np.array_equal(crf.dense_crf(image, transposed, backend="cpu"), crf.dense_crf(image, probs, backend="cpu"))


def test_exact_backend_and_pydensecrf_backend():
    needs_pydensecrf()
    image, probs = photo("coffee", (24, 32), ), noisy_probs(4, (24, 32), 5)
    reference = crf.pydensecrf_crf(image, probs)
    assert np.array_equal(crf.dense_crf(image, probs, backend="pydensecrf"), reference)
    # the exact bilateral kernel differs from the lattice's approximation, but not by much
    assert np.mean(crf.dense_crf(image, probs, backend="exact") == reference) >= 0.95


def test_without_native_kernels(monkeypatch):
    """'cpu' fails with the build's reason; 'auto' falls back to the exact CRF where pydensecrf is not installed,
    with a warning naming it."""
    image, probs = photo("coffee", (12, 16)), noisy_probs(3, (12, 16), 6)
    monkeypatch.setattr(kernels, "load_cpu", broken("g++: not found (crf fallback test)"))
    with pytest.raises(kernels.KernelBuildError, match="crf fallback test"):
        crf.dense_crf(image, probs, backend="cpu")
    monkeypatch.setattr(crf, "_pydensecrf_installed", lambda: False)
    with pytest.warns(RuntimeWarning, match="falls back to 'exact'"):
        labels = crf.dense_crf(image, probs, backend="auto")
    assert np.array_equal(labels, crf.dense_crf(image, probs, backend="exact"))


def test_without_native_kernels_auto_runs_pydensecrf(monkeypatch):
    needs_pydensecrf()
    image, probs = photo("coffee", (12, 16)), noisy_probs(3, (12, 16), 6)
    monkeypatch.setattr(kernels, "load_cpu", broken("g++: not found (crf fallback to pydensecrf test)"))
    with pytest.warns(RuntimeWarning, match="falls back to 'pydensecrf'"):
        labels = crf.dense_crf(image, probs, backend="auto")
    assert np.array_equal(labels, crf.pydensecrf_crf(image, probs))


# ----------------------------------------------------------------------------------------------------
# GPU: compared with the CPU lattice CRF. pydensecrf is not needed, and where there is a GPU nothing else these
# tests use may be missing: the `gpu` fixture fails rather than skips.
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def gpu():
    importlib.import_module("skimage.data")  # the photographs: missing here, it must fail the tests, not skip them

    return kernels.load_cpu(), kernels.load_cuda()


def gpu_inputs(image: np.ndarray, probs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(image).cuda(), torch.from_numpy(probs).cuda()


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("exact_spatial", [True, False], ids=["exact-spatial", "lattice-spatial"])
def test_dense_crf_on_gpu_agrees_with_the_cpu_lattice_crf(gpu, exact_spatial):
    """Same algorithm on both; the inputs to the lattices are rounded differently in the last bit (features are
    computed on each device), which moves the marginals by ~1e-6 on average (measured on the CPU with perturbed
    sigmas: mean |dQ| < 5e-7, labels unchanged): the bounds leave a wide margin."""
    image, probs = photo("astronaut", (90, 120)), noisy_probs(21, (90, 120), 0)
    img_gpu, probs_gpu = gpu_inputs(image, probs)
    q_cpu = crf.dense_crf_probs(image, probs, backend="cpu", exact_spatial=exact_spatial)
    q_gpu = crf.dense_crf_probs(img_gpu, probs_gpu, backend="cuda", exact_spatial=exact_spatial)
    assert q_gpu.is_cuda and q_gpu.shape == q_cpu.shape
    assert (q_gpu.cpu() - q_cpu).abs().mean().item() < 1e-4
    on_cpu = crf.dense_crf(image, probs, backend="cpu", exact_spatial=exact_spatial)
    assert np.mean(on_cpu != probs.argmax(0)) > 0.05  # the CRF does change the labels: a meaningful check
    on_gpu = crf.dense_crf(img_gpu, probs_gpu, backend="auto", exact_spatial=exact_spatial)
    assert on_gpu.is_cuda and on_gpu.dtype == torch.int64
    assert np.mean(on_gpu.cpu().numpy() == on_cpu) >= 0.999


@pytest.mark.cuda
@needs_gpu
def test_dense_crf_cpu_backend_takes_gpu_tensors(gpu, monkeypatch):
    """With the cpu backend (named, or what 'auto' falls back to when the CUDA build fails) the CRF runs on the
    CPU copy of its inputs: exactly the CPU result, returned on the GPU."""
    image, probs = photo("chelsea", (100, 150)), noisy_probs(21, (100, 150), 1)
    img_gpu, probs_gpu = gpu_inputs(image, probs)
    q_cpu = crf.dense_crf_probs(image, probs, backend="cpu")
    q = crf.dense_crf_probs(img_gpu, probs_gpu, backend="cpu")
    assert q.is_cuda and torch.equal(q.cpu(), q_cpu)
    expected = crf.dense_crf(image, probs, backend="cpu")
    labels = crf.dense_crf(img_gpu, probs_gpu, backend="cpu")
    assert labels.is_cuda and np.array_equal(labels.cpu().numpy(), expected)
    monkeypatch.setattr(kernels, "load_cuda", broken("nvcc: cannot run (crf gpu fallback test)"))
    with pytest.warns(RuntimeWarning, match="falls back to 'cpu'"):
        labels = crf.dense_crf(img_gpu, probs_gpu, backend="auto")
    assert labels.is_cuda and np.array_equal(labels.cpu().numpy(), expected)
    with pytest.raises(kernels.KernelBuildError, match="crf gpu fallback test"):
        crf.dense_crf(img_gpu, probs_gpu, backend="cuda")
