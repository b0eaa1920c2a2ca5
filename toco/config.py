"""Typed configuration: dataclasses whose defaults are the paper's VOC values (docs/method.md §1-§4).

YAML files in `experiments/` override only what differs; `key=value` overrides on the command line
(`optim.lr=1e-4`) are parsed as YAML scalars. An unknown key or a value of the wrong type fails before
any work starts, naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any, Literal

import yaml

from toco.errors import UserError


class ConfigError(UserError):
    """A config file, key or value that cannot be used."""


def input_path(default: str | None = None):
    """A path the run reads (data, weights): relative to the folder of the config file that sets it, as `base:` is;
    relative to the working directory when set on the command line."""
    return field(default=default, metadata={"input_path": True})


# keys renamed since earlier versions: a config that still uses the old name is told the new one
RENAMED = {"loss.reg_scale": "loss.reg_downscale", "loss.reg_weight": "loss.reg_energy_scale",
           "data.test_resize": "inference.resize"}


@dataclass
class DataConfig:
    name: str = "voc"                    # a dataset of toco.data.DATASETS: synthetic | voc | coco
    root: str | None = input_path()      # dataset root; synthetic with None = generated in memory
    list_dir: str | None = input_path()  # split lists (default: the dataset's own folder)
    train_split: str = "train_aug"
    val_split: str = "val"
    num_classes: int = 21                # including background
    crop_size: int = 448
    rescale_range: tuple[float, float] = (0.5, 2.0)
    local_crop_size: int = 96            # CTC local views
    num_local_crops: int = 8
    val_size: int = 448                  # in-training validation (and its CAMs) resize to this square side
    num_workers: int = 2
    synth_size: int = 96                 # synthetic generator: image side, split sizes, seed
    synth_train: int = 2000
    synth_val: int = 200
    synth_seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k"  # any timm ViT / DeiT name
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. embed_dim/depth for the tiny CPU model
    pretrained: bool = True
    pretrained_file: str | None = input_path()  # local weights; None + pretrained = timm hub (needs network)
    conv_stem: tuple[int, ...] = ()     # channels of a stride-2 conv stem before the ViT (tiny CPU model)
    pooling: Literal["gmp", "gap"] = "gmp"  # image score from max (the paper) or mean pooled tokens
    attention_window: int = 0            # 0: global attention (the paper); k: patches attend within k tokens
    aux_layer: int = -3                  # block whose tokens feed the auxiliary classifier (10th of 12)
    decoder_channels: int = 512
    decoder_dilation: int = 5
    proj_hidden: int = 2048
    proj_bottleneck: int = 256
    proj_out: int = 1024
    freeze_pos_embed: bool = True        # the original keeps the position table frozen
    pos_embed_antialias: bool = False    # resample the position table as timm does (antialiased bicubic);
                                         # false: as the original (bicubic, no antialiasing)
    token_classifier: bool = False       # a linear classifier on the class token, trained with the others (the
                                         # synthetic pretext stage: ImageNet pre-training trains the class token)


@dataclass
class LossConfig:
    w_ptc: float = 0.2
    w_ctc: float = 0.5
    w_seg: float = 0.1
    w_reg: float = 0.05
    ctc_temperature: float = 0.5
    ema_momentum: float = 0.9
    use_ptc: bool = True                 # ablations switch whole terms off
    use_ctc: bool = True
    seg_start: int = 2000                # seg + reg join after this iteration (VOC)
    ptc_ctc_start: int = 0               # COCO: 12000
    cam_source_until: int = 0            # COCO: seg labels from aux-CAM before this iteration (8000->12000)
    reg_sigma_rgb: float = 15.0          # DenseCRF loss: colour and position kernel widths (0-255 RGB, pixels)
    reg_sigma_xy: float = 100.0
    reg_downscale: float = 0.5           # image and probabilities are resized by this before the filter
    reg_energy_scale: float = 1e-7       # the original's factor inside the loss layer (w_reg weights it outside)
    reg_backend: Literal["auto", "cpu", "cuda", "exact"] = "auto"  # bilateral filter (toco.filters)


@dataclass
class PseudoConfig:
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    bkg_thre: float = 0.5
    high_thre: float = 0.7
    low_thre: float = 0.25
    uncertain_ratio: float = 0.2         # CTC local crop is negative at or below this share ...
    ctc_negative_rule: Literal["uncertain", "not_background", "original"] = "original"  # ... of these
                                         # pixels (toco.pseudo.crop_from_roi; docs/deviations.md)
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_iters: int = 10


@dataclass
class OptimConfig:
    lr: float = 6e-5
    head_lr_mult: float = 10.0           # classifiers, projection head, decoder
    decoder_lr_mult: float | None = None  # the decoder's own multiplier; None: head_lr_mult (the paper)
    decoder_warmup_iters: int = 0        # the decoder's lr ramps up linearly over this many iterations from
                                         # loss.seg_start, where its loss starts (0: no ramp, the paper)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 0.9
    waiting_heads: Literal["step", "frozen"] = "step"  # heads whose loss has not started: AdamW steps them with
                                         # zero gradients (the original) or leaves them untouched until it starts


@dataclass
class TrainConfig:
    max_iters: int = 20000
    batch_size: int = 4                  # global batch (the paper: 2 GPUs x 2)
    eval_every: int = 2000
    log_every: int = 200
    ckpt_every: int = 2000
    seed: int = 0
    # one source of randomness can take a seed of its own (None: train.seed), to measure what each contributes
    # to the spread over seeds (docs/benchmarks.md)
    init_seed: int | None = None         # the heads' initial weights
    order_seed: int | None = None        # the order of the training images
    augment_seed: int | None = None      # each sample's augmentation
    crop_seed: int | None = None         # the CTC local crops' positions
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0                     # torch CPU threads; 0 = torch's default
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: the network under autocast, losses and filters in fp32
    compile: bool = False                # torch.compile the encoder (training only)
    val_limit: int = 0                   # validate on the first N val images; 0 = all
    final_val_limit: int | None = None   # the last validation's N (0 = all; None: val_limit): a cheap mid-run
                                         # validation, a large final one
    val_metrics: tuple[Literal["seg", "cam", "aux_cam", "cam_par", "aux_cam_par", "cls"], ...] = (
        "seg", "cam", "aux_cam", "cls")  # what validation scores (docs/evaluation.md); cam_par: the pseudo labels
    val_split: str | None = None         # split validated on during training; None = data.val_split
    ema_decay: float = 0.0               # > 0: validate and keep an exponential moving average of the weights

    @property
    def last_val_limit(self) -> int:
        """How many val images the last validation scores (0: all)."""
        return self.val_limit if self.final_val_limit is None else self.final_val_limit

    def seed_of(self, source: Literal["init", "order", "augment", "crop"]) -> int:
        value = getattr(self, f"{source}_seed")
        return self.seed if value is None else value


@dataclass
class InferenceConfig:
    """How `toco eval` and `toco predict` segment an image (docs/evaluation.md); their flags override these. How
    the scales and flips are fused is the dataset's protocol (toco.data.registry)."""
    scales: tuple[float, ...] = (1.0,)   # --ms: the paper's 1.0, 1.25, 1.5 with flips
    flip: bool = False
    crf: bool = False                    # DenseCRF post-processing (--crf)
    crf_backend: Literal["auto", "cpu", "cuda", "pydensecrf", "exact"] = "auto"
    resize: int | None = None            # every image resized to this square side first (COCO: 448); None = native
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the network under autocast; fusion, softmax, the CRF
                                         # and the metrics in fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"      # auto: the GPU when there is one


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "toco"
    run_name: str | None = None
    enabled: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "runs/default"
    description: str = ""                # one line saying what this experiment is: its MLflow run's description,
                                         # its row in `toco ablation`
    legacy_bugs: bool = False            # reproduce the original code's four bugs (docs/deviations.md)

    @property
    def validation_split(self) -> str:
        """The split in-training validation scores: train.val_split, else data.val_split."""
        return self.train.val_split or self.data.val_split


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take (each element's, for a list): low/high None = unbounded."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False               # low itself is excluded
    high_open: bool = False

    def holds(self, value: float) -> bool:
        return ((self.low is None or value > self.low or (value == self.low and not self.low_open))
                and (self.high is None or value < self.high or (value == self.high and not self.high_open)))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


COUNT, POSITIVE_INT, POSITIVE, NONNEGATIVE = Range(0), Range(1), Range(0, low_open=True), Range(0)
FRACTION, FRACTION_BELOW_1 = Range(0, 1), Range(0, 1, high_open=True)
# every numeric key with a range (tests/test_config.py checks that each numeric key is here or in UNBOUNDED):
# a value outside fails when it is set, naming the key, before any work starts
RANGES = {
    "data.num_classes": Range(2), "data.crop_size": POSITIVE_INT, "data.rescale_range": POSITIVE,
    "data.local_crop_size": POSITIVE_INT, "data.num_local_crops": POSITIVE_INT, "data.val_size": POSITIVE_INT,
    "data.num_workers": COUNT, "data.synth_size": Range(16),
    "data.synth_train": COUNT, "data.synth_val": COUNT, "data.synth_seed": COUNT,
    "model.conv_stem": POSITIVE_INT, "model.attention_window": COUNT, "model.decoder_channels": POSITIVE_INT,
    "model.decoder_dilation": POSITIVE_INT, "model.proj_hidden": POSITIVE_INT,
    "model.proj_bottleneck": POSITIVE_INT, "model.proj_out": POSITIVE_INT,
    "loss.w_ptc": NONNEGATIVE, "loss.w_ctc": NONNEGATIVE, "loss.w_seg": NONNEGATIVE, "loss.w_reg": NONNEGATIVE,
    "loss.ctc_temperature": POSITIVE, "loss.ema_momentum": FRACTION, "loss.seg_start": COUNT,
    "loss.ptc_ctc_start": COUNT, "loss.cam_source_until": COUNT, "loss.reg_sigma_rgb": POSITIVE,
    "loss.reg_sigma_xy": POSITIVE, "loss.reg_downscale": Range(0, 1, low_open=True),
    "loss.reg_energy_scale": NONNEGATIVE,
    "pseudo.cam_scales": POSITIVE, "pseudo.bkg_thre": FRACTION, "pseudo.high_thre": FRACTION,
    "pseudo.low_thre": FRACTION, "pseudo.uncertain_ratio": FRACTION, "pseudo.par_dilations": POSITIVE_INT,
    "pseudo.par_iters": COUNT,
    "optim.lr": POSITIVE, "optim.head_lr_mult": NONNEGATIVE, "optim.decoder_lr_mult": NONNEGATIVE,
    "optim.decoder_warmup_iters": COUNT, "optim.weight_decay": NONNEGATIVE, "optim.betas": FRACTION_BELOW_1,
    "optim.eps": POSITIVE, "optim.warmup_iters": COUNT, "optim.warmup_ratio": Range(0, 1, low_open=True),
    "optim.power": NONNEGATIVE,
    "train.max_iters": POSITIVE_INT, "train.batch_size": POSITIVE_INT, "train.eval_every": POSITIVE_INT,
    "train.log_every": POSITIVE_INT, "train.ckpt_every": POSITIVE_INT, "train.seed": COUNT,
    "train.init_seed": COUNT, "train.order_seed": COUNT, "train.augment_seed": COUNT, "train.crop_seed": COUNT,
    "train.threads": COUNT, "train.val_limit": COUNT, "train.final_val_limit": COUNT,
    "train.ema_decay": FRACTION_BELOW_1,
    "inference.scales": POSITIVE, "inference.resize": POSITIVE_INT,
}
UNBOUNDED = {"model.aux_layer"}  # a negative block index counts from the last block (checked by the model)


def _check_range(key: str, value: Any) -> None:
    allowed = RANGES.get(key)
    values = value if isinstance(value, tuple) else (value,)
    if allowed and any(isinstance(v, (int, float)) and not isinstance(v, bool) and not allowed.holds(v)
                       for v in values):
        raise ConfigError(f"config key {key!r}: {value!r} is out of range; it must be {str(allowed)}"
                          + (" for every element" if isinstance(value, tuple) else ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r}: {value!r} is not of type {tp}")
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
    return value


def _apply(obj: Any, updates: dict, folder: Path | None, prefix: str = "") -> None:
    """Set `updates` (a nested mapping) on the dataclass `obj`; input paths relative to `folder` (None: as given)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in fields:
            hint = f"; it is now {RENAMED[path]!r}" if path in RENAMED else f"; known keys here: {sorted(fields)}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; expected a mapping, got {value!r}")
            _apply(current, value, folder, path + ".")
            continue
        value = _coerce(value, hints[key], path)
        if isinstance(current, dict):  # a mapping value merges key by key, as a section does (a.b.c=1 sets c only)
            value = {**current, **value}
        _check_range(path, value)
        if fields[key].metadata.get("input_path") and value and folder is not None and not Path(value).is_absolute():
            value = os.path.normpath(folder / value)
        setattr(obj, key, value)


def _nest(overrides: list[str] | dict) -> dict:
    """`key=value` strings (values read as YAML scalars, never evaluated as code) or a mapping of dotted keys to
    values -> one nested mapping."""
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    nested: dict = {}
    for key, value in items:
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} sets a key inside a value, not a section")
        node[parts[-1]] = value
    return nested


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> {dotted key: value}, values read as YAML scalars or lists."""
    return dict(_split_override(item) for item in items)


def apply_mapping(obj: Any, mapping: dict) -> None:
    """Set a nested mapping on a dataclass with the config's checks: unknown keys and wrong types raise
    ConfigError naming the key (the sweep spec reads itself with it)."""
    _apply(obj, mapping, None)


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]  # a ReaderError has no `problem`
        raise ConfigError(f"override {item!r}: the value is not a YAML scalar or list ({reason})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                saved: bool = False) -> Config:
    """Defaults <- YAML file (with optional `base:` chain) <- overrides.

    overrides: `key=value` strings as on the command line (`["optim.lr=1e-4"]`), or a mapping of dotted keys to
    values (`{"optim.lr": 1e-4}`); either way every key and type is checked. `saved`: the file is a config.yaml
    toco wrote beside a checkpoint, whose keys renamed since (RENAMED) are read under their new names.
    """
    cfg = Config()
    for folder, layer in _yaml_chain(Path(path)) if path else []:
        _apply(cfg, _with_new_names(layer) if saved else layer, folder)
    if overrides:
        _apply(cfg, _nest(overrides), Path("."))
    _check_together(cfg)
    return cfg


def _with_new_names(layer: dict) -> dict:
    """A nested mapping with its RENAMED keys moved to their new names."""
    flat = {RENAMED.get(key, key): value for key, value in _leaves(layer).items()}
    return _nest(flat)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested mapping's leaves."""
    if not isinstance(node, dict) or not node:
        return {prefix[:-1]: node} if prefix else {}
    return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}


def with_overrides(cfg: Config, overrides: list[str] | dict) -> Config:
    """A copy of `cfg` with `overrides` set as load_config sets them: every key, type and range checked."""
    cfg = copy.deepcopy(cfg)
    _apply(cfg, _nest(overrides), Path("."))
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """Ranges that two values make together."""
    low, high = cfg.data.rescale_range
    if low > high:
        raise ConfigError(f"config key 'data.rescale_range': {[low, high]} must be [low, high] with low <= high")
    if cfg.pseudo.low_thre > cfg.pseudo.high_thre:
        raise ConfigError(f"config keys 'pseudo.low_thre' ({cfg.pseudo.low_thre}) and 'pseudo.high_thre' "
                          f"({cfg.pseudo.high_thre}): the low threshold must not exceed the high one")


def _yaml_chain(path: Path) -> list[tuple[Path, dict]]:
    """(folder, mapping) of a YAML file and the `base:` files (relative to it) whose values it overrides."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    base = data.pop("base", None)
    chain = _yaml_chain(path.parent / base) if base else []
    return chain + [(path.parent, data)]


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """{'optim.lr': 6e-5, ...} for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "backbone_kwargs":
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(to_dict(cfg), "")
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML, its paths absolute: the file reads the same data from any folder."""
    cfg = absolute_paths(cfg)

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    with open(path, "w") as f:
        yaml.safe_dump(plain(to_dict(cfg)), f, sort_keys=False)


def config_differences(cfg: Config, saved: str | Path, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{dotted key: (cfg's value, the saved one)} for every key where a run's saved config.yaml differs from `cfg`
    as save_config would write it; keys under an `ignore` prefix ("tracking", "train.threads") are not compared.
    Empty: the folder trained this config."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / "config.yaml")
        ours = _leaves(yaml.safe_load((Path(tmp) / "config.yaml").read_text()))
    written = _leaves(yaml.safe_load(Path(saved).read_text()) or {})
    theirs = {RENAMED.get(key, key): value for key, value in written.items()}
    skipped = lambda key: any(key == p or key.startswith(p + ".") for p in ignore)  # noqa: E731
    return {key: (ours.get(key), theirs.get(key)) for key in sorted(ours.keys() | theirs.keys())
            if not skipped(key) and ours.get(key, ...) != theirs.get(key, ...)}


def absolute_paths(cfg: Config, base: str | Path = ".") -> Config:
    """A copy of `cfg` whose paths (inputs, output_dir, the tracking store) are absolute, relative ones taken from
    `base`: Ray workers, Tune trials and jobs run in working directories of their own."""
    cfg = copy.deepcopy(cfg)
    absolute = lambda p: str((Path(base) / p).resolve())  # noqa: E731 (an absolute `p` stays itself)
    cfg.output_dir = absolute(cfg.output_dir)
    for section in (getattr(cfg, f.name) for f in dataclasses.fields(cfg)):
        if dataclasses.is_dataclass(section):
            for f in dataclasses.fields(section):
                if f.metadata.get("input_path") and getattr(section, f.name):
                    setattr(section, f.name, absolute(getattr(section, f.name)))
    tracking = cfg.tracking
    tracking.artifact_root = absolute(tracking.artifact_root)
    if tracking.tracking_uri.startswith("sqlite:///"):
        tracking.tracking_uri = "sqlite:///" + absolute(tracking.tracking_uri.removeprefix("sqlite:///"))
    elif "://" not in tracking.tracking_uri:  # a plain folder
        tracking.tracking_uri = absolute(tracking.tracking_uri)
    return cfg
