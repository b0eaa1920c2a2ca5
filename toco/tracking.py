"""MLflow tracking: the only module that imports mlflow.

Store: a sqlite database plus an artifact folder under `mlruns/` (MLflow 3 refuses a bare file store).
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from toco import viz
from toco.config import Config, flatten, save_config


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def setup_mlflow(tracking_uri: str, artifact_root: str, experiment: str) -> str:
    """Point mlflow at the store and return the experiment id, creating both on first use."""
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = Path(artifact_root).resolve()
    location.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(experiment, artifact_location=location.as_uri())


class MLflowLogger:
    """Implements the loop's Logger protocol on one MLflow run."""

    def __init__(self, cfg: Config, run_id: str | None = None, nested: bool = False, tags: dict | None = None):
        import mlflow

        self.mlflow = mlflow
        exp_id = setup_mlflow(cfg.tracking.tracking_uri, cfg.tracking.artifact_root, cfg.tracking.experiment)
        self.run = mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=cfg.tracking.run_name,
                                    nested=nested)
        self.run_id = self.run.info.run_id
        if run_id is None:  # a resumed run keeps its params
            params = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v for k, v in flatten(cfg).items()}
            mlflow.log_params(params)
            mlflow.set_tags({"git_commit": git_commit(), "dataset": cfg.data.name,
                             "backbone": cfg.model.backbone, **(tags or {})})
            with tempfile.TemporaryDirectory() as tmp:
                save_config(cfg, Path(tmp) / "config.yaml")
                mlflow.log_artifact(str(Path(tmp) / "config.yaml"))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()},
                                step=step)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)

    def log_evaluation(self, result, class_names, step, out_dir) -> None:
        folder = Path(out_dir) / "eval" / f"iter_{step:06d}"
        write_evaluation(result, class_names, folder)
        self.mlflow.log_artifacts(str(folder), f"eval/iter_{step:06d}")

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def write_evaluation(result, class_names: list[str], folder: Path) -> None:
    """Per-class IoU table (text + JSON), confusion matrix and the picture grid of a few val images."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {k: cm.table(class_names) for k, cm in result.confusion.items()}
    (folder / "per_class_iou.txt").write_text("\n\n".join(f"[{k}]\n{t}" for k, t in tables.items()) + "\n")
    per_class = {k: dict(zip(class_names, np.nan_to_num(cm.iou(), nan=-1).round(4).tolist()))
                 for k, cm in result.confusion.items()}
    (folder / "per_class_iou.json").write_text(json.dumps({"metrics": result.metrics, "iou": per_class}, indent=1))
    viz.confusion_plot(result.confusion["seg"].matrix, class_names, folder / "confusion_seg.png")
    if result.samples:
        rows = []
        for s in result.samples:
            present = s["cls_label"] > 0.5
            cam = s["cam"][present].max(axis=0) if present.any() else np.zeros(s["mask"].shape)
            rows.append([s["raw"], viz.heatmap(cam), viz.colorize(s["cam_label"]),
                         viz.colorize(s["pred"]), viz.colorize(s["mask"])])
        viz.picture_grid(rows, ["image", "CAM", "pseudo label", "prediction", "ground truth"],
                         folder / "samples.png")
