"""The learning-rate schedule every optimiser in nmm uses: linear warmup, then cosine decay.

One function, at the bottom layer (like Meta lingua's `optim.py`), so the language model, the image
tokenizer, the vision encoder and the evaluation networks cannot drift apart in how they decay:

    lr = lr_at(step, peak=cfg.lr, warmup=cfg.warmup_steps, total=max_steps, min_ratio=0.1)
    set_lr(optimizer, lr)

Callers differ only in their arguments (the image tokenizer and vision encoder decay to 5% of the
peak, the language model to `train.min_lr_ratio`, the evaluation networks to 0 with no warmup).
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.0,
          elapsed: float = 0.0) -> float:
    """The learning rate of 0-based `step` of a `total`-step run.

    Steps 0 .. warmup-1 climb linearly to `peak` (step k gets peak * (k+1) / warmup); from `warmup`
    to `total` a half cosine takes it down to `min_ratio * peak`, where it stays after `total`.
    `elapsed` is the fraction of some other budget already spent (e.g. wall-clock time): the decay
    then follows whichever of steps and budget has run further."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(progress, elapsed))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Give every parameter group of `optimizer` the learning rate `lr`; returns it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
