"""Tests for the tones world and its pitch judge."""

import numpy as np
import pytest

from nmm.data.tones import (
    DEFAULT_HELDOUT,
    PITCHES,
    SPLITS,
    TIMBRES,
    Note,
    PitchJudge,
    ToneScene,
    ToneWorld,
    note_seconds,
)
from nmm.modalities.audio_features import SAMPLE_RATE

WORLD = ToneWorld()
JUDGE = PitchJudge()


def test_scenes_are_deterministic_and_valid():
    assert WORLD.scenes(50, seed=1) == WORLD.scenes(50, seed=1)
    assert WORLD.scenes(50, seed=1) != WORLD.scenes(50, seed=2)
    for split in SPLITS:
        scenes = WORLD.scenes(300, seed=3, split=split)
        assert all(WORLD.is_valid(s) for s in scenes)
        assert {len(s.notes) for s in scenes} == {1, 2, 3, 4}


def test_splits_respect_heldout_combinations():
    heldout = set(DEFAULT_HELDOUT)
    train = WORLD.scenes(1000, seed=4, split="train")
    assert not any((s.timbre, n.pitch) in heldout for s in train for n in s.notes)
    assert all(WORLD.has_heldout(s) for s in WORLD.scenes(200, seed=5, split="heldout_combo"))


def test_render_properties():
    scene = ToneScene((Note("c4", "long"), Note("g4")), "saw", "slow")
    wave = WORLD.render(scene)
    assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all()
    assert 0.3 < np.abs(wave).max() <= 0.5 + 1e-6
    expected = 0.05 * 2 + note_seconds("long", "slow") + 0.04 + note_seconds("short", "slow")
    assert abs(len(wave) / SAMPLE_RATE - expected) < 0.01
    with pytest.raises(ValueError, match="invalid tone scene"):
        WORLD.render(ToneScene((Note("h9"),)))


def test_caption_round_trip():
    for scene in WORLD.scenes(100, seed=6, split="any"):
        text = WORLD.caption(scene)
        assert text == text.lower() and WORLD.parse_caption(text) == scene
    assert WORLD.caption(ToneScene((Note("c4"), Note("e4", "long")), "square", "slow")) == \
        "slow square : c4 short e4 long"
    assert WORLD.parse_caption("loud trumpet : c4 short") is None
    assert WORLD.parse_caption(None) is None


def test_judge_reads_clean_renders_exactly():
    scenes = WORLD.scenes(150, seed=7, split="any")
    results = [JUDGE.score(WORLD.render(s), s) for s in scenes]
    assert all(r["exact"] for r in results), [s for s, r in zip(scenes, results) if not r["exact"]][:3]
    assert all(r["pitch"] == 1.0 and r["count"] and r["timbre"] and r["tempo"] for r in results)


def test_judge_reads_every_pitch_and_timbre():
    for timbre in TIMBRES:
        scene = ToneScene(tuple(Note(p) for p in list(PITCHES)[:4]), timbre, "fast")
        assert JUDGE.read(WORLD.render(scene)) == list(PITCHES)[:4]
        scene = ToneScene(tuple(Note(p) for p in list(PITCHES)[4:]), timbre, "slow")
        assert JUDGE.read_scene(WORLD.render(scene)) == scene


def test_repeated_notes_are_counted():
    scene = ToneScene((Note("e4"), Note("e4"), Note("e4", "long")), "sine", "fast")
    assert JUDGE.read_scene(WORLD.render(scene)) == scene


def test_noise_silence_and_wrong_notes_score_low():
    scene = ToneScene((Note("c4"), Note("e4"), Note("g4")), "square", "slow")
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.3, len(WORLD.render(scene))).astype(np.float32)
    assert JUDGE.read(noise) == []
    assert JUDGE.score(noise, scene) == {"count": False, "pitch": 0.0, "note": 0.0, "tempo": False,
                                         "timbre": False, "exact": False}
    assert JUDGE.score(np.zeros(8000, np.float32), scene)["pitch"] == 0.0
    wrong = ToneScene((Note("d4"), Note("f4"), Note("a4")), "square", "slow")
    result = JUDGE.score(WORLD.render(wrong), scene)
    assert result["pitch"] == 0.0 and result["count"] and not result["exact"]


def test_slightly_detuned_notes_still_read_but_a_semitone_does_not():
    from nmm.data.tones import tone
    assert JUDGE.read(tone(440.0 * 2 ** (20 / 1200), 0.3, "sine")) == ["a4"]  # 20 cents sharp
    assert JUDGE.read(tone(440.0 * 2 ** (1 / 12), 0.3, "sine")) == []  # a#4 is not in the set
