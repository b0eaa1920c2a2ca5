"""The command line as a user meets it: one line and exit status 2 for every mistake, checked before any MLflow
run is opened; progress, versions and resolved configs."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_user_error
from toco.cli import main
from toco.config import save_config
from toco.checkpoint import save_checkpoint


@pytest.fixture
def store(tiny_cfg, tmp_path):
    """The tiny config with its own MLflow store, saved as a file."""
    tiny_cfg.tracking.tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tiny_cfg.tracking.artifact_root = str(tmp_path / "mlruns" / "artifacts")
    tiny_cfg.output_dir = str(tmp_path / "run")
    save_config(tiny_cfg, tmp_path / "tiny.yaml")
    return tmp_path / "tiny.yaml"


def _runs(tiny_cfg) -> list:
    import mlflow

    if not Path(tiny_cfg.tracking.tracking_uri.removeprefix("sqlite:///")).exists():
        return []
    client = mlflow.MlflowClient(tiny_cfg.tracking.tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("overrides, message", [
    (["data.name=voc", "data.root=nowhere/VOC2012", "data.num_classes=21"], "nowhere/VOC2012: dataset root folder not found"),
    (["model.pooling=max"], "model.pooling': 'max' is not one of ['gmp', 'gap']"),
    (["model.pretrained=true", "model.pretrained_file=missing.pt"], "model.pretrained_file 'missing.pt' does not exist"),
    (["data.num_classes=200"], "synthetic num_classes"),
    (["model.backbone=vit_nonexistent"], "model.backbone 'vit_nonexistent'"),
    (["train.max_iters=many"], "train.max_iters"),
])
def test_a_mistake_in_train_is_one_line_and_leaves_no_run_behind(store, tiny_cfg, capsys, overrides, message):
    assert message in cli_user_error(["train", str(store), *overrides], capsys)
    assert _runs(tiny_cfg) == []


def test_a_resume_checkpoint_that_does_not_fit_is_one_line(store, tiny_cfg, tiny_model, tmp_path, capsys):
    import torch

    state = dict(model=tiny_model.state_dict(), optimizer={}, scheduler={}, iteration=2, rng=torch.get_rng_state())
    save_checkpoint(tmp_path / "other.pt", state)
    message = cli_user_error(["train", str(store), "--resume", str(tmp_path / "other.pt"), "data.num_classes=4"], capsys)
    assert "does not fit" in message and "data.num_classes" in message
    save_checkpoint(tmp_path / "best.pt", dict(model=tiny_model.state_dict(), iteration=2))
    message = cli_user_error(["train", str(store), "--resume", str(tmp_path / "best.pt")], capsys)
    assert "holds no training state" in message and "last.pt" in message
    assert "does not exist" in cli_user_error(["train", str(store), "--resume", str(tmp_path / "none.pt")], capsys)
    assert _runs(tiny_cfg) == []


def test_a_dataset_error_in_eval_is_one_line(store, tiny_model, tmp_path, capsys):
    save_checkpoint(tmp_path / "last.pt", dict(model=tiny_model.state_dict()))
    message = cli_user_error(["eval", str(store), "--checkpoint", str(tmp_path / "last.pt"), "data.name=voc",
                     "data.root=nowhere", "data.num_classes=5"], capsys)
    assert "nowhere" in message


def test_data_check_lists_every_bad_file(tmp_path, capsys):
    from toco.data.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "data", n_train=4, n_val=2, size=16, num_classes=5, seed=0)
    (root / "JPEGImages" / "synth_train_000001.png").write_bytes(b"broken")
    (root / "SegmentationClassAug" / "synth_val_000000.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", "experiments/synthetic.yaml", f"data.root={root}"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    bad = [line for line in captured.err.splitlines() if line.startswith("bad: ")]
    assert len(bad) == 2 and "synth_train_000001.png" in bad[0] and "synth_val_000000.png" in bad[1]
    assert "train: 3 of 4 samples OK" in captured.out and "val: 1 of 2 samples OK" in captured.out


def test_data_synth_checks_its_arguments_before_making_folders(tmp_path, capsys):
    out = tmp_path / "synth"
    assert "num_classes" in cli_user_error(["data", "synth", "--out", str(out), "--num-classes", "500"], capsys)
    assert "size" in cli_user_error(["data", "synth", "--out", str(out), "--size", "8"], capsys)
    assert ">= 0" in cli_user_error(["data", "synth", "--out", str(out), "--train", "-1"], capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv", [["data", "synth", "--out", "OUT"], ["export-encoder", "in.pt", "OUT"]])
def test_a_command_that_reads_no_config_refuses_overrides(argv, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    message = cli_user_error([*argv, "bogus.key=1"], capsys)
    assert "takes no key=value overrides" in message and "bogus.key=1" in message
    assert not (tmp_path / "out").exists()


def test_train_never_replaces_an_earlier_run_unasked(store, tiny_cfg, capsys):
    """A second training into the same output_dir needs --resume or --overwrite; --overwrite starts a new run whose
    id replaces the earlier one's, and with tracking off leaves no earlier id behind."""
    main(["train", str(store)])
    folder = Path(tiny_cfg.output_dir)
    first_id = (folder / "mlflow_run_id").read_text().strip()
    first = (folder / "last.pt").read_bytes()
    message = cli_user_error(["train", str(store)], capsys)
    assert f"output_dir {folder} holds an earlier run's checkpoints (last.pt, best.pt)" in message
    assert "--resume" in message and "--overwrite" in message
    assert (folder / "last.pt").read_bytes() == first and len(_runs(tiny_cfg)) == 1  # untouched, no run opened
    main(["train", str(store), "--overwrite"])
    assert (folder / "mlflow_run_id").read_text().strip() not in ("", first_id) and len(_runs(tiny_cfg)) == 2
    main(["train", str(store), "--overwrite", "tracking.enabled=false"])
    assert not (folder / "mlflow_run_id").exists()  # an untracked run files nothing under the earlier run


