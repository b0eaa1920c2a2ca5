"""Accuracy is a benchmark too: mIoU on the synthetic val split of the checkpoint the session trains
deterministically (conftest.trained_checkpoint), checked against benchmarks/baselines/accuracy.json: one file for
every machine, since mIoU does not depend on a machine's speed (CPU models round floats differently, which
can move it a little: the tolerance allows for that).

`TOCO_BENCH_WRITE_BASELINE=1` (make bench-baseline) writes that file instead of checking it.
"""
import json
import os

import pytest

from support import BASELINES
from toco.data import build_source
from toco.inference import MS_SCALES, InferenceSettings, evaluate_pseudo_labels, evaluate_split, load_trained_model

# absolute mIoU. The recipe repeats exactly on one machine; this is the margin left for changes that only reshuffle
# random numbers (chosen, not measured: one seed has been run)
TOLERANCE = 0.03
CHECKED = ("miou", "miou_cam")  # segmentation (200 iterations of it) and the CAMs, the stronger signal here


@pytest.fixture(scope="session")
def accuracy(trained_checkpoint) -> dict:
    cfg = trained_checkpoint.cfg
    model = load_trained_model(cfg, trained_checkpoint.path, "cpu")
    source = build_source(cfg.data, cfg.data.val_split)
    ms = InferenceSettings(scales=MS_SCALES, flip=True)
    pseudo = evaluate_pseudo_labels(model, source, cfg, "cpu")
    return dict(miou=evaluate_split(model, source, InferenceSettings(), "cpu").metrics()["miou"],
                miou_ms_flip=evaluate_split(model, source, ms, "cpu").metrics()["miou"],
                miou_cam=pseudo["pseudo/miou_cam"], miou_aux_cam=pseudo["pseudo/miou_aux_cam"],
                train_s=trained_checkpoint.train_seconds, iterations=trained_checkpoint.iterations,
                val_images=len(source))


def test_accuracy_synthetic_val(benchmark, trained_checkpoint, accuracy):
    """Times one single-scale evaluation of the val split; the mIoUs go to extra_info (and MLflow)."""
    cfg = trained_checkpoint.cfg
    model = load_trained_model(cfg, trained_checkpoint.path, "cpu")
    source = build_source(cfg.data, cfg.data.val_split)
    benchmark.group = "accuracy"
    benchmark.pedantic(evaluate_split, args=(model, source, InferenceSettings(), "cpu"), rounds=1, iterations=1)
    benchmark.extra_info.update(accuracy, backend="accuracy_recipe", device="cpu",
                                shape=f"{len(source)}x3x{cfg.data.synth_size}x{cfg.data.synth_size}")


def test_miou_not_below_baseline(accuracy):
    path = BASELINES / "accuracy.json"
    if os.environ.get("TOCO_BENCH_WRITE_BASELINE") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict({k: round(accuracy[k], 4) for k in CHECKED}, tolerance=TOLERANCE),
                                   indent=1) + "\n")
        pytest.skip(f"wrote {path}")
    if not path.is_file():
        pytest.skip(f"no accuracy baseline ({path}): make bench-baseline")
    baseline = json.loads(path.read_text())
    for key in CHECKED:
        floor = baseline[key] - baseline["tolerance"]
        assert accuracy[key] >= floor, (f"{key} {accuracy[key]:.4f} fell below the baseline {baseline[key]:.4f} "
                                        f"- tolerance {baseline['tolerance']} ({path})")
