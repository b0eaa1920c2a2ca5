"""What an evaluation leaves on disk: a result folder named the same everywhere (`write_results`: summary.json,
per-class IoU, confusion plots, a picture grid) and, per image when asked, predictions and class probabilities
(`PredictionWriter`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toco import viz
from toco.data import Sample
from toco.evaluation.evaluators import Scores


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
        picture_grid(samples, folder / "samples.png", class_names)
    return summary


def picture_grid(samples: list[dict], path: Path, class_names) -> None:
    """One row per image: image | CAM | CAM label | prediction | ground truth (the columns that exist), with the
    colours of the classes the label panels show."""
    columns = [("image", "image", lambda v: v), ("cam", "CAM", viz.heatmap), ("cam_label", "pseudo label", viz.colorize),
               ("pred", "prediction", viz.colorize), ("gt", "ground truth", viz.colorize)]
    present = [c for c in columns if all(s.get(c[0]) is not None for s in samples)]
    rows = [[show(np.asarray(s[key])) for key, _, show in present] for s in samples]
    labels = [np.asarray(s[key]) for s in samples for key, _, show in present if show is viz.colorize]
    viz.picture_grid(rows, [title for _, title, _ in present], path, viz.class_legend(labels, class_names))
