"""Data layer: synthetic generator, VOC / COCO / synthetic-folder readers, input validation, augmentation."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from toco.config import DataConfig, load_config
from toco.data import (
    COCO_CLASS_NAMES,
    SYNTH_CLASS_NAMES,
    VOC_CLASS_NAMES,
    DatasetError,
    SyntheticSource,
    TrainDataset,
    TrainTransform,
    build_source,
    coco_source,
    denormalize,
    generate_sample,
    normalize,
    random_crop,
    save_mask_png,
    seed_worker,
    synthetic_folder_source,
    trivial_baselines,
    voc_source,
    write_synthetic,
)
from toco.data.synthetic import _SHAPES, _TEXTURES, MAX_SYNTH_CLASSES, SYNTH_CLASS_ATTRIBUTES


# ---- synthetic generator ------------------------------------------------------------------------------------------
def test_generator_is_deterministic_per_seed_split_index():
    img, mask = generate_sample(3, 7, size=64, num_classes=5)
    img2, mask2 = generate_sample(3, 7, size=64, num_classes=5)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert mask.dtype == np.uint8 and mask.shape == (64, 64)
    assert img.tobytes() == img2.tobytes() and mask.tobytes() == mask2.tobytes()
    for other in (generate_sample(3, 8, 64, 5), generate_sample(4, 7, 64, 5),
                  generate_sample(3, 7, 64, 5, split="val")):
        assert other[0].tobytes() != img.tobytes()
    # the in-memory source is the same stream, in any access order
    src = SyntheticSource("train", 10, 64, 5, seed=3)
    assert src.load(7).image.tobytes() == img.tobytes()
    assert src.load(7).name == "synth_train_000007"


def _class_stats(seed: int, n: int, num_classes: int = 5, size: int = 64):
    """Per-class 4x4x4 colour histograms and the (colour bin, class) of every foreground pixel."""
    hist = np.zeros((num_classes, 64))
    bins, classes, present = [], [], []
    for i in range(n):
        img, mask = generate_sample(seed, i, size, num_classes)
        q = img.astype(np.int64) // 64
        b = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
        hist += np.stack([np.bincount(b[mask == c], minlength=64) for c in range(num_classes)])
        bins.append(b[mask > 0])
        classes.append(mask[mask > 0])
        present.append(set(np.unique(mask).tolist()))
    return hist, np.concatenate(bins), np.concatenate(classes).astype(np.int64), present


def test_generator_class_statistics_and_colour_does_not_identify_class():
    hist, _, _, present = _class_stats(seed=0, n=300)
    # mask values in range; each class appears; 1-3 foreground classes per image, all three counts occur
    assert set().union(*present) == {0, 1, 2, 3, 4}
    n_fg = [len(p - {0}) for p in present]
    assert min(n_fg) >= 1 and max(n_fg) <= 3 and set(n_fg) == {1, 2, 3}
    # per-class mean colours are close to each other relative to a pixel's colour spread (std ~74)
    centres = np.array([(q // 16, (q // 4) % 4, q % 4) for q in range(64)]) * 64 + 32
    means = (hist @ centres) / hist.sum(1, keepdims=True)                   # (C, 3)
    assert np.abs(means[1:] - means[1:].mean(0)).max() < 20
    # a per-pixel colour classifier fitted on one stream is no better than the class prior on another
    _, bins, classes, _ = _class_stats(seed=1, n=300)
    joint = hist[1:] + 1                                                    # (K, 64) colour counts per fg class
    pred = joint[:, bins].argmax(0) + 1
    prior = np.bincount(classes)[1:].max() / len(classes)
    assert (pred == classes).mean() < prior + 0.05


def test_generator_class_range():
    for i in range(50):
        _, mask = generate_sample(0, i, 96, 7)
        assert mask.max() <= 6
    for bad in (1, MAX_SYNTH_CLASSES + 1):
        with pytest.raises(ValueError, match=f"2..{MAX_SYNTH_CLASSES}, got {bad}"):
            generate_sample(0, 0, 96, bad)
    with pytest.raises(ValueError, match="size must be >= 16"):
        generate_sample(0, 0, 15, 5)


def test_generator_benchmark_images_are_unchanged():
    # a stored digest is right here: the benchmark's published numbers (`make demo`) were measured on these images
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(20):
            image, mask = generate_sample(0, i, 96, 5, split)
            digest.update(image.tobytes())
            digest.update(mask.tobytes())
    assert digest.hexdigest() == "9ed111cebb29ccc2e9def49c22d7ba5b824524be9d0f3fb9d0eb530ec72bf29a"


def test_class_names_are_unique_shape_texture_pairs():
    names, attributes = SYNTH_CLASS_NAMES, SYNTH_CLASS_ATTRIBUTES
    assert names[:7] == ("background", "striped_disc", "checkered_square", "dotted_triangle", "ringed_cross",
                         "zigzag_annulus", "gridded_star")                  # the original benchmark's classes
    assert len(names) == MAX_SYNTH_CLASSES == len(attributes) + 1 >= len(COCO_CLASS_NAMES)
    assert len(set(names)) == len(names) and len(set(attributes)) == len(attributes)
    assert names[1:] == tuple(f"{texture}_{shape}" for shape, texture in attributes)
    shapes, textures = zip(*attributes)
    # any prefix uses every shape and texture about equally: once each in the first 9 classes, 2-3 times in
    # VOC's 20, 8-9 times in COCO's 80
    for n, lo, hi in ((9, 1, 1), (20, 2, 3), (80, 8, 9)):
        for used in (shapes[:n], textures[:n]):
            counts = [used.count(x) for x in set(used)]
            assert len(counts) == 9 and lo <= min(counts) and max(counts) <= hi


@pytest.mark.parametrize("num_classes", [21, 81])
def test_paper_class_counts_generate_every_class(num_classes):
    for size in (17, 160):
        for i in range(3):
            image, mask = generate_sample(1, i, size, num_classes, "val")
            assert image.shape == (size, size, 3) and image.dtype == np.uint8
            assert mask.shape == (size, size) and mask.dtype == np.uint8 and mask.max() < num_classes
    seen = set()
    for i in range(400):
        seen |= set(np.unique(generate_sample(0, i, 24, num_classes)[1]).tolist())
    assert seen == set(range(num_classes))


@pytest.mark.parametrize("num_classes", [21, 81])
def test_generator_with_many_classes_is_deterministic_per_seed_split_index(num_classes):
    image, mask = generate_sample(2, 5, 48, num_classes, "val")
    again = SyntheticSource("val", 8, 48, num_classes, seed=2).load(5)
    assert image.tobytes() == again.image.tobytes() and mask.tobytes() == again.mask.tobytes()
    for other in (generate_sample(3, 5, 48, num_classes, "val"), generate_sample(2, 6, 48, num_classes, "val"),
                  generate_sample(2, 5, 48, num_classes, "train")):
        assert other[0].tobytes() != image.tobytes()


@pytest.mark.parametrize("name, paper, num_classes", [("voc_shape", "voc_vit_b", 21), ("coco_shape", "coco_vit_b", 81)])
def test_smoke_configs_are_the_papers_on_generated_data(name, paper, num_classes):
    cfg, paper_cfg = load_config(f"experiments/smoke/{name}.yaml"), load_config(f"experiments/{paper}.yaml")
    # the same training, validated on the generator's val split (the paper's COCO file validates on val_part)
    paper_cfg.train.val_split = cfg.train.val_split
    assert (cfg.model.backbone, cfg.data.crop_size, cfg.loss, cfg.pseudo, cfg.optim, cfg.train) == (
        paper_cfg.model.backbone, paper_cfg.data.crop_size, paper_cfg.loss, paper_cfg.pseudo, paper_cfg.optim,
        paper_cfg.train)
    assert not cfg.model.pretrained and cfg.data.synth_size >= cfg.data.crop_size
    for split in (cfg.data.train_split, cfg.data.val_split, cfg.validation_split):
        source = build_source(cfg.data, split)
        assert source.class_names == SYNTH_CLASS_NAMES[:num_classes] and len(source) > 1000


def _shape_mask(shape, angle=0.0, scale=1.0, n=97):
    """The shape rasterised on an n x n grid spanning +-1.6 radii, turned by `angle`, grown by `scale`."""
    g = (np.arange(n) - n // 2) / (n // 2) * 1.6
    v, u = np.meshgrid(g, g, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    return shape.inside((c * u + s * v) / scale, (-s * u + c * v) / scale)


def _best_iou(a, b) -> float:
    """IoU of shape a with shape b at b's best rotation and size (the generator draws both at random)."""
    ref = _shape_mask(a)
    equal_area = np.sqrt(ref.sum() / _shape_mask(b).sum())
    best = 0.0
    for scale in equal_area * np.array([0.9, 1.0, 1.1]):
        for angle in np.linspace(0, 2 * np.pi, 36, endpoint=False):
            other = _shape_mask(b, angle, scale)
            best = max(best, (ref & other).sum() / (ref | other).sum())
    return best


