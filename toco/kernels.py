"""Build and load the native kernels in `csrc/` (JIT, `torch.utils.cpp_extension.load`).

The first use compiles the extension (about a minute per source file) into a build directory that is reused
afterwards: `$TORCH_EXTENSIONS_DIR/toco` when that variable is set, else `~/.cache/toco/ext`. A failed build
raises `KernelBuildError` with the compiler's reason; `cpu_kernels()` / `cuda_kernels()` turn it into a single
warning and `None`, which the filter backends treat as "fall back to the exact PyTorch filter".
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DEFAULT_CUDA_HOME = "/usr/local/cuda"


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


def _load(name: str, sources: list[Path], verbose: bool, **kwargs):
    from torch.utils import cpp_extension

    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise KernelBuildError(f"kernel sources missing: {missing}")
    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_include_paths=[str(CSRC)],
                                  build_directory=str(build_dir), verbose=verbose, **kwargs)
    except Exception as err:  # compiler missing, compile error, import error: all mean "no native kernel"
        raise KernelBuildError(f"building {name} in {build_dir} failed: {err}") from err


@functools.lru_cache(maxsize=None)
def load_cpu(verbose: bool = False):
    """Compile (first call) and import the CPU lattice extension; raises KernelBuildError."""
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
    return _load(f"toco_permutohedral_cpu_{_cpu_tag()}", [CSRC / "permutohedral_cpu.cpp"], verbose,
                 extra_cflags=["-O3", *arch])


def cuda_home() -> str | None:
    """CUDA_HOME, defaulting to /usr/local/cuda when that exists (and exporting it for cpp_extension)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and Path(DEFAULT_CUDA_HOME, "bin", "nvcc").exists():
        home = os.environ["CUDA_HOME"] = DEFAULT_CUDA_HOME
    return home


def cuda_arch_flags() -> list[str]:
    """-gencode flags for the visible GPU, else for $TORCH_CUDA_ARCH_LIST, else sm_80 with PTX (runs on newer
    GPUs through the driver's JIT). Passed explicitly so they are part of the build's cache key."""
    import torch

    if torch.cuda.is_available():
        arches = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    else:
        listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0").replace(",", ";").replace(" ", ";")
        arches = [a.replace(".", "").replace("+PTX", "") for a in listed.split(";") if a]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    return flags + [f"-gencode=arch=compute_{arches[-1]},code=compute_{arches[-1]}"]


@functools.lru_cache(maxsize=None)
def load_cuda(verbose: bool = False):
    """Compile (first call) and import the CUDA lattice extension; raises KernelBuildError.

    Compiling needs nvcc (CUDA_HOME) and a CUDA build of torch, not a GPU; running it needs a GPU.
    """
    import torch

    home = cuda_home()
    if not home or not Path(home, "bin", "nvcc").exists():
        raise KernelBuildError("nvcc not found: set CUDA_HOME to a CUDA toolkit (default /usr/local/cuda)")
    if torch.version.cuda is None:
        raise KernelBuildError("this torch build has no CUDA support; install a CUDA build of torch")
    from torch.utils import cpp_extension

    # cpp_extension fixes CUDA_HOME at import (possibly from a bare `nvcc` wrapper on PATH); use the checked one.
    cpp_extension.CUDA_HOME = home
    return _load("toco_permutohedral_cuda", [CSRC / "permutohedral_cuda.cu"], verbose,
                 extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *cuda_arch_flags()])


def _quiet(loader):
    @functools.lru_cache(maxsize=None)
    def get():
        try:
            return loader()
        except KernelBuildError as err:
            warnings.warn(f"{err}\nFalling back to the exact (slow, O(N^2)) PyTorch bilateral filter.",
                          RuntimeWarning, stacklevel=3)
            return None
    return get


cpu_kernels = _quiet(load_cpu)
cpu_kernels.__doc__ = "The CPU extension, or None (with one warning) when it cannot be built."
cuda_kernels = _quiet(load_cuda)
cuda_kernels.__doc__ = "The CUDA extension, or None (with one warning) when it cannot be built."
