"""Fully connected CRF post-processing (Kraehenbuehl & Koltun 2011), mean-field inference (docs/method.md §5.3).

`dense_crf` is a drop-in replacement for the pydensecrf recipe the original uses at test time
(`DenseCRF2D` + `unary_from_softmax` + `addPairwiseGaussian` + `addPairwiseBilateral` + `inference`), running
the same permutohedral lattice (`toco.filters.Lattice`) multi-threaded on the CPU or on the GPU. It reproduces
pydensecrf's parameterisation:

- unary U = -log(clip(p, 1e-5, 1)); Q_0 = softmax(-U);
- kernels with pydensecrf's features (x/sxy, y/sxy) and (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb), DIAG_KERNEL,
  NORMALIZE_SYMMETRIC: k(Q) = n * L(n * Q), n = 1 / sqrt(L(1)) with L the (forward-order) lattice filter;
  by default the spatial kernel is the exact Gaussian instead of its lattice approximation (see `dense_crf`);
- Potts compatibility: each iteration Q <- softmax(-U + sum_kernels compat * k(Q)).

`pydensecrf_crf` runs pydensecrf itself with the same signature (the reference, and what backend 'auto' falls
back to when no native kernel builds and pydensecrf is installed; else it falls back to 'exact'). pydensecrf is
imported only there.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch
import torch.nn.functional as F

from toco import kernels
from toco.filters import Lattice, gaussian_filter_exact, lattice_features, resolve_backend

UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's default


def _as_image(image) -> torch.Tensor:
    """uint8/float image (H,W,3) array or tensor, or (3,H,W) tensor -> (3,H,W) float32 tensor in 0-255."""
    img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if img.dim() != 3:
        raise ValueError(f"image must be (H,W,3) or (3,H,W), got {tuple(img.shape)}")
    if img.shape[-1] == 3 and img.shape[0] != 3:
        img = img.permute(2, 0, 1)
    elif img.shape[0] != 3:
        raise ValueError(f"image must be (H,W,3) or (3,H,W), got {tuple(img.shape)}")
    return img.to(torch.float32)


def _as_probs(probs) -> torch.Tensor:
    p = probs if isinstance(probs, torch.Tensor) else torch.from_numpy(np.asarray(probs))
    if p.dim() != 3:
        raise ValueError(f"probs must be (K,H,W), got {tuple(p.shape)}")
    return p.detach().to(torch.float32).contiguous()  # the kernels add into energies laid out like it


class _NormalizedKernel:
    """compat * pydensecrf's DenseKernel with NORMALIZE_SYMMETRIC: Q -> compat * n * L(n * Q), n = 1/sqrt(L 1).

    Q and the energy are (1, K, N).
    """

    def __init__(self, features: torch.Tensor, compat: float, backend: str):  # features (1, N, D)
        self.compat = compat
        if backend == "exact":
            self.lattice = None
            self.raw = lambda q: gaussian_filter_exact(features[0], q[0].t()).t()[None].to(q.dtype)
        else:
            self.lattice = Lattice(features, backend)
            self.raw = lambda q: self.lattice.filter(q, "forward")
        self.norm = torch.rsqrt(self.raw(torch.ones(1, 1, features.shape[1], device=features.device)) + 1e-20)

    def add_to(self, energy: torch.Tensor, q: torch.Tensor) -> None:
        """energy (1, K, N) += compat * k(q)."""
        if self.lattice is not None and energy.device == self.lattice.work_device:
            # Fused in the kernel: no temporaries of the size of Q.
            self.lattice.filter(q, "forward", self.compat, self.norm[:, 0], self.norm[:, 0], out=energy)
        else:
            energy += self.compat * self.norm * self.raw(q * self.norm)


class _SpatialGaussian:
    """The spatial kernel computed exactly: compat * n * G(n * Q), G the Gaussian of std sxy pixels truncated at
    4 sxy (a separable convolution, zero outside the image), n = 1/sqrt(G 1). pydensecrf approximates the same
    G with a 2-D lattice, its least accurate and (more vertices than pixels) most expensive case."""

    def __init__(self, sxy: float, compat: float, height: int, width: int, device: torch.device, backend: str):
        self.compat, self.size = compat, (height, width)
        self.radius = max(1, math.ceil(4 * sxy))
        self.native = kernels.load_cpu() if backend == "cpu" else None  # takes CPU tensors only
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        self.taps = torch.exp(-0.5 * (offsets / sxy) ** 2).tolist()
        self.sxy = sxy
        self.norm = torch.rsqrt(self._blur(torch.ones(1, 1, height * width, device=device)))[:, 0]  # (1, N)

    def _blur(self, q: torch.Tensor) -> torch.Tensor:  # (1, K, N) -> (1, K, N)
        k = q.shape[1]
        if self.native is not None:
            return self.native.gaussian_blur(q.reshape(1, k, *self.size), self.sxy, self.radius).reshape(q.shape)
        # Sums of shifted copies, not conv2d: on a GPU that may run in TF32 (10-bit mantissa); these stay float32.
        x = q.reshape(k, *self.size)
        for dim in (2, 1):  # along rows, then along columns, like the CPU kernel
            r = self.radius
            padded = F.pad(x, (r, r) if dim == 2 else (0, 0, r, r))  # zero outside the image
            blurred = torch.zeros_like(x)
            for offset, tap in enumerate(self.taps):
                blurred.add_(padded.narrow(dim, offset, x.shape[dim]), alpha=tap)
            x = blurred
        return x.reshape(q.shape)

    def add_to(self, energy: torch.Tensor, q: torch.Tensor) -> None:
        """energy (1, K, N) += compat * n * G(n * q)."""
        if self.native is not None:  # fused in the kernel: no temporaries of the size of Q
            shape = (1, q.shape[1], *self.size)
            self.native.gaussian_blur(q.reshape(shape), self.sxy, self.radius, self.compat, self.norm, self.norm,
                                      energy.view(shape))
        else:
            energy += self.compat * self.norm[:, None] * self._blur(q * self.norm[:, None])


def dense_crf_probs(image, probs, n_iter: int = 10, gauss_sxy: float = 1.0, gauss_compat: float = 1.0,
                    bil_sxy: float = 121.0, bil_srgb: float = 5.0, bil_compat: float = 4.0,
                    backend: str = "auto", exact_spatial: bool = True) -> torch.Tensor:
    """Mean-field marginals Q (K,H,W) float32 on probs' device after n_iter iterations; see `dense_crf`."""
    img = _as_image(image)
    p = _as_probs(probs)
    k, h, w = p.shape
    if img.shape[1:] != (h, w):
        raise ValueError(f"image {tuple(img.shape)} and probs {tuple(p.shape)} differ in size")
    backend = resolve_backend(backend, p.device)
    # The cpu kernels take CPU tensors: with them the whole iteration runs on the CPU, whatever probs' device.
    out_device = p.device
    device = torch.device("cpu") if backend == "cpu" else out_device
    img, p = img.to(device), p.to(device)
    unary = -p.clamp(UNARY_CLIP, 1.0).log().reshape(1, k, h * w)  # (1, K, N)
    if exact_spatial:
        spatial = _SpatialGaussian(gauss_sxy, gauss_compat, h, w, device, backend)
    else:
        spatial = _NormalizedKernel(lattice_features(img[None], gauss_sxy, None), gauss_compat, backend)
    pairwise = [spatial, _NormalizedKernel(lattice_features(img[None], bil_sxy, bil_srgb), bil_compat, backend)]
    q = torch.softmax(-unary, dim=1)
    for _ in range(n_iter):
        energy = -unary  # a new tensor: the kernels add into it
        for kernel in pairwise:
            kernel.add_to(energy, q)  # Potts: the message -compat * k(Q) enters the energy with a minus sign
        q = torch.softmax(energy, dim=1)
    return q.reshape(k, h, w).to(out_device)


