"""How much the accuracy recipe's mIoU moves with the training seed alone: trains support.ACCURACY from seeds
0..N-1 on this tree and writes benchmarks/baselines/accuracy_seed_spread.json, from which `make bench-check
ACCURACY=1` derives its tolerance. A property of the recipe, not of the machine; re-measure it when the recipe
or the synthetic experiment changes (`make bench-seed-spread SPREAD_SEEDS=N`). One thread per training: on a
busy machine two threads spin for each other and take several times longer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from support import ACCURACY, BASELINES, ROOT

sys.path.insert(0, str(ROOT))  # this tree's toco, whichever tree the venv was installed from

SPREAD_FILE = BASELINES / "accuracy_seed_spread.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", type=int, help="how many seeds to train (at least 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainings")
    args = parser.parse_args()
    seeds = args.seeds
    if seeds < 3:
        sys.exit(f"seed spread: train at least 3 seeds for a standard deviation worth the name, got {seeds}")
    from cases import train_accuracy_recipe

    runs = []
    for seed in range(seeds):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            metrics = train_accuracy_recipe(seed, out, args.threads)
        runs.append(dict(seed=seed, **{k: round(v, 4) for k, v in metrics.items()},
                         train_s=round(time.perf_counter() - start)))
        print(f"seed {seed}: " + ", ".join(f"{k}={v}" for k, v in runs[-1].items() if k != "seed"), flush=True)
        if len(runs) >= 3:  # written after every seed from the third on: a long run interrupted keeps its seeds
            std = {k: round(statistics.stdev(r[k] for r in runs), 4) for k in metrics}
            record = dict(recipe=ACCURACY, threads=args.threads, std=std, runs=runs)
            SPREAD_FILE.write_text(json.dumps(record, indent=1) + "\n")
            print(f"standard deviation over {len(runs)} seeds: {std}; wrote {SPREAD_FILE}", flush=True)


if __name__ == "__main__":
    main()
