"""What `make bench-check` times on two revisions of toco (benchmarks/check.py), and the recipe it trains for
the accuracy comparison.

The cases run in worker processes whose `toco` is the revision under test (PYTHONPATH = that revision's tree),
so they reach toco only through its public entry points, imported inside the case: a revision that lacks one
gets `n/a` for the case (MissingEntryPoint), not a crash. A case prepares its inputs, runs once to warm up and
returns the function that one round times. Everything runs on the CPU.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from inputs import photo, photo_batch, probability_maps

# where the evaluation entry points live: the first module defining the name wins
EVALUATION = ("toco.inference", "toco.evaluation")


class MissingEntryPoint(Exception):
    """The revision under test has no such function or class: the case does not apply to it."""


def entry(name: str, *modules: str):
    """`name` from the first of `modules` that defines it."""
    for module in modules:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not module.startswith(str(err.name)):  # a missing dependency is an error, not a moved module
                raise
            continue
        if hasattr(found, name):
            return getattr(found, name)
    raise MissingEntryPoint(f"{name} not found in {' or '.join(modules)}")


def revision_root() -> Path:
    """The tree of the revision under test: where its `toco` package lives."""
    import toco

    return Path(toco.__file__).resolve().parent.parent


def synthetic_config(overrides: list[str] = ()):
    """The revision's own experiments/synthetic.yaml (the training and model it defines), with overrides."""
    load_config = entry("load_config", "toco.config")
    return load_config(revision_root() / "experiments" / "synthetic.yaml", list(overrides))


def warmed_up(run):
    run()
    return run


# ----------------------------------------------------------------------------------------------------
# the timed cases
def train_step():
    """One training iteration of the synthetic experiment with every loss active (batch 4 of 96 px): the step
    (CAMs, forward, PTC, CTC, PAR, seg and DenseCRF losses), backward, optimiser."""
    Trainer = entry("Trainer", "toco.engine.loop")
    build_loaders = entry("build_loaders", "toco.engine.loop")
    step = entry("train_step", "toco.engine.step")
    cfg = synthetic_config(["data.num_workers=0"])
    trainer = Trainer(cfg, device=torch.device("cpu"))  # model, PAR, optimiser and schedule as training builds them
    batch = next(iter(build_loaders(cfg)[0]))
    iteration = max(cfg.loss.seg_start, cfg.loss.ptc_ctc_start)

    def run():
        result = step(trainer.model, trainer.par, batch, cfg, iteration, torch.Generator().manual_seed(0))
        trainer.optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
    return warmed_up(run)


def _inference(ms_flip: bool):
    predict_image = entry("predict_image", *EVALUATION)
    Settings = entry("InferenceSettings", *EVALUATION)
    build_model = entry("build_model", "toco.models")
    generate_sample = entry("generate_sample", "toco.data.synthetic")
    cfg = synthetic_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes).eval()
    images = [generate_sample(0, i, cfg.data.synth_size, cfg.data.num_classes, "val")[0] for i in range(8)]
    settings = Settings(scales=entry("MS_SCALES", *EVALUATION), flip=True) if ms_flip else Settings()

    def run():
        for image in images:
            predict_image(model, image, settings, "cpu")
    return warmed_up(run)


def inference_ss():
    """`predict_image` of the synthetic model on 8 val images (96 px), single scale."""
    return _inference(ms_flip=False)


def inference_ms_flip():
    """The same at the test-time scales (1, 1.25, 1.5), each with its flip."""
    return _inference(ms_flip=True)


def bilateral_filter():
    """The lattice filter alone (CPU kernel), at the DenseCRF loss's training setting: 4 photos, 21 channels,
    224 x 224, sigma_xy 50, sigma_rgb 15; builds the lattice and filters."""
    bilateral = entry("bilateral_filter", "toco.filters")
    image, probs = photo_batch(224), probability_maps(4, 21, (224, 224))
    return warmed_up(lambda: bilateral(image, probs, 50.0, 15.0, "cpu"))


def dense_crf_loss():
    """The regularised DenseCRF loss, forward and backward, as training runs it on 448-px crops (scale 0.5,
    batch 4, 21 classes, the CPU lattice), with a pseudo label that ignores the unsure pixels."""
    loss_fn = entry("dense_crf_loss", "toco.losses")
    image, probs = photo_batch(448), probability_maps(4, 21, (448, 448))
    label = probs.argmax(dim=1).masked_fill(probs.max(dim=1).values < 0.5, 255)
    roi = torch.ones(4, 448, 448)
    probs.requires_grad_(True)

    def run():
        probs.grad = None
        # sigma_rgb 15, sigma_xy 100, scale 0.5, by position: revisions name the scale's keyword differently
        loss_fn(image, probs, roi, label, 15.0, 100.0, 0.5, backend="cpu").backward()
    return warmed_up(run)


