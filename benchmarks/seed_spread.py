"""The two noises of the accuracy recipe (support.ACCURACY), which the accuracy gates read: trains it from seeds
0..N-1 on this tree on one torch thread (`--jobs` at a time), then each seed (or the first K,
`--two-thread-seeds K`) again on two threads, and writes benchmarks/baselines/accuracy_seed_spread.json:
- per seed, the gated mIoUs (segmentation, CAM, pseudo labels) and the per-class segmentation IoU of both
  trainings; their mean and sample standard deviation over seeds (one thread), per metric and per class;
- paired_std, the root mean square of (two threads - one thread) over seeds: how far two trainings of one seed
  land apart when only the order of float reductions differs, as it does after any change of the code or on
  another CPU. The gates compare a revision with the stored or the reference mIoU of the same seeds, so this,
  not the spread over seeds, is their noise (docs/benchmarks.md, "Accuracy gate");
- the gate run A against A: every pair of seeds judged as the gate's first tier would judge a head that only
  rounds otherwise (two threads against the stored one thread): its false alarms, measured;
- recipe_digest (support.recipe_digest): the files it measured, so bench-check knows when the stored seeds stand
  for a reference revision.
`--reuse runs/ablation` takes each one-thread training from a finished training of the same config there instead
(`make ablation` trains the default's row from the same seeds on one thread each: the same weights).
Each training appends to runs/seed_spread/results.jsonl as it ends, with the recipe_digest it trained: an
interrupted spread resumes. A property of the recipe: re-measure it when the recipe or the synthetic experiment changes
(`make bench-seed-spread SPREAD_SEEDS=N`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import compare
from machine import machine_class
from support import ACCURACY, ROOT, SEED_SPREAD as SPREAD_FILE, recipe_digest, spawn_pool

sys.path.insert(0, str(ROOT))  # this tree's toco, whichever tree the venv was installed from

RESULTS = ROOT / "runs" / "seed_spread" / "results.jsonl"  # every training as it ends: an interrupted spread resumes


def train_seed(seed: int, threads: int, reuse: tuple[Path, ...] = ()) -> dict:
    from cases import reusable_training, train_accuracy_recipe

    if found := reusable_training(list(reuse), seed, threads):
        print(f"seed {seed} on {threads} thread(s): reusing {found.pop('reused')}", flush=True)
        return dict(seed=seed, **{k: round(v, 4) if isinstance(v, float) else v for k, v in found.items()})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        metrics = train_accuracy_recipe(seed, out, threads=threads)
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    return dict(seed=seed, **rounded, train_s=round(time.perf_counter() - start))


def a_against_a(runs: list[dict], paired_std: dict[str, float]) -> dict:
    """The first tier of the gate on every pair of seeds, the two-thread trainings as the head: how often an
    unchanged recipe fails it."""
    pairs = list(itertools.combinations(runs, len(compare.TIERS[0])))
    failed = []
    for pair in pairs:
        ref = {m: [r[m] for r in pair] for m in compare.GATED}
        head = {m: [r[f"{m}_2threads"] for r in pair] for m in compare.GATED}
        verdict = compare.gate_verdict(ref, head, paired_std)
        if verdict["failed"]:
            failed.append(dict(seeds=[r["seed"] for r in pair], metrics=verdict["failed"]))
    return dict(pairs=len(pairs), failed=failed)


def read_results() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] if RESULTS.is_file() else []


def summarise(runs: list[dict], again: list[dict]) -> dict:
    """The spread file's record: `again` holds the two-thread trainings of the first len(again) seeds of `runs`."""
    for run, other in zip(runs, again):
        run.update({f"{k}_2threads": other[k] for k in compare.GATED})
    paired = runs[:len(again)]
    classes = list(runs[0].get("iou_seg") or {})
    record = dict(recipe=ACCURACY, recipe_digest=recipe_digest(), machine=machine_class(), threads=1, seeds=len(runs),
                  mean={k: round(statistics.fmean(r[k] for r in runs), 4) for k in compare.GATED},
                  std={k: round(statistics.stdev(r[k] for r in runs), 4) for k in compare.GATED},
                  paired_std={k: round(math.sqrt(statistics.fmean((r[f"{k}_2threads"] - r[k]) ** 2 for r in paired)),
                                       4) for k in compare.GATED},
                  paired_seeds=len(paired),
                  class_std={c: round(statistics.stdev(r["iou_seg"][c] for r in runs), 4) for c in classes},
                  runs=runs)
    record["a_against_a"] = a_against_a(paired, record["paired_std"])
    return record


