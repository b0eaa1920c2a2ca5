"""Inference with a trained checkpoint (SPEC §5, SPEC-DETAIL 5.2-5.4).

- `load_trained_model`: a checkpoint into a model, safely (weights only) and with a readable error on a mismatch.
- `segment`: fused segmentation logits, single scale or multi-scale + flip with the VOC or COCO fusion rule.
- `crf_refine`: DenseCRF post-processing of the fused probabilities (`toco.crf`).
- `evaluate_split`: mIoU of a split (writes palette PNGs); `evaluate_pseudo_labels`: CAM / aux-CAM / PAR-refined
  pseudo-label quality (the paper's "pseudo label mIoU" on the train split).
- `predict_file`: segmentation of one arbitrary image file, with a coloured overlay.

Free of MLflow and the CLI (`toco.cli` wraps these with printing and tracking).
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from toco import viz
from toco.config import Config, load_config
from toco.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from toco.engine.checkpoint import check_compatible, load_checkpoint
from toco.metrics import ConfusionMatrix
from toco.models import ToCoNet, build_model
from toco.par import PAR
from toco.pseudo import cam_to_label, multi_scale_cam, refine_cams_with_bkg

MS_SCALES = (1.0, 1.25, 1.5)  # SPEC §5 test-time scales, each with its flip
# SPEC §5 / the original utils/dcrf.py: 10 mean-field iterations, Gaussian (sxy 1, compat 1), bilateral
# (sxy 121, srgb 5, compat 4) on the uint8 RGB image
CRF_PARAMS = dict(n_iter=10, gauss_sxy=1.0, gauss_compat=1.0, bil_sxy=121.0, bil_srgb=5.0, bil_compat=4.0)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this config; the message says why."""


# ----------------------------------------------------------------------------------------------------
# loading
def checkpoint_config(checkpoint: str | Path, config: str | Path | None = None,
                      overrides: list[str] | None = None) -> Config:
    """The config a checkpoint was trained with: `config` if given, else the config.yaml the training loop saved
    beside the checkpoint."""
    if config is None:
        config = Path(checkpoint).parent / "config.yaml"
        if not config.is_file():
            raise CheckpointError(f"no config.yaml beside {checkpoint}: pass the training config with --config")
    return load_config(config, overrides)


def load_trained_model(cfg: Config, checkpoint: str | Path, device: torch.device | str = "cpu") -> ToCoNet:
    """Build the model `cfg` describes and load the checkpoint's weights into it, in eval mode.

    Loading never unpickles code (`weights_only=True`). A checkpoint of another backbone or class count raises
    `CheckpointError` naming what differs (`check_compatible`), not a list of tensor shapes.
    """
    model = build_model(dataclasses.replace(cfg.model, pretrained=False), cfg.data.num_classes)
    try:
        state = load_checkpoint(checkpoint, map_location="cpu")
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {checkpoint} is not a readable weights-only PyTorch file: "
                              f"{reason}") from None
    weights = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"checkpoint {checkpoint} holds no model weights (expected a 'model' state dict)")
    try:
        check_compatible(model, weights, checkpoint)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    model.load_state_dict(weights)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------
