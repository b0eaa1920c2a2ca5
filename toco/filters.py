"""Bilateral (position + colour Gaussian) filtering of K-channel maps.

`bilateral_filter` is the single entry point used by the DenseCRF loss and by CRF inference. Every backend
computes (an approximation of) the exact Gaussian sum

    (W x)_i = sum_j W_ij x_j,   W_ij = exp(-|p_i-p_j|^2 / 2 sxy^2 - |I_i-I_j|^2 / 2 srgb^2),

self term W_ii = 1 included, un-normalised. Backends (see BACKENDS and docs/kernels.md):

- `exact`: the O(N^2) reference in PyTorch, computed in row chunks so memory stays bounded (any device).
- `cpu`: permutohedral lattice in C++ (`csrc/permutohedral_cpu.cpp`), multi-threaded; tensors on another device
  are copied to the CPU and back.
- `cuda`: the same lattice in CUDA (`csrc/permutohedral_cuda.cu`); tensors must be on a GPU.
- `auto`: `cuda` for GPU tensors when that extension builds, else `cpu`, else `exact`.

The lattice's raw output is 0.5-0.65x the exact sum (it is the filter the original rloss/ToCo used); every
backend's output is brought to one scale, the `convention` (CONVENTIONS). The lattice filter used here averages
the two blur orders, which makes it exactly symmetric (and linear), so its adjoint is itself: `BilateralFilter`
applies it under an autograd Function whose backward filters the gradient.
A native backend named explicitly that cannot be built raises `KernelBuildError`; `auto` falls back, warning once.
"""
from __future__ import annotations

import warnings

import torch

from toco import kernels

# Mean of (lattice sum / exact sum) is 0.57-0.63 on natural photographs at the training setting (224 px,
# sigma_xy 50, sigma_rgb 15; docs/kernels.md): the gain brings the lattice to the exact convention.
LATTICE_GAIN = 1.0 / 0.60
# The scale every backend's output is brought to:
# - "exact": the exact Gaussian sum (the lattice's raw sum x LATTICE_GAIN); CRF inference and tests use it;
# - "lattice": the raw lattice sum, which is the filter the original rloss/ToCo ran, so the DenseCRF loss with the
#   paper's weight has the original's effect: the lattice backends return their sum as it is, `exact` returns its
#   sum / LATTICE_GAIN (the lattice's mean ratio to it).
CONVENTIONS = ("exact", "lattice")

FILTER_MODES = {"forward": 0, "reverse": 1, "symmetric": 2}


def gaussian_filter_exact(features: torch.Tensor, values: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Exact sum_j exp(-|f_i - f_j|^2 / 2) values_j for features (N, D) and values (N, K), in float64."""
    feats = features.to(torch.float64)
    vals = values.to(torch.float64)
    rows = []
    for start in range(0, feats.shape[0], chunk):
        d2 = torch.cdist(feats[start:start + chunk], feats).pow_(2)  # (chunk, N)
        rows.append(torch.exp_(d2.mul_(-0.5)) @ vals)
    return torch.cat(rows)


def bilateral_filter_exact(image: torch.Tensor, values: torch.Tensor, sigma_xy: float, sigma_rgb: float,
                           chunk: int = 4096) -> torch.Tensor:
    """Exact dense bilateral sum W @ values.

    image: (B,3,H,W) colours in 0-255; values: (B,K,H,W). Returns (B,K,H,W) in values' dtype.
    """
    _check_shapes(image, values)
    b, k, h, w = values.shape
    feats = lattice_features(image, sigma_xy, sigma_rgb, torch.float64)  # (B, N, 5)
    out = torch.empty_like(values)
    for i in range(b):
        vals = values[i].reshape(k, -1).t()  # (N, K)
        out[i] = gaussian_filter_exact(feats[i], vals, chunk).t().reshape(k, h, w).to(values.dtype)
    return out


def _check_shapes(image: torch.Tensor, values: torch.Tensor) -> None:
    if image.dim() != 4 or image.shape[1] != 3 or values.dim() != 4:
        raise ValueError(f"image must be (B,3,H,W) and values (B,K,H,W); got {tuple(image.shape)}, "
                         f"{tuple(values.shape)}")
    if image.shape[0] != values.shape[0] or image.shape[-2:] != values.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and values {tuple(values.shape)} must share batch and size")


# ----------------------------------------------------------------------------------------------------
# Permutohedral lattice (native kernels)
def lattice_features(image: torch.Tensor, sigma_xy: float, sigma_rgb: float | None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,C,H,W) image -> (B, H*W, 2+C) features (x/sxy, y/sxy, c/srgb...), pydensecrf's order; float32 for the
    lattice, float64 for the exact reference.

    With sigma_rgb None the features are positions only (B, H*W, 2): the CRF's spatial Gaussian kernel.
    """
    b, c, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=image.device, dtype=dtype),
                            torch.arange(w, device=image.device, dtype=dtype), indexing="ij")
    pos = (torch.stack([xs, ys]) / sigma_xy).expand(b, 2, h, w)
    feats = pos if sigma_rgb is None else torch.cat([pos, image.to(dtype) / sigma_rgb], dim=1)
    return feats.reshape(b, feats.shape[1], h * w).transpose(1, 2).contiguous()


_warned_fallbacks: set[str] = set()


