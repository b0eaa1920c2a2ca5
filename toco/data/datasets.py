"""Dataset sources: VOC 2012, COCO 2014, the synthetic benchmark written to disk, image files (`toco predict`).

A source (the protocol `Source`) is an indexable list of samples. One sample = name, image uint8 (H,W,3) RGB,
mask uint8 (H,W) (class ids, 255 = ignore; None where a split has no masks) and cls_label float32 (C-1,) multi-hot
of the foreground classes.
Image-level labels are derived from the masks' class sets lazily, per image, and cached; `load_for_training`
returns them without the mask so the training code never sees pixel labels.

Every bad input raises `DatasetError` naming the file and what is wrong with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from toco.errors import UserError
from toco.viz import save_label_png as save_mask_png, voc_palette  # noqa: F401 (re-exported)

IGNORE_INDEX = 255

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# background + the 80 COCO "thing" categories in the standard order (category ids made contiguous 1..80)
COCO_CLASS_NAMES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

_IMAGE_EXTS = (".jpg", ".png")


class DatasetError(UserError):
    """Bad dataset input; the message names the offending file."""


@runtime_checkable
class Source(Protocol):
    """What every dataset source is (FolderSource, SyntheticSource, ImageFiles): `toco.data.registry` opens one per
    split, the training reads `load_for_training`, the evaluation and `toco predict` read `load`."""
    names: list[str]                 # one per sample, unique: what prediction files and reports are named after
    num_classes: int                 # including background
    class_names: tuple[str, ...]     # num_classes of them, background first
    has_masks: bool                  # False: `load` gives no mask and no label (VOC test, image files)

    def __len__(self) -> int: ...

    def load(self, i: int) -> "Sample":
        """Sample i whole; a bad file raises DatasetError naming it."""

    def load_for_training(self, i: int) -> "Sample":
        """Sample i without its mask (the training never sees pixel labels); DatasetError without labels."""


class Sample(NamedTuple):
    name: str
    image: np.ndarray               # uint8 (H, W, 3) RGB
    mask: np.ndarray | None         # uint8 (H, W) class ids, 255 = ignore; None without masks
    cls_label: np.ndarray | None    # float32 (C-1,) multi-hot of foreground classes; None without masks


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(C-1,) float32 multi-hot of the foreground classes present in the mask (0 and 255 excluded)."""
    present = np.unique(mask)
    present = present[(present > 0) & (present < num_classes)]
    label = np.zeros(num_classes - 1, dtype=np.float32)
    label[present.astype(np.int64) - 1] = 1.0
    return label


def read_split_list(path: Path) -> list[str]:
    """Image names of a split list. Accepts bare names or 'JPEGImages/x.jpg SegmentationClassAug/x.png' lines."""
    if not path.is_file():
        raise DatasetError(f"{path}: split list not found")
    names = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: split list is empty")
    return names


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB; grayscale / CMYK / palette images are converted."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))                 # writable copy
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError) as e:   # PIL's UnidentifiedImageError / truncated data are OSErrors
        raise DatasetError(f"{path}: unreadable or corrupt image ({e})") from e


def read_image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header only (cheap: no decoding)."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt image ({e})") from e


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """uint8 (H, W) class ids from a palette or grayscale PNG; values must be < num_classes or 255."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(f"{path}: mask must be a palette or 8-bit grayscale PNG of class ids, "
                                   f"got mode {im.mode}")
            mask = np.array(im)                                 # palette images read as their index array
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask not found") from None
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt mask ({e})") from e
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if len(bad):
        raise DatasetError(f"{path}: mask values {bad.tolist()} are not class ids (0..{num_classes - 1}) "
                           f"nor ignore ({IGNORE_INDEX})")
    return mask


class FolderSource:
    """Images and masks in folders, one split list of names.

    image_dir/<name><ext> with ext tried in the order image_exts; mask_dir/<name>.png (mask_dir None = no masks).
    """

    def __init__(self, list_path: Path, image_dir: Path, mask_dir: Path | None, class_names: tuple[str, ...],
                 image_exts: tuple[str, ...] = _IMAGE_EXTS):
        self.list_path = Path(list_path)
        self.image_dir, self.mask_dir = Path(image_dir), (Path(mask_dir) if mask_dir is not None else None)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.image_exts = tuple(image_exts)
        self.names = read_split_list(self.list_path)
        self.has_masks = self.mask_dir is not None
        self._labels: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, i: int) -> Path:
        base = self.image_dir / self.names[i]
        candidates = [base.with_name(base.name + ext) for ext in self.image_exts]
        for path in candidates:
            if path.is_file():
                return path
        raise DatasetError(f"{candidates[0]}: image not found (also tried {[str(p) for p in candidates[1:]]}; "
                           f"listed in {self.list_path})")

    def mask_path(self, i: int) -> Path | None:
        return None if self.mask_dir is None else self.mask_dir / f"{self.names[i]}.png"

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def load_mask(self, i: int, image_hw: tuple[int, int] | None = None) -> np.ndarray | None:
        """Mask checked against the image size (read from the image header if not given)."""
        path = self.mask_path(i)
        if path is None:
            return None
        if not path.is_file():
            raise DatasetError(f"{path}: mask not found (image {self.names[i]} listed in {self.list_path})")
        mask = read_mask(path, self.num_classes)
        image_hw = image_hw or read_image_size(self.image_path(i))
        if mask.shape != tuple(image_hw):
            raise DatasetError(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from its image "
                               f"{self.image_path(i)} size {image_hw[1]}x{image_hw[0]}")
        return mask

    def cls_label(self, i: int) -> np.ndarray | None:
        """Image-level label from the mask's class set, computed on first use and cached."""
        if not self.has_masks:
            return None
        if i not in self._labels:
            self._labels[i] = labels_from_mask(self.load_mask(i), self.num_classes)
        return self._labels[i]

    def load(self, i: int) -> Sample:
        image = self.load_image(i)
        mask = self.load_mask(i, image.shape[:2])
        label = None
        if mask is not None:
            label = self._labels.setdefault(i, labels_from_mask(mask, self.num_classes))
        return Sample(self.names[i], image, mask, label)

    def load_for_training(self, i: int) -> Sample:
        """Image + image-level label, never the mask."""
        label = self.cls_label(i)
        if label is None:
            raise DatasetError(f"{self.list_path}: this split has no masks, so no image-level labels to train on")
        return Sample(self.names[i], self.load_image(i), None, label)


