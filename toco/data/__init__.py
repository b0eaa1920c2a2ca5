"""Data: the dataset registry, sources (VOC, COCO, synthetic, image files), training augmentation."""
from toco.data.datasets import (
    COCO_CLASS_NAMES,
    IGNORE_INDEX,
    VOC_CLASS_NAMES,
    DatasetError,
    FolderSource,
    ImageFiles,
    Sample,
    Source,
    image_paths,
    coco_source,
    labels_from_mask,
    save_mask_png,
    synthetic_folder_source,
    voc_palette,
    voc_source,
)
from toco.data.registry import DATASETS, build_source, check_splits, class_names
from toco.data.synthetic import (
    SYNTH_CLASS_NAMES,
    SyntheticSource,
    generate_sample,
    trivial_baselines,
    write_synthetic,
)
from toco.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainDataset,
    TrainTransform,
    denormalize,
    normalize,
    random_crop,
    seed_worker,
)

__all__ = [
    "COCO_CLASS_NAMES", "IGNORE_INDEX", "VOC_CLASS_NAMES", "DatasetError", "FolderSource", "ImageFiles", "Sample",
    "Source", "image_paths", "DATASETS", "build_source", "check_splits",
    "class_names",
    "coco_source", "labels_from_mask", "save_mask_png", "synthetic_folder_source", "voc_palette", "voc_source",
    "SYNTH_CLASS_NAMES", "SyntheticSource", "generate_sample", "trivial_baselines", "write_synthetic",
    "IMAGENET_MEAN", "IMAGENET_STD", "TrainDataset", "TrainTransform", "denormalize",
    "normalize", "random_crop", "seed_worker",
]
