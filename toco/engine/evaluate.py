"""In-training validation (SPEC §5): single-scale segmentation, CAM and aux-CAM labels, classification F1."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from toco.metrics import ConfusionMatrix, multilabel_f1
from toco.pseudo import cam_to_label, multi_scale_cam


@dataclass
class EvalResult:
    metrics: dict[str, float]
    confusion: dict[str, ConfusionMatrix]
    samples: list[dict] = field(default_factory=list)  # a few images with their maps, for pictures


@torch.no_grad()
def evaluate(model, loader, num_classes: int, pseudo_cfg, device, limit: int = 0, keep: int = 0) -> EvalResult:
    was_training = model.training
    model.eval()
    confusion = {k: ConfusionMatrix(num_classes) for k in ("seg", "cam", "aux_cam")}
    predicted, targets, samples, seen = [], [], [], 0
    for batch in loader:
        images = batch["image"].to(device)
        cls_label = batch["cls_label"].to(device)
        masks = batch["mask"]                                    # (B, H, W) at the original size
        size = masks.shape[-2:]
        out = model(images)
        seg = F.interpolate(out.seg_logits, size=size, mode="bilinear", align_corners=False).argmax(1)
        cam, aux_cam = multi_scale_cam(model, images, pseudo_cfg.cam_scales)
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
        aux_cam = F.interpolate(aux_cam, size=size, mode="bilinear", align_corners=False)
        cam_label = cam_to_label(cam, cls_label, pseudo_cfg.bkg_thre)
        aux_label = cam_to_label(aux_cam, cls_label, pseudo_cfg.bkg_thre)
        for key, pred in (("seg", seg), ("cam", cam_label), ("aux_cam", aux_label)):
            confusion[key].update(pred.cpu().numpy(), masks.numpy())
        predicted.append((out.cls_logits > 0).cpu().numpy())
        targets.append(cls_label.cpu().numpy() > 0.5)
        for i in range(images.shape[0]):
            if len(samples) < keep:
                samples.append(dict(name=batch["name"][i], raw=batch["raw"][i].numpy(), mask=masks[i].numpy(),
                                    cam=cam[i].cpu().numpy(), cls_label=cls_label[i].cpu().numpy(),
                                    cam_label=cam_label[i].cpu().numpy(), pred=seg[i].cpu().numpy()))
        seen += images.shape[0]
        if limit and seen >= limit:
            break
    model.train(was_training)
    metrics = {f"val/miou_{k}": float(v.miou()) for k, v in confusion.items()}
    metrics["val/cls_f1"] = float(multilabel_f1(np.concatenate(predicted), np.concatenate(targets)))
    return EvalResult(metrics, confusion, samples)
