"""ToCo network: ViT encoder, CAM / aux-CAM classifiers, LargeFOV decoder, CTC heads (docs/method.md §1)."""
from __future__ import annotations

import copy
import dataclasses
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
from timm.layers import HybridEmbed
import torch
import torch.nn.functional as F
from torch import nn

from toco.models.heads import CTCHead, LargeFOV


@dataclass
class Encoded:
    cls_token: torch.Tensor   # (B, D) after the final norm
    tokens: torch.Tensor      # (B, D, h, w) final patch tokens, after the final norm
    aux_tokens: torch.Tensor  # (B, D, h, w) patch tokens of the auxiliary block, no final norm


@dataclass
class ModelOutput:
    cls_logits: torch.Tensor      # (B, C-1)
    aux_cls_logits: torch.Tensor  # (B, C-1)
    seg_logits: torch.Tensor | None  # (B, C, h, w); None when the forward was asked for no segmentation
    tokens: torch.Tensor          # (B, D, h, w)
    token_logits: torch.Tensor | None = None  # (B, C-1) the class token's classifier (model.token_classifier)
    student: torch.Tensor | None = None  # (V*B, out) CTC projections of every view, view-major
    teacher: torch.Tensor | None = None  # (2*B, out) EMA-teacher projections of the two global views

    def float(self) -> "ModelOutput":
        """Every tensor in float32 (what the losses take after a bf16 forward)."""
        return ModelOutput(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).float()
                              for f in dataclasses.fields(self)})


def conv_stem(channels: list[int], in_chans: int = 3) -> nn.Sequential:
    """Stride-2 3x3 conv + GroupNorm + ReLU per entry (per-sample norm: no batch statistics): the 'early convolutions' stem (Xiao et al., 2021) that lets a
    small ViT trained from scratch learn local texture quickly. Total stride 2**len(channels)."""
    layers, prev = [], in_chans
    for ch in channels:
        layers += [nn.Conv2d(prev, ch, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, ch), nn.ReLU(inplace=True)]
        prev = ch
    return nn.Sequential(*layers)


