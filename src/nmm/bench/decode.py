"""`nmm bench decode`: text decoding throughput, nmm's Engine vs Hugging Face `generate`, same weights.

Both sides decode the same prompts (shapes-world captions and questions, left-padded in a batch)
for exactly `new_tokens` new tokens each, greedily, with only text ids allowed: nmm's
`allow_images=False` state machine, and on the HF side a logits processor with the same mask.
`<eos>` is disallowed on both sides so that every sequence runs the full length (a benchmark that
stops early on one side would not compare equal work): `Engine.generate(..., ignore_eos=True)` and HF's
`eos_token_id=None`, `min_new_tokens`. Greedy decoding of the same function must
give the same tokens: `tokens_match` reports it, as a second check after the logits parity.

tokens/s = batch x new_tokens / (wall time of one `generate` call, prefill included).

`compile=True` measures nmm's Engine with `compile=True` (its decode step through `torch.compile`);
the compile happens in the untimed warm-up run, whose wall time the JSON keeps (`*_first_call_s`).
HF runs its default eager `generate` either way.
"""

from __future__ import annotations

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
from nmm.bench.hf import (
    allowed_ids_processor,
    left_pad,
    logits_parity,
    nmm_to_hf,
    quiet_transformers,
)
from nmm.errors import NmmError
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig

GOAL_SPEEDUP_BATCH1 = 3.0


def parity_ids(vocab, prompts: list[list[int]], length: int = 48, seed: int = 0) -> torch.Tensor:
    """Ids for the logits check: the first prompt, then random ids over the whole vocabulary (text,
    specials and image codes, so both heads and both embeddings are compared)."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, vocab.size, (2, length), generator=g)
    first = torch.tensor(prompts[0][:length])
    rand[0, : len(first)] = first
    return rand


def run_decode(pipe, batches=(1, 8), new_tokens: int = 64, repeats: int = 5, warmup: int = 1,
               threads: int = 1, compile: bool = False, atol: float = 1e-4, log=lambda *a: None) -> dict:
    set_threads(threads)
    quiet_transformers()
    model, v = pipe.model, pipe.vocab
    device = next(model.parameters()).device
    prompts = [[v.bos, *pipe.codecs.encode_text(t)] for t in TEXT_PROMPTS]
    longest = max(len(p) for p in prompts)
    if longest + new_tokens > model.cfg.max_seq_len:
        raise NmmError(f"decode bench: {longest} prompt + {new_tokens} new tokens exceed the model's context of "
                       f"{model.cfg.max_seq_len}; use fewer --new-tokens")

    hf = nmm_to_hf(model)
    parity = logits_parity(model, hf, parity_ids(v, prompts).to(device), atol)  # raises ParityError
    log(f"parity nmm -> {parity['hf_arch']}: max |logit diff| {parity['max_abs_diff']:.2e} (< {atol:g})")

    engine = Engine(model, device, compile=compile)
    warmup = max(warmup, 1) if compile else warmup  # never time the compilation
    rows = [_run_batch(engine, hf, [prompts[i % len(prompts)] for i in range(batch)], new_tokens, repeats, warmup, log)
            for batch in batches]

    first = next((r for r in rows if r["batch"] == 1), rows[0])
    return {
        "benchmark": "decode",
        "what": "greedy text decoding, fixed length (eos disallowed), tokens/s = batch*new_tokens / generate() wall time",
        "config": {"batches": list(batches), "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                   "threads": threads, "nmm_compile": compile, "hf_arch": parity["hf_arch"],
                   "hf_cache": "DynamicCache (default)"},
        "parity": parity,
        "rows": rows,
        "goal": goal(f"nmm/HF tokens/s at batch {first['batch']}", first["speedup"], GOAL_SPEEDUP_BATCH1),
        "env": env_info(),
    }


def _run_batch(engine, hf, chunk: list[list[int]], new_tokens: int, repeats: int, warmup: int, log) -> dict:
    """One batch: the prompts `chunk`, nmm and HF in turns."""
    from transformers import GenerationConfig

    v, device = engine.vocab, engine.device
    ids, mask = left_pad(chunk, v.pad, device)
    greedy = SamplingConfig(temperature=0.0)
    text_only = torch.zeros(v.size, dtype=torch.bool, device=device)
    text_only[: v.n_text] = True  # text ids; no specials (so no <eos>, <boi>), no image codes
    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=v.pad, eos_token_id=None, use_cache=True)
    processors = [allowed_ids_processor(text_only)]
    out = {}

    @torch.no_grad()
    def nmm_run():
        out["nmm"] = engine.generate(chunk, new_tokens, greedy, allow_images=False, ignore_eos=True).tokens

    @torch.no_grad()
    def hf_run():
        seqs = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, logits_processor=processors)
        out["hf"] = seqs[:, ids.shape[1]:].tolist()

    times = time_turns({"nmm": nmm_run, "hf": hf_run}, repeats, warmup)
    lengths = {len(t) for t in out["nmm"]} | {len(t) for t in out["hf"]}
    if lengths != {new_tokens}:
        raise NmmError(f"decode bench: expected {new_tokens} new tokens per sequence, got lengths {sorted(lengths)}")
    batch = len(chunk)
    n_tokens = batch * new_tokens
    row = {
        "batch": batch, "new_tokens": new_tokens, "prompt_tokens": [len(p) for p in chunk],
        "nmm_tokens_per_s": round(n_tokens / times["nmm"].median, 1),
        "hf_tokens_per_s": round(n_tokens / times["hf"].median, 1),
        **ratios(times["nmm"], times["hf"]),
        "tokens_match": sum(a == b for a, b in zip(out["nmm"], out["hf"])) / batch,
        "nmm_first_call_s": times["nmm"].first_call, "hf_first_call_s": times["hf"].first_call,
        "nmm_s": rounded(times["nmm"].wall), "hf_s": rounded(times["hf"].wall),
        "nmm_cpu_s": rounded(times["nmm"].cpu), "hf_cpu_s": rounded(times["hf"].cpu),
    }
    log(f"batch {batch}: nmm {row['nmm_tokens_per_s']:.0f} tok/s, HF {row['hf_tokens_per_s']:.0f} tok/s, "
        f"{row['speedup']:.2f}x")
    return row
