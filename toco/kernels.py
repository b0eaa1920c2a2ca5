"""Build and load the native kernels in `csrc/` (JIT, `torch.utils.cpp_extension.load`).

The first use compiles an extension into a build directory that is reused afterwards, one per content of the
sources (`_staged`), under `$TORCH_EXTENSIONS_DIR/toco` when that variable is set, else `~/.cache/toco/ext`. A line on stderr says when a compile starts and about how
long it takes (about 1 min for the CPU kernel, 2-5 min for the CUDA one, on 2 cores). `load_cpu()` / `load_cuda()`
return the module or raise `KernelBuildError` with the compiler's reason; a build is tried once per process, and
a failure is raised again on every later call. What a failed build falls back to is the caller's choice
(`toco.filters.resolve_backend`).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import sys
from pathlib import Path

# the kernel sources: csrc/ beside the package in a checkout, the package data toco/csrc in an installed wheel
_HERE = Path(__file__).resolve().parent
CSRC = _HERE / "csrc" if (_HERE / "csrc").is_dir() else _HERE.parent / "csrc"
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_CUDA_ARCH = "8.0"  # with PTX, which newer GPUs run through the driver's JIT
COMPILE_TIME = {"cpu": "1 min", "cuda": "2-5 min"}  # measured on 2 shared cores (docs/results.md)


class KernelBuildError(RuntimeError):
    """The native extension could not be compiled or imported."""


def build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    path = Path(root) / "toco" if root else Path.home() / ".cache" / "toco" / "ext"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_tag() -> str:
    """Short tag of the host CPU, so a build tuned with -march=native is never loaded on a different CPU."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _once(build):
    """Run `build` at most once per process: later calls return its module or raise its KernelBuildError again."""
    outcome = []

    @functools.wraps(build)
    def load():
        if not outcome:
            try:
                outcome.append(build())
            except KernelBuildError as err:
                outcome.append(err)
        if isinstance(outcome[0], KernelBuildError):
            raise outcome[0].with_traceback(None)
        return outcome[0]
    return load


def _cpp_extension():
    """torch.utils.cpp_extension. Imported on a machine with a CUDA toolkit but no GPU, it logs "No CUDA runtime
    is found": irrelevant to the CPU kernel and misleading while it compiles, so that line is dropped."""
    import torch

    if "torch.utils.cpp_extension" in sys.modules or torch.cuda.is_available():
        from torch.utils import cpp_extension
        return cpp_extension
    log = logging.getLogger("torch.utils.cpp_extension")
    drop = lambda record: not record.getMessage().startswith("No CUDA runtime is found")  # noqa: E731
    log.addFilter(drop)
    try:
        from torch.utils import cpp_extension
    finally:
        log.removeFilter(drop)
    return cpp_extension


def _staged(name: str, sources: list[Path]) -> tuple[Path, list[Path]]:
    """(the build folder, the sources in it): the sources and headers are copied into a folder named after their
    content, so every tree with the same kernels (a checkout, bench-check's reference copy, a Ray job's working
    dir) shares one build, and none recompiles another's by building from a path of its own."""
    from toco.files import atomic_write_bytes

    files = [*sources, *sorted(CSRC.glob("*.h"))]
    digest = hashlib.sha1(b"".join(f.name.encode() + b"\0" + f.read_bytes() for f in files)).hexdigest()[:10]
    build_dir = build_root() / f"{name}_{digest}"
    for f in files:
        staged = build_dir / "src" / f.name
        if not staged.exists():  # written whole or not at all: processes may stage the same folder at once
            staged.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(staged, f.read_bytes())
    return build_dir, [build_dir / "src" / s.name for s in sources]


def _load(name: str, sources: list[Path], what: str, compile_time: str, **kwargs):
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise KernelBuildError(f"kernel sources missing: {missing}")
    cpp_extension = _cpp_extension()
    build_dir, staged = _staged(name, sources)
    if not (build_dir / f"{name}.so").exists():
        from tqdm import tqdm

        tqdm.write(f"compiling the {what} (first use, about {compile_time})...", file=sys.stderr)
    try:
        return cpp_extension.load(name=name, sources=[str(s) for s in staged],
                                  extra_include_paths=[str(staged[0].parent)], build_directory=str(build_dir), **kwargs)
    except Exception as err:  # compiler missing, compile error, import error: all mean "no native kernel"
        raise KernelBuildError(f"building {name} in {build_dir} failed: {err}") from err


