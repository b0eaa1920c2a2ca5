"""The training loader's rate per process: one sample is the decoded (or generated) image rescaled, flipped and
cropped, with its three augmented views (the main input, the second global view, the image the 8 local crops are
cut from on the device). How many loader processes keep a GPU step fed follows: a 60 ms step of 4 images needs
67 samples/s (docs/results.md).

Cases: the paper's 448-px crops from VOC-sized JPEGs (500 x 375, decoded each time), from the generator at 448 px
(experiments/smoke/voc_shape.yaml), and the synthetic default (96 px). The 448-px cases are large
(TOCO_BENCH_LARGE=1 or a GPU machine).
"""

import numpy as np
import pytest
from PIL import Image

from inputs import PHOTOS, photo
from profile_step import loader_rate
from support import ROOT, large_enabled
from toco.config import load_config
from toco.data import save_mask_png, voc_source

GPU_STEP_IMAGES_PER_S = 4 / 0.060  # the target step: 4 images in 60 ms


def _voc_like(root, n: int = 16):
    """A VOC layout of n JPEGs of 500 x 375 (photographs) with masks naming one or two classes."""
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img_{i:03d}"
        Image.fromarray(photo(PHOTOS[i % len(PHOTOS)], (375, 500))).save(root / "JPEGImages" / f"{name}.jpg",
                                                                          quality=90)
        mask = np.zeros((375, 500), np.uint8)
        mask[100:300, 150:400] = rng.integers(1, 21)
        save_mask_png(mask, root / "SegmentationClassAug" / f"{name}.png")
        names.append(name)
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("".join(f"{n}\n" for n in names))
    return voc_source(root, "train_aug")


@pytest.mark.parametrize("case", ["voc_jpeg_448", "synthetic_448", "synthetic_96"])
def test_loader_rate(benchmark, case, tmp_path):
    if case.endswith("448") and not large_enabled():
        pytest.skip("the 448-px loader cases need a GPU machine or TOCO_BENCH_LARGE=1")
    config = "experiments/synthetic.yaml" if case == "synthetic_96" else "experiments/smoke/voc_shape.yaml"
    cfg = load_config(ROOT / config, ["tracking.enabled=false"])
    source = _voc_like(tmp_path / "VOC2012") if case == "voc_jpeg_448" else None
    rates = []
    benchmark.group = "loader"
    benchmark.pedantic(lambda: rates.append(loader_rate(cfg, images=24, source=source)), rounds=3, iterations=1)
    rate = float(np.median(rates))
    benchmark.extra_info.update(case=case, device="cpu", images_per_s=rate, peak_mem_mib=float("nan"),
                                processes_for_60ms_step=GPU_STEP_IMAGES_PER_S / rate)
