"""Evaluation: the one place a model is scored (docs/evaluation.md; the protocol: docs/method.md §5).

In-training validation, `toco eval` (in this process or sharded over Ray Data actors), pseudo-label scoring and
`toco predict` share:

- the test-time path of one image: `InferenceSettings`, `segment` (multi-scale + flip fusion), `crf_refine`;
- `ImageScorer`: everything measured on one image, added to `Scores` (integer confusion matrices and counts, so
  a sum over shards or workers is exact);
- `score_images`: the loop over a source;
- `run_evaluation`: a split cut into shards, each recorded in the output folder as it completes (a killed
  evaluation resumes where it stopped), scored here or by Ray workers (`toco.distributed.evaluate`);
- `write_results`: a result folder, its files named the same everywhere.

Free of MLflow and the CLI.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from toco import viz
from toco.config import Config
from toco.data import DatasetError, Sample, build_source
from toco.data.datasets import read_image
from toco.errors import UserError
from toco.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from toco.metrics import ConfusionMatrix
from toco.par import PAR
from toco.pseudo import cam_to_label, multi_scale_cam, refine_cams_with_bkg

MS_SCALES = (1.0, 1.25, 1.5)  # test-time scales, each with its flip (docs/method.md §5.2)
# DenseCRF post-processing as the original's utils/dcrf.py: 10 mean-field iterations, Gaussian (sxy 1, compat 1),
# bilateral (sxy 121, srgb 5, compat 4) on the uint8 RGB image (docs/method.md §5.3)
CRF_PARAMS = dict(n_iter=10, gauss_sxy=1.0, gauss_compat=1.0, bil_sxy=121.0, bil_srgb=5.0, bil_compat=4.0)

# What can be measured on one image (docs/evaluation.md):
#   seg          the segmentation, with the test-time settings
#   cam, aux_cam CAM -> label at pseudo.bkg_thre, from the multi-scale CAM of the image resized to data.val_size
#   cam_par, aux_cam_par  the same after PAR (background plane at bkg_thre)
#   seg_target   the segmentation target a training step would make, scored on the pixels it labels
#   cls          classification F1 of (logits > 0) against the image-level labels
VALIDATION = ("seg", "cam", "aux_cam", "cls")                                 # in-training validation
PSEUDO_LABELS = ("cam", "aux_cam", "cam_par", "aux_cam_par", "seg_target")   # `toco eval --pseudo`
METRICS = ("seg", "cam", "aux_cam", "cam_par", "aux_cam_par", "seg_target", "cls")


# ----------------------------------------------------------------------------------------------------
# test-time fusion and CRF (docs/method.md §5.2-5.3)
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
    """DenseCRF post-processing with CRF_PARAMS: image uint8 (H,W,3) RGB, probs (K,H,W) softmax (a tensor stays
    on its device: the CRF runs on the GPU there) -> labels (H,W) int64 numpy. backend as in `toco.crf`."""
    from toco.crf import dense_crf

    image = np.ascontiguousarray(image, dtype=np.uint8)
    if tuple(probs.shape[1:]) != image.shape[:2]:
        raise ValueError(f"probs {tuple(probs.shape)} and image {image.shape} sizes differ")
    labels = dense_crf(image, probs, **CRF_PARAMS, backend=backend)
    return (labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)).astype(np.int64)


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

    @classmethod
    def from_flags(cls, ms: bool, crf: bool, dataset: str, **kwargs) -> "InferenceSettings":
        return cls(MS_SCALES if ms else (1.0,), ms, "coco" if dataset == "coco" else "voc", crf, **kwargs)

    @property
    def name(self) -> str:
        name = "ms_flip" if len(self.scales) > 1 or self.flip else "ss"
        name += "_crf" if self.crf else ""
        return name + (f"_resize{self.resize}" if self.resize else "")

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


@torch.no_grad()
def predict_image(model, image: np.ndarray, settings: InferenceSettings, device) -> np.ndarray:
    """uint8 (H,W,3) RGB -> labels (H,W) int64 at the image's size."""
    h, w = image.shape[:2]
    x = settings.network_input(normalize(image)[None].to(device))
    logits = segment(model, x, settings.scales, settings.flip, settings.fusion, out_size=(h, w))  # (1,C,H,W)
    if settings.crf:
        return crf_refine(image, logits[0].softmax(dim=0), backend=settings.crf_backend)
    return logits[0].argmax(dim=0).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# scores
