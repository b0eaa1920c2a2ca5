"""What an evaluation measures, one small evaluator per metric (detectron2's process / merge / summarise).

Each evaluator reads what it needs from an `ImageView` (toco.evaluation.scoring: the image, its ground truth and,
computed once on first use, the prediction, the CAMs, the PAR labels) and keeps integer counts only, so the
scores of shards or workers add up to exactly the scores of the whole split. `Scores` holds the evaluators of one
evaluation: `METRICS` names them (docs/evaluation.md):

    seg          the segmentation, with the test-time settings
    cam, aux_cam CAM -> label at pseudo.bkg_thre, from the multi-scale CAM of the image resized to data.val_size
    cam_par, aux_cam_par  the same after PAR (background plane at bkg_thre)
    seg_target   the segmentation target a training step would make, scored on the pixels it labels
    cls          classification F1 of (logits > 0) against the image-level labels
"""
from __future__ import annotations

import numpy as np

from toco.metrics import ConfusionMatrix, f1_from_counts


class Evaluator:
    """One metric over a set of images: `process` each labelled image, `merge` another part's counts,
    `summary` as floats; `state` / `load` as integer arrays (a shard's file)."""
    name: str

    def process(self, view) -> None:
        raise NotImplementedError

    def merge(self, other: "Evaluator") -> None:
        for key, value in other.state().items():
            self.state()[key] += value

    def summary(self) -> dict[str, float]:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def load(self, state: dict[str, np.ndarray]) -> None:
        for key, value in self.state().items():
            value[:] = state[key]


class LabelIoU(Evaluator):
    """The confusion matrix of a label map against the ground truth (255 ignored); summary miou_<name>."""

    def __init__(self, name: str, num_classes: int):
        self.name, self.confusion = name, ConfusionMatrix(num_classes)

    def labels(self, view):
        """(predicted label map, ground truth) of one image."""
        raise NotImplementedError

    def process(self, view) -> None:
        self.confusion.update(*self.labels(view))

    def summary(self) -> dict[str, float]:
        return {f"miou_{self.name}": self.confusion.miou()}

    def state(self) -> dict[str, np.ndarray]:
        return {"confusion": self.confusion.matrix}


class SegmentationIoU(LabelIoU):
    def labels(self, view):
        return view.prediction.labels, view.sample.mask

    def summary(self) -> dict[str, float]:
        return dict(super().summary(), pixel_acc_seg=self.confusion.pixel_accuracy())


class CamIoU(LabelIoU):
    """`cam` / `aux_cam`: the CAM's label; with `_par` in the name, its PAR-refined label."""

    def labels(self, view):
        key = self.name.removesuffix("_par")
        return (view.par_label(key) if self.name.endswith("_par") else view.cam_label(key)), view.gt


class SegTargetIoU(LabelIoU):
    """The training step's segmentation target, scored on the pixels it labels; also how many it labels."""

    def __init__(self, name: str, num_classes: int):
        super().__init__(name, num_classes)
        self.coverage = np.zeros(2, np.int64)  # labelled ground-truth pixels, all ground-truth pixels

    def process(self, view) -> None:
        target, gt = view.seg_target, view.gt
        valid = gt != 255
        self.coverage += [int((valid & (target != 255)).sum()), int(valid.sum())]
        self.confusion.update(target, gt.masked_fill(target == 255, 255))  # its 255s excluded

    def summary(self) -> dict[str, float]:
        return dict(super().summary(), seg_target_coverage=float(self.coverage[0] / max(self.coverage[1], 1)))

    def state(self) -> dict[str, np.ndarray]:
        return dict(super().state(), coverage=self.coverage)


class ClassificationF1(Evaluator):
    """Micro F1 of (logits > 0) against the image-level labels, from true/false positive and false negative
    counts over images x classes."""

    def __init__(self, name: str, num_classes: int):
        self.name, self.counts = name, np.zeros(3, np.int64)

    def process(self, view) -> None:
        predicted, truth = (view.cls_logits > 0).cpu().numpy(), view.sample.cls_label > 0.5
        self.counts += [(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()]

    def summary(self) -> dict[str, float]:
        return {"cls_f1": f1_from_counts(*self.counts)}

    def state(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}


EVALUATORS = {"seg": SegmentationIoU, "cam": CamIoU, "aux_cam": CamIoU, "cam_par": CamIoU, "aux_cam_par": CamIoU,
              "seg_target": SegTargetIoU, "cls": ClassificationF1}
METRICS = tuple(EVALUATORS)
VALIDATION = ("seg", "cam", "aux_cam", "cls")                                 # in-training validation
PSEUDO_LABELS = ("cam", "aux_cam", "cam_par", "aux_cam_par", "seg_target")   # `toco eval --pseudo`


class Scores:
    """The evaluators of one evaluation and how many images they saw."""

    def __init__(self, num_classes: int, metrics: tuple[str, ...]):
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {METRICS}")
        self.num_classes, self.metrics, self.images = num_classes, tuple(metrics), 0
        self.evaluators = {m: EVALUATORS[m](m, num_classes) for m in self.metrics}

    @property
    def confusion(self) -> dict[str, ConfusionMatrix]:
        """The confusion matrix of every label metric."""
        return {m: e.confusion for m, e in self.evaluators.items() if isinstance(e, LabelIoU)}

    def process(self, view) -> None:
        if view.sample.mask is not None:  # images without masks (a test split) are predicted, not scored
            for evaluator in self.evaluators.values():
                evaluator.process(view)
        self.images += 1

    def add(self, other: "Scores") -> "Scores":
        for m, evaluator in self.evaluators.items():
            evaluator.merge(other.evaluators[m])
        self.images += other.images
        return self

    def summary(self) -> dict[str, float]:
        return {k: v for e in self.evaluators.values() for k, v in e.summary().items()}

    def per_class_iou(self, class_names) -> dict[str, dict[str, float | None]]:
        return {m: {n: (None if np.isnan(v) else round(float(v), 6)) for n, v in zip(class_names, cm.iou())}
                for m, cm in self.confusion.items()}

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"{m}/{k}": v for m, e in self.evaluators.items() for k, v in e.state().items()}
        return dict(arrays, images=np.array(self.images), num_classes=np.array(self.num_classes),
                    metrics=np.array(list(self.metrics)))

    @classmethod
    def from_arrays(cls, arrays) -> "Scores":
        scores = cls(int(arrays["num_classes"]), tuple(str(m) for m in arrays["metrics"]))
        for m, evaluator in scores.evaluators.items():
            evaluator.load({k: arrays[f"{m}/{k}"] for k in evaluator.state()})
        scores.images = int(arrays["images"])
        return scores