def dense_crf(image, probs, n_iter: int = 10, gauss_sxy: float = 1.0, gauss_compat: float = 1.0,
              bil_sxy: float = 121.0, bil_srgb: float = 5.0, bil_compat: float = 4.0, backend: str = "auto",
              exact_spatial: bool = True):
    """DenseCRF labels (H,W) int64 for an RGB image (H,W,3) uint8 (or a tensor, also (3,H,W), 0-255) and class
    probabilities (K,H,W). Numpy in -> numpy out; a tensor `probs` gives a tensor on its device.

    backend: 'auto' (cuda for GPU tensors, else cpu), 'cpu' (any tensors: they are copied to the CPU and back),
    'cuda', 'exact' (O(N^2), small images only) or 'pydensecrf'. When no native kernel builds, 'auto' runs
    pydensecrf if it is installed, else 'exact', and warns once. exact_spatial: compute the spatial kernel exactly
    (a separable convolution; faster, agrees with pydensecrf on ~99.8% of pixels) instead of with pydensecrf's
    lattice approximation (agrees on ~100%).
    """
    if backend == "auto":
        backend = resolve_backend("auto", _device_of(probs), "pydensecrf" if _pydensecrf_installed() else "exact")
    if backend == "pydensecrf":
        labels = pydensecrf_crf(image, _as_probs(probs).cpu().numpy(), n_iter, gauss_sxy, gauss_compat, bil_sxy,
                                bil_srgb, bil_compat)
        return labels if not isinstance(probs, torch.Tensor) else torch.from_numpy(labels).to(probs.device)
    q = dense_crf_probs(image, probs, n_iter, gauss_sxy, gauss_compat, bil_sxy, bil_srgb, bil_compat, backend,
                        exact_spatial)
    labels = q.argmax(dim=0)
    return labels if isinstance(probs, torch.Tensor) else labels.cpu().numpy()


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _pydensecrf_installed() -> bool:
    return importlib.util.find_spec("pydensecrf") is not None


def pydensecrf_crf(image, probs, n_iter: int = 10, gauss_sxy: float = 1.0, gauss_compat: float = 1.0,
                   bil_sxy: float = 121.0, bil_srgb: float = 5.0, bil_compat: float = 4.0) -> np.ndarray:
    """The original's `utils/dcrf.py` recipe with pydensecrf: labels (H,W) int64. image (H,W,3) uint8."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    img = _as_image(image).permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    p = _as_probs(probs).cpu().numpy()
    k, h, w = p.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p, clip=UNARY_CLIP)))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bil_sxy, srgb=bil_srgb, rgbim=np.ascontiguousarray(img), compat=bil_compat)
    q = np.array(crf.inference(n_iter)).reshape(k, h, w)
    return q.argmax(axis=0).astype(np.int64)