def test_shapes_differ_at_any_rotation_and_size():
    assert _best_iou(_SHAPES[2], _SHAPES[2]) == 1.0                        # the search finds a turned copy
    for a, b in itertools.combinations(_SHAPES, 2):
        # the closest pair, disc and square, reaches 0.84; a near-copy (a hexagon for the disc: 0.93) would not pass
        assert _best_iou(a, b) < 0.85, (a.name, b.name)


def _texture_pattern(texture, n, angle=0.0, scale=1.0, offset=0.0, period=10.0):
    """+-1 (light / dark) pattern of a texture on an n x n pixel grid, turned, scaled and shifted."""
    g = (np.arange(n) - n / 2 + 0.5) / (period * scale)
    v, u = np.meshgrid(g, g, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    return np.where(texture.sdf(c * u + s * v + offset, -s * u + c * v + offset) > 0, 1.0, -1.0)


def _best_match(a, b, scales=(0.85, 1.0, 1.15), window=32, field=80) -> float:
    """Highest mean product of a window of texture a, at any rotation, with texture b at any shift and at the
    given scales (1 = the same pattern, 0 = unrelated)."""
    angles = np.linspace(0, np.pi, 24, endpoint=False)
    windows = np.zeros((len(angles), field, field))
    windows[:, :window, :window] = [_texture_pattern(a, window, angle) for angle in angles]
    windows_f = np.conj(np.fft.rfft2(windows))
    best = -1.0
    for scale in scales:
        field_f = np.fft.rfft2(_texture_pattern(b, field, scale=scale, offset=0.3))   # shifted by 3 px
        corr = np.fft.irfft2(windows_f * field_f, s=(field, field))[:, :field - window + 1, :field - window + 1]
        best = max(best, corr.max() / window ** 2)
    return best


def test_textures_are_not_the_same_pattern_up_to_shift_and_rotation():
    for a in _TEXTURES:
        for b in _TEXTURES:
            match = _best_match(a, b)
            if a is b:
                assert match > 0.95, a.name                               # the search finds a shifted copy
            else:
                # at its best alignment a window of one texture still disagrees with any other in >= 20% of its
                # pixels (unrelated patterns reach about 0.5: the closest pair, stripes in rings, 0.58)
                assert match < 0.6, (a.name, b.name)


def test_the_default_benchmarks_textures_differ_at_every_scale_it_draws():
    # the 4 classes of the default each have a texture of their own; between two images a texture's scale varies by
    # up to 2x either way (periods 0.09-0.13, rescaling 0.75-1.5), where a checkerboard turned by 45 degrees once
    # matched dots on a square lattice in 83 % (0.83) of a window at sqrt(2) times their period
    scales = np.geomspace(0.5, 2.0, 13)
    for a, b in itertools.permutations(_TEXTURES[:4], 2):
        assert _best_match(a, b, scales) < 0.6, (a.name, b.name)


def test_write_synthetic_round_trip(tmp_path):
    root = write_synthetic(tmp_path / "synth", n_train=5, n_val=3, size=48, num_classes=4, seed=2)
    train = synthetic_folder_source(root, "train_aug")
    val = synthetic_folder_source(root, "val")
    assert train.class_names == SYNTH_CLASS_NAMES[:4] and train.num_classes == 4
    assert len(train) == 5 and len(val) == 3
    mem = SyntheticSource("val", 3, 48, 4, seed=2)
    for i in range(3):
        disk, ref = val.load(i), mem.load(i)
        assert disk.name == ref.name
        np.testing.assert_array_equal(disk.image, ref.image)               # PNG is lossless
        np.testing.assert_array_equal(disk.mask, ref.mask)
        np.testing.assert_array_equal(disk.cls_label, ref.cls_label)
    with Image.open(root / "SegmentationClassAug" / f"{val.names[0]}.png") as im:
        assert im.mode == "P"
    cfg = DataConfig(name="synthetic", root=str(root), num_classes=4)
    assert build_source(cfg, "val").names == val.names
    with pytest.raises(DatasetError, match="num_classes"):
        build_source(dataclasses.replace(cfg, num_classes=5), "val")


def test_build_source_in_memory_and_trivial_baselines():
    cfg = DataConfig(name="synthetic", root=None, num_classes=5, synth_size=48, synth_train=6, synth_val=4,
                     synth_seed=1)
    train, val = build_source(cfg, "train_aug"), build_source(cfg, "val")
    assert len(train) == 6 and len(val) == 4
    assert train.load(0).image.tobytes() != val.load(0).image.tobytes()
    base = trivial_baselines(val)
    masks = np.stack([val.load(i).mask for i in range(len(val))])
    # all background: IoU_bg = bg pixels / all pixels, every foreground class 0
    assert base["all_background"] == pytest.approx((masks == 0).mean() / 5)
    assert 0 < base["majority_foreground"] < 1
    # limited to the first images, as in-training validation with train.val_limit
    first_two = trivial_baselines(build_source(dataclasses.replace(cfg, synth_val=2), "val"))
    assert trivial_baselines(val, limit=2) == first_two != base


# ---- VOC / COCO folder readers ----------------------------------------------------------------------------------
def _write_jpeg(path, h, w, gray=False):
    rng = np.random.default_rng(abs(hash(path.name)) % 2 ** 32)
    arr = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def _mask(h, w, values):
    """(h, w) mask with each value filling a horizontal band, plus a 255 border row."""
    m = np.zeros((h, w), dtype=np.uint8)
    for k, v in enumerate(values):
        m[k * h // len(values):(k + 1) * h // len(values)] = v
    m[0] = 255
    return m


# name -> (height, width, mask values)
VOC_ITEMS = {"2007_000032": (20, 30, [0, 15]), "2007_000039": (24, 18, [0, 1, 20, 0]), "2008_000002": (16, 16, [0])}


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for name, (h, w, values) in VOC_ITEMS.items():
        _write_jpeg(root / "JPEGImages" / f"{name}.jpg", h, w)
        save_mask_png(_mask(h, w, values), root / "SegmentationClassAug" / f"{name}.png")
    _write_jpeg(root / "JPEGImages" / "2008_000099.jpg", 10, 12)
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").write_text("\n".join(VOC_ITEMS) + "\n")
    (lists / "val.txt").write_text("2007_000039\n")
    (lists / "test.txt").write_text("2008_000099\n")
    return root


def test_voc_reader_and_labels(voc_root):
    src = voc_source(voc_root, "train_aug")
    assert src.class_names == VOC_CLASS_NAMES and src.num_classes == 21 and len(src) == 3
    s = src.load(0)
    assert s.name == "2007_000032" and s.image.shape == (20, 30, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (20, 30) and set(np.unique(s.mask)) == {0, 15, 255}
    # hand-checked labels: person = 15 -> index 14; aeroplane 1 + tvmonitor 20 -> 0, 19; background only -> zeros
    assert np.flatnonzero(src.cls_label(0)).tolist() == [14]
    assert np.flatnonzero(src.cls_label(1)).tolist() == [0, 19]
    assert not src.cls_label(2).any() and src.cls_label(2).dtype == np.float32
    t = src.load_for_training(1)
    assert t.mask is None and np.flatnonzero(t.cls_label).tolist() == [0, 19]
    test = voc_source(voc_root, "test")
    assert test.load(0).mask is None and test.load(0).cls_label is None
    val = voc_source(voc_root, "val").load(0)
    assert val.image.shape == (24, 18, 3) and val.mask.shape == (24, 18)


def test_voc_fallbacks_png_images_and_segmentation_class(voc_root):
    (voc_root / "SegmentationClassAug").rename(voc_root / "SegmentationClass")
    jpg = voc_root / "JPEGImages" / "2007_000032.jpg"
    Image.open(jpg).save(jpg.with_suffix(".png"))
    jpg.unlink()
    src = voc_source(voc_root, "train_aug")
    assert src.load(0).image.shape == (20, 30, 3)
    assert np.flatnonzero(src.cls_label(0)).tolist() == [14]


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "MSCOCO"
    items = {"train2014": {"COCO_train2014_000000000009": (20, 24, [0, 1, 80])},
             "val2014": {"COCO_val2014_000000000042": (18, 22, [0, 3]),
                         "COCO_val2014_000000000073": (16, 20, [0, 50])}}
    for sub, entries in items.items():
        (root / "coco2014" / sub).mkdir(parents=True)
        (root / "SegmentationClass" / sub).mkdir(parents=True)
        for name, (h, w, values) in entries.items():
            _write_jpeg(root / "coco2014" / sub / f"{name}.jpg", h, w, gray=name.endswith("42"))
            save_mask_png(_mask(h, w, values), root / "SegmentationClass" / sub / f"{name}.png")
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train.txt").write_text("COCO_train2014_000000000009\n")
    (root / "ImageSets" / "val.txt").write_text("COCO_val2014_000000000042\nCOCO_val2014_000000000073\n")
    (root / "ImageSets" / "val_part.txt").write_text("COCO_val2014_000000000073\n")
    return root


def test_coco_reader(coco_root):
    train = coco_source(coco_root, "train")
    assert train.num_classes == 81 and COCO_CLASS_NAMES[1] == "person" and COCO_CLASS_NAMES[80] == "toothbrush"
    assert np.flatnonzero(train.cls_label(0)).tolist() == [0, 79]          # person, toothbrush
    val = coco_source(coco_root, "val")
    gray = val.load(0)
    assert gray.image.shape == (18, 22, 3)                                  # grayscale JPEG -> RGB
    assert np.array_equal(gray.image[..., 0], gray.image[..., 2])
    assert np.flatnonzero(gray.cls_label).tolist() == [2]                   # car
    assert np.flatnonzero(coco_source(coco_root, "val_part").cls_label(0)).tolist() == [49]   # orange
    cfg = DataConfig(name="coco", root=str(coco_root), num_classes=81)
    assert build_source(cfg, "val_part").names == ["COCO_val2014_000000000073"]


def test_every_source_is_a_source_and_the_training_never_sees_a_mask(voc_root, coco_root, tmp_path):
    """The protocol toco.data.Source, on each kind the registry opens and on image files (`toco predict`)."""
    from toco.data import ImageFiles, Source, labels_from_mask, synthetic_folder_source, write_synthetic

    synth = write_synthetic(tmp_path / "synth", n_train=2, n_val=2, size=32, num_classes=5, seed=0)
    sources = {"voc": voc_source(voc_root, "train_aug"), "coco": coco_source(coco_root, "train"),
               "synthetic folder": synthetic_folder_source(synth, "train_aug"),
               "synthetic": build_source(DataConfig(name="synthetic", num_classes=5, synth_train=2), "train")}
    for kind, source in sources.items():
        assert isinstance(source, Source), kind
        assert len(source.names) == len(set(source.names)) == len(source) > 0, kind
        assert len(source.class_names) == source.num_classes and source.has_masks, kind
        whole, seen = source.load(0), source.load_for_training(0)
        assert whole.name == seen.name == source.names[0] and seen.mask is None, kind
        assert np.array_equal(whole.image, seen.image) and np.array_equal(whole.cls_label, seen.cls_label), kind
        assert np.array_equal(whole.cls_label, labels_from_mask(whole.mask, source.num_classes)), kind
    photo = voc_root / "JPEGImages" / "2008_000099.jpg"
    files = ImageFiles([str(photo), str(photo)], 21, VOC_CLASS_NAMES)
    assert isinstance(files, Source) and not files.has_masks and files.names == ["2008_000099", "2008_000099_"]
    assert files.load(1).mask is None and files.load(1).cls_label is None
    _expect_error(lambda: files.load_for_training(0), str(photo), "no labels to train on")


# ---- bad input: every error names the file --------------------------------------------------------------------
def _expect_error(fn, *fragments):
    with pytest.raises(DatasetError) as err:
        fn()
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_bad_inputs_name_the_file(voc_root):
    lists = voc_root / "ImageSets" / "Segmentation"
    _expect_error(lambda: voc_source(voc_root, "train"), "train.txt", "not found")
    (lists / "empty.txt").write_text("\n  \n")
    _expect_error(lambda: voc_source(voc_root, "empty"), "empty.txt", "empty")

    src = voc_source(voc_root, "train_aug")
    (voc_root / "JPEGImages" / "2007_000032.jpg").unlink()
    _expect_error(lambda: src.load(0), "2007_000032.jpg", "image not found")
    _expect_error(lambda: src.cls_label(0), "2007_000032.jpg")

    (voc_root / "SegmentationClassAug" / "2007_000039.png").unlink()
    _expect_error(lambda: src.load(1), "2007_000039.png", "mask not found")

    (voc_root / "JPEGImages" / "2008_000002.jpg").write_bytes(b"definitely not a jpeg" * 10)
    _expect_error(lambda: src.load(2), "2008_000002.jpg", "corrupt")


def test_bad_mask_contents(voc_root):
    src = voc_source(voc_root, "train_aug")
    save_mask_png(np.zeros((5, 5), np.uint8), voc_root / "SegmentationClassAug" / "2007_000032.png")
    _expect_error(lambda: src.load(0), "2007_000032.png", "size")
    _expect_error(lambda: src.cls_label(0), "2007_000032.png", "size")
    save_mask_png(_mask(24, 18, [0, 30, 7, 40]), voc_root / "SegmentationClassAug" / "2007_000039.png")
    _expect_error(lambda: src.load(1), "2007_000039.png", "[30, 40]")
    Image.new("RGB", (16, 16)).save(voc_root / "SegmentationClassAug" / "2008_000002.png")
    _expect_error(lambda: src.load(2), "2008_000002.png", "mode RGB")


# ---- augmentation ---------------------------------------------------------------------------------------------
def test_random_crop_box_marks_the_real_image():
    torch.manual_seed(0)
    for shape in [(30, 50), (70, 20), (80, 90)]:
        for _ in range(5):
            crop, box = random_crop(np.full((*shape, 3), 255, np.uint8), 64)
            h0, h1, w0, w1 = box.tolist()
            assert crop.shape == (64, 64, 3) and box.dtype == np.int64
            assert (crop[h0:h1, w0:w1] == 255).all()
            outside = np.ones((64, 64), bool)
            outside[h0:h1, w0:w1] = False
            assert (crop[outside] == 0).all()
            assert h1 - h0 == min(shape[0], 64) and w1 - w0 == min(shape[1], 64)


def _bright_columns(x: torch.Tensor) -> list[int]:
    """Columns of a normalised (3,H,W) view whose mean intensity is nearer the image's max than its min."""
    col = denormalize(x).mean(dim=(0, 1))                                   # (W,)
    return torch.nonzero(col > (col.max() + col.min()) / 2).flatten().tolist()


def test_train_transform_shapes_and_box_over_padding():
    torch.manual_seed(1)
    tt = TrainTransform(crop_size=64, rescale_range=(1.0, 1.0), local_crop_size=16)
    for _ in range(4):
        out = tt(np.full((40, 24, 3), 255, np.uint8))                        # padded on both axes
        assert out["image"].shape == out["global2"].shape == out["local_image"].shape == (3, 64, 64)
        assert out["image"].dtype == torch.float32 and out["img_box"].dtype == torch.int64
        h0, h1, w0, w1 = out["img_box"].tolist()
        assert (h1 - h0, w1 - w0) == (40, 24)
        img = denormalize(out["image"]).mean(0)                              # (64, 64), colour-jittered
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[h0 + 1:h1 - 1, w0 + 1:w1 - 1] = True                          # 1 px margin for the blur
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[max(h0 - 1, 0):h1 + 1, max(w0 - 1, 0):w1 + 1] = False
        assert img[inside].min() > img[outside].max() + 50


def test_box_follows_flip_and_local_image_aligned_in_fixed_mode():
    image = np.full((64, 20, 3), 255, np.uint8)                             # horizontal padding only
    fixed = TrainTransform(64, (1.0, 1.0), 16, legacy_bugs=False)
    legacy = TrainTransform(64, (1.0, 1.0), 16, legacy_bugs=True)
    mismatch_box, mismatch_local = 0, 0
    for seed in range(16):
        torch.manual_seed(seed)
        out = fixed(image)
        box_cols = list(range(out["img_box"][2], out["img_box"][3]))
        assert _bright_columns(out["image"]) == box_cols
        assert _bright_columns(out["local_image"]) == box_cols
        torch.manual_seed(seed)
        out = legacy(image)
        box_cols = list(range(out["img_box"][2], out["img_box"][3]))
        mismatch_box += _bright_columns(out["image"]) != box_cols
        mismatch_local += _bright_columns(out["local_image"]) != _bright_columns(out["image"])
    assert mismatch_box > 0 and mismatch_local > 0        # the original's bugs are reproduced when asked


def test_train_dataset_never_returns_the_mask_and_is_reproducible():
    src = SyntheticSource("train", 8, 48, 5, seed=0)
    ds = TrainDataset(src, TrainTransform(48, (0.5, 1.5), 16))
    item = ds[3]
    assert set(item) == {"name", "image", "cls_label", "img_box", "global2", "local_image"}
    np.testing.assert_array_equal(item["cls_label"].numpy(), src.load(3).cls_label)

    def batches():
        loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, worker_init_fn=seed_worker,
                            generator=torch.Generator().manual_seed(0))
        return list(loader)

    a, b = batches(), batches()
    for x, y in zip(a, b):
        assert x["name"] == y["name"]
        for key in ("image", "img_box", "global2", "local_image", "cls_label"):
            assert torch.equal(x[key], y[key])
    assert a[0]["image"].shape == (4, 3, 48, 48) and a[0]["cls_label"].shape == (4, 4)


def test_normalisation_round_trips(voc_root):
    raw = voc_source(voc_root, "train_aug").load(0).image
    back = denormalize(normalize(raw)[None])[0].permute(1, 2, 0)
    assert torch.allclose(back, torch.from_numpy(raw).float(), atol=1e-3)
    assert torch.allclose(normalize(np.full((2, 2, 3), 255, np.uint8))[:, 0, 0],
                          (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
