import math

import pytest
import torch
import torch.nn.functional as F

from toco.par import PAR


def _slow_par(image, masks, dilations, num_iter, w1=0.3, w2=0.01):
    """Pixel-by-pixel PAR (docs/method.md §2.3) with explicit clamped neighbour coordinates, float64."""
    image, masks = image.double(), masks.double().clone()
    b, _, h, w = image.shape
    offs = [(dy * d, dx * d, d * (math.sqrt(2) if dy and dx else 1.0))
            for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    dists = torch.tensor([o[2] for o in offs], dtype=torch.float64)
    pos = -(dists / (dists.std() + 1e-8) / w1) ** 2
    pos_soft = torch.softmax(pos, 0)
    kern = torch.zeros(b, len(offs), h, w, dtype=torch.float64)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                nb = torch.stack([image[n, :, min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
                                  for dy, dx, _ in offs], dim=1)  # (3,48)
                std = nb.std(dim=1, keepdim=True)
                a = (-((nb - image[n, :, y, x, None]).abs() / (std + 1e-8) / w1) ** 2).mean(0)
                kern[n, :, y, x] = torch.softmax(a, 0) + w2 * pos_soft
    for _ in range(num_iter):
        new = torch.zeros_like(masks)
        for y in range(h):
            for x in range(w):
                for k, (dy, dx, _) in enumerate(offs):
                    yy, xx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                    new[:, :, y, x] += kern[:, k, y, x, None] * masks[:, :, yy, xx]
        masks = new
    return masks, kern


def test_par_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 7, 8, generator=g, dtype=torch.float64)
    masks = torch.rand(1, 2, 7, 8, generator=g, dtype=torch.float64)
    par = PAR(num_iter=2)  # default dilations: up to 24 > image size, replicate padding clamps
    expected, kern = _slow_par(image, masks, par.dilations, 2)
    torch.testing.assert_close(par.kernel(image), kern, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(par(image, masks), expected, rtol=1e-10, atol=1e-12)


def test_kernel_rows_sum_to_one_plus_w2():
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kern = PAR().kernel(image)
    assert kern.shape == (2, 48, 16, 16)
    torch.testing.assert_close(kern.sum(1), torch.full((2, 16, 16), 1.01))


def test_constant_image_keeps_constant_mask():
    image = torch.full((1, 3, 12, 12), 0.4)
    masks = torch.full((1, 2, 12, 12), 0.3)
    masks[:, 1] = 0.8
    out = PAR(num_iter=10)(image, masks)
    # uniform kernel rows summing to 1.01 -> each iteration multiplies a constant map by 1.01
    torch.testing.assert_close(out[:, 0], torch.full((1, 12, 12), 0.3 * 1.01 ** 10))
    torch.testing.assert_close(out[:, 1], torch.full((1, 12, 12), 0.8 * 1.01 ** 10))


def test_one_hot_masks_stay_in_range_and_follow_edges():
    # two-colour image with a vertical edge; noisy one-hot masks
    image = torch.zeros(1, 3, 20, 20)
    image[..., 10:] = 1.0
    g = torch.Generator().manual_seed(2)
    noisy = (torch.rand(1, 20, 20, generator=g) < 0.3).long()  # class 1 scattered over both halves
    noisy[:, :, 10:] = 1 - noisy[:, :, 10:]  # right half mostly class 1
    masks = F.one_hot(noisy, 2).permute(0, 3, 1, 2).float()
    out = PAR()(image, masks)
    scale = 1.01 ** 10
    assert out.min() >= 0 and out.max() <= scale + 1e-5
    torch.testing.assert_close(out.sum(1), torch.full((1, 20, 20), scale))  # linear: channels sum preserved
    label = out.argmax(1)
    assert (label[:, :, :10] == 0).float().mean() > 0.9 and (label[:, :, 10:] == 1).float().mean() > 0.9


def test_masks_are_resized_with_align_corners():
    image = torch.rand(1, 3, 9, 9)
    masks = torch.rand(1, 3, 5, 5)
    out = PAR(num_iter=0)(image, masks)
    torch.testing.assert_close(out, F.interpolate(masks, size=(9, 9), mode="bilinear", align_corners=True))


def test_shape_errors():
    with pytest.raises(ValueError):
        PAR()(torch.rand(1, 3, 8, 8), torch.rand(2, 2, 8, 8))
