"""Procedural WSSS benchmark: textured shapes on textured backgrounds.

A foreground class is a SHAPE and a TEXTURE together (striped disc, checkered square, ...). Every object gets two
random colours from the same distribution the background uses, so no single pixel's colour tells the class: the
network has to look at shape and texture, as in real WSSS, while training only on image-level labels.

Nine shapes and nine textures make 81 foreground classes, so the paper's datasets have a synthetic counterpart of
the same shape (VOC: 21 classes incl. background, COCO: 81). Classes are numbered so that any prefix uses every
shape and every texture about equally; with up to 9 foreground classes each shape and each texture belongs to one
class only, beyond that a class is told by its pair alone. The first six classes are the original benchmark's.

Sample `i` of a split depends only on `(seed, split, i)` (a numpy SeedSequence over those three numbers), so splits
are reproducible, independent of each other, and can be generated lazily in any order by DataLoader workers.
All sizes (object radius, texture period, background blobs) are relative to the image side.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from toco.data.datasets import Sample, labels_from_mask, save_mask_png
from toco.metrics import ConfusionMatrix

# split name -> stream id mixed into the seed; "train_aug" is the VOC name for the training list
_SPLIT_STREAM = {"train": 0, "train_aug": 0, "val": 1}

_RADIUS_RANGE = (0.15, 0.3)      # object radius / image side -> diameter 30-60% of the side
_PERIOD_RANGE = (0.09, 0.13)     # texture period / image side (about 9-12 px at 96 px)
_DARK, _LIGHT = (0.0, 90.0), (165.0, 255.0)  # per-channel ranges of an object's two texture colours
_EXTENT = 1.3                    # shapes fit in a box of +-_EXTENT radii around the centre
_FAINT_CUT = (-0.2, 0.4)         # an object's faint part lies beyond a straight cut this many radii from its centre
_FAINT_CONTRAST = (0.55, 0.75)   # the faint part's texture contrast, a fraction of the rest's (docs/synthetic.md)


# ---- shapes: (u, v) in object frame, units of the radius -> bool mask -------------------------------------------
# Objects are rotated and scaled at random, so shapes differ in outline, not in orientation or size: the least
# different pair, disc and square, still differ in 16% of their union at their best rotation and relative scale.
def _disc(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _triangle(u, v):
    # equilateral, circumradius 1.25 (inradius 0.625) so its area is close to the other shapes'
    inside = np.ones(u.shape, dtype=bool)
    for ang in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        inside &= u * np.cos(ang) + v * np.sin(ang) <= 0.625
    return inside


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.35) & (av <= 1.0)) | ((av <= 0.35) & (au <= 1.0))


def _annulus(u, v):
    rho2 = u * u + v * v
    return (rho2 >= 0.25) & (rho2 <= 1.0)


def _star(u, v):
    rho = np.sqrt(u * u + v * v)
    return rho <= 0.65 + 0.45 * np.cos(5 * np.arctan2(v, u))   # 5 tips at radius 1.1, waist 0.2


def _crescent(u, v):
    return (u * u + v * v <= 1.0) & ((u - 0.55) ** 2 + v * v >= 0.64)   # disc less a disc of radius 0.8


def _ellipse(u, v):
    return (u / 1.2) ** 2 + (v / 0.55) ** 2 <= 1.0                     # aspect 2.2: reads as elongated


def _bowtie(u, v):
    au = np.abs(u)
    return (np.abs(v) <= 0.8 * au) & (au <= 1.0)                      # two triangles meeting at their tips


# ---- textures: (a, b) in object frame, units of the texture period -> signed distance in periods ---------------
# positive = second (light) colour. Converted to a soft 0..1 mix with a ~1 px transition (no aliasing).
def _stripes(a, b):
    return np.sin(2 * np.pi * a) / (2 * np.pi)


def _checker(a, b):
    return np.sin(np.pi * a) * np.sin(np.pi * b) / np.pi


_HEX_ROW = np.sqrt(3)  # the hexagonal lattice's row pair height, in nearest-neighbour distances
_HEX_SPACING = 1.5     # neighbouring dots this many periods apart, dots about a period wide (as a checkerboard's
                       # squares); spaced 1.0-1.35 they would sit where the tessellated texture's triangles do


def _dots(a, b):
    """Light dots on a hexagonal lattice, covering half the area like the other textures. On a square lattice the
    dots were a checkerboard turned by 45 degrees at sqrt(2) times the period, a scale the benchmark draws; no
    scale or rotation makes a square lattice hexagonal."""
    a, b = a / _HEX_SPACING, b / _HEX_SPACING
    nearest = None
    for offset_a, offset_b in ((0.0, 0.0), (0.5, _HEX_ROW / 2)):   # two rectangular sub-lattices
        fa = a - offset_a - np.round(a - offset_a)
        fb = b - offset_b - _HEX_ROW * np.round((b - offset_b) / _HEX_ROW)
        dist = np.sqrt(fa * fa + fb * fb)
        nearest = dist if nearest is None else np.minimum(nearest, dist)
    return (0.371 - nearest) * _HEX_SPACING   # pi r^2 = half of the sqrt(3)/2 cell; in periods


def _rings(a, b):
    return np.sin(2 * np.pi * np.sqrt(a * a + b * b)) / (2 * np.pi)


def _zigzag(a, b):
    tri = np.abs(2 * (b - np.floor(b)) - 1)                     # triangle wave in b, 0..1
    return np.sin(2 * np.pi * (a + 0.6 * tri)) / (2 * np.pi)


def _grid(a, b):
    fa, fb = np.abs(a - np.round(a)), np.abs(b - np.round(b))
    return 0.14 - np.minimum(fa, fb)


def _rays(a, b):
    # 8 light and 8 dark wedges around the origin; rho * sin / 8 is the distance to the nearest wedge edge
    return np.sqrt(a * a + b * b) * np.sin(8 * np.arctan2(b, a)) / 8


def _mottled(a, b):
    """Irregular blobs: smooth value noise on a lattice of half a period, thresholded at 0."""
    ia, ib = np.floor(2 * a), np.floor(2 * b)
    sa, sb = 2 * a - ia, 2 * b - ib
    sa, sb = sa * sa * (3 - 2 * sa), sb * sb * (3 - 2 * sb)     # smoothstep: no creases along lattice lines
    top = _lattice_noise(ia, ib) * (1 - sa) + _lattice_noise(ia + 1, ib) * sa
    bottom = _lattice_noise(ia, ib + 1) * (1 - sa) + _lattice_noise(ia + 1, ib + 1) * sa
    return 0.5 * (top * (1 - sb) + bottom * sb)    # at 0 the noise changes by ~1 per lattice step: /2 ~ periods


def _lattice_noise(i, j):
    """A fixed pseudo-random value in -1..1 per integer lattice point (an integer hash: no state, any order)."""
    h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 0xFFFF * 2.0 - 1.0


def _triangles(a, b):
    # a checkerboard of equilateral triangles (height one period): three families of lines at 60 degrees
    h = np.sqrt(3) / 2
    return np.sin(np.pi * a) * np.sin(np.pi * (a / 2 + h * b)) * np.sin(np.pi * (a / 2 - h * b)) / np.pi


class _Shape(NamedTuple):
    name: str
    inside: Callable


class _Texture(NamedTuple):
    name: str           # the adjective in class names
    sdf: Callable
    phase_span: float   # random offset of the pattern, in periods: 1 = any phase of a periodic pattern,
    #                     0 = centred on the object (rings, rays), large = any window of an aperiodic one


_SHAPES = (
    _Shape("disc", _disc), _Shape("square", _square), _Shape("triangle", _triangle), _Shape("cross", _cross),
    _Shape("annulus", _annulus), _Shape("star", _star), _Shape("crescent", _crescent),
    _Shape("ellipse", _ellipse), _Shape("bowtie", _bowtie),
)
_TEXTURES = (
    _Texture("striped", _stripes, 1.0), _Texture("checkered", _checker, 1.0), _Texture("dotted", _dots, 1.0),
    _Texture("ringed", _rings, 0.0), _Texture("zigzag", _zigzag, 1.0), _Texture("gridded", _grid, 1.0),
    _Texture("rayed", _rays, 0.0), _Texture("mottled", _mottled, 1000.0),
    _Texture("tessellated", _triangles, 1.0),
)


def _class_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Every (shape, texture) index pair of n shapes and n textures once, diagonal by diagonal: (0,0), (1,1), ...,
    then (0,1), (1,2), ... Any prefix uses each shape and each texture equally often, give or take one, and the
    first diagonal pairs shape k with texture k: the original benchmark's classes."""
    return tuple((s, (s + d) % n) for d in range(n) for s in range(n))


