"""`nmm bench video`: seconds per clip, nmm vs the same weights through Hugging Face `generate`.

Both sides run greedy decoding of the same prompts, so they must produce the same tokens
(`tokens_match`):

  text -> clip   `<bos> caption <bov>` -> video codes until `<eov>` (or `max_tokens`): nmm's
                 `Engine.generate(allow_images=("video",), stop_after_image=True)`; HF `generate` with a
                 processor allowing video codes and `<eov>`. Decoding codes to frames (the frame
                 tokenizer's decoder, the same code on both sides) is timed on its own (`decode_s`).
  captioning     `<bos> <bov> clip codes <eov>` -> the caption until `<eos>`.

Eager pair only: the video decoders run the same Engine as `nmm bench decode`, whose compiled pair
covers compilation.
"""

from __future__ import annotations

import time

import numpy as np

from nmm.bench.common import env_info, set_threads
from nmm.bench.decode import parity_ids
from nmm.bench.hf import logits_parity, nmm_to_hf, quiet_transformers
from nmm.bench.items import item_generation, text_completion
from nmm.errors import NmmError
from nmm.infer.engine import Engine


def _clips(cfg, n: int, seed: int = 5):
    from nmm.data.video_source import (
        make_moving_world,  # the moving shapes world is an app; a benchmark may use it
    )

    world = make_moving_world(cfg)
    clips = world.clips(n, seed, "train")
    return [world.caption(c) for c in clips], np.stack([world.render(c) for c in clips])


def run_video(pipe, cfg, batches=(1, 8), clips: int = 8, repeats: int = 3, warmup: int = 1, threads: int = 1,
              max_text_tokens: int = 48, max_tokens: int | None = None, atol: float = 1e-4, log=lambda *a: None) -> dict:
    if "video" not in pipe.codecs.modalities:
        raise NmmError("video bench: this model has no video modality (train e.g. video-demo)")
    set_threads(threads)
    quiet_transformers()
    model, v, codecs = pipe.model, pipe.vocab, pipe.codecs
    codec = codecs.codec("video")
    device = next(model.parameters()).device
    captions, frames = _clips(cfg, max(clips, max(batches)))
    clip_ids = codecs.encode_items("video", frames)
    caption_prompts = [[v.bos, *codecs.block("video", ids)] for ids in clip_ids]
    make_prompts = [codecs.prompt([c], open_item="video") for c in captions]
    hf = nmm_to_hf(model)
    parity = logits_parity(model, hf, parity_ids(v, caption_prompts).to(device), atol)
    log(f"parity nmm -> {parity['hf_arch']}: max |logit diff| {parity['max_abs_diff']:.2e} (< {atol:g})")
    engine = Engine(model, device)
    new = max_tokens or codec.max_tokens
    rows = []
    for batch in batches:
        p, out = item_generation(engine, hf, "video", make_prompts[:batch], new + 1, repeats, warmup)
        codes = [np.asarray([c for c in t if c != v.end("video")], dtype=np.int64) for t in out["nmm"]]
        t0 = time.perf_counter()
        codecs.decode_items("video", codes)
        p.update(decode_s=round((time.perf_counter() - t0) / batch, 5), mean_tokens=float(np.mean([len(c) for c in codes])))
        log(f"text -> clip batch {batch}: nmm {p['nmm_item_s']:.3f} s/clip, HF {p['hf_item_s']:.3f}, {p['speedup']:.2f}x")
        rows.append({"task": "text_to_clip", "batch": batch, **p})
        p, _ = text_completion(engine, hf, caption_prompts[:batch], max_text_tokens, repeats, warmup)
        log(f"captioning batch {batch}: nmm {p['nmm_item_s']:.3f} s/clip, HF {p['hf_item_s']:.3f}, {p['speedup']:.2f}x")
        rows.append({"task": "captioning", "batch": batch, **p})
    return {
        "benchmark": "video",
        "what": "seconds per clip (generation wall time / batch), greedy, same weights",
        "config": {"batches": list(batches), "clips": len(captions), "repeats": repeats, "threads": threads,
                   "max_tokens": new, "layout": codec.config.layout, "frames": codec.config.frames,
                   "hf_arch": parity["hf_arch"]},
        "parity": parity,
        "rows": rows,
        "env": env_info(),
    }
