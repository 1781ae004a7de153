"""`nmm bench speech`: real-time factors of speech recognition and synthesis, nmm vs the same
weights through Hugging Face `generate`.

RTF = wall seconds of compute / seconds of audio (below 1: faster than real time). Both sides run
greedy decoding of the same prompts, so they must produce the same tokens (`tokens_match`):

  recognition   held-out voices' speech -> audio codes (the codec, timed on its own as `encode_rtf`)
                -> `<bos> <boa> codes <eoa>` -> the transcript, until `<eos>` or `max_text_tokens`.
                nmm: `Engine.generate(allow_images=False)`; HF: `generate` with a text-only logits
                processor and `eos_token_id=<eos>`.
  synthesis     `<bos> text <boa>` -> audio codes until `<eoa>` or `max_audio_tokens`. nmm:
                `Engine.generate(allow_images=("audio",), stop_after_image=True)`; HF: `generate`
                with a processor allowing audio codes and `<eoa>`, and `eos_token_id=<eoa>`. The
                vocoder (codes -> log-mel -> Griffin-Lim) is the same code on both sides, timed on its
                own (`vocoder_rtf`); RTF here is of the token generation.

Eager pair only: the speech decoders run the same Engine as `nmm bench decode`, whose compiled pair
covers compilation.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from nmm.bench.common import env_info, set_threads
from nmm.bench.decode import parity_ids
from nmm.bench.hf import logits_parity, nmm_to_hf, quiet_transformers
from nmm.bench.items import item_generation, text_completion
from nmm.errors import NmmError
from nmm.infer.engine import Engine


def _utterances(n: int, seed: int = 5):
    from nmm.data.speech import (
        SpeechWorld,  # the speech world is an app of the core; a benchmark may use it
    )

    world = SpeechWorld()
    return [(t, world.render(t, v)) for t, v in world.utterances(n, seed, "heldout")]


def run_speech(pipe, batches=(1, 8), utterances: int = 8, repeats: int = 3, warmup: int = 1, threads: int = 1,
               max_text_tokens: int = 32, max_audio_tokens: int = 100, atol: float = 1e-4,
               log=lambda *a: None) -> dict:
    if "audio" not in pipe.codecs.modalities:
        raise NmmError("speech bench: this model has no audio modality (train e.g. speech-demo)")
    set_threads(threads)
    quiet_transformers()
    model, v, codecs = pipe.model, pipe.vocab, pipe.codecs
    codec = codecs.codec("audio")
    device = next(model.parameters()).device
    pairs = _utterances(max(utterances, max(batches)))
    waves = [w for _, w in pairs]

    t0 = time.perf_counter()
    audio_ids = codecs.encode_items("audio", waves)
    audio_seconds = sum(len(w) for w in waves) / 16_000
    encode_rtf = (time.perf_counter() - t0) / audio_seconds

    hf = nmm_to_hf(model)
    asr_prompts = [[v.bos, *codecs.block("audio", ids)] for ids in audio_ids]
    parity = logits_parity(model, hf, parity_ids(v, asr_prompts).to(device), atol)
    log(f"parity nmm -> {parity['hf_arch']}: max |logit diff| {parity['max_abs_diff']:.2e} (< {atol:g})")
    engine = Engine(model, device)
    tts_prompts = [codecs.prompt([t], open_item="audio") for t, _ in pairs]

    rows = []
    for batch in batches:
        idx = list(range(batch))
        seconds = [len(waves[i]) / 16_000 for i in idx]
        rows.append({"task": "recognition", "batch": batch,
                     **_recognition(engine, hf, [asr_prompts[i] for i in idx], sum(seconds), max_text_tokens,
                                    repeats, warmup, log)})
        rows.append({"task": "synthesis", "batch": batch,
                     **_synthesis(engine, hf, codec, [tts_prompts[i] for i in idx], max_audio_tokens, repeats,
                                  warmup, log)})
    return {
        "benchmark": "speech",
        "what": "real-time factor = compute wall seconds / audio seconds (lower is faster), greedy, same weights",
        "config": {"batches": list(batches), "utterances": len(pairs), "repeats": repeats, "threads": threads,
                   "max_text_tokens": max_text_tokens, "max_audio_tokens": max_audio_tokens,
                   "hf_arch": parity["hf_arch"], "tokens_per_second": codec.tokens_per_second},
        "parity": parity,
        "encode_rtf": round(encode_rtf, 5),
        "rows": rows,
        "env": env_info(),
    }


def _recognition(engine, hf, prompts, audio_seconds, new_tokens, repeats, warmup, log) -> dict:
    p, _ = text_completion(engine, hf, prompts, new_tokens, repeats, warmup)
    nmm_s, hf_s = p.pop("nmm_item_s"), p.pop("hf_item_s")
    p.update(nmm_rtf=round(nmm_s * len(prompts) / audio_seconds, 5), hf_rtf=round(hf_s * len(prompts) / audio_seconds, 5),
             audio_seconds=round(audio_seconds, 3))
    log(f"recognition batch {len(prompts)}: RTF nmm {p['nmm_rtf']:.4f}, HF {p['hf_rtf']:.4f}, {p['speedup']:.2f}x")
    return p


def _synthesis(engine, hf, codec, prompts, new_tokens, repeats, warmup, log) -> dict:
    p, out = item_generation(engine, hf, "audio", prompts, new_tokens, repeats, warmup)
    v, end = engine.vocab, engine.vocab.end("audio")
    codes = [[c - v.start("audio") for c in t if c != end] for t in out["nmm"]]
    audio_seconds = max(sum(len(c) for c in codes) / codec.tokens_per_second, 1e-9)
    t0 = time.perf_counter()
    codec.decode([torch.tensor(c, dtype=torch.long) for c in codes])
    vocoder_rtf = (time.perf_counter() - t0) / audio_seconds
    nmm_s, hf_s = p.pop("nmm_item_s"), p.pop("hf_item_s")
    p.update(nmm_rtf=round(nmm_s * len(prompts) / audio_seconds, 5), hf_rtf=round(hf_s * len(prompts) / audio_seconds, 5),
             audio_seconds=round(audio_seconds, 3), vocoder_rtf=round(vocoder_rtf, 5),
             mean_codes=float(np.mean([len(c) for c in codes])))
    log(f"synthesis batch {len(prompts)}: RTF nmm {p['nmm_rtf']:.4f}, HF {p['hf_rtf']:.4f}, {p['speedup']:.2f}x "
        f"(vocoder {vocoder_rtf:.4f})")
    return p
