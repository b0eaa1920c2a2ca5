"""The machine class benchmark baselines are kept per (`benchmarks/baselines/<class>/`): the GPU model, or the
CPU model and the number of usable cores, since machines that share a core count can differ 2x in speed. No
torch import: the Makefile asks for it before every benchmark run.

`TOCO_BENCH_MACHINE` overrides the guess, e.g. to share one baseline between identical cloud instances.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess

# words of a CPU model name that say nothing about its speed: trademarks, clock, 'Processor', its own core count
NOISE_WORDS = r"\((r|tm)\)|@.*$|\b(processor|cpu|\d+-core)\b"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model_slug(cpuinfo: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz' -> 'intel-xeon-platinum-8481c', from /proc/cpuinfo's
    first 'model name'; the architecture ('x86-64', 'aarch64') when there is none."""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return slug(re.sub(NOISE_WORDS, " ", line.partition(":")[2].strip(), flags=re.IGNORECASE))
    return slug(platform.machine() or "unknown")


def machine_class() -> str:
    """'gpu-<first GPU's name>' when nvidia-smi sees one, else 'cpu-<CPU model>-<N>core' (N = usable cores)."""
    if os.environ.get("TOCO_BENCH_MACHINE"):
        return os.environ["TOCO_BENCH_MACHINE"]
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20, check=True).stdout.split("\n")
            if names[0].strip():
                return "gpu-" + slug(names[0].strip())
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{cpu_model_slug(cpuinfo)}-{cores}core"


if __name__ == "__main__":
    print(machine_class())
