"""Timing pairs for generating one item or one text per prompt: nmm's Engine vs Hugging Face `generate`
on the same weights, greedy, so both must write the same tokens (`tokens_match`). Shared by the
speech and video benchmarks."""

from __future__ import annotations

import torch

from nmm.bench.common import pair, time_turns
from nmm.bench.hf import hf_generate
from nmm.infer.sampling import SamplingConfig


def _timed(engine, hf, prompts, new_tokens, repeats, warmup, allowed, eos, generate) -> tuple[dict, dict]:
    out = {}

    @torch.no_grad()
    def nmm():
        out["nmm"] = generate()

    @torch.no_grad()
    def hf_():
        out["hf"] = hf_generate(hf, prompts, engine.vocab, new_tokens, allowed, eos)

    times = time_turns({"nmm": nmm, "hf": hf_}, repeats, warmup)
    p = pair(times["nmm"], times["hf"], lambda t: round(t / len(prompts), 5), "item_s")
    p["tokens_match"] = sum(a == b for a, b in zip(out["nmm"], out["hf"])) / len(prompts)
    return p, out


def item_generation(engine, hf, name: str, prompts, new_tokens: int, repeats: int, warmup: int) -> tuple[dict, dict]:
    """One variable-length item of `name` per prompt (prompts end in its begin token), until its end
    token: the pair (seconds per item, nmm_item_s / hf_item_s) and both sides' tokens."""
    v, end = engine.vocab, engine.vocab.end(name)
    allowed = torch.zeros(v.size, dtype=torch.bool)
    allowed[slice(*v.range(name))] = True
    allowed[end] = True

    def generate():
        return engine.generate(prompts, new_tokens, SamplingConfig(temperature=0.0), allow_images=(name,),
                               stop_after_image=True).tokens

    return _timed(engine, hf, prompts, new_tokens, repeats, warmup, allowed, end, generate)


def text_completion(engine, hf, prompts, new_tokens: int, repeats: int, warmup: int) -> tuple[dict, dict]:
    """The text after each prompt (a transcript, a caption), until `<eos>`: the same pair and tokens."""
    v = engine.vocab
    allowed = torch.zeros(v.size, dtype=torch.bool)
    allowed[: v.n_text] = True
    allowed[v.eos] = True

    def generate():
        res = engine.generate(prompts, new_tokens, SamplingConfig(temperature=0.0), allow_images=False)
        return [t + [v.eos] if d else t for t, d in zip(res.tokens, res.finished)]

    return _timed(engine, hf, prompts, new_tokens, repeats, warmup, allowed, v.eos, generate)