def resolve_backend(backend: str, device: torch.device, last_resort: str = "exact") -> str:
    """The backend that will actually run for tensors on `device`.

    'cpu' and 'cuda' run as named or raise `kernels.KernelBuildError` with the build's reason. 'auto' takes the
    first native backend that builds, 'cuda' (GPU tensors only) then 'cpu', else `last_resort`; when that is not
    its first choice it warns once, naming the backend it falls back to and why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown bilateral filter backend {backend!r}; choose from {sorted(BACKENDS)}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs tensors on a GPU, got {device}; use 'cpu' or 'auto'")
    if backend in ("cpu", "cuda"):
        kernels.load(backend)
    if backend != "auto":
        return backend
    failures = []
    for native in (["cuda"] if device.type == "cuda" else []) + ["cpu"]:
        try:
            kernels.load(native)
            chosen = native
            break
        except kernels.KernelBuildError as err:
            failures.append(str(err))
    else:
        chosen = last_resort
    message = "\n".join(failures) + f"\nbackend 'auto' falls back to {chosen!r}"
    if failures and message not in _warned_fallbacks:
        _warned_fallbacks.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return chosen


class Lattice:
    """A permutohedral lattice over features (B, N, D), D <= 6, built once and applied to many value maps.

    `filter` returns the raw lattice sum (alpha * S B S^T x: 0.5-0.65x the exact Gaussian sum on photographs, see
    LATTICE_GAIN). `backend` is 'cpu' or 'cuda'; the cpu backend accepts tensors on any device (it copies).
    """

    def __init__(self, features: torch.Tensor, backend: str = "cpu"):
        module = kernels.load(backend)  # raises KernelBuildError
        self.work_device = torch.device("cpu") if backend == "cpu" else features.device
        self._lattice = module.build(features.detach().to(self.work_device, torch.float32))

    @property
    def num_vertices(self) -> int:
        return self._lattice.num_vertices

    def filter(self, values: torch.Tensor, mode: str = "symmetric", scale: float = 1.0,
               pre: torch.Tensor | None = None, post: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """scale * post * L(pre * values) for values (B, K, N) and optional per-point pre/post (B, N).

        mode: 'forward' (pydensecrf's blur order), 'reverse' (its transpose) or 'symmetric' (their mean: its own
        transpose). Returns a new tensor in values' dtype and device, or, with `out` (a contiguous float32 tensor
        on the lattice's device), adds the result into `out` in place and returns it (the CRF's fused update).
        """
        def work(t):
            return None if t is None else t.detach().to(self.work_device, torch.float32)
        if out is not None and out.device != self.work_device:
            raise ValueError(f"out must be on {self.work_device}")
        result = self._lattice.filter(work(values), FILTER_MODES[mode], scale, work(pre), work(post), out)
        return result if out is not None else result.to(values.device, values.dtype)


class _LinearSymmetric(torch.autograd.Function):
    """y = A x for a symmetric linear operator A (a python callable): the backward is A applied to the gradient."""

    @staticmethod
    def forward(ctx, values, operator):
        ctx.operator = operator
        return operator(values)

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.operator(grad_output), None


class BilateralFilter:
    """W x for a batch of images; build once, apply to many (B,K,H,W) maps.

    image (B,3,H,W) colours in 0-255. `convention` fixes the scale whatever the backend runs (CONVENTIONS).
    Calling it is differentiable in the values (W is symmetric, so the backward applies the same filter).
    """

    def __init__(self, image: torch.Tensor, sigma_xy: float, sigma_rgb: float, backend: str = "exact",
                 convention: str = "exact"):
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B,3,H,W), got {tuple(image.shape)}")
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown filter convention {convention!r}; choose from {CONVENTIONS}")
        self.backend = resolve_backend(backend, image.device)
        self.image, self.sigma_xy, self.sigma_rgb = image.detach(), sigma_xy, sigma_rgb
        self.lattice = None
        if self.backend != "exact":
            self.lattice = Lattice(lattice_features(self.image, sigma_xy, sigma_rgb), self.backend)
        # what the backend's own output is multiplied by to reach the convention
        if self.lattice is None:
            self.gain = 1.0 if convention == "exact" else 1.0 / LATTICE_GAIN
        else:
            self.gain = LATTICE_GAIN if convention == "exact" else 1.0

    def _apply(self, values: torch.Tensor) -> torch.Tensor:
        if self.lattice is None:
            out = bilateral_filter_exact(self.image, values, self.sigma_xy, self.sigma_rgb)
            return out if self.gain == 1.0 else out * self.gain
        b, k, h, w = values.shape
        out = self.lattice.filter(values.reshape(b, k, h * w), "symmetric", self.gain)
        return out.reshape(b, k, h, w)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        _check_shapes(self.image, values)
        if torch.is_grad_enabled() and values.requires_grad:
            return _LinearSymmetric.apply(values, self._apply)
        return self._apply(values)


BACKENDS = ("exact", "cpu", "cuda", "auto")


def bilateral_filter(image: torch.Tensor, values: torch.Tensor, sigma_xy: float, sigma_rgb: float,
                     backend: str = "exact", convention: str = "exact") -> torch.Tensor:
    """W @ values for image (B,3,H,W) in 0-255 and values (B,K,H,W), by the named backend (BACKENDS), scaled to
    `convention` (CONVENTIONS)."""
    return BilateralFilter(image, sigma_xy, sigma_rgb, backend, convention)(values)
