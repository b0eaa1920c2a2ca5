"""The datasets a config can name (`data.name`): each one's class names and how a split of it is opened. Adding a
dataset is one entry in DATASETS."""
from __future__ import annotations

from typing import Callable, NamedTuple

from toco.data.datasets import (COCO_CLASS_NAMES, VOC_CLASS_NAMES, DatasetError, Source, coco_source,
                                synthetic_folder_source, voc_source)
from toco.data.synthetic import SYNTH_CLASS_NAMES, SyntheticSource


class DatasetKind(NamedTuple):
    class_names: tuple[str, ...]  # background first; a config with fewer classes uses the first ones
    open: Callable[..., Source]   # (DataConfig, split) -> the split's source (toco.data.datasets.Source)
    fusion: str = "voc"           # the protocol's test-time fusion (toco.evaluation.inference.FUSIONS): "voc" sums
    #                               an image's and its flip's logits and takes the max over scales, "coco" the reverse


def _root(data_cfg) -> str:
    if data_cfg.root is None:
        raise DatasetError(f"data.root must be set for dataset {data_cfg.name!r}")
    return data_cfg.root


def _synthetic(data_cfg, split: str):
    """Generated in memory (root None: "train_aug"/"train" -> the train stream, "val" -> val), else the files
    `toco data synth` wrote."""
    if data_cfg.root is not None:
        return synthetic_folder_source(data_cfg.root, split, data_cfg.list_dir)
    stream = {"train_aug": "train", "train": "train", "val": "val"}.get(split)
    if stream is None:
        raise DatasetError(f"synthetic split must be train_aug, train or val, got {split!r}")
    n = data_cfg.synth_train if stream == "train" else data_cfg.synth_val
    try:
        return SyntheticSource(stream, n, data_cfg.synth_size, data_cfg.num_classes, data_cfg.synth_seed)
    except ValueError as err:  # a class count or size the generator cannot make
        raise DatasetError(f"data: {err}") from None


DATASETS = {
    "voc": DatasetKind(VOC_CLASS_NAMES, lambda d, split: voc_source(_root(d), split, d.list_dir)),
    "coco": DatasetKind(COCO_CLASS_NAMES, lambda d, split: coco_source(_root(d), split, d.list_dir), "coco"),
    "synthetic": DatasetKind(SYNTH_CLASS_NAMES, _synthetic),
}


def dataset_kind(data_cfg) -> DatasetKind:
    if data_cfg.name not in DATASETS:
        raise DatasetError(f"data.name: unknown dataset {data_cfg.name!r} ({' | '.join(DATASETS)})")
    return DATASETS[data_cfg.name]


def build_source(data_cfg, split: str) -> Source:
    """The source of `split` as a `toco.config.DataConfig` describes it; its class count must be the config's."""
    source = dataset_kind(data_cfg).open(data_cfg, split)
    if source.num_classes != data_cfg.num_classes:
        raise DatasetError(f"{data_cfg.root or data_cfg.name}: dataset has {source.num_classes} classes (incl. "
                           f"background) but data.num_classes = {data_cfg.num_classes}")
    return source


def class_names(data_cfg) -> tuple[str, ...]:
    """The configured dataset's class names without reading it (`toco predict` may run without the data)."""
    known = dataset_kind(data_cfg).class_names
    n = data_cfg.num_classes
    return known[:n] if len(known) >= n else tuple(f"class_{i}" for i in range(n))


def check_splits(data_cfg, splits) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Read every image and mask of `splits`: ({split: (readable, total)}, the messages of the bad files)."""
    from tqdm import tqdm

    counts, bad = {}, []
    for split in dict.fromkeys(splits):
        source = build_source(data_cfg, split)
        errors = 0
        for i in tqdm(range(len(source)), desc=f"check {split}", unit="img", dynamic_ncols=True, mininterval=1.0):
            try:
                source.load(i)
            except DatasetError as err:
                bad.append(str(err))
                errors += 1
        counts[split] = (len(source) - errors, len(source))
    return counts, bad
