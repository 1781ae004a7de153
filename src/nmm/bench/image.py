"""`nmm bench image`: seconds per generated image with classifier-free guidance, nmm vs Hugging Face.

Both sides turn the same captions into images: prompt `<bos> caption <boi>`, then 64 image codes
and `<eoi>` under classifier-free guidance (scale 2) against the unconditional prompt `<bos> <boi>`,
then the image tokenizer's decoder turns the codes into pixels (the same decoder call on both
sides). nmm runs `Pipeline.generate_images` (its Engine puts the unconditional prompts in the same
batch as extra rows). HF runs `generate` with its own CFG (`guidance_scale` + `negative_prompt_ids`:
`UnbatchedClassifierFreeGuidanceLogitsProcessor`, which runs the unconditional branch as a second
forward per step) and a logits processor that allows only image codes, then only `<eoi>`.

Decoding is greedy on both sides (the work per step is the same as sampling, and it lets the
benchmark check that both produce the same image: `images_match`). HF mixes log-softmaxed scores
and nmm raw logits; the two differ by a constant per row, so the argmax is the same.

`compile=True` gives the pipeline an Engine with `compile=True` for the run (compiled in the
untimed warm-up, whose wall time the JSON keeps); HF runs its default eager `generate`.
"""

from __future__ import annotations

import numpy as np
import torch

from nmm.bench.common import (
    TEXT_PROMPTS,
    env_info,
    goal,
    ratios,
    rounded,
    set_threads,
    time_turns,
)
from nmm.bench.decode import parity_ids
from nmm.bench.hf import (
    image_block_processor,
    left_pad,
    logits_parity,
    nmm_to_hf,
    quiet_transformers,
)
from nmm.errors import NmmError

GOAL_SPEEDUP_BATCH1 = 5.0
CAPTIONS = tuple(p for p in TEXT_PROMPTS if not p.endswith("?") and not p.startswith("make"))


def run_image(pipe, batches=(1, 8), cfg_scale: float = 2.0, repeats: int = 5, warmup: int = 1, threads: int = 1,
              compile: bool = False, atol: float = 1e-4, log=lambda *a: None) -> dict:
    set_threads(threads)
    quiet_transformers()
    model, v = pipe.model, pipe.vocab
    device = next(model.parameters()).device
    hf = nmm_to_hf(model)
    text_prompts = [[v.bos, *pipe.codecs.encode_text(t)] for t in TEXT_PROMPTS]
    parity = logits_parity(model, hf, parity_ids(v, text_prompts).to(device), atol)  # raises ParityError
    log(f"parity nmm -> {parity['hf_arch']}: max |logit diff| {parity['max_abs_diff']:.2e} (< {atol:g})")

    eager_engine = pipe.engine
    if compile:  # the same Pipeline code, with a compiling Engine; put back at the end
        from nmm.infer.engine import Engine

        pipe.engine = Engine(model, device, compile=True)
        warmup = max(warmup, 1)  # never time the compilation
    try:
        rows = [_run_batch(pipe, hf, batch, cfg_scale, repeats, warmup, log) for batch in batches]
    finally:
        pipe.engine = eager_engine

    first = next((r for r in rows if r["batch"] == 1), rows[0])
    return {
        "benchmark": "image",
        "what": (f"text -> image with CFG {cfg_scale:g} ({v.tokens_per_image} codes + <eoi>, greedy, decoded to pixels); "
                 "seconds per image = generate wall time / batch"),
        "config": {"batches": list(batches), "cfg_scale": cfg_scale, "repeats": repeats, "warmup": warmup,
                   "threads": threads, "nmm_compile": compile, "hf_arch": parity["hf_arch"],
                   "hf_cfg": "guidance_scale + negative_prompt_ids (UnbatchedClassifierFreeGuidanceLogitsProcessor)"},
        "parity": parity,
        "rows": rows,
        "goal": goal(f"HF/nmm seconds per image at batch {first['batch']}", first["speedup"], GOAL_SPEEDUP_BATCH1),
        "env": env_info(),
    }


def _run_batch(pipe, hf, batch: int, cfg_scale: float, repeats: int, warmup: int, log) -> dict:
    """One batch size: `batch` captions, nmm and HF in turns."""
    from transformers import GenerationConfig

    model, v = pipe.model, pipe.vocab
    device = next(model.parameters()).device
    n_new = v.tokens_per_image + 1  # the codes, then <eoi>
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    prompts = [pipe.image_prompt(c) for c in captions]
    if max(map(len, prompts)) + n_new > model.cfg.max_seq_len:
        raise NmmError(f"image bench: prompt + {n_new} image tokens exceed the context of {model.cfg.max_seq_len}")
    ids, mask = left_pad(prompts, v.pad, device)
    uncond = torch.tensor([[v.bos, v.boi]] * batch, device=device)
    gen_cfg = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               guidance_scale=cfg_scale, pad_token_id=v.pad, eos_token_id=None, use_cache=True)
    processors = [image_block_processor(v, ids.shape[1])]
    out = {}

    def nmm_run():
        out["nmm"] = pipe.generate_images(captions, cfg_scale=cfg_scale, temperature=0.0, seed=0)

    @torch.no_grad()
    def hf_run():
        seqs = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                           negative_prompt_ids=uncond, negative_prompt_attention_mask=torch.ones_like(uncond),
                           logits_processor=processors)
        new = seqs[:, ids.shape[1]:]
        if new.shape[1] != n_new or not bool((new[:, -1] == v.eoi).all()):
            raise NmmError("image bench: HF did not produce codes + <eoi>")
        out["hf"] = pipe.codecs.decode_images(new[:, : v.tokens_per_image].cpu().numpy())

    times = time_turns({"nmm": nmm_run, "hf": hf_run}, repeats, warmup)
    row = {
        "batch": batch, "image_tokens": n_new, "cfg_scale": cfg_scale,
        "nmm_s_per_image": round(times["nmm"].median / batch, 4),
        "hf_s_per_image": round(times["hf"].median / batch, 4),
        **ratios(times["nmm"], times["hf"]),
        "images_match": float(np.mean([np.array_equal(a, b) for a, b in zip(out["nmm"], out["hf"])])),
        "nmm_first_call_s": times["nmm"].first_call, "hf_first_call_s": times["hf"].first_call,
        "nmm_s": rounded(times["nmm"].wall), "hf_s": rounded(times["hf"].wall),
        "nmm_cpu_s": rounded(times["nmm"].cpu), "hf_cpu_s": rounded(times["hf"].cpu),
    }
    log(f"batch {batch}: nmm {row['nmm_s_per_image']:.3f} s/image, HF {row['hf_s_per_image']:.3f} s/image, "
        f"{row['speedup']:.2f}x")
    return row
