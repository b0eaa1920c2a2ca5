"""Where the spread over seeds comes from: trains the synthetic benchmark's recipe (experiments/synthetic.yaml)
under controlled variations (every source of randomness at once, one alone with the rest held at seed 0, the same
seeds on two torch threads) and scores every run's weights in several ways: the last weights, their exponential
moving average (what the recipe reports) at the recipe's and other decays, the average of the late snapshots, on
the first 200 val images and on the next 1800. One JSON line per run; a run already there is not trained again, so
an interrupted study resumes. `--report` prints the tables of docs/results.md ("Where the spread over seeds comes
from").

    PYTHONPATH=. python benchmarks/variance.py STUDY [STUDY ...] [--jobs 2] [--out runs/variance]
    PYTHONPATH=. python benchmarks/variance.py --report [--out runs/variance]

Each training runs on one torch thread (`--jobs` of them side by side) unless its study says otherwise: the
thread count changes float reductions, which the `threads` study measures. The ablation's rows are
experiments/ablation/*.yaml, trained by `make ablation`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from support import ROOT, spawn_pool  # noqa: E402 (beside this script)

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "experiments" / "synthetic.yaml"
COMMON = ["tracking.enabled=false", "data.num_workers=0", "train.threads=1", "train.log_every=250",
          "train.ckpt_every=50", "train.final_val_limit=200"]  # the runs are scored below, on both val parts
SNAPSHOTS_FROM = 0.8        # keep the weights every ckpt_every iterations from this share of the run on
EXTRA_VAL = (200, 2000)     # val images beyond the 200 mid-run validation scores
EXTRA_EMA_DECAYS = (0.99, 0.998)  # besides the trainer's own EMA

# study -> runs; a run is (name, overrides) on experiments/synthetic.yaml as it is
SEEDS = range(5)
STUDIES = {
    "seeds": [(f"seeds-{s}", [f"train.seed={s}"]) for s in SEEDS],
    # the same seeds on two torch threads: each pair differs only in the order of float reductions
    "threads": [(f"threads2-{s}", [f"train.seed={s}", "train.threads=2"]) for s in SEEDS],
    # one source of randomness at 1, the others at 0: against seeds-0
    "sources": [(f"{source}-1", [f"train.{source}_seed=1"]) for source in ("init", "order", "augment", "crop")],
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
    final = snapshots[max(snapshots)]
    def score(weights: dict, metrics=("seg",)) -> dict:
        model.load_state_dict(weights)
        val = _scores(model, cfg, source, range(EXTRA_VAL[0]), metrics)
        extra = _scores(model, cfg, source, range(*EXTRA_VAL), metrics)
        both = Scores(val.num_classes, val.metrics).add(val).add(extra)
        return dict(val=_summary(val, names), extra=_summary(extra, names), val_all=_summary(both, names))

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
    with spawn_pool(jobs) as pool:
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
    """Markdown tables: each study's spread (the EMA's seg mIoU is what the recipe reports), one source alone
    against seeds-0, and the pairs of one seed on one and on two threads."""
    records = {json.loads(line)["name"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}

    def seg(name, kind="ema", split="val"):
        return records[name][kind][split]["miou_seg"]

    print("| study | runs | seg mIoU, EMA | CAM mIoU | seg std: last weights | EMA 0.995 | EMA 0.99 | EMA 0.998 | "
          "average of the last 20 % | EMA 0.995 on 2000 val images |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for study, runs in STUDIES.items():
        rows = [n for n, _ in runs if n in records]
        if study == "sources" or len(rows) < 2:
            continue
        ema, cam = [seg(n) for n in rows], [records[n]["final"]["val"]["miou_cam"] for n in rows]
        cells = [f"{_std([seg(n, k) for n in rows]):.3f}" for k in ("final", "ema", "ema_0.99", "ema_0.998", "average")]
        cells.append(f"{_std([seg(n, 'ema', 'val_all') for n in rows]):.3f}")
        print(f"| {study} | {len(rows)} | {statistics.mean(ema):.3f} ± {_std(ema):.3f} | "
              f"{statistics.mean(cam):.3f} ± {_std(cam):.3f} | " + " | ".join(cells) + " |")
    print("\n| one source at 1 | seg mIoU, EMA | minus seeds-0 | CAM minus seeds-0 |\n|---|---:|---:|---:|")
    for name in [n for n, _ in STUDIES["sources"] if n in records]:
        centre = "seeds-0"
        cam = records[name]["final"]["val"]["miou_cam"] - records[centre]["final"]["val"]["miou_cam"]
        print(f"| {name} | {seg(name):.3f} | {seg(name) - seg(centre):+.3f} | {cam:+.3f} |")
    pairs = [(f"seeds-{s}", f"threads2-{s}") for s in SEEDS if f"threads2-{s}" in records and f"seeds-{s}" in records]
    if pairs:
        diff = [seg(b) - seg(a) for a, b in pairs]
        rms = (sum(d * d for d in diff) / len(diff)) ** 0.5
        print(f"\none seed on two threads minus on one (EMA seg): {', '.join(f'{d:+.3f}' for d in diff)}; "
              f"root mean square {rms:.4f} over {len(diff)} seeds")

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