@dataclass
class Scores:
    """What a set of images scored: a confusion matrix per label metric, classification and coverage counts.
    All integers, so adding the scores of shards or workers gives exactly the scores of the whole split."""
    num_classes: int
    metrics: tuple[str, ...]
    confusion: dict[str, ConfusionMatrix] = field(default_factory=dict)
    cls_counts: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))  # tp, fp, fn over images x classes
    coverage: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))    # seg_target: labelled, all gt px
    images: int = 0

    def __post_init__(self):
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {METRICS}")
        for m in self.metrics:
            if m != "cls":
                self.confusion.setdefault(m, ConfusionMatrix(self.num_classes))

    def add(self, other: "Scores") -> "Scores":
        for m, cm in other.confusion.items():
            self.confusion[m].merge(cm)
        self.cls_counts += other.cls_counts
        self.coverage += other.coverage
        self.images += other.images
        return self

    def summary(self) -> dict[str, float]:
        """miou_<metric> per label metric, pixel_acc_seg, cls_f1, seg_target_coverage (those measured)."""
        out = {f"miou_{m}": cm.miou() for m, cm in self.confusion.items()}
        if "seg" in self.confusion:
            out["pixel_acc_seg"] = self.confusion["seg"].pixel_accuracy()
        if "cls" in self.metrics:
            tp, fp, fn = self.cls_counts
            out["cls_f1"] = float(2 * tp / (2 * tp + fp + fn)) if 2 * tp + fp + fn else 0.0  # micro F1
        if "seg_target" in self.metrics:
            out["seg_target_coverage"] = float(self.coverage[0] / max(self.coverage[1], 1))
        return out

    def per_class_iou(self, class_names) -> dict[str, dict[str, float | None]]:
        return {m: {n: (None if np.isnan(v) else round(float(v), 6)) for n, v in zip(class_names, cm.iou())}
                for m, cm in self.confusion.items()}

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"confusion/{m}": cm.matrix for m, cm in self.confusion.items()}
        return dict(arrays, cls_counts=self.cls_counts, coverage=self.coverage, images=np.array(self.images),
                    num_classes=np.array(self.num_classes), metrics=np.array(list(self.metrics)))

    @classmethod
    def from_arrays(cls, arrays) -> "Scores":
        scores = cls(int(arrays["num_classes"]), tuple(str(m) for m in arrays["metrics"]))
        for m, cm in scores.confusion.items():
            cm.matrix[:] = arrays[f"confusion/{m}"]
        scores.cls_counts[:] = arrays["cls_counts"]
        scores.coverage[:] = arrays["coverage"]
        scores.images = int(arrays["images"])
        return scores