def crf_inference():
    """DenseCRF post-processing (CPU kernel) of one 500 x 375 photo with 21 labels, 10 mean-field iterations."""
    dense_crf = entry("dense_crf", "toco.crf")
    image, probs = photo("astronaut", (375, 500)), probability_maps(1, 21, (375, 500))[0].numpy()
    return warmed_up(lambda: dense_crf(image, probs, backend="cpu"))


def par():
    """PAR at the paper's setting: 10 iterations over dilations (1, 2, 4, 8, 12, 24) of a crop at half of 448 px,
    6 score maps (background and 2 classes, at two thresholds)."""
    PAR = entry("PAR", "toco.par")
    refine = PAR((1, 2, 4, 8, 12, 24), 10)
    image, masks = photo_batch(224)[:1] / 255, probability_maps(1, 6, (224, 224))
    return warmed_up(lambda: refine(image, masks))


CASES = {f.__name__: f for f in (train_step, inference_ss, inference_ms_flip, bilateral_filter, dense_crf_loss,
                                 crf_inference, par)}


# ----------------------------------------------------------------------------------------------------
# accuracy
# the metrics of the accuracy recipe's final validation the gates read: segmentation, CAM and pseudo-label mIoU
ACCURACY_METRICS = {"miou": "val/miou_seg", "miou_cam": "val/miou_cam", "miou_pseudo": "val/miou_cam_par"}


def accuracy_config(seed: int, out_dir: str, threads: int, overrides: list[str] = ()):
    """The config train_accuracy_recipe trains: support.ACCURACY from `seed` on the CPU, with a mutant's
    `overrides`."""
    from support import ACCURACY

    cfg = synthetic_config([*ACCURACY, *overrides, f"train.seed={seed}", f"output_dir={out_dir}", "train.device=cpu"])
    cfg.train.threads = threads
    return cfg


def recipe_metrics(metrics: dict[str, float], out_dir: str | Path, max_iters: int) -> dict:
    """ACCURACY_METRICS of a training's final validation, and its per-class segmentation IoU where the revision
    writes it (which classes carry the spread)."""
    found = {key: metrics[name] for key, name in ACCURACY_METRICS.items() if name in metrics}
    if "miou" not in found:
        raise MissingEntryPoint("the training's validation reports no val/miou_seg")
    final = Path(out_dir) / "eval" / f"iter_{max_iters:06d}" / "summary.json"
    if final.is_file():
        found["iou_seg"] = json.loads(final.read_text()).get("per_class_iou", {}).get("seg")
    return found


def train_accuracy_recipe(seed: int, out_dir: str, threads: int, overrides: list[str] = ()) -> dict[str, float]:
    """Train support.ACCURACY (the synthetic experiment) from `seed` on `threads` torch threads (one wastes least
    on a busy machine), with `overrides` (a mutant's); the final validation's mIoUs that the revision reports, of
    ACCURACY_METRICS."""
    Trainer = entry("Trainer", "toco.engine.loop")
    cfg = accuracy_config(seed, out_dir, threads, overrides)
    return recipe_metrics(Trainer(cfg).fit().metrics, out_dir, cfg.train.max_iters)


# what a finished training's folder may differ in and still hold the accuracy recipe's weights: where it was
# written and how it was tracked change no number (checked bit for bit against a tracked `toco train`)
UNWEIGHED_KEYS = ("output_dir", "description", "tracking", "inference")  # test-time keys: no training reads them


def finished_training(folder: Path, seed: int, threads: int, overrides: list[str] = ()) -> dict | None:
    """The metrics train_accuracy_recipe(seed, ..., threads, overrides) would return, read from a finished `toco
    train` or `toco ablation` in `folder` (its config.yaml and summary.json) that trained exactly that config on
    the CPU; None when the folder holds anything else. The same config, seed and thread count give the same
    weights to the last bit, so the ablation's rows (one thread each under `--jobs 2` on 2 cores) spare the
    seed spread and the mutation matrix those trainings."""
    config_differences = entry("config_differences", "toco.config")
    saved, summary = folder / "config.yaml", folder / "summary.json"
    if not (saved.is_file() and summary.is_file()):
        return None
    done = json.loads(summary.read_text())
    cfg = accuracy_config(seed, str(folder), threads, overrides)
    differences = config_differences(cfg, saved, ignore=UNWEIGHED_KEYS)
    if differences.get("train.device") == ("cpu", "auto") and not torch.cuda.is_available():
        del differences["train.device"]  # trained on this CPU-only machine
    if differences or done.get("iterations") != cfg.train.max_iters:
        return None
    return dict(recipe_metrics(done, folder, cfg.train.max_iters), train_s=done.get("wall_s"), reused=str(folder))


def reusable_training(roots: list[Path], seed: int, threads: int, overrides: list[str] = ()) -> dict | None:
    """finished_training of the first `seed_<seed>` folder under `roots` (e.g. runs/ablation) that holds it."""
    for root in roots:
        for folder in sorted(Path(root).glob(f"**/seed_{seed}")):
            if found := finished_training(folder, seed, threads, overrides):
                return found
    return None
