import dataclasses
import os
import re

import pytest
from pathlib import Path

from toco.config import Config, ConfigError, absolute_paths, flatten, load_config, save_config


def test_defaults_are_the_papers_voc_values():
    cfg = Config()
    assert (cfg.pseudo.bkg_thre, cfg.pseudo.high_thre, cfg.pseudo.low_thre) == (0.5, 0.7, 0.25)
    assert (cfg.loss.w_ptc, cfg.loss.w_ctc, cfg.loss.w_seg, cfg.loss.w_reg) == (0.2, 0.5, 0.1, 0.05)
    assert cfg.optim.lr == 6e-5 and cfg.optim.warmup_iters == 1500 and cfg.train.max_iters == 20000
    assert cfg.pseudo.cam_scales == (1.0, 0.5, 1.5) and cfg.pseudo.par_dilations == (1, 2, 4, 8, 12, 24)


@pytest.mark.parametrize("name", ["voc_vit_b", "voc_deit_b", "coco_vit_b", "coco_deit_b", "synthetic"])
def test_shipped_configs_load(name):
    cfg = load_config(f"experiments/{name}.yaml")
    assert cfg.data.num_classes == {"voc": 21, "coco": 81, "synthetic": 5}[cfg.data.name]


def test_coco_inherits_and_overrides():
    cfg = load_config("experiments/coco_deit_b.yaml")
    assert cfg.model.backbone.startswith("deit_base_patch16_224")
    assert (cfg.pseudo.bkg_thre, cfg.pseudo.high_thre) == (0.45, 0.65)
    assert (cfg.loss.seg_start, cfg.loss.ptc_ctc_start, cfg.loss.ctc_temperature) == (8000, 12000, 1.0)
    assert cfg.train.max_iters == 80000 and cfg.train.batch_size == 8


def test_overrides_are_typed_yaml_scalars():
    cfg = load_config("experiments/synthetic.yaml", ["optim.lr=1e-3", "pseudo.cam_scales=[1.0, 2]",
                                                     "data.root=null", "train.max_iters=7"])
    assert cfg.optim.lr == 1e-3 and cfg.pseudo.cam_scales == (1.0, 2.0)
    assert cfg.data.root is None and cfg.train.max_iters == 7


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr"),
    ("optim.lr=fast", "optim.lr"),
    ("train.max_iters=1.5", "train.max_iters"),
    ("data=3", "data"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("nonsense", "key=value"),
    ("model.pooling=max", "model.pooling': 'max' is not one of"),
    ("loss.reg_backend=gpu", "loss.reg_backend"),
    ("train.device=tpu", "train.device"),
    ("loss.reg_scale=0.5", "it is now 'loss.reg_downscale'"),
    ("optim.lr=[1", "not a YAML scalar"),
])
def test_bad_keys_and_types_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("experiments/synthetic.yaml", [override])


def test_a_dotted_key_inside_a_mapping_sets_that_key_only():
    cfg = load_config("experiments/synthetic.yaml", ["model.backbone_kwargs.embed_dim=64"])
    assert cfg.model.backbone_kwargs == {"img_size": 96, "embed_dim": 64, "depth": 3, "num_heads": 4}
    cfg = load_config("experiments/synthetic.yaml", ["model.backbone_kwargs={depth: 2, qkv_bias: false}"])
    assert cfg.model.backbone_kwargs == {"img_size": 96, "embed_dim": 128, "depth": 2, "num_heads": 4,
                                         "qkv_bias": False}


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "'train.batch_size': 0 is out of range; it must be >= 1"),
    ("train.max_iters=-5", "'train.max_iters': -5 is out of range; it must be >= 1"),
    ("pseudo.bkg_thre=1.5", "'pseudo.bkg_thre': 1.5 is out of range; it must be in [0, 1]"),
    ("train.ema_decay=1", "'train.ema_decay': 1.0 is out of range; it must be in [0, 1)"),
    ("loss.ctc_temperature=0", "'loss.ctc_temperature': 0.0 is out of range; it must be > 0"),
    ("pseudo.cam_scales=[1.0, -2]", "must be > 0 for every element"),
    ("inference.scales=[1.0, 0]", "'inference.scales': (1.0, 0.0) is out of range; it must be > 0 for every element"),
    ("inference.resize=0", "'inference.resize': 0 is out of range; it must be >= 1"),
    ("data.rescale_range=[2.0, 1.0]", "low <= high"),
    ("pseudo.low_thre=0.8", "the low threshold must not exceed the high one"),
])
def test_a_value_out_of_its_range_fails_naming_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("experiments/synthetic.yaml", [override])


