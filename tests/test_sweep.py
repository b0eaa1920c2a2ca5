"""Sweeps (Ray Tune + Optuna + ASHA, nested MLflow runs) and concurrent writers to one MLflow store."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RUN
from toco.config import ConfigError, load_config

# the tests that start Ray are slow and share one test process (xdist group "ray": the session's Ray cluster)

REPO = Path(__file__).resolve().parents[1]
# the spec's overrides set each trial's length and report interval: the command line must not replace them
TINY_SWEEP = [o for o in TINY_RUN if not o.startswith(("train.max_iters=", "train.eval_every=", "train.ckpt_every="))]
TINY_SWEEP += ["train.threads=1", "train.log_every=1"]


def _write_spec(tmp_path: Path, **changes) -> Path:
    spec = dict(name="tiny", config=str(REPO / "experiments" / "synthetic.yaml"),
                overrides={"train.max_iters": 4, "train.eval_every": 2,
                           "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                           "tracking.artifact_root": str(tmp_path / "mlruns" / "artifacts"),
                           "tracking.experiment": "sweep-test"},
                num_samples=4, max_concurrent=2, grace_period=2, reduction_factor=2, startup_trials=2,
                space={"loss.w_ptc": {"loguniform": [0.05, 1.0]}, "pseudo.bkg_thre": {"uniform": [0.35, 0.6]}})
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_spec_errors_name_the_key(tmp_path):
    from toco.sweep import load_sweep

    with pytest.raises(ConfigError, match="unknown keys.*'trials'"):
        load_sweep(_write_spec(tmp_path, trials=3))
    with pytest.raises(ConfigError, match="loss.w_nope"):
        load_sweep(_write_spec(tmp_path, space={"loss.w_nope": {"uniform": [0.0, 1.0]}}))
    with pytest.raises(ConfigError, match="low < high"):
        load_sweep(_write_spec(tmp_path, space={"loss.w_ptc": {"uniform": [1.0, 0.5]}}))
    with pytest.raises(ConfigError, match="outside space.loss.w_ptc"):  # the experiment's value is the baseline trial
        load_sweep(_write_spec(tmp_path, space={"loss.w_ptc": {"uniform": [0.5, 1.0]}}))
    with pytest.raises(ConfigError, match=r"grace_period=5 must lie in 1..train.max_iters \(4\)"):
        load_sweep(_write_spec(tmp_path, grace_period=5))
    with pytest.raises(ConfigError, match="metric: objective and an objective mapping go together"):
        load_sweep(_write_spec(tmp_path, objective={"val/miou_seg": 1.0}))
    with pytest.raises(ConfigError, match=r"objective names \['val/miou_nope'\]"):
        load_sweep(_write_spec(tmp_path, metric="objective", objective={"val/miou_nope": 1.0}))
    with pytest.raises(ConfigError, match="seeds must be distinct integers"):
        load_sweep(_write_spec(tmp_path, seeds=[0, 0]))
    with pytest.raises(ConfigError, match="seeds need workers: 1"):
        load_sweep(_write_spec(tmp_path, seeds=[0, 1], workers=2))
    with pytest.raises(ConfigError, match="loss.w_ptc is swept .space. and also set by an override"):
        load_sweep(_write_spec(tmp_path), ["loss.w_ptc=0.3"])  # it would pin every trial's value
    with pytest.raises(ConfigError, match="pseudo.bkg_thre is swept"):
        load_sweep(_write_spec(tmp_path, overrides={"pseudo.bkg_thre": 0.5}))
    spec = load_sweep(_write_spec(tmp_path), TINY_SWEEP)
    cfg = spec.trial_config({"loss.w_ptc": 0.3})
    assert cfg.loss.w_ptc == 0.3 and cfg.train.max_iters == 4 and cfg.train.ckpt_every == 2
    experiment = load_config(REPO / "experiments" / "synthetic.yaml")  # trial 1 replays the experiment's values
    assert cfg.output_dir.startswith("/") and spec.default_params() == {
        "loss.w_ptc": experiment.loss.w_ptc, "pseudo.bkg_thre": experiment.pseudo.bkg_thre}
    with pytest.raises(ConfigError, match="space.loss.w_ptc.choice needs a list of values"):
        load_sweep(_write_spec(tmp_path, space={"loss.w_ptc": {"choice": 0.2}}))
    for bad in ([None, 1.0], [0.1], [True, 1.0], "0.1"):  # every one a line naming the key, never a TypeError
        with pytest.raises(ConfigError, match=r"space.loss.w_ptc.uniform needs \[low, high\], two floats"):
            load_sweep(_write_spec(tmp_path, space={"loss.w_ptc": {"uniform": bad}}))
    with pytest.raises(ConfigError, match="space.train.batch_size.randint needs .low, high., two ints"):
        load_sweep(_write_spec(tmp_path, space={"train.batch_size": {"randint": [1.5, 4]}}))
    with pytest.raises(ConfigError, match="loguniform needs .low, high. with 0 < low < high"):
        load_sweep(_write_spec(tmp_path, space={"loss.w_ptc": {"loguniform": [0, 1.0]}}))
    with pytest.raises(ConfigError, match="model.backbone_kwargs.depth is swept"):  # a mapping that holds the key
        load_sweep(_write_spec(tmp_path, space={"model.backbone_kwargs.depth": {"randint": [2, 3]}}),
                   ["model.backbone_kwargs={depth: 3}"])
    spec = load_sweep(_write_spec(tmp_path, space={"loss.w_ptc": {"loguniform": ["1e-2", "1"]},  # YAML 1.1 strings
                                                   "data.rescale_range": {"choice": [[0.75, 1.5], [0.5, 2.0]]}}))
    assert spec.space["loss.w_ptc"].args == (0.01, 1.0) and (0.75, 1.5) in spec.space["data.rescale_range"]


def test_the_sweep_reads_its_experiment_once_and_tune_and_optuna_see_the_same_space(tmp_path, monkeypatch):
    """One Distribution per swept key gives both spaces: randint's high is included in both (Tune's is
    exclusive), log scales agree, and the experiment YAML is read once however many trials are made."""
    import toco.sweep
    from toco.sweep import Distribution, load_sweep

    pytest.importorskip("ray")
    pytest.importorskip("optuna")
    reads = []
    monkeypatch.setattr(toco.sweep, "load_config", lambda *a, **k: reads.append(a) or load_config(*a, **k))
    spec = load_sweep(_write_spec(tmp_path, space={"train.batch_size": {"randint": [2, 5]},
                                                   "loss.w_ptc": {"loguniform": [0.05, 1.0]},
                                                   "pseudo.bkg_thre": {"choice": [0.45, 0.5, 0.55]}}))
    for batch in (2, 3, 4, 5):
        assert spec.trial_config({"train.batch_size": batch}).train.batch_size == batch
    assert len(reads) == 1
    batch, w_ptc, bkg = (spec.space[k] for k in ("train.batch_size", "loss.w_ptc", "pseudo.bkg_thre"))
    assert batch == Distribution("randint", (2, 5)) and 5 in batch and 6 not in batch and 0.5 in bkg
    assert (batch.tune().lower, batch.tune().upper) == (2, 6) and (batch.optuna().low, batch.optuna().high) == (2, 5)
    assert w_ptc.optuna().log and (w_ptc.tune().lower, w_ptc.tune().upper) == (0.05, 1.0)
    assert bkg.tune().categories == [0.45, 0.5, 0.55] and bkg.optuna().choices == (0.45, 0.5, 0.55)
    assert spec.as_json()["space"]["train.batch_size"] == {"randint": [2, 5]}  # sweep.json as the YAML said


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_four_trial_sweep_logs_four_nested_runs_under_one_parent(ray_cluster, tmp_path, capsys):
    import mlflow

    from toco.sweep import load_sweep, run_sweep

    spec = load_sweep(_write_spec(tmp_path), TINY_SWEEP)
    summary = run_sweep(spec, out_dir=tmp_path / "sweep")
    assert summary["trials_run"] == 4 and 0 <= summary["best_value"] <= 1
    assert summary["default_value"] != "not evaluated"

    client = mlflow.MlflowClient(spec.trial_config({}).tracking.tracking_uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4
    assert all(r.info.status == "FINISHED" for r in trials)
    assert len({r.data.params["loss.w_ptc"] for r in trials}) == 4  # four different configurations
    for r in trials:  # every trial reached ASHA's first rung (2 iterations): its metrics up to there are logged
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/cls")]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
        assert "val/miou_seg" in r.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/best.yaml", "sweep/trials.json", "sweep/parallel_coordinate.png"} <= artifacts
    assert f"best/{spec.metric}" in parent.data.metrics

    best = load_config(summary["best_config"])  # ready to train: the experiment's schedule, the tuned values
    assert best.loss.w_ptc == pytest.approx(summary["best_params"]["loss.w_ptc"])
    assert best.train.max_iters == load_config(spec.config).train.max_iters

    # resuming a finished sweep changes nothing: no new trials, no new runs
    again = run_sweep(spec, out_dir=tmp_path / "sweep", resume=True)
    assert again["trials_run"] == 4
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(spec, out_dir=tmp_path / "sweep")


WRITER = textwrap.dedent("""
    import sys
    from toco.config import load_config
    from toco.tracking import MLflowLogger
    tmp, name = sys.argv[1], sys.argv[2]
    cfg = load_config("experiments/synthetic.yaml", [f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
                      f"tracking.artifact_root={tmp}/artifacts", "tracking.experiment=concurrent",
                      f"tracking.run_name={name}"])
    logger = MLflowLogger(cfg)
    for step in range(1, 61):
        logger.log_metrics({f"train/m{k}": step + k for k in range(8)}, step)
    logger.end()
