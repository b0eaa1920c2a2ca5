"""Training augmentation (docs/method.md §4.3) and the Dataset wrappers the training loop consumes.

All randomness comes from torch's global generator (torch.rand / torch.randint and torchvision's transforms),
which DataLoader seeds per worker from its own generator: a fixed seed gives identical batches.

Deviation from the original, on purpose: the Gaussian blur radius range U(0.1, 2.0) px (PIL radius) is scaled by
crop_size / 448, so a 96-px synthetic crop is blurred as much, relative to its size, as a 448-px VOC crop.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(img) -> torch.Tensor:
    """uint8 (H,W,3) array or PIL RGB image -> (3,H,W) float32 ImageNet-normalised tensor."""
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


# the original's de-normalisation constants, 255 x the above
MEAN_255 = (123.675, 116.28, 103.53)
STD_255 = (58.395, 57.12, 57.375)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) (or (3,H,W)) normalised tensor -> same shape in 0..255 float (not clipped), in the original's
    arithmetic, x * STD_255 + MEAN_255 in x's dtype: the DenseCRF loss's image (docs/method.md §3.5). The order
    matters at the last bit: (x * std + mean) * 255 gives 1.99999988 for a pixel of 2, this gives 2."""
    mean = torch.tensor(MEAN_255, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD_255, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean


def denormalize_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The original's 8-bit image for PAR (docs/method.md §2.3): `denormalize` truncated toward zero, as its uint8
    cast does. A normalised 8-bit image comes back within (-1, 256), where the clamp changes nothing."""
    return denormalize(x).trunc().clamp(0, 255).to(torch.uint8)


def _randint(high: int) -> int:
    """Uniform int in [0, high) from torch's generator."""
    return int(torch.randint(0, high, ()).item())


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


class PILGaussianBlur:
    """DINO's blur: with probability p, PIL Gaussian blur with radius ~ U(radius_min, radius_max)."""

    def __init__(self, p: float, radius_min: float, radius_max: float):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(()).item()) >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=_uniform(self.radius_min, self.radius_max)))


def random_rescale(image: np.ndarray, scale_range: tuple[float, float]) -> np.ndarray:
    """uint8 (H,W,3) -> resized by a ratio ~ U(scale_range), PIL bilinear, to (int(r*W), int(r*H))."""
    ratio = _uniform(*scale_range)
    h, w = image.shape[:2]
    size = (max(int(ratio * w), 1), max(int(ratio * h), 1))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def random_crop(image: np.ndarray, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad to at least crop_size at a random offset, take a random crop_size window.

    Returns crop uint8 (S,S,3) and img_box int64 [h_start, h_end, w_start, w_end]: where the real image lies in
    the crop (the rest is padding).
    """
    h, w = image.shape[:2]
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    top, left = _randint(pad_h + 1), _randint(pad_w + 1)                 # image offset inside the padded canvas
    padded = np.pad(image, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
    y0, x0 = _randint(padded.shape[0] - crop_size + 1), _randint(padded.shape[1] - crop_size + 1)
    crop = padded[y0:y0 + crop_size, x0:x0 + crop_size]
    box = np.array([max(top - y0, 0), min(top + h - y0, crop_size),
                    max(left - x0, 0), min(left + w - x0, crop_size)], dtype=np.int64)
    return crop, box


class TrainTransform:
    """Main view + box, DINO global view 2 and the local-view source image for CTC.

    Fixed mode (default): the main view's horizontal flip mirrors img_box too, and local_image is an augmentation
    of the same (already flipped) crop, so ROI masks computed on the main view line up with local crops.
    legacy_bugs=True reproduces the original: the main view flips after img_box is computed (box not mirrored) and
    local_image is flipped independently.
    local_crop_size is recorded for the training step, which cuts the local crops out of local_image.
    """

    def __init__(self, crop_size: int = 448, rescale_range: tuple[float, float] = (0.5, 2.0),
                 local_crop_size: int = 96, legacy_bugs: bool = False):
        self.crop_size, self.rescale_range = crop_size, tuple(rescale_range)
        self.local_crop_size, self.legacy_bugs = local_crop_size, legacy_bugs
        r_min, r_max = 0.1 * crop_size / 448, 2.0 * crop_size / 448       # see module docstring
        jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
        gray = T.RandomGrayscale(p=0.2)
        self.main_photometric = T.Compose([jitter, gray, PILGaussianBlur(1.0, r_min, r_max)])
        self.local_photometric = T.Compose([jitter, gray, PILGaussianBlur(0.5, r_min, r_max)])
        self.global2 = T.Compose([
            T.RandomResizedCrop(crop_size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5), jitter, gray, PILGaussianBlur(0.1, r_min, r_max),
            T.RandomSolarize(128, p=0.2),
        ])
        self.flip = T.RandomHorizontalFlip(0.5)

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """image uint8 (H,W,3) RGB -> image/global2/local_image (3,S,S) float32, img_box int64 (4,)."""
        scaled = random_rescale(image, self.rescale_range)
        if torch.rand(()) < 0.5:
            scaled = scaled[:, ::-1]
        crop, box = random_crop(scaled, self.crop_size)
        s = self.crop_size
        if self.legacy_bugs:
            crop_pil = Image.fromarray(np.ascontiguousarray(crop))
            main = self.main_photometric(self.flip(crop_pil))             # box NOT mirrored
            local = self.local_photometric(self.flip(crop_pil))           # independent flip
        else:
            if torch.rand(()) < 0.5:
                crop = crop[:, ::-1]
                box = np.array([box[0], box[1], s - box[3], s - box[2]], dtype=np.int64)
            crop_pil = Image.fromarray(np.ascontiguousarray(crop))
            main = self.main_photometric(crop_pil)
            local = self.local_photometric(crop_pil)
        return {
            "image": normalize(main),                                       # (3,S,S)
            "img_box": torch.from_numpy(box),                               # (4,) int64
            "global2": normalize(self.global2(Image.fromarray(image))),     # (3,S,S)
            "local_image": normalize(local),                                # (3,S,S)
        }


class TrainDataset(Dataset):
    """Source + TrainTransform -> dict(name, image, cls_label, img_box, global2, local_image). Never the mask."""

    def __init__(self, source, transform: TrainTransform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        sample = self.source.load_for_training(i)
        out = self.transform(sample.image)
        return {"name": sample.name, "image": out["image"], "cls_label": torch.from_numpy(sample.cls_label.copy()),
                "img_box": out["img_box"], "global2": out["global2"], "local_image": out["local_image"]}


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy / random from the per-worker torch seed (reproducible batches)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
