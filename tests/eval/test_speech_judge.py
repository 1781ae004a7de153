"""Tests for the CTC speech recogniser used to judge generated speech."""

import json

import numpy as np
import pytest
import torch

from nmm.data.speech import SpeechWorld
from nmm.errors import CheckpointError
from nmm.eval.speech_judge import (
    ALPHABET,
    BLANK,
    RecognizerConfig,
    SpeechRecognizer,
    cer,
    train_recognizer,
    wer,
)

TINY = RecognizerConfig(channels=32, blocks=2, kernel=5)


@pytest.fixture(scope="module")
def tiny_data():
    world = SpeechWorld(kinds=("digits", "word"))
    utts = world.utterances(24, seed=0, split="train")
    return [world.render(t, v) for t, v in utts], [t for t, _ in utts]


def test_ctc_loss_falls_on_a_tiny_set(tiny_data):
    waves, texts = tiny_data
    model, stats = train_recognizer(waves, texts, steps=40, seed=0, batch_size=8, lr=3e-3, config=TINY)
    assert stats["steps"] == 40 and len(stats["losses"]) == 40 and stats["seconds"] > 0
    assert np.isfinite(stats["losses"]).all()
    assert stats["last_loss"] < 0.7 * stats["first_loss"], (stats["first_loss"], stats["last_loss"])
    hyps = model.transcribe(waves[:3])
    assert len(hyps) == 3 and all(set(h) <= set(ALPHABET) for h in hyps)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    model = SpeechRecognizer(TINY)
    idx = {ch: ALPHABET.index(ch) + 1 for ch in ALPHABET}
    # "t t h r e e _ e" with a blank between the two e's -> "three"; a leading space is stripped.
    path = [BLANK, idx[" "], idx["t"], idx["t"], BLANK, idx["h"], idx["r"], idx["e"], BLANK, idx["e"],
            idx[" "], idx[" "], idx["o"], idx["n"], idx["e"], idx["e"], BLANK]
    assert model.decode(path) == "three one"
    # The same path as logits through the batched decoder: pick each frame's class.
    logits = torch.full((len(path), len(ALPHABET) + 1), -10.0)
    logits[torch.arange(len(path)), torch.tensor(path)] = 10.0
    assert model.decode(logits.argmax(-1)) == "three one"
    assert model.decode([BLANK] * 5) == ""


def test_encode_rejects_characters_outside_the_alphabet():
    model = SpeechRecognizer(TINY)
    assert model.encode("ab ") == [2, 3, 1]
    with pytest.raises(ValueError, match="outside the alphabet"):
        model.encode("Seven 7")


def test_transcribe_is_independent_of_batching_and_padding(tiny_data):
    waves, _ = tiny_data
    torch.manual_seed(0)
    model = SpeechRecognizer(TINY).eval()
    with torch.no_grad():
        alone = [model(*model.featurize([w]))[0][0] for w in waves[:4]]
        logp, lengths = model(*model.featurize(waves[:4]))
    # Not bit-identical: the STFT's reflect padding at a wave's end sees the batch's zero padding,
    # which nudges the last frames and so the per-utterance normalisation, but only slightly.
    for i, ref in enumerate(alone):
        assert logp[i, :int(lengths[i])].shape == ref.shape
        assert torch.allclose(logp[i, :int(lengths[i])], ref, atol=0.05)


def test_save_load_round_trip(tmp_path, tiny_data):
    waves, _ = tiny_data
    torch.manual_seed(1)
    model = SpeechRecognizer(TINY).eval()
    model.save(tmp_path / "rec")
    loaded = SpeechRecognizer.load(tmp_path / "rec")
    assert loaded.config == model.config
    with torch.no_grad():
        a, b = model(*model.featurize(waves[:3]))[0], loaded(*loaded.featurize(waves[:3]))[0]
    assert torch.equal(a, b)
    assert loaded.transcribe(waves[:3]) == model.transcribe(waves[:3])


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        SpeechRecognizer.load(tmp_path / "nothing")
    SpeechRecognizer(TINY).save(tmp_path / "rec")
    (tmp_path / "rec" / "recognizer.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="corrupt"):
        SpeechRecognizer.load(tmp_path / "rec")
    SpeechRecognizer(TINY).save(tmp_path / "rec2")
    (tmp_path / "rec2" / "recognizer.json").write_text(json.dumps({"config": {"bogus": 1}}))
    with pytest.raises(CheckpointError, match="corrupt"):
        SpeechRecognizer.load(tmp_path / "rec2")


def test_cer_and_wer_on_known_strings():
    assert cer(["abcd"], ["abcd"]) == 0.0
    assert cer(["abcd"], ["abxd"]) == pytest.approx(0.25)
    # Corpus level: 1 edit over 4 + 4 reference characters, not the mean of per-pair rates.
    assert cer(["abcd", "efgh"], ["abcd", "efg"]) == pytest.approx(1 / 8)
    assert wer(["seven three one", "two"], ["seven tree one", "two"]) == pytest.approx(1 / 4)
    assert wer(["one two"], [""]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cer(["a"], [])
