"""What every layer shares at run time: where a run's numbers go (`Logger`, and `NullLogger` for no tracking) and
which device it runs on. Imports nothing else of toco, so any module can use it."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class Logger(Protocol):
    """Where a run's numbers and files go (toco.tracking.MLflowLogger, or NullLogger)."""
    run_id: str | None
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_params(self, params: dict) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_evaluation(self, folder: Path, metrics: dict[str, float], per_class_iou: dict, step: int, prefix: str,
                       artifact_path: str | None = None) -> None: ...
    def describe(self, text: str) -> None: ...  # the run's description: what the UI shows first
    def end(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """The Logger of a run without tracking."""
    run_id = None

    def log_metrics(self, metrics, step):
        pass

    def log_params(self, params):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_evaluation(self, folder, metrics, per_class_iou, step, prefix, artifact_path=None):
        pass

    def describe(self, text):
        pass

    def end(self, status="FINISHED"):
        pass


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
