"""Bilateral filter backends (toco/filters.py, csrc/): the lattice against the exact O(N^2) sum, its algebra
(linearity, symmetry, adjoint), autograd, fallbacks, and the CUDA build."""
import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

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


def broken(reason: str):
    """A stand-in for kernels.load_cpu / load_cuda whose build failed."""
    def load():
        raise kernels.KernelBuildError(reason)
    return load


def test_backend_resolution(cpu_ext):
    cpu = torch.device("cpu")
    assert filters.resolve_backend("auto", cpu) == "cpu"
    assert filters.resolve_backend("cpu", cpu) == "cpu"
    assert filters.resolve_backend("exact", cpu) == "exact"
    with pytest.raises(ValueError, match="needs tensors on a GPU"):
        filters.resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="unknown bilateral filter backend"):
        bilateral_filter(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2), 1.0, 1.0, "bogus")


def test_a_named_backend_that_cannot_build_fails_with_the_build_error(monkeypatch):
    monkeypatch.setattr(kernels, "load_cpu", broken("cc1plus: out of memory"))
    monkeypatch.setattr(kernels, "load_cuda", broken("nvcc fatal: unsupported gpu architecture"))
    with pytest.raises(kernels.KernelBuildError, match="cc1plus: out of memory"):
        filters.resolve_backend("cpu", torch.device("cpu"))
    with pytest.raises(kernels.KernelBuildError, match="unsupported gpu architecture"):
        filters.resolve_backend("cuda", torch.device("cuda"))  # a device name is enough: nothing runs on it
    img, vals = torch.rand(1, 3, 4, 4) * 255, torch.rand(1, 2, 4, 4)
    with pytest.raises(kernels.KernelBuildError, match="cc1plus"):
        bilateral_filter(img, vals, 2.0, 15.0, "cpu")
    with pytest.raises(kernels.KernelBuildError, match="cc1plus"):
        Lattice(lattice_features(img, 2.0, 15.0), "cpu")


