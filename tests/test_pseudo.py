import pytest
import torch
import torch.nn.functional as F

from toco.par import PAR
from toco.pseudo import cam_to_label, cam_to_roi_mask, crop_from_roi, multi_scale_cam, refine_cams_with_bkg


# ---------------------------------------------------------------------------------------------------- multi-scale CAM
class _DummyCamModel:
    """forward_cams: raw CAMs at a stride-4 'token grid', position dependent (not flip-equivariant)."""

    def __init__(self):
        self.sizes = []

    def forward_cams(self, x):
        self.sizes.append(tuple(x.shape))
        pooled = F.avg_pool2d(x, 4)  # (N,3,h,w)
        ramp = torch.linspace(-1, 1, pooled.shape[-1])  # breaks flip symmetry
        cam = torch.stack([pooled[:, 0] - 0.5 + ramp, pooled[:, 1] * ramp], dim=1)
        aux = torch.stack([pooled[:, 2] - 0.3, -pooled[:, 0] - 1.0], dim=1)  # channel 1 always < 0
        return cam, aux


def _reference_ms_cam(model, images, scales, which):
    """Per-image, per-scale transcription of docs/method.md §2.1."""
    b, _, h, w = images.shape
    out = []
    for n in range(b):
        acc = 0
        for s in scales:
            x = F.interpolate(images[n:n + 1], size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False)
            a = F.interpolate(model.forward_cams(x)[which], size=(h, w), mode="bilinear", align_corners=False)
            f = F.interpolate(model.forward_cams(x.flip(-1))[which], size=(h, w), mode="bilinear",
                              align_corners=False).flip(-1)
            acc = acc + torch.relu(torch.maximum(a, f))
        mn = acc.flatten(2).min(-1).values[..., None, None]
        mx = (acc - mn).flatten(2).max(-1).values[..., None, None]
        out.append((acc - mn) / (mx + 1e-5))
    return torch.cat(out)


def test_multi_scale_cam_values_and_normalisation():
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    model = _DummyCamModel()
    cam, aux = multi_scale_cam(model, images, scales=(1.0, 0.5, 1.5))
    # one batched [x, flip x] call per scale, at int(s*H), int(s*W)
    assert model.sizes == [(4, 3, 16, 24), (4, 3, 8, 12), (4, 3, 24, 36)]
    assert cam.shape == aux.shape == (2, 2, 16, 24)
    torch.testing.assert_close(cam, _reference_ms_cam(_DummyCamModel(), images, (1.0, 0.5, 1.5), 0))
    torch.testing.assert_close(aux, _reference_ms_cam(_DummyCamModel(), images, (1.0, 0.5, 1.5), 1))
    # per image & channel: min 0, max ~1; an all-negative raw CAM becomes 0 after ReLU (no NaN)
    torch.testing.assert_close(cam.amin(dim=(-2, -1)), torch.zeros(2, 2))
    torch.testing.assert_close(cam.amax(dim=(-2, -1)), torch.ones(2, 2), atol=1e-4, rtol=0)
    assert torch.equal(aux[:, 1], torch.zeros_like(aux[:, 1]))


def test_multi_scale_cam_flip_symmetry():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 16, 16, generator=g)
    # max over an image and its un-flipped flip: flipping the input flips the CAM, for ANY model
    cam, aux = multi_scale_cam(_DummyCamModel(), images)
    cam_f, aux_f = multi_scale_cam(_DummyCamModel(), images.flip(-1))
    torch.testing.assert_close(cam_f, cam.flip(-1))
    torch.testing.assert_close(aux_f, aux.flip(-1))
    # so a flip-symmetric image gives a flip-symmetric CAM, even from a position-dependent model
    sym = torch.cat([images[..., :8], images[..., :8].flip(-1)], dim=-1)
    cam_s, _ = multi_scale_cam(_DummyCamModel(), sym)
    torch.testing.assert_close(cam_s, cam_s.flip(-1))


# ---------------------------------------------------------------------------------------------------- thresholds
def _cam_row(values, cls=1, num_classes=3):
    """(1,C-1,1,len) CAM whose class `cls` (0-based channel) holds `values`, others 0."""
    cam = torch.zeros(1, num_classes, 1, len(values))
    cam[0, cls, 0] = torch.tensor(values)
    return cam


def test_cam_to_label_bkg_threshold_edges():
    cam = _cam_row([0.25, 0.5, 0.5001, 0.7, 0.9])
    y = torch.tensor([[0.0, 1.0, 0.0]])
    label = cam_to_label(cam, y, bkg_thre=0.5)
    assert label.dtype == torch.int64
    assert label[0, 0].tolist() == [0, 0, 2, 2, 2]  # v <= 0.5 -> bg, else class index + 1


