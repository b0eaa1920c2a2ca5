"""Bilateral filter backends (toco/filters.py, csrc/): the lattice against the exact O(N^2) sum, its algebra
(linearity, symmetry, adjoint), autograd, fallbacks, and the CUDA build."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from toco import filters, kernels
from toco.filters import BilateralFilter, Lattice, bilateral_filter, lattice_features

SIZE = 48
SIGMA_XY, SIGMA_RGB = SIZE * 50 / 224, 15.0  # the training geometry (224 px, sigma_xy 50) shrunk to SIZE px


def photo(name: str, size: int = SIZE) -> torch.Tensor:
    """skimage photograph, downscaled: (1,3,size,size) float in 0-255."""
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    im = getattr(skimage_data, name)()
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    im = resize(im[..., :3], (size, size), anti_aliasing=True, preserve_range=True).astype(np.float64)
    if im.max() <= 1.0:
        im = im * 255
    return torch.from_numpy(im).permute(2, 0, 1)[None].float()


def smooth_probs(k: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Segmentation-like softmax maps (1,k,size,size) in float64."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, k, 8, 8, generator=g) * 3
    return torch.softmax(torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear"), 1).double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def cpu_ext():
    try:
        return kernels.load_cpu()
    except kernels.KernelBuildError as err:  # pragma: no cover - a machine without a C++ compiler
        pytest.skip(f"CPU extension unavailable: {err}")


def test_exact_backend_is_the_dense_gaussian_sum():
    torch.manual_seed(0)
    img, vals = torch.rand(1, 3, 4, 5) * 255, torch.rand(1, 2, 4, 5, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    pos = torch.stack([ys, xs], -1).reshape(-1, 2).double()
    rgb = img[0].reshape(3, -1).t().double()
    w = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * 3.0 ** 2) - torch.cdist(rgb, rgb) ** 2 / (2 * 20.0 ** 2))
    expected = (w @ vals[0].reshape(2, -1).t()).t().reshape(1, 2, 4, 5)
    assert torch.allclose(bilateral_filter(img, vals, 3.0, 20.0, "exact"), expected)


# Measured relative errors |L x - W x| / |W x| of the calibrated lattice at this size (docs/kernels.md):
# photographs 0.07-0.15, a smooth random image ~0.18, per-pixel colour noise ~0.5 (the lattice's worst case).
@pytest.mark.parametrize("name,tol", [("astronaut", 0.2), ("chelsea", 0.2), ("coffee", 0.2), ("camera", 0.2)])
def test_cpu_lattice_close_to_exact_on_photographs(cpu_ext, name, tol):
    img, vals = photo(name), smooth_probs(5)
    exact = bilateral_filter(img, vals, SIGMA_XY, SIGMA_RGB, "exact")
    fast = bilateral_filter(img, vals, SIGMA_XY, SIGMA_RGB, "cpu")
    assert fast.dtype == vals.dtype and fast.shape == vals.shape
    assert rel_err(fast, exact) < tol
    assert 0.8 < (fast.sum() / exact.sum()).item() < 1.2  # the calibration keeps the total within 20%


def test_cpu_lattice_on_random_images(cpu_ext):
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6) * 255, size=(SIZE, SIZE), mode="bicubic",
                                             align_corners=False).clamp(0, 255)
    noise = torch.rand(1, 3, SIZE, SIZE) * 255
    vals = torch.rand(1, 4, SIZE, SIZE, dtype=torch.float64)
    for img, tol in [(smooth, 0.3), (noise, 0.6)]:
        exact = bilateral_filter(img, vals, SIGMA_XY, SIGMA_RGB, "exact")
        assert rel_err(bilateral_filter(img, vals, SIGMA_XY, SIGMA_RGB, "cpu"), exact) < tol


def test_lattice_filter_is_linear_symmetric_and_its_orders_are_transposes(cpu_ext):
    torch.manual_seed(0)
    lat = Lattice(lattice_features(photo("astronaut", 32), 8.0, 10.0), "cpu")
    x, y = torch.randn(1, 3, 32 * 32), torch.randn(1, 3, 32 * 32)
    dot = lambda a, b: (a.double() * b.double()).sum().item()
    sym = lambda v: lat.filter(v, "symmetric")
    assert dot(sym(x), y) == pytest.approx(dot(x, sym(y)), rel=1e-5)
    assert dot(lat.filter(x, "forward"), y) == pytest.approx(dot(x, lat.filter(y, "reverse")), rel=1e-5)
    assert torch.allclose(sym(2 * x - 3 * y), 2 * sym(x) - 3 * sym(y), atol=1e-4, rtol=1e-4)
    # the forward order alone is measurably asymmetric: that is why the loss uses the symmetric mean
    assert abs(dot(lat.filter(x, "forward"), y) - dot(x, lat.filter(y, "forward"))) > 1e-3 * abs(dot(sym(x), y))


def test_lattice_pre_post_scale_and_accumulate(cpu_ext):
    torch.manual_seed(0)
    lat = Lattice(lattice_features(photo("coffee", 24), 6.0, 12.0), "cpu")
    x, pre, post = torch.rand(1, 5, 576), torch.rand(1, 576), torch.rand(1, 576)
    out = torch.ones(1, 5, 576)
    lat.filter(x, "forward", 2.5, pre, post, out=out)
    expected = 1 + 2.5 * post[:, None] * lat.filter(x * pre[:, None], "forward")
    assert torch.allclose(out, expected, atol=1e-5)


def test_batch_images_are_filtered_independently(cpu_ext):
    img = torch.cat([photo("astronaut", 32), photo("chelsea", 32)])
    vals = torch.rand(2, 3, 32, 32)
    batched = bilateral_filter(img, vals, 7.0, 15.0, "cpu")
    for i in range(2):
        assert torch.allclose(batched[i:i + 1], bilateral_filter(img[i:i + 1], vals[i:i + 1], 7.0, 15.0, "cpu"))


def test_gradcheck_through_the_exact_filter():
    torch.manual_seed(0)
    img = torch.rand(1, 3, 5, 4, dtype=torch.float64) * 255
    vals = torch.rand(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    filt = BilateralFilter(img, 2.0, 40.0, backend="exact")
    assert torch.autograd.gradcheck(lambda v: filt(v) * v.sin(), (vals,))  # non-linear around the filter


def test_fast_filter_backward_is_the_filter_of_the_gradient(cpu_ext):
    torch.manual_seed(0)
    img = photo("chelsea", 32)
    filt = BilateralFilter(img, 7.0, 15.0, backend="cpu")
    vals = torch.rand(1, 3, 32, 32, requires_grad=True)
    grad_out = torch.randn(1, 3, 32, 32)
    filt(vals).backward(grad_out)
    assert torch.allclose(vals.grad, filt(grad_out), atol=1e-6)


def test_backend_resolution_and_fallback(cpu_ext, monkeypatch):
    cpu = torch.device("cpu")
    assert filters.resolve_backend("auto", cpu) == "cpu"
    assert filters.resolve_backend("exact", cpu) == "exact"
    with pytest.raises(ValueError, match="needs tensors on a GPU"):
        filters.resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="unknown bilateral filter backend"):
        bilateral_filter(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2), 1.0, 1.0, "bogus")
    # an extension that cannot be built degrades to the exact filter
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: None)
    assert filters.resolve_backend("cpu", cpu) == "exact"
    assert filters.resolve_backend("auto", cpu) == "exact"
    img, vals = photo("astronaut", 16), torch.rand(1, 2, 16, 16)
    assert torch.equal(bilateral_filter(img, vals, 4.0, 15.0, "cpu"), bilateral_filter(img, vals, 4.0, 15.0, "exact"))


def test_failed_build_warns_once_and_returns_none(monkeypatch):
    def broken():
        raise kernels.KernelBuildError("no compiler here")

    quiet = kernels._quiet(broken)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert quiet() is None
    assert quiet() is None  # cached: no second warning, no second build


def test_gaussian_blur_is_the_exact_spatial_gaussian(cpu_ext):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 13, 17)
    ys, xs = torch.meshgrid(torch.arange(13.0), torch.arange(17.0), indexing="ij")
    feats = torch.stack([xs, ys], -1).reshape(-1, 2) / 1.5
    expected = torch.stack([filters.gaussian_filter_exact(feats, x[b].reshape(3, -1).t()).t() for b in range(2)])
    blurred = cpu_ext.gaussian_blur(x, 1.5, 6)  # radius 4 sigma: truncation below 1e-3 relative
    assert torch.allclose(blurred.reshape(2, 3, -1), expected.float(), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# CUDA: the extension must compile wherever nvcc is; numerical checks need a GPU.
def test_cuda_extension_compiles_and_imports():
    home = kernels.cuda_home()
    if not home or not Path(home, "bin", "nvcc").exists():
        pytest.skip(f"nvcc not found (CUDA_HOME={home!r}, nvcc on PATH: {shutil.which('nvcc')})")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: CUDA extensions cannot be compiled against it")
    module = kernels.load_cuda()
    assert hasattr(module, "build") and hasattr(module, "Lattice")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.cuda
@needs_gpu
def test_cuda_lattice_matches_cpu_lattice(cpu_ext):
    img = torch.cat([photo("astronaut"), photo("coffee")])
    vals = torch.cat([smooth_probs(6, seed=0), smooth_probs(6, seed=1)]).float()
    on_cpu = bilateral_filter(img, vals, SIGMA_XY, SIGMA_RGB, "cpu")
    on_gpu = bilateral_filter(img.cuda(), vals.cuda(), SIGMA_XY, SIGMA_RGB, "cuda")
    assert on_gpu.is_cuda
    assert rel_err(on_gpu.cpu(), on_cpu) < 1e-4  # the same lattice: only the summation order differs
    feats = lattice_features(img, SIGMA_XY, SIGMA_RGB)
    for mode in ["forward", "reverse", "symmetric"]:
        a = Lattice(feats, "cpu").filter(vals.reshape(2, 6, -1), mode)
        b = Lattice(feats.cuda(), "cuda").filter(vals.cuda().reshape(2, 6, -1), mode).cpu()
        assert rel_err(b, a) < 1e-4, mode


@pytest.mark.cuda
@needs_gpu
def test_cuda_filter_algebra_and_autograd():
    torch.manual_seed(0)
    img = photo("chelsea", 32).cuda()
    filt = BilateralFilter(img, 7.0, 15.0, backend="auto")
    assert filt.backend == "cuda"
    x, y = torch.randn(1, 3, 32, 32, device="cuda"), torch.randn(1, 3, 32, 32, device="cuda")
    assert (filt(x) * y).sum().item() == pytest.approx((x * filt(y)).sum().item(), rel=1e-4)
    vals = x.clone().requires_grad_()
    filt(vals).backward(y)
    assert torch.allclose(vals.grad, filt(y), atol=1e-5)
    exact = bilateral_filter(img, x.double(), 7.0, 15.0, "exact")
    assert rel_err(filt(x).double(), exact) < 0.25
