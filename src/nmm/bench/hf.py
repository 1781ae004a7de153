"""nmm weights -> a Hugging Face causal LM computing the same logits, and the parity check.

`nmm bench` and `benchmarks/train_throughput.py` compare nmm against Hugging Face on the *same*
weights, so the only difference measured is the code around them. The mapping:

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

from nmm.config import ModelConfig
from nmm.errors import NmmError
from nmm.modalities.base import split_codes
from nmm.model.model import NativeMultimodalModel


class ParityError(NmmError):
    """The converted Hugging Face model does not compute nmm's logits: a benchmark would compare two
    different functions, so it must not run."""


# ---- tables ---------------------------------------------------------------------------------------
@torch.no_grad()
def _code_table(interface) -> torch.Tensor:
    """(codes, D) embedding of every code of one modality (the sum of its factor embeddings)."""
    emb = interface.embed_codes
    codes = torch.arange(interface.spec.codes, device=emb.tables[0].weight.device)
    return sum(t.weight[part] for t, part in zip(emb.tables, split_codes(codes, emb.factors)))


@torch.no_grad()
def _code_head_matrix(interface) -> torch.Tensor:
    """(codes, D) weight whose rows give the logits of one modality's head (a sum of per-factor
    logits is linear in h, so a factorised head is an ordinary linear head with W[c] = sum_i W_i[c_i])."""
    head = interface.head
    codes = torch.arange(interface.spec.codes, device=head.proj[0].weight.device)
    return sum(p.weight[part] for p, part in zip(head.proj, split_codes(codes, head.factors)))


def _discrete(model: NativeMultimodalModel) -> list:
    """The model's modality interfaces in vocabulary order; each must embed and predict codes."""
    out = []
    for spec in model.vocab.modalities:
        interface = model.modalities[spec.name]
        if getattr(interface, "embed_codes", None) is None or getattr(interface, "head", None) is None:
            raise ValueError(f"HF conversion needs discrete {spec.name} codes (early fusion); this model's "
                             f"{spec.name} interface is {type(interface).__name__}")
        out.append(interface)
    return out


# ---- configs --------------------------------------------------------------------------------------
def _common_config(model_cfg: ModelConfig, vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.ffn_hidden,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_kv_heads,
        "head_dim": model_cfg.d_model // model_cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_seq_len,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model_cfg.rope_theta)},
        "attention_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": model_cfg.init_std,
        "use_cache": False,  # training default; generation passes use_cache=True
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def hf_llama_config(model_cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**_common_config(model_cfg, vocab_size), mlp_bias=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def hf_qwen3_config(model_cfg: ModelConfig, vocab_size: int):
    from transformers import Qwen3Config

    cfg = Qwen3Config(**_common_config(model_cfg, vocab_size), use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def make_hf_llama(model_cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_llama_config(model_cfg, vocab_size))
    model.config._attn_implementation = "sdpa"
    return model


def make_hf_qwen3(model_cfg: ModelConfig, vocab_size: int):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(hf_qwen3_config(model_cfg, vocab_size))
    model.config._attn_implementation = "sdpa"
    return model


# ---- conversion -----------------------------------------------------------------------------------
@torch.no_grad()
def _hf_state_dict(model: NativeMultimodalModel) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {
        "model.embed_tokens.weight": torch.cat([model.text_embed.weight, *map(_code_table, _discrete(model))], 0),
        "model.norm.weight": model.backbone.norm.weight,
        "lm_head.weight": torch.cat([model.text_head.proj.weight, *map(_code_head_matrix, _discrete(model))], 0),
    }
    for interface in _discrete(model):  # a variable-length item's end token is scored by its own head
        if getattr(interface, "end_head", None) is not None:
            sd["lm_head.weight"] = sd["lm_head.weight"].clone()
            sd["lm_head.weight"][model.vocab.end(interface.name)] = interface.end_head.weight[0]
    for i, blk in enumerate(model.backbone.blocks):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": blk.attn_norm.weight,
            p + "self_attn.q_proj.weight": blk.attn.wq.weight,
            p + "self_attn.k_proj.weight": blk.attn.wk.weight,
            p + "self_attn.v_proj.weight": blk.attn.wv.weight,
            p + "self_attn.o_proj.weight": blk.attn.wo.weight,
            p + "post_attention_layernorm.weight": blk.ffn_norm.weight,
            p + "mlp.gate_proj.weight": blk.ffn.w_gate.weight,
            p + "mlp.up_proj.weight": blk.ffn.w_up.weight,
            p + "mlp.down_proj.weight": blk.ffn.w_down.weight,
        })
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim on q and k before RoPE, exactly nmm's q_norm/k_norm
            sd[p + "self_attn.q_norm.weight"] = blk.attn.q_norm.weight
            sd[p + "self_attn.k_norm.weight"] = blk.attn.k_norm.weight
    return sd


def _load(hf, model: NativeMultimodalModel, name: str):
    sd = _hf_state_dict(model)
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"{name}: missing {missing}, unexpected {unexpected}")
    return hf.to(model.text_embed.weight.device)


@torch.no_grad()
def nmm_to_hf_llama(model: NativeMultimodalModel):
    """nmm model -> `LlamaForCausalLM` computing the same logits (vocabulary order: text, specials,
    image codes). Needs `qk_norm=False` (Llama has no QK-norm; see `nmm_to_hf`)."""
    if model.cfg.qk_norm:
        raise ValueError("nmm_to_hf_llama: Llama has no QK-norm; build the nmm model with qk_norm=False "
                         "(or use nmm_to_hf, which converts a QK-norm model to Qwen3)")
    return _load(make_hf_llama(model.cfg, model.vocab.size), model, "nmm_to_hf_llama")


@torch.no_grad()
def nmm_to_hf_qwen3(model: NativeMultimodalModel):
    """nmm model with QK-norm -> `Qwen3ForCausalLM` (Llama + per-head QK RMSNorm) with the same logits."""
    if not model.cfg.qk_norm:
        raise ValueError("nmm_to_hf_qwen3: the nmm model has no QK-norm; use nmm_to_hf_llama")
    return _load(make_hf_qwen3(model.cfg, model.vocab.size), model, "nmm_to_hf_qwen3")


def nmm_to_hf(model: NativeMultimodalModel):
    """The Hugging Face model with exactly nmm's architecture: Llama without QK-norm, Qwen3 with it."""
    return (nmm_to_hf_qwen3 if model.cfg.qk_norm else nmm_to_hf_llama)(model).eval()


def hf_arch(model: NativeMultimodalModel) -> str:
    return "Qwen3ForCausalLM" if model.cfg.qk_norm else "LlamaForCausalLM"


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