def test_auto_falls_back_with_one_warning_naming_the_backend_it_runs(cpu_ext, monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(kernels, "load_cuda", broken("nvcc: no such file (auto-to-cpu test)"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # only resolve_backend's own bookkeeping may keep the second one quiet
        assert filters.resolve_backend("auto", gpu) == "cpu"
        assert filters.resolve_backend("auto", gpu) == "cpu"
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "nvcc: no such file (auto-to-cpu test)" in str(caught[0].message)
    assert "falls back to 'cpu'" in str(caught[0].message)

    monkeypatch.setattr(kernels, "load_cpu", broken("no compiler (auto-to-exact test)"))
    with pytest.warns(RuntimeWarning, match=r"(?s)no compiler \(auto-to-exact test\).*falls back to 'exact'"):
        assert filters.resolve_backend("auto", torch.device("cpu")) == "exact"
    with pytest.warns(RuntimeWarning) as both:
        assert filters.resolve_backend("auto", gpu, last_resort="pydensecrf") == "pydensecrf"
    assert len(both) == 1  # one warning for the whole chain, with each reason
    assert all(s in str(both[0].message) for s in ["nvcc: no such", "no compiler", "falls back to 'pydensecrf'"])
    img, vals = photo("astronaut", 16), torch.rand(1, 2, 16, 16)
    assert torch.equal(bilateral_filter(img, vals, 4.0, 15.0, "auto"), bilateral_filter(img, vals, 4.0, 15.0, "exact"))


def test_a_build_is_tried_once_and_its_failure_raised_again():
    calls = []

    def failing():
        calls.append(1)
        raise kernels.KernelBuildError("ld: cannot find -lc10")

    load = kernels._once(failing)
    for _ in range(3):
        with pytest.raises(kernels.KernelBuildError, match="cannot find -lc10"):
            load()
    assert len(calls) == 1
    module = object()
    load = kernels._once(lambda: calls.append(2) or module)
    assert load() is module and load() is module and calls.count(2) == 1


def test_cuda_arches_come_from_the_visible_gpu_else_torch_cuda_arch_list(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for listed, arches in [("", ["80"]), ("  ", ["80"]), ("9.0", ["90"]), ("8.0;9.0+PTX", ["80", "90"]),
                           ("10.0 9.0,8.6", ["86", "90", "100"]), ("9.0a", ["90a"])]:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", listed)
        assert kernels.cuda_arches() == arches, listed
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert kernels.cuda_arches() == ["80"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0;Hopper")
    with pytest.raises(kernels.KernelBuildError, match="TORCH_CUDA_ARCH_LIST: 'Hopper' is not a compute capab"):
        kernels.cuda_arches()
    # a visible GPU decides, whatever the variable says: an H200 is compute capability 9.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    assert kernels.cuda_arches() == ["90"]
    assert kernels.cuda_arch_flags(["90"]) == ["-gencode=arch=compute_90,code=sm_90",
                                               "-gencode=arch=compute_90,code=compute_90"]
    assert kernels.cuda_arch_flags(["80", "90"])[-1] == "-gencode=arch=compute_90,code=compute_90"


def test_cuda_home_is_found_from_the_nvcc_on_path(monkeypatch, tmp_path):
    """A toolkit reachable only through PATH (no CUDA_HOME, none at /usr/local/cuda) is found and exported; an
    nvcc on PATH without a toolkit around it (a wrapper) is not taken for one."""
    for toolkit in ("cuda", "wrapper"):
        (tmp_path / toolkit / "bin").mkdir(parents=True)
        nvcc = tmp_path / toolkit / "bin" / "nvcc"
        nvcc.write_text("#!/bin/sh\n")
        nvcc.chmod(0o755)
    (tmp_path / "cuda" / "include").mkdir()
    (tmp_path / "cuda" / "include" / "cuda.h").touch()
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(nvcc.parent))
    monkeypatch.setattr(kernels, "DEFAULT_CUDA_HOME", str(tmp_path / "none"))
    assert kernels.cuda_home() == str(tmp_path / "cuda") == os.environ["CUDA_HOME"]
    monkeypatch.setenv("CUDA_HOME", "/opt/elsewhere")  # set explicitly, it wins
    assert kernels.cuda_home() == "/opt/elsewhere"
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "wrapper" / "bin"))  # an nvcc with no toolkit around it
    assert kernels.cuda_home() is None


def test_cuda_build_is_named_after_its_arches(monkeypatch, tmp_path):
    """The arches are in the build directory's name (the cache key on disk) and in the nvcc flags."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kernels, "_cpp_extension", lambda: SimpleNamespace())
    builds = []
    monkeypatch.setattr(kernels, "_load", lambda name, sources, what, time, **kw: builds.append((name, what, kw)))
    for listed in ["9.0", "8.0;9.0"]:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", listed)
        kernels.load_cuda.__wrapped__()  # the builder itself: load_cuda would remember the first outcome
    (sm90, what, flags), (both, _, both_flags) = builds
    assert sm90 == "toco_permutohedral_cuda_sm90" and both == "toco_permutohedral_cuda_sm80_sm90"
    assert "sm_90" in what
    assert "-gencode=arch=compute_90,code=sm_90" in flags["extra_cuda_cflags"]
    assert "-gencode=arch=compute_80,code=sm_80" in both_flags["extra_cuda_cflags"]


def test_first_use_compile_says_so_once_and_any_tree_with_the_same_sources_shares_the_build(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    loads = []
    monkeypatch.setattr(kernels, "_cpp_extension", lambda: SimpleNamespace(load=lambda **kw: loads.append(kw)))
    trees = [tmp_path / "checkout", tmp_path / "job_copy"]  # e.g. this checkout and a Ray job's working dir
    for tree in trees:
        tree.mkdir()
        (tree / "probe.cpp").write_bytes((kernels.CSRC / "permutohedral_cpu.cpp").read_bytes())

    def load(tree):
        kernels._load("toco_probe", [tree / "probe.cpp"], "probe kernel", "7 s")
        return capsys.readouterr().err

    assert load(trees[0]).strip() == "compiling the probe kernel (first use, about 7 s)..."
    build = Path(loads[0]["build_directory"])
    (build / "toco_probe.so").touch()
    assert load(trees[0]) == "" and load(trees[1]) == ""  # built: cpp_extension only imports it, for either tree
    assert {kw["build_directory"] for kw in loads} == {str(build)}
    assert {tuple(kw["sources"]) for kw in loads} == {(str(build / "src" / "probe.cpp"),)}  # one path: no rebuild
    assert (build / "src" / "probe.cpp").read_bytes() == (trees[1] / "probe.cpp").read_bytes()
    (trees[1] / "probe.cpp").write_bytes((trees[1] / "probe.cpp").read_bytes() + b"\n// edited\n")
    assert "compiling the probe kernel" in load(trees[1])  # other sources: a build of their own
    assert loads[-1]["build_directory"] != str(build)


def test_cpp_extension_import_hides_the_no_cuda_runtime_line(tmp_path):
    """On a machine with a CUDA toolkit but no usable GPU, importing torch.utils.cpp_extension logs "No CUDA
    runtime is found": kernels._cpp_extension imports it without that line."""
    (tmp_path / "bin").mkdir()
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    run = lambda code: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      cwd=Path(__file__).parent.parent, timeout=300)
    plain = run("import torch.utils.cpp_extension")
    assert plain.returncode == 0 and "No CUDA runtime is found" in plain.stderr  # torch does log it here
    ours = run("from toco import kernels; kernels._cpp_extension()")
    assert ours.returncode == 0, ours.stderr
    assert "No CUDA runtime" not in ours.stderr + ours.stdout


def test_gaussian_blur_is_the_exact_spatial_gaussian(cpu_ext):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 13, 17)
    ys, xs = torch.meshgrid(torch.arange(13.0), torch.arange(17.0), indexing="ij")
    feats = torch.stack([xs, ys], -1).reshape(-1, 2) / 1.5
    expected = torch.stack([filters.gaussian_filter_exact(feats, x[b].reshape(3, -1).t()).t() for b in range(2)])
    blurred = cpu_ext.gaussian_blur(x, 1.5, 6)  # radius 4 sigma: truncation below 1e-3 relative
    assert torch.allclose(blurred.reshape(2, 3, -1), expected.float(), rtol=1e-3, atol=1e-3)