@pytest.mark.parametrize("override", ["train.batch_size=1", "train.ema_decay=0", "pseudo.bkg_thre=1.0",
                                      "pseudo.bkg_thre=0", "loss.w_ctc=0", "inference.resize=null",
                                      "train.final_val_limit=null", "model.aux_layer=-2"])
def test_the_ends_of_a_range_are_accepted(override):
    load_config("experiments/synthetic.yaml", [override])


def test_every_numeric_key_has_a_range_or_is_declared_unbounded():
    """A key added without a range would let a negative batch or a zero temperature reach the training."""
    import typing

    from toco.config import RANGES, UNBOUNDED

    def numeric(tp) -> bool:
        return tp in (int, float) or any(numeric(arg) for arg in typing.get_args(tp) if arg is not Ellipsis)

    keys = set()
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.default_factory if section.default_factory is not dataclasses.MISSING
                                    else None):
            hints = typing.get_type_hints(section.default_factory)
            keys |= {f"{section.name}.{name}" for name, tp in hints.items() if numeric(tp)}
    assert keys - set(RANGES) - UNBOUNDED == set()
    assert set(RANGES) | UNBOUNDED <= keys  # and no range for a key that is gone


def test_an_unknown_dataset_fails_before_a_run_naming_the_key_and_the_known_ones():
    """Datasets are entries of one registry (toco.data.DATASETS); the run's checks reject any other name."""
    from toco.data import DATASETS, DatasetError
    from toco.run import check_before_run

    with pytest.raises(DatasetError, match=r"data\.name: unknown dataset 'cityscapes' \(voc \| coco \| synthetic\)"):
        check_before_run(load_config("experiments/synthetic.yaml", ["data.name=cityscapes"]))
    assert set(DATASETS) == {"voc", "coco", "synthetic"}


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  w_ptcc: 0.3\n")
    with pytest.raises(ConfigError, match="loss.w_ptcc"):
        load_config(bad)


def test_config_strings_are_never_evaluated(tmp_path):
    cfg = load_config(None, ["output_dir=__import__('os').getcwd()"])
    assert cfg.output_dir == "__import__('os').getcwd()"