""")


@pytest.mark.slow
def test_concurrent_writers_to_one_fresh_sqlite_store_lose_nothing(tmp_path):
    """Four processes open a new store at once (MLflow creates its tables on first contact, which races) and
    write 60 steps x 8 metrics each."""
    import mlflow

    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"w{i}"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    for w in writers:
        out, _ = w.communicate(timeout=600)
        assert w.returncode == 0, out[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["w0", "w1", "w2", "w3"]
    for r in runs:
        assert r.info.status == "FINISHED"
        for k in range(8):
            history = client.get_metric_history(r.info.run_id, f"train/m{k}")
            assert sorted((m.step, m.value) for m in history) == [(s, s + k) for s in range(1, 61)]


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # two Ray clusters at once slow each other down several times over
def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    """Ctrl-C in the middle of a trial, then `toco sweep --resume`: every trial completes, under the same parent,
    and no trial logs a step twice."""
    import signal
    import time

    import mlflow

    spec = _write_spec(tmp_path, num_samples=2, max_concurrent=1,  # the interrupted trial and one not yet started
                       overrides={"train.max_iters": 8, "train.eval_every": 2, "tracking.experiment": "resume-test",
                                  "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                                  "tracking.artifact_root": str(tmp_path / "mlruns" / "artifacts")},
                       grace_period=8,  # no early stopping: every trial runs its 8 iterations
                       seeds=[0, 1], metric="objective", objective={"val/miou_seg": 0.5, "val/miou_cam": 0.5})
    toco = str(Path(sys.executable).parent / "toco")
    command = [toco, "sweep", str(spec), "--out", str(tmp_path / "sweep"), *TINY_SWEEP]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900
    while not list((tmp_path / "sweep" / "trials").glob("*/seed_1/last.pt")) and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # after the first checkpoint of the first trial
    out, _ = first.communicate(timeout=600)
    assert first.returncode != 0 and "--resume" in out, out[-3000:]

    resumed = subprocess.run(command + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("resume-test").experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    statuses = sorted((r.info.run_name, r.info.status) for r in trials)
    assert [status for _, status in statuses] == ["FINISHED"] * 2, (statuses, resumed.stdout[-3000:])
    for r in trials:  # each seed's steps once, the mean over the seeds and the objective at every evaluation
        for seed in (0, 1):
            history = client.get_metric_history(r.info.run_id, f"seed_{seed}/train/cls")
            assert sorted(m.step for m in history) == list(range(1, 9))
        seg, cam, objective = (sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
                               for key in ("val/miou_seg", "val/miou_cam", "objective"))
        assert [step for step, _ in objective] == [2, 4, 6, 8]
        assert [v for _, v in objective] == pytest.approx([(a[1] + b[1]) / 2 for a, b in zip(seg, cam)])
        per_seed = [client.get_metric_history(r.info.run_id, f"seed_{seed}/val/miou_seg") for seed in (0, 1)]
        last = [max(h, key=lambda m: m.step).value for h in per_seed]
        assert seg[-1][1] == pytest.approx(sum(last) / 2)


def test_settle_runs_ends_what_an_interrupted_sweep_left_open(tmp_path):
    """Interrupted: only RUNNING runs become KILLED. Finished: every run takes the status Tune saw, also one an
    interruption left KILLED."""
    import mlflow

    from toco.tracking import settle_runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("settle", artifact_location=str(tmp_path / "artifacts"))
    ids = {status: client.create_run(experiment).info.run_id for status in ("RUNNING", "KILLED", "FINISHED")}
    for status in ("KILLED", "FINISHED"):
        client.set_terminated(ids[status], status)

    def statuses():
        return {name: client.get_run(run_id).info.status for name, run_id in ids.items()}

    settle_runs(uri, {run_id: "KILLED" for run_id in ids.values()}, only_running=True)
    assert statuses() == {"RUNNING": "KILLED", "KILLED": "KILLED", "FINISHED": "FINISHED"}
    settle_runs(uri, {run_id: "FINISHED" for run_id in ids.values()})
    assert statuses() == {"RUNNING": "FINISHED", "KILLED": "FINISHED", "FINISHED": "FINISHED"}