def test_cam_to_label_ignore_mid_edges():
    cam = _cam_row([0.1, 0.25, 0.2501, 0.5, 0.7, 0.7001])
    y = torch.tensor([[0.0, 1.0, 0.0]])
    label = cam_to_label(cam, y, bkg_thre=0.5, high_thre=0.7, low_thre=0.25, ignore_mid=True)
    assert label[0, 0].tolist() == [0, 0, 255, 255, 255, 2]


def test_cam_to_label_absent_classes_and_box():
    cam = torch.zeros(1, 3, 2, 3)
    cam[0, 0] = 0.9  # absent class: must be ignored
    cam[0, 2, :, 1:] = 0.8
    y = torch.tensor([[0.0, 1.0, 1.0]])
    label = cam_to_label(cam, y, bkg_thre=0.5)
    assert label[0].tolist() == [[0, 3, 3], [0, 3, 3]]
    box = torch.tensor([[0, 1, 1, 3]])  # rows [0,1), cols [1,3)
    label = cam_to_label(cam, y, bkg_thre=0.5, img_box=box)
    assert label[0].tolist() == [[255, 3, 3], [255, 255, 255]]


def test_roi_mask_edges():
    cam = _cam_row([0.1, 0.25, 0.2501, 0.69, 0.7, 0.95])
    roi = cam_to_roi_mask(cam, torch.tensor([[0.0, 1.0, 0.0]]), low_thre=0.25, high_thre=0.7)
    assert roi.dtype == torch.int64
    assert roi[0, 0].tolist() == [0, 0, 1, 1, 2, 2]  # 0.7 exactly -> 2 (>=)


# ---------------------------------------------------------------------------------------------------- PAR refinement
def _refine_reference(par, images01, cam, cls_label, high, low, img_box, ignore=255):
    """Literal per-image version of the original: drop absent channels, two separate PAR calls."""
    b, _, h, w = images01.shape
    small = (h // 2, w // 2)
    img = F.interpolate(images01, size=small, mode="bilinear", align_corners=False)
    keys_all = torch.cat([torch.ones(b, 1), cls_label], dim=1)
    out = torch.full((b, h, w), ignore, dtype=torch.long)
    for n in range(b):
        keys = keys_all[n].nonzero()[:, 0]
        labs = []
        for thre in (high, low):
            stack = torch.cat([torch.full((1, 1, h, w), thre), cam[n:n + 1] * cls_label[n, :, None, None]], dim=1)
            stack = F.interpolate(stack, size=small, mode="bilinear", align_corners=False)[:, keys].softmax(1)
            ref = F.interpolate(par(img[n:n + 1], stack), size=(h, w), mode="bilinear", align_corners=False)
            labs.append(keys[ref.argmax(1)][0])
        lh, ll = labs
        lab = lh.clone()
        lab[lh == 0] = ignore
        lab[(lh + ll) == 0] = 0
        h0, h1, w0, w1 = img_box[n].tolist()
        out[n, h0:h1, w0:w1] = lab[h0:h1, w0:w1]
    return out


def test_refine_batched_masking_equals_dropping_absent_channels():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 24, 24, generator=g)
    cam = torch.rand(3, 5, 24, 24, generator=g)
    cam[:, 4] = 1.0  # a strong absent class must never win
    y = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [1, 0, 1, 1, 0]])  # different present counts
    box = torch.tensor([[0, 24, 0, 24], [2, 20, 4, 24], [0, 12, 0, 12]])
    par = PAR(dilations=(1, 2, 4), num_iter=3)
    got = refine_cams_with_bkg(par, images, cam, y, high_thre=0.7, low_thre=0.25, img_box=box)
    expected = _refine_reference(par, images, cam, y, 0.7, 0.25, box)
    assert got.dtype == torch.int64 and got.shape == (3, 24, 24)
    assert torch.equal(got, expected)
    assert not (got == 5).any()
    for n in range(3):  # only bg, ignore or present classes
        allowed = {0, 255} | {k + 1 for k in y[n].nonzero()[:, 0].tolist()}
        assert set(got[n].unique().tolist()) <= allowed