def test_save_load_round_trip_and_flatten(tmp_path):
    cfg = load_config("experiments/synthetic.yaml", ["loss.w_ctc=0.25"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == absolute_paths(cfg)  # the saved file reads the same weights from any folder
    assert Path(again.model.pretrained_file).is_absolute() and Path(again.model.pretrained_file).is_file()
    flat = flatten(cfg)
    assert flat["loss.w_ctc"] == 0.25 and flat["model.backbone_kwargs"]["embed_dim"] == 128


def test_overrides_as_a_mapping_are_checked_like_strings():
    cfg = load_config("experiments/synthetic.yaml", {"loss.w_ptc": 0.3, "pseudo": {"cam_scales": [1, 2]}})
    assert cfg.loss.w_ptc == 0.3 and cfg.pseudo.cam_scales == (1.0, 2.0)
    with pytest.raises(ConfigError, match="loss.w_ptc"):
        load_config("experiments/synthetic.yaml", {"loss.w_ptc": "high"})


def test_input_paths_are_relative_to_the_file_that_sets_them(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "sub").mkdir(parents=True)
    (tmp_path / "cfg" / "base.yaml").write_text("data:\n  root: ../data/VOC\noutput_dir: runs/x\n")
    (tmp_path / "cfg" / "sub" / "run.yaml").write_text("base: ../base.yaml\nmodel:\n  pretrained_file: w.pt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(tmp_path / "cfg" / "sub" / "run.yaml", ["data.list_dir=lists"])
    assert cfg.data.root == os.path.normpath(tmp_path / "data" / "VOC")           # against base.yaml's folder
    assert cfg.model.pretrained_file == str(tmp_path / "cfg" / "sub" / "w.pt")     # against run.yaml's folder
    assert cfg.data.list_dir == "lists"                                            # command line: the cwd
    assert cfg.output_dir == "runs/x"                                              # outputs: the cwd


def test_a_shipped_config_loads_the_same_from_any_folder(tmp_path, monkeypatch):
    here = load_config(Path("experiments/synthetic.yaml").resolve())
    monkeypatch.chdir(tmp_path)
    there = load_config(Path(__file__).resolve().parent.parent / "experiments" / "synthetic.yaml")
    assert Path(there.model.pretrained_file).is_file() and there == here


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  w_ptc: [0.3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: not valid YAML"):
        load_config(bad)


def test_config_differences_name_each_key_a_saved_run_differs_in(tmp_path):
    from toco.config import config_differences

    cfg = load_config("experiments/synthetic.yaml", ["train.threads=1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert config_differences(cfg, tmp_path / "config.yaml") == {}
    other = load_config("experiments/synthetic.yaml", ["optim.lr=1e-3", "train.threads=2",
                                                       "model.backbone_kwargs.depth=2", "tracking.experiment=x"])
    assert config_differences(other, tmp_path / "config.yaml", ignore=("train.threads", "tracking")) == {
        "optim.lr": (1e-3, 5e-4), "model.backbone_kwargs.depth": (2, 3)}
    assert "train.threads" in config_differences(other, tmp_path / "config.yaml")


def test_a_config_toco_saved_before_a_key_was_renamed_loads_under_the_new_name(tmp_path):
    """A user's config with an old key is told the new one; a run's saved config.yaml (beside its checkpoint) is
    read under the new names, and compares equal to the config it was written from."""
    import yaml

    from toco.checkpoint import checkpoint_config
    from toco.config import config_differences

    cfg = load_config("experiments/synthetic.yaml", ["inference.resize=448"])
    save_config(cfg, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    written["data"]["test_resize"] = written["inference"].pop("resize")  # as an earlier version wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
    with pytest.raises(ConfigError, match="'data.test_resize'; it is now 'inference.resize'"):
        load_config(tmp_path / "config.yaml")
    saved = checkpoint_config(tmp_path / "last.pt")
    assert saved.inference == cfg.inference and saved.data == cfg.data
    assert config_differences(cfg, tmp_path / "config.yaml") == {}
    assert config_differences(load_config("experiments/synthetic.yaml"), tmp_path / "config.yaml") == {
        "inference.resize": (None, 448)}


def test_test_time_settings_are_the_inference_section_with_the_flags_over_it():
    from toco.cli import build_parser, inference_settings
    from toco.evaluation import MS_SCALES

    cfg = load_config("experiments/synthetic.yaml", ["inference.scales=[1.0, 1.5]", "inference.flip=true",
                                                     "inference.crf=true", "inference.resize=64",
                                                     "inference.precision=bf16"])
    parse = lambda *flags: build_parser().parse_args(["eval", "cfg.yaml", "--checkpoint", "x.pt", *flags])  # noqa: E731
    settings = inference_settings(cfg, parse())
    assert (settings.scales, settings.flip, settings.crf, settings.resize, settings.precision) == (
        (1.0, 1.5), True, True, 64, "bf16")
    settings = inference_settings(cfg, parse("--ms", "--no-crf", "--crf-backend", "exact", "--resize", "0"))
    assert (settings.scales, settings.flip, settings.crf, settings.crf_backend) == (MS_SCALES, True, False, "exact")
    assert settings.resize is None and settings.name == "ms_flip_bf16"  # --resize 0: each image at its own size
    no_ms = inference_settings(cfg, parse("--no-ms"))
    assert (no_ms.scales, no_ms.flip, no_ms.name) == ((1.0,), False, "ss_crf_resize64_bf16")
    assert inference_settings(cfg, parse()).name == "scales1-1.5_flip_crf_resize64_bf16"  # not --ms's folder
    # a photo keeps its aspect ratio: predict caps the long side, never resizes to the config's square
    predict = build_parser().parse_args(["predict", "a.png", "--checkpoint", "x.pt", "--out", "o"])
    photo = inference_settings(cfg, predict, resize=None, max_side=96)
    assert (photo.resize, photo.max_side, photo.scales, photo.crf) == (None, 96, (1.0, 1.5), True)
    # the fusion rule is the dataset's protocol (toco.data.registry), not a setting
    assert settings.fusion == "voc"
    cfg.data.name = "coco"
    assert inference_settings(cfg, parse()).fusion == "coco"
