"""The two noises of the accuracy recipe (support.ACCURACY), which both accuracy gates read: trains it from seeds
0..N-1 on this tree on one torch thread (`--jobs` at a time), then each seed again on two threads, and writes
benchmarks/baselines/accuracy_seed_spread.json:
- per seed, the mIoUs of both trainings; their mean and sample standard deviation over seeds (one thread);
- paired_std, the root mean square of (two threads - one thread) over seeds: how far two trainings of one seed
  land apart when only the order of float reductions differs, as it does after any change of the code or on
  another CPU. The gates compare a revision with the stored or the reference mIoU of the same seeds, so this,
  not the spread over seeds, is their noise (docs/benchmarks.md, "Accuracy gate").
A property of the recipe: re-measure it when the recipe or the synthetic experiment changes
(`make bench-seed-spread SPREAD_SEEDS=N`).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from support import ACCURACY, BASELINES, ROOT

sys.path.insert(0, str(ROOT))  # this tree's toco, whichever tree the venv was installed from

SPREAD_FILE = BASELINES / "accuracy_seed_spread.json"


def train_seed(seed: int, threads: int) -> dict:
    from cases import train_accuracy_recipe

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        metrics = train_accuracy_recipe(seed, out, threads=threads)
    return dict(seed=seed, **{k: round(v, 4) for k, v in metrics.items()}, train_s=round(time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", type=int, help="how many seeds to train (at least 3)")
    parser.add_argument("--jobs", type=int, default=2, help="one-thread trainings at a time")
    args = parser.parse_args()
    if args.seeds < 3:
        sys.exit(f"seed spread: train at least 3 seeds for a standard deviation worth the name, got {args.seeds}")
    seeds = range(args.seeds)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(train_seed, seeds, [1] * args.seeds))
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # two threads: one training at a time
        again = list(pool.map(train_seed, seeds, [2] * args.seeds))
    metrics = [k for k in runs[0] if k not in ("seed", "train_s")]
    for run, other in zip(runs, again):
        run.update({f"{k}_2threads": other[k] for k in metrics})
        print(f"seed {run['seed']}: " + ", ".join(f"{k}={v}" for k, v in run.items() if k != "seed"), flush=True)
    record = dict(recipe=ACCURACY, threads=1, seeds=len(runs),
                  mean={k: round(statistics.fmean(r[k] for r in runs), 4) for k in metrics},
                  std={k: round(statistics.stdev(r[k] for r in runs), 4) for k in metrics},
                  paired_std={k: round(math.sqrt(statistics.fmean((r[f"{k}_2threads"] - r[k]) ** 2 for r in runs)), 4)
                              for k in metrics}, runs=runs)
    SPREAD_FILE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"over {len(runs)} seeds: mean {record['mean']}, standard deviation {record['std']}, paired "
          f"{record['paired_std']}; wrote {SPREAD_FILE}")


if __name__ == "__main__":
    main()