def test_refine_combination_rule():
    # PAR with 0 iterations = identity: the rule is visible directly. Columns: cam 0.9 / 0.5 / 0.1
    images = torch.rand(1, 3, 8, 24)
    cam = torch.zeros(1, 2, 8, 24)
    cam[0, 1, :, :8], cam[0, 1, :, 8:16], cam[0, 1, :, 16:] = 0.9, 0.5, 0.1
    y = torch.tensor([[0.0, 1.0]])
    label = refine_cams_with_bkg(PAR(num_iter=0), images, cam, y, high_thre=0.7, low_thre=0.25)
    # 0.9: fg in the high map -> class 2; 0.5: bg in the high map, fg in the low map -> ignore; 0.1: bg in both
    assert (label[0, :, :7] == 2).all()
    assert (label[0, :, 9:15] == 255).all()
    assert (label[0, :, 17:] == 0).all()
    box = torch.tensor([[0, 4, 0, 24]])
    label_box = refine_cams_with_bkg(PAR(num_iter=0), images, cam, y, 0.7, 0.25, img_box=box)
    assert (label_box[0, 4:] == 255).all() and torch.equal(label_box[0, :4], label[0, :4])


# ---------------------------------------------------------------------------------------------------- CTC crops
def _coord_image(b, h, w):
    """(B,3,H,W): channel 0 = row, 1 = column, 2 = image index."""
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    return torch.stack([torch.stack([ys, xs, torch.full((h, w), float(n))]) for n in range(b)])


