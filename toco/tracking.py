"""MLflow tracking: the only module that imports mlflow.

Store: a sqlite database plus an artifact folder under `mlruns/` (MLflow 3 refuses a bare file store).
"""
from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from toco.config import Config, flatten, save_config
from toco.errors import UserError


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def _first_use_lock(tracking_uri: str):
    """Serialises opening a sqlite store across processes: MLflow creates its tables on first contact, and two
    processes doing that at once fail ('table ... already exists'), as do two creating the same experiment."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def param_value(value) -> str:
    """An MLflow param: lists and mappings as JSON (readable back), everything else as its str."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def retry_locked(call, attempts: int = 6):
    """Run `call`, again after a pause when sqlite says 'database is locked': concurrent writers wait up to 20 s
    for the lock, which a loaded machine can exceed. A failed write was rolled back, so repeating it is safe."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # MlflowException or sqlalchemy's OperationalError, depending on the call
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** attempt)


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def setup_mlflow(tracking_uri: str, artifact_root: str, experiment: str) -> str:
    """Point mlflow at the store and return the experiment id, creating both on first use."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with _first_use_lock(tracking_uri):
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        location = Path(artifact_root).resolve()
        location.mkdir(parents=True, exist_ok=True)
        # MLflow 3's UI opens an experiment of this kind in its model-training view (runs, charts), not the GenAI one
        return mlflow.create_experiment(experiment, artifact_location=location.as_uri(), tags=EXPERIMENT_KIND)


class StoreError(UserError):
    """A tracking store, experiment or search filter that cannot be read."""


def find_runs(tracking_uri: str, experiments: list[str], filter_string: str = "") -> list[dict]:
    """The training runs (not evaluations, not sweep parents) of `experiments` that match an MLflow search filter
    (`params.loss.use_ctc = 'False' and status = 'FINISHED'`), oldest first: {name, id, experiment, status,
    params, metrics (the last value of each), tags}."""
    import mlflow

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise StoreError(f"tracking store {tracking_uri} does not exist")
    client = mlflow.MlflowClient(tracking_uri)
    found = {e.name: e.experiment_id for e in client.search_experiments()}
    missing = [name for name in experiments if name not in found]
    if missing or not found:
        raise StoreError(f"no experiment {', '.join(missing) or '(none in the store)'} in {tracking_uri}; it holds: "
                         f"{', '.join(sorted(found)) or 'nothing'}")
    try:
        runs = client.search_runs([found[name] for name in experiments or found], filter_string,
                                  order_by=["attributes.start_time ASC"], max_results=50000)
    except Exception as err:  # MlflowException: a filter MLflow cannot parse
        raise StoreError(f"search filter {filter_string!r}: {str(err).splitlines()[0]}") from None
    names = {v: k for k, v in found.items()}
    return [dict(name=r.info.run_name, id=r.info.run_id, experiment=names[r.info.experiment_id],
                 status=r.info.status, params=r.data.params, metrics=r.data.metrics, tags=r.data.tags)
            for r in runs if r.data.tags.get("kind") not in ("evaluation", "sweep")]


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED", tags: dict | None = None) -> None:
    """Close a run another process started (a sweep trial that was stopped early or died)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for key, value in (tags or {}).items():
        retry_locked(lambda: client.set_tag(run_id, key, str(value)))
    retry_locked(lambda: client.set_terminated(run_id, status))


def settle_runs(tracking_uri: str, statuses: dict, only_running: bool = False) -> None:
    """Give each run (id -> status) that status where it has another one, or with `only_running` where it is still
    RUNNING: runs whose processes were stopped, or whose end was lost when a sweep was interrupted."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for run_id, status in statuses.items():
        current = client.get_run(run_id).info.status
        if current != status and (current == "RUNNING" or not only_running):
            retry_locked(lambda: client.set_terminated(run_id, status))


def log_run(tracking_uri: str, artifact_root: str, experiment: str, run_name: str, params: dict | None = None,
            metrics: dict[str, float] | None = None, tags: dict | None = None, artifacts: list | None = None) -> str:
    """One finished run in one call (evaluations, benchmarks); returns its id. Non-finite metrics are left out,
    `git_commit` is tagged unless given."""
    import mlflow

    from mlflow.entities import Metric, Param

    exp_id = setup_mlflow(tracking_uri, artifact_root, experiment)
    client = mlflow.MlflowClient(tracking_uri)
    tags = {"git_commit": git_commit(), **(tags or {})}
    run = retry_locked(lambda: client.create_run(exp_id, run_name=run_name,
                                                 tags={k: str(v) for k, v in tags.items()}))
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    try:
        retry_locked(lambda: client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()
                     if v is not None and np.isfinite(v)],
            params=[Param(k, param_value(v)) for k, v in (params or {}).items()]))
        for path in artifacts or []:
            if Path(path).exists():
                client.log_artifact(run_id, str(path))
    except BaseException:
        retry_locked(lambda: client.set_terminated(run_id, "FAILED"))
        raise
    retry_locked(lambda: client.set_terminated(run_id, "FINISHED"))
    return run_id


