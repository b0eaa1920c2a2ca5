"""What the benchmarks share: the models they measure, peak memory, per-stage timers."""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "benchmarks" / "baselines"
SEED_SPREAD = BASELINES / "accuracy_seed_spread.json"  # the accuracy gate's reference (`make bench-seed-spread`)

# the embedded synthetic experiment as it is (96-px images, a 3-block ViT of width 128): "the tiny CPU model"
TINY = ["tracking.enabled=false", "data.num_workers=0"]
# the paper's VOC setting at full size (experiments/smoke/voc_shape.yaml: ViT-B/16 with random weights, 448 crops,
# batch 4, 21 classes) on a few synthetic images of VOC's shape
VIT_B = ["tracking.enabled=false", "data.synth_train=8", "data.synth_val=2", "data.num_workers=0"]
# the accuracy benchmark: the synthetic experiment as `make demo` and `make ablation` train it (1500 iterations, its
# loader, the EMA of the weights validated at the end on all 2000 val images), untracked; on one thread a training
# gives the same weights as the ablation's row of the same seed. The gate's seeds are compare.TIERS
ACCURACY = ["tracking.enabled=false"]


# what decides the accuracy recipe's trained weights: a stored seed spread describes a revision whose files here are
# the same (recipe_digest), and bench-check then compares with it instead of training the reference
RECIPE_FILES = ("toco", "csrc", "experiments/synthetic.yaml", "experiments/pretrained", "benchmarks/support.py",
                "benchmarks/cases.py")


def spawn_pool(jobs: int):
    """A pool of `jobs` fresh processes (spawned, not forked: each training starts from a clean torch with its own
    thread count), for trainings side by side."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    return ProcessPoolExecutor(jobs, mp_context=get_context("spawn"))


def recipe_digest(commit: str | None = None, root: Path = ROOT) -> str:
    """sha256 over (path, git blob hash) of RECIPE_FILES at `commit`, or in the working tree of `root` as it is
    on disk (None)."""
    import hashlib
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    if commit:
        pairs = [(line.split("\t", 1)[1], line.split()[2])
                 for line in git("ls-tree", "-r", commit, "--", *RECIPE_FILES).splitlines()]
    else:
        files = sorted(set(git("ls-files", "--cached", "--others", "--exclude-standard", "--", *RECIPE_FILES).split()))
        files = [f for f in files if (root / f).is_file()]  # a deleted tracked file is no part of the tree
        pairs = list(zip(files, git("hash-object", "--", *files).split())) if files else []
    return hashlib.sha256("".join(f"{path} {blob}\n" for path, blob in sorted(pairs)).encode()).hexdigest()


def large_enabled() -> bool:
    """ViT-B/16 at 448 runs on a GPU, or on the CPU when asked for (slow: minutes)."""
    return torch.cuda.is_available() or os.environ.get("TOCO_BENCH_LARGE") == "1"


def bench_config(kind: str):
    """The `toco.config.Config` of a benchmark model (imported here: the A/B workers import this module on any
    revision of toco for the recipes above)."""
    from toco.config import load_config

    if kind == "tiny":
        return load_config(ROOT / "experiments" / "synthetic.yaml", TINY)
    if kind == "vit_b16_448":
        return load_config(ROOT / "experiments" / "smoke" / "voc_shape.yaml", VIT_B)
    if kind == "accuracy":
        return load_config(ROOT / "experiments" / "synthetic.yaml", ACCURACY)
    raise ValueError(kind)


def bench_device(kind: str) -> torch.device:
    """The tiny model is the CPU benchmark; ViT-B uses the GPU when there is one."""
    return torch.device("cuda" if kind != "tiny" and torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_free_memory() -> None:
    """Hand the C allocator's free pages back to the OS (glibc malloc_trim), so the resident set measured next
    starts from what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of the code inside `with`, in MiB: the CUDA allocator's peak above what was allocated at the
    start on a GPU; on the CPU the peak rise of the process's resident set above the start (after the allocator
    has returned its free pages), sampled every millisecond: an estimate."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            _release_free_memory()
            self._base = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.mib = (self._peak - self._base) / 2 ** 20


class StageTimer:
    """Wall time per named stage, summed within a round (one training iteration), averaged over rounds. Also the
    process's CPU time per stage (all threads), which a machine shared with other work distorts much less."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rounds: list[dict[str, float]] = []
        self.cpu_rounds: list[dict[str, float]] = []

    def new_round(self) -> None:
        self.rounds.append(defaultdict(float))
        self.cpu_rounds.append(defaultdict(float))

    @contextmanager
    def stage(self, name: str):
        sync(self.device)  # GPU work queued before belongs to the stage that queued it
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            sync(self.device)
            self.rounds[-1][name] += time.perf_counter() - start
            self.cpu_rounds[-1][name] += time.process_time() - cpu_start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)
        return timed

    def mean(self, skip: int = 0, cpu: bool = False, nested: dict[str, str] | None = None) -> dict[str, float]:
        """Mean per round of each stage, with `other` = total - the named stages. `nested` maps a stage timed
        inside another to that one, whose time then excludes it."""
        rounds = (self.cpu_rounds if cpu else self.rounds)[skip:]
        names = {k for r in rounds for k in r}
        stages = {k: sum(r.get(k, 0.0) for r in rounds) / len(rounds) for k in names}
        for inner, outer in (nested or {}).items():
            stages[outer] -= stages.get(inner, 0.0)
        stages["other"] = stages["total"] - sum(v for k, v in stages.items() if k != "total")
        return stages


def format_stages(wall: dict[str, float], cpu: dict[str, float] | None = None) -> str:
    """A table of stages, slowest (wall) first, with their share of the iteration; CPU time beside when given."""
    rows = sorted((k for k in wall if k != "total"), key=lambda k: -wall[k]) + ["total"]
    width = max(len(k) for k in rows)
    lines = [f"{'stage':<{width}}  {'wall ms':>9}  {'share':>6}" + (f"  {'cpu ms':>9}  {'share':>6}" if cpu else "")]
    for k in rows:
        line = f"{k:<{width}}  {1000 * wall[k]:9.1f}  {100 * wall[k] / wall['total']:5.1f}%"
        if cpu:
            line += f"  {1000 * cpu.get(k, 0.0):9.1f}  {100 * cpu.get(k, 0.0) / max(cpu['total'], 1e-12):5.1f}%"
        lines.append(line)
    return "\n".join(lines)
