"""The learning-rate schedule every optimiser in nmm uses: linear warmup, then cosine decay.

One function, at the bottom layer (like Meta lingua's `optim.py`), so the language model, the image
tokenizer, the vision encoder and the evaluation networks cannot drift apart in how they decay:

    lr = lr_at(step, peak=cfg.lr, warmup=cfg.warmup_steps, total=max_steps, min_ratio=0.1)
    set_lr(optimizer, lr)

Callers differ only in their arguments (the image tokenizer and vision encoder decay to 5% of the
peak, the language model to `train.min_lr_ratio`, the evaluation networks to 0 with no warmup).
`fit` is the plain loop the small networks share (the codecs): schedule, step, progress, budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

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


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_at: Callable[[int], torch.Tensor],
        steps: int, peak: float, warmup: int, min_ratio: float = 0.05,
        progress: Callable[[int, int, float], None] | None = None,
        time_budget_s: float | None = None, clip: float | None = None) -> list[float]:
    """Train `model` for `steps` steps of `loss_at(step)` (which draws its own batch), with `lr_at`'s
    schedule; under `time_budget_s` it stops when the time is spent and decays on whichever of steps
    and time runs out first. `clip`: the gradient norm is clipped to it. `progress(step, steps, loss)`
    after each step. Returns the losses; the model is left in eval mode."""
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        spent = time.perf_counter() - start
        if time_budget_s is not None and spent > time_budget_s:
            break
        set_lr(optimizer, lr_at(step, peak, warmup, steps, min_ratio, spent / time_budget_s if time_budget_s else 0.0))
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    model.eval()
    return losses
