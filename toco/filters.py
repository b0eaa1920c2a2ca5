"""Bilateral (position + colour Gaussian) filtering of K-channel maps.

`bilateral_filter` is the single entry point used by the DenseCRF loss and by CRF inference.
The `exact` backend is the O(N^2) reference: W_ij = exp(-|p_i-p_j|^2 / 2 sxy^2 - |I_i-I_j|^2 / 2 srgb^2),
self term included, computed in row chunks so memory stays bounded.
"""
from __future__ import annotations

import torch


def _features(image: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> torch.Tensor:
    """(3,H,W) image in 0-255 -> (H*W, 5) scaled features (y, x, r, g, b)."""
    _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=image.device, dtype=torch.float64),
        torch.arange(w, device=image.device, dtype=torch.float64),
        indexing="ij",
    )
    pos = torch.stack([ys, xs], dim=-1).reshape(-1, 2) / sigma_xy
    rgb = image.to(torch.float64).reshape(3, -1).t() / sigma_rgb
    return torch.cat([pos, rgb], dim=1)


def bilateral_filter_exact(image: torch.Tensor, values: torch.Tensor, sigma_xy: float, sigma_rgb: float,
                           chunk: int = 4096) -> torch.Tensor:
    """Exact dense bilateral sum W @ values.

    image: (B,3,H,W) colours in 0-255; values: (B,K,H,W). Returns (B,K,H,W) in values' dtype.
    """
    if image.shape[0] != values.shape[0] or image.shape[-2:] != values.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and values {tuple(values.shape)} must share batch and size")
    b, k, h, w = values.shape
    out = torch.empty_like(values)
    for i in range(b):
        feats = _features(image[i], sigma_xy, sigma_rgb)  # (N, 5)
        vals = values[i].reshape(k, -1).t().to(torch.float64)  # (N, K)
        rows = []
        for start in range(0, feats.shape[0], chunk):
            d2 = torch.cdist(feats[start:start + chunk], feats).pow_(2)  # (chunk, N)
            rows.append(torch.exp_(d2.mul_(-0.5)) @ vals)
        out[i] = torch.cat(rows).t().reshape(k, h, w).to(values.dtype)
    return out


BACKENDS = {"exact": bilateral_filter_exact}


def bilateral_filter(image: torch.Tensor, values: torch.Tensor, sigma_xy: float, sigma_rgb: float,
                     backend: str = "exact") -> torch.Tensor:
    """Dispatch to a filter backend by name (see BACKENDS)."""
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown bilateral filter backend {backend!r}; choose from {sorted(BACKENDS)}") from None
    return fn(image, values, sigma_xy, sigma_rgb)
