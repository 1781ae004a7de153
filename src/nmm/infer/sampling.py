"""Token sampling, the one sampler of `Engine.generate` and the `Scheduler`: greedy, temperature,
top-k, top-p and repetition penalty, every row with its own settings and its own random numbers.

Each request draws its uniforms up front from its own generator (`draw_uniforms`, one per generated
token, on the CPU so a seed gives the same tokens on any device); step t of a row uses its t-th
uniform, whatever else runs in the batch. `sample_rows` turns a row's logits and uniform into a token
by inverse CDF; `inverse_cdf_residual` does it factor by factor for factorised image codes (the
first factor by its marginal, the next by where the uniform fell in the chosen slice: the joint
inverse CDF, since codes are ordered factor by factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # >1 discourages text tokens already generated (CTRL-style)
    cfg_scale: float = 1.0  # classifier-free guidance for image tokens; 1 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def truncated(self) -> bool:
        """top-k or top-p: the joint ranking of all ids is needed (no factor-by-factor image codes)."""
        return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0)


def draw_uniforms(cfg: SamplingConfig, rows: int, steps: int) -> torch.Tensor | None:
    """(rows, steps) uniforms in [0, 1) from the request's own seeded CPU generator (None when greedy):
    row r, step t samples with [r, t]. One row gets exactly `torch.rand(steps)` of its seed."""
    if cfg.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(cfg.seed) if cfg.seed is not None else gen.seed()
    return torch.rand(rows, steps, generator=gen)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Repetition penalty (CTRL): where `seen` (B, V) is set, positive logits shrink and negative ones grow
    by the row's `penalty` (B,); a penalty of 1 leaves a row as it is."""
    p = penalty.unsqueeze(1)
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def record_text(seen: torch.Tensor, tokens: torch.Tensor, n_text: int) -> None:
    """Mark the text ids among `tokens` (B,) as seen (B, V) by their row: what `penalize` discourages."""
    index = tokens.unsqueeze(1)
    seen.scatter_(1, index, seen.gather(1, index) | (index < n_text))


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) with disallowed ids already at -inf -> (B,) ids, every row with `cfg`: `sample_rows`
    with one uniform per row from `generator`."""
    B, dev = logits.shape[0], logits.device
    if cfg.greedy:
        return logits.argmax(-1)
    uniform = torch.rand(B, generator=generator, device=generator.device if generator is not None else "cpu")
    uniform = uniform.to(dev)
    return sample_rows(logits, torch.full((B,), float(cfg.temperature), device=dev),
                       torch.full((B,), int(cfg.top_k or 0), dtype=torch.long, device=dev),
                       torch.full((B,), 1.0 if cfg.top_p is None else float(cfg.top_p), device=dev), uniform)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor) -> torch.Tensor:
    """Batched sampling where every row has its own settings and its own random number.

    logits (B, V) with disallowed ids at -inf; temperature (B,) (0 = greedy); top_k (B,) long (0 = off);
    top_p (B,) (1 = off); uniform (B,) in [0, 1), drawn from each request's own generator, so a request's
    draws never depend on which other requests share the batch. Row by row this is the distribution of
    `sample` (same temperature, top-k and top-p rules), drawn by inverse CDF instead of torch.multinomial,
    so the same seed gives other tokens than `sample` does. Returns (B,) ids.
    """
    greedy = logits.argmax(-1)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return greedy
    V = logits.shape[-1]
    scaled = logits.float() / torch.where(sampled, temperature, 1.0).unsqueeze(1)
    picked = _inverse_cdf(scaled.softmax(-1), uniform)
    # Only rows with top-k or top-p pay for a sort (a full-vocabulary sort costs more than the model step).
    truncated = sampled & (((top_k > 0) & (top_k < V)) | (top_p < 1))
    if bool(truncated.any()):
        rows = truncated.nonzero().squeeze(1)
        sorted_logits, order = torch.sort(scaled[rows], descending=True, dim=-1)
        k = torch.where(top_k[rows] > 0, top_k[rows].clamp(max=V), V)
        kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # ties with the k-th are kept, as in `sample`
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p[rows].unsqueeze(1)  # the smallest prefix reaching top_p
        index = _inverse_cdf(probs.masked_fill(drop, 0.0), uniform[rows])  # a position in sorted order
        picked[rows] = order.gather(1, index.unsqueeze(1)).squeeze(1)
    return torch.where(sampled, picked, greedy)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B, V) unnormalised probabilities, (B,) uniforms -> (B,) the first index whose cumulative mass
    exceeds u * total (never a zero-probability index)."""
    cum = probs.cumsum(-1)
    index = torch.searchsorted(cum, uniform.unsqueeze(1).to(cum.dtype) * cum[:, -1:], right=True)
    return index.clamp(max=probs.shape[-1] - 1).squeeze(1)


def inverse_cdf_residual(probs: torch.Tensor, uniform: torch.Tensor,
                         residual: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(k, f) probabilities (unnormalised), (k,) uniforms in [0, 1) -> the first index whose cumulative mass
    exceeds u * total (never a zero-probability one), and where u fell inside that index's slice, in [0, 1]:
    the uniform for the next factor (None without `residual`: the last factor needs none)."""
    cum = probs.cumsum(-1)
    total = cum[:, -1]
    x = torch.minimum(uniform.to(cum.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cum, x.unsqueeze(1), right=True).squeeze(1)
    if not residual:
        return index, None
    below = F.pad(cum, (1, 0)).gather(1, index.unsqueeze(1)).squeeze(1)
    width = cum.gather(1, index.unsqueeze(1)).squeeze(1) - below
    return index, ((x - below) / width).clamp(0.0, 1.0)


class SamplingRows:
    """Per-row sampling settings on the device, for `rows` rows of `steps` tokens at most: temperature,
    top-k (0 = off), top-p (1 = off), repetition penalty, the pre-drawn uniforms and (with a penalty) the
    text ids each row has generated. `set` fills some rows from a request's config; `move` copies a row."""

    def __init__(self, rows: int, steps: int, vocab_size: int, device, penalty: bool = True):
        self.temperature = torch.zeros(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.uniforms = torch.zeros(rows, steps, device=device)
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device) if penalty else None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.temperature, self.top_k, self.top_p, self.penalty, self.uniforms, self.seen)
                if t is not None]

    def set(self, rows: slice, cfg: SamplingConfig, uniforms: torch.Tensor | None = None) -> None:
        """Rows `rows` sample with `cfg`; `uniforms` (k, L) or (L,) from `draw_uniforms` (L <= steps)."""
        self.temperature[rows] = cfg.temperature
        self.top_k[rows] = cfg.top_k or 0
        self.top_p[rows] = 1.0 if cfg.top_p is None else cfg.top_p
        self.penalty[rows] = cfg.repetition_penalty
        if self.seen is not None:
            self.seen[rows] = False
        if uniforms is not None:
            self.uniforms[rows, : uniforms.shape[-1]] = uniforms.to(self.uniforms.device)

    def move(self, src: int, dst: int) -> None:
        for t in self.tensors:
            t[dst] = t[src]
