"""Segmentation decoder and CTC projection head (docs/method.md §1.3, §1.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LargeFOV(nn.Module):
    """DeepLab LargeFOV: two dilated 3x3 convs and a 1x1 classifier, no biases (as the original)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 5):
        super().__init__()
        self.conv6 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.conv7(F.relu(self.conv6(x)))))


class CTCHead(nn.Module):
    """DINO-style projection: MLP -> L2 normalise -> weight-normalised linear with its norm frozen at 1."""

    def __init__(self, in_dim: int, hidden: int = 2048, bottleneck: int = 256, out_dim: int = 1024):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(False)  # each output is a cosine in [-1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 under bf16 autocast: CTC's logits are cosines / temperature, exponentiated by the loss
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(F.normalize(self.mlp(x.float()), dim=-1))
