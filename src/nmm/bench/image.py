"""`nmm bench image`: seconds per generated image with classifier-free guidance, nmm vs Hugging Face.

Both sides turn the same captions into images: prompt `<bos> caption <boi>`, then 64 image codes
and `<eoi>` under classifier-free guidance (scale 2) against the unconditional prompt `<bos> <boi>`,
then the image tokenizer's decoder turns the codes into pixels (the same decoder call on both
sides). nmm runs `Pipeline.generate_images` (its Engine puts the unconditional prompts in the same
batch as extra rows). HF runs `generate` with a logits processor that allows only image codes, then
only `<eoi>`, and CFG in one of two ways:

  stock    HF's own CFG (`guidance_scale` + `negative_prompt_ids`:
           `UnbatchedClassifierFreeGuidanceLogitsProcessor`, a second forward per step for the
           unconditional branch, with its own DynamicCache)
  batched  the unconditional prompts as extra rows of the batch, mixed by a logits processor
           (`nmm.bench.hf.batched_cfg_processor`): nmm's way, and the only one a static cache and a
           compiled forward can serve

Pairs: eager nmm vs eager HF (stock, HF's documented CFG; the JSON also has the batched eager HF as
`vs_hf_batched`), and with `compile=True` `Engine(compile=True)` vs HF batched CFG with a static
cache and a compiled decode step (`static_compiled`). All contenders take turns in the same rounds.

Decoding is greedy on both sides (the work per step is the same as sampling, and it lets the
benchmark check that both produce the same image: `images_match`). HF's stock CFG mixes
log-softmaxed scores and nmm raw logits; the two differ by a constant per row, so the argmax is the
same. Compilation happens in the untimed warm-up run (its wall time is in `*_first_call_s`).
"""

from __future__ import annotations

import numpy as np
import torch

from nmm.bench.common import (
    TEXT_PROMPTS,
    env_info,
    goal,
    pair,
    ratios,
    set_threads,
    time_turns,
)
from nmm.bench.decode import parity_ids, pending_goal
from nmm.bench.hf import (
    batched_cfg_processor,
    check_compiled,
    image_block_processor,
    left_pad,
    logits_parity,
    nmm_to_hf,
    quiet_transformers,
    static_compiled,
)
from nmm.errors import NmmError

GOAL_COMPILED_BATCH1 = 2.0  # compiled HF / compiled nmm seconds per image at batch 1
CAPTIONS = tuple(p for p in TEXT_PROMPTS if not p.endswith("?") and not p.startswith("make"))
PAIRS = {
    "eager": ("nmm", "hf", "generate_images on nmm Engine", "HF generate + guidance_scale (stock CFG, DynamicCache)"),
    "compiled": ("nmm_compiled", "hf_compiled", "generate_images on nmm Engine(compile=True)",
                 "HF generate, batched CFG, static cache, compiled decode step"),
}


def run_image(pipe, batches=(1, 8), cfg_scale: float = 2.0, repeats: int = 5, warmup: int = 1, threads: int = 1,
              compile: bool = False, atol: float = 1e-4, log=lambda *a: None) -> dict:
    set_threads(threads)
    quiet_transformers()
    model, v = pipe.model, pipe.vocab
    device = next(model.parameters()).device
    hf = nmm_to_hf(model)
    text_prompts = [pipe.codecs.prompt([t]) for t in TEXT_PROMPTS]
    parity = logits_parity(model, hf, parity_ids(v, text_prompts).to(device), atol)  # raises ParityError
    log(f"parity nmm -> {parity['hf_arch']}: max |logit diff| {parity['max_abs_diff']:.2e} (< {atol:g})")

    engines = {"nmm": pipe.engine}
    if compile:  # the same Pipeline code, with a compiling Engine for its turns
        from nmm.infer.engine import Engine

        engines["nmm_compiled"] = Engine(model, device, compile=True)
        warmup = max(warmup, 1)  # never time the compilation
    try:
        rows = [_run_batch(pipe, engines, hf, batch, cfg_scale, repeats, warmup, log) for batch in batches]
    finally:
        pipe.engine = engines["nmm"]

    first = next((r for r in rows if r["batch"] == 1), rows[0])
    metric = f"compiled HF / compiled nmm seconds per image at batch {first['batch']}"
    return {
        "benchmark": "image",
        "what": (f"text -> image with CFG {cfg_scale:g} ({v.tokens_per_image} codes + <eoi>, greedy, decoded to pixels); "
                 "seconds per image = generate wall time / batch"),
        "config": {"batches": list(batches), "cfg_scale": cfg_scale, "repeats": repeats, "warmup": warmup,
                   "threads": threads, "compile": compile, "hf_arch": parity["hf_arch"],
                   "pairs": {name: {"nmm": p[2], "hf": p[3]} for name, p in PAIRS.items()
                             if compile or name == "eager"}},
        "parity": parity,
        "rows": rows,
        "goal": goal(metric, first["pairs"]["compiled"]["speedup"], GOAL_COMPILED_BATCH1) if compile
        else pending_goal(metric, GOAL_COMPILED_BATCH1),
        "env": env_info(),
    }