# 9 x 9 pairs cover COCO's 80 classes, so no third attribute is needed (size, orientation and colour are random)
_CLASSES: tuple[tuple[_Shape, _Texture], ...] = tuple((_SHAPES[s], _TEXTURES[t]) for s, t in _class_pairs(len(_SHAPES)))

# (shape, texture) of foreground class k at index k - 1
SYNTH_CLASS_ATTRIBUTES: tuple[tuple[str, str], ...] = tuple((shape.name, tex.name) for shape, tex in _CLASSES)
SYNTH_CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(f"{t}_{s}" for s, t in SYNTH_CLASS_ATTRIBUTES)
MAX_SYNTH_CLASSES = len(SYNTH_CLASS_NAMES)


@lru_cache(maxsize=16)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear interpolation weights: field = W @ coarse @ W.T."""
    pos = np.linspace(0, grid - 1, size)                        # (size,)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(grid)[None, :]))


def _check_args(split: str, size: int, num_classes: int) -> None:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_STREAM)}, got {split!r}")
    if not 2 <= num_classes <= MAX_SYNTH_CLASSES:
        raise ValueError(f"synthetic num_classes (incl. background) must be in 2..{MAX_SYNTH_CLASSES}, "
                         f"got {num_classes}")
    if size < 16:
        raise ValueError(f"synthetic image size must be >= 16, got {size}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field + a weak wave or blotch texture, (size, size, 3) float."""
    grid = int(rng.integers(2, 5))
    up = _upsample_matrix(size, grid)
    coarse = rng.uniform(0, 255, (grid, grid, 3))
    field = (up @ coarse.transpose(2, 0, 1) @ up.T).transpose(1, 2, 0)   # (size, size, 3)

    colour_dir = rng.uniform(-1, 1, 3)                          # weak texture tints a random colour direction
    amp = rng.uniform(8, 22)
    if rng.random() < 0.5:                                      # wavy lines, longer periods than class textures
        coords = np.arange(size) / size
        yy, xx = coords[:, None], coords[None, :]               # broadcast to (size, size) below
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(0.12, 0.3)
        along = xx * np.cos(ang) + yy * np.sin(ang)
        across = -xx * np.sin(ang) + yy * np.cos(ang)
        pattern = np.sin(2 * np.pi * (along / period + 0.3 * np.sin(2 * np.pi * across / (2 * period))))
    else:                                                       # blotchy value noise
        cells = max(size // 8, 2)
        fine = _upsample_matrix(size, cells)
        pattern = fine @ rng.uniform(-1, 1, (cells, cells)) @ fine.T
    return field + amp * pattern[..., None] * colour_dir


def _object_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a light texture colour, each random in RGB: the texture's luminance pattern is what a class
    shares (so a small network trained from scratch learns it in minutes); any hue can appear anywhere, also in
    the background, so no pixel's colour tells its class."""
    return rng.uniform(*_DARK, 3), rng.uniform(*_LIGHT, 3)


def _place_centres(rng: np.random.Generator, radii: np.ndarray, size: int, tries: int = 12) -> np.ndarray:
    """Centres (n, 2) in px inside the image; objects may overlap but no object hides most of another."""
    centres = np.zeros((len(radii), 2))
    for i, r in enumerate(radii):
        cand = rng.uniform(r, size - r, (tries, 2))              # (tries, 2) y, x
        if i == 0:
            centres[i] = cand[0]
            continue
        dist = np.linalg.norm(cand[:, None, :] - centres[None, :i, :], axis=-1)    # (tries, i)
        slack = (dist / (0.75 * (r + radii[:i])[None, :])).min(axis=1)             # >= 1: well separated
        ok = np.flatnonzero(slack >= 1.0)
        centres[i] = cand[ok[0] if len(ok) else int(np.argmax(slack))]
    return centres


def generate_sample(seed: int, index: int, size: int = 96, num_classes: int = 5,
                    split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its mask.

    Returns image uint8 (size, size, 3) RGB and mask uint8 (size, size) with values 0..num_classes-1
    (num_classes includes background). Depends only on (seed, split, index, size, num_classes).
    """
    image, mask, _ = generate_sample_parts(seed, index, size, num_classes, split)
    return image, mask


def generate_sample_parts(seed: int, index: int, size: int = 96, num_classes: int = 5,
                          split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`generate_sample` and a bool (size, size) map of the objects' faint parts (docs/synthetic.md)."""
    _check_args(split, size, num_classes)
    rng = np.random.default_rng([int(seed), _SPLIT_STREAM[split], int(index)])
    image = _background(rng, size)                              # (size, size, 3) float
    mask = np.zeros((size, size), dtype=np.uint8)
    faint = np.zeros((size, size), dtype=bool)

    n_obj = int(rng.integers(1, 4))
    classes = rng.integers(1, num_classes, n_obj)
    radii = rng.uniform(*_RADIUS_RANGE, n_obj) * size
    centres = _place_centres(rng, radii, size)
    for cls, r, (cy, cx) in zip(classes, radii, centres):
        shape, texture = _CLASSES[cls - 1]
        # work only inside the object's bounding box (speed)
        y0, y1 = max(int(cy - _EXTENT * r), 0), min(int(cy + _EXTENT * r) + 2, size)
        x0, x1 = max(int(cx - _EXTENT * r), 0), min(int(cx + _EXTENT * r) + 2, size)
        dy, dx = np.mgrid[y0:y1, x0:x1] + 0.5                   # pixel centres
        dy, dx = dy - cy, dx - cx
        theta = rng.uniform(0, 2 * np.pi)
        cos, sin = np.cos(theta), np.sin(theta)
        u_px, v_px = cos * dx + sin * dy, -sin * dx + cos * dy  # object frame, px
        inside = shape.inside(u_px / r, v_px / r)

        period = rng.uniform(*_PERIOD_RANGE) * size
        phase = rng.uniform(0, 1, 2) * texture.phase_span
        u_px, v_px = u_px[inside], v_px[inside]                 # the texture is needed inside the shape only
        sdf = texture.sdf(u_px / period + phase[0], v_px / period + phase[1]) * period   # signed distance, px
        mix = np.clip(0.5 + sdf, 0.0, 1.0)[:, None]
        c1, c2 = _object_colours(rng)
        colour = c1 + (c2 - c1) * mix                           # (n, 3)
        # the faint part: the pixels beyond a random straight cut, the same texture at a fraction of its contrast
        cut = rng.uniform(0, 2 * np.pi)
        beyond = u_px * np.cos(cut) + v_px * np.sin(cut) > rng.uniform(*_FAINT_CUT) * r
        middle = (c1 + c2) / 2
        colour[beyond] = middle + rng.uniform(*_FAINT_CONTRAST) * (colour[beyond] - middle)
        image[y0:y1, x0:x1][inside] = colour                    # later objects occlude earlier ones
        mask[y0:y1, x0:x1][inside] = cls
        faint[y0:y1, x0:x1][inside] = beyond

    image += rng.uniform(2, 6) * rng.standard_normal(image.shape, dtype=np.float32)   # mild sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, faint


class SyntheticSource:
    """In-memory synthetic split with the same interface as the folder sources in `toco.data.datasets`.

    Samples are generated on demand (on one core about 1.5 ms at 96 px, 35 ms at 448 px); image-level labels are
    cached once computed.
    """

    def __init__(self, split: str, n: int, size: int, num_classes: int, seed: int):
        _check_args(split, size, num_classes)
        self.split = "train" if split == "train_aug" else split
        self.size, self.seed = size, seed
        self.num_classes = num_classes
        self.class_names = SYNTH_CLASS_NAMES[:num_classes]
        self.names = [f"synth_{self.split}_{i:06d}" for i in range(n)]
        self.has_masks = True
        self._labels: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.names)

    def _generate(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} synthetic {self.split} samples")
        return generate_sample(self.seed, i, self.size, self.num_classes, self.split)

    def load_image(self, i: int) -> np.ndarray:
        return self._generate(i)[0]

    def load_mask(self, i: int) -> np.ndarray:
        return self._generate(i)[1]

    def cls_label(self, i: int) -> np.ndarray:
        if i not in self._labels:
            self._labels[i] = labels_from_mask(self._generate(i)[1], self.num_classes)
        return self._labels[i]

    def load(self, i: int):
        image, mask = self._generate(i)
        label = self._labels.setdefault(i, labels_from_mask(mask, self.num_classes))
        return Sample(self.names[i], image, mask, label)

    def load_for_training(self, i: int):
        """Like `load` but without the mask: what the training code is allowed to see."""
        image, mask = self._generate(i)
        label = self._labels.setdefault(i, labels_from_mask(mask, self.num_classes))
        return Sample(self.names[i], image, None, label)


def write_synthetic(out_dir: str | Path, n_train: int, n_val: int, size: int, num_classes: int,
                    seed: int) -> Path:
    """Write the benchmark in the VOC folder layout and return `out_dir`.

    out/JPEGImages/<name>.png (PNG: JPEG would blur the textures), out/SegmentationClassAug/<name>.png (palette),
    out/ImageSets/Segmentation/{train_aug,train,val}.txt (train = train_aug), out/classes.txt.
    """
    sources = [SyntheticSource(split, n, size, num_classes, seed) for split, n in (("train", n_train), ("val", n_val))]
    out = Path(out_dir)
    img_dir, mask_dir = out / "JPEGImages", out / "SegmentationClassAug"
    list_dir = out / "ImageSets" / "Segmentation"
    for d in (img_dir, mask_dir, list_dir):
        d.mkdir(parents=True, exist_ok=True)
    for source in sources:  # every argument was checked above, before a folder was made
        for i, name in enumerate(tqdm(source.names, desc=f"synth {source.split}", unit="img", dynamic_ncols=True,
                                      mininterval=1.0)):
            image, mask = source._generate(i)
            Image.fromarray(image).save(img_dir / f"{name}.png")
            save_mask_png(mask, mask_dir / f"{name}.png")
        listing = "".join(f"{name}\n" for name in source.names)
        split = source.split
        if split == "train":
            (list_dir / "train_aug.txt").write_text(listing)
        (list_dir / f"{split}.txt").write_text(listing)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in SYNTH_CLASS_NAMES[:num_classes]))
    return out


def trivial_baselines(source, limit: int = 0) -> dict[str, float]:
    """mIoU (in 0..1) of label-free / oracle-label trivial predictors, to report beside a trained model.

    Scores the first `limit` images (0 = all): those in-training validation scores with `train.val_limit = limit`.

    all_background:       every pixel predicted background.
    majority_foreground:  every pixel of an image gets its most frequent foreground class in the GT
                          (all background if the image has none) - what image-level labels alone buy.
    """
    c = source.num_classes
    all_bg, majority = ConfusionMatrix(c), ConfusionMatrix(c)
    for i in range(min(limit, len(source)) if limit > 0 else len(source)):
        gt = source.load(i).mask.astype(np.int64)
        all_bg.update(np.zeros_like(gt), gt)
        counts = np.bincount(gt[gt < c].ravel(), minlength=c)
        fg = int(np.argmax(counts[1:])) + 1 if counts[1:].sum() > 0 else 0
        majority.update(np.full_like(gt, fg), gt)
    return {"all_background": float(all_bg.miou()), "majority_foreground": float(majority.miou())}

