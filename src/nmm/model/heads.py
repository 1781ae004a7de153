"""Modality embeddings and output heads.

Text ids (and specials) use an ordinary embedding table and linear head. Image codes may be
*factorised* into independent factors (the image tokenizer's shape code and colour code): the
embedding of a code is the sum of its factor embeddings, and its logit is the sum of its factor
logits. The joint distribution over codes is then a product of per-factor distributions, so a
caption's "yellow" and "triangle" can each drive one factor even when the pair never occurred
together in training: the design reason behind nmm's compositional generalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nmm.modalities.base import split_codes


class FactorisedEmbedding(nn.Module):
    def __init__(self, factors: tuple[int, ...], dim: int):
        super().__init__()
        self.factors = factors
        self.tables = nn.ModuleList(nn.Embedding(f, dim) for f in factors)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return sum(table(part) for table, part in zip(self.tables, split_codes(codes, self.factors)))


class ImageHead(nn.Module):
    """Hidden state -> logits over image codes, as a sum of per-factor logits."""

    def __init__(self, factors: tuple[int, ...], dim: int):
        super().__init__()
        self.factors = factors
        self.proj = nn.ModuleList(nn.Linear(dim, f, bias=False) for f in factors)

    def factor_logits(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [p(h) for p in self.proj]  # each (..., f_i)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        parts = self.factor_logits(h)
        logits = parts[0]
        for part in parts[1:]:  # broadcast-add into the joint grid (..., a, b), then flatten to (..., a*b)
            logits = (logits.unsqueeze(-1) + part.unsqueeze(-2)).flatten(-2)
        return logits  # (..., prod(factors))

    def scores(self, h: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, D), codes (…,) -> (logit of each code, log-partition over all codes), each (…,), fp32.
        A code's logit is the sum of its factors' logits, so the log-partition is the sum of the
        factors' log-partitions: the joint grid is never built."""
        parts = [p.float() for p in self.factor_logits(h)]
        picked = sum(p.gather(-1, c.unsqueeze(-1)).squeeze(-1) for p, c in zip(parts, split_codes(codes, self.factors)))
        return picked, sum(torch.logsumexp(p, dim=-1) for p in parts)

    def loss(self, h: torch.Tensor, codes: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy (+ z-loss). For a product distribution the joint CE is the sum of
        factor CEs, so the joint logits never need to be materialised."""
        picked, log_z = self.scores(h, codes)
        return log_z - picked, z_loss * log_z.pow(2)


class TextHead(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, vocab, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def loss(self, h: torch.Tensor, ids: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, D), target ids (…,) -> per-position cross-entropy and z-loss, each (…,)."""
        logits = self.proj(h).float()
        ce = F.cross_entropy(logits.flatten(0, -2), ids.flatten(), reduction="none").view(ids.shape)
        return ce, z_loss * torch.logsumexp(logits, -1).pow(2)


def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2 style init; residual output projections scaled down with depth."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w_down.weight")) else 1.0
        nn.init.normal_(p, mean=0.0, std=std * scale)