def _run_batch(pipe, engines: dict, hf, batch: int, cfg_scale: float, repeats: int, warmup: int, log) -> dict:
    """One batch size: `batch` captions, every contender in turns."""
    from transformers import GenerationConfig

    model, v = pipe.model, pipe.vocab
    device = next(model.parameters()).device
    n_new = v.tokens_per_image + 1  # the codes, then <eoi>
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    prompts = [pipe.image_prompt(c) for c in captions]
    if max(map(len, prompts)) + n_new > model.cfg.max_seq_len:
        raise NmmError(f"image bench: prompt + {n_new} image tokens exceed the context of {model.cfg.max_seq_len}")
    ids, mask = left_pad(prompts, v.pad, device)
    width = ids.shape[1]
    uncond = torch.tensor([pipe.uncond_image_prompt()] * batch, device=device)
    # batched CFG: the unconditional prompts as rows batch..2*batch-1, left-padded to the same width
    both_ids, both_mask = left_pad(prompts + [pipe.uncond_image_prompt()] * batch, v.pad, device)
    base = {"max_new_tokens": n_new, "min_new_tokens": n_new, "do_sample": False, "pad_token_id": v.pad,
            "eos_token_id": None, "use_cache": True}
    stock_cfg = GenerationConfig(**base, guidance_scale=cfg_scale)
    batched_cfg = GenerationConfig(**base)
    out = {}

    def nmm_run(name):
        def run():
            pipe.engine = engines[name]
            try:
                out[name] = pipe.generate_images(captions, cfg_scale=cfg_scale, temperature=0.0, seed=0)
            finally:
                pipe.engine = engines["nmm"]
        return run

    def pixels(new: torch.Tensor):
        if new.shape[1] != n_new or not bool((new[:, -1] == v.eoi).all()):
            raise NmmError("image bench: HF did not produce codes + <eoi>")
        return pipe.codecs.decode_images(new[:, : v.tokens_per_image].cpu().numpy())

    @torch.no_grad()
    def hf_stock():
        seqs = hf.generate(input_ids=ids, attention_mask=mask, generation_config=stock_cfg,
                           negative_prompt_ids=uncond, negative_prompt_attention_mask=torch.ones_like(uncond),
                           logits_processor=[image_block_processor(v, width)])
        out["hf"] = pixels(seqs[:, width:])

    def hf_batched(name, cfg):
        @torch.no_grad()
        def run():
            seqs = hf.generate(input_ids=both_ids, attention_mask=both_mask, generation_config=cfg,
                               logits_processor=[batched_cfg_processor(cfg_scale, batch),  # mix first, then mask
                                                 image_block_processor(v, both_ids.shape[1])])
            new = seqs[:, both_ids.shape[1]:]
            if not torch.equal(new[:batch], new[batch:]):
                raise NmmError("image bench: batched CFG fed the unconditional rows other tokens")
            out[name] = pixels(new[:batch])
        return run

    contenders = {"nmm": nmm_run("nmm"), "hf": hf_stock, "hf_batched": hf_batched("hf_batched", batched_cfg)}
    if "nmm_compiled" in engines:
        contenders |= {"nmm_compiled": nmm_run("nmm_compiled"),
                       "hf_compiled": hf_batched("hf_compiled", static_compiled(batched_cfg))}
    times = time_turns(contenders, repeats, warmup)
    if "hf_compiled" in contenders:
        check_compiled(hf)

    def same(a, b):
        return float(np.mean([np.array_equal(x, y) for x, y in zip(out[a], out[b])]))

    row = {"batch": batch, "image_tokens": n_new, "cfg_scale": cfg_scale, "pairs": {}}
    for name, (a, b, _, _) in PAIRS.items():
        if a not in contenders:
            continue
        p = pair(times[a], times[b], lambda t: round(t / batch, 4), "s_per_image")
        p["images_match"] = same(a, b)
        p["nmm_matches_eager"] = same(a, "nmm")
        row["pairs"][name] = p
        log(f"batch {batch}, {name}: nmm {p['nmm_s_per_image']:.3f} s/image, HF {p['hf_s_per_image']:.3f} s/image, "
            f"{p['speedup']:.2f}x")
    eager = row["pairs"]["eager"]
    eager["hf_batched_s_per_image"] = round(times["hf_batched"].median / batch, 4)
    eager["vs_hf_batched"] = ratios(times["nmm"], times["hf_batched"])
    eager["hf_batched_images_match"] = same("nmm", "hf_batched")
    return row
