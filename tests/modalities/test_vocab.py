"""The vocabulary layout: built from modality specs, saved with a version, read back exactly."""

import json

import pytest
import torch

from nmm.modalities.base import ModalitySpec, join_codes, split_codes
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary, VocabularyError

IMAGE = image_spec(24, (6, 4), 4)
AUDIO = ModalitySpec("audio", "<boa>", "<eoa>", codes=10, tokens_per_item=None, mime="audio/wav")


def test_text_and_image_layout_is_the_chameleon_layout_nmm_always_had():
    v = Vocabulary(50, (IMAGE,))
    assert v.specials == ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")
    assert (v.pad, v.bos, v.eos, v.boi, v.eoi) == (50, 51, 52, 53, 54)
    assert v.text_size == 55 and v.range("image") == (55, 79) and v.size == 79
    assert v.ids("image", 3) == 58 and v.codes("image", 58) == 3


def test_modality_of_labels_every_id_in_one_call():
    v = Vocabulary(50, (IMAGE, AUDIO))
    assert v.specials[-2:] == ("<boa>", "<eoa>") and v.text_size == 57
    assert v.range("image") == (57, 81) and v.range("audio") == (81, 91) and v.size == 91
    ids = torch.tensor([0, 49, 50, 56, 57, 80, 81, 90])
    assert v.modality_of(ids).tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert [v.names[k] for k in v.modality_of(ids).tolist()][-1] == "audio"
    assert v.is_modality("audio", ids).tolist() == [False] * 6 + [True, True]
    assert v.begins() == {v.begin("image"): "image", v.begin("audio"): "audio"}
    with pytest.raises(KeyError, match="no modality 'video'"):
        v.spec("video")


def test_layout_round_trips_through_json():
    v = Vocabulary(50, (IMAGE, AUDIO))
    d = json.loads(json.dumps(v.to_dict()))
    assert d["layout_version"] == 2 and d["ranges"]["audio"] == [81, 91]
    assert Vocabulary.from_dict(d) == v


def test_a_run_saved_before_modality_plugins_reads_as_the_same_layout():
    old = {"n_text": 50, "image_codes": 24, "image_factors": [6, 4], "tokens_per_image": 4, "image_levels": []}
    assert Vocabulary.from_dict(old) == Vocabulary(50, (IMAGE,))


def test_a_shifted_layout_is_refused_with_a_clear_error():
    d = Vocabulary(50, (IMAGE,)).to_dict()
    d["specials"] = ["<pad>", "<bos>", "<eos>", "<sep>", "<boi>", "<eoi>"]
    with pytest.raises(VocabularyError, match="shift"):
        Vocabulary.from_dict(d)
    with pytest.raises(VocabularyError, match="version 9"):
        Vocabulary.from_dict({**d, "layout_version": 9})


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="multiply to 20, not 24"):
        ModalitySpec("image", "<boi>", "<eoi>", codes=24, factors=(5, 4))
    with pytest.raises(ValueError, match="identifier"):
        ModalitySpec("text", "<a>", "<b>", codes=3)
    with pytest.raises(ValueError, match="duplicate special"):
        Vocabulary(5, (IMAGE, ModalitySpec("other", "<boi>", "<x>", codes=2)))


def test_split_and_join_codes_are_inverse():
    codes = torch.arange(6 * 4 * 3)
    parts = split_codes(codes, (6, 4, 3))
    assert [int(p.max()) for p in parts] == [5, 3, 2]
    assert torch.equal(join_codes(parts, (6, 4, 3)), codes)


def test_codecs_refuse_a_vocab_json_that_disagrees_with_the_tokenizers(tiny_run, tmp_path):
    import shutil

    from nmm.errors import CheckpointError
    from nmm.modalities.codecs import Codecs

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    d = json.loads((run / "vocab.json").read_text())
    d["n_text"] += 1
    (run / "vocab.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="vocabulary layout.*text ids"):
        Codecs.load(run)


def test_the_layout_lookups_trace_into_a_compiled_graph():
    """No lock (functools.cached_property) or host sync in the lookups the model's loss calls."""
    v = Vocabulary(50, (IMAGE, AUDIO))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda ids: v.modality_of(ids) + v.is_modality("audio", ids) + v.is_code(ids))(
        torch.arange(91))
    assert explain.graph_break_count == 0 and explain.graph_count == 1
