"""How much the accuracy recipe's mIoU moves with the training seed alone: trains support.ACCURACY from seeds
0..N-1 on this tree, `--jobs` at a time on one torch thread each, and writes
benchmarks/baselines/accuracy_seed_spread.json (every seed's mIoUs, their mean and sample standard deviation).
`make bench-check ACCURACY=1` takes its tolerance from the standard deviation; the stored-baseline gate
(bench_accuracy.py) also compares with the mean. A property of the recipe: re-measure it when the recipe or the
synthetic experiment changes (`make bench-seed-spread SPREAD_SEEDS=N`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from support import ACCURACY, BASELINES, ROOT

sys.path.insert(0, str(ROOT))  # this tree's toco, whichever tree the venv was installed from

SPREAD_FILE = BASELINES / "accuracy_seed_spread.json"


def train_seed(seed: int) -> dict:
    from cases import train_accuracy_recipe

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        metrics = train_accuracy_recipe(seed, out, threads=1)
    return dict(seed=seed, **{k: round(v, 4) for k, v in metrics.items()}, train_s=round(time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", type=int, help="how many seeds to train (at least 3)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time, one torch thread each")
    args = parser.parse_args()
    if args.seeds < 3:
        sys.exit(f"seed spread: train at least 3 seeds for a standard deviation worth the name, got {args.seeds}")
    runs = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for run in pool.map(train_seed, range(args.seeds)):
            runs.append(run)
            print("seed {seed}: ".format(**run) + ", ".join(f"{k}={v}" for k, v in run.items() if k != "seed"),
                  flush=True)
    metrics = [k for k in runs[0] if k not in ("seed", "train_s")]
    record = dict(recipe=ACCURACY, threads=1, seeds=len(runs),
                  mean={k: round(statistics.fmean(r[k] for r in runs), 4) for k in metrics},
                  std={k: round(statistics.stdev(r[k] for r in runs), 4) for k in metrics}, runs=runs)
    SPREAD_FILE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"mean {record['mean']}, standard deviation {record['std']} over {len(runs)} seeds; wrote {SPREAD_FILE}")


if __name__ == "__main__":
    main()
