"""Checks and settings shared by the route modules (nmm.serve.routes, .audio, .video): the model name
and `n`, a request's sampling fields -> `SamplingConfig`, and the scheduler requests that have the model
write one item of a modality (speech, a video clip) for a text."""

from __future__ import annotations

from nmm.infer.sampling import SamplingConfig
from nmm.infer.scheduler import Request
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


def item_requests(state: ServerState, name: str, text: str, n: int, req, param: str, cfg_default: float,
                  what: str) -> tuple[list[Request], int]:
    """n requests that have the model write one item of modality `name` for `text`, as
    `Pipeline.generate_items` does: prompt `<bos> text <begin>`, then the item's codes (a fixed-length
    item's, then its forced end token; a variable-length one until the model samples its end token, at
    most the codec's `max_tokens`), with classifier-free guidance against `<bos> <begin>` when cfg_scale
    (default `cfg_default`) is not 1. Temperature defaults to 0.3. Returns them and the prompt's length.
    `what` names the item in the error when it does not fit ("speech", "a video")."""
    pipe = state.pipe
    spec = pipe.vocab.spec(name)
    prompt = pipe.item_prompt(name, text.strip())
    room = state.context - len(prompt)
    new = spec.tokens_per_item + 1 if spec.fixed_length else min(pipe.codecs.codec(name).max_tokens + 1, room)
    if room < (new if spec.fixed_length else 2):  # a variable-length item needs at least one code and its end
        raise ApiError(400, f"the text is {len(prompt)} tokens; with {what} it exceeds the model's context of "
                       f"{state.context}", param=param, code="context_length_exceeded")
    cfg = or_default(req.cfg_scale, cfg_default)
    uncond = pipe.item_prompt(name, "") if cfg != 1.0 else None
    return [Request(prompt, new, sampling(req, 0.3, i, cfg_scale=cfg), uncond_prompt=uncond, allow_images=(name,),
                    stop_after_image=True) for i in range(n)], len(prompt)
