"""Loss spikes and non-finite steps: detect, then log, skip or roll back (`train.spike_policy`).

Seed 004 names loss spikes as the hard part of training native multimodal models (Chameleon's
divergences came from the image tokens' logits growing). The model side keeps logits bounded
(QK-norm, z-loss); this is the trainer side:

    non-finite loss or gradient   the update is always dropped (AdamW's moments would be poisoned)
    loss > spike_factor x EMA     log: logged; skip: the update is dropped; rollback: the run reloads
                                  its last checkpoint and skips the batches from there to the spike
                                  (plus `spike_skip_window` more), so the bad data window is not replayed

Every decision is made on numbers every rank shares (the all-reduced loss and gradient norm), so all
ranks take the same action. Each event is written into the step's metrics.jsonl record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SpikeEvent:
    kind: str  # loss_spike | nonfinite_loss | nonfinite_grad
    action: str  # logged | skipped | rolled_back
    loss: float
    ema: float | None

    def record(self) -> dict:
        return {"event": self.kind, "action": self.action, "loss_ema": None if self.ema is None else round(self.ema, 5),
                **({"loss_spike": True} if self.kind == "loss_spike" else {})}


class SpikeGuard:
    """The running loss average and the policy. `ema` is saved in checkpoints, so a resumed run
    makes the same decisions as an uninterrupted one."""

    def __init__(self, policy: str, factor: float, warmup: int, ema: float | None = None, decay: float = 0.95):
        self.policy, self.factor, self.warmup, self.ema, self.decay = policy, factor, warmup, ema, decay

    def check(self, step: int, loss: float, grad_norm: float) -> SpikeEvent | None:
        """The event this step raises, if any (call before the optimizer step)."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            kind = "nonfinite_loss" if not math.isfinite(loss) else "nonfinite_grad"
            return SpikeEvent(kind, "rolled_back" if self.policy == "rollback" else "skipped", loss, self.ema)
        if self.ema is not None and step >= self.warmup and loss > self.factor * self.ema:
            action = {"log": "logged", "skip": "skipped", "rollback": "rolled_back"}[self.policy]
            return SpikeEvent("loss_spike", action, loss, self.ema)
        return None

    def accept(self, loss: float) -> None:
        """A step whose update was applied: it joins the average."""
        self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss
