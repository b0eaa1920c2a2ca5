"""`toco ablation`: several configs, each trained from the same seeds, compared row by row.

Every row is a config with its mean ± sample standard deviation per metric over the seeds. Each row after the
first is compared with the row before it on every metric: the difference of the means, its 95 % confidence
interval and the p-value. Rows trained from the same seeds are
compared seed by seed (a paired t-test): on the synthetic benchmark a seed's luck (which classes its initialisation
and data order favour) carries over from one config to the next, and the pairing removes it. Rows with other seeds
fall back to Welch's t-test (unequal variances).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from toco.config import ConfigError, load_config

# the ablation's metrics: the summary.json key of each (a row whose validation lacks one records None)
METRICS = {"seg": "val/miou_seg", "cam": "val/miou_cam", "pseudo": "val/miou_cam_par", "aux_cam": "val/miou_aux_cam",
           "cls_f1": "val/cls_f1", "wall_s": "wall_s"}
COMPARED = ("seg", "cam", "pseudo", "aux_cam")  # the metrics rows are tested on
SHOWN = {"seg": "seg mIoU", "cam": "CAM mIoU", "pseudo": "pseudo-label mIoU"}  # the printed table's


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
        row = dict(config=config, description=group[0].get("description") or config, seeds=[r["seed"] for r in group],
                   values={})
        for metric in METRICS:
            values = [float(r[metric]) for r in group if r.get(metric) is not None]
            if len(values) < len(group):
                continue
            row["values"][metric] = values
            row[metric] = dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else None)
        if rows and len(group) > 1 and len(rows[-1]["seeds"]) > 1:
            paired = rows[-1]["seeds"] == row["seeds"]
            row["vs_previous"] = {m: compare_rows(rows[-1]["values"][m], row["values"][m], paired) for m in COMPARED
                                  if m in row["values"] and m in rows[-1]["values"]}
        rows.append(row)
    return rows


def _seed_config(path: str, seed: int | None, overrides: list[str], threads: int | None):
    """A row's config as it trains from `seed`: in its own folder and MLflow run."""
    cfg = load_config(path, overrides)
    if seed is not None:
        cfg.train.seed = seed
        cfg.output_dir = str(Path(cfg.output_dir) / f"seed_{seed}")
        cfg.tracking.run_name = f"{cfg.tracking.run_name or Path(path).stem} seed {seed}"
    if threads:
        cfg.train.threads = threads
    return cfg


def _earlier_training(cfg) -> dict | None:
    """What `cfg`'s folder holds: None (nothing), {} (a training of this config, on any thread count) or the keys
    where its config differs (another config, which no ablation overwrites: toco.config.config_differences)."""
    from toco.config import config_differences

    saved = Path(cfg.output_dir) / "config.yaml"
    # neither the thread count nor the test-time settings change what a training makes
    return config_differences(cfg, saved, ignore=("train.threads", "inference")) if saved.is_file() else None


def _train(path: str, seed: int | None, overrides: list[str], threads: int | None) -> dict:
    """One row's training from one seed; its metrics. A finished training of the same config in its folder is
    reused, a stopped one resumes from its last.pt."""
    from toco.run import run_training

    cfg = _seed_config(path, seed, overrides, threads)
    folder, summary, resume = Path(cfg.output_dir), None, None
    if _earlier_training(cfg) == {}:
        done = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        if done.get("iterations") == cfg.train.max_iters:
            summary = done
        elif (folder / "last.pt").is_file():
            resume = str(folder / "last.pt")
    summary = summary or run_training(cfg, Path(path).stem, resume=resume)
    return dict(config=Path(path).stem, description=cfg.description, seed=cfg.train.seed,
                **{k: summary.get(key) for k, key in METRICS.items()})


def run_ablation(configs: list[str], seeds: list[int] | None, overrides: list[str], out: str | Path,
                 jobs: int = 1) -> list[dict]:
    """Check every config, then train each once per seed, `jobs` trainings at a time (each on cores / jobs torch
    threads); write every run and the rows to `out` and return the rows."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from toco.run import check_before_run

    tasks = [(path, seed) for path in configs for seed in (seeds or [None])]
    for path, seed in tasks:  # every training checked before the first one starts
        cfg = _seed_config(path, seed, overrides, None)
        check_before_run(cfg)
        if differences := _earlier_training(cfg):
            shown = "; ".join(f"{key} {theirs!r} there, {ours!r} here" for key, (ours, theirs) in
                              list(differences.items())[:3])
            raise ConfigError(f"{cfg.output_dir} holds a training of another config ({shown}): move it, or set "
                              f"output_dir")
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


def markdown_table(rows: list[dict]) -> str:
    """What `toco ablation` prints and the README shows: per row (its config's description) mean ± std of the
    SHOWN metrics, and each one against the row above: the paired difference, its 95 % interval, the p-value."""
    def difference(test: dict) -> str:
        p = "p < 0.001" if test["p"] < 0.001 else f"p = {test['p']:.3f}"
        return f"{test['diff']:+.3f} [{test['low']:+.3f}, {test['high']:+.3f}], {p}"

    shown = [m for m in SHOWN if any(m in row["values"] for row in rows)]
    seeds = sorted({len(row["seeds"]) for row in rows})
    head = [f"{len(rows[0]['seeds'])} seeds" if len(seeds) == 1 else "seeds"] + [SHOWN[m] for m in shown] + \
        [f"{SHOWN[m].split()[0]} against the row above" for m in shown]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(shown) + "---|" * len(shown)]
    for row in rows:
        cells = [f"{row[m]['mean']:.3f}" + (f" ± {row[m]['std']:.3f}" if row[m]["std"] is not None else "")
                 if m in row else "n/a" for m in shown]
        tests = [difference(row["vs_previous"][m]) if m in row.get("vs_previous", {}) else "" for m in shown]
        lines.append("| " + " | ".join([row["description"], *cells, *tests]) + " |")
    return "\n".join(lines)
