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


def decoder_warmup_factor(step: int, seg_start: int, warmup_iters: int) -> float:
    """The decoder's extra lr multiplier before optimizer step `step`: a linear ramp from 1/warmup_iters at
    `seg_start`, where its loss starts, to 1 after `warmup_iters` steps (1 throughout when warmup_iters is 0)."""
    if warmup_iters <= 0 or step >= seg_start + warmup_iters:
        return 1.0
    return max(step - seg_start + 1, 0) / warmup_iters


def build_optimizer(model, optim_cfg, max_iters: int, seg_start: int = 0):
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

    def schedule(step: int) -> float:
        return poly_warmup_factor(step, max_iters, optim_cfg.warmup_iters, optim_cfg.warmup_ratio, optim_cfg.power)

    def decoder_schedule(step: int) -> float:
        return schedule(step) * decoder_warmup_factor(step, seg_start, optim_cfg.decoder_warmup_iters)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * 3 + [decoder_schedule])
    return optimizer, scheduler
