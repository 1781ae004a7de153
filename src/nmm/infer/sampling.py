"""Token samplers: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # >1 discourages text tokens already generated (CTRL-style)
    cfg_scale: float = 1.0  # classifier-free guidance for image tokens; 1 = off
    seed: int | None = None


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    # logits (B, V); history (B, L) ids. Positive logits shrink, negative grow, as in CTRL.
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) with disallowed ids already at -inf -> (B,) sampled ids."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
