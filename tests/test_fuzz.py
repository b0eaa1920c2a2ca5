"""Property-based tests of the promise of toco/cli.py: whatever a user types ends in success or in one line and exit
status 2, before any run is opened; never a traceback, never a FAILED run (hypothesis draws the input)."""
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TINY_RUN
from toco.cli import main
from toco.config import RANGES, Config, flatten, load_config, save_config

KEYS = sorted(flatten(Config())) + ["optim.lrr", "train", "bogus.key", "data.num_classes.x",
                                    "model.backbone_kwargs.depth"]
# YAML text as a user might type it: numbers of every size and sign, specials, lists, mappings, broken syntax
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "no", "[]", "[1, 2]", "[0.5, -1]", "{a: 1}", "[", "{", "-", "1e-3", ".nan",
                     "-.inf", "'x'", "", "~", "[[1]]", "gap", "fp16", "cuda", "voc"]),
    st.text(max_size=8),
)
OVERRIDES = st.lists(st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4)


def outcome(argv: list[str], capsys) -> str:
    """'ok', or the one line a user error printed; anything else (a traceback) fails the test with the draw."""
    capsys.readouterr()  # what earlier draws printed
    try:
        main(argv)
        return "ok"
    except SystemExit as exit_info:
        err = capsys.readouterr().err
        assert exit_info.code == 2 and "Traceback" not in err, err
        lines = [line for line in err.strip().splitlines() if line.startswith("toco ")]
        assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
        return lines[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=OVERRIDES)
def test_any_override_resolves_or_is_one_line(overrides, capsys):
    """Every config key, and some that are not, with any YAML value: a resolved config or one line naming it."""
    result = outcome(["config", "show", "experiments/synthetic.yaml", *overrides], capsys)
    if result != "ok":
        assert result.startswith("toco config: "), result


# numeric keys of the training at the edges of their ranges and beyond: small values only, so that every training
# that starts ends in seconds
TRAIN_KEYS = sorted(k for k in RANGES if k.split(".")[0] in ("data", "model", "loss", "pseudo", "optim", "train")
                    and k not in ("data.synth_train", "data.synth_val", "train.threads"))
SMALL = st.sampled_from(["-1", "0", "1", "2", "3", "0.5", "1.5", "[1]", "[0]", "[1, 2]", "[2, 1]", "null"])


# 8 trainings in `make test`; FUZZ_TRAININGS=200 searches longer (200 passed on the 2-core Xeon in 4 min), as
# FUZZ_COMMANDS=150 does for the command lines below (300 passed over two seeds)
@settings(max_examples=int(os.environ.get("FUZZ_TRAININGS", 8)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.tuples(st.sampled_from(TRAIN_KEYS), SMALL).map(lambda kv: f"{kv[0]}={kv[1]}"),
                          min_size=1, max_size=3))
def test_any_training_override_trains_or_fails_before_a_run(overrides, tmp_path_factory, capsys):
    """A tiny training with drawn overrides either finishes (a FINISHED run) or stops with one line before any
    MLflow run is opened: a value that breaks the training is caught by the checks, not by a crash mid-run."""
    import mlflow

    folder = tmp_path_factory.mktemp("fuzz")
    cfg = load_config("experiments/synthetic.yaml", TINY_RUN + ["train.max_iters=2", "train.eval_every=2"])
    cfg.tracking.tracking_uri = f"sqlite:///{folder}/mlflow.db"
    cfg.tracking.artifact_root, cfg.output_dir = str(folder / "artifacts"), str(folder / "run")
    save_config(cfg, folder / "tiny.yaml")
    result = outcome(["train", str(folder / "tiny.yaml"), *overrides], capsys)
    runs = []
    if Path(folder / "mlflow.db").exists():
        client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if result == "ok":
        assert [r.info.status for r in runs] == ["FINISHED"]
    else:
        assert result.startswith("toco train: ") and runs == [], (result, [r.info.status for r in runs])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training's folder (its config beside last.pt) and two image files to predict."""
    from PIL import Image

    from toco.data.synthetic import generate_sample

    folder = tmp_path_factory.mktemp("trained")
    cfg = load_config("experiments/synthetic.yaml", TINY_RUN + ["train.max_iters=2", "train.eval_every=2",
                                                                "tracking.enabled=false"])
    cfg.output_dir = str(folder / "run")
    save_config(cfg, folder / "tiny.yaml")
    main(["train", str(folder / "tiny.yaml")])
    main(["train", str(folder / "tiny.yaml"), "tracking.enabled=true", f"output_dir={folder}/tracked",  # for runs
          f"tracking.tracking_uri=sqlite:///{folder}/mlflow.db", f"tracking.artifact_root={folder}/artifacts"])
    (folder / "images").mkdir()
    for i in range(2):
        Image.fromarray(generate_sample(0, i, 32, 5, "val")[0]).save(folder / "images" / f"img{i}.png")
    return folder


