"""nmm weights -> a Hugging Face Llama or Qwen3 causal LM computing the same logits.

The text backbone family's adapter (moved here from `nmm.bench.hf`, which the benchmarks still import
it through): `nmm bench` and `benchmarks/train_throughput.py` compare nmm against Hugging Face on the
*same* weights, and `export_llama` writes such a copy as a checkpoint directory. The mapping:

- q/k/v, gate/up/down and the norms map one to one (`wq` -> `q_proj`, `w_gate` -> `gate_proj`, ...);
- the text and every modality's heads are stacked in vocabulary order (text ids, specials, codes);
- a factorised code embedding/head (a sum of per-factor tables) is materialised into one ordinary
  (codes, D) table: the sum of factor rows for the embedding, and for the head the rows
  W[c] = sum_i W_i[c_i] (a sum of per-factor logits is linear in h), so the copy is exact;
- a variable-length item's end token (speech) is scored by its modality's end head: that row of
  the stacked head.

Without QK-norm the architecture is exactly `LlamaForCausalLM`. With nmm's QK-norm (its default) it is
exactly `Qwen3ForCausalLM`, which is Llama plus an RMSNorm over each head's q and k before RoPE, as in
nmm's `Attention`. `nmm_to_hf` picks the one that matches. Chameleon's options (per-head LayerNorm
QK-norm, swin norm order) are neither: such a model exports as Chameleon (`nmm.interop.chameleon`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nmm.config import ModelConfig
from nmm.modalities.base import split_codes
from nmm.model.model import NativeMultimodalModel


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


def _check_backbone(cfg: ModelConfig, name: str) -> None:
    """Llama and Qwen3 have nmm's default norms only: refuse Chameleon's options rather than copy them wrongly."""
    if cfg.qk_norm and cfg.qk_norm_kind != "rms":
        raise ValueError(f"{name}: model.qk_norm_kind={cfg.qk_norm_kind} (Chameleon's) is not Llama's or Qwen3's; "
                         "export this model as Chameleon (nmm.interop.chameleon)")
    if cfg.norm_order != "pre":
        raise ValueError(f"{name}: model.norm_order={cfg.norm_order} is not Llama's or Qwen3's; export it as Chameleon")


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
def hf_state_dict(model: NativeMultimodalModel) -> dict[str, torch.Tensor]:
    """The Llama / Qwen3 state dict of an nmm model (Qwen3's q_norm / k_norm only with QK-norm)."""
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
    _check_backbone(model.cfg, name)
    sd = hf_state_dict(model)
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


# ---- export ---------------------------------------------------------------------------------------
def export_llama(run_dir: str | Path, dst_dir: str | Path, dtype: str | None = None) -> dict:
    """An nmm run -> a `LlamaForCausalLM` / `Qwen3ForCausalLM` directory (`AutoModelForCausalLM` loads it)
    over nmm's whole vocabulary: text ids, the specials, then every modality's codes as ordinary ids
    (what `nmm bench` compares against). The tokenizer.json is nmm's text tokenizer plus the specials
    (`<bos>` added in front) and one token per code (`<image:123>`); the run's codecs are saved beside,
    under nmm_codecs/, to turn items into those ids. Built in memory: for the models nmm trains."""
    import nmm
    from nmm.interop.common import resolve_precision, unified_tokenizer_json
    from nmm.utils import atomic_write_json, atomic_write_text

    run, dst = Path(run_dir), Path(dst_dir)
    pipe = nmm.load(run, device="cpu")
    model, vocab = pipe.model, pipe.vocab
    hf = nmm_to_hf(model)
    precision = resolve_precision(dtype)
    if precision is not None:
        hf = hf.to(precision)
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = vocab.bos, vocab.eos, vocab.pad
    hf.config.use_cache = True
    hf.save_pretrained(dst)
    tokenizer = unified_tokenizer_json(json.loads((run / "text_tokenizer.json").read_text()), vocab,
                                       {s: s for s in vocab.specials}, lambda name, c: f"<{name}:{c}>",
                                       bos="<bos>", source=run / "text_tokenizer.json")
    atomic_write_text(dst / "tokenizer.json", json.dumps(tokenizer, ensure_ascii=False))
    atomic_write_json(dst / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "model_max_length": model.cfg.max_seq_len, "clean_up_tokenization_spaces": False})
    pipe.codecs.save(dst / "nmm_codecs")
    return {"run": str(run.resolve()), "family": hf_arch(model), "vocab_size": vocab.size,
            "dtype": str(next(hf.parameters()).dtype).replace("torch.", "")}


__all__ = ["export_llama", "hf_arch", "hf_llama_config", "hf_qwen3_config", "hf_state_dict", "make_hf_llama",
           "make_hf_qwen3", "nmm_to_hf", "nmm_to_hf_llama", "nmm_to_hf_qwen3"]
