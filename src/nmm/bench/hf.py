"""The Hugging Face side of `nmm bench`: the parity check, logits processors and the compiled baseline.

`nmm bench` and `benchmarks/train_throughput.py` compare nmm against Hugging Face on the *same*
weights, so the only difference measured is the code around them. The conversion (nmm weights -> a
Llama / Qwen3 computing the same logits) is `nmm.interop.llama`, re-exported here. The mapping:

- q/k/v, gate/up/down and the norms map one to one (`wq` -> `q_proj`, `w_gate` -> `gate_proj`, ...);
- the text and image heads are stacked in vocabulary order (text ids, specials, image codes);
- a factorised image embedding/head (a sum of per-factor tables) is materialised into one ordinary
  (image_codes, D) table: the sum of factor rows for the embedding, and for the head the rows
  W[c] = sum_i W_i[c_i] (a sum of per-factor logits is linear in h), so the copy is exact.

Without QK-norm the architecture is exactly `LlamaForCausalLM`. With QK-norm (nmm's default) it is
exactly `Qwen3ForCausalLM`, which is Llama plus an RMSNorm over each head's q and k before RoPE, as
in nmm's `Attention`. `nmm_to_hf` picks the one that matches.

The compiled Hugging Face baseline (`static_compiled`): `generate(..., cache_implementation="static")`
with a `CompileConfig`, HF's own route to a compiled decode step (its generate compiles the model's
call for the one-token steps; the prefill stays eager). On a CPU HF only does so when the config says
`_compile_all_devices`, which `hf_compile_config` sets; `check_compiled` makes sure it happened. The
inductor options are nmm's (`Engine`: the C++ wrapper), so both sides get the same compiler.
"""

from __future__ import annotations

import torch

from nmm.errors import NmmError
# The conversion itself lives in nmm.interop.llama (it also writes exported checkpoints); the benches
# import it from here as before.
from nmm.interop.llama import (  # noqa: F401  (re-exported)
    hf_arch,
    hf_llama_config,
    hf_qwen3_config,
    make_hf_llama,
    make_hf_qwen3,
    nmm_to_hf,
    nmm_to_hf_llama,
    nmm_to_hf_qwen3,
)
from nmm.model.model import NativeMultimodalModel


class ParityError(NmmError):
    """The converted Hugging Face model does not compute nmm's logits: a benchmark would compare two
    different functions, so it must not run."""


# ---- parity ---------------------------------------------------------------------------------------
@torch.no_grad()
def logits_parity(model: NativeMultimodalModel, hf, ids: torch.Tensor, atol: float = 1e-4) -> dict:
    """Full-sequence logits of nmm and its HF copy on `ids` (B, T): max |diff|, raising `ParityError`
    unless it is below `atol`. Also returns the logits' scale, to show the check compares real numbers."""
    a = model(ids).float()
    b = hf(input_ids=ids, use_cache=False).logits.float()
    diff = (a - b).abs().max().item()
    result = {"max_abs_diff": diff, "atol": atol, "logit_scale": a.abs().max().item(), "hf_arch": hf_arch(model)}
    if not diff < atol:
        raise ParityError(f"{hf_arch(model)} copy of the nmm model disagrees: max |logit diff| {diff:.3g} >= {atol:g}; "
                          "the benchmark would compare different functions, so it was not run")
    return result


# ---- generation helpers ---------------------------------------------------------------------------
def allowed_ids_processor(allowed: torch.Tensor):
    """A `LogitsProcessor` that sets every id outside the (V,) bool mask `allowed` to -inf: the HF
    counterpart of the modality mask that nmm's engine applies at every step."""
    from transformers import LogitsProcessor

    class AllowedIds(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    return AllowedIds()


def image_block_processor(vocab, prompt_len: int):
    """A `LogitsProcessor` for one image block after a prompt ending in <boi>: the first
    `tokens_per_image` new tokens may only be image codes, the next only <eoi>. This is what nmm's
    modality state machine enforces inside an image."""
    from transformers import LogitsProcessor

    codes = torch.zeros(vocab.size, dtype=torch.bool)
    codes[slice(*vocab.range("image"))] = True
    eoi = torch.zeros(vocab.size, dtype=torch.bool)
    eoi[vocab.eoi] = True

    class ImageBlock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            allowed = codes if input_ids.shape[1] - prompt_len < vocab.tokens_per_image else eoi
            return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    return ImageBlock()


def batched_cfg_processor(scale: float, n: int):
    """A `LogitsProcessor` for classifier-free guidance with the unconditional prompts as extra rows of
    the batch (rows n..2n-1 for rows 0..n-1), as nmm's Engine does it: both halves get the guided
    logits uncond + scale * (cond - uncond), so greedy decoding feeds the unconditional row the
    conditional row's token. HF's stock `guidance_scale` instead runs the unconditional branch as a
    second forward per step with its own DynamicCache, which a static cache and a compiled forward
    cannot serve; a user after speed batches the two. Put it before any processor that sets -inf."""
    from transformers import LogitsProcessor

    class BatchedCFG(LogitsProcessor):
        def __call__(self, input_ids, scores):
            cond, uncond = scores[:n], scores[n:]
            mixed = uncond + scale * (cond - uncond)
            return torch.cat([mixed, mixed])

    return BatchedCFG()


# ---- the compiled HF baseline ---------------------------------------------------------------------
# Inductor options of nmm's Engine(compile=True) (see nmm.infer.engine): the same compiler for both sides.
COMPILE_OPTIONS = {"cpp_wrapper": True}


def hf_compile_config():
    """HF's `CompileConfig` for the compiled baseline: a static cache gives static shapes, so one graph
    per batch size (`dynamic=False`, `fullgraph=True`); nmm's inductor options (`mode` and `options`
    exclude each other in torch.compile, and `reduce-overhead`, HF's default mode, means CUDA graphs)."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, dynamic=False, mode=None, options=dict(COMPILE_OPTIONS))
    cc._compile_all_devices = True  # HF auto-compiles on accelerators only unless told to
    return cc


def static_compiled(gen_cfg):
    """A copy of the `GenerationConfig` with a static KV cache and HF's compiled decode step."""
    import copy

    cfg = copy.deepcopy(gen_cfg)
    cfg.cache_implementation = "static"
    cfg.compile_config = hf_compile_config()
    return cfg


def check_compiled(hf) -> None:
    """Raise unless HF's generate compiled its forward (`get_compiled_call` keeps it on the model): a
    transformers that silently fell back to eager would make the compiled pair a lie."""
    if getattr(hf, "_compiled_call", None) is None:
        raise NmmError("the compiled HF baseline did not compile (generate with a static cache and a "
                       "CompileConfig ran eagerly): this transformers version needs another route")


def left_pad(prompts: list[list[int]], pad: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids, attention_mask), left-padded as HF decoder-only generation expects."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def quiet_transformers() -> None:
    """HF generate warns about generation settings we set on purpose (no eos, custom processors)."""
    import transformers

    transformers.logging.set_verbosity_error()


def hf_generate(hf, prompts: list[list[int]], v, new_tokens: int, allowed: torch.Tensor, eos: int) -> list[list[int]]:
    """Greedy HF `generate` of left-padded prompts, choosing only `allowed` ids (V,) bool, stopping at
    `eos`: each row's new tokens up to and including `eos`."""
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, v.pad, hf.device)
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=v.pad, eos_token_id=eos,
                           use_cache=True)
    seqs = hf.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                       logits_processor=[allowed_ids_processor(allowed.to(hf.device))])
    return [row[: row.index(eos) + 1] if eos in row else row for row in seqs[:, ids.shape[1]:].tolist()]