# test-time fusion and CRF (SPEC §5)
def _seg_logits(model, x: torch.Tensor, patch: int, out_size: tuple[int, int]) -> torch.Tensor:
    """Segmentation logits of `x` (N,3,h,w) upsampled (bilinear) to out_size. A side that is not a multiple of
    the patch size is padded with black (what training crops are padded with) and the padding cropped off again."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % patch, -w % patch
    if pad_h or pad_w:
        black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).to(x)  # (3,) uint8 0 normalised
        canvas = black.view(1, 3, 1, 1).repeat(x.shape[0], 1, h + pad_h, w + pad_w)
        canvas[..., :h, :w] = x
        logits = model(canvas).seg_logits
        logits = F.interpolate(logits, size=(h + pad_h, w + pad_w), mode="bilinear", align_corners=False)
        logits = logits[..., :h, :w]
        if (h, w) == tuple(out_size):
            return logits
    else:
        logits = model(x).seg_logits
    return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


@torch.no_grad()
def segment(model, image: torch.Tensor, scales=(1.0,), flip: bool = False, fusion: str = "voc",
            out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Fused segmentation logits (B,C,H',W') at `out_size` (default: the image's own size).

    image: (B,3,H,W) ImageNet-normalised. Per scale s the image is resized (bilinear) to (int(sH), int(sW)); with
    `flip` its mirror image runs in the same batch and its logits are mirrored back; logits are upsampled to
    out_size. "voc" sums an image's and its flip's logits and takes the max over scales; "coco" takes the max
    over the flip and sums over scales.
    """
    if fusion not in ("voc", "coco"):
        raise ValueError(f"fusion must be 'voc' or 'coco', got {fusion!r}")
    b, _, h, w = image.shape
    out_size = tuple(out_size or (h, w))
    patch = getattr(model, "patch_size", 1)
    fused = None
    for s in scales:
        size = (max(int(s * h), 1), max(int(s * w), 1))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        logits = _seg_logits(model, x, patch, out_size)               # (B or 2B, C, H', W')
        if flip:
            plain, mirrored = logits[:b], logits[b:].flip(-1)
            logits = plain + mirrored if fusion == "voc" else torch.maximum(plain, mirrored)
        if fused is None:
            fused = logits
        else:
            fused = torch.maximum(fused, logits) if fusion == "voc" else fused + logits
    return fused


def crf_refine(image: np.ndarray, probs, backend: str = "auto") -> np.ndarray:
    """DenseCRF post-processing with the SPEC §5 parameters: image uint8 (H,W,3) RGB, probs (K,H,W) softmax (a
    tensor stays on its device: the CRF runs on the GPU there) -> labels (H,W) int64 numpy.

    `toco.crf.dense_crf` runs pydensecrf's recipe on the permutohedral lattice; backend as there ('auto',
    'cpu', 'cuda', 'pydensecrf', 'exact')."""
    from toco.crf import dense_crf

    image = np.ascontiguousarray(image, dtype=np.uint8)
    if tuple(probs.shape[1:]) != image.shape[:2]:
        raise ValueError(f"probs {tuple(probs.shape)} and image {image.shape} sizes differ")
    labels = dense_crf(image, probs, **CRF_PARAMS, backend=backend)
    return (labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)).astype(np.int64)


@dataclass
class InferenceSettings:
    """How a checkpoint runs at test time (SPEC §5)."""
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    fusion: str = "voc"              # voc: sum over flip, max over scales; coco: max over flip, sum over scales
    crf: bool = False
    crf_backend: str = "auto"        # toco.crf backend
    resize: int | None = None        # square input side, as in-training validation; None = native resolution
    max_side: int | None = None      # downscale larger images to this long side (prediction on any photo)

    @classmethod
    def from_flags(cls, ms: bool, crf: bool, dataset: str, **kwargs) -> "InferenceSettings":
        return cls(MS_SCALES if ms else (1.0,), ms, "coco" if dataset == "coco" else "voc", crf, **kwargs)

    @property
    def name(self) -> str:
        name = "ms_flip" if len(self.scales) > 1 or self.flip else "ss"
        name += "_crf" if self.crf else ""
        return name + (f"_resize{self.resize}" if self.resize else "")


@torch.no_grad()
def predict_image(model, image: np.ndarray, settings: InferenceSettings, device) -> np.ndarray:
    """uint8 (H,W,3) RGB -> labels (H,W) int64 at the image's size."""
    h, w = image.shape[:2]
    x = normalize(image)[None].to(device)                           # (1,3,H,W)
    if settings.resize:
        x = F.interpolate(x, size=(settings.resize, settings.resize), mode="bilinear", align_corners=False)
    elif settings.max_side and max(h, w) > settings.max_side:
        ratio = settings.max_side / max(h, w)
        x = F.interpolate(x, size=(max(round(h * ratio), 1), max(round(w * ratio), 1)), mode="bilinear",
                          align_corners=False)
    logits = segment(model, x, settings.scales, settings.flip, settings.fusion, out_size=(h, w))  # (1,C,H,W)
    if settings.crf:
        return crf_refine(image, logits[0].softmax(dim=0), backend=settings.crf_backend)
    return logits[0].argmax(dim=0).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# evaluation of a split
