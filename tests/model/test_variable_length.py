"""A variable-length modality (speech) ends its items by choosing the end token over every code:
training and decoding must use one softmax over {end} + codes."""

import torch

from nmm.config import ModelConfig
from nmm.modalities.base import ModalitySpec
from nmm.modalities.vocab import Vocabulary
from nmm.model.model import NativeMultimodalModel

SPEC = ModalitySpec("audio", "<boa>", "<eoa>", codes=12, factors=(3, 4), tokens_per_item=None)
VOCAB = Vocabulary(20, (SPEC,))


def model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    m = NativeMultimodalModel(cfg, VOCAB).eval()
    with torch.no_grad():
        for p in m.parameters():  # large weights: a wrong normaliser shows as an O(1) difference
            p.normal_(0.0, 0.5) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
    return m


def test_the_audio_loss_is_the_cross_entropy_of_the_decoding_distribution():
    m, v = model(), VOCAB
    lo, hi = v.range("audio")
    eoa = v.end("audio")
    ids = torch.tensor([[v.bos, 3, 4, v.begin("audio"), lo + 1, lo + 7, lo + 11, eoa, 5, v.eos]])
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    doc = torch.zeros_like(ids)
    pos = torch.arange(ids.shape[1])[None]
    _, stats = m.loss(ids, targets, pos, doc, {}, 0.0)
    # Reference: decoding's logits (model.logits), restricted to what the decoder allows inside an
    # item (<eoa> and the codes), at the positions whose next token is a code or <eoa>.
    logits = m.logits(m.hidden(ids))[0]
    allowed = torch.full((v.size,), float("-inf"))
    allowed[lo:hi] = 0.0
    allowed[eoa] = 0.0
    inside = [3, 4, 5, 6]  # predicting code, code, code, <eoa>
    ref = torch.nn.functional.cross_entropy((logits[inside] + allowed).float(), targets[0, inside])
    torch.testing.assert_close(stats["loss_audio"], ref, rtol=1e-5, atol=1e-5)
    assert int(stats["tokens_audio"]) == 4
    # and <eoa> is not also a text target
    assert int(stats["tokens_text"]) == int((targets != -100).sum()) - 4


def test_end_logit_column_comes_from_the_end_head():
    m = model(1)
    h = torch.randn(2, 5, 32)
    logits = m.logits(h)
    end = m.modalities["audio"].end_logit(h)[..., 0]
    torch.testing.assert_close(logits[..., VOCAB.end("audio")], end)
    assert torch.isfinite(logits).all()
