"""Sequence packing (`PackedBatches`): documents laid end to end in fixed-length rows, each with its
own positions, document index, next-token targets and `generated` marks; batch k is a pure
function of (seed, rank, k)."""

import numpy as np
import pytest
import torch

from nmm.data.mixture import PackedBatches
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document, ImageSegment, TextSegment


class FixedMixture:
    """Cycles through given documents (the rng picks which, as a real mixture does)."""

    def __init__(self, codecs, docs):
        self.codecs, self.docs = codecs, docs

    def sample(self, rng):
        return self.docs[int(rng.integers(len(self.docs)))]


@pytest.fixture(scope="module")
def codecs(tiny_run):
    return Codecs.load(tiny_run)


@pytest.fixture(scope="module")
def docs(codecs):
    v = codecs.vocab
    image = v.ids("image", np.arange(v.tokens_per_image) % v.image_codes)
    return [
        Document([TextSegment("a red circle", loss=False), ImageSegment(codes=image)], "generation"),
        Document([ImageSegment(codes=image, loss=False), TextSegment("a red circle")], "captioning"),
        Document([TextSegment("some english text")], "text"),
    ]


def test_rows_hold_whole_documents_with_their_own_positions_targets_and_marks(codecs, docs):
    v = codecs.vocab
    batch = PackedBatches(FixedMixture(codecs, docs), batch_size=3, seq_len=200, seed=0).batch(0)
    encoded = {tuple(codecs.encode_document(d)[0]): codecs.encode_document(d) for d in docs}
    for row in range(3):
        ids, tgt, pos, doc, gen = (t[row] for t in (batch.ids, batch.targets, batch.positions, batch.doc_ids,
                                                     batch.generated))
        n_docs = int(doc.max()) + 1
        assert n_docs >= 2  # several documents share a row
        for d in range(n_docs):
            span = (doc == d).nonzero().flatten()
            assert torch.equal(span, torch.arange(span[0], span[-1] + 1))  # contiguous
            toks = ids[span].tolist()
            assert tuple(toks) in encoded  # a whole document, exactly as encode_document writes it
            _, is_target = encoded[tuple(toks)]
            assert pos[span].tolist() == list(range(len(toks)))  # positions restart at each document
            expect = [t if flag else -100 for t, flag in zip(toks[1:], is_target[1:])] + [-100]
            assert tgt[span].tolist() == expect  # the last token predicts nothing across the boundary
            assert gen[span].tolist() == [bool(v.is_code(torch.tensor(t))) and f for t, f in zip(toks, is_target)]
        pad = doc == -1
        assert (ids[pad] == v.pad).all() and (tgt[pad] == -100).all() and not gen[pad].any()


def test_batches_are_a_pure_function_of_seed_rank_and_index(codecs, docs):
    mix = FixedMixture(codecs, docs)
    a = PackedBatches(mix, 2, 160, seed=3, rank=0)
    again = PackedBatches(mix, 2, 160, seed=3, rank=0).batch(5)
    assert torch.equal(a.batch(5).ids, again.ids) and torch.equal(a.batch(5).targets, again.targets)
    assert not torch.equal(a.batch(5).ids, PackedBatches(mix, 2, 160, seed=3, rank=1).batch(5).ids)  # another shard
    assert not torch.equal(a.batch(5).ids, a.batch(6).ids)


def test_an_over_long_document_is_cut_to_the_row(codecs, docs):
    long = Document([TextSegment("word " * 400)], "text")
    batch = PackedBatches(FixedMixture(codecs, [long]), 1, 64, seed=0).batch(0)
    assert (batch.doc_ids[0] == 0).all() and batch.positions[0].tolist() == list(range(64))
    assert batch.ids[0, 0] == codecs.vocab.bos
