"""AdamW with linear warm-up then a poly decay over the absolute step (docs/method.md §4)."""
from __future__ import annotations

import torch


def poly_warmup_factor(step: int, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """lr multiplier before optimizer step `step` (0-based count of completed steps).

    The poly term uses the absolute step, not one offset by the warm-up, so the lr drops at the end of the
    warm-up exactly as in the original (its published logs confirm this).
    """
    if step < warmup_iters:
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return max(1 - step / max_iters, 0.0) ** power


def build_optimizer(model, optim_cfg, max_iters: int):
    enc, enc_norm, heads, decoder = model.param_groups()
    head_lr = optim_cfg.lr * optim_cfg.head_lr_mult
    groups = [
        dict(params=enc, lr=optim_cfg.lr, name="encoder"),
        dict(params=enc_norm, lr=optim_cfg.lr, name="encoder_norm"),
        dict(params=heads, lr=head_lr, name="heads"),
        dict(params=decoder, lr=optim_cfg.lr * (optim_cfg.decoder_lr_mult or optim_cfg.head_lr_mult), name="decoder"),
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps,
                                  weight_decay=optim_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: poly_warmup_factor(step, max_iters, optim_cfg.warmup_iters,
                                                   optim_cfg.warmup_ratio, optim_cfg.power))
    return optimizer, scheduler
