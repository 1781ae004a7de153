"""`nmm bench decode`: text decoding throughput, nmm's Engine vs Hugging Face `generate`, same weights.

Both sides decode the same prompts (shapes-world captions and questions, left-padded in a batch)
for exactly `new_tokens` new tokens each, greedily, with only text ids allowed: nmm's
`allow_images=False` state machine, and on the HF side a logits processor with the same mask.
`<eos>` is disallowed on both sides so that every sequence runs the full length (a benchmark that
stops early on one side would not compare equal work): `Engine.generate(..., ignore_eos=True)` and HF's
`eos_token_id=None`, `min_new_tokens`. Greedy decoding of the same function must
give the same tokens: `tokens_match` reports it, as a second check after the logits parity.

tokens/s = batch x new_tokens / (wall time of one `generate` call, prefill included).

Two pairs, each like against like:

  eager     nmm `Engine`                    vs HF `generate` (DynamicCache, eager)
  compiled  nmm `Engine(compile=True)`      vs HF `generate(cache_implementation="static")` with its
                                               decode step compiled (`nmm.bench.hf.static_compiled`:
                                               HF's CompileConfig route, nmm's inductor options)

The eager pair always runs; `compile=True` adds the compiled pair, in the same rounds (all four
contenders take turns), so both pairs see the same machine. Compilation happens in the untimed
warm-up run, whose wall time the JSON keeps (`*_first_call_s`). The goal is on the compiled pair.
"""

from __future__ import annotations

import torch

from nmm.bench.common import (
    TEXT_PROMPTS,
    env_info,
    goal,
    pair,
    set_threads,
    time_turns,
)
from nmm.bench.hf import (
    allowed_ids_processor,
    check_compiled,
    left_pad,
    logits_parity,
    nmm_to_hf,
    quiet_transformers,
    static_compiled,
)
from nmm.errors import NmmError
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig

GOAL_COMPILED_BATCH1 = 2.0  # compiled nmm / compiled HF tokens/s at batch 1
PAIRS = {
    "eager": ("nmm", "hf", "nmm Engine", "HF generate (DynamicCache)"),
    "compiled": ("nmm_compiled", "hf_compiled", "nmm Engine(compile=True)",
                 "HF generate (static cache, compiled decode step)"),
}


