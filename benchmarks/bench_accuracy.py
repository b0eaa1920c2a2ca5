"""Accuracy is a benchmark too: mIoU on the synthetic val split of the checkpoint the session trains
deterministically (conftest.trained_checkpoint), checked against benchmarks/baselines/accuracy.json: one file for
every machine, since mIoU does not depend on a machine's speed (CPU models round floats differently, which
can move it a little: the tolerance, from the seed spread, allows for that).

`TOCO_BENCH_WRITE_BASELINE=1` (make bench-baseline) writes that file instead of checking it.
"""
import json
import os

import pytest

from compare import judge_accuracy
from support import BASELINES
from toco.data import build_source
from toco.checkpoint import load_trained_model
from toco.evaluation import MS_SCALES, PSEUDO_LABELS, InferenceSettings, evaluate_model

CHECKED = ("miou", "miou_cam")  # segmentation (200 iterations of it) and the CAMs, the stronger signal here
# the recipe's spread over training seeds (make bench-seed-spread): a change that only reshuffles random numbers
# moves an mIoU like a change of seed, so a drop fails only beyond what two seeds differ by (compare.judge_accuracy)
SEED_SPREAD = BASELINES / "accuracy_seed_spread.json"


def miou_seg(model, cfg, source, settings) -> float:
    """Segmentation mIoU over the whole split at the images' own size."""
    return evaluate_model(model, cfg, source, ("seg",), settings, keep=0)[0].summary()["miou_seg"]


@pytest.fixture(scope="session")
def accuracy(trained_checkpoint) -> dict:
    cfg = trained_checkpoint.cfg
    model = load_trained_model(cfg, trained_checkpoint.path, "cpu")
    source = build_source(cfg.data, cfg.data.val_split)
    ms = InferenceSettings(scales=MS_SCALES, flip=True)
    pseudo = evaluate_model(model, cfg, source, PSEUDO_LABELS, InferenceSettings())[0].summary()
    return dict(miou=miou_seg(model, cfg, source, InferenceSettings()),
                miou_ms_flip=miou_seg(model, cfg, source, ms),
                miou_cam=pseudo["miou_cam"], miou_aux_cam=pseudo["miou_aux_cam"],
                train_s=trained_checkpoint.train_seconds, iterations=trained_checkpoint.iterations,
                val_images=len(source))


def test_accuracy_synthetic_val(benchmark, trained_checkpoint, accuracy):
    """Times one single-scale evaluation of the val split; the mIoUs go to extra_info (and MLflow)."""
    cfg = trained_checkpoint.cfg
    model = load_trained_model(cfg, trained_checkpoint.path, "cpu")
    source = build_source(cfg.data, cfg.data.val_split)
    benchmark.group = "accuracy"
    benchmark.pedantic(miou_seg, args=(model, cfg, source, InferenceSettings()), rounds=1, iterations=1)
    benchmark.extra_info.update(accuracy, backend="accuracy_recipe", device="cpu",
                                shape=f"{len(source)}x3x{cfg.data.synth_size}x{cfg.data.synth_size}")


def test_miou_not_below_baseline(accuracy):
    path = BASELINES / "accuracy.json"
    if os.environ.get("TOCO_BENCH_WRITE_BASELINE") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: round(accuracy[k], 4) for k in CHECKED}, indent=1) + "\n")
        pytest.skip(f"wrote {path}")
    if not path.is_file():
        pytest.skip(f"no accuracy baseline ({path}): make bench-baseline")
    baseline, spread = json.loads(path.read_text()), json.loads(SEED_SPREAD.read_text())["std"]
    for key in CHECKED:
        row = judge_accuracy(key, [baseline[key]], [accuracy[key]], spread[key])
        assert not row.failed, (f"{key} {accuracy[key]:.4f} fell below the baseline {baseline[key]:.4f} by more than "
                                f"{row.tolerance:.4f}, three standard deviations of two seeds' difference ({path})")
