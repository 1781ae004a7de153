"""Checks and settings shared by the route modules (nmm.serve.routes, nmm.serve.audio): the model name
and `n`, and a request's sampling fields -> `SamplingConfig`."""

from __future__ import annotations

from nmm.infer.sampling import SamplingConfig
from nmm.serve.schemas import ApiError
from nmm.serve.state import ServerState


def check_common(state: ServerState, model: str | None, n: int = 1) -> None:
    if model is not None and model != state.model_name:
        raise ApiError(404, f"model '{model}' does not exist; this server has '{state.model_name}'", param="model",
                       code="model_not_found")
    if n > state.limits.max_n:
        raise ApiError(400, f"n is {n}; at most {state.limits.max_n}", param="n", code="invalid_value")


def or_default(value, default):
    return default if value is None else value


def sampling(req, default_temperature: float, choice: int, **kw) -> SamplingConfig:
    t = or_default(req.temperature, default_temperature)
    t = 0.0 if t < 1e-3 else t  # dividing logits by a tinier temperature overflows: that is greedy anyway
    # Each choice has its own random stream; with a seed, choice i uses seed + i (reproducible, yet different).
    seed = None if req.seed is None else req.seed + choice
    return SamplingConfig(temperature=t, top_k=getattr(req, "top_k", None), top_p=getattr(req, "top_p", None),
                          seed=seed, **kw)