@_once
def load_cpu():
    """Compile (first call) and import the CPU lattice extension; raises KernelBuildError."""
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
    return _load(f"toco_permutohedral_cpu_{_cpu_tag()}", [CSRC / "permutohedral_cpu.cpp"], "CPU lattice kernel",
                 COMPILE_TIME["cpu"], extra_cflags=["-O3", *arch])


def cuda_home() -> str | None:
    """CUDA_HOME (or CUDA_PATH); else the toolkit of the nvcc on PATH, else /usr/local/cuda: the first folder
    with bin/nvcc and include/cuda.h (a bare nvcc wrapper on PATH is no toolkit). The one found is exported as
    CUDA_HOME for cpp_extension."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    on_path = shutil.which("nvcc")
    for candidate in ([Path(on_path).resolve().parent.parent] if on_path else []) + [Path(DEFAULT_CUDA_HOME)]:
        if (candidate / "bin" / "nvcc").exists() and (candidate / "include" / "cuda.h").exists():
            os.environ["CUDA_HOME"] = str(candidate)
            return str(candidate)
    return None


def cuda_arches() -> list[str]:
    """Compute capabilities to compile for, as nvcc spells them ('90', '90a'), oldest first: those of the visible
    GPUs, else $TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0' or '8.6+PTX'), else 8.0. Raises KernelBuildError for an
    entry of TORCH_CUDA_ARCH_LIST that is not a compute capability."""
    import torch

    if torch.cuda.is_available():
        found = {"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    else:
        listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH
        found = set()
        for entry in re.split(r"[;,\s]+", listed):
            match = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry)
            if entry and not match:
                raise KernelBuildError(f"TORCH_CUDA_ARCH_LIST: {entry!r} is not a compute capability like 9.0 or "
                                       f"8.6+PTX (the whole value: {listed!r})")
            if match:
                found.add(match[1] + match[2] + match[3])
    return sorted(found, key=lambda a: (int(re.sub(r"\D", "", a)), a))


def cuda_arch_flags(arches: list[str]) -> list[str]:
    """-gencode flags: machine code for each arch, plus PTX of the newest so that newer GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    return flags + [f"-gencode=arch=compute_{arches[-1]},code=compute_{arches[-1]}"]


@_once
def load_cuda():
    """Compile (first call) and import the CUDA lattice extension; raises KernelBuildError.

    Compiling needs nvcc (CUDA_HOME) and a CUDA build of torch, not a GPU; running it needs a GPU. The arches
    are part of the build directory's name, so builds for different GPUs never overwrite each other.
    """
    import torch

    home = cuda_home()
    if not home or not Path(home, "bin", "nvcc").exists():
        raise KernelBuildError("nvcc not found: set CUDA_HOME to a CUDA toolkit (default /usr/local/cuda)")
    if torch.version.cuda is None:
        raise KernelBuildError("this torch build has no CUDA support; install a CUDA build of torch")
    arches = cuda_arches()
    # cpp_extension fixes CUDA_HOME at import (possibly from a bare `nvcc` wrapper on PATH); use the checked one.
    _cpp_extension().CUDA_HOME = home
    name = "toco_permutohedral_cuda_" + "_".join(f"sm{a}" for a in arches)
    what = f"CUDA lattice kernel for {', '.join(f'sm_{a}' for a in arches)}"
    return _load(name, [CSRC / "permutohedral_cuda.cu"], what, COMPILE_TIME["cuda"],
                 extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *cuda_arch_flags(arches)])


def load(backend: str):
    """The extension of a native backend, 'cpu' or 'cuda' (see load_cpu / load_cuda)."""
    return {"cpu": load_cpu, "cuda": load_cuda}[backend]()
