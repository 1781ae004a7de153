"""The one learning-rate schedule (nmm.optim), against the hand-written ones it replaced."""

import math

import pytest
import torch

from nmm.optim import lr_at, set_lr


def old_trainer(step, lr, warmup, total, min_ratio):  # nmm.train.trainer.lr_at before nmm.optim
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def old_image_tokenizer(step, lr, warmup, steps, elapsed):  # train_image_tokenizer's, elapsed = time / budget
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    if elapsed is not None:
        t = max(t, elapsed)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def old_vision(step, lr, steps):  # pretrain_vision_encoder's
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


@pytest.mark.parametrize("total,warmup,min_ratio", [(4, 2, 0.1), (200, 50, 0.1), (1000, 50, 0.2), (37, 0, 0.0)])
def test_same_numbers_as_the_training_loop_had(total, warmup, min_ratio):
    for step in range(total + 3):  # past the end too: a time budget can stretch a run
        assert lr_at(step, 2e-3, warmup, total, min_ratio) == old_trainer(step, 2e-3, warmup, total, min_ratio)


@pytest.mark.parametrize("elapsed", [None, 0.3, 0.9999, 1.5])
def test_same_numbers_as_the_image_tokenizer_had(elapsed):
    for steps, warmup in ((1200, 50), (150, 10), (20, 0)):
        for step in range(steps):
            new = lr_at(step, 4e-3, warmup, steps, 0.05, elapsed or 0.0)
            assert new == old_image_tokenizer(step, 4e-3, warmup, steps, elapsed)


def test_same_numbers_as_the_vision_encoder_had():
    for steps in (6, 120, 400):
        for step in range(steps):
            assert lr_at(step, 2e-3, max(1, steps // 20), steps, 0.05) == old_vision(step, 2e-3, steps)


def test_shape_of_the_schedule():
    assert lr_at(0, 1.0, 4, 100) == 0.25 and lr_at(3, 1.0, 4, 100) == 1.0  # linear warmup to the peak
    assert lr_at(4, 1.0, 4, 100, 0.1) == 1.0  # the cosine starts at the peak ...
    assert lr_at(100, 1.0, 4, 100, 0.1) == pytest.approx(0.1)  # ... ends at min_ratio of it
    assert lr_at(500, 1.0, 4, 100, 0.1) == pytest.approx(0.1)  # and stays there
    assert lr_at(10, 1.0, 0, 100, 0.0, elapsed=1.0) == pytest.approx(0.0)  # a spent budget ends the decay
    decay = [lr_at(s, 1.0, 4, 100, 0.1) for s in range(4, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_set_lr_sets_every_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1.0)
    assert set_lr(opt, 0.125) == 0.125
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.125]
