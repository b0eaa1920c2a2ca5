"""PAR: pixel-adaptive refinement of label maps (AFA, reused by ToCo). docs/method.md §2.3.

For every pixel i the kernel over its 48 neighbours j (8 per dilation, 6 dilations, replicate padding) is

    kappa_ij = softmax_j(a_ij) + w2 * softmax_j(b_j)
    a_ij = mean_c -(|I_jc - I_ic| / (std_c(I_j over the 48 neighbours) + 1e-8) / w1)^2
    b_j  = -(p_j / (std(p over the 48 neighbours) + 1e-8) / w1)^2,   p_j = d (axial) or sqrt(2) d (diagonal)

so every row sums to 1 + w2 (not renormalised, as in the original). The masks are then smoothed
`num_iter` times with M_i <- sum_j kappa_ij M_j. The kernel depends on the image only, so PAR is linear
and acts on every mask channel independently (pseudo.refine_cams_with_bkg relies on that).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The 8 neighbours of a dilated 3x3 kernel without its centre, in the original's order (row-major).
_UNIT_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class PAR(nn.Module):
    """Pixel-adaptive refinement. forward(image (B,3,H,W) in [0,1], masks (B,K,h,w)) -> (B,K,H,W)."""

    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iter: int = 10, w1: float = 0.3, w2: float = 0.01):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iter = int(num_iter)
        self.w1 = float(w1)
        self.w2 = float(w2)
        # (dy, dx) of the 48 neighbours, dilation-major like the original's concatenation.
        self.offsets = [(dy * d, dx * d) for d in self.dilations for dy, dx in _UNIT_OFFSETS]
        self.pad = max(self.dilations)
        # Neighbour distances (48,), kept as Python floats so the position kernel is exact in any dtype.
        self.neighbour_dist = [d * (math.sqrt(2.0) if dy and dx else 1.0)
                               for d in self.dilations for dy, dx in _UNIT_OFFSETS]

    # -- neighbour access ------------------------------------------------------------------------------
    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        # Replicate padding clamps coordinates, so one pad by the largest dilation serves every dilation.
        return F.pad(x, [self.pad] * 4, mode="replicate")

    def _shifted(self, xp: torch.Tensor, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
        """View of the padded map holding, at pixel (y, x), the value of pixel (y+dy, x+dx) (clamped)."""
        p = self.pad
        return xp[..., p + dy:p + dy + h, p + dx:p + dx + w]

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) -> (B,C,48,H,W): the 48 dilated neighbours of every pixel."""
        h, w = x.shape[-2:]
        xp = self._padded(x)
        return torch.stack([self._shifted(xp, dy, dx, h, w) for dy, dx in self.offsets], dim=2)

    # -- kernel ----------------------------------------------------------------------------------------
    def kernel(self, image: torch.Tensor) -> torch.Tensor:
        """Affinity kernel (B,48,H,W); each pixel's 48 weights sum to 1 + w2."""
        nb = self.neighbours(image)  # (B,3,48,H,W)
        diff = (nb - image.unsqueeze(2)).abs()
        std = nb.std(dim=2, keepdim=True)  # unbiased, over neighbour intensities (not differences)
        aff = -(diff / (std + 1e-8) / self.w1).pow(2).mean(dim=1)  # (B,48,H,W), mean over RGB
        dist = torch.tensor(self.neighbour_dist, dtype=image.dtype, device=image.device)
        pos_aff = -(dist / (dist.std() + 1e-8) / self.w1).pow(2)  # (48,), same for every pixel
        pos_kernel = F.softmax(pos_aff, dim=0).view(1, -1, 1, 1)
        return F.softmax(aff, dim=1) + self.w2 * pos_kernel

    def propagate(self, masks: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """One step M_i <- sum_j kappa_ij M_j. masks (B,K,H,W), kernel (B,48,H,W)."""
        h, w = masks.shape[-2:]
        mp = self._padded(masks)
        out = torch.zeros_like(masks)
        # Accumulate over the 48 neighbours instead of stacking them: memory stays O(B*K*H*W).
        for k, (dy, dx) in enumerate(self.offsets):
            out = out + kernel[:, k:k + 1] * self._shifted(mp, dy, dx, h, w)
        return out

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
            raise ValueError(f"PAR expects image (B,3,H,W) and masks (B,K,h,w), got {tuple(image.shape)}, "
                             f"{tuple(masks.shape)}")
        size = image.shape[-2:]
        if masks.shape[-2:] != size:
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=True)
        kernel = self.kernel(image.to(masks.dtype))
        for _ in range(self.num_iter):
            masks = self.propagate(masks, kernel)
        return masks
