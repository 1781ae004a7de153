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


def source_modalities(cfg: RunConfig) -> tuple[str, ...]:
    """The modalities of a run's data source(s) (`data.source`, joined with "+")."""
    from nmm.data.sources import data_source

    return tuple(data_source(cfg).modalities)


def build_codecs(cfg: RunConfig) -> dict:
    """Untrained codecs of the run's modalities: what they add to the vocabulary does not depend on training."""
    from nmm.modalities.codecs import untrained_codec

    return {name: untrained_codec(name, cfg) for name in source_modalities(cfg)}


def build_model(cfg: RunConfig):
    from nmm.model.model import NativeMultimodalModel

    codecs = build_codecs(cfg)
    vocab = Vocabulary(cfg.text.vocab_size, tuple(c.spec for c in codecs.values()))
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.train.seq_len)
    return NativeMultimodalModel(cfg.model, vocab), codecs


def _item_length(spec) -> int:
    # A variable-length item (speech, a delta clip) at a typical length: 64 codes (2.6 s of speech).
    return spec.tokens_per_item or 64


def reference_batch(vocab: Vocabulary, seq_len: int, generate: dict[str, bool], seed: int = 0):
    """One packed row: for each modality in turn, a reading document (item -> text) and, if the model
    writes that modality (`generate[name]`), a writing one (text -> item); random ids of the right kinds."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(0, vocab.n_text, (n,), generator=g).tolist()

    def item(spec):
        codes = vocab.ids(spec.name, torch.randint(0, spec.codes, (_item_length(spec),), generator=g))
        return [vocab.begin(spec.name), *codes.tolist(), vocab.end(spec.name)]

    kinds = [(spec, writes) for spec in vocab.modalities for writes in (False, True) if not writes or generate.get(spec.name)]
    ids, targets, doc_ids, generated, positions = [], [], [], [], []
    doc = 0
    while True:
        spec, gen_doc = kinds[doc % len(kinds)]
        parts = [(text(CAPTION_TOKENS), False), (item(spec), True)] if gen_doc else [(item(spec), False), (text(CAPTION_TOKENS), True)]
        toks, tgt = [vocab.bos], [False]
        for part, loss in parts:
            toks += part
            tgt += [loss] * len(part)
        toks.append(vocab.eos)
        tgt.append(True)
        if len(ids) + len(toks) > seq_len:
            if doc == 0:  # an item longer than the row: train on what fits
                toks, tgt = toks[:seq_len], tgt[:seq_len]
            else:
                break
        ids += toks
        targets += [t if flag else -100 for t, flag in zip(toks[1:], tgt[1:])] + [-100]
        generated += (vocab.is_code(torch.tensor(toks)) & gen_doc).tolist()
        positions += list(range(len(toks)))
        doc_ids += [doc] * len(toks)
        doc += 1
        if len(ids) >= seq_len:
            break
    pad = seq_len - len(ids)
    as_t = lambda xs, fill, dt=torch.long: torch.tensor([xs + [fill] * pad], dtype=dt)
    return (as_t(ids, vocab.pad), as_t(targets, -100), as_t(positions, 0), as_t(doc_ids, -1),
            as_t(generated, False, torch.bool)), len(ids)


def measured_flops_per_token(model, seq_len: int) -> int:
    """Forward FLOPs per token of a training step (2 per multiply-add), measured on `reference_batch`."""
    generate = {name: "M2G" in interface.capabilities for name, interface in model.modalities.items()}
    (ids, targets, positions, doc_ids, generated), n = reference_batch(model.vocab, seq_len, generate)
    with torch.no_grad():
        flops = count_flops(lambda: model.loss(ids, targets, positions, doc_ids, {}, 0.0, generated))
    return int(flops / n)


def positions_per_item(codecs: dict) -> dict:
    """Sequence positions one item takes, per modality: fixed (begin + codes + end), per second of
    speech, or a clip's bound (delta clips: the key frame, marks and changes; at most max_tokens)."""
    out = {}
    for name, codec in codecs.items():
        spec = codec.spec
        if spec.fixed_length:
            out[name] = spec.tokens_per_item + 2
        elif hasattr(codec, "tokens_per_second"):
            out[name] = f"{codec.tokens_per_second:g} per second + 2"
        else:
            out[name] = f"at most {codec.max_tokens + 2}"
    return out


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def describe(target: str) -> dict:
    """A preset name, a YAML file or a run directory -> the description."""
    path = Path(target)
    return describe_model(load_config(path / "config.yaml") if path.is_dir() else load_config(target))


def describe_model(cfg: RunConfig) -> dict:
    model, codecs = build_model(cfg)
    first = next(iter(model.modalities.values()))
    images = model.images if model.images is not None else first  # the design-space axes are the image variant's
    total = model.num_params()
    active = count_active_params(model)  # experts a token does not use and other MoT towers left out
    # Each modality's own input/output parameters are idle for tokens of the others.
    own = {"text": _params(model.text_embed) + _params(model.text_head),
           **{name: _params(interface) for name, interface in model.modalities.items()}}
    per_modality = {name: active - sum(v for k, v in own.items() if k != name) for name in own}
    vocab = model.vocab
    info = {
        "name": cfg.name,
        "fusion": images.fusion,
        "representation": images.representation,
        "capabilities": list(images.capabilities),
        "routing": cfg.model.routing,
        "rope": cfg.model.rope,
        # every modality's own axes (audio has its own: model.audio_fusion / model.audio_repr)
        "interfaces": {name: {"fusion": i.fusion, "representation": i.representation,
                              "capabilities": list(i.capabilities)} for name, i in model.modalities.items()},
        "modalities": ["text", *model.modalities],
        "params_total": total,
        "params_active": max(per_modality.values()),
        "params_active_by_modality": per_modality,
        "params_frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "codec_params": {name: _params(c.frame_codec if hasattr(c, "frame_codec") else c) for name, c in codecs.items()},
        "positions_per_item": positions_per_item(codecs),
        "vocab_size": vocab.size,
        "seq_len": cfg.train.seq_len,
        "flops_per_token": measured_flops_per_token(model, cfg.train.seq_len),
    }
    if model.images is not None:  # the image variant's own view (the sweep and earlier reports read these)
        info.update({
            "params_image_interface": _params(model.images),
            "image_tokenizer_params": info["codec_params"]["image"],
            "positions_per_image": vocab.tokens_per_image + 2,
            "image_in_sequence": {"early": "tokens", "late": "projected encoder features",
                                  "mid": "placeholders; features via cross-attention"}[model.images.fusion],
            "image_codes": vocab.image_codes,
            "image_code_factors": list(vocab.image_factors),
        })
    return info