@dataclass
class SplitEvaluation:
    confusion: ConfusionMatrix
    class_names: list[str]
    images: int
    seconds: float
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # image, pred, gt

    @property
    def scored(self) -> bool:
        return bool(self.confusion.matrix.sum())

    def metrics(self) -> dict[str, float | None]:
        """mIoU and pixel accuracy (None for a split without masks) and throughput."""
        scores = {"miou": self.confusion.miou(), "pixel_acc": self.confusion.pixel_accuracy()} if self.scored else {
            "miou": None, "pixel_acc": None}
        return dict(scores, images_per_s=self.images / max(self.seconds, 1e-9))

    def per_class_iou(self) -> dict[str, float | None]:
        iou = self.confusion.iou()
        return {n: (None if np.isnan(v) else round(float(v), 6)) for n, v in zip(self.class_names, iou)}


def evaluate_split(model, source, settings: InferenceSettings, device, out_dir: str | Path | None = None,
                   limit: int = 0, keep: int = 6) -> SplitEvaluation:
    """Predict every image of `source` at its own size and accumulate the confusion matrix (SPEC §5: over the
    whole split, ignore 255 excluded). With out_dir, each prediction is written as a VOC palette PNG
    `out_dir/<name>.png`. A split without masks (VOC test) only gets its predictions written (metrics NaN)."""
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    confusion = ConfusionMatrix(source.num_classes)
    n = min(len(source), limit) if limit else len(source)
    samples = []
    start = time.perf_counter()
    for i in range(n):
        sample = source.load(i)
        pred = predict_image(model, sample.image, settings, device)
        if sample.mask is not None:
            confusion.update(pred, sample.mask)
        if out_dir is not None:
            viz.save_label_png(pred, Path(out_dir) / f"{sample.name}.png")
        if len(samples) < keep and sample.mask is not None:
            samples.append((sample.image, pred, sample.mask))
    return SplitEvaluation(confusion, list(source.class_names), n, time.perf_counter() - start, samples)