NUMBER = st.sampled_from(["-1", "0", "1", "2", "3", "x", "1.5"])
EVAL_FLAGS = {"--split": st.sampled_from(["val", "train", "test", "nope"]), "--limit": NUMBER, "--resize": NUMBER,
              "--shard-size": NUMBER, "--ms": None, "--crf": None, "--pseudo": None, "--save-pred": None,
              "--save-probs": None, "--resume": None, "--crf-backend": st.sampled_from(["cpu", "exact", "gpu"])}
PREDICT_FLAGS = {"--max-side": NUMBER, "--shard-size": NUMBER, "--ms": None, "--resume": None}
RUNS_FLAGS = {"--experiment": st.sampled_from(["toco-synthetic", "nope", "Default"]),
              "--group-by": st.sampled_from(["loss.use_ctc", "train.seed", "nope.key", "model.backbone_kwargs"]),
              "--metrics": st.sampled_from(["val/miou_seg", "nope"]), "--format": st.sampled_from(["md", "csv", "x"]),
              "--filter": st.sampled_from(["params.train.seed = '0'", "status = 'FINISHED'", "params.x ==", "bogus",
                                           "metrics.`val/miou_seg` > 0"]),
              "--overwrite": None}
SYNTH_FLAGS = {"--train": NUMBER, "--val": NUMBER, "--size": st.sampled_from(["8", "16", "-1", "x"]),
               "--num-classes": st.sampled_from(["1", "2", "5", "82", "83", "x"]), "--seed": NUMBER}


def flags(table: dict) -> st.SearchStrategy:
    """Some of the command's flags, each with a drawn value."""
    def one(name):
        return st.just([name]) if table[name] is None else table[name].map(lambda v: [name, v])
    return st.lists(st.sampled_from(sorted(table)), unique=True, max_size=4).flatmap(
        lambda names: st.tuples(*(one(n) for n in names)).map(lambda parts: [a for p in parts for a in p]))


@settings(max_examples=int(os.environ.get("FUZZ_COMMANDS", 15)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["eval", "predict", "synth", "runs"]), data=st.data(),
       out=st.sampled_from(["fresh", "images", "run", "none"]))
def test_any_command_line_succeeds_or_is_one_line(command, data, out, trained, tmp_path_factory, capsys):
    """eval, predict, data synth and runs with drawn flags and outputs (a fresh one, the input images' folder, the
    training's folder, none): the work is done, or one line says what is wrong; no input image or checkpoint is
    ever replaced."""
    fresh = tmp_path_factory.mktemp("out")
    folder = {"fresh": fresh / "out", "images": trained / "images", "run": trained / "run", "none": None}[out]
    checkpoint = ["--checkpoint", str(trained / "run" / "last.pt")]
    before = {p: p.read_bytes() for p in [*(trained / "images").glob("*.png"), trained / "run" / "last.pt"]}
    if command == "eval":
        argv = ["eval", str(trained / "tiny.yaml"), *checkpoint, *data.draw(flags(EVAL_FLAGS))]
    elif command == "predict":
        argv = ["predict", str(trained / "images"), *checkpoint, *data.draw(flags(PREDICT_FLAGS))]
    elif command == "runs":
        argv = ["runs", *data.draw(flags(RUNS_FLAGS)), f"tracking.tracking_uri=sqlite:///{trained}/mlflow.db"]
        folder = folder and (folder / "table.md" if out == "fresh" else folder)  # a file, or a folder in its place
    else:
        argv = ["data", "synth", *data.draw(flags(SYNTH_FLAGS))]
    argv += ["--out", str(folder)] if folder else []
    result = outcome(argv, capsys)
    assert result == "ok" or result.startswith(f"toco {command}" if command != "synth" else "toco data"), result
    assert {p: p.read_bytes() for p in before} == before
