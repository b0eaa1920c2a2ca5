"""Evaluation metrics: confusion matrix / per-class IoU / mIoU (docs/method.md §5.4; F1: §5.1) and multilabel F1."""
from __future__ import annotations

import numpy as np


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulated (C,C) int64 confusion matrix, rows = ground truth, columns = prediction.

    Pixels whose ground truth is ignore_index (or outside [0, C)) are excluded, as in the original `scores`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, gt) -> "ConfusionMatrix":
        """Add one batch; pred and gt are integer arrays (numpy or torch) of the same shape."""
        pred, gt = _to_numpy(pred).astype(np.int64).ravel(), _to_numpy(gt).astype(np.int64).ravel()
        if pred.shape != gt.shape:
            raise ValueError(f"pred and gt sizes differ: {pred.size} vs {gt.size}")
        c = self.num_classes
        keep = (gt != self.ignore_index) & (gt >= 0) & (gt < c)
        pred, gt = pred[keep], gt[keep]
        if pred.size and (pred.min() < 0 or pred.max() >= c):
            raise ValueError(f"predictions must lie in [0, {c}) on labelled pixels")
        self.matrix += np.bincount(gt * c + pred, minlength=c * c).reshape(c, c)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (e.g. from another worker) into this one."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices of different sizes")
        self.matrix += other.matrix
        return self

    def reset(self) -> None:
        self.matrix[:] = 0

    def iou(self) -> np.ndarray:
        """(C,) IoU = TP / (TP + FP + FN); NaN for a class absent from both ground truth and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def miou(self) -> float:
        """Plain mean of the C per-class IoUs (docs/method.md §5.4). A class with neither ground truth nor prediction
        has IoU NaN and is skipped (nanmean); over a full split every class is present, so this is the plain
        mean. NaN if no pixel was counted at all."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def table(self, class_names=None) -> str:
        """Per-class IoU table (percent) followed by the mIoU."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        width = max(len("mIoU"), *(len(n) for n in names))
        lines = [f"{'class':<{width}}  IoU(%)"]
        for name, v in zip(names, self.iou()):
            lines.append(f"{name:<{width}}  {'nan' if np.isnan(v) else f'{100 * v:6.2f}':>6}")
        miou = self.miou()
        lines.append(f"{'mIoU':<{width}}  {'nan' if np.isnan(miou) else f'{100 * miou:6.2f}':>6}")
        return "\n".join(lines)


def f1_from_counts(tp, fp, fn) -> float:
    """2TP / (2TP + FP + FN); 0 when there is nothing to count, like sklearn's zero_division default."""
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def multilabel_f1(pred, target, average: str = "micro") -> float:
    """F1 of multilabel predictions pred (N,C-1) bool/0-1 (e.g. logits > 0) against target (N,C-1).

    average="micro" (default): 2TP / (2TP + FP + FN) pooled over all images and classes.
    average="samples": binary F1 per image, then the mean over images; this is what the original's in-training
    validation reports (sklearn f1_score per batch-1 image, averaged). An image (micro: a whole set) with no
    true and no predicted label scores 0, like sklearn's zero_division default.
    """
    p = _to_numpy(pred).astype(bool).reshape(-1, np.shape(pred)[-1])
    t = _to_numpy(target).astype(bool).reshape(p.shape)
    tp, fp, fn = (p & t).sum(-1), (p & ~t).sum(-1), (~p & t).sum(-1)
    if average == "micro":
        return f1_from_counts(tp.sum(), fp.sum(), fn.sum())
    if average == "samples":
        denom = 2 * tp + fp + fn
        return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))
    raise ValueError(f"average must be 'micro' or 'samples', got {average!r}")