class MLflowLogger:
    """One MLflow run (implements the training loop's Logger protocol); `toco.run.tracked_run` opens and ends it.

    run_id: continue that run (a resumed training, a Ray worker of the driver's run). parent_run_id: nest it
    under another run, in that run's experiment (an evaluation under its training, a trial under its sweep).
    """

    def __init__(self, cfg: Config, run_id: str | None = None, tags: dict | None = None,
                 parent_run_id: str | None = None, run_name: str | None = None, log_config: bool = True):
        import mlflow

        self.mlflow = mlflow
        tracking = cfg.tracking
        exp_id = setup_mlflow(tracking.tracking_uri, tracking.artifact_root, tracking.experiment)
        self.client = mlflow.MlflowClient(tracking.tracking_uri)
        tags = dict(tags or {})
        if parent_run_id:
            try:  # the UI nests a run only within its parent's experiment
                exp_id = self.client.get_run(parent_run_id).info.experiment_id
                tags["mlflow.parentRunId"] = parent_run_id
            except Exception:  # the parent lives in another store: keep the link as a plain tag
                tags["parent_run_id"] = parent_run_id
                print(f"toco: run {parent_run_id}, which this run belongs under, is not in {tracking.tracking_uri}: "
                      f"this is a top-level run (its tag parent_run_id keeps the link)", file=sys.stderr)
        self.run = mlflow.start_run(run_id=run_id, experiment_id=exp_id if run_id is None else None,
                                    run_name=run_name or tracking.run_name, nested=mlflow.active_run() is not None)
        self.run_id = self.run.info.run_id
        # a resumed run skips the (metric, step) pairs it already holds: the steps a killed process logged after
        # its last checkpoint are repeated after the resume, and each must appear once
        self.logged_steps: dict[str, set[int]] = {}
        if run_id is not None:  # a resumed run keeps its params
            for key in self.client.get_run(run_id).data.metrics:
                self.logged_steps[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        else:
            if log_config:
                mlflow.log_params({k: param_value(v) for k, v in flatten(cfg).items()})
                with tempfile.TemporaryDirectory() as tmp:
                    save_config(cfg, Path(tmp) / "config.yaml")
                    mlflow.log_artifact(str(Path(tmp) / "config.yaml"))
            note = {"mlflow.note.content": cfg.description} if cfg.description else {}  # the UI's description
            mlflow.set_tags({"git_commit": git_commit(), "dataset": cfg.data.name, "backbone": cfg.model.backbone,
                             **note, **{k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: float(v) for k, v in metrics.items()
                 if step not in self.logged_steps.get(k, ()) and v is not None and np.isfinite(v)}
        if fresh:
            retry_locked(lambda: self.mlflow.log_metrics(fresh, step=step))

    def log_params(self, params: dict) -> None:
        self.mlflow.log_params({k: param_value(v) for k, v in params.items()})

    def log_artifact(self, path, artifact_path=None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)

    def log_evaluation(self, folder: str | Path, metrics: dict[str, float], per_class_iou: dict, step: int,
                       prefix: str, artifact_path: str | None = None) -> None:
        """An evaluation's result folder (`toco.evaluation.write_results`): metrics and per-class IoU as
        metrics at `step`, the per-class IoU as a table, the pictures as images at `step` (the UI shows them
        over training), the files as artifacts."""
        from PIL import Image

        folder = Path(folder)
        iou = {f"{prefix}iou_{m}/{name}": v for m, table in per_class_iou.items() for name, v in table.items()}
        self.log_metrics({**{f"{prefix}{k}": v for k, v in metrics.items()}, **iou}, step)
        names = list(next(iter(per_class_iou.values()), {}))
        if names:
            table = {"class": names, **{m: [t[n] for n in names] for m, t in per_class_iou.items()}}
            self.mlflow.log_table(table, artifact_file=f"{artifact_path or 'eval'}/per_class_iou_table.json")
        for picture in sorted(folder.glob("*.png")):
            with Image.open(picture) as image:
                self.mlflow.log_image(image.convert("RGB"), key=f"{prefix}{picture.stem}", step=step)
        self.mlflow.log_artifacts(str(folder), artifact_path)

    def describe(self, text: str) -> None:
        """The run's description (Markdown), which the UI shows at the top of the run's page."""
        retry_locked(lambda: self.client.set_tag(self.run_id, "mlflow.note.content", text))

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)