def create_encoder(backbone: str, pretrained: bool, pretrained_file: str | None, conv_stem_channels=(),
                   **kwargs) -> nn.Module:
    """A timm ViT/DeiT without its classification head, accepting any input size. With conv_stem_channels
    the patch embedding is timm's HybridEmbed over a small conv stem (patch size 1 on its feature map)."""
    options = dict(num_classes=0, dynamic_img_size=True, **kwargs)
    if conv_stem_channels:
        stem = conv_stem(list(conv_stem_channels))  # HybridEmbed probes its stride and width
        options.update(patch_size=1, embed_layer=partial(HybridEmbed, backbone=stem))
    if pretrained and pretrained_file:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"model.pretrained_file {pretrained_file!r} does not exist")
        options["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    return timm.create_model(backbone, pretrained=pretrained, **options)


def pos_embed_bicubic(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's `VisionTransformer._pos_embed` for `dynamic_img_size`, with the position table resampled as the
    original did (docs/method.md §1.1): bicubic, align_corners=False, no antialiasing. timm antialiases, which
    uses another cubic kernel (a = -0.5 instead of -0.75) and changes the table when enlarging too.
    x: (B, h, w, D) patch tokens; returns (B, P + h*w, D) with the P prefix tokens first."""
    b, h, w, d = x.shape
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    table = vit.pos_embed
    grid = tuple(vit.patch_embed.grid_size)
    if (h, w) != grid:
        patches = table[:, prefix:].reshape(1, *grid, d).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
        table = torch.cat([table[:, :prefix], patches.permute(0, 2, 3, 1).reshape(1, h * w, d).to(table.dtype)], 1)
    tokens = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    x = x.reshape(b, h * w, d)
    x = torch.cat(tokens + [x + table], dim=1) if vit.no_embed_class else torch.cat(tokens + [x], dim=1) + table
    return vit.pos_drop(x)


class ToCoNet(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, aux_layer: int = -3, decoder_channels: int = 512,
                 decoder_dilation: int = 5, proj_hidden: int = 2048, proj_bottleneck: int = 256,
                 proj_out: int = 1024, freeze_pos_embed: bool = True, pooling: str = "gmp",
                 attention_window: int = 0, pos_embed_antialias: bool = False, token_classifier: bool = False):
        super().__init__()
        if attention_window < 0:
            raise ValueError(f"model.attention_window must be >= 0 (0 = global attention), got {attention_window}")
        self.attention_window = attention_window
        self._masks: dict[tuple, torch.Tensor] = {}
        if pooling not in ("gmp", "gap"):
            raise ValueError(f"model.pooling must be 'gmp' or 'gap', got {pooling!r}")
        self.pooling = pooling
        self.encoder = encoder
        depth = len(encoder.blocks)
        self.aux_index = aux_layer % depth
        if self.aux_index == depth - 1:
            raise ValueError(f"model.aux_layer={aux_layer} must name a block before the last of {depth}")
        if freeze_pos_embed:
            encoder.pos_embed.requires_grad_(False)
        if not pos_embed_antialias:  # a bound method, so a deep copy of the encoder resamples its own table
            encoder._pos_embed = types.MethodType(pos_embed_bicubic, encoder)
        dim = encoder.embed_dim
        embed = encoder.patch_embed  # input pixels per token side: the patch, or the conv stem's stride
        self.patch_size = embed.patch_size[0] * getattr(embed, "feature_ratio", (1,))[0]
        self.classifier = nn.Conv2d(dim, num_classes - 1, 1, bias=False)
        self.aux_classifier = nn.Conv2d(dim, num_classes - 1, 1, bias=False)
        # classifies the images from the class token, as ImageNet pre-training trains it: the pretext stage uses it so
        # that CTC, which reads the class token, starts from a trained one (docs/deviations.md)
        self.token_classifier = nn.Linear(dim, num_classes - 1) if token_classifier else None
        self.decoder = LargeFOV(dim, num_classes, decoder_channels, decoder_dilation)
        self.proj_head = CTCHead(dim, proj_hidden, proj_bottleneck, proj_out)
        self.proj_head_teacher = copy.deepcopy(self.proj_head).requires_grad_(False)

    def attention_mask(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """(P+hw, P+hw) bool, True where a query token (row) may read a key token, for `attention_window` k > 0:
        a patch reads the patches at most k tokens away (Chebyshev) and not the P prefix tokens, so every patch
        feature stays local however deep the encoder; the prefix tokens read everything. None: global attention."""
        if not self.attention_window:
            return None
        key = (h, w, str(device))
        if key not in self._masks:
            prefix = self.encoder.num_prefix_tokens
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            yy, xx = yy.flatten(), xx.flatten()
            near = torch.maximum((yy[:, None] - yy[None]).abs(), (xx[:, None] - xx[None]).abs()) <= self.attention_window
            mask = torch.ones(prefix + h * w, prefix + h * w, dtype=torch.bool)
            mask[prefix:, :prefix] = False
            mask[prefix:, prefix:] = near
            self._masks[key] = mask.to(device)
        return self._masks[key]

    def encode(self, x: torch.Tensor) -> Encoded:
        # the grid is floor(size / patch): the original's strided patch convolution drops the remainder rows and
        # columns; cropping them first does the same for any stem (docs/method.md §1.1)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = x[..., :h * self.patch_size, :w * self.patch_size]
        final, (aux,) = self.encoder.forward_intermediates(
            x, indices=[self.aux_index], norm=False, output_fmt="NCHW", return_prefix_tokens=False,
            attn_mask=self.attention_mask(h, w, x.device))
        b, n, d = final.shape
        prefix = self.encoder.num_prefix_tokens
        tokens = final[:, prefix:].transpose(1, 2).reshape(b, d, h, w)
        return Encoded(cls_token=final[:, 0], tokens=tokens, aux_tokens=aux)

    def heads(self, enc: Encoded, seg: bool = True) -> ModelOutput:
        # image score = 1x1 classifier on the globally pooled token map (docs/method.md §1.2: max pooling)
        pool = F.adaptive_max_pool2d if self.pooling == "gmp" else F.adaptive_avg_pool2d
        cls_logits = self.classifier(pool(enc.tokens, 1)).flatten(1)
        aux_cls_logits = self.aux_classifier(pool(enc.aux_tokens, 1)).flatten(1)
        token_logits = self.token_classifier(enc.cls_token) if self.token_classifier is not None else None
        return ModelOutput(cls_logits, aux_cls_logits, self.decoder(enc.tokens) if seg else None, enc.tokens,
                           token_logits)

    def forward(self, x: torch.Tensor, global2: torch.Tensor | None = None, local_crops: torch.Tensor | None = None,
                ema_momentum: float = 0.9, seg: bool = True) -> ModelOutput:
        """Segmentation and classification of `x`; with the CTC views also their projections.
        `seg=False` skips the decoder while its losses are off: DDP requires every output of a forward to reach
        the loss, and leaves the decoder's gradient None as a single process does.

        Everything with a gradient happens in this one call, so DistributedDataParallel sees one forward per
        backward. The original ran the main input, the teacher's global views and the student's global views
        as three passes through the same weights; one pass over [x, global2] gives the same values and
        gradients at 2/5 of the cost (the teacher's copy is the detached class tokens).
        """
        if global2 is None:
            return self.heads(self.encode(x), seg)
        b = x.shape[0]
        enc = self.encode(torch.cat([x, global2]))
        out = self.heads(Encoded(enc.cls_token[:b], enc.tokens[:b], enc.aux_tokens[:b]), seg)
        local_cls = self.encode(local_crops).cls_token                    # (L*B, D)
        self.update_teacher(ema_momentum)                                  # before the teacher pass, as the original
        out.teacher = self.proj_head_teacher(enc.cls_token.detach())       # (2B, out)
        out.student = self.proj_head(torch.cat([enc.cls_token, local_cls]))  # ((2+L)B, out)
        return out

    def forward_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (cam, aux_cam) at the token grid, (B, C-1, h, w): classifier weights applied to every token."""
        enc = self.encode(x)
        return self.classifier(enc.tokens), self.aux_classifier(enc.aux_tokens)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the projection head only; the encoder is shared (docs/method.md §1.4)."""
        for t, s in zip(self.proj_head_teacher.parameters(), self.proj_head.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """encoder weights, encoder norms, classifiers + projection head, decoder (docs/method.md §1.5)."""
        trainable = lambda named: [p for _, p in named if p.requires_grad]  # noqa: E731
        enc = list(self.encoder.named_parameters())
        return [
            trainable((n, p) for n, p in enc if "norm" not in n),
            trainable((n, p) for n, p in enc if "norm" in n),
            trainable([*self.classifier.named_parameters(), *self.aux_classifier.named_parameters(),
                       *self.proj_head.named_parameters(),
                       *(self.token_classifier.named_parameters() if self.token_classifier is not None else ())]),
            trainable(self.decoder.named_parameters()),
        ]


def build_model(model_cfg, num_classes: int) -> ToCoNet:
    encoder = create_encoder(model_cfg.backbone, model_cfg.pretrained, model_cfg.pretrained_file,
                             model_cfg.conv_stem, **model_cfg.backbone_kwargs)
    return ToCoNet(encoder, num_classes, model_cfg.aux_layer, model_cfg.decoder_channels,
                   model_cfg.decoder_dilation, model_cfg.proj_hidden, model_cfg.proj_bottleneck,
                   model_cfg.proj_out, model_cfg.freeze_pos_embed, model_cfg.pooling, model_cfg.attention_window,
                   model_cfg.pos_embed_antialias, model_cfg.token_classifier)
