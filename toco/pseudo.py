"""Pseudo labels made inside a training step (docs/method.md §2, §3.2-3.3).

- `multi_scale_cam`: normalised multi-scale, flip-augmented CAM and aux-CAM.
- `cam_to_label`: CAM -> label map with the bkg / ignore-mid thresholds.
- `cam_to_roi_mask`: CAM -> {0: confident bg, 1: uncertain, 2: confident fg} for CTC crops.
- `refine_cams_with_bkg`: PAR-refined segmentation pseudo labels (two background planes).
- `crop_from_roi`: CTC local crops and their positive / negative flags.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def box_mask(img_box, size: tuple[int, int]) -> torch.Tensor:
    """(B,4) [h0,h1,w0,w1] boxes -> (B,H,W) bool, True inside the box (half-open ranges, clipped to the map)."""
    h, w = size
    device = img_box.device if torch.is_tensor(img_box) else None
    box = torch.as_tensor(img_box, device=device).long()
    ys = torch.arange(h, device=box.device).view(1, h, 1)
    xs = torch.arange(w, device=box.device).view(1, 1, w)
    inside_y = (ys >= box[:, 0].view(-1, 1, 1)) & (ys < box[:, 1].view(-1, 1, 1))
    inside_x = (xs >= box[:, 2].view(-1, 1, 1)) & (xs < box[:, 3].view(-1, 1, 1))
    return inside_y & inside_x


def _max_valid_cam(cam: torch.Tensor, cls_label: torch.Tensor):
    """v = max_c y_c * cam_c and its channel index; absent classes are zeroed first. (B,H,W) each."""
    valid = cam * cls_label.to(cam.dtype)[:, :, None, None]
    return valid.max(dim=1)


# ----------------------------------------------------------------------------------------------------
# docs/method.md §2.1
@torch.no_grad()
def multi_scale_cam(model, images: torch.Tensor, scales=(1.0, 0.5, 1.5)):
    """Multi-scale + flip CAMs, each (B,C-1,H,W) in [0,1].

    `model.forward_cams(x)` returns raw (cam, aux_cam) at the token grid (no ReLU). Per scale: resize the input
    (bilinear, align_corners=False) to (int(s*H), int(s*W)); run [x, flip(x)]; upsample to (H,W); element-wise
    max of an image and its un-flipped flip; ReLU. Sum over scales, then per image and channel
    (cam - min) / (max + 1e-5). Deviation: the original always adds scale 1.0 even if absent from `scales`;
    here exactly the given scales are used (the reference list contains 1.0 anyway).
    """
    b, _, h, w = images.shape
    cam_sum = aux_sum = None
    for s in scales:
        size = (int(s * h), int(s * w))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        cam, aux = model.forward_cams(torch.cat([x, x.flip(-1)], dim=0))  # (2B,C-1,h',w') each
        cam, aux = (_fuse_flip(t, b, (h, w)) for t in (cam, aux))
        cam_sum = cam if cam_sum is None else cam_sum + cam
        aux_sum = aux if aux_sum is None else aux_sum + aux
    return _minmax_normalise(cam_sum), _minmax_normalise(aux_sum)


def _fuse_flip(cam: torch.Tensor, b: int, size) -> torch.Tensor:
    cam = F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=False)
    return F.relu(torch.maximum(cam[:b], cam[b:].flip(-1)))


def _minmax_normalise(cam: torch.Tensor) -> torch.Tensor:
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + 1e-5)


# ----------------------------------------------------------------------------------------------------
# docs/method.md §2.2
def cam_to_label(cam: torch.Tensor, cls_label: torch.Tensor, bkg_thre: float, high_thre: float | None = None,
                 low_thre: float | None = None, ignore_mid: bool = False, img_box: torch.Tensor | None = None,
                 ignore_index: int = 255) -> torch.Tensor:
    """CAM (B,C-1,H,W) -> label map (B,H,W) int64.

    v = max_c y_c cam_c, label = argmax + 1; 0 where v <= bkg_thre. With ignore_mid: ignore where v <= high_thre,
    then 0 where v <= low_thre. Outside img_box -> ignore. (The original applies ignore_mid only when a box is
    given; here the two options are independent.)
    """
    value, index = _max_valid_cam(cam, cls_label)
    label = index + 1
    label[value <= bkg_thre] = 0
    if ignore_mid:
        if high_thre is None or low_thre is None:
            raise ValueError("ignore_mid needs high_thre and low_thre")
        label[value <= high_thre] = ignore_index
        label[value <= low_thre] = 0
    if img_box is not None:
        label[~box_mask(img_box, label.shape[-2:]).to(label.device)] = ignore_index
    return label


def cam_to_roi_mask(cam: torch.Tensor, cls_label: torch.Tensor, low_thre: float, high_thre: float) -> torch.Tensor:
    """ROI mask (B,H,W) int64 for CTC: 0 where v <= low, 2 where v >= high (note >=, as the original), else 1."""
    value, _ = _max_valid_cam(cam, cls_label)
    roi = torch.ones_like(value, dtype=torch.long)
    roi[value <= low_thre] = 0
    roi[value >= high_thre] = 2
    return roi


# ----------------------------------------------------------------------------------------------------
# docs/method.md §2.3-2.4
def _present_keys(cls_label: torch.Tensor):
    """Channel keys of {bg} + present classes per image, padded to the batch maximum.

    Returns keys (B,K) int64 indexing the [bg, cam_1..cam_{C-1}] stack (= class ids) and valid (B,K) bool.
    Present classes are listed in increasing order, bg first, like the original's nonzero().
    """
    present = torch.cat([torch.ones_like(cls_label[:, :1]), cls_label], dim=1) > 0  # (B,C)
    k = int(present.sum(dim=1).max())
    # Stable sort puts present channels first while keeping their order.
    order = torch.sort((~present).to(torch.int8), dim=1, stable=True).indices[:, :k]  # (B,K)
    valid = present.gather(1, order)
    return order, valid


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over channels of (B,K,H,W) with invalid channels at -inf (they get exactly 0): identical to a
    softmax over the valid channels alone."""
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    return scores.softmax(dim=1)


