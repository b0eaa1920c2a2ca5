import numpy as np
import pytest
import torch

from toco.metrics import ConfusionMatrix, multilabel_f1


def _iou_by_sets(preds, gts, num_classes, ignore=255):
    """Independent IoU: per class, sets of (image, pixel) positions."""
    ious = []
    for c in range(num_classes):
        gt_set, pred_set = set(), set()
        for n, (p, g) in enumerate(zip(preds, gts)):
            for i, (pv, gv) in enumerate(zip(p.ravel().tolist(), g.ravel().tolist())):
                if gv == ignore:
                    continue
                if gv == c:
                    gt_set.add((n, i))
                if pv == c:
                    pred_set.add((n, i))
        union = gt_set | pred_set
        ious.append(len(gt_set & pred_set) / len(union) if union else float("nan"))
    return np.array(ious)


def test_confusion_matrix_matches_set_computation():
    rng = np.random.default_rng(0)
    c = 5
    preds = [rng.integers(0, c - 1, size=(7, 9)) for _ in range(3)]  # class 4 never predicted
    gts = [rng.integers(0, c - 1, size=(7, 9)) for _ in range(3)]  # ... and never in gt -> NaN
    for g in gts:
        g[rng.random(g.shape) < 0.2] = 255
    cm = ConfusionMatrix(c)
    for p, g in zip(preds, gts):
        cm.update(torch.from_numpy(p), g)  # torch and numpy inputs
    expected = _iou_by_sets(preds, gts, c)
    np.testing.assert_allclose(cm.iou(), expected, equal_nan=True)
    assert np.isnan(cm.iou()[4])
    assert cm.miou() == pytest.approx(np.nanmean(expected))
    # matrix: rows gt, cols pred, ignored pixels excluded
    valid = sum(int((g != 255).sum()) for g in gts)
    assert cm.matrix.sum() == valid and cm.matrix.dtype == np.int64
    g0, p0 = gts[0].ravel(), preds[0].ravel()
    cm0 = ConfusionMatrix(c).update(p0, g0)
    k = (g0 == 1) & (p0 == 2)
    assert cm0.matrix[1, 2] == k.sum()


def test_hand_made_iou_and_merge():
    gt = np.array([0, 0, 1, 1, 255, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    cm = ConfusionMatrix(3).update(pred, gt)
    # class 0: TP 1, FP 1 (last pixel), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 0, FN 1 -> 0
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx(1 / 3)
    other = ConfusionMatrix(3).update(np.array([2]), np.array([2]))
    cm.merge(other)
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.5])
    text = cm.table(["background", "cat", "dog"])
    assert "background" in text and "mIoU" in text and "50.00" in text


def test_out_of_range_prediction_rejected():
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(np.array([3]), np.array([1]))


def _f1_loop(pred, target):
    tp = fp = fn = 0
    for prow, trow in zip(pred, target):
        for p, t in zip(prow, trow):
            tp += p and t
            fp += p and not t
            fn += t and not p
    return 2 * tp / (2 * tp + fp + fn)


def test_multilabel_f1():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-1.0, 1.0, -0.2, 0.1]])
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    pred = logits > 0
    # micro: TP 2, FP 2, FN 1 -> 4/7
    assert multilabel_f1(pred, target) == pytest.approx(4 / 7)
    assert multilabel_f1(pred, target) == pytest.approx(_f1_loop(pred.tolist(), target.bool().tolist()))
    # samples: image 0: TP1 FP1 FN1 -> 1/2; image 1: TP1 FP1 -> 2/3
    assert multilabel_f1(pred, target, average="samples") == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert multilabel_f1(target, target) == 1.0