def restamp() -> None:
    """The stored spread for this tree when only files that change no number changed: train the first stored seed
    again on one thread and, where every stored number of it (the gated mIoUs and the per-class IoU, to their
    stored 4 decimals) comes out the same, record this tree's recipe_digest in the file. A changed number means
    the recipe changed: re-measure."""
    stored = json.loads(SPREAD_FILE.read_text())
    digest = recipe_digest()
    if stored["recipe_digest"] == digest:
        print(f"seed spread: {SPREAD_FILE.name} already measured this tree's recipe")
        return
    if stored["machine"] != machine_class():
        sys.exit(f"seed spread: {SPREAD_FILE.name} was measured on {stored['machine']}, this is {machine_class()}: "
                 f"restamp it there, or re-measure here")
    first = stored["runs"][0]
    run = train_seed(first["seed"], 1)
    differ = {k: (first.get(k), run.get(k)) for k in (*compare.GATED, "iou_seg") if first.get(k) != run.get(k)}
    if differ:
        sys.exit(f"seed spread: this tree trains seed {first['seed']} to other numbers ({differ}): its recipe "
                 f"changed; re-measure it (make bench-seed-spread)")
    stored["recipe_digest"] = digest
    stored.setdefault("restamped", []).append(dict(seed=first["seed"], date=time.strftime("%Y-%m-%d"),
                                                   train_s=run["train_s"]))
    SPREAD_FILE.write_text(json.dumps(stored, indent=1) + "\n")
    print(f"seed spread: seed {first['seed']} trained to the stored numbers again; {SPREAD_FILE.name} now stands "
          f"for this tree ({digest[:12]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", type=int, nargs="?", help="how many seeds to train (at least 3)")
    parser.add_argument("--restamp", action="store_true",
                        help="no re-measurement: check that this tree trains the first stored seed to the stored "
                             "numbers, and if so let the stored spread stand for it")
    parser.add_argument("--jobs", type=int, default=2, help="one-thread trainings at a time")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="folders of finished trainings (e.g. runs/ablation) whose one-thread runs of the recipe "
                             "stand in for training them again")
    parser.add_argument("--two-thread-seeds", type=int, default=None,
                        help="train only the first K seeds again on two threads (default: every seed)")
    args = parser.parse_args()
    if args.restamp:
        return restamp()
    if args.seeds is None or args.seeds < 3:
        sys.exit(f"seed spread: train at least 3 seeds for a standard deviation worth the name, got {args.seeds}")
    paired = args.seeds if args.two_thread_seeds is None else args.two_thread_seeds
    if not 2 <= paired <= args.seeds:
        sys.exit(f"seed spread: --two-thread-seeds must be 2..{args.seeds}, got {paired}")
    digest = recipe_digest()
    done = {(r["seed"], r["threads"]): r for r in read_results() if r.get("recipe_digest") == digest}

    def record(run: dict, threads: int) -> None:
        done[run["seed"], threads] = run = dict(run, threads=threads, recipe_digest=digest)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(run) + "\n")

    todo = [s for s in range(args.seeds) if (s, 1) not in done]
    with spawn_pool(args.jobs) as pool:
        for run in pool.map(train_seed, todo, [1] * len(todo), [tuple(args.reuse)] * len(todo)):
            record(run, 1)
    todo = [s for s in range(paired) if (s, 2) not in done]
    with spawn_pool(1) as pool:  # two threads: one training at a time
        for run in pool.map(train_seed, todo, [2] * len(todo)):
            record(run, 2)
    strip = ("threads", "recipe_digest")
    runs = [{k: v for k, v in done[s, 1].items() if k not in strip} for s in range(args.seeds)]
    again = [{k: v for k, v in done[s, 2].items() if k not in strip} for s in range(paired)]
    record = summarise(runs, again)
    SPREAD_FILE.write_text(json.dumps(record, indent=1) + "\n")
    for run in runs:
        print(f"seed {run['seed']}: " + ", ".join(f"{k}={run[k]}" + (f" ({run[f'{k}_2threads']} on 2 threads)"
                                                                     if f"{k}_2threads" in run else "")
                                                  for k in compare.GATED))
    print(f"over {len(runs)} seeds: mean {record['mean']}, standard deviation {record['std']}, paired "
          f"{record['paired_std']} ({len(again)} seeds); per class (segmentation IoU) {record['class_std']}; the gate's "
          f"first tier A against A failed {len(record['a_against_a']['failed'])} of {record['a_against_a']['pairs']} "
          f"pairs of seeds; wrote {SPREAD_FILE}")


if __name__ == "__main__":
    main()