class ImageFiles:
    """Image files as a source without masks (`toco predict`): names are the file stems, made unique."""

    def __init__(self, paths: list[str], num_classes: int, class_names):
        self.paths = [str(p) for p in paths]
        self.num_classes, self.class_names, self.has_masks = num_classes, tuple(class_names), False
        self.names, seen = [], set()
        for p in self.paths:
            name = Path(p).stem
            while name in seen:  # two inputs of the same name from different folders
                name += "_"
            seen.add(name)
            self.names.append(name)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Sample:
        return Sample(self.names[i], read_image(Path(self.paths[i])), None, None)

    def load_for_training(self, i: int) -> Sample:
        raise DatasetError(f"{self.paths[i]}: image files have no labels to train on")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_paths(items: list[str]) -> list[str]:
    """Image files from files, folders (their images, sorted) and list files (.txt, one path per line, relative
    to the list)."""
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix == ".txt":
            if not path.is_file():
                raise DatasetError(f"{path}: list file not found")
            paths += [str(path.parent / line.strip()) if not Path(line.strip()).is_absolute() else line.strip()
                      for line in path.read_text().splitlines() if line.strip()]
        else:
            paths.append(item)
    if not paths:
        raise DatasetError(f"no images in {' '.join(items)}")
    return paths


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} folder not found")
    return path


def voc_source(root: str | Path, split: str, list_dir: str | Path | None = None,
               class_names: tuple[str, ...] = VOC_CLASS_NAMES, image_exts: tuple[str, ...] = _IMAGE_EXTS
               ) -> FolderSource:
    """VOC 2012 layout: root = .../VOCdevkit/VOC2012.

    Images JPEGImages/<name>.jpg, masks SegmentationClassAug/<name>.png (falls back to SegmentationClass/),
    lists <list_dir>/<split>.txt with list_dir defaulting to root/ImageSets/Segmentation. The `test` split has no
    masks.
    """
    root = _require_dir(Path(root), "dataset root")
    list_dir = Path(list_dir) if list_dir is not None else root / "ImageSets" / "Segmentation"
    image_dir = _require_dir(root / "JPEGImages", "image")
    mask_dir = None
    if split != "test":
        mask_dir = root / "SegmentationClassAug"
        if not mask_dir.is_dir():
            mask_dir = _require_dir(root / "SegmentationClass", "mask (SegmentationClassAug / SegmentationClass)")
    return FolderSource(list_dir / f"{split}.txt", image_dir, mask_dir, class_names, image_exts)


def coco_source(root: str | Path, split: str, list_dir: str | Path | None = None) -> FolderSource:
    """COCO 2014 layout: root = .../MSCOCO.

    Images coco2014/{train2014,val2014}/<name>.jpg, masks SegmentationClass/{train2014,val2014}/<name>.png,
    lists <list_dir>/<split>.txt with list_dir defaulting to root/ImageSets. Split names starting with "train"
    read train2014, those starting with "val" (val, val_part) read val2014.
    """
    root = _require_dir(Path(root), "dataset root")
    if split.startswith("train"):
        sub = "train2014"
    elif split.startswith("val"):
        sub = "val2014"
    else:
        raise DatasetError(f"{root}: COCO split {split!r} must start with 'train' or 'val'")
    list_dir = Path(list_dir) if list_dir is not None else root / "ImageSets"
    image_dir = _require_dir(root / "coco2014" / sub, "image")
    mask_dir = _require_dir(root / "SegmentationClass" / sub, "mask")
    return FolderSource(list_dir / f"{split}.txt", image_dir, mask_dir, COCO_CLASS_NAMES)


def synthetic_folder_source(root: str | Path, split: str, list_dir: str | Path | None = None) -> FolderSource:
    """What `write_synthetic` wrote: the VOC layout with .png images and class names in root/classes.txt."""
    root = Path(root)
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DatasetError(f"{classes_file}: class name list not found")
    class_names = tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())
    if len(class_names) < 2:
        raise DatasetError(f"{classes_file}: needs background plus at least one class, got {list(class_names)}")
    return voc_source(root, split, list_dir, class_names, image_exts=(".png", ".jpg"))