@torch.no_grad()
def refine_cams_with_bkg(par, images01: torch.Tensor, cam: torch.Tensor, cls_label: torch.Tensor,
                         high_thre: float, low_thre: float, img_box: torch.Tensor | None = None,
                         ignore_index: int = 255, down_scale: float = 0.5) -> torch.Tensor:
    """PAR-refined segmentation pseudo labels (B,H,W) int64.

    images01: (B,3,H,W) RGB in [0,1] (the augmented training input); cam: (B,C-1,H,W) normalised CAM.
    Two score stacks [bg plane at high_thre, y*cam] and [bg plane at low_thre, y*cam] are downscaled by
    `down_scale` (bilinear), restricted to {bg} + present classes (softmax), refined by PAR in ONE call
    (channels of both stacks concatenated; PAR is linear per channel), upsampled back (bilinear), argmax'ed.
    Combine: fg from the high map, its bg -> ignore, bg where both maps say bg; outside img_box -> ignore.
    """
    b, _, h, w = images01.shape
    small = (int(h * down_scale), int(w * down_scale))
    img_small = F.interpolate(images01.float(), size=small, mode="bilinear", align_corners=False)

    valid_cam = cam.float() * cls_label.float()[:, :, None, None]
    keys, valid = _present_keys(cls_label)  # (B,K)
    k = keys.shape[1]
    stacks = []
    for thre in (high_thre, low_thre):
        bkg = torch.full_like(valid_cam[:, :1], float(thre))
        scores = torch.cat([bkg, valid_cam], dim=1)  # (B,C,H,W)
        scores = F.interpolate(scores, size=small, mode="bilinear", align_corners=False)
        scores = scores.gather(1, keys[:, :, None, None].expand(-1, -1, *small))  # (B,K,h,w)
        stacks.append(_masked_softmax(scores, valid))
    refined = par(img_small, torch.cat(stacks, dim=1))  # (B,2K,h,w)
    refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)

    labels = []
    for r in (refined[:, :k], refined[:, k:]):
        # Padding channels hold exactly 0 after PAR; -inf makes sure they can never win the argmax.
        r = r.masked_fill(~valid[:, :, None, None], float("-inf"))
        labels.append(keys.gather(1, r.argmax(dim=1).flatten(1)).view(b, h, w))  # channel -> class id
    label_h, label_l = labels

    label = label_h.clone()
    label[label_h == 0] = ignore_index
    label[(label_h == 0) & (label_l == 0)] = 0
    if img_box is not None:
        label[~box_mask(img_box, (h, w)).to(label.device)] = ignore_index
    return label


