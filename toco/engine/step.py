"""One ToCo training step, in the order of docs/method.md §2-3. Free of MLflow, Ray and the CLI."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toco.config import Config
from toco.data.transforms import denormalize, denormalize_to_uint8
from toco.losses import cls_loss, ctc_loss, dense_crf_loss, ptc_loss, seg_loss
from toco.pseudo import box_mask, cam_to_label, cam_to_roi_mask, crop_from_roi, multi_scale_cam, refine_cams_with_bkg


@dataclass
class StepResult:
    total: torch.Tensor                 # weighted sum, to back-propagate
    losses: dict[str, torch.Tensor]     # every active term, unweighted and detached (read at log steps only:
                                        # reading a GPU value makes the host wait for the device)
    refined_label: torch.Tensor | None  # (B, H, W) segmentation pseudo label, when seg is active


def active_terms(cfg: Config, iteration: int) -> dict[str, bool]:
    """Which losses join at this iteration (docs/method.md §3.6): VOC adds seg + reg after a warm-up;
    COCO also starts PTC + CTC late."""
    contrast = iteration >= cfg.loss.ptc_ctc_start
    seg = iteration >= cfg.loss.seg_start
    return dict(ptc=cfg.loss.use_ptc and contrast, ctc=cfg.loss.use_ctc and contrast, seg=seg, reg=seg)


def waiting_heads(cfg: Config, iteration: int) -> dict[str, bool]:
    """Heads whose losses the schedule has not started yet: the decoder before `seg_start`, the projection head
    before `ptc_ctc_start` (when CTC is on at all; an ablation's switched-off term never starts)."""
    return dict(decoder=iteration < cfg.loss.seg_start,
                proj_head=cfg.loss.use_ctc and iteration < cfg.loss.ptc_ctc_start)


def zero_grads_of_waiting_heads(net, cfg: Config, iteration: int) -> None:
    """Call after backward. The original computed a waiting head's losses with weight 0, so its parameters took
    zero gradients: AdamW advanced their step count and moments and applied weight decay. Zero gradients (not
    None) do exactly that without the forward passes (docs/method.md §3.6). `optim.waiting_heads: frozen` leaves
    them untouched instead: AdamW starts them afresh when their loss starts."""
    if cfg.optim.waiting_heads == "frozen":
        return
    waiting = waiting_heads(cfg, iteration)
    heads = [head for name, head in (("decoder", net.decoder), ("proj_head", net.proj_head)) if waiting[name]]
    for p in (p for head in heads for p in head.parameters()):
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def token_box(img_box: torch.Tensor, patch_size: int, legacy_bugs: bool) -> torch.Tensor:
    """The padding box on the token grid. The original applied the pixel box unscaled (a bug, docs/method.md §7)."""
    if legacy_bugs:
        return img_box
    start = torch.div(img_box[:, 0::2], patch_size, rounding_mode="floor")
    end = torch.div(img_box[:, 1::2] + patch_size - 1, patch_size, rounding_mode="floor")
    return torch.stack([start[:, 0], end[:, 0], start[:, 1], end[:, 1]], dim=1)


def train_step(model, par, batch: dict, cfg: Config, iteration: int,
               generator: torch.Generator | None = None) -> StepResult:
    images, cls_label, img_box = batch["image"], batch["cls_label"], batch["img_box"]
    b, _, height, width = images.shape
    pseudo_cfg, loss_cfg = cfg.pseudo, cfg.loss
    active = active_terms(cfg, iteration)

    net = getattr(model, "module", model)  # the bare ToCoNet inside a DDP wrapper
    # bf16: the network under autocast; its outputs, the losses, the CAM normalisation and the filters in fp32
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    # 1. multi-scale CAMs from the current weights, no gradient (docs/method.md §2.1); only PTC, CTC and seg read
    # them, so a step with none of them active (COCO's first stage, the ablation baseline's warm-up) skips the cost
    if any(active.values()):
        with autocast:
            cam, aux_cam = multi_scale_cam(net, images, pseudo_cfg.cam_scales)  # (B, C-1, H, W) each, in [0, 1]

    # 2. one forward with gradient: main input, and for CTC the second global view and the local crops
    crops = flags = None
    if active["ctc"]:  # local crops centred in uncertain regions of the aux-CAM ROI (docs/method.md §3.3)
        roi = cam_to_roi_mask(aux_cam, cls_label, pseudo_cfg.low_thre, pseudo_cfg.high_thre)
        crop_list, flags = crop_from_roi(batch["local_image"], roi, cfg.data.local_crop_size,
                                         cfg.data.num_local_crops, pseudo_cfg.uncertain_ratio,
                                         negative_rule=pseudo_cfg.ctc_negative_rule, generator=generator)
        crops = torch.cat(crop_list)
    with autocast:
        out = model(images, batch["global2"] if active["ctc"] else None, crops, loss_cfg.ema_momentum,
                    seg=active["seg"])
    out = out.float()
    if waiting_heads(cfg, iteration)["proj_head"]:
        net.update_teacher(loss_cfg.ema_momentum)  # the original's teacher followed the student every iteration

    losses = {"cls": cls_loss(out.cls_logits, cls_label), "aux_cls": cls_loss(out.aux_cls_logits, cls_label)}
    weights = {"cls": 1.0, "aux_cls": 1.0}
    if out.token_logits is not None:  # the class token's classifier (model.token_classifier)
        losses["cls_token"], weights["cls_token"] = cls_loss(out.token_logits, cls_label), 1.0

    if active["ptc"]:  # PTC on the final tokens, guided by aux-CAM token labels (docs/method.md §3.2)
        grid = out.tokens.shape[-2:]
        aux_cam_tokens = F.interpolate(aux_cam, size=grid, mode="bilinear", align_corners=False)
        token_label = cam_to_label(aux_cam_tokens, cls_label, pseudo_cfg.bkg_thre, pseudo_cfg.high_thre, pseudo_cfg.low_thre,
                                   ignore_mid=True, img_box=token_box(img_box, net.patch_size, cfg.legacy_bugs))
        losses["ptc"], weights["ptc"] = ptc_loss(out.tokens, token_label), loss_cfg.w_ptc

    if active["ctc"]:
        losses["ctc"] = ctc_loss(out.student, out.teacher, flags, loss_cfg.ctc_temperature, legacy_bugs=cfg.legacy_bugs)
        weights["ctc"] = loss_cfg.w_ctc

    refined_label = None
    if active["seg"]:  # segmentation on PAR-refined CAM labels, plus the DenseCRF regulariser
        image255 = denormalize(images)                           # (B, 3, H, W) in 0..255, float
        image01 = denormalize_to_uint8(images) / 255.0           # PAR reads the original's 8-bit image
        seg_cam = aux_cam if iteration < loss_cfg.cam_source_until else cam
        refined_label = refine_cams_with_bkg(par, image01, seg_cam, cls_label, pseudo_cfg.high_thre, pseudo_cfg.low_thre,
                                             img_box=img_box)
        losses["seg"], weights["seg"] = seg_loss(out.seg_logits, refined_label), loss_cfg.w_seg
        probs = F.interpolate(out.seg_logits, size=(height, width), mode="bilinear",
                              align_corners=False).softmax(dim=1)
        losses["reg"] = dense_crf_loss(image255, probs, box_mask(img_box, (height, width)), refined_label,
                                       sigma_rgb=loss_cfg.reg_sigma_rgb, sigma_xy=loss_cfg.reg_sigma_xy,
                                       downscale=loss_cfg.reg_downscale, energy_scale=loss_cfg.reg_energy_scale,
                                       backend=loss_cfg.reg_backend)
        weights["reg"] = loss_cfg.w_reg

    total = sum(weights[k] * v for k, v in losses.items())
    return StepResult(total, {k: v.detach() for k, v in losses.items()}, refined_label)
