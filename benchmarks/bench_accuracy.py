"""Accuracy is a benchmark too: the accuracy recipe (support.ACCURACY) trained from seeds 0..GATE_SEEDS-1 in the
session (conftest.trained_checkpoints), each seed's mIoU compared with the same seed's stored in
benchmarks/baselines/accuracy_seed_spread.json (`make bench-seed-spread`): one file for every machine, since mIoU
does not depend on a machine's speed. Paired by seed, the comparison's noise is only how far one seed's training
moves when its float rounding changes (a CPU model, a change of the code): the file's paired_std.

The gate fails a mean drop beyond 1.645 standard errors (5 % false alarms; docs/benchmarks.md gives the measured
noise and the power against a 0.03 drop).
"""
import json
import statistics

import pytest

from compare import judge_accuracy
from support import BASELINES
from toco.checkpoint import load_trained_model
from toco.data import build_source
from toco.evaluation import MS_SCALES, PSEUDO_LABELS, InferenceSettings, evaluate_model

SEED_SPREAD = BASELINES / "accuracy_seed_spread.json"


def miou_seg(model, cfg, source, settings) -> float:
    """Segmentation mIoU over the whole split at the images' own size."""
    return evaluate_model(model, cfg, source, ("seg",), settings, keep=0)[0].summary()["miou_seg"]


@pytest.fixture(scope="session")
def accuracy(trained_checkpoints) -> dict:
    """Every seed's validation mIoUs, and the first seed's MS + flip and pseudo-label mIoUs."""
    cfg = trained_checkpoints.cfg
    model = load_trained_model(cfg, trained_checkpoints.paths[0], "cpu")
    source = build_source(cfg.data, cfg.data.val_split)
    pseudo = evaluate_model(model, cfg, source, PSEUDO_LABELS, InferenceSettings())[0].summary()
    seeds = trained_checkpoints.metrics
    return dict(miou=[m["miou"] for m in seeds], miou_cam=[m["miou_cam"] for m in seeds],
                miou_ms_flip_seed0=miou_seg(model, cfg, source, InferenceSettings(scales=MS_SCALES, flip=True)),
                miou_aux_cam_seed0=pseudo["miou_aux_cam"], train_s=trained_checkpoints.train_seconds,
                val_images=len(source))


def test_accuracy_synthetic_val(benchmark, trained_checkpoints, accuracy):
    """Times one single-scale evaluation of the val split; the mIoUs go to extra_info (and MLflow)."""
    cfg = trained_checkpoints.cfg
    model = load_trained_model(cfg, trained_checkpoints.paths[0], "cpu")
    source = build_source(cfg.data, cfg.data.val_split)
    benchmark.group = "accuracy"
    benchmark.pedantic(miou_seg, args=(model, cfg, source, InferenceSettings()), rounds=1, iterations=1)
    means = {k: statistics.fmean(accuracy[k]) for k in ("miou", "miou_cam")}
    benchmark.extra_info.update({k: v for k, v in accuracy.items() if not isinstance(v, list)}, **means,
                                backend="accuracy_recipe", device="cpu",
                                shape=f"{len(source)}x3x{cfg.data.synth_size}x{cfg.data.synth_size}")


def test_miou_not_below_baseline(trained_checkpoints):
    """The gate: each metric the stored file measured (its paired_std), seed by seed."""
    if not SEED_SPREAD.is_file():
        pytest.skip(f"no accuracy baseline ({SEED_SPREAD}): make bench-seed-spread")
    stored = json.loads(SEED_SPREAD.read_text())
    seeds = range(len(trained_checkpoints.metrics))
    for key, paired_std in stored["paired_std"].items():
        ref = [run[key] for run in stored["runs"] if run["seed"] in seeds]
        head = [m[key] for m in trained_checkpoints.metrics]
        row = judge_accuracy(key, ref, head, paired_std)
        print(f"{key}: seeds {list(seeds)} {head} against the stored {ref}: mean difference {row.head - row.ref:+.4f}, "
              f"tolerance -{row.tolerance:.4f}, power at -0.03 {row.power:.3f}")
        assert not row.failed, (f"{key}: seeds {list(seeds)} reached {head}, below the stored {ref} by "
                                f"{row.ref - row.head:.4f} on average, more than {row.tolerance:.4f} (1.645 standard "
                                f"errors; {SEED_SPREAD})")
