"""Inference and evaluation (toco/inference.py, `toco eval`, `toco predict`)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from toco.config import save_config
from toco.data import voc_source
from toco.data.transforms import normalize
from toco.engine.checkpoint import save_checkpoint
from toco.inference import (CheckpointError, InferenceSettings, crf_refine, evaluate_pseudo_labels, evaluate_split,
                            load_trained_model, segment, write_split_summary)


class PixelModel(nn.Module):
    """Seg logits = a 1x1 conv of the input, average-pooled over `patch` x `patch` cells (a stride like a ViT's).
    Mirror-symmetric: f(flip x) = flip f(x) whenever the width is a multiple of `patch`."""

    def __init__(self, num_classes: int, patch: int = 4, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.patch_size = patch
        self.conv = nn.Conv2d(3, num_classes, 1)
        if weight is not None:
            with torch.no_grad():
                self.conv.weight.copy_(weight[:, :, None, None])
                self.conv.bias.copy_(bias)

    def forward(self, x):
        return SimpleNamespace(seg_logits=F.avg_pool2d(self.conv(x), self.patch_size))


def red_is_class_one(num_classes: int = 21) -> PixelModel:
    """Predicts class 1 where the pixel is red, background elsewhere (every other class far below)."""
    weight, bias = torch.zeros(num_classes, 3), torch.full((num_classes,), -100.0)
    weight[1, 0] = 10.0      # normalised red: 255 -> +2.2, 0 -> -2.1; times 10 against background's 0
    bias[:2] = 0.0           # classes 2.. never win
    return PixelModel(num_classes, patch=1, weight=weight, bias=bias)


def _voc_fixture(root, images: dict[str, tuple[np.ndarray, np.ndarray]]):
    """VOC 2012 layout: JPEGImages (PNG files, lossless), SegmentationClassAug palette masks, a val list."""
    from toco.data import save_mask_png

    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (image, mask) in images.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.png")
        save_mask_png(mask, root / "SegmentationClassAug" / f"{name}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{n}\n" for n in images))
    return voc_source(root, "val")


def test_eval_on_a_voc_layout_fixture_gives_the_hand_computed_miou(tmp_path):
    # image a: columns 0-3 red -> predicted class 1; truth: class 1 on columns 0-5, row 7 ignored
    image_a = np.zeros((8, 8, 3), np.uint8)
    image_a[:, :4, 0] = 255
    mask_a = np.zeros((8, 8), np.uint8)
    mask_a[:, :6] = 1
    mask_a[7] = 255
    # image b: all black -> all background; truth: a 4x4 person (class 15)
    image_b = np.zeros((8, 8, 3), np.uint8)
    mask_b = np.zeros((8, 8), np.uint8)
    mask_b[:4, :4] = 15
    source = _voc_fixture(tmp_path / "VOC2012", {"a": (image_a, mask_a), "b": (image_b, mask_b)})

    result = evaluate_split(red_is_class_one(), source, InferenceSettings(), "cpu", out_dir=tmp_path / "pred")

    # background: TP 14 + 48, FP 14 (a, cols 4-5) + 16 (b, person), FN 0; class 1: TP 28, FN 14; person: 0
    iou = result.confusion.iou()
    assert iou[0] == pytest.approx(62 / 92) and iou[1] == pytest.approx(2 / 3) and iou[15] == 0
    assert np.isnan(iou[[2, 3, 20]]).all()  # classes never seen or predicted are left out of the mean
    assert result.metrics()["miou"] == pytest.approx((62 / 92 + 2 / 3 + 0) / 3)
    saved = Image.open(tmp_path / "pred" / "a.png")
    assert saved.mode == "P" and saved.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
    assert (np.array(saved)[:, :4] == 1).all() and (np.array(saved)[:, 4:] == 0).all()

    # the test split has no masks: predictions are written, nothing is scored
    (tmp_path / "VOC2012/ImageSets/Segmentation/test.txt").write_text("a\n")
    unscored = evaluate_split(red_is_class_one(), voc_source(tmp_path / "VOC2012", "test"), InferenceSettings(),
                              "cpu", out_dir=tmp_path / "test_pred")
    assert unscored.metrics()["miou"] is None and (tmp_path / "test_pred" / "a.png").is_file()

    summary = write_split_summary(result, tmp_path / "out", dict(split="val"))
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["metrics"]["miou"] == pytest.approx(summary["metrics"]["miou"])
    assert on_disk["per_class_iou"]["aeroplane"] == pytest.approx(2 / 3, abs=1e-6)
    assert on_disk["per_class_iou"]["bicycle"] is None
    assert "mIoU" in (tmp_path / "out" / "per_class_iou.txt").read_text()


def _block_image() -> torch.Tensor:
    """(1,3,64,64) normalised image of four constant 32x32 blocks."""
    colours = [(250, 20, 20), (20, 240, 30), (30, 30, 220), (200, 200, 40)]
    image = np.zeros((64, 64, 3), np.uint8)
    for k, (y, x) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32)]):
        image[y:y + 32, x:x + 32] = colours[k]
    return normalize(image)[None]


def test_flip_fusion_of_a_mirror_symmetric_model_equals_single_scale():
    torch.manual_seed(0)
    model, image = PixelModel(5, patch=4), _block_image()
    single = segment(model, image)
    assert single.shape == (1, 5, 64, 64)
    # scale 1 + flip: VOC sums the two (identical) logits, COCO takes their max
    torch.testing.assert_close(segment(model, image, flip=True, fusion="voc"), 2 * single)
    torch.testing.assert_close(segment(model, image, flip=True, fusion="coco"), single)
    # all three scales + flip: inside the blocks every scale sees the same constant colour, so VOC's max over
    # scales is 2x single-scale and COCO's sum 3x; within ~2 cells of a block edge resampling blends colours
    interior = torch.zeros(64, 64, dtype=torch.bool)
    for y in (0, 32):
        for x in (0, 32):
            interior[y + 8:y + 24, x + 8:x + 24] = True
    voc = segment(model, image, scales=(1.0, 1.25, 1.5), flip=True, fusion="voc")
    coco = segment(model, image, scales=(1.0, 1.25, 1.5), flip=True, fusion="coco")
    torch.testing.assert_close(voc[..., interior], 2 * single[..., interior])
    torch.testing.assert_close(coco[..., interior], 3 * single[..., interior])
    assert torch.equal(voc.argmax(1)[:, interior], single.argmax(1)[:, interior])


def test_fusion_rules_on_an_asymmetric_model():
    """VOC: max over scales of (logits + un-flipped logits of the flip); COCO: sum over scales of their max."""
    torch.manual_seed(0)
    model, image = PixelModel(3, patch=4), torch.randn(1, 3, 32, 32)
    ramp = torch.linspace(-2, 2, 8)  # a left-right ramp makes the model see flipped inputs differently

    def biased(x):
        out = model(x).seg_logits
        return SimpleNamespace(seg_logits=out + F.interpolate(ramp.view(1, 1, 1, 8), size=out.shape[-2:]))

    biased.patch_size = 4

    def up(x):
        return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)

    per_scale = []
    for s in (1.0, 1.5):
        x = image if s == 1.0 else F.interpolate(image, size=(48, 48), mode="bilinear", align_corners=False)
        per_scale.append((up(biased(x).seg_logits), up(biased(x.flip(-1)).seg_logits).flip(-1)))
    voc = torch.maximum(*(a + b for a, b in per_scale))
    coco = sum(torch.maximum(a, b) for a, b in per_scale)
    torch.testing.assert_close(segment(biased, image, (1.0, 1.5), flip=True, fusion="voc"), voc)
    torch.testing.assert_close(segment(biased, image, (1.0, 1.5), flip=True, fusion="coco"), coco)
    with pytest.raises(ValueError, match="fusion"):
        segment(biased, image, fusion="ade")


def test_segment_takes_any_image_size(tiny_model):
    tiny_model.eval()
    for h, w in ((37, 53), (5, 3), (32, 32)):
        out = segment(tiny_model, torch.randn(1, 3, h, w), scales=(1.0, 1.25), flip=True)
        assert out.shape == (1, 5, h, w) and torch.isfinite(out).all()
    assert segment(tiny_model, torch.randn(1, 3, 32, 32), out_size=(50, 40)).shape == (1, 5, 50, 40)


def test_crf_cleans_noisy_probabilities_along_image_edges():
    rng = np.random.default_rng(0)
    image = np.zeros((24, 24, 3), np.uint8)
    image[:, 12:] = 255
    p_left = np.where(np.arange(24)[None, :] < 12, 0.7, 0.3) + rng.uniform(-0.25, 0.25, (24, 24))
    probs = np.stack([p_left, 1 - p_left]).astype(np.float32)
    noisy = probs.argmax(0)
    clean = crf_refine(image, probs)
    truth = np.broadcast_to(np.arange(24)[None, :] >= 12, (24, 24)).astype(np.int64)
    assert clean.shape == (24, 24) and clean.dtype == np.int64
    assert (noisy != truth).any() and (clean == truth).all()


def test_resized_single_scale_eval_matches_in_training_validation(tiny_cfg, tiny_model):
    """`toco eval --resize V` is the in-training protocol: same seg, CAM and aux-CAM mIoU as engine.evaluate."""
    from toco.data import build_source
    from toco.engine.evaluate import evaluate
    from toco.engine.loop import build_loaders

    _, val_loader, _ = build_loaders(tiny_cfg)
    reference = evaluate(tiny_model, val_loader, 5, tiny_cfg.pseudo, "cpu").metrics
    source = build_source(tiny_cfg.data, "val")
    ours = evaluate_split(tiny_model.eval(), source, InferenceSettings(resize=tiny_cfg.data.val_size), "cpu")
    assert ours.metrics()["miou"] == pytest.approx(reference["val/miou_seg"], abs=1e-9)
    pseudo = evaluate_pseudo_labels(tiny_model, source, tiny_cfg, "cpu")
    assert pseudo["pseudo/miou_cam"] == pytest.approx(reference["val/miou_cam"], abs=1e-9)
    assert pseudo["pseudo/miou_aux_cam"] == pytest.approx(reference["val/miou_aux_cam"], abs=1e-9)
    assert 0 < pseudo["pseudo/seg_target_coverage"] <= 1
    assert all(0 <= v <= 1 for v in pseudo.values())


@pytest.fixture
def checkpoint_dir(tmp_path, tiny_cfg, tiny_model):
    """What a training run leaves: last.pt, config.yaml and the MLflow run id."""
    folder = tmp_path / "run"
    tiny_cfg.tracking.tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tiny_cfg.tracking.artifact_root = str(tmp_path / "mlruns" / "artifacts")
    save_checkpoint(folder / "last.pt", dict(model=tiny_model.state_dict(), iteration=0))
    save_config(tiny_cfg, folder / "config.yaml")
    (folder / "mlflow_run_id").write_text("training-run-id\n")
    return folder


def test_a_checkpoint_of_another_model_is_a_clear_error(checkpoint_dir, tiny_cfg, capsys):
    from toco.cli import main

    tiny_cfg.data.num_classes = 7
    with pytest.raises(CheckpointError, match="number of classes"):
        load_trained_model(tiny_cfg, checkpoint_dir / "last.pt")
    tiny_cfg.data.num_classes = 5
    tiny_cfg.model.backbone_kwargs = dict(tiny_cfg.model.backbone_kwargs, depth=6)
    with pytest.raises(CheckpointError, match="backbone"):
        load_trained_model(tiny_cfg, checkpoint_dir / "last.pt")
    torch.save({"model": object()}, checkpoint_dir / "code.pt")  # needs unpickling of arbitrary objects
    with pytest.raises(CheckpointError, match="weights-only"):
        load_trained_model(tiny_cfg, checkpoint_dir / "code.pt")
    # on the command line: one readable line, no traceback
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "x.png", "--checkpoint", str(checkpoint_dir / "last.pt"), "--out", "o",
              "--set", "data.num_classes=7"])
    message = str(exit_info.value.code)
    assert message.startswith("checkpoint error") and "data.num_classes" in message and "Traceback" not in message


def test_predict_handles_odd_images_and_skips_a_corrupt_one(checkpoint_dir, tmp_path, capsys):
    from toco.cli import main

    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8), "L").save(inputs / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 31, 4), dtype=np.uint8), "RGBA").save(inputs / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(inputs / "large.jpg")
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    names = ["gray.png", "corrupt.jpg", "rgba.png", "large.jpg"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *(str(inputs / n) for n in names), "--checkpoint", str(checkpoint_dir / "last.pt"),
              "--out", str(out)])
    assert "corrupt.jpg" in str(exit_info.value.code)  # a non-zero exit that names the file
    assert "corrupt.jpg" in capsys.readouterr().err
    for stem, size in (("gray", (53, 37)), ("rgba", (31, 20)), ("large", (70, 90))):
        label, overlay = Image.open(out / f"{stem}.png"), Image.open(out / f"{stem}_overlay.png")
        assert label.mode == "P" and label.size == size and overlay.mode == "RGB" and overlay.size == size
        assert np.array(label).max() < 5
    assert not (out / "corrupt.png").exists()


def test_eval_cli_writes_predictions_summary_and_a_linked_mlflow_run(checkpoint_dir, tmp_path, tiny_cfg, capsys):
    import mlflow

    from toco.cli import main
    from toco.data.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "data", n_train=3, n_val=2, size=32, num_classes=5, seed=0)
    tiny_cfg.data.root = str(data)
    save_config(tiny_cfg, tmp_path / "eval.yaml")
    out = tmp_path / "eval_out"
    main(["eval", str(tmp_path / "eval.yaml"), "--checkpoint", str(checkpoint_dir / "last.pt"), "--ms", "--crf",
          "--pseudo", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "miou_cam_par" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_time"]["scales"] == [1.0, 1.25, 1.5] and summary["test_time"]["crf"] is True
    assert summary["pseudo_split"] == "train" and "pseudo/miou_aux_cam_par" in summary["pseudo"]
    assert sorted(p.name for p in (out / "pred").iterdir()) == ["synth_val_000000.png", "synth_val_000001.png"]
    assert Image.open(out / "pred" / "synth_val_000000.png").size == (32, 32)

    client = mlflow.MlflowClient(tiny_cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(tiny_cfg.tracking.experiment).experiment_id])
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["parent_training_run"] == "training-run-id"
    assert run.data.metrics["eval/miou"] == pytest.approx(summary["metrics"]["miou"])
    assert "pseudo/miou_cam" in run.data.metrics and run.data.params["crf"] == "True"
    assert {"summary.json", "per_class_iou.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