def _nearest(label: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


@torch.no_grad()
def evaluate_pseudo_labels(model, source, cfg: Config, device, limit: int = 0) -> dict[str, float]:
    """Quality of the labels the network makes for itself, on a split with masks (the paper reports it on train).

    CAMs as in training (multi-scale + flip on the input resized to data.val_size), then against the masks:
    `cam`, `aux_cam`: CAM -> label with the bkg threshold (as in-training validation); `cam_par`,
    `aux_cam_par`: the same after PAR refinement (background plane at the bkg threshold); `seg_target`: the
    segmentation target a training step would make (PAR, high/low planes), scored on the pixels it labels, with
    `seg_target_coverage` the share of labelled ground-truth pixels it does label.
    """
    if not source.has_masks:
        raise ValueError("pseudo labels can only be scored on a split with masks")
    pc, size = cfg.pseudo, cfg.data.val_size
    par = PAR(pc.par_dilations, pc.par_iters).to(device)
    keys = ("cam", "aux_cam", "cam_par", "aux_cam_par", "seg_target")
    confusion = {k: ConfusionMatrix(source.num_classes) for k in keys}
    covered = labelled = 0
    n = min(len(source), limit) if limit else len(source)
    for i in range(n):
        sample = source.load(i)
        gt = torch.from_numpy(sample.mask.astype(np.int64))[None]            # (1,H,W)
        cls_label = torch.from_numpy(sample.cls_label)[None].to(device)      # (1,C-1)
        x = F.interpolate(normalize(sample.image)[None].to(device), size=(size, size), mode="bilinear",
                          align_corners=False)
        images01 = denormalize(x).clamp(0, 255).floor() / 255                # as the training step sees it
        cams = dict(zip(("cam", "aux_cam"), multi_scale_cam(model, x, pc.cam_scales)))  # (1,C-1,S,S) each
        preds = {}
        for key, cam in cams.items():
            up = F.interpolate(cam, size=gt.shape[-2:], mode="bilinear", align_corners=False)
            preds[key] = cam_to_label(up, cls_label, pc.bkg_thre)
            preds[f"{key}_par"] = _nearest(refine_cams_with_bkg(par, images01, cam, cls_label, pc.bkg_thre,
                                                                pc.bkg_thre), gt.shape[-2:])
        target = _nearest(refine_cams_with_bkg(par, images01, cams["cam"], cls_label, pc.high_thre, pc.low_thre),
                          gt.shape[-2:]).cpu()
        valid = gt != 255
        labelled += int(valid.sum())
        covered += int((valid & (target != 255)).sum())
        preds["seg_target"] = target                                         # its 255s are excluded below
        for key, pred in preds.items():
            truth = gt.masked_fill(target == 255, 255) if key == "seg_target" else gt
            confusion[key].update(pred.cpu(), truth)
    metrics = {f"pseudo/miou_{k}": cm.miou() for k, cm in confusion.items()}
    metrics["pseudo/seg_target_coverage"] = covered / max(labelled, 1)
    return metrics


def write_split_summary(result: SplitEvaluation, folder: Path, extra: dict) -> dict:
    """summary.json (metrics, per-class IoU, settings), per_class_iou.txt, confusion matrix and a picture grid."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = dict(extra, metrics=result.metrics(), per_class_iou=result.per_class_iou(), images=result.images)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (folder / "per_class_iou.txt").write_text(result.confusion.table(result.class_names) + "\n")
    viz.confusion_plot(result.confusion.matrix, result.class_names, folder / "confusion.png")
    if result.samples:
        rows = [[image, viz.overlay(image, pred), viz.colorize(gt)] for image, pred, gt in result.samples]
        viz.picture_grid(rows, ["image", "prediction", "ground truth"], folder / "samples.png")
    return summary


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, split: str, settings: InferenceSettings,
                        out_dir: str | Path, pseudo_split: str | None = None,
                        limit: int = 0) -> tuple[SplitEvaluation, dict]:
    """`toco eval`: load, predict a split into out_dir/pred/*.png, score it, optionally score the pseudo labels on
    `pseudo_split`; writes out_dir/summary.json and returns (result, summary)."""
    from toco.data import build_source
    from toco.engine.loop import resolve_device

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    model = load_trained_model(cfg, checkpoint, device)
    out_dir = Path(out_dir)
    result = evaluate_split(model, build_source(cfg.data, split), settings, device, out_dir / "pred", limit)
    extra = dict(checkpoint=str(checkpoint), split=split, test_time=dataclasses.asdict(settings),
                 dataset=cfg.data.name, backbone=cfg.model.backbone)
    if pseudo_split:
        extra["pseudo_split"] = pseudo_split
        extra["pseudo"] = evaluate_pseudo_labels(model, build_source(cfg.data, pseudo_split), cfg, device, limit)
    return result, write_split_summary(result, out_dir, extra)


# ----------------------------------------------------------------------------------------------------
# prediction on arbitrary files
def predict_file(model, path: str | Path, settings: InferenceSettings, device, out_dir: str | Path,
                 stem: str | None = None, class_names: list[str] | None = None) -> dict:
    """Segment one image file (any size; grayscale, palette, RGBA converted to RGB). Writes `<stem>.png`
    (palette labels) and `<stem>_overlay.png` (the prediction blended over the image); returns the share of
    pixels of each predicted class. Raises toco.data.DatasetError for an unreadable file."""
    from toco.data.datasets import read_image

    image = read_image(Path(path))
    label = predict_image(model, image, settings, device)
    out_dir, stem = Path(out_dir), stem or Path(path).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    viz.save_label_png(label, out_dir / f"{stem}.png")
    Image.fromarray(viz.overlay(image, label)).save(out_dir / f"{stem}_overlay.png")
    ids, counts = np.unique(label, return_counts=True)
    names = class_names or [str(i) for i in range(int(ids.max()) + 1)]
    return {names[i]: round(float(c) / label.size, 4) for i, c in zip(ids.tolist(), counts.tolist())}
