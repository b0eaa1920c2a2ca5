"""Benchmark inputs that need no `toco`: photographs and probability maps (shared by bench_filters.py and the
A/B cases of cases.py, which must import on any revision of toco)."""
import numpy as np
import torch

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """(H,W,3) uint8 skimage photograph resized to size."""
    from skimage import data
    from skimage.transform import resize

    return (resize(getattr(data, name)(), size, anti_aliasing=True) * 255).round().astype(np.uint8)


def photo_batch(size: int) -> torch.Tensor:
    """(4,3,size,size) float 0-255: the four PHOTOS."""
    return torch.stack([torch.from_numpy(photo(n, (size, size))).permute(2, 0, 1).float() for n in PHOTOS])


def probability_maps(batch: int, k: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Softmax of smooth random logits plus noise (what a segmentation head produces): (batch,k,H,W)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k, max(2, size[0] // 16), max(2, size[1] // 16), generator=g) * 3
    logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return torch.softmax(logits + torch.randn(batch, k, *size, generator=g), dim=1)


def flat_photo(size: tuple[int, int], flat_share: float = 0.6) -> np.ndarray:
    """(H,W,3) uint8: the astronaut photograph with one uniform grey block over its top `flat_share`, the permutohedral
    lattice's hardest case (a flat region puts thousands of pixels on one lattice vertex)."""
    image = photo("astronaut", size)
    image[: int(flat_share * size[0])] = 128
    return image
