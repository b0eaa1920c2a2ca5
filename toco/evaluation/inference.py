"""The test-time path of one image (docs/method.md §5.2-5.3): what in-training validation, `toco eval`, `toco predict`
and the benchmarks all run.

`predict_image` is that path: resize or cap the image (`InferenceSettings.network_input`), segment it at the
test-time scales with flips (`segment`), fuse, upsample to the image's size, and take the argmax or refine with the
DenseCRF (`crf_refine`). The network runs in `InferenceSettings.precision` (autocast); fusion, softmax, the CRF and
every metric stay in float32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from toco.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

MS_SCALES = (1.0, 1.25, 1.5)  # test-time scales, each with its flip (docs/method.md §5.2)
# DenseCRF post-processing as the original's utils/dcrf.py: 10 mean-field iterations, Gaussian (sxy 1, compat 1),
# bilateral (sxy 121, srgb 5, compat 4) on the uint8 RGB image (docs/method.md §5.3)
CRF_PARAMS = dict(n_iter=10, gauss_sxy=1.0, gauss_compat=1.0, bil_sxy=121.0, bil_srgb=5.0, bil_compat=4.0)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FUSIONS = ("voc", "coco")  # how the scales and flips combine (`segment`); a dataset's protocol names one


@dataclass
class InferenceSettings:
    """How a model segments an image at test time (docs/method.md §5.2)."""
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    fusion: str = "voc"              # voc: sum over flip, max over scales; coco: max over flip, sum over scales
    crf: bool = False
    crf_backend: str = "auto"        # toco.crf backend
    resize: int | None = None        # square input side (COCO's protocol: 448); None = the image's own size
    max_side: int | None = None      # downscale larger images to this long side (prediction on any photo)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the network's arithmetic (autocast)

    @classmethod
    def from_config(cls, cfg, **changes) -> "InferenceSettings":
        """The settings of a config's `inference:` section, with the fusion rule of its dataset
        (toco.data.registry) and `changes` (what command-line flags set) over them."""
        from toco.data.registry import dataset_kind

        section = cfg.inference
        settings = cls(tuple(section.scales), section.flip, dataset_kind(cfg.data).fusion, section.crf,
                       section.crf_backend, section.resize, precision=section.precision)
        return replace(settings, **changes)

    @property
    def name(self) -> str:
        """What a result folder is named after: every setting that changes the numbers."""
        if self.scales == (1.0,) and not self.flip:
            name = "ss"
        elif self.scales == MS_SCALES and self.flip:
            name = "ms_flip"
        else:
            name = "scales" + "-".join(f"{s:g}" for s in self.scales) + ("_flip" if self.flip else "")
        name += "_crf" if self.crf else ""
        name += f"_resize{self.resize}" if self.resize else ""
        return name + ("" if self.precision == "fp32" else f"_{self.precision}")

    @property
    def single_pass(self) -> bool:
        """One forward of the network input makes the segmentation (its other outputs can be reused)."""
        return self.scales == (1.0,) and not self.flip

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """(1,3,H,W) normalised image -> what the network sees before the scales: resized or capped."""
        h, w = x.shape[-2:]
        if self.resize:
            return F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if self.max_side and max(h, w) > self.max_side:
            ratio = self.max_side / max(h, w)
            return F.interpolate(x, size=(max(round(h * ratio), 1), max(round(w * ratio), 1)), mode="bilinear",
                                 align_corners=False)
        return x


def autocast(precision: str, device: torch.device):
    """The network's arithmetic: autocast to bf16/fp16, or nothing for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _seg_logits(model, x: torch.Tensor, patch: int, out_size: tuple[int, int]):
    """(segmentation logits of `x` (N,3,h,w) in float32, upsampled (bilinear) to out_size; the network's output,
    or None when the input was padded). A side that is not a multiple of the patch size is padded with black
    (what training crops are padded with) and the padding cropped off again."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % patch, -w % patch
    if pad_h or pad_w:
        black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).to(x)  # (3,) uint8 0 normalised
        canvas = black.view(1, 3, 1, 1).repeat(x.shape[0], 1, h + pad_h, w + pad_w)
        canvas[..., :h, :w] = x
        logits = model(canvas).seg_logits.float()
        logits = F.interpolate(logits, size=(h + pad_h, w + pad_w), mode="bilinear", align_corners=False)
        logits = logits[..., :h, :w]
        if (h, w) == tuple(out_size):
            return logits, None
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False), None
    output = model(x)
    return F.interpolate(output.seg_logits.float(), size=out_size, mode="bilinear", align_corners=False), output


@torch.no_grad()
def segment(model, image: torch.Tensor, scales=(1.0,), flip: bool = False, fusion: str = "voc",
            out_size: tuple[int, int] | None = None, precision: str = "fp32") -> torch.Tensor:
    """Fused segmentation logits (B,C,H',W') in float32 at `out_size` (default: the image's own size).

    image: (B,3,H,W) ImageNet-normalised. Per scale s the image is resized (bilinear) to (int(sH), int(sW)); with
    `flip` its mirror image runs in the same batch and its logits are mirrored back; logits are upsampled to
    out_size. "voc" sums an image's and its flip's logits and takes the max over scales; "coco" takes the max
    over the flip and sums over scales.
    """
    return _segment(model, image, scales, flip, fusion, out_size, precision)[0]


def _segment(model, image, scales, flip, fusion, out_size, precision):
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    b, _, h, w = image.shape
    out_size = tuple(out_size or (h, w))
    patch = getattr(model, "patch_size", 1)
    fused = output = None
    with autocast(precision, image.device):
        for s in scales:
            size = (max(int(s * h), 1), max(int(s * w), 1))
            x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            if flip:
                x = torch.cat([x, x.flip(-1)])
            logits, output = _seg_logits(model, x, patch, out_size)       # (B or 2B, C, H', W')
            if flip:
                plain, mirrored = logits[:b], logits[b:].flip(-1)
                logits = plain + mirrored if fusion == "voc" else torch.maximum(plain, mirrored)
            if fused is None:
                fused = logits
            else:
                fused = torch.maximum(fused, logits) if fusion == "voc" else fused + logits
    return fused, output


def crf_refine(image: np.ndarray, probs, backend: str = "auto") -> np.ndarray:
    """DenseCRF post-processing with CRF_PARAMS: image uint8 (H,W,3) RGB, probs (K,H,W) softmax (a tensor stays
    on its device: the CRF runs on the GPU there) -> labels (H,W) int64 numpy. backend as in `toco.crf`."""
    from toco.crf import dense_crf

    image = np.ascontiguousarray(image, dtype=np.uint8)
    if tuple(probs.shape[1:]) != image.shape[:2]:
        raise ValueError(f"probs {tuple(probs.shape)} and image {image.shape} sizes differ")
    labels = dense_crf(image, probs, **CRF_PARAMS, backend=backend)
    return (labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)).astype(np.int64)


@dataclass
class Prediction:
    labels: np.ndarray                 # (H,W) int64 at the image's size
    probs: torch.Tensor | None         # (C,H,W) float32 softmax, when the CRF ran or it was asked for
    output: object | None              # the network's output, when one unpadded forward made the segmentation


@torch.no_grad()
def predict_image(model, image: np.ndarray, settings: InferenceSettings, device, keep_probs: bool = False
                  ) -> Prediction:
    """uint8 (H,W,3) RGB -> the segmentation at the image's size, by `settings`: the one test-time path."""
    h, w = image.shape[:2]
    x = settings.network_input(normalize(image)[None].to(device))
    logits, output = _segment(model, x, settings.scales, settings.flip, settings.fusion, (h, w),
                              settings.precision)                                    # (1,C,H,W)
    probs = logits[0].softmax(dim=0) if settings.crf or keep_probs else None
    labels = (crf_refine(image, probs, backend=settings.crf_backend) if settings.crf
              else logits[0].argmax(dim=0).cpu().numpy())
    return Prediction(labels, probs, output if settings.single_pass else None)
