"""Benchmark session (`make bench`): a checkpoint trained deterministically within the session, summaries of
throughput and per-stage time at the end, and every result logged to MLflow (experiment `benchmarks`).

Files here are named bench_*.py so that `make test` (tests/, test_*.py) never collects them; the Makefile runs
them with `-o python_files=bench_*.py`.

Environment: TOCO_BENCH_LARGE=1 runs ViT-B/16 at 448 on the CPU too; TOCO_BENCH_MLFLOW=0 skips MLflow;
TOCO_BENCH_TRACKING_URI / TOCO_BENCH_ARTIFACTS point it elsewhere (default: the project's mlruns/ store);
TOCO_BENCH_MACHINE names the machine class (default: machine.py's guess).
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from machine import machine_class
from support import ROOT, bench_config, format_stages


@dataclass
class TrainedCheckpoints:
    cfg: object
    paths: list[Path]                # one checkpoint per seed, in the order of `seeds`
    metrics: list[dict[str, float]]  # each seed's final validation (support: cases.ACCURACY_METRICS)
    train_seconds: float             # wall time of all of them, each tier's seeds side by side
    seeds: list[int]
    folder: Path

    def train(self, seeds) -> None:
        """Train the accuracy recipe from `seeds` on the CPU, side by side on one torch thread each: the same
        weights on every run of the same machine."""
        from cases import train_accuracy_recipe
        from support import spawn_pool

        folders = [str(self.folder / f"seed_{seed}") for seed in seeds]
        start = time.perf_counter()
        with spawn_pool(len(seeds)) as pool:
            self.metrics += list(pool.map(train_accuracy_recipe, seeds, folders, [1] * len(seeds)))
        self.train_seconds += time.perf_counter() - start
        self.paths += [Path(f) / "last.pt" for f in folders]
        self.seeds += list(seeds)


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory) -> TrainedCheckpoints:
    """The accuracy recipe trained from the first tier of the gate's seeds (compare.TIERS); the gate trains the
    next tier itself when the first is inconclusive."""
    from compare import TIERS

    trained = TrainedCheckpoints(bench_config("accuracy"), [], [], 0.0, [], tmp_path_factory.mktemp("accuracy"))
    trained.train(TIERS[0])
    return trained


# ----------------------------------------------------------------------------------------------------
# reporting
def _benchmarks(config) -> list:
    session = getattr(config, "_benchmarksession", None)
    return [b for b in (session.benchmarks if session else []) if b]  # a benchmark without stats is falsy


def pytest_collection_modifyitems(items):
    """No pytest-timeout for benchmarks (the test suite's 600 s would cut the accuracy gate's trainings short): a
    benchmark's duration is what it measures."""
    for item in items:
        item.add_marker(pytest.mark.timeout(0))


def pytest_terminal_summary(terminalreporter, config):
    """Throughput / memory of the inference benchmarks and the training iteration's stages, as tables."""
    benches = _benchmarks(config)
    rows = [b for b in benches if "images_per_s" in b.extra_info]
    if rows:
        terminalreporter.section("inference throughput")
        terminalreporter.write_line(f"{'benchmark':<44} {'device':<6} {'images/s':>9} {'peak MiB':>9}")
        for b in rows:
            e = b.extra_info
            terminalreporter.write_line(f"{b.name:<44} {e['device']:<6} {e['images_per_s']:9.2f} "
                                        f"{e['peak_mem_mib']:9.1f}")
    for b in benches:
        if "stages_s" in b.extra_info:
            terminalreporter.section(f"training iteration by stage: {b.name} (mean of {b.stats.rounds} rounds)")
            terminalreporter.write_line(format_stages(b.extra_info["stages_s"], b.extra_info.get("stages_cpu_s")))
        if "miou" in b.extra_info:
            terminalreporter.section(f"accuracy: {b.name}")
            terminalreporter.write_line(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in b.extra_info.items()))


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _flat_numbers(info: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in info.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """One MLflow run per benchmark, tagged with the commit, so the UI compares speed and accuracy across commits.
    Runs after pytest-benchmark's own hook (a wrapper) has finished the statistics."""
    benches = _benchmarks(session.config)
    if not benches or os.environ.get("TOCO_BENCH_MLFLOW", "1") == "0":
        return
    from toco.tracking import log_run

    uri = os.environ.get("TOCO_BENCH_TRACKING_URI", f"sqlite:///{ROOT}/mlruns/mlflow.db")
    artifacts = os.environ.get("TOCO_BENCH_ARTIFACTS", str(ROOT / "mlruns" / "artifacts"))
    commit = _git("rev-parse", "HEAD") or "unknown"
    tags = dict(git_commit=commit, git_dirty=str(bool(_git("status", "--porcelain", "--untracked-files=no"))),
                machine_class=machine_class(), host=platform.node(), torch=torch.__version__)
    try:
        for b in benches:
            s = b.stats
            metrics = dict(mean_s=s.mean, median_s=s.median, min_s=s.min, max_s=s.max, stddev_s=s.stddev,
                           rounds=s.rounds, ops=s.ops, **_flat_numbers(b.extra_info))
            params = {k: v for k, v in b.extra_info.items() if isinstance(v, str)}
            params.update(git_commit=commit, machine_class=tags["machine_class"], threads=torch.get_num_threads(),
                          timer=str(session.config.getoption("benchmark_timer")))
            log_run(uri, artifacts, "benchmarks", b.name, params, metrics, dict(tags, benchmark=b.fullname))
    except Exception as err:  # a benchmark run is still worth its JSON when the MLflow store is unavailable
        print(f"\nwarning: benchmarks not logged to MLflow ({type(err).__name__}: {err})")
    else:
        print(f"\nlogged {len(benches)} benchmarks to MLflow experiment 'benchmarks' at {uri} (commit {commit[:8]})")