def _nearest(label: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class ImageScorer:
    """Scores one image at a time with a model in eval mode and adds it to a `Scores`.

    `metrics` (METRICS) are measured against the sample's mask and labels; `predict` also segments images that
    have none (`toco predict`, a test split). Calling it returns what a person would look at: the image, the
    prediction, the ground truth and, where CAMs were made, the CAM heat map and its label.
    """

    def __init__(self, model, cfg: Config, metrics: tuple[str, ...], settings: InferenceSettings, device,
                 predict: bool = False, keep_probs: bool = False):
        self.model, self.cfg, self.metrics, self.settings = model, cfg, tuple(metrics), settings
        self.device = torch.device(device)
        self.predict = predict or "seg" in self.metrics
        self.keep_probs = keep_probs
        self.cams = any(m in self.metrics for m in ("cam", "aux_cam", "cam_par", "aux_cam_par", "seg_target"))
        self.par = None
        if any(m in self.metrics for m in ("cam_par", "aux_cam_par", "seg_target")):
            self.par = PAR(cfg.pseudo.par_dilations, cfg.pseudo.par_iters).to(self.device)

    @torch.no_grad()
    def __call__(self, sample: Sample, scores: Scores) -> dict:
        model, image = self.model, sample.image
        h, w = image.shape[:2]
        x = normalize(image)[None].to(self.device)                                  # (1,3,H,W)
        size = self.cfg.data.val_size
        plain_val = (self.settings.resize == size and self.settings.scales == (1.0,) and not self.settings.flip)
        x_val = None  # the image at the validation size: the CAMs' input
        if self.cams or "cls" in self.metrics or plain_val:
            x_val = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        labelled = sample.mask is not None
        gt = torch.from_numpy(sample.mask.astype(np.int64))[None] if labelled else None     # (1,H,W)
        cls_label = torch.from_numpy(sample.cls_label)[None].to(self.device) if labelled else None  # (1,C-1)
        shown = {"image": image, "gt": sample.mask}

        # one forward at the validation size serves the classification and, in the in-training protocol, the seg
        out_val = model(x_val) if "cls" in self.metrics or (self.predict and plain_val) else None
        if self.predict:
            if out_val is not None and plain_val:
                logits = F.interpolate(out_val.seg_logits, size=(h, w), mode="bilinear", align_corners=False)
            else:
                s = self.settings
                logits = segment(model, s.network_input(x), s.scales, s.flip, s.fusion, out_size=(h, w))
            probs = logits[0].softmax(dim=0) if self.settings.crf or self.keep_probs else None  # (C,H,W)
            pred = (crf_refine(image, probs, self.settings.crf_backend) if self.settings.crf
                    else logits[0].argmax(dim=0).cpu().numpy())
            shown.update(pred=pred, probs=probs)
            if "seg" in self.metrics and labelled:
                scores.confusion["seg"].update(pred, sample.mask)
        if "cls" in self.metrics and labelled:
            predicted, truth = (out_val.cls_logits[0] > 0).cpu().numpy(), sample.cls_label > 0.5
            scores.cls_counts += [(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()]
        if self.cams and labelled:
            shown.update(self._score_cams(x_val, gt, cls_label, scores))
        scores.images += 1
        return shown

    def _score_cams(self, x_val, gt, cls_label, scores: Scores) -> dict:
        pseudo_cfg = self.cfg.pseudo
        cams = dict(zip(("cam", "aux_cam"), multi_scale_cam(self.model, x_val, pseudo_cfg.cam_scales)))  # (1,C-1,S,S)
        images01 = denormalize(x_val).clamp(0, 255).floor() / 255                # as the training step sees it
        shown = {}
        for key, cam in cams.items():
            up = F.interpolate(cam, size=gt.shape[-2:], mode="bilinear", align_corners=False)
            label = cam_to_label(up, cls_label, pseudo_cfg.bkg_thre)
            if key in self.metrics:
                scores.confusion[key].update(label.cpu(), gt)
            if key == "cam":
                present = cls_label[0] > 0.5
                heat = up[0][present].amax(dim=0) if present.any() else torch.zeros(gt.shape[-2:])
                shown.update(cam=heat.cpu().numpy(), cam_label=label[0].cpu().numpy())
            if f"{key}_par" in self.metrics:
                refined = refine_cams_with_bkg(self.par, images01, cam, cls_label, pseudo_cfg.bkg_thre,
                                               pseudo_cfg.bkg_thre)
                scores.confusion[f"{key}_par"].update(_nearest(refined, gt.shape[-2:]).cpu(), gt)
        if "seg_target" in self.metrics:
            target = _nearest(refine_cams_with_bkg(self.par, images01, cams["cam"], cls_label, pseudo_cfg.high_thre,
                                                   pseudo_cfg.low_thre), gt.shape[-2:]).cpu()
            valid = gt != 255
            scores.coverage += [int((valid & (target != 255)).sum()), int(valid.sum())]
            scores.confusion["seg_target"].update(target, gt.masked_fill(target == 255, 255))  # its 255s excluded
        return shown


# ----------------------------------------------------------------------------------------------------
# the loop
class _Loaded(torch.utils.data.Dataset):
    """source.load(i) for DataLoader workers; a DatasetError comes back as a value, so the loop raises it with
    its one-line message instead of DataLoader's wrapped traceback."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        try:
            return self.source.load(self.indices[k])
        except DatasetError as err:
            return err


def _as_is(item):
    return item


def score_images(scorer: ImageScorer, source, indices, scores: Scores, keep: int = 0, num_workers: int = 0,
                 on_image=None, skip_unreadable: bool = False, progress: tqdm | None = None) -> tuple[list, list]:
    """Score `source`'s images at `indices` into `scores`; images load in `num_workers` processes ahead of the
    model. `on_image(sample, shown)` sees every image (files written by workers). Returns (the first `keep`
    images' pictures, the unreadable files skipped when `skip_unreadable`, else the first one raises)."""
    loader = torch.utils.data.DataLoader(_Loaded(source, indices), batch_size=None, num_workers=num_workers,
                                         collate_fn=_as_is)
    samples, skipped = [], []
    for item in loader:
        if isinstance(item, DatasetError):
            if not skip_unreadable:
                raise item
            skipped.append(str(item))
        else:
            shown = scorer(item, scores)
            if on_image is not None:
                on_image(item, shown)
            if len(samples) < keep:
                samples.append({k: v for k, v in shown.items() if k != "probs"})
        if progress is not None:
            progress.update(1)
    return samples, skipped


def evaluate_model(model, cfg: Config, source, metrics=VALIDATION, settings: InferenceSettings | None = None,
                   limit: int = 0, keep: int = 6, num_workers: int = 0, desc: str = "validate") -> tuple[Scores, list]:
    """Score a model in this process (in-training validation: resized to data.val_size, single scale)."""
    settings = settings or InferenceSettings(resize=cfg.data.val_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = Scores(source.num_classes, tuple(metrics))
    n = min(len(source), limit) if limit else len(source)
    with tqdm(total=n, desc=desc, unit="img", leave=False, dynamic_ncols=True, mininterval=2.0) as progress:
        samples, _ = score_images(ImageScorer(model, cfg, metrics, settings, device), source, range(n), scores,
                                  keep, num_workers, progress=progress)
    model.train(was_training)
    return scores, samples


# ----------------------------------------------------------------------------------------------------
# shards: an evaluation of many images, here or on Ray workers, resumable
class ImageFiles:
    """Image files as a source without masks (`toco predict`): names are the file stems, made unique."""

    def __init__(self, paths: list[str], num_classes: int, class_names):
        self.paths = [str(p) for p in paths]
        self.num_classes, self.class_names, self.has_masks = num_classes, tuple(class_names), False
        self.names, seen = [], set()
        for p in self.paths:
            name = Path(p).stem
            while name in seen:  # two inputs of the same name from different folders
                name += "_"
            seen.add(name)
            self.names.append(name)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Sample:
        return Sample(self.names[i], read_image(Path(self.paths[i])), None, None)


@dataclass
class EvalJob:
    """What to score and what to write: everything a worker needs (it loads the model itself)."""
    cfg: Config
    checkpoint: str
    split: str | None                   # a split of the config's dataset, or None with `files`
    metrics: tuple[str, ...]
    settings: InferenceSettings
    out_dir: str
    name: str = "eval"                  # shards live in out_dir/shards/<name>
    files: list[str] | None = None      # image files (`toco predict`)
    class_names: tuple[str, ...] = ()   # with `files`
    limit: int = 0                      # only the first N images
    save_pred: bool = False             # a palette PNG per image under out_dir/pred (predict: also an overlay)
    save_probs: bool = False            # uint8 class probabilities per image, compressed, under out_dir/probs
    keep: int = 6                       # images kept for the picture grid
    shard_size: int = 32

    def source(self):
        if self.files is not None:
            return ImageFiles(self.files, self.cfg.data.num_classes, self.class_names)
        return build_source(self.cfg.data, self.split)

    def fingerprint(self) -> dict:
        """Identity of the work: a resumed evaluation must be the same one."""
        ckpt = Path(self.checkpoint)
        stat = ckpt.stat()
        files = hashlib.sha1("\n".join(self.files).encode()).hexdigest() if self.files is not None else None
        return dict(checkpoint=str(ckpt.resolve()), checkpoint_size=stat.st_size, checkpoint_mtime=stat.st_mtime_ns,
                    split=self.split, files=files, metrics=list(self.metrics),
                    settings=dataclasses.asdict(self.settings), limit=self.limit, shard_size=self.shard_size,
                    num_classes=self.cfg.data.num_classes, save_pred=self.save_pred, save_probs=self.save_probs)


@dataclass
class ShardResult:
    """One shard's scores and what came with them; saved as one .npz file in the output folder."""
    start: int
    stop: int
    scores: Scores
    samples: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)     # unreadable files (predict skips them)
    shares: dict = field(default_factory=dict)           # predict: image name -> {class: share of pixels}
    probs_bytes: int = 0                                  # bytes written by --save-probs
    peak_rss_mib: float = 0.0                             # the worker's peak resident memory so far
    error: str | None = None                              # a corrupt image stops an evaluation

    def to_bytes(self) -> bytes:
        arrays = {f"scores/{k}": v for k, v in self.scores.to_arrays().items()}
        for i, s in enumerate(self.samples):
            arrays.update({f"sample/{i}/{k}": np.asarray(v) for k, v in s.items() if v is not None})
        meta = dict(start=self.start, stop=self.stop, samples=len(self.samples), skipped=self.skipped,
                    shares=self.shares, probs_bytes=self.probs_bytes, peak_rss_mib=self.peak_rss_mib,
                    error=self.error)
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShardResult":
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            scores = Scores.from_arrays({k.removeprefix("scores/"): f[k] for k in f.files if k.startswith("scores/")})
            samples = [{k.split("/", 2)[2]: f[k] for k in f.files if k.startswith(f"sample/{i}/")}
                       for i in range(meta.pop("samples"))]
        return cls(scores=scores, samples=samples, **meta)


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class ShardScorer:
    """A worker of an evaluation: loads the model once, then scores shards (image index ranges)."""

    def __init__(self, job: EvalJob, device: torch.device | str | None = None, threads: int | None = None):
        from toco.engine.checkpoint import load_trained_model
        from toco.engine.loop import resolve_device

        self.job = job
        if threads or job.cfg.train.threads:
            torch.set_num_threads(threads or job.cfg.train.threads)
        self.device = torch.device(device) if device is not None else resolve_device(job.cfg.train.device)
        self.model = load_trained_model(job.cfg, job.checkpoint, self.device)
        self.source = job.source()
        self.scorer = ImageScorer(self.model, job.cfg, job.metrics, job.settings, self.device,
                                  predict=job.save_pred or job.files is not None, keep_probs=job.save_probs)
        self.out = Path(job.out_dir)
        # predictions of a split go to out/pred; of image files (predict) to out itself, with their overlays
        self.pred_dir = self.out if job.files is not None else self.out / "pred"
        for folder, wanted in ((self.pred_dir, job.save_pred), (self.out / "probs", job.save_probs)):
            if wanted:
                folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, start: int, stop: int) -> ShardResult:
        result = ShardResult(start, stop, Scores(self.source.num_classes, self.job.metrics))
        writer = PredictionWriter(self.pred_dir if self.job.save_pred else None,
                                  self.out / "probs" if self.job.save_probs else None,
                                  overlays=self.job.files is not None, class_names=self.source.class_names)
        try:
            result.samples, result.skipped = score_images(
                self.scorer, self.source, range(start, stop), result.scores, self.job.keep if start == 0 else 0,
                on_image=writer, skip_unreadable=self.job.files is not None)
        except DatasetError as err:
            result.error = str(err)
        result.shares, result.probs_bytes = writer.shares, writer.probs_bytes
        result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result


class PredictionWriter:
    """What an evaluation keeps of each image, when asked: a palette PNG of the prediction (with an overlay for
    image files), the class probabilities (uint8, compressed), and each prediction's class shares."""

    def __init__(self, pred_dir: Path | None, probs_dir: Path | None, overlays: bool, class_names):
        self.pred_dir, self.probs_dir, self.overlays, self.class_names = pred_dir, probs_dir, overlays, class_names
        self.shares: dict[str, dict[str, float]] = {}
        self.probs_bytes = 0

    def __call__(self, sample: Sample, shown: dict) -> None:
        pred = shown.get("pred")
        if self.pred_dir is not None:
            viz.save_label_png(pred, self.pred_dir / f"{sample.name}.png")
            if self.overlays:
                Image.fromarray(viz.overlay(sample.image, pred)).save(self.pred_dir / f"{sample.name}_overlay.png")
                ids, counts = np.unique(pred, return_counts=True)
                self.shares[sample.name] = {self.class_names[i]: round(float(c) / pred.size, 4)
                                            for i, c in zip(ids.tolist(), counts.tolist())}
        if self.probs_dir is not None:
            path = self.probs_dir / f"{sample.name}.npz"
            quantised = (shown["probs"].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (C,H,W)
            np.savez_compressed(path, probs=quantised)
            self.probs_bytes += path.stat().st_size


@dataclass
class EvalOutcome:
    scores: Scores
    samples: list[dict]
    seconds: float                     # this session's wall time (a resumed run counts only its own part)
    images_scored_now: int
    skipped: list[str]
    shares: dict
    probs_bytes: int
    worker_peak_rss_mib: float
    class_names: tuple[str, ...]
    subset: str | None                 # why these numbers are not the whole split's, or None
    steady_images_per_s: float | None = None  # from the first shard's arrival on: without start-up costs

    @property
    def images_per_s(self) -> float:
        return self.images_scored_now / max(self.seconds, 1e-9)


class ResumeError(UserError):
    """--resume of an output folder that holds another evaluation (or none)."""


def _shard_folder(job: EvalJob, resume: bool) -> Path:
    folder = Path(job.out_dir) / "shards" / job.name
    identity = folder / "job.json"
    if resume and not folder.parent.is_dir():
        raise ResumeError(f"--resume: {job.out_dir} holds no earlier evaluation to continue")
    if resume and identity.is_file():  # (a pass the interrupted run never reached starts now)
        if json.loads(identity.read_text()) != json.loads(json.dumps(job.fingerprint())):
            raise ResumeError(f"--resume: {folder} holds a different evaluation (another checkpoint, split or "
                              f"setting); run without --resume to start over")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    identity.write_text(json.dumps(job.fingerprint(), indent=1))
    return folder


def _save_atomically(data: bytes, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def subset_note(cfg: Config, split: str | None, n: int, total: int) -> str | None:
    """Why an evaluation's numbers are not those of the whole split: a limit, or a split that is a part of
    another (COCO's val_part, which the original validates on during training)."""
    if split is None:
        return None
    if n < total:
        return f"the first {n} of the {total} images of {split}"
    if split.endswith("_part"):
        full = split.removesuffix("_part")
        try:
            full_n = len(build_source(cfg.data, full))
        except DatasetError:
            return f"{split}: a part of {full}"
        return f"{split}: {n} of the {full_n} images of {full}"
    return None


def run_evaluation(job: EvalJob, workers: int = 1, gpus_per_worker: float = 0.0, address: str | None = None,
                   resume: bool = False, desc: str = "eval", use_ray: bool | None = None) -> EvalOutcome:
    """Score the job's images in shards of `job.shard_size`, in this process (workers == 1, Ray never imported)
    or on `workers` Ray Data actors (`use_ray` forces either); record each finished shard in
    out_dir/shards/<name>/ as it arrives, so a killed evaluation continues with `resume=True` and ends with the
    numbers of an uninterrupted one.
    A corrupt image stops it with a DatasetError naming the file; the shards done are kept."""
    source = job.source()  # a missing dataset fails here, before any worker starts
    total = len(source)
    n = min(total, job.limit) if job.limit else total
    folder = _shard_folder(job, resume)
    done = {}
    for path in sorted(folder.glob("*.npz")):
        result = ShardResult.from_bytes(path.read_bytes())
        done[result.start] = result
    todo = [r for r in shard_ranges(n, job.shard_size) if r[0] not in done]
    exit_after = int(os.environ.get("TOCO_TEST_EXIT_AFTER_SHARDS", "0"))  # test aid: a kill between two shards
    start = time.perf_counter()
    scored_now = 0
    already = sum(r.stop - r.start for r in done.values())
    with tqdm(total=n, initial=already, desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0) as progress:
        if not todo:
            results = iter(())
        elif use_ray if use_ray is not None else workers > 1:
            from toco.distributed.evaluate import score_shards_on_ray

            results = score_shards_on_ray(job, todo, workers, gpus_per_worker, address)
        else:
            worker = ShardScorer(job)
            results = (worker(a, b) for a, b in todo)
        first = None  # (time, images scored) when the first shard arrived: the steady rate starts there
        for result in results:
            if result.error:
                raise DatasetError(result.error)
            if first is None:
                first = (time.perf_counter(), result.stop - result.start)
            _save_atomically(result.to_bytes(), folder / f"{result.start:09d}.npz")
            done[result.start] = result
            scored_now += result.stop - result.start
            progress.update(result.stop - result.start)
            if exit_after and scored_now >= exit_after * job.shard_size:
                os._exit(1)
    end = time.perf_counter()
    seconds = end - start
    steady = (scored_now - first[1]) / max(end - first[0], 1e-9) if first and scored_now > first[1] else None
    scores = Scores(source.num_classes, job.metrics)
    skipped, shares, probs_bytes, peak = [], {}, 0, 0.0
    for s in sorted(done):
        result = done[s]
        scores.add(result.scores)
        skipped += result.skipped
        shares.update(result.shares)
        probs_bytes += result.probs_bytes
        peak = max(peak, result.peak_rss_mib)
    samples = done[0].samples if 0 in done else []
    return EvalOutcome(scores, samples, seconds, scored_now, skipped, shares, probs_bytes, peak,
                       tuple(source.class_names), subset_note(job.cfg, job.split, n, total), steady)


# ----------------------------------------------------------------------------------------------------
# results on disk
def write_results(folder: str | Path, scores: Scores, samples: list[dict], class_names, info: dict) -> dict:
    """The result folder of any evaluation: summary.json (info, metrics, per-class IoU), per_class_iou.txt,
    confusion_<metric>.png per label metric, samples.png (the first images). Returns the summary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    class_names = list(class_names)
    summary = dict(info, images=scores.images, metrics=scores.summary(), per_class_iou=scores.per_class_iou(class_names))
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    tables = [f"[{m}]\n{cm.table(class_names)}" for m, cm in scores.confusion.items() if cm.matrix.sum()]
    (folder / "per_class_iou.txt").write_text("\n\n".join(tables) + "\n")
    for m, cm in scores.confusion.items():
        if cm.matrix.sum():
            viz.confusion_plot(cm.matrix, class_names, folder / f"confusion_{m}.png")
    if samples:
        picture_grid(samples, folder / "samples.png")
    return summary


def picture_grid(samples: list[dict], path: Path) -> None:
    """One row per image: image | CAM | CAM label | prediction | ground truth (the columns that exist)."""
    columns = [("image", "image", lambda v: v), ("cam", "CAM", viz.heatmap), ("cam_label", "pseudo label", viz.colorize),
               ("pred", "prediction", viz.colorize), ("gt", "ground truth", viz.colorize)]
    present = [c for c in columns if all(s.get(c[0]) is not None for s in samples)]
    rows = [[show(np.asarray(s[key])) for key, _, show in present] for s in samples]
    viz.picture_grid(rows, [title for _, title, _ in present], path)
