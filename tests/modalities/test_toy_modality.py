"""A third modality defined only in this file: the whole contract, end to end.

`ToyCodec` is a made-up modality ("toy": items are 3 integers in [0, 7)). Registering it is the
one line a plugin needs; after that the vocabulary, documents, packing, the model, its losses,
checkpoints of the codecs and decoding all handle it without any change to nmm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nmm.config import load_config
from nmm.data.mixture import PackedBatches
from nmm.modalities.base import ModalityCodec, ModalitySpec, register_modality
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document, ItemSegment, TextSegment
from nmm.modalities.image import ImageTokenizer
from nmm.modalities.text import TextTokenizer
from nmm.model.model import NativeMultimodalModel
from nmm.train.trainer import make_optimizer


class ToyCodec:
    """Items are int arrays of length 3; a code is the integer itself."""

    FILE = "toy_codec.json"

    def __init__(self, offset: int = 0):
        self.offset = offset  # stands in for learned state that must survive save/load

    @property
    def spec(self) -> ModalitySpec:
        return ModalitySpec("toy", "<bot>", "<eot>", codes=7, tokens_per_item=3, mime="application/x-toy")

    def encode(self, items) -> torch.Tensor:
        return (torch.as_tensor(np.asarray(items), dtype=torch.long) + self.offset) % 7

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        return ((codes - self.offset) % 7).numpy()

    def to_bytes(self, item) -> bytes:
        return bytes(int(x) for x in item)

    def from_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def save(self, run_dir) -> None:
        (Path(run_dir) / self.FILE).write_text(json.dumps({"offset": self.offset}))

    @classmethod
    def load(cls, run_dir) -> ToyCodec:
        return cls(json.loads((Path(run_dir) / cls.FILE).read_text())["offset"])


register_modality("toy", ToyCodec)  # the one registry line


def toy_document(rng, codecs) -> Document:
    seq = rng.integers(0, 7, size=3)
    words = " ".join(str(int(x)) for x in seq)
    image = codecs.vocab.ids("image", rng.integers(0, codecs.vocab.image_codes, size=codecs.vocab.tokens_per_image))
    return Document([TextSegment(f"the numbers {words}", loss=False), ItemSegment("toy", seq),
                     ItemSegment("image", codes=image, loss=False), TextSegment("done")], "interleaved")


class ToyMixture:
    def __init__(self, codecs):
        self.codecs = codecs

    def sample(self, rng) -> Document:
        return toy_document(rng, self.codecs)


@pytest.fixture(scope="module")
def codecs(tiny_run):
    return Codecs(TextTokenizer.load(tiny_run / "text_tokenizer.json"), ImageTokenizer.load(tiny_run), ToyCodec(2))


def test_the_toy_codec_meets_the_protocol_and_gets_its_own_id_range(codecs):
    assert isinstance(ToyCodec(), ModalityCodec)
    v = codecs.vocab
    assert v.names == ("text", "image", "toy") and v.specials[-2:] == ("<bot>", "<eot>")
    assert v.range("toy") == (v.range("image")[1], v.size) and v.size == v.range("image")[1] + 7
    ids, target = codecs.encode_document(Document([TextSegment("hi"), ItemSegment("toy", np.array([0, 1, 6]))]))
    toy = ids.index(v.begin("toy"))
    assert ids[toy + 4] == v.end("toy")
    assert codecs.decode_items("toy", torch.tensor([ids[toy + 1: toy + 4]])).tolist() == [[0, 1, 6]]
    assert v.modality_of(torch.tensor(ids[toy + 1: toy + 4])).tolist() == [2, 2, 2]


def test_codecs_with_the_toy_modality_save_and_load_through_the_registry(codecs, tmp_path):
    codecs.save(tmp_path)
    loaded = Codecs.load(tmp_path)
    assert loaded.vocab == codecs.vocab and loaded.codec("toy").offset == 2
    assert json.loads((tmp_path / "vocab.json").read_text())["ranges"]["toy"] == list(codecs.vocab.range("toy"))


def test_a_model_over_text_image_and_toy_trains_two_steps(codecs):
    cfg = load_config("shapes-tiny")
    torch.manual_seed(0)
    model = NativeMultimodalModel(cfg.model, codecs.vocab)
    assert set(model.modalities) == {"image", "toy"}
    batches = PackedBatches(ToyMixture(codecs), batch_size=4, seq_len=cfg.train.seq_len, seed=0)
    batch = batches.batch(0)
    toy_targets = codecs.vocab.is_modality("toy", batch.targets)
    assert toy_targets.sum() > 0 and batch.generated[codecs.vocab.is_modality("toy", batch.ids)].all()
    logits = model(batch.ids)
    assert logits.shape == (*batch.ids.shape, codecs.vocab.size)
    opt = make_optimizer(model, cfg.train)
    losses = []
    for _ in range(2):
        loss, stats = model.loss(batch.ids, batch.targets, batch.positions, batch.doc_ids, {}, 0.0, batch.generated)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        assert {"loss_text", "loss_toy"} <= set(stats) and stats["tokens_toy"] == toy_targets.sum()
    assert all(np.isfinite(losses)) and losses[1] < losses[0]


def test_the_decoder_writes_well_formed_toy_items(codecs):
    """After <bot> only toy codes, exactly 3 of them, then a forced <eot>; free generation keeps every
    item of every modality well formed."""
    from nmm.infer.engine import Engine
    from nmm.infer.sampling import SamplingConfig

    v = codecs.vocab
    torch.manual_seed(0)
    model = NativeMultimodalModel(load_config("shapes-tiny").model, v).eval()
    prompt = codecs.prompt(["the numbers"], open_item="toy")
    assert prompt[-1] == v.begin("toy")
    res = Engine(model).generate([prompt] * 2, 4, SamplingConfig(temperature=1.0, seed=0), stop_after_image=True)
    for toks in res.tokens:
        assert v.is_modality("toy", torch.tensor(toks[:3])).all() and toks[3] == v.end("toy")
    with torch.no_grad():  # make the text head open items often
        for name in ("image", "toy"):
            model.text_head.proj.weight[v.begin(name)] += 2 * model.text_head.proj.weight.std()
    res = Engine(model).generate([codecs.prompt(["go"])] * 4, 120, SamplingConfig(temperature=1.0, seed=1))
    opened = set()
    for toks in res.tokens:
        i = 0
        while i < len(toks):
            name = v.begins().get(toks[i])
            if name is None:
                assert not v.is_code(torch.tensor(toks[i])), f"a code outside an item at {i}: {toks}"
                i += 1
                continue
            n = v.spec(name).tokens_per_item
            item = toks[i + 1 : i + 1 + n]
            assert v.is_modality(name, torch.tensor(item)).all()
            if i + 1 + n < len(toks):
                assert toks[i + 1 + n] == v.end(name)
            opened.add(name)
            i += n + 2
    assert opened == {"image", "toy"}