def parity_ids(vocab, prompts: list[list[int]], length: int = 48, seed: int = 0) -> torch.Tensor:
    """Ids for the logits check: the first prompt, then random ids over the whole vocabulary (text,
    specials and image codes, so both heads and both embeddings are compared)."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, vocab.size, (2, length), generator=g)
    first = torch.tensor(prompts[0][:length])
    rand[0, : len(first)] = first
    return rand


def pending_goal(metric: str, target: float) -> dict:
    """The goal of a pair that was not measured (no --compile): no value, not met."""
    return {"metric": metric, "target": target, "value": None, "met": False,
            "note": "the compiled pair was not run: use --compile"}


def run_decode(pipe, batches=(1, 8), new_tokens: int = 64, repeats: int = 5, warmup: int = 1,
               threads: int = 1, compile: bool = False, atol: float = 1e-4, log=lambda *a: None) -> dict:
    set_threads(threads)
    quiet_transformers()
    model, v = pipe.model, pipe.vocab
    device = next(model.parameters()).device
    prompts = [pipe.codecs.prompt([t]) for t in TEXT_PROMPTS]
    longest = max(len(p) for p in prompts)
    if longest + new_tokens > model.cfg.max_seq_len:
        raise NmmError(f"decode bench: {longest} prompt + {new_tokens} new tokens exceed the model's context of "
                       f"{model.cfg.max_seq_len}; use fewer --new-tokens")

    hf = nmm_to_hf(model)
    parity = logits_parity(model, hf, parity_ids(v, prompts).to(device), atol)  # raises ParityError
    log(f"parity nmm -> {parity['hf_arch']}: max |logit diff| {parity['max_abs_diff']:.2e} (< {atol:g})")

    engines = {"nmm": Engine(model, device)}
    if compile:
        engines["nmm_compiled"] = Engine(model, device, compile=True)
        warmup = max(warmup, 1)  # never time the compilation
    rows = [_run_batch(engines, hf, [prompts[i % len(prompts)] for i in range(batch)], new_tokens, repeats, warmup,
                       log) for batch in batches]

    first = next((r for r in rows if r["batch"] == 1), rows[0])
    metric = f"compiled nmm / compiled HF tokens/s at batch {first['batch']}"
    return {
        "benchmark": "decode",
        "what": "greedy text decoding, fixed length (eos disallowed), tokens/s = batch*new_tokens / generate() wall time",
        "config": {"batches": list(batches), "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                   "threads": threads, "compile": compile, "hf_arch": parity["hf_arch"],
                   "pairs": {name: {"nmm": p[2], "hf": p[3]} for name, p in PAIRS.items()
                             if compile or name == "eager"}},
        "parity": parity,
        "rows": rows,
        "goal": goal(metric, first["pairs"]["compiled"]["speedup"], GOAL_COMPILED_BATCH1) if compile
        else pending_goal(metric, GOAL_COMPILED_BATCH1),
        "env": env_info(),
    }


def _run_batch(engines: dict, hf, chunk: list[list[int]], new_tokens: int, repeats: int, warmup: int, log) -> dict:
    """One batch: the prompts `chunk`, every contender in turns."""
    from transformers import GenerationConfig

    engine = engines["nmm"]
    v, device = engine.vocab, engine.device
    ids, mask = left_pad(chunk, v.pad, device)
    greedy = SamplingConfig(temperature=0.0)
    text_only = torch.zeros(v.size, dtype=torch.bool, device=device)
    text_only[: v.n_text] = True  # text ids; no specials (so no <eos>, <boi>), no image codes
    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=v.pad, eos_token_id=None, use_cache=True)
    gen_cfgs = {"hf": gen_cfg, "hf_compiled": static_compiled(gen_cfg)}
    processors = [allowed_ids_processor(text_only)]
    out = {}

    def nmm_run(name):
        @torch.no_grad()
        def run():
            out[name] = engines[name].generate(chunk, new_tokens, greedy, allow_images=False, ignore_eos=True).tokens
        return run

    def hf_run(name):
        @torch.no_grad()
        def run():
            seqs = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfgs[name],
                               logits_processor=processors)
            out[name] = seqs[:, ids.shape[1]:].tolist()
        return run

    contenders = {"nmm": nmm_run("nmm"), "hf": hf_run("hf")}
    if "nmm_compiled" in engines:
        contenders |= {"nmm_compiled": nmm_run("nmm_compiled"), "hf_compiled": hf_run("hf_compiled")}
    times = time_turns(contenders, repeats, warmup)
    if "hf_compiled" in contenders:
        check_compiled(hf)
    lengths = {len(t) for name in contenders for t in out[name]}
    if lengths != {new_tokens}:
        raise NmmError(f"decode bench: expected {new_tokens} new tokens per sequence, got lengths {sorted(lengths)}")
    batch = len(chunk)
    n_tokens = batch * new_tokens
    row = {"batch": batch, "new_tokens": new_tokens, "prompt_tokens": [len(p) for p in chunk], "pairs": {}}
    for name, (a, b, _, _) in PAIRS.items():
        if a not in contenders:
            continue
        p = pair(times[a], times[b], lambda t: round(n_tokens / t, 1), "tokens_per_s")
        p["tokens_match"] = sum(x == y for x, y in zip(out[a], out[b])) / batch
        p["nmm_matches_eager"] = sum(x == y for x, y in zip(out[a], out["nmm"])) / batch
        row["pairs"][name] = p
        log(f"batch {batch}, {name}: nmm {p['nmm_tokens_per_s']:.0f} tok/s, HF {p['hf_tokens_per_s']:.0f} tok/s, "
            f"{p['speedup']:.2f}x")
    return row
