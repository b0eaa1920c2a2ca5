"""`toco ablation`: several configs, each trained from the same seeds, compared row by row.

Every row is a config with its mean ± sample standard deviation per metric over the seeds. Each row after the
first is compared with the row before it on every metric: the difference of the means, its 95 % confidence
interval and the p-value, and whether it exceeds the noise (p < 0.05). Rows trained from the same seeds are
compared seed by seed (a paired t-test): on the synthetic benchmark a seed's luck (which classes its initialisation
and data order favour) carries over from one config to the next, and the pairing removes it. Rows with other seeds
fall back to Welch's t-test (unequal variances).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from toco.config import load_config

# the ablation's metrics: the summary.json key of each
METRICS = {"seg": "val/miou_seg", "cam": "val/miou_cam", "aux_cam": "val/miou_aux_cam", "cls_f1": "val/cls_f1",
           "wall_s": "wall_s"}
COMPARED = ("seg", "cam", "aux_cam")  # the metrics rows are tested on
ALPHA = 0.05


def compare_rows(a: list[float], b: list[float], paired: bool) -> dict:
    """mean(b) - mean(a), its 95 % confidence interval and the two-sided p-value: of the paired t-test on the
    per-seed differences when `paired` (a[i] and b[i] from one seed), else of Welch's t-test."""
    from scipy import stats

    diff = statistics.fmean(b) - statistics.fmean(a)
    spread = statistics.pstdev([y - x for x, y in zip(a, b)]) if paired else statistics.pstdev(a) + statistics.pstdev(b)
    if spread == 0:  # no noise at all: the difference is exact
        return dict(diff=diff, low=diff, high=diff, p=0.0 if diff else 1.0, test="exact")
    result = stats.ttest_rel(b, a) if paired else stats.ttest_ind(b, a, equal_var=False)
    interval = result.confidence_interval(0.95)
    return dict(diff=diff, low=float(interval.low), high=float(interval.high), p=float(result.pvalue),
                test="paired" if paired else "Welch")


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per config (first-seen order) from runs {config, seed, <METRICS keys>}: its seeds, per metric
    {mean, std} (std the sample standard deviation, None for one run), and per compared metric the test against
    the previous row (`vs_previous`, from the second row on, with two seeds or more per row; paired when both
    rows hold the same seeds)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["config"], []).append(run)
    rows = []
    for config, group in groups.items():
        row = dict(config=config, seeds=[r["seed"] for r in group], values={})
        for metric in METRICS:
            values = [float(r[metric]) for r in group]
            row["values"][metric] = values
            row[metric] = dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else None)
        if rows and len(group) > 1 and len(rows[-1]["seeds"]) > 1:
            paired = rows[-1]["seeds"] == row["seeds"]
            row["vs_previous"] = {m: compare_rows(rows[-1]["values"][m], row["values"][m], paired) for m in COMPARED}
        rows.append(row)
    return rows


def verdict(test: dict) -> str:
    sign = "+" if test["diff"] >= 0 else ""
    word = "differs" if test["p"] < ALPHA else "within spread"
    return (f"{sign}{test['diff']:.3f} [{test['low']:+.3f}, {test['high']:+.3f}] p={test['p']:.3f} {word} "
            f"({test['test']})")


def _train(path: str, seed: int | None, overrides: list[str], threads: int | None) -> dict:
    """One row's training from one seed, in its own folder and MLflow run; its metrics."""
    from toco.run import run_training

    cfg = load_config(path, overrides)
    if seed is not None:
        cfg.train.seed = seed
        cfg.output_dir = str(Path(cfg.output_dir) / f"seed_{seed}")
        cfg.tracking.run_name = f"{cfg.tracking.run_name or Path(path).stem} seed {seed}"
    if threads:
        cfg.train.threads = threads
    summary = run_training(cfg, Path(path).stem)
    return dict(config=Path(path).stem, seed=cfg.train.seed, **{k: summary[key] for k, key in METRICS.items()})


def run_ablation(configs: list[str], seeds: list[int] | None, overrides: list[str], out: str | Path,
                 jobs: int = 1) -> list[dict]:
    """Check every config, then train each once per seed, `jobs` trainings at a time (each on cores / jobs torch
    threads); write every run and the rows to `out` and return the rows."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from toco.run import check_before_run

    for path in configs:  # every config checked before the first one trains
        check_before_run(load_config(path, overrides))
    tasks = [(path, seed) for path in configs for seed in (seeds or [None])]
    if jobs <= 1:
        runs = [_train(path, seed, overrides, None) for path, seed in tasks]
    else:
        threads = max(1, (os.cpu_count() or jobs) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            runs = list(pool.map(_train, *zip(*[(path, seed, overrides, threads) for path, seed in tasks])))
    rows = aggregate(runs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rows=rows, runs=runs), indent=1))
    return rows


def ablation_table(rows: list[dict]) -> list[dict]:
    """The rows as strings: mean ± std per metric, and each compared metric's verdict against the row above."""
    def cell(stat: dict, digits: int) -> str:
        return f"{stat['mean']:.{digits}f}" + ("" if stat["std"] is None else f" ± {stat['std']:.{digits}f}")

    table = []
    for row in rows:
        line = dict(config=row["config"], seeds=len(row["seeds"]),
                    **{k: cell(row[k], 0 if k == "wall_s" else 4) for k in METRICS})
        line.update({f"{m} vs above": verdict(row["vs_previous"][m]) if "vs_previous" in row else ""
                     for m in COMPARED})
        table.append(line)
    return table
