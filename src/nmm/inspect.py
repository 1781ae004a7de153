"""`nmm inspect`: describe a preset or a trained run in the roadmap's terms."""

from __future__ import annotations

from pathlib import Path

from nmm.config import RunConfig, load_config


def flops_per_token(cfg: RunConfig, vocab_size: int, seq_len: int) -> int:
    """Forward FLOPs per token (2 per multiply-add): matmuls plus attention over seq_len keys."""
    m = cfg.model
    hd = m.d_model // m.n_heads
    attn_proj = m.d_model * (m.n_heads + 2 * m.n_kv_heads) * hd + m.n_heads * hd * m.d_model
    ffn = 3 * m.d_model * m.ffn_hidden
    attn_scores = 2 * m.n_heads * hd * seq_len  # q.k and p.v
    return 2 * (m.n_layers * (attn_proj + ffn + attn_scores) + m.d_model * vocab_size)


def describe(target: str) -> dict:
    path = Path(target)
    cfg = load_config(path / "config.yaml") if path.is_dir() else load_config(target)
    from nmm.model.model import NativeMultimodalModel
    from nmm.modalities.image import ImageTokenizer
    from nmm.modalities.vocab import Vocabulary

    image_tok = ImageTokenizer(cfg.image)
    vocab = Vocabulary(cfg.text.vocab_size, image_tok.codebook_size, tuple(image_tok.code_factors),
                       image_tok.tokens_per_image)
    model = NativeMultimodalModel(cfg.model, vocab)
    params = model.num_params()
    return {
        "name": cfg.name,
        "fusion": "early",
        "representation": "discrete",
        "capabilities": ["M2T", "M2G", "M2M"],
        "routing": "dense",
        "modalities": ["text", "image"],
        "params_total": params,
        "params_active": params,
        "image_tokenizer_params": sum(p.numel() for p in image_tok.parameters()),
        "positions_per_image": vocab.tokens_per_image + 2,
        "image_codes": vocab.image_codes,
        "image_code_factors": list(vocab.image_factors),
        "vocab_size": vocab.size,
        "flops_per_token": flops_per_token(cfg, vocab.size, cfg.train.seq_len),
    }
