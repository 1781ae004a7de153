"""Finite scalar quantisation (FSQ, Mentzer et al. 2023), shared by every codec that makes codes.

Each latent channel is squashed with tanh onto L levels and rounded with a straight-through
gradient, so there is no codebook to collapse and a code id is just the mixed-radix number of the
channel digits (first channel least significant).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nmm.errors import ConfigError


class FSQ(nn.Module):
    """Quantises channel dim 1: (B, D, *rest) -> values in [-1, 1] of the same shape, ids (B, *rest)."""

    def __init__(self, levels: list[int], noise: bool = False):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ConfigError(f"FSQ levels must be integers >= 2, got {levels}")
        basis = np.cumprod([1] + list(levels[:-1]))
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        self.register_buffer("basis", torch.tensor(basis), persistent=False)
        self.n_codes = int(np.prod(levels))
        # Training with uniform noise instead of rounding (as in learned compression) gives true
        # gradients through the bins; it keeps small codes (colour) from parking two inputs in one bin.
        self.noise = noise

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:  # (D,) -> (1, D, 1, ...) for ndim dims
        return t.view(1, -1, *([1] * (ndim - 2)))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, basis = self._view(self.levels, z.ndim), self._view(self.basis, z.ndim)
        u = (torch.tanh(z) + 1) / 2 * L - 0.5  # (-0.5, L-0.5): every level gets an equal-width bin
        rounded = u.round().clamp(min=0).minimum(L - 1)
        codes = (rounded.detach().long() * basis).sum(1)
        if self.training and self.noise:
            q = u + torch.rand_like(u) - 0.5
        else:
            q = u + (rounded - u).detach()  # straight-through rounding
        return q * 2 / (L - 1) - 1, codes

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """ids (B, *rest) -> values (B, D, *rest), the inverse of `forward`'s rounding."""
        L, basis = self._view(self.levels, codes.ndim + 1), self._view(self.basis, codes.ndim + 1)
        digits = (codes.unsqueeze(1) // basis) % L
        return digits.float() * 2 / (L - 1) - 1
