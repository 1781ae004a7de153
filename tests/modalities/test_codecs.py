"""`Codecs.prompt`: the one prompt builder (<bos>, text ids, items as begin ids end, optionally an open item),
the same layout as `encode_document` without its <eos>."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmm.config import load_config
from nmm.modalities.base import ModalitySpec
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document, ImageSegment, ItemSegment, TextSegment
from nmm.modalities.image import ImageTokenizer
from nmm.modalities.text import TextTokenizer

TEXTS = ["a small red circle at the top left", "what colour is the square?", "make it blue"] * 20


class ToyCodec:
    """A made-up modality: items are 3 integers in [0, 7), each its own code."""

    spec = ModalitySpec("toy", "<bot>", "<eot>", codes=7, tokens_per_item=3)

    def encode(self, items):
        return torch.as_tensor(np.asarray(items), dtype=torch.long)

    def decode(self, codes):
        return codes.numpy()


@pytest.fixture(scope="module")
def codecs():
    torch.manual_seed(0)
    text = TextTokenizer.train(TEXTS, vocab_size=300)
    return Codecs(text, ImageTokenizer(load_config("shapes-tiny").image).eval(), ToyCodec())


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)


def test_text_and_open_item(codecs):
    v = codecs.vocab
    caption = codecs.encode_text(TEXTS[0])
    assert codecs.prompt([TEXTS[0]], open_item="image") == [v.bos, *caption, v.boi]
    assert codecs.prompt([], open_item="image") == [v.bos, v.boi]  # CFG's unconditional prompt
    assert codecs.prompt([TextSegment(TEXTS[0])]) == codecs.prompt([("text", TEXTS[0])]) == [v.bos, *caption]
    assert codecs.prompt([("text", [5, 6, 7])]) == [v.bos, 5, 6, 7]  # text ids pass as they are
    assert codecs.prompt([], open_item="toy") == [v.bos, v.begin("toy")]


def test_items_raw_or_encoded(codecs, images):
    v = codecs.vocab
    image_ids = codecs.encode_images(images)
    question = codecs.encode_text(TEXTS[1])
    expected = [v.bos, v.boi, *image_ids[0].tolist(), v.eoi, *question]
    assert codecs.prompt([("image", images[0]), TEXTS[1]]) == expected
    assert codecs.prompt([ImageSegment(images[0]), TEXTS[1]]) == expected
    assert codecs.prompt([ItemSegment("image", codes=image_ids[0]), TEXTS[1]]) == expected
    assert codecs.prompt([ItemSegment("image", codes=torch.as_tensor(image_ids[0])), TEXTS[1]]) == expected
    edit = codecs.prompt([ItemSegment("image", codes=image_ids[1]), TEXTS[2]], open_item="image")
    assert edit == [v.bos, v.boi, *image_ids[1].tolist(), v.eoi, *codecs.encode_text(TEXTS[2]), v.boi]
    toy = codecs.prompt([("toy", np.array([0, 1, 6])), "x"])
    assert toy[:6] == [v.bos, v.begin("toy"), *v.ids("toy", np.array([0, 1, 6])).tolist(), v.end("toy")]
    assert toy[6:] == codecs.encode_text("x")


def test_a_prompts_items_are_encoded_in_one_batch(codecs, images, monkeypatch):
    calls = []
    inner = codecs.encode_items

    def counting(name, items, batch=256):
        calls.append((name, len(items)))
        return inner(name, items, batch)

    monkeypatch.setattr(codecs, "encode_items", counting)
    ids = codecs.prompt([("image", images[0]), "and", ("image", images[1]), ("toy", [1, 2, 3]), ("image", images[2])])
    assert sorted(calls) == [("image", 3), ("toy", 1)]
    v = codecs.vocab
    assert ids.count(v.boi) == 3 and ids.count(v.eoi) == 3 and ids.count(v.begin("toy")) == 1
    monkeypatch.undo()
    image_ids = [codecs.encode_images(img[None])[0].tolist() for img in images]  # one by one
    assert ids == [v.bos, v.boi, *image_ids[0], v.eoi, *codecs.encode_text("and"), v.boi, *image_ids[1], v.eoi,
                   v.begin("toy"), *v.ids("toy", np.array([1, 2, 3])).tolist(), v.end("toy"),
                   v.boi, *image_ids[2], v.eoi]


def test_bad_segments_are_refused(codecs):
    v = codecs.vocab
    with pytest.raises(ValueError, match="image item is"):
        codecs.prompt([ItemSegment("image", codes=np.arange(5) + v.start("image"))])  # too short
    with pytest.raises(ValueError, match="range"):
        codecs.prompt([ItemSegment("toy", codes=np.array([1, 2, 3]))])  # codes, not vocabulary ids
    with pytest.raises(TypeError, match="prompt segment"):
        codecs.prompt([42])
    with pytest.raises(KeyError, match="audio"):
        codecs.prompt([("audio", np.zeros(3))])


def test_documents_share_the_layout(codecs, images):
    doc = Document([TextSegment(TEXTS[1], loss=False), ImageSegment(images[0]), TextSegment(TEXTS[2])])
    ids, target = codecs.encode_document(doc)
    assert ids == codecs.prompt(doc.segments) + [codecs.vocab.eos]
    assert len(target) == len(ids) and target[0] is False and target[-1] is True
