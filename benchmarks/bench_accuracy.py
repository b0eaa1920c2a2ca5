"""Accuracy is a benchmark too: the accuracy recipe (support.ACCURACY) trained in the session from the gate's seeds
(conftest.trained_checkpoints, compare.TIERS), each seed's mIoUs compared with the same seed's stored in
benchmarks/baselines/accuracy_seed_spread.json (`make bench-seed-spread`): one file for every machine, since mIoU
does not depend on a machine's speed. Paired by seed, the comparison's noise is only how far one seed's training
moves when its float rounding changes (a CPU model, a change of the code): the file's paired_std.

The gate is compare.gate_verdict: segmentation, CAM and pseudo-label mIoU, each at most 1/60 false alarms, a second
pair of seeds when the first is inconclusive (docs/benchmarks.md, "Accuracy gate").
"""
import json
import statistics

import pytest

from compare import GATED, accuracy_table, tiered_gate
from support import SEED_SPREAD
from toco.checkpoint import load_trained_model
from toco.data import build_source
from toco.evaluation import MS_SCALES, PSEUDO_LABELS, InferenceSettings, evaluate_model



def miou_seg(model, cfg, source, settings) -> float:
    """Segmentation mIoU at the images' own size over the images mid-run validation scores (train.val_limit)."""
    return evaluate_model(model, cfg, source, ("seg",), settings, limit=cfg.train.val_limit, keep=0)[0].summary()[
        "miou_seg"]


@pytest.fixture(scope="session")
def accuracy(trained_checkpoints) -> dict:
    """Every seed's validation mIoUs, and the first seed's MS + flip and pseudo-label mIoUs."""
    cfg = trained_checkpoints.cfg
    model = load_trained_model(cfg, trained_checkpoints.paths[0], "cpu")
    source = build_source(cfg.data, cfg.data.val_split)
    pseudo = evaluate_model(model, cfg, source, PSEUDO_LABELS, InferenceSettings(), limit=cfg.train.val_limit)[0].summary()
    seeds = trained_checkpoints.metrics
    return dict(miou=[m["miou"] for m in seeds], miou_cam=[m["miou_cam"] for m in seeds],
                miou_ms_flip_seed0=miou_seg(model, cfg, source, InferenceSettings(scales=MS_SCALES, flip=True)),
                miou_aux_cam_seed0=pseudo["miou_aux_cam"], train_s=trained_checkpoints.train_seconds,
                val_images=min(len(source), cfg.train.val_limit or len(source)))


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
                                shape=f"{accuracy['val_images']}x3x{cfg.data.synth_size}x{cfg.data.synth_size}")


def test_miou_not_below_baseline(trained_checkpoints):
    """The gate (compare.TIERS, compare.gate_verdict): each gated metric the stored file measured, seed by seed
    against its stored one-thread runs; the second tier's seeds are trained when the first is inconclusive."""
    if not SEED_SPREAD.is_file():
        pytest.skip(f"no accuracy baseline ({SEED_SPREAD}): make bench-seed-spread")
    stored = json.loads(SEED_SPREAD.read_text())
    by_seed = {run["seed"]: run for run in stored["runs"]}

    def train_tier(tier: tuple[int, ...]) -> None:
        if tier[0] not in trained_checkpoints.seeds:  # the session trained the first tier already
            trained_checkpoints.train(tier)

    def head(seeds: list[int]) -> dict[str, list]:
        trained = dict(zip(trained_checkpoints.seeds, trained_checkpoints.metrics))
        return {m: [trained[s].get(m) for s in seeds] for m in GATED}

    verdict, seeds = tiered_gate(train_tier, lambda seeds: {m: [by_seed[s].get(m) for s in seeds] for m in GATED},
                                 head, stored["paired_std"])
    print("\n" + accuracy_table(verdict["rows"], seeds))
    assert not verdict["failed"], (f"{', '.join(verdict['failed'])}: seeds {seeds} fell below the stored mIoUs of "
                                   f"{SEED_SPREAD} beyond the gate's tolerance (the table above)")
