"""Estimates with uncertainty: percentile-bootstrap 95% intervals, and the Fréchet distance.

Every number the harness reports is an `Estimate`: the value on the whole sample, a 95% interval
from resampling the evaluation items with replacement, and n, the number of items. Resampling
uses a fixed seed, so the same outputs always give the same interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean(x: Sequence[float] | np.ndarray, seed: int = 0, resamples: int = DEFAULT_RESAMPLES) -> Estimate:
    """Mean of per-item scores (booleans or fractions) with a percentile-bootstrap interval."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("bootstrap_mean needs at least one item")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (R, n) item indices
    low, high = _interval(x[idx].mean(1))
    return Estimate(float(x.mean()), low, high, n)


def bootstrap(statistic: Callable[..., float], arrays: Sequence[np.ndarray], seed: int = 0,
              resamples: int = DEFAULT_RESAMPLES) -> Estimate:
    """Any statistic of paired per-item arrays (same first dimension), resampling items jointly."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError("bootstrap needs non-empty arrays of equal length")
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(*(a[idx] for a in arrays))
                      for idx in rng.integers(0, n, size=(resamples, n))], dtype=np.float64)
    low, high = _interval(draws)
    return Estimate(float(statistic(*arrays)), low, high, n)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2). The last term is
    computed from symmetric eigendecompositions, which stay real and stable when the covariances
    are singular (fewer samples than feature dimensions), unlike a general matrix square root.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = _cov(a), _cov(b)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    d = mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(d, 0.0))  # rounding can leave -1e-12 for identical sets


def _cov(x: np.ndarray) -> np.ndarray:
    if len(x) < 2:
        return np.zeros((x.shape[1], x.shape[1]))
    return np.cov(x, rowvar=False)