def flat_region_image(height: int = 375, width: int = 500) -> torch.Tensor:
    """(1,3,H,W) in 0-255: a photograph with a uniform grey block over 60 % of it, the lattice's hot-vertex case
    (thousands of pixels of one colour within one sigma_xy land on the same vertices)."""
    image = photo("astronaut", 64)
    image = torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
    image[..., : int(0.6 * height), :] = 128.0
    return image


def crf_features(image: torch.Tensor) -> torch.Tensor:
    """The CRF's bilateral kernel (sxy 121, srgb 5) on `image`: what the GPU check's CRF case filters."""
    return lattice_features(image, 121.0, 5.0)


@pytest.mark.parametrize("max_chunk", [0, 1, 7, 10 ** 6])
def test_splat_plan_sums_each_vertex_exactly_once_in_bounded_chunks(cpu_ext, max_chunk):
    """The CUDA splat's plan (csrc/splat_plan.h), on the real entries of an image with a large flat region: its
    chunks partition each vertex's run of sorted entries, no chunk holds more than C entries nor does a vertex
    hold more than about sqrt(largest run) chunks with the automatic C, and summing chunk by chunk, then vertex
    by vertex, gives every vertex's direct sum."""
    lattice = cpu_ext.build(crf_features(flat_region_image(120, 160)))
    rows, m = lattice.entry_rows(0).long(), lattice.num_vertices
    order, chunk_start, chunk_end, vertex_chunks, chunk_size = cpu_ext.splat_plan(rows.int(), m, max_chunk)
    counts = torch.bincount(rows, minlength=m + 1)[1:]
    assert counts.max() > 50 * counts.float().median()  # a hot vertex: the case the plan is for
    assert torch.equal(rows[order], rows.sort(stable=True).values)
    sizes = (chunk_end - chunk_start).long()
    assert (sizes >= 1).all() and sizes.max() <= chunk_size
    assert chunk_size == (max_chunk or max(16, int(np.ceil(np.sqrt(counts.max().item())))))
    chunks_per_vertex = vertex_chunks.diff().long()
    assert torch.equal(chunks_per_vertex, (counts + chunk_size - 1) // chunk_size)
    if not max_chunk:  # no thread of either pass adds more than ~2 sqrt(largest run) terms
        assert chunks_per_vertex.max() <= chunk_size + 1
    assert chunk_start[0] == 0 and chunk_end[-1] == rows.numel() and torch.equal(chunk_end[:-1], chunk_start[1:])

    values = torch.rand(rows.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    running = torch.cat([torch.zeros(1, dtype=torch.float64), values[order].cumsum(0)])
    partial = running[chunk_end.long()] - running[chunk_start.long()]          # pass 1: one sum per chunk
    by_chunk = torch.cat([torch.zeros(1, dtype=torch.float64), partial.cumsum(0)])
    per_vertex = by_chunk[vertex_chunks[1:].long()] - by_chunk[vertex_chunks[:-1].long()]  # pass 2
    direct = torch.zeros(m + 1, dtype=torch.float64).index_add_(0, rows, values)[1:]
    torch.testing.assert_close(per_vertex, direct, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# CUDA: compiled and checked on a GPU machine (`make gpu-check` runs these); skipped elsewhere.
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: make gpu-check builds it there")
def test_cuda_extension_compiles_and_imports():
    home = kernels.cuda_home()
    if not home or not Path(home, "bin", "nvcc").exists():
        pytest.skip(f"nvcc not found (CUDA_HOME={home!r}, nvcc on PATH: {shutil.which('nvcc')})")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: CUDA extensions cannot be compiled against it")
    module = kernels.load_cuda()
    assert hasattr(module, "build") and hasattr(module, "Lattice")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def gpu():
    """Both extensions, for the tests that need a GPU. Where there is one, nothing they use may be missing: a
    failed build or a missing scikit-image fails them instead of skipping them."""
    importlib.import_module("skimage.data")  # the photographs: missing here, it must fail the tests, not skip them

    return kernels.load_cpu(), kernels.load_cuda()


def random_features(d: int, n: int = 3000, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """(batch, n, d) float32 features: Gaussian clouds around a few centres, so that points share simplices."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, 8, d, generator=g) * 4
    pick = torch.randint(0, 8, (batch, n), generator=g)
    return centres[torch.arange(batch)[:, None], pick] + torch.randn(batch, n, d, generator=g)


def feature_set(name: str) -> torch.Tensor:
    """Lattice features made on the CPU: the CUDA lattice gets the very same float32 bits (.cuda() copies them)."""
    if name.startswith("random-"):
        return random_features(int(name[-1]))
    img = torch.cat([photo("astronaut"), photo("coffee")])
    return {"spatial-sxy1": lambda: lattice_features(img, 1.0, None),  # the CRF's spatial kernel (D=2)
            "spatial-sxy5": lambda: lattice_features(img, 5.0, None),
            "bilateral-loss": lambda: lattice_features(img, SIGMA_XY, SIGMA_RGB),  # the DenseCRF loss (D=5)
            "bilateral-crf": lambda: lattice_features(img, 121.0 * SIZE / 500, 5.0)}[name]()


FEATURE_SETS = [f"random-{d}" for d in range(1, 7)] + ["spatial-sxy1", "spatial-sxy5", "bilateral-loss",
                                                      "bilateral-crf"]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("name", FEATURE_SETS)
def test_cuda_lattice_has_the_cpu_lattices_vertices_and_values(gpu, name):
    """Same features -> the same simplices on both builds (the shared header computes the keys with explicit
    fmaf, so compiler fusion cannot move them), hence the same number of vertices; the values differ only by
    float rounding (summation order, fused multiply-adds in the weights)."""
    feats = feature_set(name)
    b, n, d = feats.shape
    vals = torch.rand(b, 5, n, generator=torch.Generator().manual_seed(1))
    on_cpu, on_gpu = Lattice(feats, "cpu"), Lattice(feats.cuda(), "cuda")
    assert on_gpu.num_vertices == on_cpu.num_vertices
    assert on_cpu.num_vertices >= d + 1  # a real lattice, not an empty one
    for mode in filters.FILTER_MODES:
        expected = on_cpu.filter(vals, mode)
        got = on_gpu.filter(vals.cuda(), mode)
        assert got.is_cuda and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.cuda
@needs_gpu
def test_cuda_lattice_matches_cpu_lattice(gpu):
    """Through bilateral_filter, with the features computed on each device (which may differ in the last bit)."""
    img = torch.cat([photo("astronaut"), photo("coffee")])
    vals = torch.cat([smooth_probs(6, seed=0), smooth_probs(6, seed=1)]).float()
    on_cpu = bilateral_filter(img, vals, SIGMA_XY, SIGMA_RGB, "cpu")
    on_gpu = bilateral_filter(img.cuda(), vals.cuda(), SIGMA_XY, SIGMA_RGB, "cuda")
    assert on_gpu.is_cuda
    assert rel_err(on_gpu.cpu(), on_cpu) < 1e-4  # the same lattice: only the rounding differs


@pytest.mark.cuda
@needs_gpu
def test_cuda_lattice_pre_post_scale_and_out(gpu):
    g = torch.Generator().manual_seed(0)
    feats = lattice_features(photo("coffee", 24), 6.0, 12.0)
    x, pre, post = torch.rand(1, 5, 576, generator=g), torch.rand(1, 576, generator=g), torch.rand(1, 576, generator=g)
    lat, ref = Lattice(feats.cuda(), "cuda"), Lattice(feats, "cpu")
    xc, prec, postc = x.cuda(), pre.cuda(), post.cuda()
    for mode in filters.FILTER_MODES:
        out = torch.ones(1, 5, 576, device="cuda")
        result = lat.filter(xc, mode, 2.5, prec, postc, out=out)
        assert result.data_ptr() == out.data_ptr()  # added into `out` in place
        expected = 1 + 2.5 * postc[:, None] * lat.filter(xc * prec[:, None], mode)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # pre and post on another device are moved to the lattice's; without `out` the result is new
        fresh = lat.filter(xc, mode, 2.5, pre, post)
        assert fresh.is_cuda and fresh.data_ptr() != out.data_ptr()
        torch.testing.assert_close(fresh + 1, out, rtol=1e-5, atol=1e-5)
        # the same fused call on the CPU lattice
        out_cpu = torch.ones(1, 5, 576)
        ref.filter(x, mode, 2.5, pre, post, out=out_cpu)
        torch.testing.assert_close(out.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out must be on cuda"):
        lat.filter(xc, out=torch.zeros(1, 5, 576))
    with pytest.raises(RuntimeError, match="out must be a contiguous float32"):
        lat.filter(xc, out=torch.zeros(1, 5, 576, device="cuda", dtype=torch.float64))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("name", ["spatial-sxy1", "bilateral-loss"])
def test_cuda_lattice_is_bitwise_repeatable(gpu, name):
    """The GPU build inserts vertices with atomicCAS, so which slot, hence which number, a vertex gets varies from
    build to build; but every sum is a gather in a fixed order (splat over entries sorted stably by vertex, blur
    over the +/- neighbours, slice over the simplex's vertices): no float atomics, so the output does not vary.
    The D=2, sigma 1 feature set has the most vertices and hash collisions."""
    feats = feature_set(name).cuda()
    vals = torch.rand(feats.shape[0], 7, feats.shape[1], generator=torch.Generator().manual_seed(2)).cuda()
    lattices = [Lattice(feats, "cuda") for _ in range(3)]
    assert len({lat.num_vertices for lat in lattices}) == 1
    for mode in filters.FILTER_MODES:
        first = lattices[0].filter(vals, mode)
        for lat in lattices:
            assert torch.equal(lat.filter(vals, mode), first), mode
            out = torch.zeros_like(vals)
            lat.filter(vals, mode, 1.0, out=out)
            assert torch.equal(out, first), mode


@pytest.mark.cuda
@needs_gpu
def test_cuda_bilateral_filter_and_its_gradient_are_bitwise_repeatable(gpu):
    img = torch.cat([photo("astronaut"), photo("chelsea")]).cuda()
    vals = torch.cat([smooth_probs(4, seed=0), smooth_probs(4, seed=1)]).float().cuda()
    grad = torch.randn(vals.shape, generator=torch.Generator().manual_seed(3)).cuda()
    runs = []
    for _ in range(2):
        v = vals.clone().requires_grad_()
        out = BilateralFilter(img, SIGMA_XY, SIGMA_RGB, backend="cuda")(v)
        out.backward(grad)
        runs.append((out.detach(), v.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.cuda
@needs_gpu
def test_cuda_filter_algebra_and_autograd(gpu):
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


@pytest.mark.cuda
@needs_gpu
def test_cuda_auto_falls_back_to_the_cpu_lattice_for_gpu_tensors(gpu, monkeypatch):
    # The features are computed on the GPU, which may round them differently in the last bit: hence a tolerance.
    img, vals = photo("chelsea", 32), torch.rand(1, 3, 32, 32)
    expected = bilateral_filter(img, vals, 7.0, 15.0, "cpu")
    from_gpu = bilateral_filter(img.cuda(), vals.cuda(), 7.0, 15.0, "cpu")  # copied to the CPU and back
    assert from_gpu.is_cuda and rel_err(from_gpu.cpu(), expected) < 1e-4
    monkeypatch.setattr(kernels, "load_cuda", broken("nvcc: cannot run (gpu fallback test)"))
    with pytest.warns(RuntimeWarning, match="falls back to 'cpu'"):
        filt = BilateralFilter(img.cuda(), 7.0, 15.0, backend="auto")
    assert filt.backend == "cpu"
    out = filt(vals.cuda())
    assert out.is_cuda and rel_err(out.cpu(), expected) < 1e-4
    with pytest.raises(kernels.KernelBuildError, match="gpu fallback test"):
        BilateralFilter(img.cuda(), 7.0, 15.0, backend="cuda")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("height,width,classes", [(375, 500, 21), (480, 640, 81)])
def test_cuda_splat_of_a_flat_region_matches_the_cpu_lattice(gpu, height, width, classes):
    """The chunked splat on the hot-vertex case at the CRF's sizes (VOC 500x375x21, COCO 640x480x81): the CPU
    lattice's values to float rounding, whatever the chunk size (1 entry per chunk, automatic, one chunk per
    vertex as before the chunking)."""
    cpu_ext, cuda_ext = gpu
    feats = crf_features(flat_region_image(height, width))
    vals = torch.rand(1, classes, height * width, generator=torch.Generator().manual_seed(4))
    expected = Lattice(feats, "cpu").filter(vals, "forward")
    for max_chunk in (0, 1, 1 << 30):
        lattice = cuda_ext.build(feats.cuda(), max_chunk)
        assert lattice.max_entries > 1000  # the hot vertex is there
        got = lattice.filter(vals.cuda(), 0).cpu()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
