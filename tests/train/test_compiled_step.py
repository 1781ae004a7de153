"""The training step compiles to one graph, and batches of different content reuse it.

`torch.compile` with `fullgraph=True` raises on any graph break (a host sync such as `.item()` or
`bool(t.any())`, a data-dependent shape such as `h[mask]`); a counting backend sees every graph
dynamo hands over, so a recompile (a guard failing on a new batch) shows as a second graph."""

import pytest
import torch

from nmm.config import ModelConfig, VisionEncoderConfig
from nmm.modalities.base import ModalitySpec
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary
from nmm.model.model import NativeMultimodalModel
from nmm.train.trainer import LossModule

IMAGE = image_spec(12, (4, 3), 16, ((4,), (3,)))
SPEECH = ModalitySpec("audio", "<boa>", "<eoa>", codes=20, factors=(5, 4), tokens_per_item=None)  # variable length
SMALL = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=96,
             encoder=VisionEncoderConfig(width=16, layers=1))
VARIANTS = {
    "early-discrete": {},
    "early-continuous": {"image_repr": "continuous"},
    "early-decoupled": {"image_repr": "decoupled"},
    "late": {"fusion": "late", "image_repr": "continuous"},
    "mid": {"fusion": "mid", "image_repr": "continuous", "cross_attn_every": 1},
    "moe": {"routing": "moe"},
    "moe-aware": {"routing": "moe-aware"},
    "mot": {"routing": "mot"},
    "mrope": {"rope": "mrope"},
}


def packed_batch(vocab: Vocabulary, seed: int, B: int = 3, T: int = 80):
    """Rows of packed documents: text spans, items of every modality (audio of random length),
    several documents per row, a row cut mid-item. Each seed gives another layout."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    ids, docs, gen = [], [], []
    for _ in range(B):
        row, doc, made, d = [], [], [], 0
        while len(row) < T + 1:
            part = [vocab.bos] + torch.randint(0, vocab.n_text, (rand(1, 12),), generator=g).tolist()
            flags = [False] * len(part)
            for m in vocab.modalities:
                if rand(0, 2):
                    n = m.tokens_per_item or rand(2, 9)
                    codes = (vocab.start(m.name) + torch.randint(0, m.codes, (n,), generator=g)).tolist()
                    produced = bool(rand(0, 2))
                    part += [vocab.begin(m.name), *codes, vocab.end(m.name)]
                    flags += [False] + [produced] * n + [False]
            part.append(vocab.eos)
            flags.append(False)
            row += part
            made += flags
            doc += [d] * len(part)
            d += 1
        ids.append(row[: T + 1])
        docs.append(doc[: T + 1])
        gen.append(made[: T + 1])
    full, doc_ids = torch.tensor(ids), torch.tensor(docs)[:, :-1]
    targets = full[:, 1:].clone()
    targets[doc_ids != torch.tensor(docs)[:, 1:]] = -100  # no loss across documents
    positions = torch.stack([torch.cat([torch.arange((r == k).sum()) for k in r.unique()]) for r in doc_ids])
    return full[:, :-1], targets, positions, doc_ids, torch.tensor(gen)[:, :-1]


def compiled_graphs(net: torch.nn.Module, batches) -> list:
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(net, backend=counting_backend, fullgraph=True)
    for batch in batches:
        loss, stats = step(*batch)
        loss.backward()
        assert torch.isfinite(loss)
    return graphs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_step_is_one_graph_for_every_variant(name):
    vocab = Vocabulary(40, (IMAGE,))
    torch.manual_seed(0)
    model = NativeMultimodalModel(ModelConfig(**SMALL, **VARIANTS[name]), vocab)
    net = LossModule(model, {}, 1e-4)
    batches = [packed_batch(vocab, seed) for seed in range(3)]
    assert len({int((b[0] == vocab.boi).sum()) for b in batches}) > 1  # the batches' layouts differ
    assert len(compiled_graphs(net, batches)) == 1


def test_training_step_is_one_graph_with_a_variable_length_modality():
    """Images and speech in one batch: the end head's softmax, masks and per-modality terms."""
    vocab = Vocabulary(40, (IMAGE, SPEECH))
    torch.manual_seed(0)
    net = LossModule(NativeMultimodalModel(ModelConfig(**SMALL), vocab), {"audio": 2.0}, 0.0)
    batches = [packed_batch(vocab, seed) for seed in range(3)]
    assert len(compiled_graphs(net, batches)) == 1


@pytest.mark.parametrize("audio_fusion", ["late", "mid"])  # early: late without the encoder
def test_training_step_is_one_graph_with_continuous_audio(audio_fusion):
    """Audio read as continuous latents (nmm.model.fusion.audio) next to discrete images."""
    speech = ModalitySpec("audio", "<boa>", "<eoa>", codes=20, factors=(5, 4), levels=((5,), (4,)), tokens_per_item=None)
    vocab = Vocabulary(40, (IMAGE, speech))
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, audio_fusion=audio_fusion, audio_repr="continuous", cross_attn_every=1)
    net = LossModule(NativeMultimodalModel(cfg, vocab), {}, 1e-4)
    batches = [packed_batch(vocab, seed) for seed in range(3)]
    assert len(compiled_graphs(net, batches)) == 1


def test_compiled_loss_equals_eager_loss():
    vocab = Vocabulary(40, (IMAGE, SPEECH))
    torch.manual_seed(0)
    net = LossModule(NativeMultimodalModel(ModelConfig(**SMALL), vocab), {}, 1e-4)
    batch = packed_batch(vocab, 5)
    eager, eager_stats = net(*batch)
    torch._dynamo.reset()
    compiled, stats = torch.compile(net, fullgraph=True)(*batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert set(stats) == set(eager_stats)
    for k in stats:
        torch.testing.assert_close(stats[k].float(), eager_stats[k].float(), rtol=1e-5, atol=1e-5, equal_nan=True)


def test_a_modality_absent_from_the_batch_reports_nan_and_counts_nothing():
    vocab = Vocabulary(40, (IMAGE,))
    torch.manual_seed(0)
    model = NativeMultimodalModel(ModelConfig(**SMALL), vocab)
    ids = torch.randint(0, 40, (2, 16))
    targets = torch.roll(ids, -1, 1)
    loss, stats = model.loss(ids, targets, torch.arange(16).expand(2, -1), torch.zeros(2, 16, dtype=torch.long), {}, 0.0)
    assert int(stats["tokens_image"]) == 0 and torch.isnan(stats["loss_image"])
    assert int(stats["tokens_text"]) == 32 and torch.isfinite(stats["loss_text"])
    torch.testing.assert_close(loss, stats["loss_text"])  # the absent term adds exactly 0
