"""Where a one-token decode step spends its time: nmm eager, nmm compiled (as `Engine(compile=True)`
does it, and as a static-shape prototype), and HF's forward on the same weights.

    PYTHONPATH=src python benchmarks/decode_step_probe.py --run shapes-demo --batch 1
    PYTHONPATH=src python benchmarks/decode_step_probe.py --batch 8 --no-compile

Not part of `nmm bench`: a probe behind the Engine changes proposed in docs/performance.md. Its HF
rows are eager; the compiled HF baseline (static cache, compiled decode step) is `nmm bench
--compile`'s compiled pair. Every
variant computes one new token for `batch` rows against a KV cache holding `--cached` tokens.
Times are this thread's CPU time (`time.thread_time`, one torch thread), the best of 5 blocks of
calls: on a shared machine that is closer to the idle-machine cost than wall time.

  nmm eager            model.hidden(1 token, growing mask, cache slice) + model.logits: Engine's step
  nmm compile dynamic  the same through torch.compile(dynamic=True): Engine(compile=True)
  nmm compile static   prototype: attention over the whole preallocated cache with a full-width
                       mask, the new k/v written with index_copy_ at a tensor slot, so every step
                       has the same shapes and one compiled graph serves the whole generation
  HF forward           LlamaForCausalLM / Qwen3ForCausalLM forward of 1 token with a DynamicCache
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
import torch.nn.functional as F

from nmm.bench.common import load_target, set_threads
from nmm.bench.hf import nmm_to_hf, quiet_transformers
from nmm.model.layers import apply_rope


def cpu_ms(fn, calls: int = 200, blocks: int = 5) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(blocks):
        t0 = time.thread_time()
        for _ in range(calls // blocks):
            fn()
        best = min(best, (time.thread_time() - t0) / (calls // blocks) * 1e3)
    return best


def static_step(model, caches):
    """Prototype decode step with static shapes (the proposed Engine/KVCache change)."""
    backbone = model.backbone

    def attention(a, x, cos, sin, mask, cache, slot):
        B, T, _ = x.shape
        q, k, v = a.wq(x), a.wk(x), a.wv(x)
        q = q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = k.view(B, T, a.n_kv, a.head_dim).transpose(1, 2)
        v = v.view(B, T, a.n_kv, a.head_dim).transpose(1, 2)
        q, k = apply_rope(a.q_norm(q), cos, sin), apply_rope(a.k_norm(k), cos, sin)
        cache.k.index_copy_(2, slot, k)  # slot is a (1,) tensor: moving it does not change the graph
        cache.v.index_copy_(2, slot, v)
        y = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask, enable_gqa=a.n_kv != a.n_heads)
        return a.wo(y.transpose(1, 2).reshape(B, T, -1))

    def step(ids, positions, mask, slot):
        h = model.embed(ids)
        cos, sin = backbone.rope_cos[positions].unsqueeze(1), backbone.rope_sin[positions].unsqueeze(1)
        for blk, cache in zip(backbone.blocks, caches):
            h = h + attention(blk.attn, blk.attn_norm(h), cos, sin, mask, cache, slot)
            h = h + blk.ffn(blk.ffn_norm(h))
        return model.logits(backbone.norm(h)[:, -1])

    return step


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="shapes-demo")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cached", type=int, default=40, help="tokens already in the KV cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the two compiled variants (minutes on a CPU)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    quiet_transformers()
    from transformers import DynamicCache

    pipe, name = load_target(args.run)
    model = pipe.model
    B, P, total = args.batch, args.cached, model.cfg.max_seq_len
    ids, pos = torch.full((B, 1), 5), torch.full((B, 1), P)
    grow_mask = torch.ones(B, 1, 1, P + 1, dtype=torch.bool)
    caches = model.backbone.make_caches(B, total, next(model.parameters()).dtype, "cpu")

    def eager():
        return model.logits(model.hidden(ids, positions=pos, mask=grow_mask, caches=caches, start=P)[:, -1])

    res = {"nmm eager": cpu_ms(eager)}
    if not args.no_compile:
        dyn = torch.compile(lambda: model.logits(model.hidden(ids, positions=pos, mask=grow_mask, caches=caches,
                                                              start=P)[:, -1]), dynamic=True)
        t0 = time.perf_counter()
        dyn()
        print(f"compile (dynamic): {time.perf_counter() - t0:.0f} s")
        res["nmm compile dynamic"] = cpu_ms(dyn)
        full_mask = torch.zeros(B, 1, 1, total, dtype=torch.bool)
        full_mask[..., : P + 1] = True
        step, slot = torch.compile(static_step(model, caches), fullgraph=True, dynamic=False), torch.tensor([P])
        t0 = time.perf_counter()
        out = step(ids, pos, full_mask, slot)
        print(f"compile (static): {time.perf_counter() - t0:.0f} s")
        assert torch.allclose(out, eager(), atol=1e-4), "the static prototype must compute the eager step"
        res["nmm compile static"] = cpu_ms(lambda: step(ids, pos, full_mask, slot))

    hf = nmm_to_hf(model)
    cache = DynamicCache(config=hf.config)
    # transformers 5.x renames the forward's `past_key_values` to `cache` (the old name warns, then goes in 5.40)
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    hf(input_ids=torch.full((B, P), 5), use_cache=True, **{kw: cache})
    attn = torch.ones(B, P + 1, dtype=torch.long)

    def hf_step(head: bool):
        out = (hf if head else hf.model)(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                                         **{kw: cache})
        cache.crop(-1)  # back to P cached tokens: every call does the same work
        return out

    res["HF forward"] = cpu_ms(lambda: hf_step(True))
    res["HF forward, no lm_head"] = cpu_ms(lambda: hf_step(False))
    print(f"{name}, batch {B}, {P} cached tokens, {args.threads} thread(s): CPU ms per one-token step")
    for k, v in res.items():
        print(f"  {k:26s} {v:7.3f} ms   HF forward / this = {res['HF forward'] / v:.2f}x")
    return res


if __name__ == "__main__":
    main()
