"""The machine class benchmark baselines are kept per (`benchmarks/baselines/<class>/`). No torch import: the
Makefile asks for it before every benchmark run.

`TOCO_BENCH_MACHINE` overrides the guess, e.g. to share one baseline between identical cloud instances.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess


def machine_class() -> str:
    """'gpu-<first GPU's name>' when nvidia-smi sees one, else 'cpu-<N>core' (N = usable CPU cores)."""
    if os.environ.get("TOCO_BENCH_MACHINE"):
        return os.environ["TOCO_BENCH_MACHINE"]
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20, check=True).stdout.split("\n")
            if names[0].strip():
                return "gpu-" + re.sub(r"[^a-z0-9]+", "-", names[0].strip().lower()).strip("-")
        except (OSError, subprocess.SubprocessError):
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{cores}core"


if __name__ == "__main__":
    print(machine_class())