def test_toco_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "toco.cli", "config", "show", str(tmp_path / "missing.yaml")]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "does not exist" in plain.stderr
    debug = subprocess.run(command, capture_output=True, text=True, env={**__import__("os").environ,
                                                                          "TOCO_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_version_and_the_resolved_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("toco ")
    main(["config", "show", "experiments/synthetic.yaml", "optim.lr=0.001"])
    import yaml

    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 0.001 and shown["model"]["pooling"] == "gap"
    assert Path(shown["model"]["pretrained_file"]).is_absolute()


def test_every_flag_has_help_and_enumerated_flags_have_choices():
    from toco.cli import build_parser

    def walk(parser):
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):  # subcommands
                for sub in action.choices.values():
                    yield from walk(sub)
            elif action.dest != "help":
                yield parser.prog, action

    actions = list(walk(build_parser()))
    assert len(actions) > 40
    for prog, action in actions:
        assert action.help, f"{prog} {action.option_strings or action.dest} has no help text"
    crf_backend = next(a for p, a in actions if "--crf-backend" in a.option_strings)
    assert set(crf_backend.choices) == {"auto", "cpu", "cuda", "pydensecrf", "exact"}


def test_runs_compares_configurations_over_their_seeds(tmp_path, capsys):
    """`toco runs` groups training runs by config keys into mean ± sample std over seeds, leaves evaluations out,
    filters with MLflow's syntax, and exports CSV without replacing a file unasked."""
    import csv

    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("ablation", artifact_location=(tmp_path / "artifacts").as_uri())
    for ctc, seed, seg in [("True", 0, 0.70), ("True", 1, 0.74), ("True", 2, 0.72), ("False", 0, 0.60),
                           ("False", 1, 0.62)]:
        run = client.create_run(experiment, run_name=f"ctc {ctc} seed {seed}")
        client.log_param(run.info.run_id, "loss.use_ctc", ctc)
        client.log_param(run.info.run_id, "train.seed", str(seed))
        client.log_metric(run.info.run_id, "val/miou_seg", 0.1, step=1)  # an earlier validation: not the last
        client.log_metric(run.info.run_id, "val/miou_seg", seg, step=2)
        client.set_terminated(run.info.run_id)
    evaluation = client.create_run(experiment, run_name="eval", tags={"kind": "evaluation"})
    client.log_metric(evaluation.info.run_id, "val/miou_seg", 0.0)
    store = f"tracking.tracking_uri={uri}"

    main(["runs", "--experiment", "ablation", "--group-by", "loss.use_ctc", "--metrics", "val/miou_seg", store])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| loss.use_ctc | runs | seeds | val/miou_seg |"
    assert lines[2:] == ["| True | 3 | 0 1 2 | 0.7200 ± 0.0200 |", "| False | 2 | 0 1 | 0.6100 ± 0.0141 |"]
    main(["runs", "--filter", "params.loss.use_ctc = 'False'", "--metrics", "val/miou_seg", store])
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()[2:]] == [
        "| ctc False seed 0", "| ctc False seed 1"]
    out = tmp_path / "table.csv"
    main(["runs", "--group-by", "loss.use_ctc", "train.seed", "--format", "csv", "--out", str(out), store])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and rows[0]["val/miou_seg"] == "0.7000" and rows[0]["val/miou_cam"] == "-"
    assert "--overwrite" in cli_user_error(["runs", "--out", str(out), store], capsys)
    assert "no experiment nope" in cli_user_error(["runs", "--experiment", "nope", store], capsys)
