"""`nmm inspect`: describe a preset or a trained run in the roadmap's terms.

Fusion level, image representation, capabilities, routing and modalities come from the model's
own parts (its image variant and its blocks), not from the preset's name. Parameters are counted
from the built model; FLOPs per token are *measured*: one training forward over a reference
packed sequence (captioning and generation documents, the layout every variant shares) under
`torch.utils.flop_counter`, divided by its tokens. So a MoE counts only its top-k experts, mid
fusion its cross-attention and encoder, and nothing is a formula that can drift from the code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nmm.config import RunConfig, load_config
from nmm.modalities.vocab import Vocabulary
from nmm.model.moe import count_active_params
from nmm.perf import count_flops

CAPTION_TOKENS = 12  # a typical shapes caption


def build_model(cfg: RunConfig):
    from nmm.modalities.image import ImageTokenizer
    from nmm.model.model import NativeMultimodalModel

    image_tok = ImageTokenizer(cfg.image)
    vocab = Vocabulary(cfg.text.vocab_size, (image_tok.spec,))
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.train.seq_len)
    return NativeMultimodalModel(cfg.model, vocab), image_tok


def reference_batch(vocab: Vocabulary, seq_len: int, generate: bool, seed: int = 0):
    """One packed row: alternating captioning (image -> text) and, if the model can generate,
    generation (text -> image) documents, random ids of the right kinds."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(0, vocab.n_text, (n,), generator=g).tolist()

    def image():
        codes = vocab.ids("image", torch.randint(0, vocab.image_codes, (vocab.tokens_per_image,), generator=g))
        return [vocab.begin("image"), *codes.tolist(), vocab.end("image")]

    ids, targets, doc_ids, generated, positions = [], [], [], [], []
    doc = 0
    while True:
        gen_doc = generate and doc % 2 == 1
        parts = [(text(CAPTION_TOKENS), False), (image(), True)] if gen_doc else [(image(), False), (text(CAPTION_TOKENS), True)]
        toks, tgt = [vocab.bos], [False]
        for part, loss in parts:
            toks += part
            tgt += [loss] * len(part)
        toks.append(vocab.eos)
        tgt.append(True)
        if len(ids) + len(toks) > seq_len:
            break
        ids += toks
        targets += [t if flag else -100 for t, flag in zip(toks[1:], tgt[1:])] + [-100]
        generated += (vocab.is_code(torch.tensor(toks)) & gen_doc).tolist()
        positions += list(range(len(toks)))
        doc_ids += [doc] * len(toks)
        doc += 1
    pad = seq_len - len(ids)
    as_t = lambda xs, fill, dt=torch.long: torch.tensor([xs + [fill] * pad], dtype=dt)
    return (as_t(ids, vocab.pad), as_t(targets, -100), as_t(positions, 0), as_t(doc_ids, -1),
            as_t(generated, False, torch.bool)), len(ids)


def measured_flops_per_token(model, seq_len: int) -> int:
    """Forward FLOPs per token of a training step (2 per multiply-add), measured on `reference_batch`."""
    generate = "M2G" in model.images.capabilities
    (ids, targets, positions, doc_ids, generated), n = reference_batch(model.vocab, seq_len, generate)
    with torch.no_grad():
        flops = count_flops(lambda: model.loss(ids, targets, positions, doc_ids, {}, 0.0, generated))
    return int(flops / n)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def describe(target: str) -> dict:
    """A preset name, a YAML file or a run directory -> the description."""
    path = Path(target)
    return describe_model(load_config(path / "config.yaml") if path.is_dir() else load_config(target))


def describe_model(cfg: RunConfig) -> dict:
    model, image_tok = build_model(cfg)
    images = model.images
    total = model.num_params()
    active = count_active_params(model)  # experts a token does not use and other MoT towers left out
    # Each modality's own input/output parameters are idle for tokens of the other.
    text_only = _params(model.text_embed) + _params(model.text_head)
    per_modality = {"text": active - _params(images), "image": active - text_only}
    vocab = model.vocab
    return {
        "name": cfg.name,
        "fusion": images.fusion,
        "representation": images.representation,
        "capabilities": list(images.capabilities),
        "routing": cfg.model.routing,
        "modalities": ["text", "image"],
        "params_total": total,
        "params_active": max(per_modality.values()),
        "params_active_by_modality": per_modality,
        "params_image_interface": _params(images),
        "params_frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "image_tokenizer_params": _params(image_tok),
        "positions_per_image": vocab.tokens_per_image + 2,
        "image_in_sequence": {"early": "tokens", "late": "projected encoder features",
                              "mid": "placeholders; features via cross-attention"}[images.fusion],
        "image_codes": vocab.image_codes,
        "image_code_factors": list(vocab.image_factors),
        "vocab_size": vocab.size,
        "seq_len": cfg.train.seq_len,
        "flops_per_token": measured_flops_per_token(model, cfg.train.seq_len),
    }