# ----------------------------------------------------------------------------------------------------
# docs/method.md §3.3
def _crop_corners(roi: torch.Tensor, crop_size: int, num_crops: int, generator) -> torch.Tensor:
    """Top-left corners (B,num_crops,2) of the crops; a crop at corner (y,x) is centred at (y+m, x+m), m=c//2.

    Candidates: pixels with roi <= 1 (not confident fg) in the window roi[m:H-m, m:W-m]; every window pixel if
    there are fewer than num_crops of them. A random permutation picks num_crops (cycled if the window itself
    holds fewer pixels than num_crops; the original would fail there).
    """
    b, h, w = roi.shape
    m = crop_size // 2
    window = roi[:, m:h - m, m:w - m]
    if window.numel() == 0 or h < crop_size or w < crop_size:
        raise ValueError(f"ROI map {h}x{w} is too small for {crop_size}-pixel crops")
    corners = []
    for i in range(b):
        cand = (window[i] <= 1).nonzero()  # (n,2) in window coordinates = crop corners
        if cand.shape[0] < num_crops:
            cand = torch.ones_like(window[i], dtype=torch.bool).nonzero()  # the whole window
        # drawn where the generator lives: the trainer's generator is on the training device
        perm = torch.randperm(cand.shape[0], generator=generator,
                              device=generator.device if generator is not None else "cpu")
        idx = perm[torch.arange(num_crops) % perm.numel()].to(cand.device)
        corners.append(cand[idx])
    return torch.stack(corners)  # (B,num_crops,2)


def _gather_crops(x: torch.Tensor, corners: torch.Tensor, crop_size: int) -> torch.Tensor:
    """x (B,...,H,W) channels-first with any leading dims after B; returns (B,n,...,c,c)."""
    b, n = corners.shape[:2]
    ar = torch.arange(crop_size, device=x.device)
    rows = corners[..., 0, None] + ar  # (B,n,c)
    cols = corners[..., 1, None] + ar  # (B,n,c)
    xl = x.movedim((-2, -1), (1, 2))  # (B,H,W,...)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    crops = xl[bidx, rows[:, :, :, None], cols[:, :, None, :]]  # (B,n,c,c,...)
    return crops.movedim((2, 3), (-2, -1))


# how much a confident-foreground pixel counts towards a crop's share, per CTC negative rule (an uncertain one counts 1)
FOREGROUND_WEIGHT = {"uncertain": 0, "not_background": 1, "original": 2}
NEGATIVE_RULES = tuple(FOREGROUND_WEIGHT)


def crop_from_roi(local_image: torch.Tensor, roi: torch.Tensor, crop_size: int, num_crops: int = 8,
                  uncertain_ratio: float = 0.2, negative_rule: str = "uncertain",
                  generator: torch.Generator | None = None):
    """CTC local crops: (list of num_crops tensors (B,3,c,c), flags (B,num_crops+2) int64).

    A crop is negative (flag 0) when its share s of c^2 pixels is <= uncertain_ratio, else positive (1); the two
    global views (flags[:, :2]) are positive. `negative_rule` says what s counts (docs/method.md §3.3):
    - "uncertain": uncertain pixels (roi == 1): a crop is negative when it holds little uncertainty;
    - "not_background": uncertain + confident-foreground pixels: negative when it is mostly confident background;
    - "original": uncertain + 2 x confident foreground (the original's sum of roi), foreground counted twice.
    """
    if negative_rule not in NEGATIVE_RULES:
        raise ValueError(f"unknown CTC negative rule {negative_rule!r}; choose from {NEGATIVE_RULES}")
    if local_image.shape[0] != roi.shape[0] or local_image.shape[-2:] != roi.shape[-2:]:
        raise ValueError(f"local_image {tuple(local_image.shape)} and roi {tuple(roi.shape)} must match")
    corners = _crop_corners(roi, crop_size, num_crops, generator).to(local_image.device)
    crops = _gather_crops(local_image, corners, crop_size)  # (B,n,3,c,c)
    roi_crops = _gather_crops(roi.to(local_image.device), corners, crop_size)  # (B,n,c,c)
    uncertain = (roi_crops == 1).sum(dim=(-2, -1))
    foreground = (roi_crops == 2).sum(dim=(-2, -1))
    share = (uncertain + FOREGROUND_WEIGHT[negative_rule] * foreground).float() / crop_size ** 2
    flags = torch.ones(roi.shape[0], num_crops + 2, dtype=torch.long, device=local_image.device)
    flags[:, 2:] = (share > uncertain_ratio).long()
    return list(crops.unbind(dim=1)), flags
