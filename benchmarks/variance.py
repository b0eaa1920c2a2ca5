"""Where the spread over seeds comes from: trains a recipe of the synthetic benchmark under controlled variations
(every source of randomness at once, or one alone with the rest held at seed 0) and scores every run's weights in
several ways: the final weights, their exponential moving average, late snapshots, on the val split and on 800
further val images. Results go to one JSON line per run; a run already there is not trained again, so an
interrupted study resumes. `--report` prints the decomposition (docs/benchmarks.md, "Where the spread comes from").

    PYTHONPATH=. python benchmarks/variance.py STUDY [STUDY ...] [--jobs 2] [--out runs/variance]
    PYTHONPATH=. python benchmarks/variance.py --report [--out runs/variance]

Each training runs on one torch thread (`--jobs` of them side by side): the thread count changes float
reductions, so a study compares runs of one thread count (the `threads` study varies it on purpose).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "experiments" / "synthetic.yaml"
COMMON = ["tracking.enabled=false", "data.num_workers=0", "train.threads=1", "train.log_every=250",
          "train.ckpt_every=50", "data.synth_val=1000", "train.val_limit=200", "train.ema_decay=0.995"]
SNAPSHOTS_FROM = 0.8        # keep the weights every ckpt_every iterations from this share of the run on
EXTRA_VAL = (200, 1000)     # val images beyond the 200 the benchmark validates on
EXTRA_EMA_DECAYS = (0.99, 0.998)  # besides the trainer's own EMA (0.995)

# study -> runs; a run is (name, overrides). Seed 0 of every source is the shared centre ("seeds-0").
STUDIES = {
    "seeds": [(f"seeds-{s}", [f"train.seed={s}"]) for s in range(5)],
    "init": [(f"init-{s}", [f"train.init_seed={s}"]) for s in (1,)],
    "order": [(f"order-{s}", [f"train.order_seed={s}"]) for s in (1,)],
    "augment": [(f"augment-{s}", [f"train.augment_seed={s}"]) for s in (1,)],
    "crop": [(f"crop-{s}", [f"train.crop_seed={s}"]) for s in (1,)],
    "threads": [("threads-2", ["train.threads=2"])],
    "frozen": [(f"frozen-{s}", [f"train.seed={s}", "optim.waiting_heads=frozen"]) for s in range(5)],
    "declr2": [(f"declr2-{s}", [f"train.seed={s}", "optim.decoder_lr_mult=2"]) for s in range(5)],
    "headlr": [(f"headlr-{s}", [f"train.seed={s}", "optim.head_lr_mult=1.2"]) for s in range(5)],
    "paperlr": [(f"paperlr-{s}", [f"train.seed={s}", "optim.lr=6e-5"]) for s in range(5)],
    "seg300": [(f"seg300-{s}", [f"train.seed={s}", "loss.seg_start=300"]) for s in range(5)],
    "seg300frozen": [(f"seg300frozen-{s}", [f"train.seed={s}", "loss.seg_start=300", "optim.waiting_heads=frozen"])
                     for s in range(5)],
}


def _scores(model, cfg, source, indices, metrics=("seg",)):
    from toco.evaluation import ImageScorer, InferenceSettings, Scores, score_images

    scores = Scores(source.num_classes, metrics)
    scorer = ImageScorer(model, cfg, scores.metrics, InferenceSettings(resize=cfg.data.val_size), "cpu")
    model.eval()
    score_images(scorer, source, indices, scores)
    return scores


def _summary(scores, class_names) -> dict:
    out = {k: round(v, 5) for k, v in scores.summary().items() if k.startswith("miou")}
    out["iou_seg"] = [round(float(v), 4) for v in scores.confusion["seg"].iou()]
    return out


def train_and_score(name: str, overrides: list[str], out: str, extra: list[str]) -> dict:
    import torch

    from toco.config import load_config
    from toco.data import build_source
    from toco.engine.loop import Trainer
    from toco.evaluation import Scores
    from toco.models import build_model

    cfg = load_config(RECIPE, [*COMMON, *overrides, *extra, f"output_dir={out}/{name}"])
    snapshots: dict[int, dict] = {}
    first_kept = int(SNAPSHOTS_FROM * cfg.train.max_iters)

    def keep(path, metrics, iteration):
        if iteration >= first_kept:
            snapshots[iteration] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    start = time.perf_counter()
    trainer = Trainer(cfg, on_checkpoint=keep)
    # more weight averages than the trainer's own (train.ema_decay), updated after every optimizer step: they
    # read the weights only, so the training is the same
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    extra_emas = {d: AveragedModel(trainer.model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
                  for d in EXTRA_EMA_DECAYS}

    def average(optimizer, args, kwargs):
        for ema in extra_emas.values():
            ema.update_parameters(trainer.model)

    trainer.optimizer.register_step_post_hook(average)
    trainer.fit()
    train_s = time.perf_counter() - start
    torch.set_num_threads(1)
    source = build_source(cfg.data, cfg.data.val_split)
    names = source.class_names
    model = build_model(cfg.model, cfg.data.num_classes)

    def score(weights: dict, metrics=("seg",)) -> dict:
        model.load_state_dict(weights)
        val = _scores(model, cfg, source, range(EXTRA_VAL[0]), metrics)
        extra = _scores(model, cfg, source, range(*EXTRA_VAL), metrics)
        both = Scores(val.num_classes, val.metrics).add(val).add(extra)
        return dict(val=_summary(val, names), extra=_summary(extra, names), val_all=_summary(both, names))

    final = snapshots[max(snapshots)]
    iters = sorted(snapshots)
    average_weights = {k: sum(snapshots[i][k].double() for i in iters).div(len(iters)).to(final[k].dtype) if
               final[k].is_floating_point() else final[k] for k in final}
    record = dict(name=name, overrides=overrides, train_s=round(train_s), iterations=cfg.train.max_iters,
                  final=score(final, ("seg", "cam", "aux_cam")), ema=score(trainer.ema.module.state_dict()),
                  average=score(average_weights),
                  **{f"ema_{d}": score(e.module.state_dict()) for d, e in extra_emas.items()},
                  average_of=iters[0],
                  snapshots={i: _summary(_scores(_load(model, snapshots[i]), cfg, source, range(EXTRA_VAL[0])), names)
                             for i in iters})
    return record


def _load(model, weights):
    model.load_state_dict(weights)
    return model


def _done(results: Path) -> set[str]:
    if not results.is_file():
        return set()
    return {json.loads(line)["name"] for line in results.read_text().splitlines() if line.strip()}


def run_studies(studies: list[str], out: Path, jobs: int, extra: list[str]) -> None:
    results = out / "results.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    todo = [(n, o) for s in studies for n, o in STUDIES[s] if n not in _done(results)]
    todo = list(dict(todo).items())  # a run shared by two studies trains once
    print(f"{len(todo)} trainings, {jobs} at a time: {', '.join(n for n, _ in todo)}", flush=True)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_and_score, n, o, str(out), extra): n for n, o in todo}
        for future in futures:
            record = future.result()
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
            v = record["final"]["val"]
            print(f"{record['name']}: seg {v['miou_seg']:.4f} cam {v['miou_cam']:.4f} ema seg "
                  f"{record['ema']['val']['miou_seg']:.4f} ({record['train_s']} s)", flush=True)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def report(out: Path) -> None:
    records = {json.loads(line)["name"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}
    print("| study | runs | seg mIoU (val 200) | std | CAM std | seg std, EMA | seg std, average | seg std, 1000 val |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for study, runs in STUDIES.items():
        names = [n for n, _ in runs]
        if not any(n.endswith("-0") for n in names):  # one source varied: seed 0 of every source is the centre
            names = ["seeds-0", *names]
        rows = [records[n] for n in names if n in records]
        if len(rows) < 2:
            continue

        def col(kind, split, key="miou_seg"):
            return [r[kind][split][key] for r in rows]

        seg = col("final", "val")
        print(f"| {study} | {len(rows)} | {statistics.mean(seg):.3f} | {_std(seg):.3f} | "
              f"{_std(col('final', 'val', 'miou_cam')):.3f} | {_std(col('ema', 'val')):.3f} | "
              f"{_std(col('average', 'val')):.3f} | {_std(col('final', 'val_all')):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="*", help=f"any of {', '.join(STUDIES)}")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "variance")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run of this call")
    args = parser.parse_args()
    unknown = set(args.studies) - set(STUDIES)
    if unknown:
        parser.error(f"unknown studies {sorted(unknown)}; known: {', '.join(STUDIES)}")
    if args.report:
        report(args.out)
    else:
        run_studies(args.studies, args.out, args.jobs, args.set)


if __name__ == "__main__":
    main()