def _check_crop_places(crops, image_index, c):
    """Every crop is a contiguous c x c block; returns its centre (row, col) = corner + c//2."""
    centres = []
    ar = torch.arange(c, dtype=torch.float32)
    for crop in crops:
        block = crop[image_index]
        y0, x0 = block[0, 0, 0], block[1, 0, 0]
        assert torch.equal(block[0], (y0 + ar).view(c, 1).expand(c, c))
        assert torch.equal(block[1], (x0 + ar).view(1, c).expand(c, c))
        assert (block[2] == image_index).all()
        centres.append((int(y0) + c // 2, int(x0) + c // 2))
    return centres


def test_crop_from_roi_places_and_flags():
    roi = torch.full((2, 16, 16), 2, dtype=torch.long)  # confident fg everywhere ...
    roi[:, 4, 4] = 0  # ... but one bg pixel
    roi[:, 10:12, 10:12] = 1  # ... and a 2x2 uncertain block
    image = _coord_image(2, 16, 16)
    gen = torch.Generator().manual_seed(0)
    crops, flags = crop_from_roi(image, roi, crop_size=4, num_crops=5, generator=gen)
    assert len(crops) == 5 and crops[0].shape == (2, 3, 4, 4)
    assert flags.dtype == torch.int64 and flags.shape == (2, 7) and (flags[:, :2] == 1).all()
    for n in range(2):
        centres = _check_crop_places(crops, n, 4)
        # exactly the 5 candidates (roi <= 1) are the centres
        assert sorted(centres) == [(4, 4), (10, 10), (10, 11), (11, 10), (11, 11)]
        for centre, flag in zip(centres, flags[n, 2:].tolist()):
            # (4,4): no uncertain pixel -> negative; uncertain block: 4/16 = 0.25 > 0.2 -> positive
            assert flag == (0 if centre == (4, 4) else 1)
    # the other rules count confident fg too: the fg-dominated crop at (4,4) turns positive
    for rule in ("not_background", "original"):
        _, flags_rule = crop_from_roi(image, roi, 4, num_crops=5, negative_rule=rule,
                                      generator=torch.Generator().manual_seed(0))
        assert (flags_rule == 1).all(), rule
    with pytest.raises(ValueError, match="negative rule"):
        crop_from_roi(image, roi, 4, num_crops=5, negative_rule="legacy")


def _periodic_roi(n_uncertain: int, n_foreground: int, size: int = 20) -> torch.Tensor:
    """Every 5x5 window holds exactly one pixel of each class (y % 5, x % 5): the first n_uncertain classes are
    uncertain (1), the next n_foreground confident foreground (2), the rest background (0). So every 5x5 crop,
    wherever it lands, holds exactly that many of each."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    kind = (yy % 5) * 5 + xx % 5
    roi = torch.zeros(size, size, dtype=torch.long)
    roi[kind < n_uncertain] = 1
    roi[(kind >= n_uncertain) & (kind < n_uncertain + n_foreground)] = 2
    return roi


# (uncertain, foreground) pixels of 25 per crop; threshold 0.2 = 5 pixels, a share <= 0.2 is negative
CROP_KINDS = [(0, 3), (0, 20), (2, 2), (2, 4), (5, 0), (6, 0)]


@pytest.mark.parametrize("rule, positive", [
    ("uncertain", [0, 0, 0, 0, 0, 1]),       # unc / 25: 0, 0, .08, .08, .2, .24
    ("not_background", [0, 1, 0, 1, 0, 1]),  # (unc + fg) / 25: .12, .8, .16, .24, .2, .24
    ("original", [1, 1, 1, 1, 0, 1]),        # (unc + 2 fg) / 25: .24, 1.6, .24, .4, .2, .24
])
def test_ctc_negative_rules_count_by_hand(rule, positive):
    roi = torch.stack([_periodic_roi(u, f) for u, f in CROP_KINDS])
    _, flags = crop_from_roi(_coord_image(len(CROP_KINDS), 20, 20), roi, crop_size=5, num_crops=4,
                             negative_rule=rule, generator=torch.Generator().manual_seed(0))
    assert (flags[:, :2] == 1).all()
    assert flags[:, 2:].tolist() == [[p] * 4 for p in positive]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_crop_from_roi_on_the_gpu_with_a_gpu_generator():
    """The trainer seeds a generator on its device: crops of CUDA tensors draw from it, as on the CPU."""
    roi = torch.full((2, 16, 16), 2, dtype=torch.long)
    roi[:, 4, 4] = 0
    roi[:, 10:12, 10:12] = 1
    image = _coord_image(2, 16, 16)
    draws = [crop_from_roi(image.cuda(), roi.cuda(), crop_size=4, num_crops=5,
                           generator=torch.Generator("cuda").manual_seed(0)) for _ in range(2)]
    (crops, flags), (again, _) = draws
    assert flags.is_cuda and all(c.is_cuda for c in crops)
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    _, cpu_flags = crop_from_roi(image, roi, crop_size=4, num_crops=5, generator=torch.Generator().manual_seed(0))
    for n in range(2):
        centres = _check_crop_places([c.cpu() for c in crops], n, 4)
        assert sorted(centres) == [(4, 4), (10, 10), (10, 11), (11, 10), (11, 11)]
        assert sorted(flags[n].tolist()) == sorted(cpu_flags[n].tolist())


def test_crop_ratio_edge_is_negative():
    roi = torch.zeros(1, 16, 16, dtype=torch.long)
    roi[0] = 2
    roi[0, 8, 6:11] = 1  # 5 uncertain pixels in a row: a 5x5 crop holds at most 5/25 = 0.2 -> negative (<=)
    crops, flags = crop_from_roi(_coord_image(1, 16, 16), roi, crop_size=5, num_crops=5)
    assert sorted(_check_crop_places(crops, 0, 5)) == [(8, x) for x in range(6, 11)]
    assert (flags[0, 2:] == 0).all()


def test_crop_falls_back_to_whole_window_and_is_seeded():
    roi = torch.full((1, 20, 20), 2, dtype=torch.long)  # no candidate at all
    image = _coord_image(1, 20, 20)
    crops_a, flags_a = crop_from_roi(image, roi, 6, num_crops=8, generator=torch.Generator().manual_seed(5))
    crops_b, _ = crop_from_roi(image, roi, 6, num_crops=8, generator=torch.Generator().manual_seed(5))
    centres = _check_crop_places(crops_a, 0, 6)
    assert len(set(centres)) == 8
    assert all(3 <= y < 17 and 3 <= x < 17 for y, x in centres)  # inside the margin window
    assert (flags_a[0, 2:] == 0).all()  # no uncertain pixel anywhere
    assert all(torch.equal(a, b) for a, b in zip(crops_a, crops_b))


def test_multi_scale_cam_at_sizes_that_are_not_multiples_of_the_patch(tiny_model):
    """36 px at scales 1, 0.5, 1.5 is 36, 18 and 54 px, none a multiple of the patch (8): each scale's CAM is that of
    its input cropped to floor(size / 8) patches, as the original's patch convolution computed it."""
    class Cropped:  # forward_cams on the explicitly cropped input
        def forward_cams(self, x):
            h, w = x.shape[-2] // 8 * 8, x.shape[-1] // 8 * 8
            return tiny_model.forward_cams(x[..., :h, :w])

    images = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    cam, aux = multi_scale_cam(tiny_model, images, (1.0, 0.5, 1.5))
    want_cam, want_aux = multi_scale_cam(Cropped(), images, (1.0, 0.5, 1.5))
    assert cam.shape == (2, 4, 36, 36)
    torch.testing.assert_close(cam, want_cam, rtol=0, atol=0)
    torch.testing.assert_close(aux, want_aux, rtol=0, atol=0)
