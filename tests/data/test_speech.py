"""Tests for the eSpeak NG speech world."""

import numpy as np
import pytest
import torch

from nmm.data import speech
from nmm.data.speech import (
    ALPHABET,
    HELDOUT_VARIANTS,
    VARIANTS,
    SpeechSynthError,
    SpeechWorld,
    Voice,
    normalize_text,
    number_words,
    synthesize,
    voice_catalogue,
)
from nmm.modalities.audio_features import SAMPLE_RATE, LogMel, mel_distance

CAPTIONS = ["a small red circle at the top left, a large blue square at the center"]
WORLD = SpeechWorld(sentences=CAPTIONS)


def test_utterances_are_deterministic():
    assert WORLD.utterances(40, seed=1) == WORLD.utterances(40, seed=1)
    assert WORLD.utterances(40, seed=1) != WORLD.utterances(40, seed=2)
    # eSpeak keeps a little state between calls: same speech, not the same samples.
    wave_a, wave_b = (WORLD.render(*WORLD.utterances(1, seed=3)[0]) for _ in range(2))
    assert abs(len(wave_a) - len(wave_b)) < 0.02 * len(wave_a)
    mel = LogMel()
    other = WORLD.render("nine hundred", Voice("en+f4"))
    same = mel_distance(mel(torch.from_numpy(wave_a)[None]), mel(torch.from_numpy(wave_b)[None]))
    assert same < 0.5 * mel_distance(mel(torch.from_numpy(wave_a)[None]), mel(torch.from_numpy(other)[None]))


def test_splits_have_disjoint_voices():
    train, heldout = set(voice_catalogue("train")), set(voice_catalogue("heldout"))
    assert train and heldout and not train & heldout
    assert train | heldout == set(voice_catalogue("any"))
    assert not {v.variant for v in train} & set(HELDOUT_VARIANTS)
    assert 0.15 < len(HELDOUT_VARIANTS) / len(VARIANTS) < 0.25
    assert all(v.variant not in HELDOUT_VARIANTS for _, v in WORLD.utterances(300, seed=4, split="train"))
    assert all(v.variant in HELDOUT_VARIANTS for _, v in WORLD.utterances(100, seed=4, split="heldout"))
    with pytest.raises(ValueError, match="unknown split"):
        WORLD.utterances(1, seed=0, split="test")


def test_texts_use_the_small_alphabet_and_every_kind():
    texts = [t for t, _ in WORLD.utterances(400, seed=5, split="any")]
    assert all(t and set(t) <= set(ALPHABET) and t == " ".join(t.split()) for t in texts)
    assert normalize_text(CAPTIONS[0]) in texts  # caller sentences are spoken too
    assert any(t.split()[0] in ("one", "two", "three") and len(t.split()) >= 3 for t in texts)


def test_number_words_and_normalisation():
    assert number_words(0) == "zero" and number_words(15) == "fifteen" and number_words(40) == "forty"
    assert number_words(342) == "three hundred forty two" and number_words(900) == "nine hundred"
    assert normalize_text("A Red circle, 42!") == "a red circle four two"
    with pytest.raises(ValueError):
        number_words(1000)


def test_audio_properties():
    short = synthesize("seven", Voice("en+m3"))
    long = synthesize("seven three one four two nine", Voice("en+m3"))
    for wave in (short, long):
        assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all()
        assert 0.85 < np.abs(wave).max() <= 0.9 + 1e-4
        assert np.sqrt(np.mean(wave ** 2)) > 0.05  # speech, not silence
        # Trimmed: the first/last 50 ms hold the only silence.
        assert np.abs(wave[:int(0.1 * SAMPLE_RATE)]).max() > 0.01
    assert 0.2 < len(short) / SAMPLE_RATE < 1.0
    assert len(long) > 3 * len(short)


def test_every_catalogued_variant_speaks():
    for name in {v.name for v in voice_catalogue("any")}:
        assert len(synthesize("yes", Voice(name))) > 0.1 * SAMPLE_RATE, name


def test_rate_and_pitch_change_the_audio():
    slow, fast = synthesize("hello there", Voice("en+f2", rate=150)), synthesize("hello there", Voice("en+f2", rate=200))
    assert len(slow) > 1.15 * len(fast)
    low, high = synthesize("hello", Voice("en+f2", pitch=35)), synthesize("hello", Voice("en+f2", pitch=65))
    assert not np.array_equal(low[:1000], high[:1000])


def test_bad_voice_and_empty_text_raise():
    with pytest.raises(SpeechSynthError, match="no voice"):
        synthesize("hello", Voice("xx-nothing+zz"))
    with pytest.raises(SpeechSynthError, match="empty"):
        synthesize("  ", Voice("en+m3"))
    assert len(synthesize("hello", Voice("en+m3"))) > 0  # the engine recovers after a bad voice


def test_missing_library_names_the_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_loader(name, *args, **kwargs):
        if name == "espeakng_loader":
            raise ImportError("no espeakng_loader")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_loader)
    monkeypatch.setattr(speech.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(speech, "_ENGINE", None)
    with pytest.raises(SpeechSynthError, match="pip install espeakng-loader"):
        synthesize("hello", Voice("en+m3"))
